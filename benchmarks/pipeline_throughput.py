"""End-to-end throughput of ``tumorseg batch``: cases per hour, read to write, and the share of
wall time the network (the GPU, where there is one) was busy.

    python benchmarks/pipeline_throughput.py --cases 20 --workers 4       # on a GPU server
    python benchmarks/pipeline_throughput.py --cases 4 --workers 0        # quick, on a CPU

The cases are copies of the bundled BraTS-sized example scan (4x240x240x155) under different
ids, so every case costs the same; ``--cases-root`` runs your own folder instead.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from tumorseg.batch.cases import discover
from tumorseg.batch.runner import BatchRunner, quiet_stage_logs
from tumorseg.pipeline import Segmenter

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "BraTS-GLI-00001-000"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--cases-root", type=Path)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--model", default="default")
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

        config = load_pipeline("default").with_overrides(device=args.device)
        segmenter = Segmenter(args.model, config)
        start = time.perf_counter()
        with quiet_stage_logs():
            summary = BatchRunner(segmenter, Path(tmp) / "out", workers=args.workers, progress=True).run(cases)
        wall = time.perf_counter() - start
        ok = len(summary.outcomes) - len(summary.failed)
        print(f"device {segmenter.device}; {ok} of {len(cases)} cases in {wall:.1f} s with --workers {args.workers}: "
              f"{3600 * ok / wall:.0f} cases/hour; network busy {summary.network_seconds:.1f} s = "
              f"{100 * summary.network_busy_fraction:.0f} % of wall time")


if __name__ == "__main__":
    main()
