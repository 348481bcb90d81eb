"""The DICOM series reader (tumorseg.dicom.series/select/study) on the real decubitus series.

The reference is dcm2niix, run here on the same folders; broken series are made from copies
in tmp_path. Every failure must be a named tumorseg error, and no log line or message may carry
the patient's name or ID.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from pydicom.uid import generate_uid

from tumorseg.dicom.select import DEFAULT_RULES, SelectionRules, classify_series, select_series
from tumorseg.dicom.find import find_series
from tumorseg.dicom.series import DicomSeries, SeriesInfo
from tumorseg.dicom.stack import IN_PLANE_TOLERANCE_MM
from tumorseg.dicom.volume import read_series
from tumorseg.dicom.study import inputs_report, read_dicom_study
from tumorseg.itk import resample_to_grid
from tumorseg.errors import ConfigError, GeometryError, InputError, SequenceError

from conftest import run_tool, shared_data

POSITIONS = ("HFS", "HFP", "HFDL", "HFDR")
CANARY_NAME = "CANARY^PATIENT"
CANARY_ID = "CANARYID4711"


def decubitus(position: str = "HFS") -> Path:
    return shared_data("dicom", "decubitus-t1", position)


def copy_series(src: Path, dst: Path, edit=None, new_uids: bool = False, description: str | None = None,
                series_number: int | None = None, study_uid: str | None = None) -> list[Path]:
    """Copy a series file by file, optionally with new Series/SOP UIDs, into another study, and
    with edited headers.

    ``edit(ds, index)`` may change a dataset; it returns False to leave the file out.
    """
    dst.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    written = []
    for index, path in enumerate(sorted(src.iterdir())):
        ds = pydicom.dcmread(path)
        if new_uids:
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if description is not None:
            ds.SeriesDescription = description
            ds.ProtocolName = description
        if series_number is not None:
            ds.SeriesNumber = series_number
        if study_uid is not None:
            ds.StudyInstanceUID = study_uid
        if edit is not None and edit(ds, index) is False:
            continue
        out = dst / f"IM{index:04d}"
        ds.save_as(out, enforce_file_format=True)
        written.append(out)
    return written


def files_by_position(folder: Path) -> list[Path]:
    """The folder's files sorted along the slice normal."""
    items = []
    for p in folder.iterdir():
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:])
        items.append((float(np.array([float(v) for v in ds.ImagePositionPatient]) @ normal), p))
    return [p for _, p in sorted(items)]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------------------------
# Geometry against the reference converter
# --------------------------------------------------------------------------------------------


def reorient_like(array: np.ndarray, affine: np.ndarray, target_affine: np.ndarray):
    """``array``/``affine`` with their voxel axes permuted and flipped to match ``target_affine``'s
    orientation (same world coordinates for every voxel)."""
    transform = ornt_transform(io_orientation(affine), io_orientation(target_affine))
    return apply_orientation(array, transform), affine @ inv_ornt_aff(transform, array.shape)


def dcm2niix_reference(folder: Path, tmp_path: Path) -> nib.Nifti1Image:
    """The reference converter's NIfTI of the series in ``folder`` (skips where dcm2niix is missing)."""
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix is not installed (apt-get install dcm2niix; CI installs it)")
    subprocess.run(["dcm2niix", "-z", "y", "-f", "out", "-o", str(tmp_path), str(folder)],
                   check=True, capture_output=True, timeout=60)
    return nib.load(str(tmp_path / "out.nii.gz"))


@pytest.mark.parametrize("position", POSITIONS)
def test_affine_and_voxels_match_dcm2niix(position, tmp_path):
    folder = decubitus(position)
    reference = dcm2niix_reference(folder, tmp_path)
    volume, series = read_series(find_series(folder)[0])

    assert volume.array.dtype == np.float32 and volume.array.shape == (256, 256, 35)
    assert series.shape == volume.array.shape and len(series.sop_instance_uids) == 35
    array, affine = reorient_like(volume.array, volume.affine, reference.affine)
    assert array.shape == reference.shape
    # dcm2niix stores its affine as float32: 1e-3 mm is well above that rounding.
    assert np.abs(affine - reference.affine).max() < 1e-3, (affine, reference.affine)
    np.testing.assert_array_equal(array, reference.get_fdata(dtype=np.float32))


