"""tumorseg.metrics against an independent implementation (MONAI 1.6) and its documented conventions.

MONAI returns nan/inf for empty masks, so the empty-mask conventions are asserted directly.
MONAI keeps distances in float32; the NSD tolerances used here are chosen so that no distance
lies within float32 rounding of the tolerance (integer distances are exact in both), else the
two could legitimately disagree on a tie.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

from tumorseg.errors import ConfigError, GeometryError
from tumorseg.metrics import (
    CONVENTIONS,
    DEFAULT_NSD_TOLERANCE_MM,
    SURFACE_CONNECTIVITY,
    MaskScores,
    dice,
    hausdorff95,
    normalized_surface_dice,
    score_masks,
    surface_distances,
)

DICE_TOL, HD_TOL_MM, NSD_TOL = 1e-6, 1e-3, 1e-6


def blob(shape, seed: int, sigma: float = 2.5, level: float = 0.5) -> np.ndarray:
    """A smooth random mask: Gaussian-filtered noise above ``level`` standard deviations."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return field > level * field.std()


def monai_scores(pred: np.ndarray, truth: np.ndarray, spacing,
                 tolerances_mm: tuple[float, ...]) -> tuple[float, float, list[float]]:
    """(Dice, HD95, [NSD at each tolerance]) by MONAI, on one-hot (B=1, C=1, X, Y, Z) tensors."""
    p = torch.as_tensor(pred[None, None].astype(np.float32))
    t = torch.as_tensor(truth[None, None].astype(np.float32))
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = compute_dice(p, t, include_background=True, ignore_empty=False).item()
        hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95, directed=False,
                                        spacing=sp).item()
        nsd = [compute_surface_dice(p, t, class_thresholds=[tol], include_background=True,
                                    spacing=sp, use_subvoxels=False).item() for tol in tolerances_mm]
    return d, hd, nsd


def assert_matches_monai(pred, truth, spacing, tolerances_mm=(DEFAULT_NSD_TOLERANCE_MM,)) -> MaskScores:
    """Our scores agree with MONAI's; returns ours at the first tolerance."""
    assert pred.any() and truth.any(), "MONAI has no finite answer for empty masks"
    m_dice, m_hd, m_nsds = monai_scores(pred, truth, spacing, tolerances_mm)
    for tol, m_nsd in zip(tolerances_mm, m_nsds):
        ours = score_masks(pred, truth, spacing, tol)
        assert abs(ours.dice - m_dice) <= DICE_TOL, (ours.dice, m_dice)
        assert abs(ours.hd95_mm - m_hd) <= HD_TOL_MM, (ours.hd95_mm, m_hd)
        assert abs(ours.nsd - m_nsd) <= NSD_TOL, (tol, ours.nsd, m_nsd)
        # The single-metric functions agree with score_masks.
        assert normalized_surface_dice(pred, truth, spacing, tol) == ours.nsd
    assert dice(pred, truth) == ours.dice
    assert hausdorff95(pred, truth, spacing) == ours.hd95_mm
    return score_masks(pred, truth, spacing, tolerances_mm[0])


def reference_surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """No cropping, dense distance maps over the whole image: the definition, written plainly."""
    cross = ndimage.generate_binary_structure(3, 1)
    sa = a & ~ndimage.binary_erosion(a, cross, border_value=0)
    sb = b & ~ndimage.binary_erosion(b, cross, border_value=0)
    return (ndimage.distance_transform_edt(~sb, sampling=spacing)[sa],
            ndimage.distance_transform_edt(~sa, sampling=spacing)[sb])


# --- agreement with MONAI ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blobs_isotropic(seed):
    shape = (40, 40, 40)
    pred, truth = blob(shape, seed), blob(shape, seed + 100)
    ours = assert_matches_monai(pred, truth, (1.0, 1.0, 1.0), (2.0, 1.0))
    assert 0 < ours.dice < 1 and ours.hd95_mm > 0 and 0 < ours.nsd < 1  # a non-trivial case


def test_similar_blobs_isotropic():
    """A prediction close to the truth (a perturbed copy): high scores, still not perfect."""
    shape = (40, 40, 40)
    field = ndimage.gaussian_filter(np.random.default_rng(5).standard_normal(shape), 3.0)
    noise = ndimage.gaussian_filter(np.random.default_rng(6).standard_normal(shape), 1.5)
    truth = field > 0.3 * field.std()
    pred = field + 0.3 * noise * field.std() / noise.std() > 0.3 * field.std()
    ours = assert_matches_monai(pred, truth, (1.0, 1.0, 1.0), (1.0,))
    assert ours.dice > 0.8 and ours.nsd > 0.8


