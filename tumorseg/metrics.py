"""Per-mask segmentation metrics on one voxel grid: Dice, HD95, normalised surface Dice, volumes.

Distances are in millimetres, using the voxel spacing of each array axis. numpy + scipy only.

Conventions (the text of :data:`CONVENTIONS` goes into reports and docs):

* Surface voxels are the voxels of a mask with a face neighbour outside it
  (``mask & ~binary_erosion(mask, 6-connected cross, border_value=0)``); voxels on the image
  border count as surface. This is MONAI's ``get_mask_edges`` definition.
* Dice: 1.0 when both masks are empty, 0.0 when exactly one is.
* HD95: the larger of the two directed 95th percentiles (linear interpolation) of surface-to-surface
  distances, as MONAI ``compute_hausdorff_distance(percentile=95, directed=False)``. 0.0 when both
  masks are empty; when exactly one is, the diagonal of the image's field of view in mm (373.13 mm
  for 240x240x155 at 1 mm, the BraTS convention) - a finite worst case, so means stay meaningful.
* NSD (Nikolov et al. 2021, voxel-count form, as MONAI ``compute_surface_dice(use_subvoxels=False)``):
  the fraction of both surfaces' voxels lying within the tolerance (distance <= tolerance) of the
  other surface. 1.0 when both masks are empty, 0.0 when exactly one is.
* Volumes in mL (voxel volume = |det| of the affine's 3x3 part / 1000 when it is given, which
  sheared grids need; else the product of the spacing / 1000); relative volume difference is
  (pred - truth) / truth, None when the truth is empty.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .errors import ConfigError, GeometryError

#: Connectivity of the erosion that defines surface voxels: 1 = the 6-connected (face) cross.
#: Surface voxels = ``mask & ~binary_erosion(mask, generate_binary_structure(3, 1), border_value=0)``,
#: i.e. voxels with a face neighbour outside the mask, voxels on the image border included
#: (the same definition as MONAI's ``get_mask_edges``).
SURFACE_CONNECTIVITY = 1

#: Default NSD tolerance: about one to two voxels at the usual 1 mm BraTS grid.
DEFAULT_NSD_TOLERANCE_MM = 2.0

_STRUCTURE = ndimage.generate_binary_structure(3, SURFACE_CONNECTIVITY)

CONVENTIONS: dict[str, str] = {
    "dice": "Dice = 2|P and T| / (|P| + |T|) over voxels; 1.0 when both prediction and truth are empty, "
            "0.0 when exactly one is.",
    "hd95_mm": "HD95 (mm) = the larger of the two directed 95th percentiles (linear interpolation) of the "
               "distances from each surface voxel (a voxel with a face neighbour outside the mask, image-border "
               "voxels included) to the nearest surface voxel of the other mask, as MONAI "
               "compute_hausdorff_distance(percentile=95, directed=False); 0.0 when both masks are empty, and "
               "the diagonal of the image's field of view in mm when exactly one is (373.13 mm for 240x240x155 "
               "at 1 mm, the BraTS convention).",
    "nsd": "NSD (normalised surface Dice, Nikolov et al. 2021, voxel-count form as MONAI "
           "compute_surface_dice(use_subvoxels=False)) = (surface voxels of each mask within the tolerance, "
           "distance <= tolerance, of the other mask's surface) / (surface voxels of both masks), tolerance "
           f"{DEFAULT_NSD_TOLERANCE_MM:g} mm unless stated; 1.0 when both masks are empty, 0.0 when exactly one is.",
    "volume_ml": "Volumes in mL = voxel count x voxel volume / 1000, the voxel volume being |det| of the "
                 "image affine's 3x3 part in mm^3 (the product of the voxel spacing unless the grid is sheared); "
                 "the volume difference is prediction minus truth.",
    "relative_volume_diff": "Relative volume difference = (prediction - truth volume) / truth volume; "
                            "none (null) when the truth is empty.",
}


def _validate_masks(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks, or GeometryError when they are not 3D on one grid."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 3 or b.ndim != 3:
        raise GeometryError(f"masks must be 3D, got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise GeometryError(f"prediction {a.shape} and ground truth {b.shape} differ in shape")
    return _as_bool(a, "prediction"), _as_bool(b, "ground truth")


def _validate(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean masks and a float spacing, or GeometryError saying what is wrong."""
    a, b = _validate_masks(a, b)
    try:
        sp = np.asarray(spacing, dtype=np.float64)
    except (TypeError, ValueError):
        raise GeometryError(f"voxel spacing must be 3 numbers (mm), got {spacing!r}") from None
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise GeometryError(f"voxel spacing must be 3 positive finite numbers (mm), got {spacing!r}")
    return a, b, sp


