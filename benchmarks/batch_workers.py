"""Batch wall time with worker processes against without, same cases, same model, same run.

    python benchmarks/batch_workers.py                       # 10 cases, --workers 0 then 2
    python benchmarks/batch_workers.py --cases-root DIR --workers 0 1 2

By default the batch is 10 BraTS-sized cases: the bundled example scan, the four real
BraTS 2015 cases in ../shared/data (when present), and synthetic cases (``tumorseg synth``)
for the rest. Each setting writes into its own fresh output folder (nothing is reused) and the
label maps of every setting are checked to be byte-identical to the first's. Prints seconds and
the ratio to the first setting (the issue's target: ``--workers 2`` at most 0.7 of ``--workers 0``).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tumorseg.batch.cases import discover
from tumorseg.batch.runner import BatchRunner, quiet_stage_logs
from tumorseg.pipeline import Segmenter

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def default_cases(root: Path, count: int) -> Path:
    """A folder tree of ``count`` BraTS-sized cases (real ones first, synthetic for the rest)."""
    sources = [REPO / "examples" / "BraTS-GLI-00001-000"]
    if (SHARED / "brats2015-dev").is_dir():
        sources += sorted(p for p in (SHARED / "brats2015-dev").iterdir() if p.is_dir())
    for source in sources[:count]:
        shutil.copytree(source, root / source.name, ignore=shutil.ignore_patterns("*.md", "LICENSE*"))
    missing = count - min(count, len(sources))
    if missing:
        from tumorseg.synth import write_synth_dataset

        synth = write_synth_dataset(root.parent / "synth", missing, seed=3000)
        for image in sorted((synth / "imagesTr").glob("*.nii.gz")):
            (root / image.name[:-7]).mkdir()
            shutil.move(str(image), root / image.name[:-7] / image.name)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases-root", type=Path, help="batch input (default: build 10 cases)")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--model", default="default")
    parser.add_argument("--worker-mode", default="auto", choices=["auto", "pipelined", "whole_cases"],
                        help="see BatchRunner: auto is whole cases on a CPU device, pipelined on a GPU")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="tumorseg-bench-") as tmp:
        root = args.cases_root or default_cases(Path(tmp) / "cases", args.cases)
        cases = discover(root)
        segmenter = Segmenter(args.model)
        print(f"{len(cases)} cases from {root}; model {segmenter.card.name}; torch threads {torch.get_num_threads()}; "
              f"device {segmenter.device}; worker mode {args.worker_mode}")
        seconds: dict[int, float] = {}
        first_out: Path | None = None
        for workers in args.workers:
            out = Path(tmp) / f"out-{workers}"
            start = time.perf_counter()
            with quiet_stage_logs():
                summary = BatchRunner(segmenter, out, workers=workers, progress=False,
                                      worker_mode=args.worker_mode).run(cases)
            seconds[workers] = time.perf_counter() - start
            failed = len(summary.failed)
            print(f"--workers {workers}: {seconds[workers]:.1f} s for {len(cases)} cases "
                  f"({seconds[workers] / len(cases):.2f} s/case, {failed} failed); network busy "
                  f"{summary.network_seconds:.1f} s = {100 * summary.network_busy_fraction:.0f} % of wall time", flush=True)
            if first_out is None:
                first_out = out
            else:
                for label_map in sorted(first_out.glob("cases/*/segmentation.nii.gz")):
                    other = out / label_map.relative_to(first_out)
                    assert other.read_bytes() == label_map.read_bytes(), f"{other} differs from {label_map}"
        base = args.workers[0]
        for workers in args.workers[1:]:
            print(f"ratio --workers {workers} / --workers {base}: {seconds[workers] / seconds[base]:.3f}")
        if args.json:
            args.json.write_text(json.dumps({"cases": len(cases), "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
