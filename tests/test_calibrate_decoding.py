"""benchmarks/calibrate_decoding.py: nested choice of region thresholds, and what it writes."""
from __future__ import annotations

import shutil

import numpy as np

from conftest import benchmark_module
from tumorseg.model import load_card

cal = benchmark_module("calibrate_decoding")


def under_called_case(model: str, radius: int, seed: int, voxel_ml: float = 0.001, rim_is_tumour: bool = True):
    """A lesion whose expert outline is 3 voxels wider than the argmax's (or, with ``rim_is_tumour``
    False, exactly the argmax's): the rim has P(edema) 0.4."""
    shape = (36, 36, 36)
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r = np.sqrt(sum((g - 18) ** 2 for g in grid)) + np.random.default_rng(seed).normal(0, 0.3, shape)
    probs = np.zeros((4,) + shape, np.float32)
    probs[0] = 1.0
    core, rim = r <= radius, (r > radius) & (r <= radius + 3)
    probs[:, core] = np.array([0.05, 0.15, 0.8, 0.0], np.float32)[:, None]
    probs[:, rim] = np.array([0.6, 0.4, 0.0, 0.0], np.float32)[:, None]
    truth = {"WT": core | rim if rim_is_tumour else core, "TC": core, "ET": np.zeros(shape, bool)}
    return cal.HeldOut(model, probs, truth, voxel_ml=voxel_ml)


def test_nested_choice_calibrates_only_what_held_out_cases_support(tiny_model, tmp_path):
    fold_of = {f"c{i}": i % 4 for i in range(8)}
    cases = {c: under_called_case(str(tiny_model), 8 + i % 3, i) for i, c in enumerate(fold_of)}
    choices = cal.choose_nested(cases, fold_of, set(fold_of), 4)
    # The rim (P 0.4) is the truth: every fold's cases choose the highest threshold that takes it in.
    assert [choices["folds"][str(k)]["thresholds"]["WT"] for k in range(4)] == [0.35] * 4
    # The lesions (2-4 mL) grow only with the smallest lesion size tried.
    assert choices["fold_gates"] == [cal.GATES[0]] * 4 and choices["gates_agree"]
    assert choices["nested"]["WT"]["nested_dice"] > choices["nested"]["WT"]["argmax_dice"]
    # TC and ET gain nothing over the argmax (the core is already right; no enhancing tumour).
    assert choices["calibrated"] == ["WT"] and choices["all"]["thresholds"]["WT"] == 0.35
    for case in cases.values():
        assert cal.region_dice(case, load_card(tiny_model).scheme, {"WT": 0.35})["WT"] > 0.99
    # Written into a card: the calibrated regions only, with where they were chosen.
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    cal.write_decoding(model, choices["all"], choices["calibrated"], sorted(fold_of), "calibrate ...")
    decoding = load_card(model).decoding
    assert dict(decoding.thresholds) == {"WT": 0.35} and decoding.calibration["chosen_on"] == sorted(fold_of)
    assert decoding.grow_from_ml == cal.GATES[0]
    cal.write_decoding(model, choices["all"], [], sorted(fold_of), "calibrate ...")
    assert load_card(model).decoding is None


def test_thresholds_that_disagree_across_folds_are_not_used(tiny_model):
    """Folds whose cases want different thresholds: the spread exceeds MAX_SPREAD, the argmax stays."""
    fold_of = {f"c{i}": i % 2 for i in range(4)}
    cases = {c: under_called_case(str(tiny_model), 8, i) for i, c in enumerate(fold_of)}
    for c, k in fold_of.items():  # fold 0's rims at P 0.4, fold 1's at P 0.15: each alone picks its own
        if k == 1:
            rim = cases[c].truth["WT"] & ~cases[c].truth["TC"]
            cases[c].probs[:, rim] = np.array([0.85, 0.15, 0.0, 0.0], np.float32)[:, None]
    choices = cal.choose_nested(cases, fold_of, set(fold_of), 2)
    spread = choices["nested"]["WT"]["thresholds"]
    assert max(spread) - min(spread) > cal.MAX_SPREAD
    assert choices["calibrated"] == []


def test_a_lesion_size_is_chosen_where_only_large_lesions_are_under_called(tiny_model):
    """Large lesions (72 mL) whose experts drew the likely rim, small ones (21 mL) whose experts did not:
    growing only lesions of at least 25 or 50 mL is right for both (ties go to the larger size)."""
    fold_of = {f"c{i}": i % 2 for i in range(8)}
    cases = {c: under_called_case(str(tiny_model), 12 if i % 4 < 2 else 8, i, voxel_ml=0.01, rim_is_tumour=i % 4 < 2)
             for i, c in enumerate(fold_of)}
    choices = cal.choose_nested(cases, fold_of, set(fold_of), 2)
    assert choices["fold_gates"] == [50.0, 50.0] and choices["all"]["grow_from_ml"] == 50.0
    assert choices["calibrated"] == ["WT"]
    for c, case in cases.items():
        assert choices["cases"][c]["calibrated"]["WT"] > 0.99, c


def test_a_large_lesions_small_core_is_calibrated(tiny_model):
    """A 72 mL lesion whose argmax core is a 7-voxel speck in a halo the experts call core (P(core)
    0.3): the core grows because the lesion is large, though its own argmax component is tiny."""
    shape = (36, 36, 36)
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r = np.sqrt(sum((g - 18) ** 2 for g in grid))
    probs = np.zeros((4,) + shape, np.float32)
    probs[0] = 1.0
    for inside, p in ((r <= 12, [0.1, 0.8, 0.1, 0.0]), (r <= 4, [0.1, 0.6, 0.3, 0.0]), (r <= 1, [0.0, 0.2, 0.8, 0.0])):
        probs[:, inside] = np.array(p, np.float32)[:, None]
    truth = {"WT": r <= 12, "TC": r <= 4, "ET": np.zeros(shape, bool)}
    fold_of = {f"c{i}": i % 2 for i in range(4)}
    cases = {c: cal.HeldOut(str(tiny_model), probs.copy(), truth, voxel_ml=0.01) for c in fold_of}
    choices = cal.choose_nested(cases, fold_of, set(fold_of), 2)
    assert choices["calibrated"] == ["TC"] and choices["all"]["grow_from_ml"] == 50.0
    assert all(v["argmax"]["TC"] < 0.1 and v["calibrated"]["TC"] > 0.99 for v in choices["cases"].values())
