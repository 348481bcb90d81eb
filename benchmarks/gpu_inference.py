"""tumorseg's inference stage against MONAI's sliding window: same network, weights, input,
overlap and Gaussian blending, in one run on one device.

    python benchmarks/gpu_inference.py                    # GPU: nnU-Net-sized DynUNet on 4x240x240x155
    python benchmarks/gpu_inference.py --small            # CPU-sized check of the same comparison (CI)
    python benchmarks/gpu_inference.py --shape 512,512,400 --memory-budget-gb 24   # fallback check

Rows: MONAI fp32 with one window per pass (its defaults, but Gaussian blending and our overlap),
MONAI fp16 autocast with all windows in one pass (its best eager setting on a GPU), and tumorseg's
``predict_probabilities`` path (``stages/infer.py``). For each: seconds per scan (median of
``--repeats`` after a warm-up), TFLOP/s (forward FLOPs counted by ``torch.utils.flop_counter`` for
one window times the number of windows), peak device memory, argmax agreement with MONAI fp32
(the issue's bar: at least 99.9 % identical labels) and the largest logit difference.
``--profile`` prints torch.profiler's table for tumorseg's run. Exit code 1 when outputs disagree.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import DynUNet

from tumorseg.stages.infer import plan_windows, sliding_window


def network_for(filters: tuple[int, ...], channels: int, classes: int) -> torch.nn.Module:
    strides = [1] + [2] * (len(filters) - 1)
    torch.manual_seed(0)
    return DynUNet(3, channels, classes, kernel_size=[3] * len(filters), strides=strides,
                   upsample_kernel_size=strides[1:], filters=list(filters)).eval()


def window_flops(network: torch.nn.Module, channels: int, patch: tuple[int, ...], device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        network(torch.zeros((1, channels) + patch, device=device))
    return float(counter.get_total_flops())


def timed(run, repeats: int, device: torch.device) -> tuple[float, torch.Tensor, int]:
    """Median seconds of ``repeats`` runs after one warm-up, the last output, and peak memory."""
    output = run()  # warm-up (cuDNN autotuning, caches)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        output = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return statistics.median(times), output, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized: 2x48x52x40 image, 24^3 windows, tiny net")
    parser.add_argument("--shape", default=None, help="image size X,Y,Z (default 240,240,155)")
    parser.add_argument("--patch", type=int, default=None, help="window edge (default 128)")
    parser.add_argument("--filters", default=None, help="DynUNet filters (default 32,64,128,256,320,320)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--windows-per-batch", type=int, default=None, help="tumorseg: windows per pass (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-monai-fp32", action="store_true", help="for sizes where it does not fit")
    parser.add_argument("--memory-budget-gb", type=float, default=None, help="cap the process' GPU memory")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.small:
        shape, patch, filters, channels = (48, 52, 40), 24, (8, 16, 32), 2
    else:
        shape, patch, filters, channels = (240, 240, 155), 128, (32, 64, 128, 256, 320, 320), 4
    shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else shape
    patch = args.patch or patch
    filters = tuple(int(v) for v in args.filters.split(",")) if args.filters else filters
    patches = (patch,) * 3
    if args.memory_budget_gb and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_budget_gb * 2**30 / total), device)

    network = network_for(filters, channels, 4).to(device)
    torch.manual_seed(1)
    image = torch.randn((1, channels) + shape, device=device)
    windows = len(plan_windows(shape, patches, args.overlap).starts)
    flops = window_flops(network, channels, patches, device) * windows
    per_batch = args.windows_per_batch or windows
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; torch {torch.__version__}; image {channels}x{'x'.join(map(str, shape))}; "
          f"windows {patch}^3 x {windows} (overlap {args.overlap}); network filters {filters}, "
          f"{sum(p.numel() for p in network.parameters()) / 1e6:.1f} M parameters; {flops / 1e12:.2f} TFLOP per scan")

    fast_net = network.to(memory_format=torch.channels_last_3d) if device.type == "cuda" else network

    def ours():
        from tumorseg.stages.infer import robust_sliding_window

        with torch.inference_mode():
            return robust_sliding_window(fast_net, image, patches, args.overlap, per_batch, device)

    def monai(fp16: bool, batch: int):
        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
                return sliding_window_inference(image, patches, batch, network, overlap=args.overlap,
                                                mode="gaussian").float()
        return run

    rows = []
    reference = None
    if not args.skip_monai_fp32:
        seconds, reference, peak = timed(monai(False, 1), args.repeats, device)
        rows.append(("MONAI fp32, 1 window per pass", seconds, peak, reference))
    if device.type == "cuda":
        seconds, out, peak = timed(monai(True, windows), args.repeats, device)
        rows.append((f"MONAI fp16, {windows} windows per pass", seconds, peak, out))
    seconds, out, peak = timed(ours, args.repeats, device)
    rows.append((f"tumorseg ({'fp16, ' if device.type == 'cuda' else ''}{per_batch} windows per pass)", seconds, peak, out))
    if reference is None:
        reference = out

    ok = True
    print(f"{'how':40s} {'s/scan':>8s} {'TFLOP/s':>8s} {'peak GB':>8s} {'argmax agree':>13s} {'max |dlogit|':>13s}")
    labels = reference.argmax(1)
    for how, seconds, peak, output in rows:
        agree = float((output.argmax(1) == labels).float().mean())
        diff = float((output - reference).abs().max())
        ok &= agree >= 0.999
        print(f"{how:40s} {seconds:8.3f} {flops / seconds / 1e12:8.2f} {peak / 2**30:8.2f} {100 * agree:12.3f}% {diff:13.2e}")
    base = {how: s for how, s, _, _ in rows}
    ours_s = rows[-1][1]
    for how, seconds in base.items():
        if not how.startswith("tumorseg"):
            print(f"speed-up of tumorseg over {how}: {seconds / ours_s:.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            ours()
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=15))
    if not ok:
        print("outputs disagree: fewer than 99.9 % identical labels", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