def test_affine_follows_dicom_definition():
    volume, series = read_series(decubitus("HFS"))
    first = pydicom.dcmread(series.paths[0], stop_before_pixels=True)
    last = pydicom.dcmread(series.paths[-1], stop_before_pixels=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    np.testing.assert_allclose(lps[:3, 3], [float(v) for v in first.ImagePositionPatient], atol=1e-6)
    np.testing.assert_allclose(lps @ [0, 0, 34, 1], [*map(float, last.ImagePositionPatient), 1], atol=1e-4)
    # Voxel (i, j) of a slice is pixel_array[j, i].
    np.testing.assert_array_equal(volume.array[:, :, 0], pydicom.dcmread(series.paths[0]).pixel_array.T)
    z = np.array(series.positions) @ series.normal
    assert np.all(np.diff(z) > 0)


def test_files_without_preamble_read_as_with_it(tmp_path):
    """Old exporters write the data set without the 128-byte preamble and file meta."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in sorted(decubitus("HFS").iterdir()):
        ds = pydicom.dcmread(path)
        ds.preamble = None
        del ds.file_meta
        ds.save_as(bare / path.name, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert not (bare / path.name).read_bytes()[128:132] == b"DICM"
    (found,) = find_series(bare)
    volume, series = read_series(found)
    reference, _ = read_series(decubitus("HFS"))
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-9)
    assert len(series.read_headers()) == 35
    # The file meta without the preamble before it (the file starts with group 0002), on the last
    # slice, where a file skipped as "not DICOM" would leave a shorter volume and no error.
    copy_series(decubitus("HFS"), tmp_path / "meta-first")
    last = files_by_position(tmp_path / "meta-first")[-1]
    ds = pydicom.dcmread(last)
    ds.preamble = None
    ds.save_as(last, enforce_file_format=False)
    assert last.read_bytes()[:2] == b"\x02\x00"
    volume, _ = read_series(tmp_path / "meta-first")
    np.testing.assert_array_equal(volume.array, reference.array)


def test_oblique_cosines_stored_to_four_decimals_are_read(tmp_path):
    """Direction cosines rounded to 4 decimals are not unit length; the slices still lie on
    their normal (no false gantry tilt) and the affine's slice axis reaches the last slice."""
    axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    angle = np.radians(23)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross

    def oblique(ds, index):
        iop = np.array([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3) @ rotation.T
        ds.ImageOrientationPatient = [f"{v:.4f}" for v in iop.ravel()]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in rotation @ [float(v) for v in ds.ImagePositionPatient]]
    files = copy_series(decubitus("HFS"), tmp_path / "oblique", edit=oblique)
    stored = np.array([float(v) for v in pydicom.dcmread(files[0]).ImageOrientationPatient])
    assert abs(np.linalg.norm(stored[:3]) - 1) + abs(np.linalg.norm(stored[3:]) - 1) > 2e-5
    volume, series = read_series(tmp_path / "oblique")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    np.testing.assert_allclose(lps[:3, :3].T @ lps[:3, :3], np.diag(np.diag(lps[:3, :3].T @ lps[:3, :3])),
                               atol=1e-3)
    last = [float(v) for v in pydicom.dcmread(series.paths[-1], stop_before_pixels=True).ImagePositionPatient]
    np.testing.assert_allclose(lps @ [0, 0, len(series.paths) - 1, 1], [*last, 1], atol=IN_PLANE_TOLERANCE_MM)


# --------------------------------------------------------------------------------------------
# Bad input: each a named error, nothing written
# --------------------------------------------------------------------------------------------


def test_missing_slice_is_refused(tmp_path):
    folder = tmp_path / "series"
    shutil.copytree(decubitus("HFS"), folder)
    missing = files_by_position(folder)[17]
    missing.unlink()
    before = listing(tmp_path)
    with pytest.raises(GeometryError, match="missing slice") as err:
        read_series(folder)
    assert "1 slice missing" in str(err.value) and str(folder) in str(err.value)
    assert listing(tmp_path) == before


def test_duplicated_slice_is_refused(tmp_path):
    folder = tmp_path / "series"
    shutil.copytree(decubitus("HFS"), folder)
    ds = pydicom.dcmread(files_by_position(folder)[10])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(folder / "extra-copy.dcm")
    before = listing(tmp_path)
    with pytest.raises(GeometryError, match="duplicated slice.*1 of 35 positions hold more than one"):
        read_series(folder)
    assert listing(tmp_path) == before


def test_repeated_volumes_are_called_a_time_series_not_a_duplicate(tmp_path):
    """GE fMRI, diffusion with private b-values, Philips ASL: whole volumes repeated at the same
    positions, differing in no attribute the reader knows. Not "remove the extra file"."""
    folder = tmp_path / "series"
    copy_series(decubitus("HFS"), folder)
    for t in (2, 3):
        copy_series(decubitus("HFS"), tmp_path / f"t{t}", edit=lambda ds, i: setattr(ds, "SOPInstanceUID", generate_uid()))
        for p in (tmp_path / f"t{t}").iterdir():
            p.rename(folder / f"{t}-{p.name}")
    with pytest.raises(GeometryError, match="3 images at each of its 35 positions: a series of repeated "
                                            "volumes") as err:
        read_series(folder)
    assert "duplicated" not in str(err.value) and "remove" not in str(err.value)


def test_mosaic_is_called_a_mosaic(tmp_path):
    """A Siemens mosaic holds a whole volume in one image (not "a single slice"); a UIH diffusion
    mosaic has no ImagePositionPatient of its own (not "lacks ImagePositionPatient")."""
    siemens = tmp_path / "siemens"

    def mosaic(ds, index):
        if index:
            return False
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
        ds.Manufacturer = "SIEMENS"
        ds.add_new((0x0019, 0x0010), "LO", "SIEMENS CSA HEADER")
        ds.add_new((0x0019, 0x100A), "US", 36)
    copy_series(decubitus("HFS"), siemens, edit=mosaic)
    with pytest.raises(GeometryError, match="is a mosaic: each image tiles a whole volume of 36 slices"):
        read_series(siemens)

    uih = tmp_path / "uih"

    def uih_dti(ds, index):
        ds.Manufacturer = "UIH"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "MOSAIC"]
        del ds.ImagePositionPatient
    copy_series(decubitus("HFS"), uih, edit=uih_dti)
    with pytest.raises(GeometryError, match="is a mosaic") as err:
        read_series(uih)
    assert "lacks" not in str(err.value)


