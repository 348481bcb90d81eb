"""Brain extraction: the network sees only the brain, as on the skull-stripped scans it learned from.

Stage contract: after registration, before normalisation. ``skull_check(scan)`` says whether a
scan still has its skull (a channel without a constant background, or more foreground than a brain)
and warns where it cannot tell (a slab through the head); ``apply_brain_mask(scan, mask)`` returns the scan with every channel
set to 0 outside the mask (the background of skull-stripped training data) on the same grid;
``grow`` adds the safety margin the applied mask has; ``brain_summary`` and ``tumour_at_border``
describe the mask for the report. The mask itself comes
from an extractor (``BrainExtractor``: a reference-grid image and its RAS affine in, a boolean mask
on the same grid out), loaded once per process by :mod:`tumorseg.hdbet`; nothing here loads a network.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from scipy import ndimage

from ..scan import Scan, voxel_spacing, voxel_volume_ml
from . import normalize

#: A brain outside this range (mL) is reported as implausible: adult brains are about 1000-1600 mL,
#: with the cerebellum and brainstem the masks of brain-extraction tools reach about 1900.
PLAUSIBLE_BRAIN_ML = (900.0, 2000.0)
#: The brain mask is grown by this margin (mm) before it is applied: a cortical lesion at the brain's
#: surface must not be cut off. HD-BET's mask left 9 % of the expert lesion of lesion-t1c brain2 (a
#: real metastasis at the cortex, 6.5 mm slices) outside, all within 2.4 mm of the mask.
MARGIN_MM = 3.0
#: A skull-stripped scan's foreground is its brain (BraTS: 1500-1650 mL); more is a head (mL).
MAX_BRAIN_FOREGROUND_ML = 2100.0
#: A foreground that reaches both ends of the field of view along one axis, over at least this area
#: (cm2) at each, is a slab through the head or brain: its volume cannot tell which. The 20 real
#: skull-stripped brains in ../shared/data reach one end at most (the cerebellum, up to 37 cm2).
SLAB_FACE_CM2 = 10.0
#: A foreground cut by one end of the field of view over at least this area (cm2) may be a head cut
#: there as well as a brain: the real skull-stripped brains reach an end over 37 cm2 at most; Colin27's
#: head (its air exactly 0) cut 20 mm below its vertex has a 99 cm2 face and holds 99 mL.
CUT_FACE_CM2 = 60.0
#: Tumour within this distance (mm) of the mask's edge lies at the border.
BORDER_MM = 3.0
#: A share of the tumour's surface at the mask's border that suggests the mask cut the tumour: a
#: tumour cut in half puts about 40 % of its surface on the cut; the default model's cortical false
#: positives on the real metastasis of lesion-t1c brain1 put 5 % there, its expert label 0.5 %.
BORDER_WARN_SHARE = 0.3
#: Tumours smaller than this (mL) are not judged.
BORDER_MIN_ML = 1.0

class BrainExtractor(Protocol):
    """A brain-extraction method: ``(image (I, J, K), affine RAS) -> bool mask (I, J, K)``."""

    name: str

    def __call__(self, image: np.ndarray, affine: np.ndarray) -> np.ndarray: ...


def skull_check(scan: Scan) -> tuple[bool, str | None]:
    """Whether the scan still has its skull, and (where it seems not to) a warning when that cannot
    be told. It has: some channel has no constant background (skull-stripped scans keep one), or the
    voxels off the background hold more than a brain does (a head whose scanner set the air around
    it to exactly 0). It cannot be told: the foreground is a slab cut by the field of view, or is cut
    at one end over more than a brain's cut face, so its volume says nothing (a 60 mm slab of such a
    head holds 1667 mL: a brain's volume)."""
    masks = normalize.channel_masks(scan.array)
    if masks is None:
        return True, None
    foreground = np.logical_or.reduce(masks)
    if float(np.count_nonzero(foreground)) * voxel_volume_ml(scan.affine) > MAX_BRAIN_FOREGROUND_ML:
        return True, None
    spacing = voxel_spacing(scan.affine)
    for axis in range(3):
        face_cm2 = float(np.prod(np.delete(spacing, axis))) / 100.0
        ends = [np.count_nonzero(np.take(foreground, end, axis=axis)) * face_cm2 for end in (0, -1)]
        if min(ends) >= SLAB_FACE_CM2:
            cut = "is a slab through the head (its foreground reaches both ends of the field of view)"
        elif max(ends) >= CUT_FACE_CM2:
            cut = (f"is cut by the field of view over {max(ends):.0f} cm2 (a skull-stripped brain's foreground "
                   f"reaches an end over under {CUT_FACE_CM2:.0f} cm2)")
        else:
            continue
        return False, (f"the scan {cut}, so whether it is skull-stripped cannot be told from its volume, and the "
                       "brain was not extracted: if the scan still has its skull, rerun with --brain-extraction on")
    return False, None


