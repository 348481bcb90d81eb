"""DICOM SEG writer: the mask comes back identical through highdicom, and the file conforms.

Axis convention as for the RTSTRUCT: ``labels[i = column, j = row, k = slice ascending along the
normal]``; highdicom returns frames as (slice, row, column) in the order of the source UIDs we ask
for, so the reconstruction transposes (2, 1, 0).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import shared_data
from tumorseg.dicom.source import sort_source_series
from tumorseg.dicom.seg import write_seg
from tumorseg.labels import get_scheme

hd = pytest.importorskip("highdicom")

POSITIONS = ("HFS", "HFP", "HFDL", "HFDR")


def read_source(position: str) -> list[pydicom.Dataset]:
    folder = shared_data("dicom", "decubitus-t1", position)
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.glob("*.dcm"))]


def label_map(shape, values) -> np.ndarray:
    """Three structures with the scheme's three label values; one touches label 2 directly."""
    labels = np.zeros(shape, dtype=np.uint8)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    labels[((i - 90) / 18.0) ** 2 + ((j - 110) / 14.0) ** 2 + ((k - 12) / 3.5) ** 2 <= 1] = values[0]
    radius = np.hypot(i - 165, j - 150)
    labels[(radius > 10) & (radius <= 24) & (k >= 18) & (k < 23)] = values[2]
    labels[40:80, 190:205, 4:9] = values[1]
    labels[80:90, 190:205, 4:9] = values[0]
    return labels


def read_back(path: Path, source, scheme) -> np.ndarray:
    """The SEG as a label map on the source grid (Columns, Rows, slices), scheme values."""
    seg = hd.seg.segread(path)
    series = sort_source_series(source)
    uids = [s.SOPInstanceUID for s in series.slices]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                               relabel=False)
    values = np.array([0] + [label.value for label in scheme.labels])
    return values[frames].transpose(2, 1, 0)


def dciodvfy_errors(path: Path) -> tuple[int, list[str]]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("needs dciodvfy (Debian package dicom3tools)")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in lines if line.startswith("Error")]


@pytest.mark.parametrize("position", POSITIONS)
def test_seg_round_trip_is_identical_and_conformant(position, tmp_path):
    scheme = get_scheme("brats2021")  # label values 1, 2, 4: segment numbers 1, 2, 3
    source = read_source(position)
    labels = label_map((256, 256, len(source)), [label.value for label in scheme.labels])
    path = write_seg(labels, scheme, source, tmp_path / "seg.dcm", algorithm_name="tiny-test",
                     algorithm_version="0")
    assert np.array_equal(read_back(path, source, scheme), labels)
    returncode, errors = dciodvfy_errors(path)
    assert errors == [] and returncode == 0, "\n".join(errors)


def test_seg_frames_sit_on_the_source_slices(tmp_path):
    scheme = get_scheme("msd")
    source = read_source("HFDR")
    labels = label_map((256, 256, len(source)), [1, 2, 3])
    seg = pydicom.dcmread(write_seg(labels, scheme, source, tmp_path, algorithm_name="tiny-test",
                                    algorithm_version="0"))
    by_uid = {s.SOPInstanceUID: s for s in source}
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.Manufacturer == "tumorseg"
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in by_uid[uid].ImagePositionPatient], atol=1e-4)
    names = [s.SegmentLabel for s in seg.SegmentSequence]
    assert names == [label.name for label in scheme.labels]
    for segment in seg.SegmentSequence:
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentAlgorithmName == "tiny-test"


def test_empty_mask_gives_a_valid_all_empty_seg(tmp_path):
    scheme = get_scheme("msd")
    source = read_source("HFP")
    labels = np.zeros((256, 256, len(source)), np.uint8)
    path = write_seg(labels, scheme, source, tmp_path / "empty.dcm", algorithm_name="tiny-test",
                     algorithm_version="0")
    assert not read_back(path, source, scheme).any()
    returncode, errors = dciodvfy_errors(path)
    assert errors == [] and returncode == 0, "\n".join(errors)


def test_seg_export_keeps_source_uids_out_of_the_log(tmp_path):
    """highdicom logs the source SOP Instance UIDs at INFO; docs/rtstruct.md promises that no source
    header text enters tumorseg's log, so the CLI keeps highdicom at warnings."""
    import nibabel as nib

    from tumorseg.dicom.find import find_series
    from tumorseg.dicom.volume import read_series

    folder = shared_data("dicom", "decubitus-t1", "HFS")
    volume, series = read_series(find_series(folder)[0])
    labels = label_map(series.shape, (1, 2, 3))
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(labels, volume.affine), str(mask))
    result = subprocess.run(["tumorseg", "rtstruct", "--mask", str(mask), "--series", str(folder), "-o",
                             str(tmp_path / "out"), "--label-scheme", "msd", "--seg"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "seg.dcm").exists()
    logged = result.stdout + result.stderr
    assert "INFO" in logged  # the log was on
    assert not [s.SOPInstanceUID for s in read_source("HFS") if s.SOPInstanceUID in logged]
