"""Batch wall time with worker processes against without, same cases, same model, same run.

    python benchmarks/batch_workers.py                       # 10 cases, --workers 0 then 2
    python benchmarks/batch_workers.py --cases-root DIR --workers 0 1 2

By default the batch is 10 BraTS-sized cases: the bundled example scan, the four real
BraTS 2015 cases in ../shared/data (when present), and synthetic cases (``tumorseg synth``)
for the rest. Each setting writes into its own fresh output folder (nothing is reused) and the
label maps of every setting are checked to be byte-identical to the first's. Prints seconds and
the ratio to the first setting (the issue's target: ``--workers 2`` at most 0.7 of ``--workers 0``),
the cores kept busy on average (user + system CPU time over wall time, worker processes included),
and the best ratio overlap could give: when the serial batch's network share ``f`` already keeps
all ``c`` cores busy and the rest runs on one core, no schedule beats ``f + (1 - f) / c``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tumorseg.batch.cases import discover
from tumorseg.batch.runner import BatchRunner
from tumorseg.batch.steps import quiet_stage_logs
from tumorseg.config import load_pipeline
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


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases-root", type=Path, help="batch input (default: build 10 cases)")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--model", default="default")
    parser.add_argument("--worker-mode", default="auto", choices=["auto", "pipelined", "whole_cases"],
                        help="see BatchRunner: auto is whole cases on a CPU device, pipelined on a GPU")
    parser.add_argument("--tta", action="store_true",
                        help="8-flip mirroring, as the default pipeline runs (without it one pass, as docs/performance.md measured)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="tumorseg-bench-") as tmp:
        root = args.cases_root or default_cases(Path(tmp) / "cases", args.cases)
        cases = discover(root)
        segmenter = Segmenter(args.model, load_pipeline("default").with_overrides(tta=args.tta))
        print(f"{len(cases)} cases from {root}; model {segmenter.card.name}; torch threads {torch.get_num_threads()}; "
              f"device {segmenter.device}; worker mode {args.worker_mode}; tta {segmenter.config.inference.tta}")
        seconds: dict[int, float] = {}
        network_share: dict[int, float] = {}
        first_out: Path | None = None
        for workers in args.workers:
            out = Path(tmp) / f"out-{workers}"
            start, cpu_start = time.perf_counter(), cpu_seconds()
            with quiet_stage_logs():
                summary = BatchRunner(segmenter, out, workers=workers, progress=False,
                                      worker_mode=args.worker_mode).run(cases)
            seconds[workers] = time.perf_counter() - start
            network_share[workers] = summary.network_busy_fraction
            busy_cores = (cpu_seconds() - cpu_start) / seconds[workers]
            failed = len(summary.failed)
            print(f"--workers {workers}: {seconds[workers]:.1f} s for {len(cases)} cases "
                  f"({seconds[workers] / len(cases):.2f} s/case, {failed} failed); network busy "
                  f"{summary.network_seconds:.1f} s = {100 * summary.network_busy_fraction:.0f} % of wall time; {busy_cores:.2f} of {os.cpu_count()} cores busy "
                  f"on average", flush=True)
            if first_out is None:
                first_out = out
            else:
                for label_map in sorted(first_out.glob("cases/*/segmentation.nii.gz")):
                    other = out / label_map.relative_to(first_out)
                    assert other.read_bytes() == label_map.read_bytes(), f"{other} differs from {label_map}"
        base = args.workers[0]
        for workers in args.workers[1:]:
            print(f"ratio --workers {workers} / --workers {base}: {seconds[workers] / seconds[base]:.3f}")
        if base == 0 and segmenter.device.type == "cpu":
            f, cores = network_share[0], os.cpu_count() or 1
            print(f"best ratio any overlap could give on {cores} cores (network {100 * f:.0f} % of the serial batch, "
                  f"on all cores): {f + (1 - f) / cores:.3f}")
        if args.json:
            args.json.write_text(json.dumps({"cases": len(cases), "seconds": seconds,
                                             "network_share": network_share}, indent=2))


if __name__ == "__main__":
    main()
