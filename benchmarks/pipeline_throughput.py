"""End-to-end throughput of ``tumorseg batch``: cases per hour, read to write, and the share of
wall time the network (the GPU, where there is one) was busy.

    python benchmarks/pipeline_throughput.py --cases 20 --workers 4       # on a GPU server
    python benchmarks/pipeline_throughput.py --cases 4 --workers 0        # quick, on a CPU

The cases are copies of the bundled BraTS-sized example scan (4x240x240x155) under different
ids, so every case costs the same; ``--cases-root`` runs your own folder instead.

The default model (1.4 M parameters at 1.5 mm) leaves a GPU idle most of the time: the CPU work
of a case (reading, resampling, post-processing, writing) costs far more than its inference.
``--random-model 32,64,128,256,320,320`` runs an nnU-Net-sized DynUNet instead (random weights,
1 mm, 128^3 windows: the network of benchmarks/gpu_inference.py), to measure whether the workers
keep a GPU fed when the network is what a GPU server would run. One network pass per window
unless ``--tta`` (8-flip mirroring, the default pipeline's setting).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from tumorseg.batch.cases import discover
from tumorseg.batch.runner import BatchRunner
from tumorseg.batch.steps import quiet_stage_logs
from tumorseg.model import Architecture, InputSpec, ModelCard, Weights, build_network, save_model
from tumorseg.pipeline import Segmenter

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "BraTS-GLI-00001-000"


def random_model(directory: Path, filters: tuple[int, ...]) -> Path:
    """A DynUNet model folder with random weights, for timing only (its masks mean nothing)."""
    import torch

    card = ModelCard(
        name="random-weights", labels="msd", version="timing only",
        input=InputSpec(sequences=("flair", "t1", "t1gd", "t2"), spacing_mm=(1.0, 1.0, 1.0), patch_size=(128, 128, 128)),
        architecture=Architecture(filters=filters, strides=(1,) + (2,) * (len(filters) - 1)),
        weights=Weights("model.safetensors", "0" * 64),
    )
    torch.manual_seed(0)
    save_model(directory, card, build_network(card))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--cases-root", type=Path)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--model", default="default")
    parser.add_argument("--random-model", metavar="FILTERS", help="random-weights DynUNet of these filters instead")
    parser.add_argument("--windows-per-batch", type=int, help="default: the pipeline's")
    parser.add_argument("--tta", action="store_true",
                        help="8-flip mirroring test-time augmentation (without it one pass, as docs/performance.md measured)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="tumorseg-throughput-") as tmp:
        root = args.cases_root
        if root is None:
            root = Path(tmp) / "cases"
            for n in range(args.cases):
                shutil.copytree(EXAMPLE, root / f"case{n:03d}", ignore=shutil.ignore_patterns("*.md"))
        cases = discover(root)
        from tumorseg.config import load_pipeline

        config = load_pipeline("default").with_overrides(
            device=args.device, windows_per_batch=args.windows_per_batch, tta=args.tta,
            compile=args.compile or None)
        model = args.model
        if args.random_model:
            filters = tuple(int(v) for v in args.random_model.split(","))
            model = str(random_model(Path(tmp) / "random-model", filters))
        segmenter = Segmenter(model, config)
        start = time.perf_counter()
        with quiet_stage_logs():
            summary = BatchRunner(segmenter, Path(tmp) / "out", workers=args.workers, progress=True).run(cases)
        wall = time.perf_counter() - start
        ok = len(summary.outcomes) - len(summary.failed)
        print(f"model {segmenter.card.name} ({sum(p.numel() for p in segmenter.model.network.parameters()) / 1e6:.1f} M "
              f"parameters); {config.inference.windows_per_batch} windows per pass; tta {config.inference.tta}; "
              f"compile {config.inference.compile}")
        print(f"device {segmenter.device}; {ok} of {len(cases)} cases in {wall:.1f} s with --workers {args.workers}: "
              f"{3600 * ok / wall:.0f} cases/hour; network busy {summary.network_seconds:.1f} s = "
              f"{100 * summary.network_busy_fraction:.0f} % of wall time")


if __name__ == "__main__":
    main()