def apply_brain_mask(scan: Scan, mask: np.ndarray) -> Scan:
    """Every channel 0 outside ``mask`` (bool, the scan's spatial shape); same grid and metadata."""
    if mask.shape != scan.spatial_shape:
        raise ValueError(f"brain mask of shape {mask.shape} on a scan of shape {scan.spatial_shape}")
    array = np.where(mask[np.newaxis], scan.array, np.float32(0)).astype(np.float32, copy=False)
    return scan.with_array(array)


def grow(mask: np.ndarray, affine: np.ndarray, margin_mm: float = MARGIN_MM) -> np.ndarray:
    """``mask`` with every voxel within ``margin_mm`` of it (distances in mm, any voxel size)."""
    if not mask.any():
        return mask.copy()
    spacing = voxel_spacing(affine)
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= margin_mm


def brain_summary(mask: np.ndarray, affine: np.ndarray, method: str, sequence: str) -> dict[str, Any]:
    """The report's ``brain``: method, the sequence it saw, the brain's volume (mL, the extractor's
    mask before the margin), the margin, and a warning if the volume is implausible."""
    volume = float(mask.sum()) * voxel_volume_ml(affine)
    entry: dict[str, Any] = {"method": method, "from_sequence": sequence, "volume_ml": round(volume, 1),
                             "margin_mm": MARGIN_MM}
    low, high = PLAUSIBLE_BRAIN_ML
    if not low <= volume <= high:
        entry["warning"] = (f"the brain mask holds {volume:.0f} mL, outside the plausible {low:.0f}-{high:.0f} mL: "
                            "brain extraction may have failed (check brain_mask.nii.gz and overview.png)")
    return entry


def tumour_at_border(mask: np.ndarray, tumour: np.ndarray, affine: np.ndarray) -> str | None:
    """A warning when much of the tumour's surface lies at the mask's edge (the mask may have cut
    it), else None."""
    whole = float(tumour.sum()) * voxel_volume_ml(affine)
    if whole < BORDER_MIN_ML:
        return None
    spacing = voxel_spacing(affine)
    # The mask's own outer layer is at its edge whatever the voxel size (a 6.5 mm slice lies 6.5 mm
    # from the next one, never within BORDER_MM of it).
    shell = mask & ((ndimage.distance_transform_edt(mask, sampling=spacing) <= BORDER_MM)
                    | ~ndimage.binary_erosion(mask, border_value=1))
    # The surface's share by area (mm2 of voxel faces), not by voxel count: on thick slices a voxel
    # count weighs the faces across the slices many times over the rest.
    padded = np.pad(tumour, 1)
    total = at_edge = 0.0
    for axis in range(3):
        area = float(np.prod(np.delete(spacing, axis)))
        for step in (-1, 1):
            index = [slice(1, -1)] * 3
            index[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
            exposed = tumour & ~padded[tuple(index)]
            total += area * np.count_nonzero(exposed)
            at_edge += area * np.count_nonzero(exposed & shell)
    share = at_edge / total
    if share >= BORDER_WARN_SHARE:
        return (f"{100 * share:.0f} % of the tumour's surface ({whole:.1f} mL) lies at the brain mask's edge: the "
                "mask may have cut the tumour; check brain_mask.nii.gz and overview.png, or rerun with "
                "--brain-extraction off on a skull-stripped scan")
    return None
