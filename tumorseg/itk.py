"""The one bridge between tumorseg's RAS arrays and SimpleITK's LPS images, and the one way a
volume is resampled onto another grid (the DICOM study reader and the registration stage).

tumorseg arrays are indexed (i, j, k) with a RAS affine (nibabel's convention); SimpleITK arrays
are indexed [k, j, i] with origin, spacing and direction in LPS. Converted here, nowhere else.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: RAS <-> LPS (its own inverse): flips the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_sitk(array: np.ndarray, affine: np.ndarray):
    """A SimpleITK image for (I, J, K) ``array`` with RAS ``affine``."""
    import SimpleITK as sitk

    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
    return image


def ras_affine(image) -> np.ndarray:
    """The RAS affine of a SimpleITK image's first three axes."""
    dim = image.GetDimension()
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(np.array(image.GetSpacing(), dtype=np.float64)[:3])
    lps[:3, 3] = np.array(image.GetOrigin(), dtype=np.float64)[:3]
    return LPS_TO_RAS @ lps


def sitk_transform(matrix_ras: np.ndarray):
    """A SimpleITK transform for a 4x4 RAS matrix that maps a point of the reference's world to
    the same anatomy in the moving image's world (what ``Resample`` wants, in LPS)."""
    import SimpleITK as sitk

    lps = LPS_TO_RAS @ np.asarray(matrix_ras, dtype=np.float64) @ LPS_TO_RAS
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in lps[:3, :3].ravel()))
    transform.SetTranslation(tuple(float(v) for v in lps[:3, 3]))
    return transform


def lps_matrix(transform) -> np.ndarray:
    """A SimpleITK transform that is affine in fact, as a 4x4 LPS matrix: read off from where it
    sends the origin and the unit vectors (works for any wrapping: composite, Euler, affine)."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    lps = np.eye(4)
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        lps[:3, axis] = np.array(transform.TransformPoint(tuple(unit))) - origin
    lps[:3, 3] = origin
    return lps


def matrix_ras(transform) -> np.ndarray:
    """The 4x4 RAS matrix of a SimpleITK transform (fixed -> moving points): the inverse of
    :func:`sitk_transform`."""
    return LPS_TO_RAS @ lps_matrix(transform) @ LPS_TO_RAS


def resample_to_grid(array: np.ndarray, affine: np.ndarray, shape: Sequence[int],
                     reference_affine: np.ndarray, order: int = 1,
                     matrix_ras: np.ndarray | None = None, default: float = 0.0) -> tuple[np.ndarray, float]:
    """Resample float (I, J, K) ``array`` with RAS ``affine`` onto the grid (``shape``,
    ``reference_affine``); linear (``order`` 1) or nearest (0); ``default`` outside. ``matrix_ras`` (see
    :func:`sitk_transform`; None: the identity, scanner coordinates alone) maps reference world
    points into ``array``'s world. Returns the new float32 array and the fraction of its voxels
    that lie inside the source volume."""
    import SimpleITK as sitk

    transform = sitk.Transform() if matrix_ras is None else sitk_transform(matrix_ras)
    moving = to_sitk(array.astype(np.float32, copy=False), affine)
    fixed = to_sitk(np.zeros(tuple(shape), dtype=np.uint8), reference_affine)
    interpolator = sitk.sitkLinear if order == 1 else sitk.sitkNearestNeighbor
    out = sitk.Resample(moving, fixed, transform, interpolator, float(default), sitk.sitkFloat32)
    inside = sitk.Resample(to_sitk(np.ones(array.shape, dtype=np.uint8), affine), fixed,
                           transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    result = np.ascontiguousarray(sitk.GetArrayFromImage(out).transpose(2, 1, 0))
    covered = float(sitk.GetArrayViewFromImage(inside).mean())
    return result.astype(np.float32, copy=False), covered
