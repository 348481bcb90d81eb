"""Calibrate a cross-validated recipe's decoding: region thresholds chosen by nested cross-validation.

    python benchmarks/calibrate_decoding.py \\
        --dataset ../shared/data/brats2018-train:brats2021 --dataset ../shared/data/brats2015-dev:brats2015 \\
        -o cv/ [--write] [--final MODEL_DIR ...]

A model that draws tumour too small (its argmax misses more than it over-marks, case after case) is
decoded better by growing each region past the argmax where its probability is still high
(``tumorseg.model.Decoding``). The thresholds are chosen on held-out cases only: each fold model of
``cross_validation.py``'s run in ``-o`` predicts its held-out cases (as predict runs, mirroring; the
class probabilities on the input grid are kept in ``OUT/probabilities/``), then, for each lesion size
of ``GATES`` (``Decoding.grow_from_ml``) and region by region (WT, then TC inside it, then ET), the
threshold of ``GRID`` with the best mean Dice over the four-sequence cases of the other folds; fold
k takes the size and thresholds of the best mean over regions and scores its own cases with them
(nested: no case chooses its own decoding). A region is calibrated only if that nested score beats
the argmax's mean Dice and the five folds' thresholds lie within ``MAX_SPREAD`` of each other, and
nothing is if the folds' sizes and the one chosen on every case are not equal or neighbours in
``GATES`` (else the choice is noise).
The shipped decoding is the one chosen on every fold's cases.

``--write`` puts each fold's nested ``[decoding]`` into ``OUT/fold<k>/model.toml`` (so that
``cross_validation.py --no-train`` then scores the calibrated folds as predict runs) and the shipped
one into each ``--final`` card. Weights are not touched.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from tumorseg.atomic import atomic_path
from tumorseg.config import load_pipeline
from tumorseg.evaluate import read_label_file
from tumorseg.labels import REGIONS
from tumorseg.metrics import dice
from tumorseg.model import Decoding, load_card, load_model, write_card
from tumorseg.pipeline import Segmenter
from tumorseg.stages import geometry
from tumorseg.stages.decode import decode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cross_validation as cv  # noqa: E402

#: Thresholds tried for each region's summed probability.
GRID = tuple(float(round(t, 2)) for t in np.arange(0.05, 0.601, 0.05))
#: A region whose nested thresholds spread wider than this across the folds stays the argmax's.
MAX_SPREAD = 0.10
#: Lesion sizes (mL) tried for ``Decoding.grow_from_ml``: smaller lesions stay as the argmax draws them.
GATES = (1.0, 10.0, 25.0, 50.0, 100.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=cv.parse_dataset, action="append", required=True, metavar="PATH:SCHEME")
    parser.add_argument("-o", "--output", type=Path, required=True, help="cross_validation.py's output folder")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="write [decoding] into the fold cards and --final cards")
    parser.add_argument("--final", type=Path, action="append", default=[], metavar="MODEL_DIR",
                        help="a model of the same recipe trained on every case: gets the thresholds chosen on all folds")
    parser.add_argument("--json", type=Path, help="write the per-case scores and the choices here")
    args = parser.parse_args()
    plan = cv.fold_plan(args.dataset, args.folds, args.seed, args.output)
    by_id = {c.case_id: c for c in cv.discover(args.dataset)}
    fold_of = {c: k for k, f in enumerate(plan["folds"]) for c in f}
    cases = {}
    for k, held_out in enumerate(plan["folds"]):
        folder = args.output / f"fold{k}"
        if not (folder / "model.toml").exists():
            raise SystemExit(f"fold {k} is not trained ({folder}): every fold is needed for nested choices")
        for case_id in held_out:
            cases[case_id] = held_out_case(folder, by_id[case_id], args.output / "probabilities")
    four = set(plan["four_sequence_cases"])
    choices = choose_nested(cases, fold_of, four, args.folds)
    print_choices(choices, four)
    if args.json:
        args.json.write_text(json.dumps(choices, indent=1))
    if args.write:
        command = "python benchmarks/calibrate_decoding.py " + shlex.join(sys.argv[1:])
        for k in range(args.folds):
            chosen_on = sorted(c for c in four if fold_of[c] != k)
            write_decoding(args.output / f"fold{k}", choices["folds"][str(k)], choices["calibrated"], chosen_on, command)
        for final in args.final:
            write_decoding(final, choices["all"], choices["calibrated"], sorted(four), command,
                           nested={r: choices["nested"][r] for r in choices["calibrated"]},
                           fold_gates=choices["fold_gates"])
            shipped = decoding_of(choices["all"], choices["calibrated"])
            print(f"{final}: " + (f"[decoding] {shipped}, grow_from_ml {choices['all']['grow_from_ml']}" if shipped
                                  else "no [decoding] (the argmax)"))


@dataclasses.dataclass
class HeldOut:
    """One held-out case as its fold model saw it, cropped to where any threshold of GRID could mark tumour."""

    fold_model: str
    probs: np.ndarray  # (C, ...) float32
    truth: dict[str, np.ndarray]  # region -> mask
    voxel_ml: float


def held_out_case(fold_dir: Path, case, cache_dir: Path) -> HeldOut:
    """The fold model's class probabilities for ``case`` on its input grid, as predict computes them
    (cached per case and fold weights), and the expert regions."""
    card = load_card(fold_dir)
    truth = read_label_file(case.label_path).labels
    path = cache_dir / f"{case.case_id}.npz"
    kept = np.load(path) if path.exists() else None
    if kept is not None and str(kept["weights_sha256"]) == card.weights.sha256:
        probs, box = kept["probs"], tuple(slice(a, b) for a, b in kept["box"])
        voxel_ml = float(kept["voxel_ml"])
    else:
        segmenter = Segmenter(load_model(str(fold_dir)), load_pipeline("default"))
        prepared = segmenter.spec.read_and_prepare(case.inputs)
        output, _ = segmenter.infer(prepared)
        full = geometry.probabilities_to_input_grid(output, prepared.transform)
        if prepared.brain_mask is not None:  # as the pipeline does: nothing outside the extracted brain
            full[:, ~prepared.brain_mask] = 0.0
            full[0, ~prepared.brain_mask] = 1.0
        reach = (full[0] < 1.0 - min(GRID)) | (truth > 0)
        box = tuple(slice(max(0, int(i.min()) - 2), int(i.max()) + 3) for i in np.nonzero(reach))
        probs, voxel_ml = full[(slice(None),) + box].astype(np.float16), prepared.transform.input_voxel_ml
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, probs=probs, box=np.array([[s.start, s.stop] for s in box]), voxel_ml=voxel_ml,
                                weights_sha256=card.weights.sha256)
        print(f"  {case.case_id}: probabilities from {fold_dir.name}", flush=True)
    return HeldOut(str(fold_dir), probs.astype(np.float32),
                   {r: case.scheme.region_mask(truth[box], r) for r in REGIONS}, voxel_ml)


def region_dice(case: HeldOut, scheme, thresholds: dict[str, float], gate: float = GATES[0]) -> dict[str, float]:
    labels = decode(case.probs, scheme, Decoding(thresholds, gate) if thresholds else None, case.voxel_ml)
    return {r: dice(scheme.region_mask(labels, r), case.truth[r]) for r in REGIONS}


class Scorer:
    """Region Dice of held-out cases under a decoding, each decoding of a case computed once."""

    def __init__(self, cases: dict[str, HeldOut]):
        self.cases = cases
        self.scheme = load_card(Path(next(iter(cases.values())).fold_model)).scheme
        self._memo: dict[tuple, dict[str, float]] = {}

    def __call__(self, case_id: str, gate: float = GATES[0], thresholds: dict[str, float] | None = None
                 ) -> dict[str, float]:
        key = (case_id, gate, tuple(sorted((thresholds or {}).items())))
        if key not in self._memo:
            self._memo[key] = region_dice(self.cases[case_id], self.scheme, thresholds or {}, gate)
        return self._memo[key]


def choose(score: Scorer, ids: list[str]) -> dict:
    """For each lesion size of GATES, region by region (outermost first) the threshold of GRID with the
    best mean Dice over ``ids``; then the size whose thresholds give the best mean over regions (ties:
    the larger size, which changes fewer lesions)."""
    candidates = []
    for gate in GATES:
        chosen: dict[str, float] = {}
        for region in REGIONS:
            means = {t: np.mean([score(i, gate, {**chosen, region: t})[region] for i in ids]) for t in GRID}
            chosen[region] = max(GRID, key=lambda t: (means[t], -abs(t - 0.5)))
        overall = np.mean([score(i, gate, chosen)[r] for i in ids for r in REGIONS])
        candidates.append((round(float(overall), 6), gate, chosen))
    _, gate, chosen = max(candidates, key=lambda c: (c[0], c[1]))
    return {"grow_from_ml": gate, "thresholds": chosen}


def choose_nested(cases: dict[str, HeldOut], fold_of: dict[str, int], four: set[str], k: int) -> dict:
    score = Scorer(cases)
    folds = {}
    for fold in range(k):
        folds[str(fold)] = choose(score, sorted(c for c in four if fold_of[c] != fold))
        print(f"fold {fold}: chosen on the other folds' four-sequence cases: {folds[str(fold)]}", flush=True)
    gates = [folds[str(f)]["grow_from_ml"] for f in range(k)]
    everyone = choose(score, sorted(four))
    steps = [GATES.index(g) for g in gates + [everyone["grow_from_ml"]]]
    gates_agree = max(steps) - min(steps) <= 1  # the size that ships among the folds' too

    def nested_decoding(case_id: str, regions: list[str]) -> tuple[float, dict[str, float]]:
        chosen = folds[str(fold_of[case_id])]
        return chosen["grow_from_ml"], {r: chosen["thresholds"][r] for r in regions}

    scores = {"argmax": {c: score(c) for c in cases}}
    calibrated, nested = [], {}
    for region in REGIONS:
        values = [folds[str(f)]["thresholds"][region] for f in range(k)]
        # Each region judged with the regions before it decoded as they will ship.
        keep = {c: score(c, *nested_decoding(c, calibrated + [region]))[region] for c in four}
        argmax = float(np.mean([scores["argmax"][c][region] for c in four]))
        nested[region] = {"thresholds": values, "nested_dice": round(float(np.mean(list(keep.values()))), 4),
                          "argmax_dice": round(argmax, 4)}
        if gates_agree and max(values) - min(values) <= MAX_SPREAD + 1e-9 and nested[region]["nested_dice"] > argmax:
            calibrated.append(region)
    scores["calibrated"] = {c: score(c, *nested_decoding(c, calibrated)) for c in cases}
    return {"grid": list(GRID), "gates": list(GATES), "max_spread": MAX_SPREAD, "folds": folds,
            "fold_gates": gates, "gates_agree": gates_agree, "nested": nested, "calibrated": calibrated,
            "all": everyone,
            "cases": {c: {name: {r: round(v[c][r], 4) for r in REGIONS} for name, v in scores.items()} for c in cases}}


def decoding_of(chosen: dict, calibrated: list[str]) -> dict[str, float]:
    return {r: chosen["thresholds"][r] for r in calibrated}


def write_decoding(model_dir: Path, chosen: dict, calibrated: list[str], chosen_on: list[str],
                   command: str, nested: dict | None = None, fold_gates: list[float] | None = None) -> None:
    card = load_card(model_dir)
    if not calibrated:
        write_card(model_dir, dataclasses.replace(card, decoding=None))
        return
    calibration = {"command": command, "chosen_on": chosen_on, "grid": list(GRID), "gates": list(GATES),
                   "note": "lesion size and thresholds of the best mean Dice over these held-out four-sequence "
                           "cases, region by region (WT, then TC inside it, then ET), each predicted by the fold "
                           "model that did not train on it; regions not listed stay the argmax's (their nested "
                           f"choices spread more than {MAX_SPREAD} across the folds, or did not beat the argmax)"}
    if nested:
        calibration["nested"] = nested
    if fold_gates:
        calibration["fold_gates"] = fold_gates
    decoding = Decoding(decoding_of(chosen, calibrated), chosen["grow_from_ml"], calibration)
    write_card(model_dir, dataclasses.replace(card, decoding=decoding))


def print_choices(choices: dict, four: set[str]) -> None:
    print(f"lesion sizes chosen by the folds (mL): {choices['fold_gates']}"
          f"{'' if choices['gates_agree'] else ': they disagree, so nothing is calibrated'}")
    for region, n in choices["nested"].items():
        state = "calibrated" if region in choices["calibrated"] else "argmax kept"
        print(f"{region}: nested thresholds {n['thresholds']}, four-sequence mean Dice {n['argmax_dice']:.3f} "
              f"(argmax) -> {n['nested_dice']:.3f} (nested): {state}")
    shipped = decoding_of(choices["all"], choices["calibrated"])
    gate = choices["all"]["grow_from_ml"]
    print(f"chosen on all {len(four)} four-sequence cases: {choices['all']}; shipped: "
          + (f"{shipped} in lesions of >= {gate} mL" if shipped else "the argmax"))


if __name__ == "__main__":
    main()