@pytest.mark.parametrize("spacing, shape", [
    ((0.78, 0.78, 6.5), (64, 64, 16)),
    ((1.0, 1.2, 3.0), (48, 40, 24)),
    ((3.0, 0.9, 1.1), (20, 56, 48)),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_blobs_anisotropic(spacing, shape, seed):
    pred, truth = blob(shape, seed, sigma=2.0), blob(shape, seed + 100, sigma=2.0)
    ours = assert_matches_monai(pred, truth, spacing, (2.0, 5.0))
    assert 0 < ours.dice < 1 and ours.hd95_mm > 0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.78, 0.78, 6.5), (1.0, 1.2, 3.0)])
def test_masks_touching_the_image_border(spacing):
    shape = (40, 36, 20)
    pred, truth = blob(shape, 7, level=-0.3), blob(shape, 8, level=-0.3)  # large: they reach every face
    for m in (pred, truth):
        assert all(m[(slice(None),) * ax + (i,)].any() for ax in range(3) for i in (0, -1))
    assert_matches_monai(pred, truth, spacing)
    # A mask filling the whole image, and one filling all but the last slices of two axes.
    full = np.ones(shape, dtype=bool)
    part = full.copy()
    part[-3:], part[:, :, -2:] = False, False
    assert_matches_monai(full, part, spacing)
    assert_matches_monai(full, truth, spacing)


def test_image_border_voxels_are_surface():
    shape = (10, 12, 14)
    full = np.ones(shape, dtype=bool)
    d_ab, d_ba = surface_distances(full, full, (1.0, 1.0, 1.0))
    n_surface = full.size - 8 * 10 * 12  # everything but the interior
    assert len(d_ab) == len(d_ba) == n_surface
    assert SURFACE_CONNECTIVITY == 1  # 6-connected: face neighbours only


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.78, 0.78, 6.5)])
def test_single_voxel(spacing):
    shape = (40, 40, 20)
    truth = blob(shape, 3, sigma=3.0)
    one = np.zeros(shape, dtype=bool)
    one[20, 20, 10] = True
    assert_matches_monai(one, truth, spacing)
    assert_matches_monai(truth, one, spacing)
    corner = np.zeros(shape, dtype=bool)
    corner[0, -1, 0] = True
    s = assert_matches_monai(one, corner, spacing)
    expected = math.dist(np.multiply((20, 20, 10), spacing), np.multiply((0, 39, 0), spacing))
    assert s.hd95_mm == pytest.approx(expected, abs=1e-9)
    assert s.dice == 0.0 and s.nsd == 0.0
    same = score_masks(one, one, spacing)
    assert (same.dice, same.hd95_mm, same.nsd, same.relative_volume_diff) == (1.0, 0.0, 1.0, 0.0)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.2, 3.0)])
def test_disjoint_masks(spacing):
    shape = (48, 40, 24)
    pred, truth = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    pred[2:12, 3:15, 2:8] = True
    truth[30:44, 20:36, 12:22] = True
    s = assert_matches_monai(pred, truth, spacing)
    assert s.dice == 0.0 and s.nsd == 0.0 and s.hd95_mm > 10


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.78, 0.78, 6.5)])
def test_identical_masks_are_perfect(spacing):
    mask = blob((40, 40, 20), 11)
    s = assert_matches_monai(mask, mask.copy(), spacing)
    assert (s.dice, s.hd95_mm, s.nsd, s.volume_diff_ml, s.relative_volume_diff) == (1.0, 0.0, 1.0, 0.0, 0.0)


def test_nsd_counts_distance_equal_to_tolerance():
    """A 1-voxel shift at 1 mm puts many distances at exactly 1 mm: within a 1 mm tolerance."""
    truth = np.zeros((30, 30, 30), dtype=bool)
    truth[8:20, 8:20, 8:20] = True
    pred = np.roll(truth, 1, axis=0)
    assert normalized_surface_dice(pred, truth, (1.0, 1.0, 1.0), 1.0) == 1.0
    assert normalized_surface_dice(pred, truth, (1.0, 1.0, 1.0), 0.999) < 1.0
    assert_matches_monai(pred, truth, (1.0, 1.0, 1.0), (1.0,))


def test_full_size_brats_grid():
    """One 240x240x155 case at 1 mm with tumour-sized masks, as the evaluation sees them."""
    grid = np.ogrid[:240, :240, :155]
    r2 = (grid[0] - 120) ** 2 + (grid[1] - 110) ** 2 + ((grid[2] - 70) * 1.2) ** 2
    lobes = blob((64, 64, 48), 21, sigma=3.0, level=0.0)
    truth = r2 < 28 ** 2
    pred = r2 < 24 ** 2
    pred[90:154, 80:144, 46:94] |= lobes & (r2[90:154, 80:144, 46:94] < 31 ** 2)
    s = assert_matches_monai(pred, truth, (1.0, 1.0, 1.0))
    assert 0.5 < s.dice < 1


