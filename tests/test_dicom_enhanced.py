"""Enhanced multi-frame MR (one file, every slice a frame): read as dcm2niix reads it, and written back.

On the real Siemens XA30 export in ``../shared/data/dicom/enhanced-xa30`` (96 frames of 128 x 128)
and on copies of it edited the way other scanners write (frames out of order, per-frame rescaling,
a second time point).
"""
from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from conftest import dicom3tools_findings, run_tool, shared_data
from test_dicom_series import dcm2niix_reference, reorient_like
from test_rtstruct import _inside
from tumorseg.dicom.export import export_mask
from tumorseg.dicom.find import find_series
from tumorseg.dicom.volume import read_series
from tumorseg.errors import GeometryError

FRAMES = 96


def enhanced_folder() -> Path:
    return shared_data("dicom", "enhanced-xa30", "5_anat-T1w_acq-tfl")


def enhanced_file() -> Path:
    return next(enhanced_folder().glob("*.dcm"))


def edited_copy(tmp_path: Path, edit) -> Path:
    """A copy of the enhanced image after ``edit(ds, pixels)`` returns the new (frames, rows, cols)."""
    ds = pydicom.dcmread(enhanced_file())
    original = ds.pixel_array
    pixels = edit(ds, original.copy())
    ds.NumberOfFrames = len(pixels)
    ds.PixelData = np.ascontiguousarray(pixels.astype(original.dtype)).tobytes()
    folder = tmp_path / "series"
    folder.mkdir()
    ds.save_as(folder / "image.dcm", enforce_file_format=True)
    return folder


def test_reads_as_dcm2niix_does(tmp_path):
    folder = enhanced_folder()
    reference = dcm2niix_reference(folder, tmp_path)
    volume, series = read_series(find_series(folder)[0])

    assert volume.array.shape == (128, 128, FRAMES)
    assert sorted(series.frame_numbers) == list(range(1, FRAMES + 1))
    assert len(set(series.sop_instance_uids)) == 1 and len(set(series.paths)) == 1
    array, affine = reorient_like(volume.array, volume.affine, reference.affine)
    assert array.shape == reference.shape
    assert np.abs(affine - reference.affine).max() < 1e-3, (affine, reference.affine)
    np.testing.assert_array_equal(array, reference.get_fdata(dtype=np.float32))
    # The sequence name of an enhanced image is PulseSequenceName: series selection sees it.
    assert find_series(folder)[0].sequence_name == "*tfl3d1_16ns"


def test_frame_order_and_per_frame_rescaling_are_the_frames_own(tmp_path):
    original, original_series = read_series(enhanced_folder())

    def reverse_and_rescale(ds, pixels):
        items = list(ds.PerFrameFunctionalGroupsSequence)[::-1]
        # Frame 1 of the copy is the last frame of the original: its stored values are halved
        # and its slope doubled, so the real values must not change.
        transform = Dataset()
        transform.RescaleSlope = 2
        transform.RescaleIntercept = 0
        transform.RescaleType = "US"
        first = copy.deepcopy(items[0])
        first.PixelValueTransformationSequence = DicomSequence([transform])
        items[0] = first
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(items)
        pixels = pixels[::-1].copy()
        pixels[0] = pixels[0] // 2
        return pixels

    volume, series = read_series(edited_copy(tmp_path, reverse_and_rescale))
    assert series.frame_numbers == tuple(FRAMES + 1 - n for n in original_series.frame_numbers)
    np.testing.assert_allclose(volume.affine, original.affine, atol=1e-6)
    # Every slice but the rescaled one identical; that one within the one count halving loses.
    k = series.frame_numbers.index(1)
    others = [i for i in range(FRAMES) if i != k]
    np.testing.assert_array_equal(volume.array[..., others], original.array[..., others])
    assert np.abs(volume.array[..., k] - original.array[..., k]).max() <= 1


def test_a_second_time_point_is_refused_as_4d(tmp_path):
    def two_time_points(ds, pixels):
        items = []
        for t in (1, 2):
            for item in ds.PerFrameFunctionalGroupsSequence:
                frame = copy.deepcopy(item)
                frame.FrameContentSequence[0].TemporalPositionIndex = t
                items.append(frame)
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(items)
        return np.concatenate([pixels, pixels])

    with pytest.raises(GeometryError, match="4D series.*TemporalPositionIdentifier"):
        read_series(edited_copy(tmp_path, two_time_points))


