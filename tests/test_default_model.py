"""The bundled default model: checksum, card, README, and the README's first command's job."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import benchmark_module
from tumorseg.cli import main
from tumorseg.labels import REGIONS
from tumorseg.model import bundled_models_dir, load_card, load_model, sha256_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "BraTS-GLI-00001-000"


def test_default_model_loads_with_verified_checksum():
    model = load_model("default")
    card = model.card
    weights = model.directory / card.weights.file
    assert sha256_file(weights) == card.weights.sha256
    assert weights.stat().st_size <= 25 * 1024 * 1024
    assert set(card.input.sequences) == {"flair", "t1", "t1gd", "t2"}
    assert card.input.required == () and card.input.min_sequences == 1
    assert card.training["command"].startswith("tumorseg train")
    assert card.license


def test_preferred_sets_follow_the_cross_validation():
    """The card's preferred_sets are the cross-validation script's rule over the subset table the
    card records, pooled over the folds trained so far; every combination gets what the rule says."""
    cv = benchmark_module("cross_validation")
    card = load_card(bundled_models_dir() / "default")
    folds = card.metrics["cross_validation_folds"]
    table = {tuple(k.split("+")): {r: v[r] for r in REGIONS} for k, v in folds["subsets"].items()}
    assert len(table) == 15 and all(v["cases"] == folds["four_sequence_mean"]["cases"] for v in folds["subsets"].values())
    rule = cv.preferred_sets(table)
    assert [tuple(s) for s in card.input.preferred_sets] == rule
    seqs = ("flair", "t1", "t1gd", "t2")
    for n in range(1, 5):
        for have in itertools.combinations(seqs, n):
            expected = next((s for s in rule if set(s) <= set(have)), have)
            assert tuple(card.input.choose(have)) == expected, have


def test_training_log_is_the_shipped_models():
    """training.json beside the weights is the log of the run that made them, not an older one's."""
    card = load_card(bundled_models_dir() / "default")
    log = json.loads((bundled_models_dir() / "default" / "training.json").read_text())
    assert log["split"]["training"] == list(card.training["training_cases"])
    assert len(log["history"]) == card.training["epochs"]


def test_readme_and_card_agree():
    card = load_card(bundled_models_dir() / "default")
    readme = (ROOT / "README.md").read_text()
    assert card.weights.sha256 in readme
    assert card.name in readme and f"**{card.name}** version {card.version}" in readme
    # The README's quality tables repeat the card's measured numbers.
    synthetic = [k for k in card.metrics if k.startswith("synthetic_heldout")]
    assert synthetic
    for key in synthetic:
        synth = card.metrics[key]
        row = " | ".join(f"{synth[r]['mean']:.3f} / {synth[r]['worst']:.3f}" for r in REGIONS)
        assert row in readme
    # Held-out estimates come from the 5-fold cross-validation of the shipped model's recipe: each
    # fold's model trained without its held-out cases (none of them the shipped model, which then
    # trains on every case), beside the same folds of the previous version's recipe.
    folds = card.metrics["cross_validation_folds"]
    previous = card.metrics["cross_validation_folds_previous"]
    assert len(folds["folds"]) == 5 and {str(k) for k in folds["folds"]} == set(folds["fold_model_sha256"])
    assert card.weights.sha256 not in folds["fold_model_sha256"].values()
    assert set(folds["cases"]) <= set(card.training["training_cases"])
    assert set(folds["cases"]) == set(previous["cases"])
    for case, scores in folds["cases"].items():
        assert previous["cases"][case]["fold"] == scores["fold"]  # the same held-out cases, fold by fold
        assert (f"| {case} | {scores['fold']} | {' | '.join(f'{scores[r]:.3f}' for r in REGIONS)} | "
                + " / ".join(f"{previous['cases'][case][r]:.3f}" for r in REGIONS) + " |") in readme
    for group in ("four_sequence_mean", "unseen_mean"):
        mean = folds[group]
        assert (" | ".join(f"{mean[r]:.3f}" for r in REGIONS) + " | worst "
                + " / ".join(f"{x:.3f}" for x in mean["worst"])) in readme
    first_lines = readme.splitlines()[:5]
    assert any("tumorseg predict examples/BraTS-GLI-00001-000" in line for line in first_lines)


@pytest.mark.slow
def test_readme_first_command_segments_the_example(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", str(EXAMPLE), "-o", str(out), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    source = nib.load(str(next(EXAMPLE.glob("*-t2f.nii.gz"))))
    labels = nib.load(str(out / "segmentation.nii.gz"))
    assert labels.shape == source.shape and np.array_equal(labels.affine, source.affine)
    report = json.loads((out / "report.json").read_text())
    # A four-sequence scan gives the model every sequence.
    assert report["sequences_used"] == ["flair", "t1", "t1gd", "t2"]
    assert report["sequences_ignored"] == [] and report["sequences_missing"] == []
    # A real glioma: the model must find a tumour of plausible size, not nothing or everything.
    assert 5.0 < report["results"]["regions"]["WT"]["volume_ml"] < 400.0


def test_all_sequences_is_recorded_in_the_report(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", str(EXAMPLE), "-o", str(out), "-q", "--all-sequences", "--no-tta"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["sequences_used"] == ["flair", "t1", "t1gd", "t2"] and report["sequences_ignored"] == []
    assert report["configuration"]["inference"]["all_sequences"] is True


def test_default_model_with_flair_only(tmp_path):
    out = tmp_path / "out"
    flair = next(EXAMPLE.glob("*-t2f.nii.gz"))
    result = CliRunner().invoke(main, ["predict", str(flair), "-o", str(out), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["sequences_used"] == ["flair"]
    assert report["results"]["regions"]["WT"]["volume_ml"] > 1.0