def test_same_instance_twice_is_one_image(tmp_path, caplog):
    folder = tmp_path / "series"
    shutil.copytree(decubitus("HFS"), folder)
    shutil.copy(files_by_position(folder)[3], folder / "CANARY_PATIENT.MR.0004.dcm")
    caplog.set_level(logging.INFO)
    volume, series = read_series(folder)
    assert volume.array.shape == (256, 256, 35)
    # The warning counts the copies: exporters put patient names in file names.
    assert "skipped 1 file(s) holding another copy" in caplog.text and "CANARY" not in caplog.text


@pytest.mark.parametrize("keyword, value", [("EchoNumbers", 2), ("ImageType", ["ORIGINAL", "PRIMARY", "P", "ND"])],
                         ids=["multi-echo", "magnitude-and-phase"])
def test_four_d_series_is_refused(tmp_path, keyword, value):
    folder = tmp_path / "series"
    copy_series(decubitus("HFS"), folder)

    def second_image(ds, index):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        setattr(ds, keyword, value)
    copy_series(folder, tmp_path / "second", edit=second_image)
    for p in (tmp_path / "second").iterdir():
        p.rename(folder / f"2-{p.name}")
    with pytest.raises(GeometryError, match=rf"4D series.*{keyword}"):
        read_series(folder)


def test_multiframe_is_refused(tmp_path):
    folder = tmp_path / "series"
    copy_series(decubitus("HFS"), folder, edit=lambda ds, i: setattr(ds, "NumberOfFrames", 2) if i == 0 else None)
    with pytest.raises(GeometryError, match="multi-frame image"):
        read_series(folder)


def test_two_flair_candidates_are_ambiguous(tmp_path, caplog):
    for n, number in enumerate((7, 8)):
        copy_series(decubitus("HFS"), tmp_path / f"s{n}", new_uids=True, description="FLAIR",
                    series_number=number)
    series = find_series(tmp_path)
    assert len(series) == 2
    with pytest.raises(SequenceError, match="2 candidate series for flair") as err:
        select_series(series)
    assert "series 7 'FLAIR'" in str(err.value) and "series 8 'FLAIR'" in str(err.value)
    with pytest.raises(SequenceError):
        read_dicom_study(tmp_path)
    # Naming one resolves it, by SeriesNumber or by UID.
    assert select_series(series, explicit={"flair": 8})["flair"].series_number == 8
    assert select_series(series, explicit={"flair": series[0].series_uid})["flair"] is series[0]
    # Not wanted: logged, not an error.
    assert select_series(series, sequences=("t1gd",)) == {}


