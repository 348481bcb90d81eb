"""DICOM through the CLI: predict on a series folder, and `tumorseg rtstruct` for an existing mask."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from conftest import dicom3tools_findings, run_tool, save_nifti, shared_data
from tumorseg.cli import main
from tumorseg.dicom.volume import read_series

CANARY = "CANARY^PATIENT"


def canary_series(tmp_path: Path, position: str = "HFS") -> Path:
    """A copy of a real series whose patient name and ID are a canary."""
    out = tmp_path / f"dicom-{position}"
    out.mkdir()
    for path in sorted(shared_data("dicom", "decubitus-t1", position).glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = CANARY, "CANARY-ID-123"
        ds.save_as(out / path.name)
    return out


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_predict_dicom_folder_writes_rtstruct_on_the_series(tmp_path, empty_model, caplog):
    """Contour geometry is tested in test_rtstruct.py; here the plumbing, with a model that finds nothing."""
    series_dir = canary_series(tmp_path)
    out = tmp_path / "out"
    caplog.set_level("DEBUG")
    result = invoke("predict", str(series_dir), "--model", str(empty_model), "--seg", "-o", str(out))
    assert result.exit_code == 0, result.output
    volume, series = read_series(series_dir)
    labels = nib.load(str(out / "segmentation.nii.gz"))
    assert labels.shape == series.shape
    np.testing.assert_allclose(labels.affine, volume.affine, atol=1e-5)
    rt = pydicom.dcmread(out / "rtstruct.dcm")
    assert rt.FrameOfReferenceUID == series.frame_of_reference_uid
    ref_series = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == series.series_uid
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ContourImageSequence} == set(series.sop_instance_uids)
    report = json.loads((out / "report.json").read_text())
    assert report["empty"] and report["rtstruct"]["empty"]
    assert report["inputs"]["t1"]["format"] == "dicom"
    assert (out / "seg.dcm").exists()
    errors, _ = dicom3tools_findings(run_tool("dciodvfy", str(out / "rtstruct.dcm")))
    assert errors == []
    # Privacy: the canary is in the RTSTRUCT (copied patient module) but in no log line or file name.
    logged = caplog.text + result.output
    assert "CANARY" not in logged
    assert not any("CANARY" in p.name for p in out.iterdir())
    assert CANARY not in (out / "report.json").read_text()
    # A NIfTI run into the same folder writes no DICOM: this patient's RTSTRUCT and SEG must go.
    nifti = save_nifti(tmp_path / "other-t1n.nii.gz", volume.array.astype(np.float32), volume.affine)
    result = invoke("predict", str(nifti), "--model", str(empty_model), "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    # A real head with skull: its brain was extracted (tests/test_brain.py), and the mask written.
    assert sorted(p.name for p in out.iterdir()) == ["brain_mask.nii.gz", "overview.png", "pipeline.resolved.toml",
                                                     "report.json", "segmentation.nii.gz"]


def test_predict_refuses_dicom_mixed_with_nifti(tmp_path, empty_model):
    series_dir = canary_series(tmp_path)
    flair = save_nifti(tmp_path / "x-t2f.nii.gz", np.ones((8, 8, 8), np.float32) * np.arange(8), np.eye(4))
    out = tmp_path / "out"
    result = invoke("predict", str(series_dir), "--flair", str(flair), "--model", str(empty_model), "-o", str(out))
    assert result.exit_code == 7
    assert "one kind of input" in result.output
    assert not out.exists()


@pytest.mark.parametrize("roi_names, message", [('{ tumour = "X" }', "neither labels"),
                                                  ('{ edema = "X", WT = "X" }', "used twice")])
def test_bad_roi_names_are_refused_before_anything_is_written(tmp_path, empty_model, roi_names, message):
    """Checked when the model is loaded: before, a bad name failed the RTSTRUCT after the label map was written."""
    series_dir = canary_series(tmp_path)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f'model = "{empty_model}"\n[output]\nroi_names = {roi_names}\n')
    out = tmp_path / "out"
    result = invoke("predict", str(series_dir), "--pipeline", str(pipeline), "-o", str(out))
    assert result.exit_code == 6, result.output
    assert message in result.output
    assert not out.exists()


def dcm2niix_image(series_dir: Path, tmp_path: Path) -> nib.Nifti1Image:
    """The series as dcm2niix, the reference converter, writes it (its own orientation)."""
    converted = tmp_path / "nifti"
    converted.mkdir()
    run_tool("dcm2niix", "-z", "y", "-f", "t1", "-o", str(converted), str(series_dir))
    return nib.load(str(converted / "t1.nii.gz"))


def test_rtstruct_command_accepts_dcm2niix_oriented_mask(tmp_path):
    series_dir = shared_data("dicom", "decubitus-t1", "HFDL")
    image = dcm2niix_image(series_dir, tmp_path)
    mask = np.zeros(image.shape[:3], np.uint8)
    centre = np.array(mask.shape) // 2
    mask[centre[0] - 12:centre[0] + 8, centre[1] - 10:centre[1] + 14, centre[2] - 3:centre[2] + 2] = 1
    mask_path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask, image.affine), str(mask_path))
    out = tmp_path / "out"
    result = invoke("rtstruct", "--mask", str(mask_path), "--series", str(series_dir), "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    rt = pydicom.dcmread(out / "rtstruct.dcm")
    # The contours' world extent matches the mask's world extent (same voxels, whatever the axis order).
    points = np.concatenate([np.array(c.ContourData, float).reshape(-1, 3)
                             for roi in rt.ROIContourSequence for c in roi.get("ContourSequence", [])
                             if int(roi.ReferencedROINumber) == 1])
    world = nib.affines.apply_affine(image.affine, np.argwhere(mask)) * [-1, -1, 1]  # RAS -> LPS
    spacing = np.sqrt((image.affine[:3, :3] ** 2).sum(0)).max()
    assert np.all(np.abs(points.min(0) - world.min(0)) <= spacing)
    assert np.all(np.abs(points.max(0) - world.max(0)) <= spacing)
    errors, _ = dicom3tools_findings(run_tool("dciodvfy", str(out / "rtstruct.dcm")))
    assert errors == []


def test_rtstruct_command_refuses_a_mask_on_another_grid(tmp_path):
    series_dir = shared_data("dicom", "decubitus-t1", "HFS")
    mask_path = save_nifti(tmp_path / "mask.nii.gz", np.ones((256, 256, 35), np.uint8), np.eye(4))
    out = tmp_path / "out"
    result = invoke("rtstruct", "--mask", str(mask_path), "--series", str(series_dir), "-o", str(out))
    assert result.exit_code == 4
    assert "not on the grid" in result.output and "mask.nii.gz" in result.output
    assert not out.exists() or not any(out.iterdir())


def test_rtstruct_command_refuses_label_values_outside_the_scheme_as_an_input_error(tmp_path):
    series_dir = shared_data("dicom", "decubitus-t1", "HFS")
    image = dcm2niix_image(series_dir, tmp_path)
    mask = np.zeros(image.shape[:3], np.uint8)
    mask[10:14, 10:14, 5:7] = 4  # BraTS's enhancing tumour: not a value of the MSD scheme
    mask_path = save_nifti(tmp_path / "brats-mask.nii.gz", mask, image.affine)
    out = tmp_path / "out"
    result = invoke("rtstruct", "--mask", str(mask_path), "--series", str(series_dir), "-o", str(out),
                    "--label-scheme", "msd")
    assert result.exit_code == 3, result.output
    assert "brats-mask.nii.gz" in result.output and "[4]" in result.output and "another scheme" in result.output
    assert not out.exists() or not any(out.iterdir())


def test_multi_sequence_study_with_a_resampled_series_gives_a_conformant_rtstruct(tmp_path, empty_model):
    """FLAIR every other slice (resampled onto the T1gd reference); contours from a threshold net."""
    from conftest import ThresholdNet
    from test_dicom_series import copy_series, decubitus, files_by_position
    from tumorseg.model import LoadedModel, load_card
    from tumorseg.config import load_pipeline
    from tumorseg.pipeline import Segmenter, write_outputs

    study = tmp_path / "study"
    copy_series(decubitus("HFS"), study / "t1gd", new_uids=True, description="T1 POST GD", series_number=10)
    keep = {p.name for p in files_by_position(decubitus("HFS"))[::2]}
    names = sorted(p.name for p in decubitus("HFS").iterdir())
    copy_series(decubitus("HFS"), study / "flair", new_uids=True, description="FLAIR", series_number=11,
                edit=lambda ds, i: names[i] in keep)
    # Brain extraction off: the threshold net's contours are on the whole head, skull included.
    segmenter = Segmenter(LoadedModel(load_card(empty_model), empty_model, ThresholdNet()),
                          load_pipeline("default").with_preprocess(brain_extraction="off"))
    result = segmenter.segment_dicom([study])
    assert result.report["inputs"]["t1gd"]["reference_grid"] and not result.report["inputs"]["flair"]["reference_grid"]
    assert not result.report["empty"]
    out = tmp_path / "out"
    paths = write_outputs(result, segmenter.spec, out)
    assert sum(result.report["rtstruct"]["contours"].values()) > 0
    errors, _ = dicom3tools_findings(run_tool("dciodvfy", str(paths["rtstruct"])))
    assert errors == []
    errors, _ = dicom3tools_findings(run_tool("dcentvfy", str(paths["rtstruct"]), *map(str, sorted((study / "t1gd").iterdir()))))
    assert errors == []
    rt = pydicom.dcmread(paths["rtstruct"])
    reference = result.labels.source.dicom_series
    assert rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID == reference.series_uid


def test_batch_rerun_skips_a_dicom_study_whose_folder_holds_the_output(tmp_path, empty_model):
    """The batch's outputs (manifest, RTSTRUCT, ...) are not inputs of the study they sit in."""
    study = canary_series(tmp_path)
    out = study / "segmentations"
    for _ in range(2):
        result = invoke("batch", str(study), "-o", str(out), "--model", str(empty_model), "-q")
        assert result.exit_code == 0, result.output
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts == {"ok": 1, "failed": 0, "reused": 1, "pending": 0}