def _as_bool(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype == bool:
        return x
    if not np.issubdtype(x.dtype, np.integer):
        # Floats would need a threshold we do not want to guess (probabilities? labels?).
        raise TypeError(f"{what} mask must be boolean or integer (nonzero = inside), got dtype {x.dtype}")
    return x != 0


def _crop_box(union: np.ndarray) -> tuple[slice, ...] | None:
    """Per-axis (start, stop) of the bounding box of ``union`` grown by 1 voxel, or None when empty.

    The box may reach 1 voxel past the image border; :func:`_crop` zero-pads there, so image-border
    voxels stay surface voxels exactly as when eroding the full image with border_value=0.
    """
    box = []
    for axis in range(union.ndim):
        others = tuple(i for i in range(union.ndim) if i != axis)
        idx = np.flatnonzero(union.any(axis=others))
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]) - 1, int(idx[-1]) + 2))
    return tuple(box)


def _crop(x: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    out = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    src = tuple(slice(max(s.start, 0), min(s.stop, n)) for s, n in zip(box, x.shape))
    dst = tuple(slice(c.start - s.start, c.stop - s.start) for c, s in zip(src, box))
    out[dst] = x[src]
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=_STRUCTURE, border_value=0)


def _distances_to(surface_from: np.ndarray, surface_to: np.ndarray, spacing: np.ndarray,
                  sheared: np.ndarray | None = None) -> np.ndarray:
    """Distance (mm) from each voxel of ``surface_from`` (C order) to the nearest of ``surface_to``.

    ``sheared``: the 3x3 voxel-to-world matrix of a grid whose axes are not orthogonal; the
    distance transform's per-axis spacing cannot express it, so distances are measured between
    world points (a k-d tree: exact, slower)."""
    n = int(np.count_nonzero(surface_from))
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    if not surface_to.any():
        return np.full(n, np.inf)  # nothing to reach
    if sheared is not None:
        from scipy.spatial import cKDTree

        to_world = np.argwhere(surface_to).astype(np.float64) @ sheared.T
        from_world = np.argwhere(surface_from).astype(np.float64) @ sheared.T
        return cKDTree(to_world).query(from_world)[0]
    # distance_transform_edt(~surface_to, sampling=spacing) read at surface_from. Exact on the
    # cropped array: every surface voxel lies inside it, so the nearest one is found there.
    # We ask scipy for the feature transform (index of the nearest surface_to voxel) only and form
    # the distances at surface_from's voxels exactly as scipy would (same float64 operations), which
    # halves the time against forming the dense distance map.
    nearest = ndimage.distance_transform_edt(~surface_to, sampling=spacing,
                                             return_distances=False, return_indices=True)
    at = np.nonzero(surface_from)
    delta = (nearest[(slice(None), *at)] - np.stack(at).astype(nearest.dtype)).astype(np.float64)
    delta *= spacing[:, None]
    return np.sqrt(np.add.reduce(delta * delta, axis=0))


def _surfaces(a: np.ndarray, b: np.ndarray, crop: bool) -> tuple[np.ndarray, np.ndarray]:
    if crop:
        box = _crop_box(a | b)
        if box is None:
            empty = np.zeros((0, 0, 0), dtype=bool)
            return empty, empty
        a, b = _crop(a, box), _crop(b, box)
    return _surface(a), _surface(b)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float], *,
                      crop: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``a`` to the nearest surface voxel of ``b``, and ``b`` to ``a``.

    Surface voxels follow :data:`SURFACE_CONNECTIVITY`; arrays are in C order of the voxels. A mask
    with no surface gives an empty array; distances towards an empty mask are ``inf``. ``crop``
    (default) works on the bounding box of ``a | b`` plus a 1-voxel zero margin, which is exact
    and much faster; ``crop=False`` exists to test that.
    """
    return _surface_distances(*_validate(a, b, spacing), crop=crop)


def _surface_distances(a: np.ndarray, b: np.ndarray, sp: np.ndarray,
                       crop: bool = True, sheared: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    sa, sb = _surfaces(a, b, crop)
    return _distances_to(sa, sb, sp, sheared), _distances_to(sb, sa, sp, sheared)


def _sheared(axes: np.ndarray | None) -> np.ndarray | None:
    """``axes`` (a 3x3 voxel-to-world matrix) when its columns are not orthogonal, else None."""
    if axes is None:
        return None
    m = np.asarray(axes, dtype=np.float64)[:3, :3]
    gram = m.T @ m
    norms = np.sqrt(np.diag(gram))
    cosines = gram / np.outer(norms, norms) - np.eye(3)
    return m if np.abs(cosines).max() > 1e-6 else None


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap; 1.0 when both masks are empty, 0.0 when exactly one is."""
    return _dice(*_validate_masks(pred, truth))


