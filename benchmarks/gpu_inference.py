"""tumorseg's inference stage against MONAI's sliding window: same network, weights, input,
overlap and Gaussian blending, in one run on one device.

    python benchmarks/gpu_inference.py                    # GPU: nnU-Net-sized DynUNet on 4x240x240x155
    python benchmarks/gpu_inference.py --small            # CPU-sized check of the same comparison (CI)
    python benchmarks/gpu_inference.py --shape 512,512,400 --memory-budget-gb 24   # fallback check

Rows, in this order: MONAI fp32 with one window per pass (its defaults, but Gaussian blending
and our overlap), MONAI fp16 autocast with all windows in one pass (its best eager setting on a
GPU), tumorseg's inference stage (``prepare_network`` + ``robust_sliding_window`` from
``stages/infer.py``: fp16, channels-last, cuDNN autotuner); on CUDA then MONAI fp16 again, now
with the cuDNN autotuner that tumorseg switched on (to show what the autotuner alone gives); and
with ``--compile`` tumorseg with ``torch.compile`` (``compile = true`` in a pipeline; its
compilation time is printed). For each: seconds per scan (median of ``--repeats`` after a
warm-up), TFLOP/s (forward FLOPs counted by ``torch.utils.flop_counter`` for one window times the
number of windows), peak device memory, argmax agreement with MONAI fp32 (the issue's bar: at
least 99.9 % identical labels) and the largest logit difference. ``--profile`` prints
torch.profiler's table for tumorseg's fastest run. ``--tumorseg-only`` leaves MONAI out (sizes it
cannot hold). Exit code 1 when outputs disagree.
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import DynUNet

from tumorseg.stages.infer import plan_windows, prepare_network, robust_sliding_window


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


def timed(run, repeats: int, device: torch.device) -> tuple[float, torch.Tensor, int, float]:
    """Median seconds of ``repeats`` runs after one warm-up, the last output, peak memory, and
    the warm-up's seconds (cuDNN autotuning, compilation)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    output = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        output = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return statistics.median(times), output, peak, first


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
    parser.add_argument("--tumorseg-only", action="store_true", help="no MONAI rows (fallback and memory checks)")
    parser.add_argument("--compile", action="store_true", help="also time tumorseg with torch.compile")
    parser.add_argument("--memory-budget-gb", type=float, default=None, help="cap the process' GPU memory")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # fallbacks show

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

    def ours(prepared):
        def run():
            with torch.inference_mode():
                return robust_sliding_window(prepared, image, patches, args.overlap, per_batch, device)
        return run

    def monai(fp16: bool, batch: int):
        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
                return sliding_window_inference(image, patches, batch, network, overlap=args.overlap,
                                                mode="gaussian").float()
        return run

    rows = []  # (how, seconds, warm-up seconds)
    state = {"reference": None, "ok": True}
    print(f"{'how':44s} {'s/scan':>8s} {'TFLOP/s':>8s} {'peak GB':>8s} {'argmax agree':>13s} {'max |dlogit|':>13s}")

    def record(how: str, run) -> None:
        """Time ``run`` and print its row at once (a step cut off by a timeout keeps its rows)."""
        seconds, output, peak, first = timed(run, args.repeats, device)
        if state["reference"] is None:
            state["reference"] = output
        reference = state["reference"]
        agree = float((output.argmax(1) == reference.argmax(1)).float().mean())
        diff = float((output - reference).abs().max())
        state["ok"] &= agree >= 0.999
        rows.append((how, seconds, first))
        print(f"{how:44s} {seconds:8.3f} {flops / seconds / 1e12:8.2f} {peak / 2**30:8.2f} {100 * agree:12.3f}% "
              f"{diff:13.2e}", flush=True)

    fp16 = "fp16, " if device.type == "cuda" else ""
    if not args.tumorseg_only and not args.skip_monai_fp32:
        record("MONAI fp32, 1 window per pass", monai(False, 1))
    if not args.tumorseg_only and device.type == "cuda":
        record(f"MONAI fp16, {windows} windows per pass", monai(True, windows))
    # A copy: prepare_network lays the weights out channels-last, which must not reach MONAI's rows.
    record(f"tumorseg ({fp16}{per_batch} windows per pass)", ours(prepare_network(copy.deepcopy(network), device)))
    if not args.tumorseg_only and device.type == "cuda":
        record(f"MONAI fp16, {windows} windows, cuDNN autotuner", monai(True, windows))
    if args.compile:
        compiled = prepare_network(copy.deepcopy(network), device, compile=True)
        record(f"tumorseg + torch.compile ({fp16}{per_batch} windows)", ours(compiled))
        if compiled.failed:
            print("torch.compile failed: that row ran without it (see the warning above)")
    ok = state["ok"]

    for how, _, first in rows:
        if "compile" in how:
            print(f"{how}: first call (compilation) {first:.1f} s")
    ours_rows = [row for row in rows if row[0].startswith("tumorseg")]
    best = min(ours_rows, key=lambda row: row[1])
    for how, seconds, _ in rows:
        if not how.startswith("tumorseg"):
            print(f"speed-up of the fastest tumorseg row over {how}: {seconds / best[1]:.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        run = ours(compiled) if "compile" in best[0] else ours(
            prepare_network(copy.deepcopy(network), device))
        run()  # warm-up outside the profile
        with profile(activities=activities) as prof:
            run()
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"profile of {best[0]}:")
        print(prof.key_averages().table(sort_by=sort, row_limit=20))
    if not ok:
        print("outputs disagree: fewer than 99.9 % identical labels", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
