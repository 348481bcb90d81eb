"""benchmarks/cross_validation.py: patients stay in one fold, folds are recorded, the preferred-set
rule follows the table, and a shrunken run trains, resumes nothing twice and scores every subset."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import benchmark_module, brain_phantom, make_tiny_model, save_nifti, shared_data
from tumorseg.model import Decoding, load_card, load_model, sha256_file, write_card
from tumorseg.datasets import discover_cases

cv = benchmark_module("cross_validation")

AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def make_cases(root: Path, prefix: str, centres: list[int], sequences=("flair", "t1", "t1ce", "t2"),
               label_values=(1, 2, 4)) -> Path:
    """BraTS-2018-named case folders, one per tumour centre; the same centre gives the same labels."""
    shape = (36, 40, 32)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    for n, centre in enumerate(centres):
        case = f"{prefix}_{n}"
        folder = root / case
        folder.mkdir(parents=True)
        r = np.linalg.norm(grid - np.array([centre, 20, 14]), axis=-1)
        core, edema, rim = label_values
        labels = np.select([r < 3, r < 5, r < 8], [core, rim, edema], 0).astype(np.uint8)
        for i, seq in enumerate(sequences):
            image = brain_phantom(shape, seed=n + 10 * i)
            image[labels > 0] *= 1.5 + i
            save_nifti(folder / f"{case}_{seq}.nii.gz", image, AFFINE)
        save_nifti(folder / f"{case}_seg.nii.gz", labels, AFFINE)
    return root


def test_same_patient_in_two_data_sets_is_found_and_kept_in_one_fold(tmp_path):
    a = make_cases(tmp_path / "a", "A", [10, 12, 14, 16, 18, 20])
    b = make_cases(tmp_path / "b", "B", [14, 25], sequences=("flair", "t1ce"), label_values=(1, 2, 4))
    cases = [c for root in (a, b) for c in discover_cases(root, "brats2021")]
    groups = cv.same_patient_groups(cases)
    assert ["A_2", "B_0"] in groups and sum(len(g) for g in groups) == 8 and len(groups) == 7
    four = {c.case_id for c in cases if c.case_id.startswith("A")}
    for seed in range(6):
        folds = cv.make_folds(groups, four, 3, seed)
        assert sorted(c for f in folds for c in f) == sorted(c.case_id for c in cases)
        assert any({"A_2", "B_0"} <= set(f) for f in folds)  # one patient, one fold
        assert sorted(sum(c in four for c in f) for f in folds) == [2, 2, 2]  # four-sequence cases dealt evenly
    assert cv.make_folds(groups, four, 3, 0) == cv.make_folds(groups, four, 3, 0)
    assert any(cv.make_folds(groups, four, 3, 0) != cv.make_folds(groups, four, 3, s) for s in range(1, 6))
    with pytest.raises(SystemExit, match="cannot fill"):
        cv.make_folds(groups, four, 8, 0)


def test_real_duplicate_patient_is_grouped():
    brats2018, brats2015 = shared_data("brats2018-train"), shared_data("brats2015-dev")
    cases = discover_cases(brats2018, "brats2021") + discover_cases(brats2015, "brats2015")
    groups = cv.same_patient_groups(cases)
    # The data's README: Brats18_2013_20_1 is brats_2013_pat0006_1; no other case is shared.
    assert [g for g in groups if len(g) > 1] == [["Brats18_2013_20_1", "brats_2013_pat0006_1"]]


def test_recorded_folds_must_match_a_rerun(tmp_path):
    a = make_cases(tmp_path / "a", "A", [10, 12, 14, 16])
    plan = cv.fold_plan([(a, "brats2021")], 2, 0, tmp_path / "cv")
    assert json.loads((tmp_path / "cv" / "folds.json").read_text()) == plan
    assert cv.fold_plan([(a, "brats2021")], 2, 0, tmp_path / "cv") == plan
    with pytest.raises(SystemExit, match="records other folds"):
        cv.fold_plan([(a, "brats2021")], 2, 1, tmp_path / "cv")
    make_cases(tmp_path / "a2", "X", [12])
    (tmp_path / "a2" / "X_0").rename(a / "X_0")  # a case added to the data set
    with pytest.raises(SystemExit, match="records other folds"):
        cv.fold_plan([(a, "brats2021")], 2, 0, tmp_path / "cv")


def test_preferred_sets_follow_the_table():
    everything = cv.subsets(("flair", "t1", "t1gd", "t2"))
    assert len(everything) == 15

    def table(means: dict) -> dict:
        return {s: {r: d for r in cv.REGIONS} for s, d in means.items()}

    # More sequences never hurt: give the network whatever the case has.
    monotone = {s: 0.5 + 0.1 * len(s) for s in everything}
    assert cv.preferred_sets(table(monotone)) == []
    # FLAIR + T1gd clearly beats every set that holds it: it alone is listed, and choose() then
    # gives it wherever it is available, and every other set as it comes.
    better = dict(monotone)
    better[("flair", "t1gd")] = 0.95
    assert cv.preferred_sets(table(better)) == [("flair", "t1gd")]
    # A near tie with all four (within the margin per sequence dropped) keeps all four; but FLAIR +
    # T1gd still beats the three-sequence sets that hold it, so it is listed after all four.
    tie = dict(monotone)
    tie[("flair", "t1gd")] = monotone[("flair", "t1", "t1gd", "t2")] + 0.005
    assert cv.preferred_sets(table(tie)) == [("flair", "t1", "t1gd", "t2"), ("flair", "t1gd")]


def test_preferred_sets_ignore_enhancing_tumour_without_contrast():
    """T2 alone beats FLAIR + T2 on ET only (as in folds 0-2): a case without T1gd keeps FLAIR (or
    T1), since no set without contrast shows enhancing tumour; a case with T1gd is judged on all
    three regions, and there the same ET gain counts."""
    everything = cv.subsets(("flair", "t1", "t1gd", "t2"))
    dice = {s: {r: 0.5 + 0.1 * len(s) for r in cv.REGIONS} for s in everything}
    dice[("t2",)] = {"WT": 0.66, "TC": 0.66, "ET": 1.0}  # FLAIR + T2 and T1gd + T2: 0.7 each
    listed = cv.preferred_sets(dice)

    def choose(have: tuple[str, ...]) -> tuple[str, ...]:
        return next((s for s in listed if set(s) <= set(have)), have)

    assert choose(("flair", "t2")) == ("flair", "t2") and choose(("t1", "t2")) == ("t1", "t2")
    assert choose(("t1gd", "t2")) == ("t2",)
    assert choose(("flair", "t1", "t1gd", "t2")) == ("flair", "t1", "t1gd", "t2")


def fold_record(plan: dict, fold: int, dice: float, subset_dice: dict[str, float]) -> dict:
    """A card record of one fold whose cases all score ``dice`` as predict runs."""
    scores = {c: {"sequences": ["flair", "t1", "t1gd", "t2"],
                  "predict": {r: {"dice": dice, "hd95_mm": 10.0 * (fold + 1)} for r in cv.REGIONS}}
              for c in plan["folds"][fold]}
    table = {"subsets": {k: {r: {"dice_mean": d, "hd95_mean_mm": 10.0 * (fold + 1)} for r in cv.REGIONS}
                         | {"cases": len(scores)} for k, d in subset_dice.items()}}
    return cv.card_metric(plan, scores, table, set(), {fold: f"{fold}" * 64}, f"cv --fold {fold}")


def test_folds_from_two_runs_pool_into_one_card_record(tmp_path):
    """Folds trained in separate runs make one table in the card: cases side by side, subset means
    weighted by case counts, the preferred-set rule over the pooled table, the weights untouched; a
    fold given twice, or folds dealt otherwise, are refused."""
    plan = {"seed": 0, "folds": [["a", "b", "c"], ["d"], ["e", "f"]]}
    keys = [cv.key(s) for s in cv.subsets(("flair", "t1", "t1gd", "t2"))]
    monotone = {k: 0.5 + 0.1 * k.count("+") for k in keys}
    # Alone, fold 2 would make FLAIR + T1gd the preferred set; pooled with fold 0's three cases it
    # falls below all four sequences, so the pooled rule lists nothing.
    fold2 = dict(monotone) | {"flair+t1gd": 0.85}
    model = make_tiny_model(tmp_path / "model")
    weights = sha256_file(model / "weights.safetensors")
    cv.record_in_card(model, fold_record(plan, 2, 0.6, fold2), plan)
    assert load_card(model).input.preferred_sets == (("flair", "t1gd"),)
    pooled = cv.record_in_card(model, fold_record(plan, 0, 0.9, monotone), plan)
    card = load_card(model)
    assert card.input.preferred_sets == () and pooled["preferred_sets_rule"] == []
    assert card.metrics["cross_validation_folds"] == pooled
    assert pooled["folds"] == [0, 2] and pooled["commands"] == ["cv --fold 2", "cv --fold 0"]
    assert pooled["fold_model_sha256"] == {"0": "0" * 64, "2": "2" * 64}
    assert pooled["subsets"]["flair+t1gd"] == ({r: round((3 * 0.6 + 2 * 0.85) / 5, 4) for r in cv.REGIONS}
                                               | {"hd95_mm": [round((3 * 10 + 2 * 30) / 5, 2)] * 3, "cases": 5})
    mean = pooled["four_sequence_mean"]
    assert mean["cases"] == 5 and mean["WT"] == round((3 * 0.9 + 2 * 0.6) / 5, 4) and mean["worst"] == [0.6] * 3
    assert mean["hd95_mm"] == [round((3 * 10 + 2 * 30) / 5, 2)] * 3
    assert {c: v["fold"] for c, v in pooled["cases"].items()} == {"a": 0, "b": 0, "c": 0, "e": 2, "f": 2}
    assert sha256_file(model / "weights.safetensors") == weights and load_model(str(model)).sha256 == weights
    with pytest.raises(SystemExit, match="recorded already"):
        cv.record_in_card(model, fold_record(plan, 2, 0.6, fold2), plan)
    redealt = {"seed": 0, "folds": [["a", "b"], ["c", "d"], ["e", "f"]]}
    with pytest.raises(SystemExit, match="dealt otherwise"):
        cv.record_in_card(model, fold_record(redealt, 1, 0.6, fold2), redealt)
    with pytest.raises(SystemExit, match="no subset table"):
        cv.record_in_card(model, fold_record(plan, 1, 0.6, {}), plan)
    assert load_card(model).metrics["cross_validation_folds"] == pooled  # nothing written on refusal


def test_recipe_takes_the_starting_model_and_the_synthetic_share():
    recipe = ["--init", "default", "--lr", "5e-4"]
    assert cv.adapt_recipe(recipe, "default", None, 2) == recipe
    assert cv.adapt_recipe(recipe, "/m/v22", 0.25, 2) == ["--init", "/m/v22", "--lr", "5e-4",
                                                          "--dataset-weights", "0.375,0.375,0.25"]
    assert cv.adapt_recipe(["--lr", "1e-3"], "default", 0.5, 1) == ["--lr", "1e-3", "--dataset-weights", "0.5,0.5"]
    assert cv.adapt_recipe(recipe, "default", None, 2, "bf16") == recipe + ["--precision", "bf16"]


@pytest.mark.slow
def test_shrunken_cross_validation_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """Two folds of a tiny recipe: trained, scored as predict runs and per subset, table and JSON
    written; a rerun reuses the models and the scores."""
    a = make_cases(tmp_path / "a", "A", [10, 13, 16, 19])
    b = make_cases(tmp_path / "b", "B", [12, 22], sequences=("flair", "t1ce"), label_values=(1, 2, 4))
    monkeypatch.setattr(cv, "RECIPE", ["--patch-size", "16,16,16", "--spacing", "2,2,2", "--filters", "4,8,16",
                                       "--batch-size", "1", "--validation-fraction", "0", "--motion", "0.5",
                                       "--bias-field", "0.3", "--seed", "0"])
    argv = ["cross_validation.py", "--dataset", f"{a}:brats2021", "--dataset", f"{b}:brats2021", "-o",
            str(tmp_path / "cv"), "--folds", "2", "--epochs", "1", "--iterations", "2", "--no-tta", "--json",
            str(tmp_path / "cv.json")]
    monkeypatch.setattr(sys, "argv", argv)
    cv.main()
    out = json.loads((tmp_path / "cv.json").read_text())
    folds = out["plan"]["folds"]
    assert sorted(out["cases"]) == sorted(c for f in folds for c in f) and len(out["cases"]) == 6
    for k, held_out in enumerate(folds):
        card = load_model(str(tmp_path / "cv" / f"fold{k}")).card.training
        assert sorted(card["excluded_cases"]) == sorted(held_out)  # each fold left exactly its cases out
        assert not set(card["training_cases"]) & set(held_out)
    four = out["cases"]["A_0"]
    assert len(four["subsets"]) == 15 and four["predict_used"] == ["flair", "t1", "t1gd", "t2"]
    assert len(out["cases"]["B_0"]["subsets"]) == 3
    assert set(out["table"]["subsets"]) == {cv.key(s) for s in cv.subsets(("flair", "t1", "t1gd", "t2"))}
    assert out["table"]["subsets"]["flair+t1+t1gd+t2"]["cases"] == 4
    assert "preferred_sets" in out["table"]
    printed = capsys.readouterr().out
    assert "| FLAIR + T1gd |" in printed and "as predict runs, all_cases (6)" in printed
    # A rerun trains nothing and scores nothing again.
    scores = (tmp_path / "cv" / "fold0" / "scores.json").stat().st_mtime_ns
    cv.main()
    printed = capsys.readouterr().out
    assert printed.count("trained already, reused") == 2
    assert (tmp_path / "cv" / "fold0" / "scores.json").stat().st_mtime_ns == scores
    # Kept scores are per decoding: a card given one, then another lesion size alone, scores again.
    fold0 = tmp_path / "cv" / "fold0"
    card = load_card(fold0)
    for gate in (1.0, 2.0):
        write_card(fold0, dataclasses.replace(card, decoding=Decoding({"WT": 0.3}, gate)))
        cv.main()
        capsys.readouterr()
        kept = json.loads((fold0 / "scores.json").read_text())["settings"]["decoding"]
        assert kept == {"thresholds": {"WT": 0.3}, "grow_from_ml": gate}
        assert (fold0 / "scores.json").stat().st_mtime_ns != scores
        scores = (fold0 / "scores.json").stat().st_mtime_ns
    write_card(fold0, card)
    # The CPU recipe fine-tunes a model: started here from fold 0's model, which trained on fold 1's
    # cases, so those are scored but left out of the means, for the new folds and for the baseline.
    start = tmp_path / "cv" / "fold0"
    monkeypatch.setattr(cv, "CPU_RECIPE", cv.RECIPE + ["--init", "default"])
    monkeypatch.setattr(sys, "argv", argv[:6] + [str(tmp_path / "cv-cpu"), *argv[7:-1], str(tmp_path / "cpu.json"),
                                                 "--recipe", "cpu", "--init", str(start), "--baseline", str(start),
                                                 "--no-subsets"])
    cv.main()
    out = json.loads((tmp_path / "cpu.json").read_text())
    assert out["plan"]["folds"] == folds and out["recipe"][out["recipe"].index("--init") + 1] == str(start)
    seen = sorted(folds[1])
    for table, cases in ((out["table"], out["cases"]), (out["baseline_table"], out["baseline_cases"])):
        assert sorted(cases) == sorted(c for f in folds for c in f)  # every case scored
        assert table["left_out_seen_by_init"] == seen
        assert table["as_predict_runs"]["all_cases"]["cases"] == len(folds[0])
    fine_tuned = load_model(str(tmp_path / "cv-cpu" / "fold1")).card.training
    assert fine_tuned["initialised_from"]["weights_sha256"] == load_model(str(start)).sha256
    kept = json.loads((tmp_path / "cv-cpu" / "baseline" / "scores.json").read_text())
    assert kept["settings"]["model_sha256"] == load_model(str(start)).sha256
    assert "left out of the means (trained on by the initial model)" in capsys.readouterr().out
    # The same folder with another starting model is refused, not passed off as this recipe's folds.
    other = [str(tmp_path / "cv" / "fold1") if a == str(start) else a for a in sys.argv]
    monkeypatch.setattr(sys, "argv", other)
    with pytest.raises(SystemExit, match="trained by another command"):
        cv.main()
