"""Postprocess stage: clean the label map. Pure functions: the input array is never modified.

Order: components of the whole tumour below ``tumour_min_component_ml`` are removed; then, for
each configured label in label order: smoothing (opening, then closing, with an ellipsoid of
the given radius in mm), removal of its small components, keep-largest; then, once every label
has lost what it loses, hole filling (so that an enhancing speck removed inside the core leaves
no hole there). Voxels a label loses become background; hole filling only claims background
voxels, so it never overwrites another label (necrosis inside an enhancing rim stays necrosis).
"""
from __future__ import annotations

import cc3d
import numpy as np
from scipy import ndimage

from ..config import LabelPostprocess, PostprocessConfig
from ..labels import LabelScheme
from ..scan import voxel_spacing, voxel_volume_ml

CONNECTIVITY = 26


def postprocess(
    labels: np.ndarray, affine: np.ndarray, config: PostprocessConfig, scheme: LabelScheme
) -> np.ndarray:
    """Return a cleaned copy of ``labels`` (I, J, K) uint8 on the grid of ``affine``."""
    out = np.array(labels, dtype=np.uint8, copy=True)
    spacing_mm = voxel_spacing(affine)
    voxel_ml = voxel_volume_ml(affine)  # the report's voxel volume, so thresholds match its volumes
    if config.tumour_min_component_ml > 0:
        keep = remove_small_components(out > 0, config.tumour_min_component_ml / voxel_ml)
        out[~keep] = 0
    for name in config.labels:
        scheme.label(name)  # unknown names are errors
    configured = [(label.value, config.labels[label.name]) for label in scheme.labels  # label order,
                  if label.name in config.labels]  # whatever the order of the pipeline file
    for value, settings in configured:
        _clean_label(out, value, settings, spacing_mm, voxel_ml)
    for value, settings in configured:
        if settings.fill_holes and (mask := out == value).any():
            out[ndimage.binary_fill_holes(mask) & (out == 0)] = value
    return out


def _clean_label(
    out: np.ndarray, value: int, settings: LabelPostprocess, spacing_mm: np.ndarray, voxel_ml: float
) -> None:
    mask = out == value
    if not mask.any():
        return
    if settings.smoothing_radius_mm > 0:
        ball = ellipsoid(settings.smoothing_radius_mm, spacing_mm)
        # The mask continued beyond the field of view: with the image's edge as background, the
        # closing ate tumour that reaches the edge (whole slices at 6.5 mm).
        pad = [(n // 2, n // 2) for n in ball.shape]
        smooth = ndimage.binary_closing(ndimage.binary_opening(np.pad(mask, pad, mode="edge"), ball), ball)
        smooth = smooth[tuple(slice(before, before + n) for (before, _), n in zip(pad, mask.shape))]
        # Smoothing may only claim background or this label, never another label's voxels.
        smooth &= (out == 0) | mask
        mask = smooth
    if settings.min_component_ml > 0:
        mask = remove_small_components(mask, settings.min_component_ml / voxel_ml)
    if settings.keep_largest:
        mask = largest_component(mask)
    out[(out == value) & ~mask] = 0
    out[mask] = value


def remove_small_components(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    """``mask`` without its 26-connected components of fewer than ``min_voxels`` voxels."""
    if not mask.any():
        return mask.copy()
    components = cc3d.connected_components(mask, connectivity=CONNECTIVITY)
    sizes = np.bincount(components.ravel())
    # A component of exactly the threshold's volume stays: 0.1 mL of 1 x 1 x 5 mm voxels is 20 of
    # them, but the determinant's rounding makes the threshold 20.000000000000004.
    keep = sizes >= min_voxels * (1 - 1e-9)
    keep[0] = False
    return keep[components]


def largest_component(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask.copy()
    components = cc3d.connected_components(mask, connectivity=CONNECTIVITY)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def count_components(mask: np.ndarray) -> int:
    if not mask.any():
        return 0
    return int(cc3d.connected_components(mask, connectivity=CONNECTIVITY).max())


def ellipsoid(radius_mm: float, spacing_mm: np.ndarray) -> np.ndarray:
    """Boolean structuring element: a ball of ``radius_mm`` on a grid of ``spacing_mm``."""
    half = [max(0, int(np.floor(radius_mm / s))) for s in spacing_mm]
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing_mm)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-9