# --- cropping ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.78, 0.78, 6.5), (1.0, 1.2, 3.0)])
def test_cropping_is_exact(spacing):
    """Small masks far from the origin (a small box), and masks touching the image border."""
    shape = (56, 48, 32)
    cases = []
    small_a, small_b = np.zeros(shape, bool), np.zeros(shape, bool)
    small_a[30:44, 20:30, 18:26] = blob((14, 10, 8), 1, sigma=1.5, level=-0.5)
    small_b[33:50, 22:34, 20:31] = blob((17, 12, 11), 2, sigma=1.5, level=-0.5)
    cases.append((small_a, small_b))
    border_a, border_b = blob(shape, 3, level=-0.3), blob(shape, 4, level=-0.3)
    border_b[:, :, 0] = True  # a face of the image, where a box edge meets the image edge
    cases.append((border_a, border_b))
    corner_a, corner_b = np.zeros(shape, bool), np.zeros(shape, bool)
    corner_a[-5:, -4:, -3:] = True
    corner_b[-3:, -6:, -1:] = True
    cases.append((corner_a, corner_b))
    for a, b in cases:
        cropped = surface_distances(a, b, spacing)
        uncropped = surface_distances(a, b, spacing, crop=False)
        reference = reference_surface_distances(a, b, spacing)
        for got, plain, ref in zip(cropped, uncropped, reference):
            assert got.shape == ref.shape and got.size > 0
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)
            np.testing.assert_allclose(plain, ref, rtol=1e-12, atol=0)


def test_surface_distances_direction_and_emptiness():
    a, b = np.zeros((20, 20, 20), bool), np.zeros((20, 20, 20), bool)
    a[5:10, 5:10, 5:10] = True  # 5^3 cube: 98 surface voxels
    b[5:10, 5:10, 12] = True  # a 5x5 plate 3 voxels (4.5 mm at 1.5 mm) beyond a's face at z=9
    d_ab, d_ba = surface_distances(a, b, (1.0, 1.0, 1.5))
    assert len(d_ab) == 5 ** 3 - 3 ** 3 and len(d_ba) == 25
    assert d_ba.min() == pytest.approx(3 * 1.5) and d_ab.min() == pytest.approx(3 * 1.5)
    assert d_ab.max() == pytest.approx(math.hypot(0, 0, 7 * 1.5))  # a's far face z=5 to the plate
    d_ae, d_ea = surface_distances(a, np.zeros_like(a), (1.0, 1.0, 1.0))
    assert np.isinf(d_ae).all() and len(d_ae) == 98 and d_ea.size == 0


# --- empty-mask conventions -------------------------------------------------------------------------

def test_both_empty():
    empty = np.zeros((20, 30, 10), dtype=bool)
    s = score_masks(empty, empty, (1.0, 1.2, 3.0))
    assert s == MaskScores(dice=1.0, hd95_mm=0.0, nsd=1.0, volume_pred_ml=0.0, volume_truth_ml=0.0,
                           volume_diff_ml=0.0, relative_volume_diff=None)
    assert dice(empty, empty) == 1.0
    assert hausdorff95(empty, empty, (1, 1, 1)) == 0.0
    assert normalized_surface_dice(empty, empty, (1, 1, 1), 2.0) == 1.0


def test_prediction_empty():
    shape, spacing = (40, 50, 20), (1.0, 1.2, 3.0)
    truth = np.zeros(shape, dtype=bool)
    truth[10:20, 10:20, 5:10] = True
    empty = np.zeros(shape, dtype=bool)
    s = score_masks(empty, truth, spacing)
    diagonal = math.sqrt(40 ** 2 + 60 ** 2 + 60 ** 2)  # field of view 40 x 60 x 60 mm
    assert (s.dice, s.nsd) == (0.0, 0.0)
    assert s.hd95_mm == pytest.approx(diagonal, abs=1e-9)
    assert s.relative_volume_diff == -1.0
    assert hausdorff95(empty, truth, spacing) == pytest.approx(diagonal, abs=1e-9)


def test_truth_empty():
    shape, spacing = (40, 50, 20), (0.78, 0.78, 6.5)
    pred = np.zeros(shape, dtype=bool)
    pred[0, 0, 0] = True
    empty = np.zeros(shape, dtype=bool)
    s = score_masks(pred, empty, spacing)
    assert (s.dice, s.nsd, s.relative_volume_diff) == (0.0, 0.0, None)
    assert s.hd95_mm == pytest.approx(math.sqrt((40 * 0.78) ** 2 + (50 * 0.78) ** 2 + 130 ** 2), abs=1e-9)
    assert s.volume_truth_ml == 0.0 and s.volume_diff_ml == pytest.approx(0.78 * 0.78 * 6.5 / 1000)
    assert dice(pred, empty) == 0.0
    assert normalized_surface_dice(pred, empty, spacing, 2.0) == 0.0


