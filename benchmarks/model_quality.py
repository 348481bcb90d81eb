"""Dice of a model on held-out cases: a Decathlon data set and/or BraTS-style case folders.

    python benchmarks/model_quality.py --model default --decathlon synth-eval/ \
        --cases ../shared/data/brats2015-dev --truth-scheme brats2015 --json quality.json

Runs the full ``predict`` pipeline (read to postprocess) on each case and scores WT, TC and ET
on the input grid; prints per-case rows and mean / worst per data set.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from tumorseg.config import load_pipeline
from tumorseg.evaluate import REGIONS, check_same_grid, read_truth, region_scores
from tumorseg.labels import get_scheme
from tumorseg.pipeline import Segmenter
from tumorseg.train import discover_cases


def score(segmenter: Segmenter, root: Path, truth_scheme: str | None, only: set[str] | None = None) -> dict:
    """Per-case WT/TC/ET Dice and mean/worst; ``only``: these case ids alone."""
    rows = {}
    for case in discover_cases(root, truth_scheme):
        if only is not None and case.case_id not in only:
            continue
        start = time.perf_counter()
        result = segmenter.segment_files(case.inputs)
        truth = read_truth(case.label_path)
        check_same_grid(result.labels.source.shape, result.labels.affine, truth, case.label_path)
        scores = region_scores(result.labels.array, segmenter.card.scheme, truth.labels, case.scheme)
        rows[case.case_id] = {**scores, "seconds": round(time.perf_counter() - start, 1),
                              "sequences": list(case.inputs.sequences)}
        print(f"{case.case_id:28s} " + " ".join(f"{r} {scores[r]:.3f}" for r in REGIONS)
              + f"  ({rows[case.case_id]['seconds']} s)", flush=True)
    summary = {r: {"mean": float(np.mean([v[r] for v in rows.values()])),
                   "worst": float(np.min([v[r] for v in rows.values()]))} for r in REGIONS}
    print(f"{root.name}: " + "; ".join(f"{r} mean {s['mean']:.3f} worst {s['worst']:.3f}" for r, s in summary.items()))
    return {"cases": rows, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--decathlon", type=Path, action="append", default=[], help="Decathlon-layout data set")
    parser.add_argument("--cases", type=Path, action="append", default=[], help="folder of BraTS-named case folders")
    parser.add_argument("--truth-scheme", default="brats2015", help="label scheme of --cases ground truth")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="mirroring test-time augmentation on or off  [default: the pipeline's, on]")
    parser.add_argument("--all-sequences", action="store_true",
                        help="every sequence to the model, even where its card prefers a subset")
    parser.add_argument("--json", type=Path, help="write all numbers here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    segmenter = Segmenter(args.model, load_pipeline("default").with_overrides(
        tta=args.tta, all_sequences=args.all_sequences or None))
    print(f"model {segmenter.card.name} {segmenter.card.version} sha256 {segmenter.model.sha256[:16]}..."
          f"{' with TTA' if segmenter.config.inference.tta else ' without TTA'}{' with all sequences' if args.all_sequences else ''}")
    out = {"model": segmenter.card.name, "weights_sha256": segmenter.model.sha256, "datasets": {}}
    for root in args.decathlon:
        out["datasets"][root.name] = score(segmenter, root, None)
    for root in args.cases:
        out["datasets"][root.name] = score(segmenter, root, args.truth_scheme)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