def test_pipeline_dicom_table_chooses_series_by_site_rules(tmp_path):
    """A site's naming the built-in rules do not know: refused by default, chosen by the
    pipeline file's [dicom] rules (what a DICOM node, with nobody to type --t1, relies on)."""
    from conftest import make_tiny_model
    from mutants import small_real_series

    series = small_real_series(tmp_path / "study")
    for path in series.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.SeriesDescription, ds.ProtocolName = "zz site seq 7", "zz site seq 7"
        ds.save_as(path)
    model = make_tiny_model(tmp_path / "model", spacing=(4.0, 4.0, 4.0), background_bias=100.0)
    common = ["predict", str(series), "--model", str(model), "-q", "--brain-extraction", "off", "--no-tta"]
    refused = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "default")])
    assert refused.exit_code == 7, refused.output
    pipeline = tmp_path / "site.toml"
    pipeline.write_text('[dicom]\nrules = [{ sequence = "t1", include = ["site seq 7"] }]\n')
    chosen = invoke(*common, "--pipeline", str(pipeline), "-o", str(tmp_path / "site"))
    assert chosen.exit_code == 0, chosen.output
    report = json.loads((tmp_path / "site" / "report.json").read_text())
    assert set(report["inputs"]) == {"t1"}
    resolved = (tmp_path / "site" / "pipeline.resolved.toml").read_text()
    assert "[[dicom.rules]]" in resolved and "site seq 7" in resolved
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\ncolour = 'red'\n")
    result = CliRunner().invoke(main, [*common, "--pipeline", str(bad), "-o", str(tmp_path / "bad")])
    assert result.exit_code == 6 and "[dicom]" in result.output and "colour" in result.output