def test_truncated_file_is_refused(tmp_path):
    folder = tmp_path / "series"
    shutil.copytree(decubitus("HFS"), folder)
    victim = files_by_position(folder)[20]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    before = listing(tmp_path)
    with pytest.raises(InputError, match="truncated") as err:
        find_series(folder)
    assert victim.name in str(err.value)
    assert listing(tmp_path) == before


def test_truncated_pixel_data_is_refused(tmp_path):
    folder = tmp_path / "series"
    shutil.copytree(decubitus("HFS"), folder)
    victim = files_by_position(folder)[34]
    data = victim.read_bytes()
    victim.write_bytes(data[:-5000])
    with pytest.raises(InputError, match=r"truncated pixel data: \d+ of 131072 bytes") as err:
        read_series(folder)
    assert victim.name in str(err.value)


def test_non_image_objects_and_other_files_are_ignored(tmp_path, caplog):
    folder = tmp_path / "series"
    shutil.copytree(decubitus("HFS"), folder)
    # Planning-system exports name files after the patient: the name stays out of the log.
    shutil.copy(shared_data("dicom", "rt-utils-mock", "rt.dcm"), folder / f"RS.{CANARY_ID}.dcm")
    (folder / "README.txt").write_text("not DICOM")
    (folder / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    with caplog.at_level(logging.INFO, logger="tumorseg"):
        series = find_series(tmp_path)
    assert len(series) == 1 and len(series[0].paths) == 35
    assert "RT Structure Set Storage" in caplog.text
    assert CANARY_ID not in caplog.text
    volume, dicom = read_series(series[0])
    assert volume.array.shape == (256, 256, 35)


def test_unsupported_transfer_syntax_is_refused(tmp_path):
    folder = tmp_path / "series"
    files = copy_series(decubitus("HFS"), folder)
    ds = pydicom.dcmread(files[5])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no decoder
    ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
    ds.save_as(files[5])
    with pytest.raises(InputError, match=r"transfer syntax MPEG2.*1\.2\.840\.10008\.1\.2\.4\.100"):
        read_series(folder)


def test_jpeg_lossless_series_reads_as_the_uncompressed_one(tmp_path):
    """JPEG Lossless, First-Order Prediction: what PACS archives most often hold (python-gdcm)."""
    folder = tmp_path / "jpeg-lossless"
    folder.mkdir()
    for path in sorted(decubitus("HFS").iterdir()):
        result = run_tool("dcmcjpeg", "+e1", str(path), str(folder / path.name))
        assert result.returncode == 0, result.stderr
    assert pydicom.dcmread(next(folder.iterdir())).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    volume, _ = read_series(folder)
    reference, _ = read_series(decubitus("HFS"))
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-9)


def test_gantry_tilt_is_refused(tmp_path):
    folder = tmp_path / "tilted"

    def shear(ds, index):
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        normal = np.cross(iop[:3], iop[3:])
        # Shift along the column direction by tan(10 degrees) x the distance along the normal.
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp + np.tan(np.radians(10)) * (ipp @ normal) * iop[3:]]
    copy_series(decubitus("HFS"), folder, edit=shear)
    with pytest.raises(GeometryError, match=r"not stacked along its slice normal.*10\.00 degrees"):
        read_series(folder)


def test_mixed_orientations_are_refused(tmp_path):
    folder = tmp_path / "mixed"

    def rotate(ds, index):
        if index == 12:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    copy_series(decubitus("HFS"), folder, edit=rotate)
    with pytest.raises(GeometryError, match="mixed orientations"):
        read_series(folder)


def test_non_uniform_spacing_is_refused(tmp_path):
    folder = tmp_path / "uneven"
    target = files_by_position(decubitus("HFS"))[20].name
    src = decubitus("HFS")
    names = sorted(p.name for p in src.iterdir())

    def nudge(ds, index):
        if names[index] == target:
            ipp = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [ipp[0] + 1.0, ipp[1], ipp[2]]  # x is the slice normal here
    copy_series(src, folder, edit=nudge)
    with pytest.raises(GeometryError, match="non-uniform slice spacing"):
        read_series(folder)


