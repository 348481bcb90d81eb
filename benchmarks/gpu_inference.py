"""tumorseg's inference stage against MONAI's sliding window: same network, weights, input,
overlap and Gaussian blending, in one run on one device.

    python benchmarks/gpu_inference.py --compile --profile   # GPU: nnU-Net-sized DynUNet on 4x240x240x155
    python benchmarks/gpu_inference.py --small                # CPU-sized check of the same comparison (CI)
    python benchmarks/gpu_inference.py --shape 512,512,400 --memory-budget-gb 24 --tumorseg-only  # fallback

The network has random weights (seeded); the input is the bundled BraTS example scan (4x240x240x155,
z-scored inside the brain), or random noise with ``--small`` or ``--shape``. Rows, in this order:
MONAI fp32 with one window per pass (its defaults, but Gaussian blending and our overlap), MONAI
fp16 autocast with all windows in one pass (its best eager setting on a GPU), tumorseg's inference
stage (``PreparedNetwork`` + ``robust_sliding_window`` from ``stages/infer.py``: fp16, cuDNN
autotuner) and the same with channels-last layout; on CUDA then MONAI fp16 again, now with the
cuDNN autotuner that tumorseg switched on (what the autotuner alone gives); with ``--compile``
tumorseg with ``torch.compile`` (``compile = true`` in a pipeline), in both layouts, with the
compilation time. For each: seconds per scan (median of ``--repeats`` after a warm-up), TFLOP/s
(forward FLOPs counted by ``torch.utils.flop_counter`` for one window times the number of
windows), peak device memory, argmax agreement with MONAI fp32 and with MONAI at the same
precision, and the largest logit difference from MONAI fp32. Exit code 1 when a tumorseg row
agrees on fewer than 99.9 % of voxels with MONAI at its own precision. ``--profile`` prints
torch.profiler's table for tumorseg's fastest row; ``--tumorseg-only`` leaves MONAI out.
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import DynUNet

from tumorseg.stages.infer import PreparedNetwork, plan_windows, robust_sliding_window

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "BraTS-GLI-00001-000"


def network_for(filters: tuple[int, ...], channels: int, classes: int) -> torch.nn.Module:
    strides = [1] + [2] * (len(filters) - 1)
    torch.manual_seed(0)
    return DynUNet(3, channels, classes, kernel_size=[3] * len(filters), strides=strides,
                   upsample_kernel_size=strides[1:], filters=list(filters)).eval()


def example_image() -> torch.Tensor:
    """The bundled example's four sequences (1, 4, 240, 240, 155) on their own grid, normalised
    by tumorseg's own normalise stage (percentile clipping, z-score inside the brain)."""
    from tumorseg.model import Normalization
    from tumorseg.sequences import assign_sequences
    from tumorseg.stages import normalize, read

    scan = read.read_study(assign_sequences([EXAMPLE], {}, lambda p: read.volume_count(p) > 1))
    normalised = normalize.normalize(scan, Normalization(), normalize.brain_mask(scan.array))
    return torch.from_numpy(normalised.array)[None]


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
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_budget_gb * 2**30 / total),
                                                   torch.cuda.current_device())

    network = network_for(filters, channels, 4).to(device)
    torch.manual_seed(1)
    if args.small or args.shape:
        image = torch.randn((1, channels) + shape, device=device)
    else:
        image = example_image().to(device)
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
    outputs = {}  # the first output of each precision, to compare the others with
    state = {"ok": True}
    print(f"{'how':46s} {'s/scan':>7s} {'TFLOP/s':>7s} {'peak GB':>7s} {'agree fp32':>10s} {'agree same':>10s} "
          f"{'|dlogit|':>9s}")

    def record(how: str, run, precision: str) -> None:
        """Time ``run`` and print its row at once (a step cut off by a timeout keeps its rows)."""
        seconds, output, peak, first = timed(run, args.repeats, device)
        outputs.setdefault(precision, output)
        reference = outputs.get("fp32", output)
        agree = float((output.argmax(1) == reference.argmax(1)).float().mean())
        same = float((output.argmax(1) == outputs[precision].argmax(1)).float().mean())
        if how.startswith("tumorseg"):
            state["ok"] &= same >= 0.999
        rows.append((how, seconds, first))
        print(f"{how:46s} {seconds:7.3f} {flops / seconds / 1e12:7.1f} {peak / 2**30:7.2f} {100 * agree:9.3f}% "
              f"{100 * same:9.3f}% {float((output - reference).abs().max()):9.2e}", flush=True)

    cuda = device.type == "cuda"
    precision = "fp16" if cuda else "fp32"  # the tumorseg rows' (a CPU's bf16 is cpu_predict.py's)
    if not args.tumorseg_only and not args.skip_monai_fp32:
        record("MONAI fp32, 1 window per pass", monai(False, 1), "fp32")
    if not args.tumorseg_only and cuda:
        record(f"MONAI fp16, {windows} windows per pass", monai(True, windows), "fp16")
    # Copies: a channels-last layout must not reach the other rows' weights.
    record(f"tumorseg ({precision}, {per_batch} windows per pass)",
           ours(PreparedNetwork(copy.deepcopy(network), device, precision=precision)), precision)
    if cuda:
        record("tumorseg, channels-last", ours(PreparedNetwork(copy.deepcopy(network), device, channels_last=True,
                                                                precision=precision)),
               precision)
    if not args.tumorseg_only and cuda:
        record(f"MONAI fp16, {windows} windows, cuDNN autotuner", monai(True, windows), "fp16")
    compiled = {}
    if args.compile:
        for layout in (False, True) if cuda else (False,):
            how = f"tumorseg + torch.compile{', channels-last' if layout else ''}"
            compiled[how] = PreparedNetwork(copy.deepcopy(network), device, compile=True, channels_last=layout,
                                             precision=precision)
            record(how, ours(compiled[how]), precision)
            if compiled[how].failed:
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
        layout = "channels-last" in best[0]
        run = ours(compiled[best[0]] if best[0] in compiled else
                   PreparedNetwork(copy.deepcopy(network), device, channels_last=layout, precision=precision))
        run()  # warm-up outside the profile
        with profile(activities=activities) as prof:
            run()
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"profile of {best[0]}:")
        print(prof.key_averages().table(sort_by=sort, row_limit=20))
    if not ok:
        print("outputs disagree: a tumorseg row has fewer than 99.9 % of labels identical to MONAI's at the "
              "same precision", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
