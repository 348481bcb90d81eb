"""Imported models (tumorseg.imported): an nnU-Net v2 model trained by nnU-Net's own commands
(tests/data/nnunet_tiny, made by tests/data/make_nnunet_model.py) gives through ``tumorseg predict``
the labels ``nnUNetv2_predict_from_modelfolder`` gives, and loading it runs no code.

nnU-Net runs from its own virtual environment ($TUMORSEG_NNUNET_VENV; .ci/run makes one), because
its dependencies (timm, torchvision) need a torch build other than the CPU one tumorseg is tested
with here; tumorseg itself needs only dynamic-network-architectures (the `nnunet` extra).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tumorseg.cli import main
from tumorseg.errors import ModelError

pytest.importorskip("dynamic_network_architectures", reason="nnU-Net models need the nnunet extra "
                    "(pip install --no-deps dynamic-network-architectures einops; .ci/run installs it)")

HERE = Path(__file__).resolve().parent
TINY = HERE / "data" / "nnunet_tiny"
REFERENCE = HERE / "nnunet_reference.py"
AGREEMENT = 0.999  # the bar: labels identical on at least 99.9 % of voxels


def invoke(*args: str, env: dict | None = None):
    result = CliRunner(env=env).invoke(main, list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def nnunet_venv() -> Path:
    venv = os.environ.get("TUMORSEG_NNUNET_VENV")
    if not venv or not (Path(venv) / "bin" / "nnUNetv2_predict_from_modelfolder").is_file():
        if os.environ.get("CI"):
            pytest.fail("TUMORSEG_NNUNET_VENV must name an nnU-Net virtual environment in CI (.ci/run makes one)")
        pytest.skip("needs nnU-Net in its own virtual environment: set TUMORSEG_NNUNET_VENV (see .ci/run)")
    return Path(venv)


@pytest.fixture()
def models_dir(tmp_path, monkeypatch) -> Path:
    out = tmp_path / "user-models"
    monkeypatch.setenv("TUMORSEG_MODELS", str(out))
    return out


def _save_channels(folder: Path, name: str, data: np.ndarray, affine: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for c in range(data.shape[3]):
        path = folder / f"{name}_{c:04d}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data[..., c]), affine), path)
        files.append(path)
    return files


@pytest.fixture(scope="module")
def held_back(tmp_path_factory) -> dict[str, list[Path]]:
    """Two synthetic cases the model never saw, cut around the tumour to keep nnU-Net's CPU time
    short: one with a blank slab (nnU-Net crops to the non-zero box) and one with 4.4 mm slices
    (anisotropic: nnU-Net resamples that axis on its own, order 0)."""
    root = tmp_path_factory.mktemp("held")
    result = subprocess.run([shutil.which("tumorseg") or "tumorseg", "synth", "-o", str(root / "synth"), "--cases", "2",
                             "--seed", "101", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    cases = {}
    for n, name in enumerate(("blank_slab", "thick_slices")):
        img = nib.load(root / "synth" / "imagesTr" / f"synth_{n:04d}.nii.gz")
        label = np.asarray(nib.load(root / "synth" / "labelsTr" / f"synth_{n:04d}.nii.gz").dataobj)
        data = np.asarray(img.dataobj, dtype=np.float32)
        centre = np.round(np.argwhere(label > 0).mean(axis=0)).astype(int)
        half = (48, 48, 36) if n == 0 else (48, 48, 24)
        lo = [int(np.clip(c - h, 0, s - 2 * h)) for c, h, s in zip(centre, half, data.shape[:3])]
        box = tuple(slice(a, a + 2 * h) for a, h in zip(lo, half))
        data = data[box]
        affine = img.affine.copy()
        affine[:3, 3] = img.affine[:3, :3] @ lo + img.affine[:3, 3]
        if n == 0:
            data[:12] = 0  # a partial field of view: nnU-Net crops it away and pads the logits back
        else:
            data = data[:, :, ::2]
            affine[:3, 2] *= 2
        cases[name] = _save_channels(root / "cases", name, data, affine)
    return cases


def _nnunet_predict(venv: Path, model: Path, cases: dict[str, list[Path]], out: Path, folds: list[str]) -> None:
    inputs = out / "in"
    inputs.mkdir(parents=True)
    for files in cases.values():
        for f in files:
            shutil.copy(f, inputs / f.name)
    env = {**os.environ, "nnUNet_raw": str(out), "nnUNet_preprocessed": str(out), "nnUNet_results": str(out)}
    subprocess.run([str(venv / "bin" / "nnUNetv2_predict_from_modelfolder"), "-i", str(inputs), "-o", str(out / "pred"),
                    "-m", str(model), "-f", *folds, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"],
                   env=env, check=True, capture_output=True)


def _import(name: str, *extra: str) -> Path:
    result = invoke("models", "import", "nnunet", str(TINY), "--name", name, *extra)
    assert result.exit_code == 0, result.output
    return Path(os.environ["TUMORSEG_MODELS"]) / name


def test_import_reads_channels_labels_and_mirroring_and_lists_the_model(models_dir):
    from tumorseg.model import find_model_dir, load_card

    target = _import("tiny", "--folds", "0,1")
    card = load_card(target)
    assert find_model_dir("tiny") == target
    assert card.input.sequences == ("flair", "t1", "t1gd", "t2")  # FLAIR, T1w, T1gd, T2w in dataset.json
    assert card.input.required == card.input.sequences
    imported = card.imported
    assert imported.format == "nnunet" and imported.configuration == "3d_fullres" and imported.folds == ("0", "1")
    assert imported.mirror_axes == (0, 1, 2) and not imported.trust_code
    # Regions whole tumour / core / enhancing, painted 1, 2, 3: oedema, the rest of the core, enhancing.
    assert dict(imported.label_map) == {"1": 1, "2": 2, "3": 3}
    assert sorted(imported.files) == ["dataset.json", "fold_0/checkpoint_final.pth", "fold_1/checkpoint_final.pth",
                                      "plans.json"]
    listing = invoke("models").output
    assert "tiny" in listing and "imported nnunet" in listing
    again = invoke("models", "import", "nnunet", str(TINY), "--name", "tiny")
    assert again.exit_code != 0 and "exists already" in again.output


def test_import_maps_labels_to_another_scheme(models_dir):
    from tumorseg.model import load_card

    card = load_card(_import("tiny21", "--folds", "0", "--label-scheme", "brats2021"))
    assert dict(card.imported.label_map) == {"1": 2, "2": 1, "3": 4}  # BraTS 2021: 2 oedema, 1 core, 4 enhancing


@pytest.mark.parametrize("folds", [["0"], ["0", "1"]], ids=["one-fold", "two-folds"])
def test_predict_gives_nnunet_labels(nnunet_venv, held_back, models_dir, tmp_path, folds):
    _import("tiny", "--folds", ",".join(folds))
    _nnunet_predict(nnunet_venv, TINY, held_back, tmp_path / "nnunet", folds)
    for name, files in held_back.items():
        out = tmp_path / "tumorseg" / name
        result = invoke("predict", "--flair", str(files[0]), "--t1", str(files[1]), "--t1gd", str(files[2]),
                        "--t2", str(files[3]), "--model", "tiny", "--pipeline", "as-trained", "--device", "cpu",
                        "-o", str(out), "-q")
        assert result.exit_code == 0, result.output
        ours = nib.load(out / "segmentation.nii.gz")
        theirs = nib.load(tmp_path / "nnunet" / "pred" / f"{name}.nii.gz")
        reference = nib.load(files[0])
        assert ours.shape == reference.shape and np.allclose(ours.affine, reference.affine, atol=1e-5)
        a, b = np.asarray(ours.dataobj), np.asarray(theirs.dataobj)
        agreement = float((a == b).mean())
        print(f"{name}, folds {','.join(folds)}: labels identical on {100 * agreement:.4f} % of {a.size} voxels; "
              f"nnU-Net foreground {int((b > 0).sum())} voxels")
        assert (b > 0).sum() > 100, "the reference marks (almost) nothing: the comparison would prove little"
        assert agreement >= AGREEMENT


def test_preprocessing_and_logits_match_nnunet(nnunet_venv, held_back, tmp_path, models_dir):
    """Stage by stage: the network input and the mean logits of two folds with mirroring."""
    from tumorseg.config import load_pipeline
    from tumorseg.pipeline import Segmenter
    from tumorseg.sequences import StudyInputs

    subprocess.run([str(nnunet_venv / "bin" / "python"), str(REFERENCE), str(TINY), str(tmp_path), "--folds", "0", "1",
                    *[a for name, files in held_back.items() for a in ("--case", name, *map(str, files))]],
                   check=True, capture_output=True)
    _import("tiny", "--folds", "0,1")
    segmenter = Segmenter("tiny", load_pipeline("as-trained").with_overrides(device="cpu"))
    for name, files in held_back.items():
        prepared = segmenter.spec.read_and_prepare(StudyInputs(files=tuple(zip(("flair", "t1", "t1gd", "t2"), files))))
        image = prepared.image.copy()
        expected = np.load(tmp_path / f"{name}_preprocessed.npy")
        assert image.shape == expected.shape
        logits, _ = segmenter.infer(prepared)
        reference = np.load(tmp_path / f"{name}_logits.npy").astype(np.float32)
        difference = np.abs(logits.astype(np.float32) - reference)
        seconds = json.loads((tmp_path / f"{name}_seconds.json").read_text())["logits_seconds"]
        print(f"{name}: input max |difference| {np.abs(image - expected).max():.2e}, logits max {difference.max():.2e}, "
              f"mean {difference.mean():.2e} (nnU-Net's logits took {seconds:.1f} s)")
        assert np.abs(image - expected).max() < 1e-4
        assert difference.max() < 0.05  # fp16 accumulators, flips batched: rounding only


class _RunsCode:
    """Unpickling this would call os.getpid (standing in for anything an attacker names)."""

    def __reduce__(self):
        return (os.getpid, ())


def _tampered_copy(tmp_path: Path, extra) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(TINY, copy)
    path = copy / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["logging"]["note"] = extra
    torch.save(checkpoint, path)
    return copy


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, models_dir):
    copy = _tampered_copy(tmp_path, _RunsCode())
    result = invoke("models", "import", "nnunet", str(copy), "--name", "evil", "--folds", "0")
    assert result.exit_code != 0
    assert "refused" in result.output and "could run code" in result.output and "posix.getpid" in result.output
    assert not (models_dir / "evil").exists()


def test_trust_code_is_explicit_and_recorded(tmp_path, models_dir):
    import datetime

    copy = _tampered_copy(tmp_path, datetime.date(2026, 1, 1))  # harmless, but not on the allow-list
    refused = invoke("models", "import", "nnunet", str(copy), "--name", "dated", "--folds", "0")
    assert refused.exit_code != 0 and "datetime" in refused.output
    result = invoke("models", "import", "nnunet", str(copy), "--name", "dated", "--folds", "0", "--trust-code", "--copy")
    assert result.exit_code == 0, result.output
    from tumorseg.model import load_card, load_model

    card = load_card(models_dir / "dated")
    assert card.imported.trust_code and card.imported.folder == "files"
    assert "trusted to run code" in invoke("models").output
    load_model("dated")  # loads, as the user asked


def _edited(folder: Path, name: str, edit) -> None:
    """Change one JSON file of a results folder in place."""
    document = json.loads((folder / name).read_text())
    edit(document)
    (folder / name).write_text(json.dumps(document))


def test_a_changed_file_fails_the_checksum(tmp_path, models_dir):
    from tumorseg.model import load_model

    copy = tmp_path / "copy"
    shutil.copytree(TINY, copy)
    invoke("models", "import", "nnunet", str(copy), "--name", "tiny", "--folds", "0")
    _edited(copy, "plans.json", lambda plans: plans["configurations"]["3d_fullres"].update(patch_size=[32, 32, 32]))
    with pytest.raises(ModelError, match="checksum mismatch"):
        load_model("tiny")


def test_plans_naming_another_network_class_are_refused(tmp_path, models_dir):
    copy = tmp_path / "copy"
    shutil.copytree(TINY, copy)
    _edited(copy, "plans.json", lambda plans: plans["configurations"]["3d_fullres"]["architecture"].update(
        network_class_name="os.system"))
    result = invoke("models", "import", "nnunet", str(copy), "--name", "odd", "--folds", "0")
    assert result.exit_code != 0 and "network class 'os.system'" in result.output
    assert not (models_dir / "odd").exists()


def test_unrecognised_channel_names_ask_for_channels(tmp_path, models_dir):
    copy = tmp_path / "copy"
    shutil.copytree(TINY, copy)
    _edited(copy, "dataset.json", lambda dataset: dataset["channel_names"].update({"1": "MPRAGE"}))
    result = invoke("models", "import", "nnunet", str(copy), "--name", "mp", "--folds", "0")
    assert result.exit_code != 0 and "'MPRAGE'" in result.output and "--channels" in result.output
    result = invoke("models", "import", "nnunet", str(copy), "--name", "mp", "--folds", "0",
                    "--channels", "0=flair,1=t1,2=t1gd,3=t2")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("reader", ["nnunet", "monai-bundle"])
def test_weights_that_would_run_code_are_refused_naming_file_and_global(tmp_path, reader):
    from tumorseg.imported.monai_bundle import _load_weights
    from tumorseg.imported.nnunet import load_checkpoint

    load = load_checkpoint if reader == "nnunet" else _load_weights
    path = tmp_path / "bad.pth"
    torch.save({"model": _RunsCode()}, path)
    with pytest.raises(ModelError) as info:
        load(path, False)
    assert str(path) in str(info.value) and "posix.getpid" in str(info.value)
    assert load(path, True) == os.getpid() or load(path, True) == {"model": os.getpid()}  # trusted: it ran


# -- everywhere a bundled model runs -------------------------------------------------------------

def test_batch_and_predict_give_the_same_labels(held_back, models_dir, tmp_path):
    _import("tiny", "--folds", "0")
    root = tmp_path / "cases"
    for name, files in held_back.items():
        (root / name).mkdir(parents=True)
        for suffix, path in zip(("t2f", "t1n", "t1c", "t2w"), files):  # BraTS 2023 names
            shutil.copy(path, root / name / f"{name}-{suffix}.nii.gz")
    result = invoke("batch", str(root), "-o", str(tmp_path / "batch"), "--model", "tiny", "--pipeline", "as-trained",
                    "--device", "cpu", "--no-tta", "--workers", "1", "-q")
    assert result.exit_code == 0, result.output
    for name, files in held_back.items():
        out = tmp_path / "predict" / name
        result = invoke("predict", str(root / name), "--model", "tiny", "--pipeline", "as-trained", "--device", "cpu",
                        "--no-tta", "-o", str(out), "-q")
        assert result.exit_code == 0, result.output
        batch = next((tmp_path / "batch").rglob(f"{name}/segmentation.nii.gz"))
        assert np.array_equal(np.asarray(nib.load(batch).dataobj), np.asarray(nib.load(out / "segmentation.nii.gz").dataobj))
        report = json.loads((out / "report.json").read_text())
        assert report["model"]["name"] == "tiny" and len(report["model"]["weights_sha256"]) == 64


def test_validate_scores_an_imported_model(models_dir, tmp_path):
    _import("tiny", "--folds", "0")
    dataset = tmp_path / "synth"
    result = subprocess.run([shutil.which("tumorseg") or "tumorseg", "synth", "-o", str(dataset), "--cases", "2",
                             "--seed", "5", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    result = invoke("validate", "--dataset", str(dataset), "-o", str(tmp_path / "report"), "--model", "tiny",
                    "--device", "cpu", "--no-tta", "--no-html")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["counts"]["ok"] == 2
    assert metrics["aggregate"]["WT"]["dice"]["mean"] is not None


def test_dicom_study_gives_an_rtstruct_with_an_imported_model(models_dir, tmp_path):
    import pydicom

    from conftest import dicom3tools_findings, run_tool
    from test_dicom_series import copy_series, decubitus

    _import("tiny", "--folds", "0")
    study = tmp_path / "study"
    for number, (folder, description) in enumerate([("flair", "FLAIR"), ("t1", "T1"), ("t1gd", "T1 POST GD"),
                                                    ("t2", "T2")], start=10):
        copy_series(decubitus("HFS"), study / folder, new_uids=True, description=description, series_number=number)
    out = tmp_path / "out"
    result = invoke("predict", str(study), "--model", "tiny", "--pipeline", "as-trained", "--device", "cpu", "--no-tta",
                    "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["sequences_used"] == ["flair", "t1", "t1gd", "t2"]
    errors, _ = dicom3tools_findings(run_tool("dciodvfy", str(out / "rtstruct.dcm")))
    assert errors == []
    rt = pydicom.dcmread(out / "rtstruct.dcm")
    t1gd = pydicom.dcmread(next((study / "t1gd").iterdir()), stop_before_pixels=True)
    series = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == t1gd.SeriesInstanceUID  # the reference series: T1gd


def test_init_from_an_imported_model_is_refused(models_dir):
    from tumorseg.errors import ConfigError
    from tumorseg.model import load_card
    from tumorseg.train import check_init_compatible

    card = load_card(_import("tiny", "--folds", "0"))
    with pytest.raises(ConfigError, match="imported nnunet model"):
        check_init_compatible(card, card)


@pytest.mark.parametrize("labels, scheme, expected", [
    # The Decathlon's names, as nnU-Net's converted Task01 carries them
    ({"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}, "msd", {1: 1, 2: 2, 3: 3}),
    ({"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}, "brats2021", {1: 2, 2: 1, 3: 4}),
    # BraTS 2023 names
    ({"background": 0, "NETC": 1, "SNFH": 2, "ET": 3}, "brats2023", {1: 1, 2: 2, 3: 3}),
    # nnU-Net v1's table, value -> name, as the Decathlon's own dataset.json
    ({"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}, "msd", {1: 1, 2: 2, 3: 3}),
])
def test_label_names_map_to_the_scheme(labels, scheme, expected):
    from tumorseg.imported.nnunet import label_map

    assert label_map({"labels": labels}, scheme) == expected


def test_an_unknown_label_name_asks_for_labels():
    from tumorseg.imported.nnunet import label_map

    with pytest.raises(ModelError, match="--labels"):
        label_map({"labels": {"background": 0, "lesion": 1}}, "msd")


@pytest.mark.parametrize("labels", [
    {"background": 0},  # no tumour label: the label map would be empty
    {"background": 0, "edema": "1"},  # a value that is not an integer
    {"background": 0, "whole tumor": [1, 2, 3]},  # a region without regions_class_order
])
def test_a_labels_table_without_tumour_values_is_refused_at_import(labels):
    from tumorseg.imported.nnunet import label_map

    with pytest.raises(ModelError, match="dataset.json label"):
        label_map({"labels": labels}, "msd")