def test_frames_without_their_functional_groups_are_refused(tmp_path):
    def drop_one_item(ds, pixels):
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(list(ds.PerFrameFunctionalGroupsSequence)[:-1])
        ds.NumberOfFrames = FRAMES  # still claims all frames
        return pixels

    folder = edited_copy(tmp_path, drop_one_item)
    ds = pydicom.dcmread(folder / "image.dcm", stop_before_pixels=True)
    assert int(ds.NumberOfFrames) == FRAMES and len(ds.PerFrameFunctionalGroupsSequence) == FRAMES - 1
    with pytest.raises(GeometryError, match="declares 96 frames but describes 95"):
        read_series(folder)


def block_mask(shape) -> np.ndarray:
    labels = np.zeros(shape, np.int16)
    c = np.array(shape) // 2
    labels[c[0] - 10:c[0] + 10, c[1] - 8:c[1] + 12, c[2] - 15:c[2] + 15] = 2
    labels[c[0] - 4:c[0] + 4, c[1] - 3:c[1] + 3, c[2] - 5:c[2] + 5] = 1
    return labels


def test_rtstruct_and_seg_reference_each_frame(tmp_path):
    hd = pytest.importorskip("highdicom")
    volume, series = read_series(enhanced_folder())
    labels = block_mask(volume.array.shape)
    nib.save(nib.Nifti1Image(labels, volume.affine), tmp_path / "mask.nii.gz")
    paths = export_mask(tmp_path / "mask.nii.gz", enhanced_folder(), tmp_path / "out", "msd", None,
                        "tiny-test", seg=True)
    for path in paths.values():
        errors, _ = dicom3tools_findings(run_tool("dciodvfy", str(path)))
        assert errors == [], "\n".join(errors)

    # RTSTRUCT: every contour names the instance and its frame; rasterised back, the same voxels.
    rt = pydicom.dcmread(paths["rtstruct"])
    listed = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0].ContourImageSequence
    assert sorted(int(item.ReferencedFrameNumber) for item in listed) == list(range(1, FRAMES + 1))
    uid = series.sop_instance_uids[0]
    k_of_frame = {number: k for k, number in enumerate(series.frame_numbers)}
    inverse = np.linalg.inv(series.lps_affine)
    number = next(int(r.ROINumber) for r in rt.StructureSetROISequence if r.ROIName == "WT whole tumour")
    roi = next(c for c in rt.ROIContourSequence if int(c.ReferencedROINumber) == number)
    mask = np.zeros(labels.shape, bool)
    ii, jj = np.meshgrid(np.arange(labels.shape[0]), np.arange(labels.shape[1]), indexing="ij")
    for contour in roi.ContourSequence:
        reference = contour.ContourImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == uid
        k = k_of_frame[int(reference.ReferencedFrameNumber)]
        points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
        voxel = np.c_[points, np.ones(len(points))] @ inverse.T
        assert np.allclose(voxel[:, 2], k, atol=1e-3), "contour z is not on its referenced frame"
        mask[:, :, k] ^= _inside(voxel[:, 0], voxel[:, 1], ii, jj)
    np.testing.assert_array_equal(mask, labels > 0)

    # SEG: highdicom reads it back frame by frame of the source image.
    seg = hd.seg.segread(paths["seg"])
    frames = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=uid, source_frame_numbers=list(series.frame_numbers),
        combine_segments=True, relabel=False, assert_missing_frames_are_empty=True)  # empty frames are omitted
    np.testing.assert_array_equal(frames.transpose(2, 1, 0), labels)


def test_enhanced_files_of_one_frame_each_stack_like_slices(tmp_path):
    """Some exporters write an enhanced series as one file per frame: NumberOfFrames 1, the position
    still only in the functional groups."""
    original, original_series = read_series(enhanced_folder())
    folder = tmp_path / "series"
    folder.mkdir()
    source = pydicom.dcmread(enhanced_file())
    pixels = source.pixel_array
    for number in (10, 11, 12):
        ds = copy.deepcopy(source)
        ds.PerFrameFunctionalGroupsSequence = DicomSequence([copy.deepcopy(source.PerFrameFunctionalGroupsSequence[number - 1])])
        ds.NumberOfFrames = 1
        ds.PixelData = np.ascontiguousarray(pixels[number - 1]).tobytes()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / f"frame{number}.dcm", enforce_file_format=True)
    volume, series = read_series(folder)
    assert volume.array.shape == (128, 128, 3) and series.frame_numbers == (1, 1, 1)
    ks = [original_series.frame_numbers.index(n) for n in (10, 11, 12)]
    k0 = min(ks)
    np.testing.assert_array_equal(volume.array, original.array[..., k0:k0 + 3])
