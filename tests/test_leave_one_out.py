"""benchmarks/leave_one_out.py: its recipe is the default card's, and a shrunken fold runs end to end."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import brain_phantom, save_nifti, shared_data
from tumorseg.model import load_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import leave_one_out as loo  # noqa: E402

#: Options that name data, output or the model rather than how it is trained.
NOT_RECIPE = {"--dataset", "-o", "--output", "--name", "--exclude", "--init"}


def _options(command: list[str]) -> dict[str, str]:
    """``--flag value`` pairs after the ``train`` word, less NOT_RECIPE."""
    args = command[command.index("train") + 1:]
    out = {}
    for flag, value in zip(args[::2], args[1::2]):
        assert flag.startswith("-"), command
        if flag not in NOT_RECIPE:
            out[flag] = value
    return out


def _datasets(command: list[str]) -> list[str]:
    return [command[i + 1] for i, word in enumerate(command) if word == "--dataset"]


def test_recipe_is_the_default_cards_three_commands():
    # The script redoes version 2.2's three steps: version 2.4 was fine-tuned from it, so they are
    # the first three of the default card's chain.
    training = load_model(str(ROOT / "models" / "default")).card.training
    chain = [training["initialised_from"]]
    while "initialised_from" in chain[0]:
        chain.insert(0, chain[0]["initialised_from"])
    assert chain[-1]["version"] == "2.2" and len(chain) == 3
    assert list(loo.RECIPE) == ["step1", "step2", "step3"]  # one recipe step per card command
    for n, (step, recorded) in enumerate(zip(loo.RECIPE, chain)):
        init = Path("previous") if n else None
        length = loo.step_length(step, None, None)
        command, card = loo.step_command(step, "x", Path("synth"), Path("brats"), Path("o"), length, init), \
            shlex.split(recorded["command"])
        ours = _options(command)
        # The option came after steps 1 and 2 were trained; step 3 had its default of then.
        expected = 0.2 if step == "step3" else 0  # version 2.2's card: augment.low_resolution = 0.2
        assert float(ours.pop("--low-resolution")) == expected
        assert ours == _options(card), step
        # The order of the data sets matters (the sampler draws by position); each step starts from the last.
        assert [Path(d).name for d in _datasets(command)] == ["synth", "brats"]
        assert [Path(d).name for d in _datasets(card)] == ["synth-train", "brats2015-dev"]
        assert ("--init" in command) == ("--init" in card) == (step != "step1")
        words = shlex.split(recorded["synthetic_data_command"])
        assert words[words.index("--seed") + 1] == "1000" and words[words.index("--generator-version") + 1] == "1"
        cases = int(words[words.index("--cases") + 1])
        assert cases == (loo.RECIPE[step]["synthetic_cases"] or 240)


def test_synthetic_data_of_another_seed_or_generator_is_refused(tmp_path):
    synth = _tiny_synthetic_set(tmp_path / "synth", 3, generator_version=2)
    with pytest.raises(SystemExit, match="generator version 1"):
        loo.synthetic_subset(synth, 2, tmp_path / "view")
    assert not (tmp_path / "view").exists()


def _tiny_synthetic_set(root: Path, cases: int, generator_version: int = 1) -> Path:
    """A Decathlon data set of ``cases`` links to one small four-sequence case (enough for the mechanics)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shape = (48, 48, 48)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    r = np.linalg.norm(grid - 24, axis=-1)
    labels = np.select([r < 3, r < 5, r < 9], [2, 3, 1], 0).astype(np.uint8)
    image = np.stack([brain_phantom(shape, seed=c) * (1 + (labels > 0)) for c in range(4)], -1)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    save_nifti(root / "case-image.nii.gz", image, affine)
    save_nifti(root / "case-label.nii.gz", labels, affine)
    training = []
    for n in range(cases):
        for kind, source in (("imagesTr", "case-image"), ("labelsTr", "case-label")):
            (root / kind / f"synth_{n:04d}.nii.gz").symlink_to(root / f"{source}.nii.gz")
        training.append({"image": f"./imagesTr/synth_{n:04d}.nii.gz", "label": f"./labelsTr/synth_{n:04d}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "tiny", "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": cases, "training": training,
        "tumorseg_synth": {"seed": 1000, "generator_version": generator_version, "cases": cases,
                           "case_seeds": list(range(cases))}}))
    return root


@pytest.mark.slow
def test_a_shrunken_fold_trains_every_step_without_the_case_and_scores_it(tmp_path):
    brats = shared_data("brats2015-dev")
    synth = _tiny_synthetic_set(tmp_path / "synth", 125)
    case = "brats_2013_pat0004_1"
    command = [sys.executable, str(ROOT / "benchmarks" / "leave_one_out.py"), "--synth", str(synth),
               "--brats", str(brats), "-o", str(tmp_path / "loo"), "--case", case, "--epochs", "1",
               "--iterations", "1", "--json", str(tmp_path / "loo.json")]
    subprocess.run(command, check=True, timeout=900)

    fold = tmp_path / "loo" / case
    step1, step2, step3 = (load_model(str(fold / s)).card.training for s in loo.RECIPE)
    for training in (step1, step2, step3):
        assert case not in training["training_cases"] + training["validation_cases"]
        assert {c for c in loo.IN_TRAINING if c != case} | {"brats_2013_pat0006_1"} <= set(training["training_cases"])
    assert sum(c.startswith("synth_") for c in step1["training_cases"] + step1["validation_cases"]) == 123
    for training in (step2, step3):
        assert sum(c.startswith("synth_") for c in training["training_cases"] + training["validation_cases"]) == 125
    assert step2["initialised_from"]["weights_sha256"] == load_model(str(fold / "step1")).sha256
    assert step3["initialised_from"]["weights_sha256"] == load_model(str(fold / "step2")).sha256
    assert step3["config"]["augment"]["preferred_set"] > 0 and step1["config"]["augment"]["low_resolution"] == 0
    result = json.loads((tmp_path / "loo.json").read_text())["held_out"]
    assert list(result) == [case] and all(0.0 <= result[case][r] <= 1.0 for r in ("WT", "TC", "ET"))

    # A rerun reuses all three steps; a model trained with other settings is refused, not reused.
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True)
    assert rerun.stdout.count("trained already, reused") == 3
    other = command.copy()
    other[other.index("--iterations") + 1] = "2"
    refused = subprocess.run(other, capture_output=True, text=True, timeout=900)
    assert refused.returncode != 0 and "other settings" in refused.stderr