def _dice(p: np.ndarray, t: np.ndarray) -> float:
    denom = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    return 1.0 if denom == 0 else 2.0 * int(np.count_nonzero(p & t)) / denom


def _fov_diagonal_mm(shape: tuple[int, ...], spacing: np.ndarray) -> float:
    return float(math.sqrt(float(np.sum((np.asarray(shape, dtype=np.float64) * spacing) ** 2))))


def _hd95(d_pt: np.ndarray, d_tp: np.ndarray, p_empty: bool, t_empty: bool, shape, sp: np.ndarray) -> float:
    if p_empty and t_empty:
        return 0.0
    if p_empty or t_empty:
        return _fov_diagonal_mm(shape, sp)
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def _nsd(d_pt: np.ndarray, d_tp: np.ndarray, p_empty: bool, t_empty: bool, tolerance_mm: float) -> float:
    if p_empty and t_empty:
        return 1.0
    if p_empty or t_empty:
        return 0.0
    within = int(np.count_nonzero(d_pt <= tolerance_mm)) + int(np.count_nonzero(d_tp <= tolerance_mm))
    return within / (d_pt.size + d_tp.size)


def _check_tolerance(tolerance_mm: float) -> float:
    try:
        tol = float(tolerance_mm)
    except (TypeError, ValueError):
        raise ConfigError(f"NSD tolerance must be a number of mm, got {tolerance_mm!r}") from None
    if not math.isfinite(tol) or tol < 0:
        raise ConfigError(f"NSD tolerance must be a finite number >= 0 mm, got {tolerance_mm!r}")
    return tol


def hausdorff95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm); see :data:`CONVENTIONS` for empty masks."""
    p, t, sp = _validate(pred, truth, spacing)
    d_pt, d_tp = _surface_distances(p, t, sp)
    return _hd95(d_pt, d_tp, not p.any(), not t.any(), p.shape, sp)


def normalized_surface_dice(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                            tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (voxel-count form); see :data:`CONVENTIONS`."""
    tol = _check_tolerance(tolerance_mm)
    p, t, sp = _validate(pred, truth, spacing)
    d_pt, d_tp = _surface_distances(p, t, sp)
    return _nsd(d_pt, d_tp, not p.any(), not t.any(), tol)


@dataclass(frozen=True)
class MaskScores:
    """All metrics of one prediction mask against its ground-truth mask."""

    dice: float
    hd95_mm: float
    nsd: float
    volume_pred_ml: float
    volume_truth_ml: float
    volume_diff_ml: float  # prediction - truth
    relative_volume_diff: float | None  # volume_diff_ml / volume_truth_ml; None when the truth is empty

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


def score_masks(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM, voxel_ml: float | None = None,
                affine: np.ndarray | None = None) -> MaskScores:
    """Every metric of :class:`MaskScores`, computing the surface distances once. ``voxel_ml``:
    the voxel volume from the image affine (``scan.voxel_volume_ml``); default the product of
    ``spacing``, which is the same unless the grid is sheared. ``affine``: the grid's affine; a
    sheared one has its surface distances measured in world coordinates."""
    tol = _check_tolerance(tolerance_mm)
    p, t, sp = _validate(pred, truth, spacing)
    d_pt, d_tp = _surface_distances(p, t, sp, sheared=_sheared(affine))
    n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    if voxel_ml is None:
        voxel_ml = float(np.prod(sp)) / 1000.0
    elif not (math.isfinite(voxel_ml) and voxel_ml > 0):
        raise ConfigError(f"voxel volume must be a positive number of mL, got {voxel_ml}")
    vol_p, vol_t = n_p * voxel_ml, n_t * voxel_ml
    diff = (n_p - n_t) * voxel_ml
    return MaskScores(
        dice=_dice(p, t),
        hd95_mm=_hd95(d_pt, d_tp, n_p == 0, n_t == 0, p.shape, sp),
        nsd=_nsd(d_pt, d_tp, n_p == 0, n_t == 0, tol),
        volume_pred_ml=vol_p,
        volume_truth_ml=vol_t,
        volume_diff_ml=diff,
        relative_volume_diff=None if n_t == 0 else (n_p - n_t) / n_t,
    )
