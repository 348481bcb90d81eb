"""The bundled default model: checksum, card, README, and the README's first command's job."""
from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from tumorseg.cli import main
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


def test_readme_and_card_agree():
    card = load_card(bundled_models_dir() / "default")
    readme = (ROOT / "README.md").read_text()
    assert card.weights.sha256 in readme
    assert card.name in readme and f"**{card.name}** version {card.version}" in readme
    # The README's quality table repeats the card's measured numbers.
    for key in ("synthetic_heldout_20_cases_seed_2000", "synthetic_heldout_20_cases_seed_2000_all_sequences"):
        synth = card.metrics[key]
        row = " | ".join(f"{synth[r]['mean']:.3f} / {synth[r]['worst']:.3f}" for r in ("WT", "TC", "ET"))
        assert row in readme
    held_out = [c for c, v in card.metrics["brats2015_flair_t1c"].items() if not v["in_training"]]
    base = card.training.get("initialised_from", {})
    assert held_out and all(c not in card.training["training_cases"] for c in held_out)
    assert all(c in base.get("excluded_cases", held_out) for c in held_out)  # the base model never saw it either
    for case in held_out:
        scores = card.metrics["brats2015_flair_t1c"][case]
        assert " | ".join(f"{scores[r]:.3f}" for r in ("WT", "TC", "ET")) in readme
    for case, scores in card.metrics.get("brats2015_flair_t1c_leave_one_out", {}).items():
        assert case in card.training["training_cases"]  # a fold only means something for a case trained on
        assert " | ".join(f"{scores[r]:.3f}" for r in ("WT", "TC", "ET")) in readme
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
    # The card prefers FLAIR and T1gd alone when both are there; T1 and T2 are read and reported.
    assert report["sequences_used"] == ["flair", "t1gd"]
    assert report["sequences_ignored"] == ["t1", "t2"] and report["sequences_missing"] == []
    # A real glioma: the model must find a tumour of plausible size, not nothing or everything.
    assert 5.0 < report["results"]["regions"]["WT"]["volume_ml"] < 400.0


@pytest.mark.slow
def test_all_sequences_overrides_the_cards_preference(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", str(EXAMPLE), "-o", str(out), "-q", "--all-sequences"],
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
