"""RTSTRUCT writer: conformance (dciodvfy, dcentvfy), geometry and round trips on real MR series.

The four decubitus series are the same head in four patient positions (2D sagittal T1, 35 slices
of 256x256). A label map with a compact structure, a ring with a hole and an asymmetric block is
written for each and read back twice: with rt-utils' reader (an independent library, Dice and
centroids), and with an exact even-odd rasteriser of pixel centres written here, which must give
back the identical mask.

Axis convention of our label maps: ``labels[i, j, k]``, i = column, j = row, k = slice index in
ascending order of ImagePositionPatient projected on the normal row x column. rt-utils sorts its
slices the same way (``image_helper.get_slice_position``) but returns masks indexed
``[row, column, slice]``; ``_from_rt_utils`` transposes them.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from conftest import dicom3tools_findings, run_tool, shared_data
from tumorseg.dicom.rtstruct import (
    REGION_NAMES,
    format_ds,
    trace_slice,
    write_rtstruct,
)
from tumorseg.dicom.source import sort_source_series
from tumorseg.errors import ConfigError, GeometryError, InputError
from tumorseg.labels import get_scheme

POSITIONS = ("HFS", "HFP", "HFDL", "HFDR")
MSD = get_scheme("msd")
# Label values of the test map (MSD scheme): 1 compact ellipsoid, 2 asymmetric block, 3 ring.
COMPACT, ASYMMETRIC, RING = 1, 2, 3


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def series_dir(position: str) -> Path:
    return shared_data("dicom", "decubitus-t1", position)


def read_source(folder: Path) -> list[Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.glob("*.dcm"))]


def ring_geometry(shape):
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    radius = np.hypot(i - 165, j - 150)
    return radius, list(range(18, 23))


def make_label_map(shape) -> np.ndarray:
    """A compact ellipsoid (>= 1 mL), a ring with a 10-voxel-radius hole, an asymmetric block."""
    labels = np.zeros(shape, dtype=np.uint8)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    labels[((i - 90) / 18.0) ** 2 + ((j - 110) / 14.0) ** 2 + ((k - 12) / 3.5) ** 2 <= 1] = COMPACT
    radius, ring_slices = ring_geometry(shape)
    for kk in ring_slices:
        labels[:, :, kk][(radius > 10) & (radius <= 24)] = RING
    # An L-shaped block whose arms grow with k: asymmetric along every axis.
    for n, kk in enumerate(range(4, 9)):
        labels[40:80 + 3 * n, 190:205, kk] = ASYMMETRIC
        labels[40:52, 160:190 - 2 * n, kk] = ASYMMETRIC
    return labels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def roi_number(ds: Dataset, name: str) -> int:
    return next(int(r.ROINumber) for r in ds.StructureSetROISequence if r.ROIName == name)


def contours_of(ds: Dataset, number: int) -> list[Dataset]:
    item = next(c for c in ds.ROIContourSequence if int(c.ReferencedROINumber) == number)
    return list(item.get("ContourSequence", []))


def even_odd_mask(ds: Dataset, name: str, source: list[Dataset]) -> np.ndarray:
    """Rasterise an ROI the way planning systems do: a voxel is inside when its centre is inside
    an odd number of the ROI's contours on its slice. Slices are found from ContourImageSequence;
    the contour's own z must agree with that slice."""
    series = sort_source_series(source)
    k_of_uid = {s.SOPInstanceUID: k for k, s in enumerate(series.slices)}
    inverse = np.linalg.inv(series.affine_lps)
    mask = np.zeros(series.shape, dtype=bool)
    ii, jj = np.meshgrid(np.arange(series.shape[0]), np.arange(series.shape[1]), indexing="ij")
    for contour in contours_of(ds, roi_number(ds, name)):
        k = k_of_uid[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
        voxel = np.c_[points, np.ones(len(points))] @ inverse.T
        assert np.allclose(voxel[:, 2], k, atol=1e-3), "contour z is not on its referenced slice"
        mask[:, :, k] ^= _inside(voxel[:, 0], voxel[:, 1], ii, jj)
    return mask


def _inside(px: np.ndarray, py: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(zip(px, py), zip(np.roll(px, -1), np.roll(py, -1))):
        if y0 == y1:
            continue
        crosses = (y0 > y) != (y1 > y)
        inside ^= crosses & (x < x0 + (y - y0) * (x1 - x0) / (y1 - y0))
    return inside


def from_rt_utils(rt, name: str) -> np.ndarray:
    """rt-utils' mask [row, column, slice] as ours [i = column, j = row, k]."""
    return np.asarray(rt.get_roi_mask_by_name(name)).transpose(1, 0, 2)


# ------------------------------------------------------------------------------------------
# one RTSTRUCT per position, written once per module
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=POSITIONS)
def written(request, tmp_path_factory):
    folder = series_dir(request.param)
    source = read_source(folder)
    labels = make_label_map((256, 256, len(source)))
    out = tmp_path_factory.mktemp(f"rtstruct-{request.param}")
    summary = write_rtstruct(labels, MSD, source, out / "rtstruct.dcm",
                             algorithm_name="tiny-test", algorithm_version="0")
    return request.param, folder, source, labels, summary


def test_structures_are_big_enough(written):
    _, _, source, labels, _ = written
    voxel_ml = sort_source_series(source).voxel_volume_ml
    for value in (COMPACT, ASYMMETRIC, RING):
        assert (labels == value).sum() * voxel_ml >= 1.0


def test_dciodvfy_reports_no_errors(written):
    position, _, _, _, summary = written
    result = run_tool("dciodvfy", str(summary.path))
    errors, warnings = dicom3tools_findings(result)
    assert errors == [] and result.returncode == 0, "\n".join(errors)
    logging.getLogger(__name__).info("%s dciodvfy warnings: %s", position, warnings)


def test_dcentvfy_with_source_series_reports_no_errors(written):
    _, folder, _, _, summary = written
    result = run_tool("dcentvfy", str(summary.path), *map(str, sorted(folder.glob("*.dcm"))))
    errors, _ = dicom3tools_findings(result)
    assert errors == [] and result.returncode == 0, "\n".join(errors)


def test_rt_utils_reads_back_every_structure(written):
    rt_utils = pytest.importorskip("rt_utils")
    _, folder, _, labels, summary = written
    rt = rt_utils.RTStructBuilder.create_from(dicom_series_path=str(folder),
                                              rt_struct_path=str(summary.path))
    assert set(rt.get_roi_names()) == set(summary.roi_names)
    wanted = {label.name: (label.value,) for label in MSD.labels}
    wanted.update({REGION_NAMES[code]: values for code, values in MSD.regions.items()})
    for name, values in wanted.items():
        original = np.isin(labels, values)
        assert dice(from_rt_utils(rt, name), original) >= 0.95, name


def test_ring_hole_stays_empty_through_rt_utils(written):
    rt_utils = pytest.importorskip("rt_utils")
    _, folder, _, labels, summary = written
    rt = rt_utils.RTStructBuilder.create_from(dicom_series_path=str(folder),
                                              rt_struct_path=str(summary.path))
    ring = from_rt_utils(rt, "enhancing_tumour")
    radius, ring_slices = ring_geometry(labels.shape)
    for k in ring_slices:
        hole = radius <= 10
        # rt-utils rounds vertices to whole voxels and fills polygon borders, so it may take
        # the hole's one-voxel rim; the hole itself must stay open.
        assert not ring[:, :, k][radius <= 9].any(), f"hole filled on slice {k}"
        assert ring[:, :, k][hole].sum() <= 0.25 * hole.sum()
    assert dice(ring, labels == RING) >= 0.95


def test_asymmetric_structure_lands_on_the_same_voxels(written):
    """A flip, transposition or slice reversal would move the centroid by many voxels."""
    rt_utils = pytest.importorskip("rt_utils")
    _, folder, _, labels, summary = written
    rt = rt_utils.RTStructBuilder.create_from(dicom_series_path=str(folder),
                                              rt_struct_path=str(summary.path))
    back = from_rt_utils(rt, "non_enhancing_tumour")
    original = labels == ASYMMETRIC
    shift = np.argwhere(back).mean(axis=0) - np.argwhere(original).mean(axis=0)
    assert np.all(np.abs(shift) <= 0.5), shift
    assert dice(back, original) >= 0.95


def test_even_odd_rasterisation_gives_back_the_identical_mask(written):
    _, _, source, labels, summary = written
    ds = pydicom.dcmread(summary.path)
    for label in MSD.labels:
        assert np.array_equal(even_odd_mask(ds, label.name, source), labels == label.value), label.name
    for code, values in MSD.regions.items():
        assert np.array_equal(even_odd_mask(ds, REGION_NAMES[code], source), np.isin(labels, values))


def test_references_uids_and_attributes(written):
    _, _, source, _, summary = written
    ds = pydicom.dcmread(summary.path)
    src = source[0]
    series = sort_source_series(source)
    source_uids = {s.SOPInstanceUID for s in source}

    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.Modality == "RTSTRUCT"
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert (ds.PatientName, ds.PatientID) == (src.PatientName, src.PatientID)
    assert ds.SeriesInstanceUID not in (src.SeriesInstanceUID, "") and ds.SOPInstanceUID not in source_uids
    assert ds.Manufacturer == "tumorseg" and ds.StructureSetDate and ds.StructureSetTime

    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == src.FrameOfReferenceUID
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == src.StudyInstanceUID
    (ref_series,) = study.RTReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == src.SeriesInstanceUID
    assert {c.ReferencedSOPInstanceUID for c in ref_series.ContourImageSequence} == source_uids

    for roi in ds.StructureSetROISequence:
        assert roi.ReferencedFrameOfReferenceUID == src.FrameOfReferenceUID
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC" and "tiny-test" in roi.ROIGenerationDescription
    colours = {c.ReferencedROINumber: list(c.ROIDisplayColor) for c in ds.ROIContourSequence}
    for label in MSD.labels:
        assert colours[roi_number(ds, label.name)] == list(label.color)

    z_of_uid = {s.SOPInstanceUID: float(p @ series.normal) for s, p in zip(series.slices, series.positions)}
    for item in ds.ROIContourSequence:
        for contour in item.get("ContourSequence", []):
            (image,) = contour.ContourImageSequence
            assert image.ReferencedSOPInstanceUID in source_uids
            points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            assert int(contour.NumberOfContourPoints) == len(points) >= 3
            assert np.allclose(points @ series.normal, z_of_uid[image.ReferencedSOPInstanceUID], atol=1e-3)


def test_every_decimal_string_fits_16_characters(written):
    ds = pydicom.dcmread(written[4].path)
    checked = 0
    for element in ds.iterall():
        if element.VR == "DS" and element.value is not None:
            values = element.value if element.VM > 1 else [element.value]
            for value in values:
                text = getattr(value, "original_string", None) or str(value)
                assert len(text) <= 16, (element.keyword, text)
                checked += 1
    assert checked > 1000


def test_summary_counts_contours(written):
    _, _, _, labels, summary = written
    counts = summary.contour_counts
    assert not summary.empty and summary.empty_rois == []
    assert counts["enhancing_tumour"] == 2 * 5  # outer and hole contour on each of 5 slices
    by_name = {r.name: r for r in summary.rois}
    assert by_name["enhancing_tumour"].slices == 5
    assert by_name["edema"].voxels == int((labels == COMPACT).sum())


# ------------------------------------------------------------------------------------------
# empty masks, file names, logs
# ------------------------------------------------------------------------------------------


def test_empty_mask_writes_a_valid_rtstruct_without_contours(tmp_path):
    source = read_source(series_dir("HFS"))
    summary = write_rtstruct(np.zeros((256, 256, len(source)), np.uint8), MSD, source,
                             tmp_path / "empty.dcm", algorithm_name="tiny-test", algorithm_version="0")
    assert summary.empty and len(summary.rois) == 6
    assert summary.empty_rois == summary.roi_names
    ds = pydicom.dcmread(summary.path)
    assert len(ds.StructureSetROISequence) == len(ds.ROIContourSequence) == 6
    assert all("ContourSequence" not in item for item in ds.ROIContourSequence)
    errors, _ = dicom3tools_findings(result := run_tool("dciodvfy", str(summary.path)))
    assert errors == [] and result.returncode == 0, "\n".join(errors)


def test_invalid_values_in_the_source_are_not_repeated(tmp_path):
    """A console that writes a weight with a decimal comma, or a date as DD.MM.YY: the reader takes
    the series, the RTSTRUCT and the SEG leave those values out (Type 3) or empty (Type 2), and pass
    dciodvfy (the SEG writer stopped at the date)."""
    from tumorseg.dicom.seg import write_seg

    folder = tmp_path / "source"
    folder.mkdir()
    for path in sorted(series_dir("HFS").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientWeight, ds.StudyDate = "72.5", "20210102"
        ds.save_as(folder / path.name)
        data = (folder / path.name).read_bytes()
        (folder / path.name).write_bytes(data.replace(b"72.5", b"72,5", 1).replace(b"20210102", b"02.01.21", 1))
    source = read_source(folder)
    summary = write_rtstruct(make_label_map((256, 256, len(source))), MSD, source, tmp_path / "rs.dcm",
                             algorithm_name="tiny-test", algorithm_version="0")
    ds = pydicom.dcmread(summary.path)
    assert "PatientWeight" not in ds and ds.StudyDate == "" and ds.PatientName == source[0].PatientName
    errors, _ = dicom3tools_findings(result := run_tool("dciodvfy", str(summary.path)))
    assert errors == [] and result.returncode == 0, "\n".join(errors)
    seg = write_seg(make_label_map((256, 256, len(source))), MSD, source, tmp_path / "seg.dcm",
                    algorithm_name="tiny-test", algorithm_version="0")
    ds = pydicom.dcmread(seg)
    assert "PatientWeight" not in ds and ds.StudyDate == "" and source[0]["StudyDate"].value == "02.01.21"
    errors, _ = dicom3tools_findings(result := run_tool("dciodvfy", str(seg)))
    assert errors == [] and result.returncode == 0, "\n".join(errors)


def test_no_patient_identifier_in_file_name_or_log(tmp_path, caplog):
    source = [copy.deepcopy(ds) for ds in read_source(series_dir("HFP"))]
    for ds in source:
        ds.PatientName, ds.PatientID = "CANARY^SECRET", "CANARY-ID-77"
    labels = make_label_map((256, 256, len(source)))
    with caplog.at_level(logging.DEBUG, logger="tumorseg"):
        summary = write_rtstruct(labels, MSD, source, tmp_path, algorithm_name="tiny-test",
                                 algorithm_version="0")
    assert summary.path.parent == tmp_path and summary.path.name.startswith("RS.")
    assert [p.name for p in tmp_path.iterdir()] == [summary.path.name]
    assert "CANARY" not in summary.path.name and "CANARY" not in caplog.text
    assert pydicom.dcmread(summary.path).PatientName == "CANARY^SECRET"  # copied, as it must be


def test_roi_names_are_configurable_and_regions_optional(tmp_path):
    source = read_source(series_dir("HFDL"))
    labels = make_label_map((256, 256, len(source)))
    summary = write_rtstruct(labels, MSD, source, tmp_path / "rs.dcm", algorithm_name="m",
                             algorithm_version="1", roi_names={"edema": "Oedema", "enhancing_tumour": "GTV_enh"},
                             include_regions=False)
    assert summary.roi_names == ["Oedema", "non_enhancing_tumour", "GTV_enh"]
    with pytest.raises(ConfigError, match="WT"):
        write_rtstruct(labels, MSD, source, tmp_path / "bad.dcm", algorithm_name="m",
                       algorithm_version="1", roi_names={"WT": "x"}, include_regions=False)
    with pytest.raises(ConfigError, match="twice"):
        write_rtstruct(labels, MSD, source, tmp_path / "bad.dcm", algorithm_name="m",
                       algorithm_version="1", roi_names={"edema": "X", "enhancing_tumour": "X"})
    assert not (tmp_path / "bad.dcm").exists()


def test_slice_order_of_the_source_does_not_matter(tmp_path):
    source = read_source(series_dir("HFDR"))
    labels = make_label_map((256, 256, len(source)))
    a = write_rtstruct(labels, MSD, source, tmp_path / "a.dcm", algorithm_name="m", algorithm_version="1")
    b = write_rtstruct(labels, MSD, source[::-1], tmp_path / "b.dcm", algorithm_name="m", algorithm_version="1")
    data = [[list(c.ContourData) for item in pydicom.dcmread(s.path).ROIContourSequence
             for c in item.get("ContourSequence", [])] for s in (a, b)]
    assert data[0] == data[1]


# ------------------------------------------------------------------------------------------
# refusals (synthetic headers: no shared data needed)
# ------------------------------------------------------------------------------------------


def synthetic_series(n: int = 6, gap: float = 3.0, rows: int = 8, columns: int = 10) -> list[Dataset]:
    slices = []
    for k in range(n):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.SOPInstanceUID = f"1.2.3.4.{k + 1}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "1.2.3", "1.2.3.4", "1.2.3.5"
        ds.PatientName, ds.PatientID = "Test^Synthetic", "X"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-10.0, -20.0, 5.0 + gap * k]
        ds.PixelSpacing = [0.5, 0.7]
        ds.Rows, ds.Columns = rows, columns
        slices.append(ds)
    return slices


def test_refuses_a_label_map_of_the_wrong_shape(tmp_path):
    with pytest.raises(GeometryError, match=r"\(Columns, Rows, slices\) = \(10, 8, 6\)"):
        write_rtstruct(np.zeros((8, 10, 6), np.uint8), MSD, synthetic_series(), tmp_path / "x.dcm",
                       algorithm_name="m", algorithm_version="1")
    assert list(tmp_path.iterdir()) == []


def test_refuses_unknown_label_values(tmp_path):
    labels = np.zeros((10, 8, 6), np.uint8)
    labels[2, 2, 2] = 7
    with pytest.raises(InputError, match=r"\[7\]"):
        write_rtstruct(labels, MSD, synthetic_series(), tmp_path / "x.dcm", algorithm_name="m",
                       algorithm_version="1")


def test_refuses_a_missing_or_duplicated_slice():
    series = synthetic_series()
    with pytest.raises(GeometryError, match="not uniform"):
        sort_source_series(series[:2] + series[3:])
    duplicate = copy.deepcopy(series[2])
    duplicate.SOPInstanceUID = "1.2.3.4.99"
    with pytest.raises(GeometryError, match="same position"):
        sort_source_series(series + [duplicate])
    with pytest.raises(InputError, match="SOP Instance UID twice"):
        sort_source_series(series + [copy.deepcopy(series[0])])


def test_refuses_tilted_or_mixed_stacks():
    tilted = synthetic_series()
    for k, ds in enumerate(tilted):
        ds.ImagePositionPatient = [-10.0, -20.0 + 0.5 * k, 5.0 + 3.0 * k]
    with pytest.raises(GeometryError, match="gantry tilt"):
        sort_source_series(tilted)
    mixed = synthetic_series()
    mixed[3].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    with pytest.raises(GeometryError, match="ImageOrientationPatient"):
        sort_source_series(mixed)
    other = synthetic_series()
    other[1].SeriesInstanceUID = "9.9"
    with pytest.raises(InputError, match="SeriesInstanceUID"):
        sort_source_series(other)


def test_pixel_spacing_tolerance_is_the_readers():
    """A series the reader stacks (PixelSpacing within 1e-4 mm) is one the writer accepts."""
    close = synthetic_series()
    close[2].PixelSpacing = [0.50005, 0.7]
    assert sort_source_series(close).pixel_spacing == (0.5, 0.7)
    mixed = synthetic_series()
    mixed[2].PixelSpacing = [0.501, 0.7]
    with pytest.raises(GeometryError, match="PixelSpacing"):
        sort_source_series(mixed)


def test_non_ascii_roi_names_switch_to_utf8_and_keep_the_patient_name(tmp_path):
    source = synthetic_series()
    for ds in source:
        ds.SpecificCharacterSet, ds.PatientName = "ISO_IR 100", "Müller^Jörg"
    labels = np.zeros((10, 8, 6), np.uint8)
    labels[3:6, 2:5, 2:4] = 1
    summary = write_rtstruct(labels, MSD, source, tmp_path / "x.dcm", algorithm_name="m",
                             algorithm_version="1", roi_names={"edema": "Ödem"})
    ds = pydicom.dcmread(summary.path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert (ds.PatientName, ds.StructureSetROISequence[0].ROIName) == ("Müller^Jörg", "Ödem")


def test_synthetic_series_geometry_and_contour_coordinates(tmp_path):
    """One voxel at (i, j, k) = (3, 5, 4): a diamond around its centre, in LPS mm."""
    source = synthetic_series()[::-1]
    labels = np.zeros((10, 8, 6), np.uint8)
    labels[3, 5, 4] = 1
    summary = write_rtstruct(labels, MSD, source, tmp_path / "x.dcm", algorithm_name="m",
                             algorithm_version="1", include_regions=False)
    (contour,) = contours_of(pydicom.dcmread(summary.path), 1)
    points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
    centre = np.array([-10.0 + 3 * 0.7, -20.0 + 5 * 0.5, 5.0 + 3.0 * 4])
    assert np.allclose(points.mean(axis=0), centre)
    assert np.allclose(np.abs(points - centre).max(axis=0), [0.35, 0.25, 0.0])
    assert contour.ContourImageSequence[0].ReferencedSOPInstanceUID == "1.2.3.4.5"


# ------------------------------------------------------------------------------------------
# an oblique synthetic series on disk: the decubitus series all share one orientation, so this
# exercises a rotated frame, unequal row and column spacing and files stored out of order
# ------------------------------------------------------------------------------------------


def rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def write_oblique_series(folder: Path, spacing=("0.9", "1.2"), n: int = 14, size: int = 96) -> list[Dataset]:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    r = rotation(30, -100)
    row, col = np.round(r[:, 0], 6), np.round(r[:, 1], 6)
    normal = np.cross(row, col)
    origin = np.array([-40.5, 12.25, 60.0])
    folder.mkdir()
    datasets = []
    for k in np.random.default_rng(1).permutation(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.1.{k + 1}"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.2"
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.3"
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.4"
        ds.Modality, ds.PatientName, ds.PatientID = "MR", "Oblique^Phantom", "OBL"
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + 2.5 * k * normal]
        ds.PixelSpacing = list(spacing)  # row spacing (between rows), column spacing
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.zeros((size, size), np.uint16).tobytes()
        ds.InstanceNumber = int(n - k)  # reversed numbering: instance order must not matter
        pydicom.dcmwrite(folder / f"img{ds.InstanceNumber:03d}", ds, enforce_file_format=True)
        datasets.append(ds)
    return datasets


def oblique_labels() -> np.ndarray:
    labels = np.zeros((96, 96, 14), np.uint8)
    for n, k in enumerate(range(3, 10)):
        labels[10:50 + 2 * n, 60:78, k] = ASYMMETRIC
        labels[10:26, 30:60 - n, k] = ASYMMETRIC
    labels[70, 20, 11] = COMPACT  # one voxel: its diamond's centre is the voxel centre
    return labels


def test_oblique_anisotropic_series_contours_follow_the_standard(tmp_path):
    """PS3.3 C.7.6.2.1.1: P = IPP + i * PixelSpacing[1] * row cosines + j * PixelSpacing[0] *
    column cosines, with i the column index. Expected values computed here by hand."""
    source = write_oblique_series(tmp_path / "series", spacing=("0.9", "1.2"))
    labels = oblique_labels()
    summary = write_rtstruct(labels, MSD, source, tmp_path / "rs.dcm", algorithm_name="m",
                             algorithm_version="1", include_regions=False)
    ds = pydicom.dcmread(summary.path)
    r = rotation(30, -100)
    row, col = np.round(r[:, 0], 6), np.round(r[:, 1], 6)
    expected = np.array([-40.5, 12.25, 60.0]) + 2.5 * 11 * np.cross(row, col) + 70 * 1.2 * row + 20 * 0.9 * col
    (voxel,) = contours_of(ds, roi_number(ds, "edema"))
    points = np.array(voxel.ContourData, float).reshape(-1, 3)
    assert np.allclose(points.mean(axis=0), expected, atol=1e-3)
    assert np.allclose(sorted(np.abs((points - expected) @ row))[-1], 0.6, atol=1e-3)  # half a column step
    assert np.allclose(sorted(np.abs((points - expected) @ col))[-1], 0.45, atol=1e-3)  # half a row step
    assert voxel.ContourImageSequence[0].ReferencedSOPInstanceUID == "1.2.826.0.1.3680043.10.1.12"
    assert np.array_equal(even_odd_mask(ds, "non_enhancing_tumour", source), labels == ASYMMETRIC)


def test_oblique_series_round_trip_through_rt_utils(tmp_path):
    """Square pixels here: rt-utils 1.2.7 swaps row and column spacing (qurit/rt-utils#92)."""
    rt_utils = pytest.importorskip("rt_utils")
    source = write_oblique_series(tmp_path / "series", spacing=("1.1", "1.1"))
    labels = oblique_labels()
    summary = write_rtstruct(labels, MSD, source, tmp_path / "rs.dcm", algorithm_name="m",
                             algorithm_version="1", include_regions=False)
    rt = rt_utils.RTStructBuilder.create_from(dicom_series_path=str(tmp_path / "series"),
                                              rt_struct_path=str(summary.path))
    back, original = from_rt_utils(rt, "non_enhancing_tumour"), labels == ASYMMETRIC
    shift = np.argwhere(back).mean(axis=0) - np.argwhere(original).mean(axis=0)
    assert np.all(np.abs(shift) <= 0.5), shift
    assert dice(back, original) >= 0.95


# ------------------------------------------------------------------------------------------
# contour tracing and number formatting
# ------------------------------------------------------------------------------------------


def test_trace_slice_ring_gives_outer_and_hole_contour():
    i, j = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    radius = np.hypot(i - 20, j - 20)
    contours = trace_slice((radius > 5) & (radius <= 12))
    assert len(contours) == 2
    extents = sorted(float(np.ptp(c[:, 0])) for c in contours)
    assert extents[0] < 12 < extents[1]


def test_trace_slice_closes_structures_at_the_image_border_and_drops_collinear_points():
    mask = np.zeros((6, 7), bool)
    mask[:3, :] = True  # touches three borders
    (contour,) = trace_slice(mask)
    # A rectangle with its corners cut through the edge midpoints: 8 vertices, none collinear.
    assert len(contour) == 8
    assert (contour[:, 0].min(), contour[:, 0].max()) == (-0.5, 2.5)
    assert (contour[:, 1].min(), contour[:, 1].max()) == (-0.5, 6.5)
    assert trace_slice(np.zeros((5, 5), bool)) == []


@pytest.mark.parametrize("value, text", [
    (-130.0, "-130"), (0.0, "0"), (-0.00001, "0"), (1.015625, "1.0156"), (-81.599998474121, "-81.6"),
    (123456.78912345, "123456.7891"), (-1.2345678e12, None), (3.337860107421875e-06, "0"),
])
def test_format_ds_fits_16_characters(value, text):
    result = format_ds(value)
    assert len(result) <= 16
    if text is not None:
        assert result == text
    assert abs(float(result) - value) <= max(1e-4, abs(value) * 1e-9)
    with pytest.raises(GeometryError):
        format_ds(float("nan"))