# --------------------------------------------------------------------------------------------
# Values, metadata, privacy
# --------------------------------------------------------------------------------------------


def test_rescale_is_applied(tmp_path):
    folder = tmp_path / "scaled"

    def scale(ds, index):
        ds.RescaleSlope = "2.5"
        ds.RescaleIntercept = "-10"
    copy_series(decubitus("HFS"), folder, edit=scale)
    raw, _ = read_series(decubitus("HFS"))
    scaled, _ = read_series(folder)
    np.testing.assert_allclose(scaled.array, raw.array * 2.5 - 10, rtol=0, atol=1e-4)


def test_series_metadata_for_the_writers():
    volume, series = read_series(decubitus("HFDL"))
    first = pydicom.dcmread(series.paths[0], stop_before_pixels=True)
    assert isinstance(series, DicomSeries)
    assert series.sop_instance_uids[0] == first.SOPInstanceUID
    assert series.series_uid == first.SeriesInstanceUID
    assert series.frame_of_reference_uid == first.FrameOfReferenceUID
    assert series.study_uid == first.StudyInstanceUID
    assert series.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4"
    assert series.patient.patient_id == str(first.PatientID)
    assert series.patient.as_keywords()["PatientName"] == str(first.PatientName)
    assert series.orientation == (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    assert series.pixel_spacing == (1.015625, 1.015625)
    assert series.slice_step == pytest.approx(4.8, abs=1e-6)
    np.testing.assert_allclose(series.affine, volume.affine)
    headers = series.read_headers()
    assert [h.SOPInstanceUID for h in headers] == list(series.sop_instance_uids)
    assert str(first.PatientID) not in repr(series)


def test_no_patient_identifiers_in_logs_or_messages(tmp_path, caplog):
    def canary(ds, index):
        ds.PatientName = CANARY_NAME
        ds.PatientID = CANARY_ID
    for n, number in enumerate((5, 6)):
        copy_series(decubitus("HFS"), tmp_path / f"s{n}", edit=canary, new_uids=True,
                    description="t2_tirm_tra_dark-fluid", series_number=number)
    messages = []
    with caplog.at_level(logging.DEBUG):
        series = find_series(tmp_path)
        with pytest.raises(SequenceError) as err:
            read_dicom_study(tmp_path)
        messages.append(str(err.value))
        scan = read_dicom_study(tmp_path, explicit={"flair": 5})
        messages += [repr(series), repr(scan.meta), str(scan.meta["dicom_series"])]
    assert scan.meta["dicom_series"].patient.patient_name == CANARY_NAME  # kept for the writers
    text = caplog.text + "\n".join(messages)
    assert caplog.records, "expected log lines"
    for canary_value in (CANARY_NAME, CANARY_ID, "CANARY"):
        assert canary_value not in text


def test_the_searched_folder_is_not_logged_at_info(tmp_path, caplog):
    # Exported studies sit in folders named after the patient.
    folder = tmp_path / "DOE_JOHN_1234567"
    copy_series(decubitus("HFS"), folder / "s1")
    with caplog.at_level(logging.INFO):
        assert len(find_series(folder)) == 1
    assert caplog.records and "DOE_JOHN" not in caplog.text


# --------------------------------------------------------------------------------------------
# Selection rules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("description, expected", [
    ("t1_fl2d_sag", "t1"), ("T1 POST GD", "t1gd"), ("T1+C", "t1gd"), ("sag T1 C+", "t1gd"),
    ("t1_mprage_sag_ce", "t1gd"), ("T1 pre", "t1"), ("t2_tirm_tra_dark-fluid", "flair"),
    ("T2_FLAIR", "flair"), ("T1 FLAIR", "t1"), ("t2_tse_tra", "t2"), ("T2*", None),
    ("localizer", None), ("AAHead_Scout", None), ("ep2d_diff_mddw", None), ("ADC", None),
    ("perfusion_dsc", None), ("t2_swi_tra", None),
])
def test_classification_by_description(description, expected):
    info = _info(description)
    assert classify_series(info)[0] == expected


