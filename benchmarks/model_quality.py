"""Dice of a model on held-out cases: a Decathlon data set and/or BraTS-style case folders.

    python benchmarks/model_quality.py --model default --decathlon synth-eval/ \
        --cases ../shared/data/brats2015-dev --truth-scheme brats2015 --json quality.json

Runs the full ``predict`` pipeline (read to postprocess) on each case and scores WT, TC and ET
on the input grid; prints per-case rows and mean / worst per data set. Each row also splits the
whole-tumour error in mL: true and predicted volume, false positives within 10 mm of the true
tumour (an outline drawn too wide) and beyond it (a second, false lesion), and false negatives;
the summary gives the mean WT Dice of small (< 30 mL) and larger tumours.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from tumorseg.config import load_pipeline
from tumorseg.evaluate import check_same_grid, read_label_file, region_scores
from tumorseg.labels import REGIONS
from tumorseg.pipeline import Segmenter
from tumorseg.datasets import discover_cases

#: False positives farther than this from the true tumour count as a separate false lesion.
NEAR_MM = 10.0
#: Whole tumours smaller than this are summarised apart: their Dice is the most sensitive to the outline.
SMALL_ML = 30.0


def wt_errors(pred: np.ndarray, truth: np.ndarray, spacing: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """Whole-tumour volumes and errors in mL for two boolean masks on one grid."""
    false_pos = pred & ~truth
    if truth.any():
        far = false_pos & (ndi.distance_transform_edt(~truth, sampling=spacing) > NEAR_MM)
    else:
        far = false_pos
    return {"true_ml": truth.sum() * voxel_ml, "pred_ml": pred.sum() * voxel_ml,
            "fp_near_ml": (false_pos & ~far).sum() * voxel_ml, "fp_far_ml": far.sum() * voxel_ml,
            "fn_ml": (truth & ~pred).sum() * voxel_ml}


def score(segmenter: Segmenter, root: Path, truth_scheme: str | None, only: set[str] | None = None) -> dict:
    """Per-case WT/TC/ET Dice and mean/worst; ``only``: these case ids alone."""
    rows = {}
    for case in discover_cases(root, truth_scheme):
        if only is not None and case.case_id not in only:
            continue
        start = time.perf_counter()
        result = segmenter.segment_inputs(case.inputs)
        truth = read_label_file(case.label_path)
        check_same_grid(result.labels.source.shape, result.labels.affine, truth, case.label_path)
        scores = region_scores(result.labels.array, segmenter.card.scheme, truth.labels, case.scheme)
        errors = wt_errors(segmenter.card.scheme.region_mask(result.labels.array, "WT"),
                           case.scheme.region_mask(truth.labels, "WT"),
                           result.labels.spacing, result.labels.voxel_volume_ml)
        rows[case.case_id] = {**scores, "wt_errors": errors, "seconds": round(time.perf_counter() - start, 1),
                              "sequences": list(case.inputs.sequences)}
        print(f"{case.case_id:28s} " + " ".join(f"{r} {scores[r]:.3f}" for r in REGIONS)
              + "  WT mL: true {true_ml:.1f} pred {pred_ml:.1f} FP near {fp_near_ml:.1f} far {fp_far_ml:.1f}"
                " FN {fn_ml:.1f}".format(**errors)
              + f"  ({rows[case.case_id]['seconds']} s)", flush=True)
    summary = {r: {"mean": float(np.mean([v[r] for v in rows.values()])),
                   "worst": float(np.min([v[r] for v in rows.values()]))} for r in REGIONS}
    print(f"{root.name}: " + "; ".join(f"{r} mean {s['mean']:.3f} worst {s['worst']:.3f}" for r, s in summary.items()))
    sizes = {case_id: row["wt_errors"]["true_ml"] for case_id, row in rows.items()}
    for name, sign, dices in (("small", "<", [rows[c]["WT"] for c, ml in sizes.items() if ml < SMALL_ML]),
                              ("larger", ">=", [rows[c]["WT"] for c, ml in sizes.items() if ml >= SMALL_ML])):
        summary[f"WT_{name}"] = {"cases": len(dices), "mean": float(np.mean(dices)) if dices else None}
        if dices:
            print(f"  WT of {name} tumours ({sign} {SMALL_ML:g} mL): {len(dices)} cases, mean {np.mean(dices):.3f}")
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