def test_one_empty_on_the_brats_grid_is_the_brats_penalty():
    truth = np.zeros((240, 240, 155), dtype=bool)
    truth[100:110, 100:110, 70:80] = True
    assert hausdorff95(np.zeros_like(truth), truth, (1, 1, 1)) == pytest.approx(373.13, abs=0.005)


# --- volumes, masks, report ---------------------------------------------------------------------------

def test_volumes():
    spacing = (1.0, 1.2, 3.0)  # 3.6 mm^3 = 0.0036 mL a voxel
    pred, truth = np.zeros((20, 20, 20), bool), np.zeros((20, 20, 20), bool)
    pred[0:10, 0:10, 0:1] = True  # 100 voxels
    truth[5:13, 5:15, 0:1] = True  # 80 voxels
    s = score_masks(pred, truth, spacing)
    assert s.volume_pred_ml == pytest.approx(0.36, rel=1e-12)
    assert s.volume_truth_ml == pytest.approx(0.288, rel=1e-12)
    assert s.volume_diff_ml == pytest.approx(0.072, rel=1e-12)
    assert s.relative_volume_diff == pytest.approx(0.25, rel=1e-12)
    assert s.dice == pytest.approx(2 * 25 / 180)
    d = s.to_dict()
    assert list(d) == ["dice", "hd95_mm", "nsd", "volume_pred_ml", "volume_truth_ml", "volume_diff_ml",
                       "relative_volume_diff"]
    assert d["volume_pred_ml"] == s.volume_pred_ml
    with pytest.raises(AttributeError):
        s.dice = 0.5  # frozen


def test_integer_masks_are_nonzero_inside():
    truth_bool, pred_bool = blob((32, 32, 32), 1), blob((32, 32, 32), 2)
    truth_int = truth_bool.astype(np.uint8) * 2  # a label value, not 1
    pred_int = np.where(pred_bool, -3, 0).astype(np.int16)
    assert score_masks(pred_int, truth_int, (1, 1, 2)) == score_masks(pred_bool, truth_bool, (1, 1, 2))
    with pytest.raises(TypeError, match="boolean or integer"):
        score_masks(pred_bool.astype(np.float32), truth_bool, (1, 1, 1))


def test_conventions_text():
    assert {"dice", "hd95_mm", "nsd"} <= set(CONVENTIONS)
    assert all(isinstance(v, str) and v for v in CONVENTIONS.values())
    assert "1.0 when both" in CONVENTIONS["dice"] and "0.0 when exactly one" in CONVENTIONS["dice"]
    assert "diagonal" in CONVENTIONS["hd95_mm"] and "373.13" in CONVENTIONS["hd95_mm"]
    assert "95th percentile" in CONVENTIONS["hd95_mm"] and "0.0 when both" in CONVENTIONS["hd95_mm"]
    assert "<= tolerance" in CONVENTIONS["nsd"] and "1.0 when both" in CONVENTIONS["nsd"]
    assert DEFAULT_NSD_TOLERANCE_MM == 2.0


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred_shape, truth_shape", [((10, 10, 10), (10, 10, 11)), ((10, 10), (10, 10)),
                                                     ((10, 10, 10, 1), (10, 10, 10, 1))])
def test_bad_shapes(pred_shape, truth_shape):
    pred, truth = np.ones(pred_shape, bool), np.ones(truth_shape, bool)
    for call in (lambda: score_masks(pred, truth, (1, 1, 1)), lambda: hausdorff95(pred, truth, (1, 1, 1)),
                 lambda: normalized_surface_dice(pred, truth, (1, 1, 1), 2.0), lambda: dice(pred, truth),
                 lambda: surface_distances(pred, truth, (1, 1, 1))):
        with pytest.raises(GeometryError, match="3D|differ in shape"):
            call()


@pytest.mark.parametrize("spacing", [(1, 1, 0), (1, -1, 1), (1, 1), (1, 1, 1, 1), (1, float("nan"), 1),
                                     (1, 1, float("inf")), "1mm", None, 1.0])
def test_bad_spacing(spacing):
    mask = np.ones((5, 5, 5), bool)
    with pytest.raises(GeometryError, match="spacing"):
        score_masks(mask, mask, spacing)
    with pytest.raises(GeometryError, match="spacing"):
        hausdorff95(mask, mask, spacing)


@pytest.mark.parametrize("tolerance", [-1.0, float("nan"), float("inf"), "two"])
def test_bad_tolerance(tolerance):
    mask = np.ones((5, 5, 5), bool)
    with pytest.raises(ConfigError, match="tolerance"):
        normalized_surface_dice(mask, mask, (1, 1, 1), tolerance)