@pytest.mark.parametrize("description, expected", [
    # Said without contrast: the contrast word must not win.
    ("T1 pre-contrast", "t1"), ("T1 no contrast", "t1"), ("T1 without contrast", "t1"), ("T1 PRE GAD", "t1"),
    ("T1 ohne KM", "t1"), ("T1 before contrast", "t1"), ("T1 post op", "t1"),
    # Post-contrast spellings.
    ("T1 postgad", "t1gd"), ("T1POSTGD", "t1gd"), ("T1 W/C", "t1gd"),
    # Not an anatomical T1/T2 series.
    ("T2 star", None), ("T2 SWAN", None), ("T2 MAP", None), ("T1 mapping", None), ("T2 FIESTA", None),
    ("T1C-T1 SUB", None), ("T1 dynamic", None),
])
def test_classification_of_misreadable_descriptions(description, expected):
    assert classify_series(_info(description))[0] == expected


def test_description_and_protocol_that_disagree_are_no_candidate():
    assert classify_series(_info("T1", protocol_name="t2_tse"))[0] is None
    assert classify_series(_info("T1 pre", protocol_name="t1_post_gd"))[0] is None
    assert classify_series(_info("AX T1", protocol_name="t1_se_tra"))[0] == "t1"
    assert classify_series(_info("T1 NC", contrast_agent="Gadovist"))[0] == "t1"
    assert classify_series(_info("t1_se", image_type=("ORIGINAL", "PRIMARY", "SUBTRACT")))[0] is None


def test_contrast_agent_tag_and_image_type():
    assert classify_series(_info("t1_se_tra", contrast_agent="Gadovist"))[0] == "t1gd"
    assert classify_series(_info("t1_se_tra_pre", contrast_agent="Gadovist"))[0] == "t1"
    assert classify_series(_info("t1_se_tra", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))[0] is None
    assert classify_series(_info("t1_mpr_tra", image_type=("DERIVED", "SECONDARY", "MPR")))[0] is None
    assert classify_series(_info("t1_se_tra", modality="CT"))[0] is None


def test_rules_are_data():
    rules = SelectionRules.from_mapping({"rules": [{"sequence": "flair", "include": ["^my-flair"]}]})
    assert classify_series(_info("my-flair-protocol"), rules)[0] == "flair"
    assert classify_series(_info("t1_se"), rules)[0] is None
    with pytest.raises(ConfigError):
        SelectionRules.from_mapping({"rules": [{"sequence": "flair", "include": ["("]}]})
    with pytest.raises(ConfigError):
        SelectionRules.from_mapping({"colour": "red"})
    assert DEFAULT_RULES.skip_derived


def _info(description: str, **changes) -> SeriesInfo:
    from tumorseg.dicom.series import PatientStudy

    base = SeriesInfo(series_uid="1.2.3", study_uid="1.2", frame_of_reference_uid="1.2.4",
                      sop_class_uid="1.2.840.10008.5.1.4.1.1.4", modality="MR", series_number=1,
                      series_description=description, protocol_name=description,
                      image_type=("ORIGINAL", "PRIMARY", "M"), contrast_agent="", sequence_name="",
                      paths=(Path("x"),), patient=PatientStudy(*[""] * 9))
    return replace(base, **changes)


# --------------------------------------------------------------------------------------------
# Several series onto one grid
# --------------------------------------------------------------------------------------------


def test_sequences_resampled_onto_reference_grid(tmp_path):
    copy_series(decubitus("HFS"), tmp_path / "t1gd", new_uids=True, description="T1 POST GD",
                series_number=10)
    # FLAIR: every other slice of the same series (9.6 mm spacing), same frame of reference.
    keep = {p.name for p in files_by_position(decubitus("HFS"))[::2]}
    names = sorted(p.name for p in decubitus("HFS").iterdir())
    copy_series(decubitus("HFS"), tmp_path / "flair", new_uids=True, description="FLAIR",
                series_number=11, edit=lambda ds, i: names[i] in keep)
    scan = read_dicom_study(tmp_path, registration="none")  # by scanner coordinates: exact where slices coincide
    assert scan.channels == ("flair", "t1gd")
    assert scan.meta["reference_sequence"] == "t1gd"
    assert [r.method for r in scan.meta["registration"]] == ["reference", "scanner coordinates"]
    reference = scan.meta["dicom_series"]
    assert reference.series_number == 10 and scan.source.shape == (256, 256, 35)
    np.testing.assert_allclose(scan.source.affine, reference.affine)
    t1gd, _ = read_series(find_series(tmp_path / "t1gd")[0])
    np.testing.assert_array_equal(scan.array[1], t1gd.array)
    # FLAIR slices coincide with every other T1gd slice: interpolation there returns them exactly.
    np.testing.assert_allclose(scan.array[0][:, :, ::2], t1gd.array[:, :, ::2], atol=1e-3)
    assert set(scan.meta["dicom_series_by_sequence"]) == {"flair", "t1gd"}
    report = inputs_report(scan)
    assert report["t1gd"]["reference_grid"] and not report["flair"]["reference_grid"]
    assert report["flair"]["shape"] == [256, 256, 18] and len(report["flair"]["sha256"]) == 64


