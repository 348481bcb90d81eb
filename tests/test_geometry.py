"""The label map lands on exactly the input's voxels, for every orientation and spacing.

A pointwise "threshold" network stands in for a trained model: it labels voxels whose first
channel is bright, so an object painted into the input must come back at the same place.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ThresholdNet, brain_phantom, save_nifti, shared_data
from tumorseg.config import PipelineConfig, PostprocessConfig
from tumorseg.model import LoadedModel, load_card
from tumorseg.pipeline import Segmenter, write_outputs
from tumorseg.sequences import StudyInputs
from tumorseg.stages import geometry, read
from tumorseg.stages.read import read_volume


@pytest.fixture(scope="module")
def threshold_segmenter(tiny_model: Path) -> Segmenter:
    card = load_card(tiny_model)
    model = LoadedModel(card=card, directory=tiny_model, network=ThresholdNet())
    config = PipelineConfig(postprocess=PostprocessConfig(tumour_min_component_ml=0.0))
    return Segmenter(model, config)


def asymmetric_object(shape, spacing_along_axes=(1, 1, 1), size_mm: float = 6.0) -> np.ndarray:
    """An L-shaped block off-centre: its centroid moves under any flip or axis swap."""
    obj = np.zeros(shape, bool)
    i, j, k = (np.array(shape) * [0.3, 0.55, 0.35]).astype(int)
    a, b, c = [max(2, int(round(size_mm / s))) for s in spacing_along_axes]
    obj[i:i + 2 * a, j:j + b, k:k + c] = True
    obj[i:i + a, j:j + 2 * b, k:k + 2 * c] = True
    return obj


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + affine[:3, 3]


def rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(3)
    a, b = [x for x in range(3) if x != axis]
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def affine_from(matrix: np.ndarray, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = origin
    return affine


AFFINES = {
    "ras": affine_from(np.diag([1.0, 1.0, 1.0]), [-20, -22, -18]),
    "lps": affine_from(np.diag([-1.0, -1.0, 1.0]), [20, 22, -18]),
    "permuted": affine_from(np.array([[0, 0, 1.0], [1.0, 0, 0], [0, -1.0, 0]]), [-18, -20, 22]),
    "oblique": affine_from(rotation(0, 20) @ rotation(2, -15) @ np.diag([1.0, 1.1, 0.9]), [5, -30, 12]),
    "anisotropic": affine_from(np.diag([-0.8, 0.8, 3.0]), [16, -18, -50]),
}


@pytest.mark.parametrize("name", list(AFFINES))
def test_label_map_lands_on_input_voxels(name, tmp_path, threshold_segmenter):
    affine = AFFINES[name]
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    shape = (48, 52, 40) if name != "anisotropic" else (50, 56, 16)
    image = brain_phantom(shape, seed=1)
    obj = asymmetric_object(shape, spacing) & (image > 0)
    image[obj] = 400.0
    path = save_nifti(tmp_path / "scan-t2f.nii.gz", image, affine, qform_code=1, sform_code=2)

    result = threshold_segmenter.segment_inputs(StudyInputs(files=(("flair", path),)))
    out_paths = write_outputs(result, threshold_segmenter.spec, tmp_path / "out")
    source, written = nib.load(str(path)), nib.load(str(out_paths["label_map"]))

    assert written.shape == source.shape
    assert np.array_equal(written.affine, source.affine)
    for key in ("qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c",
                "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "pixdim"):
        assert np.array_equal(written.header[key], source.header[key]), key
    assert written.get_data_dtype() == np.uint8
    predicted = np.asarray(written.dataobj) == 1
    if not threshold_segmenter_resamples(threshold_segmenter, spacing):
        # Pointwise network, no interpolation: the object comes back voxel for voxel.
        assert np.array_equal(predicted, obj)
    else:
        dice = 2 * (predicted & obj).sum() / (predicted.sum() + obj.sum())
        assert dice > 0.85, dice
    error_vox = np.linalg.solve(affine[:3, :3], world_centroid(predicted, affine) - world_centroid(obj, affine))
    assert np.all(np.abs(error_vox) < 0.5), error_vox


def test_nifti2_input_gives_nifti2_output_on_the_same_grid(tmp_path, threshold_segmenter):
    affine = AFFINES["permuted"]  # 1 mm voxels: no resampling, so the object returns voxel for voxel
    image = brain_phantom((48, 52, 40), seed=2)
    obj = asymmetric_object(image.shape) & (image > 0)
    image[obj] = 400.0
    source = nib.Nifti2Image(image, affine)
    source.header.set_qform(affine, code=1)
    source.header.set_sform(affine, code=2)
    path = tmp_path / "scan-t2f.nii"
    nib.save(source, str(path))

    result = threshold_segmenter.segment_inputs(StudyInputs(files=(("flair", path),)))
    written = nib.load(str(write_outputs(result, threshold_segmenter.spec, tmp_path / "out")["label_map"]))

    assert isinstance(written, nib.Nifti2Image) and int(written.header["sizeof_hdr"]) == 540
    assert written.shape == image.shape and np.array_equal(written.affine, nib.load(str(path)).affine)
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 2)
    assert np.array_equal(np.asarray(written.dataobj) == 1, obj)


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
def test_free_text_header_fields_of_the_input_are_not_copied(tmp_path, threshold_segmenter, image_class):
    image = brain_phantom((40, 44, 36), seed=3)
    source = image_class(image, np.eye(4))
    text = {"aux_file": b"DOE^JOHN 1234567", "intent_name": b"19700101", "db_name": b"MRN1234567",
            "data_type": b"DOE^JANE"}
    for field, value in text.items():
        if field in source.header:
            source.header[field] = value
    path = tmp_path / "scan-t2f.nii"
    nib.save(source, str(path))
    result = threshold_segmenter.segment_inputs(StudyInputs(files=(("flair", path),)))
    written = nib.load(str(write_outputs(result, threshold_segmenter.spec, tmp_path / "out")["label_map"]))
    raw = (tmp_path / "out" / "segmentation.nii.gz").read_bytes()
    header_bytes = gzip.decompress(raw)[: int(written.header["sizeof_hdr"])]
    assert not any(value in header_bytes for value in text.values())
    assert int(written.header["intent_code"]) == 1002


def threshold_segmenter_resamples(segmenter: Segmenter, spacing: np.ndarray) -> bool:
    target = np.array(segmenter.card.input.spacing_mm)
    return bool(np.any(np.abs(np.sort(spacing) - np.sort(target)) > geometry.SPACING_TOLERANCE * target))


def test_real_anisotropic_nrrd(tmp_path, threshold_segmenter):
    """lesion-t1c (0.78 x 0.78 x 6.5 mm, NRRD): object in a real scan returns to its place."""
    source = shared_data("lesion-t1c", "brain1_image.nrrd")
    itk = sitk.ReadImage(str(source))
    image = sitk.GetArrayFromImage(itk).astype(np.float32)  # (k, j, i)
    # Large enough (> 0.5 % of the image) to stand above the 99.5th-percentile clip.
    obj_kji = np.transpose(asymmetric_object(image.shape[::-1], itk.GetSpacing(), size_mm=20), (2, 1, 0))
    image[obj_kji] = float(image.max()) * 4
    painted = sitk.GetImageFromArray(image)
    painted.CopyInformation(itk)
    path = tmp_path / "painted-t1c.nrrd"
    sitk.WriteImage(painted, str(path))

    result = threshold_segmenter.segment_inputs(StudyInputs(files=(("flair", path),)))
    out = write_outputs(result, threshold_segmenter.spec, tmp_path / "out")["label_map"]

    # Independent check with SimpleITK: same grid in LPS physical space, object at the same place.
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == itk.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), itk.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), itk.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), itk.GetDirection(), atol=1e-6)
    predicted = sitk.GetArrayFromImage(written) == 1
    assert predicted.any()
    def centroid_lps(mask):
        idx = np.argwhere(mask).mean(axis=0)[::-1]  # (i, j, k)
        return np.array(itk.TransformContinuousIndexToPhysicalPoint(idx.tolist()))
    error_mm = centroid_lps(predicted) - centroid_lps(obj_kji)
    direction = np.array(itk.GetDirection()).reshape(3, 3)
    error_vox = np.linalg.solve(direction @ np.diag(itk.GetSpacing()), error_mm)
    assert np.all(np.abs(error_vox) < 0.5), error_vox


def test_nrrd_affine_matches_simpleitk_physical_points():
    path = shared_data("lesion-t1c", "brain2_image.nrrd")
    volume = read_volume(path)
    itk = sitk.ReadImage(str(path))
    for index in [(0, 0, 0), (10, 200, 5), (255, 3, 22)]:
        lps = np.array(itk.TransformIndexToPhysicalPoint(index))
        ras = volume.affine[:3, :3] @ index + volume.affine[:3, 3]
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-4)
    assert volume.array.shape == itk.GetSize()
    assert volume.array[10, 200, 5] == sitk.GetArrayViewFromImage(itk)[5, 200, 10]


def test_a_sheared_grid_is_written_exactly_or_refused_never_approximated(tmp_path):
    """An MHA of a 15 degree tilted acquisition: no qform holds its affine. The label map's sform
    alone carries it, so nibabel (and tumorseg) place every voxel exactly, and ITK refuses the file
    rather than take a qform that put voxels 9 mm away."""
    from tumorseg.labels import get_scheme
    from tumorseg.scan import LabelMap
    from tumorseg.stages import write

    itk = sitk.GetImageFromArray(np.random.default_rng(0).random((24, 22, 20)).astype(np.float32) + 1)
    itk.SetSpacing((1.0, 1.0, 3.0))
    tilt = np.radians(15)
    itk.SetDirection((1, 0, 0, 0, 1, np.sin(tilt), 0, 0, np.cos(tilt)))
    sitk.WriteImage(itk, str(tmp_path / "t1c_tilt.mha"))
    scan = read.stack_volumes({"t1gd": read.read_volume(tmp_path / "t1c_tilt.mha")})
    assert write.is_sheared(scan.affine) and not write.is_sheared(np.diag([0.8, 0.8, 6.5, 1.0]))
    labels = np.zeros(scan.spatial_shape, np.uint8)
    labels[5:9, 6:12, 10:14] = 1
    out = write.write_label_map(LabelMap(labels, scan.affine, get_scheme("msd"), scan.source), tmp_path / "seg.nii.gz")
    written = nib.load(str(out))
    assert int(written.header["qform_code"]) == 0 and int(written.header["sform_code"]) == 1
    np.testing.assert_allclose(written.affine, scan.affine, atol=1e-5)
    again = read.read_volume(out, allow_constant=True)
    np.testing.assert_allclose(again.affine, scan.affine, atol=1e-5)
    np.testing.assert_array_equal(again.array, labels)
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(out))


def test_transform_round_trip_is_exact_without_resampling():
    from tumorseg.scan import Scan, SourceGeometry

    rng = np.random.default_rng(0)
    array = rng.normal(size=(2, 20, 24, 18)).astype(np.float32)
    array[:, :3] = 0  # something to crop
    affine = AFFINES["permuted"]
    scan = Scan(array, affine, ("flair", "t1"), SourceGeometry((20, 24, 18), affine))
    transform = geometry.plan_transform(scan, (1.0, 1.0, 1.0))
    on_grid = geometry.to_model_grid(scan, transform)
    assert not transform.resampled
    # The model-grid affine is close to RAS-aligned (positive diagonal) and maps voxels to the same place.
    assert np.all(np.diag(on_grid.affine)[:3] > 0)
    back = geometry.probabilities_to_input_grid(on_grid.array, transform)
    box = tuple(slice(a, b) for a, b in transform.crop)
    np.testing.assert_array_equal(back[(slice(None),) + box], array[(slice(None),) + box])
    idx = np.array([5, 7, 9])
    world = affine[:3, :3] @ idx + affine[:3, 3]
    model_idx = np.linalg.solve(on_grid.affine[:3, :3], world - on_grid.affine[:3, 3])
    np.testing.assert_allclose(on_grid.array[(0,) + tuple(np.round(model_idx).astype(int))], array[(0,) + tuple(idx)])
    assert array.sum() == scan.array.sum()  # input untouched


@pytest.mark.parametrize("name", ["ras", "lps", "permuted", "anisotropic"])
def test_a_cut_through_the_brain_is_mirrored_and_the_mirror_dropped_on_the_way_back(name):
    """Where the field of view ends inside the brain, the model grid goes on with the scan's mirror
    image (so the network sees tissue on both sides of the cut); the probabilities come back on
    exactly the input's voxels, and the brain's own ends (far from the scan's faces) are not extended."""
    from tumorseg.scan import Scan, SourceGeometry

    affine = AFFINES[name]
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    gap = [int(np.ceil(geometry.CUT_REACH_MM / s)) + 2 for s in spacing]  # beyond the reach of a cut
    inner = (24, 26, 22) if name != "anisotropic" else (24, 26, 8)
    shape = tuple(n + 2 * g for n, g in zip(inner, gap))
    rng = np.random.default_rng(1)
    array = np.zeros((1,) + shape, np.float32)
    brain_box = (slice(gap[0], -gap[0]), slice(gap[1], -gap[1]), slice(0, -gap[2]))  # cut at k = 0
    array[(0,) + brain_box] = rng.uniform(1, 2, size=array[(0,) + brain_box].shape)
    scan = Scan(array, affine, ("flair",), SourceGeometry(shape, affine))
    brain = array[0] > 0
    assert geometry.cut_faces(brain, spacing) == [(2, 0, 0)]

    plain = geometry.plan_transform(scan, (1.0, 1.0, 1.0), brain)
    mirrored = geometry.plan_transform(scan, (1.0, 1.0, 1.0), brain, mirror_cuts_mm=8.0)
    assert plain.mirrored == ((0, 0), (0, 0), (0, 0)) and plain.model_shape == plain.resampled_shape
    # Input axis 2 (k) lands on one model axis; k = 0 lies before or after on it, by the axis' flip.
    model_axis, flip = mirrored.orientation[2]
    expected = [[0, 0], [0, 0], [0, 0]]
    expected[model_axis][0 if flip == 1 else 1] = 8
    assert [list(p) for p in mirrored.mirrored] == expected
    assert mirrored.model_shape[model_axis] == plain.model_shape[model_axis] + 8

    on_grid = geometry.to_model_grid(scan, mirrored)
    reference = geometry.to_model_grid(scan, plain)
    inner = tuple(slice(a, a + n) for n, (a, _) in zip(mirrored.resampled_shape, mirrored.mirrored))
    np.testing.assert_array_equal(on_grid.array[(slice(None),) + inner], reference.array)
    # The added slices are the mirror image of those next to the cut: the face voxel repeated first.
    edge = [slice(None)] * 4
    edge[1 + model_axis] = slice(0, 16) if flip == 1 else slice(-16, None)
    np.testing.assert_array_equal(on_grid.array[tuple(edge)], np.flip(on_grid.array[tuple(edge)], 1 + model_axis))
    # The model affine still maps the scan's voxels to their own place.
    world = reference.affine @ [3, 4, 5, 1]
    np.testing.assert_allclose(np.linalg.solve(on_grid.affine, world)[:3] - np.array(
        [a for a, _ in mirrored.mirrored]), [3, 4, 5], atol=1e-9)
    # The brain mask travels the same way (normalisation and training labels see the same grid).
    mask_on_grid = geometry.labels_to_model_grid(brain, mirrored)
    assert mask_on_grid.shape == mirrored.model_shape
    np.testing.assert_array_equal(mask_on_grid[inner], geometry.labels_to_model_grid(brain, plain))
    # Back: the mirrored part is dropped, the rest lands where it came from.
    back = geometry.probabilities_to_input_grid(on_grid.array, mirrored)
    if not mirrored.resampled:
        np.testing.assert_array_equal(back, geometry.probabilities_to_input_grid(reference.array, plain))
        np.testing.assert_array_equal(back[0][brain], array[0][brain])
    else:
        np.testing.assert_allclose(back, geometry.probabilities_to_input_grid(reference.array, plain), atol=1e-6)


def test_a_cut_is_a_wide_section_of_the_brain_near_a_face_of_the_scan():
    brain = np.zeros((60, 60, 60), bool)
    brain[20:40, 20:40, 1:40] = True
    assert geometry.cut_faces(brain, np.ones(3)) == [(2, 0, 1)]  # 400 mm² one voxel from the face
    brain[:, :, 1] = False
    brain[29:32, 29:32, 1] = True  # 9 mm² of brainstem on the lowest section: no cut
    assert geometry.cut_faces(brain, np.ones(3)) == []
    brain[20:40, 20:40, 1] = True
    assert geometry.cut_faces(brain, np.array([1.0, 1.0, 7.0])) == [(2, 0, 1)]  # 7 mm from the face
    assert geometry.cut_faces(brain, np.array([1.0, 1.0, 16.0])) == []  # the brain's own end, 16 mm in
    # Brain that ended a section short of the scan's edge (an extractor's mask) is cut there too.
    brain[:, :, 1] = False
    assert geometry.cut_faces(brain, np.array([1.0, 1.0, 6.5])) == [(2, 0, 2)]
