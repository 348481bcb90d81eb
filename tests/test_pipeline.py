"""End to end on real scans: CLI predict writes label map, report and configuration."""
from __future__ import annotations

import json
import tomllib

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import brain_phantom, save_nifti, shared_data
from tumorseg.cli import main
from tumorseg.model import sha256_file


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.slow
def test_predict_real_brats_case_four_sequences(tmp_path, tiny_model):
    case = shared_data("brats-gli-00001-000")
    files = {seq: next(case.glob(f"*-{suffix}.nii.gz")) for seq, suffix in
             [("flair", "t2f"), ("t1", "t1n"), ("t1gd", "t1c"), ("t2", "t2w")]}
    out = tmp_path / "out"
    result = run_cli("predict", "--flair", str(files["flair"]), "--t1", str(files["t1"]), "--t1gd",
                     str(files["t1gd"]), "--t2", str(files["t2"]), "--model", str(tiny_model), "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    source = nib.load(str(files["flair"]))
    labels = nib.load(str(out / "segmentation.nii.gz"))
    assert labels.shape == source.shape == (240, 240, 155)
    assert np.array_equal(labels.affine, source.affine)
    report = json.loads((out / "report.json").read_text())
    assert report["sequences_used"] == ["flair", "t1", "t1gd", "t2"]
    assert report["model"]["weights_sha256"] == sha256_file(tiny_model / "weights.safetensors")
    data = np.asarray(labels.dataobj)
    voxel_ml = abs(np.linalg.det(source.affine[:3, :3])) / 1000
    assert report["results"]["regions"]["WT"]["volume_ml"] == pytest.approx(np.count_nonzero(data) * voxel_ml, abs=1e-3)
    assert report["results"]["labels"]["edema"]["voxels"] == int((data == 1).sum())
    for stage in ("read", "geometry", "normalize", "infer", "postprocess", "write"):
        assert stage in report["timings_s"]
    assert set(report["inputs"]) == {"flair", "t1", "t1gd", "t2"}
    resolved = tomllib.loads((out / "pipeline.resolved.toml").read_text())
    assert resolved["model_sha256"] == report["model"]["weights_sha256"]
    assert resolved["inference"]["overlap"] == 0.5
    # Privacy: the report names no input path.
    assert str(case) not in (out / "report.json").read_text()


def test_same_input_twice_gives_identical_bytes(tmp_path, tiny_model):
    image = brain_phantom((40, 44, 36), seed=3)
    path = save_nifti(tmp_path / "x-t2f.nii.gz", image, np.diag([1.0, 1.0, 1.0, 1.0]))
    outs = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        result = run_cli("predict", str(path), "--model", str(tiny_model), "-o", str(out), "-q")
        assert result.exit_code == 0, result.output
        outs.append((out / "segmentation.nii.gz").read_bytes())
    assert outs[0] == outs[1]
    assert np.asarray(nib.load(str(tmp_path / "out0" / "segmentation.nii.gz")).dataobj).any()
    # The resolved configuration reruns the same run, and pins its model's weights.
    resolved = tmp_path / "out0" / "pipeline.resolved.toml"
    result = run_cli("predict", str(path), "--pipeline", str(resolved), "-o", str(tmp_path / "again"), "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again" / "segmentation.nii.gz").read_bytes() == outs[0]
    from conftest import make_tiny_model
    other = make_tiny_model(tmp_path / "other", seed=1)
    result = run_cli("predict", str(path), "--pipeline", str(resolved), "--model", str(other), "-o",
                     str(tmp_path / "other-out"), "-q")
    assert result.exit_code == 6 and "pins model weights" in result.output


def test_a_rerun_that_fails_writing_leaves_no_report_of_the_earlier_run(tmp_path, tiny_model, monkeypatch):
    """report.json marks a complete set: a rerun into the folder that fails part way (a full disk)
    must not leave the old report beside files of two runs."""
    import errno

    from tumorseg.stages import write

    path = save_nifti(tmp_path / "x-t2f.nii.gz", brain_phantom((40, 44, 36), seed=3), np.diag([1.0, 1.0, 1.0, 1.0]))
    out = tmp_path / "out"
    assert run_cli("predict", str(path), "--model", str(tiny_model), "-o", str(out), "-q").exit_code == 0
    assert (out / "report.json").is_file()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(write, "write_label_map", disk_full)
    assert run_cli("predict", str(path), "--model", str(tiny_model), "-o", str(out), "-q").exit_code != 0
    assert not (out / "report.json").exists()
    assert not list(out.glob(".*partial*"))


def test_decathlon_4d_input_and_missing_sequence_report(tmp_path, tiny_model):
    channels = np.stack([brain_phantom((40, 44, 36), seed=s) for s in range(4)], axis=-1)
    path = save_nifti(tmp_path / "BRATS_001.nii.gz", channels, np.diag([-1.0, -1.0, 1.0, 1.0]))
    out = tmp_path / "out"
    assert run_cli("predict", str(path), "--model", str(tiny_model), "-o", str(out), "-q").exit_code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sequences_used"] == ["flair", "t1", "t1gd", "t2"]
    assert nib.load(str(out / "segmentation.nii.gz")).shape == (40, 44, 36)

    flair = save_nifti(tmp_path / "study_flair.nii.gz", channels[..., 0], np.eye(4))
    out2 = tmp_path / "out2"
    assert run_cli("predict", str(flair), "--model", str(tiny_model), "-o", str(out2), "-q").exit_code == 0
    report = json.loads((out2 / "report.json").read_text())
    assert report["sequences_used"] == ["flair"]
    assert report["sequences_missing"] == ["t1", "t1gd", "t2"]


def test_models_command_lists_sequences(tiny_model, monkeypatch):
    import tumorseg.model as model_module

    monkeypatch.setattr(model_module, "bundled_models_dir", lambda: tiny_model.parent)
    result = run_cli("models")
    assert result.exit_code == 0
    assert tiny_model.name in result.output
    assert "flair, t1, t1gd, t2" in result.output


def test_tta_is_accepted_and_deterministic(tmp_path, tiny_model):
    image = brain_phantom((36, 40, 32), seed=5)
    path = save_nifti(tmp_path / "x-t1c.nii.gz", image, np.eye(4))
    out = tmp_path / "out"
    assert run_cli("predict", str(path), "--tta", "--overlap", "0.25", "--model", str(tiny_model), "-o", str(out), "-q").exit_code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["configuration"]["inference"]["tta"] is True
    assert report["configuration"]["inference"]["overlap"] == 0.25


def test_the_precision_suits_the_cpu_is_reported_and_fp32_can_be_asked_for(tmp_path, tiny_model):
    """auto: bf16 on a CPU with bf16 instructions, fp32 on others; fp16 is refused on the CPU."""
    from tumorseg.stages.infer import native_bf16_cpu

    path = save_nifti(tmp_path / "x-t1c.nii.gz", brain_phantom((36, 40, 32), seed=5), np.eye(4))
    for asked, expected in (("auto", "bf16" if native_bf16_cpu() else "fp32"), ("fp32", "fp32")):
        out = tmp_path / asked
        result = run_cli("predict", str(path), "--precision", asked, "--device", "cpu", "--model", str(tiny_model),
                         "-o", str(out), "-q")
        assert result.exit_code == 0, result.output
        assert json.loads((out / "report.json").read_text())["precision"] == expected
        assert tomllib.loads((out / "pipeline.resolved.toml").read_text())["inference"]["precision"] == asked
    refused = CliRunner().invoke(main, ["predict", str(path), "--precision", "fp16", "--device", "cpu", "--model",
                                        str(tiny_model), "-o", str(tmp_path / "fp16"), "-q"])
    assert refused.exit_code == 6 and "fp16 is for CUDA GPUs" in refused.output
    assert not (tmp_path / "fp16" / "segmentation.nii.gz").exists()


def test_report_warns_when_the_scan_is_not_skull_stripped(tmp_path, tiny_model):
    stripped = brain_phantom((40, 44, 36), seed=4)
    with_head = stripped + np.random.default_rng(4).normal(20, 5, stripped.shape).astype(np.float32)  # no constant background
    reports = {}
    for name, image in (("stripped", stripped), ("head", with_head)):
        path = save_nifti(tmp_path / f"{name}-t1c.nii.gz", image, np.eye(4))
        out = tmp_path / name
        # Brain extraction off: this is what is reported where it does not run (tests/test_brain.py).
        assert run_cli("predict", str(path), "--model", str(tiny_model), "-o", str(out), "-q",
                       "--brain-extraction", "off").exit_code == 0
        reports[name] = json.loads((out / "report.json").read_text())
    assert reports["stripped"]["warnings"] == []
    assert len(reports["head"]["warnings"]) == 1 and "skull-stripped" in reports["head"]["warnings"][0]


def test_report_warns_about_a_sequence_that_covers_part_of_the_brain(tmp_path, tiny_model):
    flair = brain_phantom((40, 44, 36), seed=4)
    slab = flair.copy()
    slab[:, :, 14:] = 0  # a T1gd slab over the lower part of the brain only
    reports = {}
    for name, t1gd in (("whole", flair * 1.3), ("slab", slab)):
        folder = tmp_path / name
        folder.mkdir()
        save_nifti(folder / "c-flair.nii.gz", flair, np.eye(4))
        save_nifti(folder / "c-t1c.nii.gz", t1gd, np.eye(4))
        out = tmp_path / f"out-{name}"
        assert run_cli("predict", str(folder), "--model", str(tiny_model), "-o", str(out), "-q").exit_code == 0
        reports[name] = json.loads((out / "report.json").read_text())
    assert reports["whole"]["warnings"] == []
    (warning,) = reports["slab"]["warnings"]
    assert warning.startswith("the t1gd image holds data over only ")


def test_preferred_set_leaves_other_sequences_unread_and_reported(tmp_path):
    from conftest import make_tiny_model

    model = make_tiny_model(tmp_path / "model", preferred_sets=(("flair", "t1gd"),))
    folder = tmp_path / "case"
    folder.mkdir()
    for n, suffix in enumerate(("t2f", "t1c")):
        save_nifti(folder / f"x-{suffix}.nii.gz", brain_phantom((40, 44, 36), seed=n), np.eye(4))
    # A T2 on another grid would fail the case if it were read; the model will not use it.
    save_nifti(folder / "x-t2w.nii.gz", brain_phantom((30, 30, 30), seed=5), np.eye(4))
    out = tmp_path / "out"
    result = run_cli("predict", str(folder), "--model", str(model), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "not used: t2" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["sequences_used"] == ["flair", "t1gd"] and report["sequences_ignored"] == ["t2"]
    assert report["sequences_missing"] == ["t1"]

    # --all-sequences reads the T2 too, and refuses its other grid by name.
    result = CliRunner().invoke(main, ["predict", str(folder), "--model", str(model), "-o", str(tmp_path / "o2"),
                                       "--all-sequences"])
    assert result.exit_code != 0 and "x-t2w.nii.gz" in result.output

    # A 4D Decathlon file is read whole; the preference still picks FLAIR and T1gd.
    channels = np.stack([brain_phantom((40, 44, 36), seed=s) for s in range(4)], axis=-1)
    path = save_nifti(tmp_path / "BRATS_001.nii.gz", channels, np.eye(4))
    assert run_cli("predict", str(path), "--model", str(model), "-o", str(tmp_path / "o3"), "-q").exit_code == 0
    report = json.loads((tmp_path / "o3" / "report.json").read_text())
    assert report["sequences_used"] == ["flair", "t1gd"] and report["sequences_ignored"] == ["t1", "t2"]