def test_a_series_on_another_grid_is_registered_not_placed_by_scanner_coordinates(tmp_path):
    """The same head, FLAIR every other slice of the T1gd series: registered (auto), it lands within
    a fraction of a degree and a millimetre of where the scanner put it."""
    copy_series(decubitus("HFS"), tmp_path / "t1gd", new_uids=True, description="T1 POST GD", series_number=10)
    keep = {p.name for p in files_by_position(decubitus("HFS"))[::2]}
    names = sorted(p.name for p in decubitus("HFS").iterdir())
    copy_series(decubitus("HFS"), tmp_path / "flair", new_uids=True, description="FLAIR",
                series_number=11, edit=lambda ds, i: names[i] in keep)
    scan = read_dicom_study(tmp_path)
    reference, flair = scan.meta["registration"]
    assert reference.method == "reference" and flair.method == "rigid"
    centre = scan.source.affine @ np.append((np.array(scan.source.shape) - 1) / 2, 1)
    assert flair.rotation_deg < 0.5 and np.linalg.norm(flair.translation_mm(centre[:3])) < 0.5


def test_different_frames_of_reference_are_registered_or_refused(tmp_path):
    """Another Frame of Reference (the same volunteer scanned prone, in the same study): its scanner
    coordinates mean nothing beside the reference's, so it is registered, or with --registration
    none refused."""
    study = generate_uid()
    copy_series(decubitus("HFS"), tmp_path / "a", new_uids=True, description="T1 POST GD", study_uid=study)
    copy_series(decubitus("HFP"), tmp_path / "b", new_uids=True, description="FLAIR", study_uid=study)
    with pytest.raises(GeometryError, match="different Frame of Reference"):
        read_dicom_study(tmp_path, registration="none")
    scan = read_dicom_study(tmp_path)
    flair = scan.meta["registration"][1]
    assert flair.method == "rigid" and flair.rotation_deg > 2  # the head lay otherwise in the coil


def test_series_of_two_studies_are_combined_only_when_named(tmp_path):
    """Two visits of one patient in one folder (a PACS export of the patient): the tumour changes
    between them, so their series are not combined unless the user names each one."""
    copy_series(decubitus("HFS"), tmp_path / "2021", new_uids=True, description="T1 POST GD", series_number=5)
    copy_series(decubitus("HFS"), tmp_path / "2024", new_uids=True, description="T2 FLAIR", series_number=3,
                study_uid=generate_uid())
    with pytest.raises(SequenceError, match=r"2 different studies \(visits\).*series 3.*\(flair\).*name each series"):
        read_dicom_study(tmp_path)
    with pytest.raises(SequenceError, match="2 different studies"):
        read_dicom_study(tmp_path, explicit={"flair": 3})  # one named, the other chosen
    scan = read_dicom_study(tmp_path, explicit={"flair": 3, "t1gd": 5})
    assert scan.channels == ("flair", "t1gd")
    # A study whose other series the model does not read is one study.
    scan = read_dicom_study(tmp_path, use=lambda found: ("t1gd",))
    assert scan.channels == ("t1gd",)


def test_series_the_model_will_not_use_are_not_read(tmp_path):
    """A model card's preferred sets choose before pixel data is read: a T2 series in another frame of
    reference would fail the study if it were read, and the reference grid comes from what is used."""
    copy_series(decubitus("HFS"), tmp_path / "t1gd", new_uids=True, description="T1 POST GD", series_number=10)
    copy_series(decubitus("HFS"), tmp_path / "flair", new_uids=True, description="FLAIR", series_number=11)
    study = pydicom.dcmread(next((tmp_path / "t1gd").iterdir()), stop_before_pixels=True).StudyInstanceUID
    copy_series(decubitus("HFP"), tmp_path / "t2", new_uids=True, description="T2 TSE", series_number=12,
                study_uid=study)
    with pytest.raises(GeometryError, match="different Frame of Reference"):
        read_dicom_study(tmp_path, registration="none")
    offered = []

    def flair_and_t1gd(found):
        offered.append(found)
        return tuple(s for s in found if s in ("flair", "t1gd"))

    scan = read_dicom_study(tmp_path, use=flair_and_t1gd, registration="none")
    assert offered == [("flair", "t1gd", "t2")]
    assert scan.channels == ("flair", "t1gd") and scan.meta["unread_sequences"] == ("t2",)
    assert set(inputs_report(scan)) == {"flair", "t1gd"}
    # The reference (T1gd: the planning series) is read for its grid even where the model uses
    # FLAIR alone; the pipeline then leaves it out of the network's input.
    scan = read_dicom_study(tmp_path, use=lambda found: ("flair",), registration="none")
    assert scan.channels == ("flair", "t1gd") and scan.meta["reference_sequence"] == "t1gd"
    assert scan.meta["dicom_series"].series_number == 10
    assert scan.meta["unread_sequences"] == ("t2",)
    scan = read_dicom_study(tmp_path, use=lambda found: ("flair",), reference="flair", registration="none")
    assert scan.channels == ("flair",) and scan.meta["dicom_series"].series_number == 11
    assert scan.meta["unread_sequences"] == ("t1gd", "t2")


def test_several_candidates_for_a_sequence_that_is_not_read_stop_nothing(tmp_path):
    """A clinical study often holds three T1-like series; with a model that uses FLAIR and T1gd
    alone, that ambiguity must not refuse the study (it did), while for a sequence that is read it
    still does."""
    for n, description in enumerate(("T1 POST GD", "FLAIR", "T1 SE", "T1 MPRAGE")):
        copy_series(decubitus("HFS"), tmp_path / f"s{n}", new_uids=True, description=description,
                    series_number=10 + n)
    with pytest.raises(SequenceError, match="2 candidate series for t1"):
        read_dicom_study(tmp_path, registration="none")
    scan = read_dicom_study(tmp_path, registration="none",
                            use=lambda found: tuple(s for s in found if s in ("flair", "t1gd")))
    assert scan.channels == ("flair", "t1gd") and scan.meta["unread_sequences"] == ("t1",)
    # The T1 as the reference would be read: refused.
    with pytest.raises(SequenceError, match="2 candidate series for t1"):
        read_dicom_study(tmp_path, registration="none", reference="t1",
                         use=lambda found: tuple(s for s in found if s in ("flair", "t1gd")))


def test_predict_on_dicom_reports_the_series_left_unread(tmp_path):
    from click.testing import CliRunner

    from conftest import make_tiny_model
    from tumorseg.cli import main

    # It finds nothing (background bias): a random model's speckle would make a slow RTSTRUCT.
    model = make_tiny_model(tmp_path / "model", preferred_sets=(("flair", "t1gd"),), background_bias=50.0,
                            spacing=(3.0, 3.0, 3.0))
    study = tmp_path / "study"
    copy_series(decubitus("HFS"), study / "t1gd", new_uids=True, description="T1 POST GD", series_number=10)
    copy_series(decubitus("HFS"), study / "flair", new_uids=True, description="FLAIR", series_number=11)
    copy_series(decubitus("HFP"), study / "t2", new_uids=True, description="T2 TSE", series_number=12)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", str(study), "--model", str(model), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["sequences_used"] == ["flair", "t1gd"] and report["sequences_ignored"] == ["t2"]
    assert set(report["inputs"]) == {"flair", "t1gd"}


def test_resample_identity_and_shift():
    rng = np.random.default_rng(0)
    array = rng.normal(size=(8, 9, 10)).astype(np.float32)
    affine = np.array([[0, 0, 2.0, -5], [-1.5, 0, 0, 3], [0, -1.0, 0, 7], [0, 0, 0, 1]])
    same, covered = resample_to_grid(array, affine, array.shape, affine)
    np.testing.assert_allclose(same, array, atol=1e-5)
    assert covered == 1.0
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 0]  # one voxel along i
    out, covered = resample_to_grid(array, affine, array.shape, shifted)
    np.testing.assert_allclose(out[:-1], array[1:], atol=1e-5)
    assert covered == pytest.approx(7 / 8)
