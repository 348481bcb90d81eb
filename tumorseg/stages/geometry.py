"""Geometry stage: from the input grid to the model's grid and back, exactly invertible.

Forward, in order: crop to the bounding box of the brain region (plus a margin), reorder and flip
axes to the closest RAS orientation (no interpolation), resample to the model's spacing
(trilinear, ``align_corners=False``), and, where asked (``mirror_cuts_mm``: the pipeline asks for a
brain it extracted), extend the grid by mirroring it across each cut through the brain by the field
of view (the network then sees tissue on both sides of the cut, not a wall of zeros). The inverse
undoes each step on the class probabilities, so the label map is decided on the input's own voxels
and lands on exactly its grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import inv_ornt_aff, io_orientation

from ..errors import GeometryError
from ..scan import Scan, voxel_spacing, voxel_volume_ml

#: Spacing within this fraction of the model's is used as it is, without resampling.
SPACING_TOLERANCE = 0.05
#: The largest model grid planned (512 mm a side at 1 mm, the input's own limit): more means a
#: voxel size no MR scan has, such as micrometres read as millimetres.
MAX_MODEL_GRID_VOXELS = 512**3
#: Voxels kept around the non-zero bounding box.
CROP_MARGIN = 2
#: The brain region is cut, not at its own end, toward a face of the scan where its outermost section
#: holds at least ``CUT_MIN_AREA_MM2`` (a few voxels of brainstem are not a cut) and lies within
#: ``CUT_REACH_MM`` of that face: the field of view ended inside the brain, or the brain mask stopped
#: short of the scan's edge (HD-BET leaves the last two 6.5 mm slices of lesion-t1c brain1 out).
CUT_MIN_AREA_MM2 = 100.0
CUT_REACH_MM = 15.0


@dataclass(frozen=True)
class GridTransform:
    """How the model grid was made from the input grid (all shapes are spatial, 3 entries)."""

    input_shape: tuple[int, int, int]
    crop: tuple[tuple[int, int], ...]  # (start, stop) per input axis
    #: ``orientation[i] = (output_axis, flip)`` for input axis i (nibabel's ornt, as ints).
    orientation: tuple[tuple[int, int], ...]
    oriented_shape: tuple[int, int, int]
    #: The oriented box at the model's spacing, before mirroring.
    resampled_shape: tuple[int, int, int]
    #: One input voxel's volume (mL): what decoding measures component sizes in.
    input_voxel_ml: float
    #: Of the model grid (mirrored margins included).
    model_affine: np.ndarray
    #: Model-grid voxels mirrored in (before, after) per model axis, at cuts through the brain.
    mirrored: tuple[tuple[int, int], ...] = ((0, 0), (0, 0), (0, 0))

    @property
    def resampled(self) -> bool:
        return self.oriented_shape != self.resampled_shape

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """The grid the network sees."""
        return tuple(n + a + b for n, (a, b) in zip(self.resampled_shape, self.mirrored))  # type: ignore[return-value]


def plan_transform(
    scan: Scan, spacing_mm: tuple[float, float, float], brain: np.ndarray | None = None,
    mirror_cuts_mm: float = 0.0,
) -> GridTransform:
    """Plan the forward transform for ``scan`` onto a grid of ``spacing_mm`` (RAS axes).

    ``brain`` (I, J, K) bool is the region to keep; None keeps the whole image.
    ``mirror_cuts_mm``: how far to mirror the grid across each face of the scan that cuts through
    ``brain`` (at most the box's own extent); 0 mirrors nothing.
    """
    cuts = cut_faces(brain, voxel_spacing(scan.affine)) if brain is not None and mirror_cuts_mm > 0 else []
    box = [list(c) for c in (_bounding_box(brain) if brain is not None else ((0, n) for n in scan.spatial_shape))]
    for axis, side, index in cuts:  # mirrored across the brain's last section, not the margin beyond it
        box[axis][side] = index + side  # start at it, or stop just after it
    crop = tuple((a, b) for a, b in box)
    crop_affine = scan.affine.copy()
    crop_affine[:3, 3] = scan.affine[:3, :3] @ [c[0] for c in crop] + scan.affine[:3, 3]
    cropped_shape = tuple(stop - start for start, stop in crop)
    ornt = io_orientation(scan.affine)
    oriented_shape = tuple(int(cropped_shape[i]) for i in np.argsort(ornt[:, 0]))
    oriented_affine = crop_affine @ inv_ornt_aff(ornt, cropped_shape)
    spacing = voxel_spacing(oriented_affine)
    target = np.asarray(spacing_mm, dtype=np.float64)
    resampled_shape = tuple(
        n if abs(s - t) <= SPACING_TOLERANCE * t else max(1, int(round(n * s / t)))
        for n, s, t in zip(oriented_shape, spacing, target)
    )
    if (planned := float(np.prod(resampled_shape, dtype=np.float64))) > MAX_MODEL_GRID_VOXELS:
        raise GeometryError(f"the scan would fill {planned:.3g} voxels on the model's {target.tolist()} mm grid (at "
                            f"most {MAX_MODEL_GRID_VOXELS:.3g}): its voxels of {np.round(spacing, 4).tolist()} mm are "
                            "not an MR scan's; check the header's voxel size and units")
    # Voxel i' of the new grid sits at continuous index (i' + 0.5) * n / n' - 0.5 of the old one.
    ratio = np.array(oriented_shape, dtype=np.float64) / np.array(resampled_shape, dtype=np.float64)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(ratio)
    scale[:3, 3] = 0.5 * ratio - 0.5
    mirrored = [[0, 0], [0, 0], [0, 0]]
    for axis, side, _ in cuts:
        model_axis, flip = int(ornt[axis, 0]), int(ornt[axis, 1])
        width = int(round(mirror_cuts_mm / target[model_axis]))
        mirrored[model_axis][side if flip == 1 else 1 - side] = min(width, resampled_shape[model_axis])
    shift = np.eye(4)
    shift[:3, 3] = [-before for before, _ in mirrored]
    return GridTransform(
        input_shape=scan.spatial_shape,
        crop=crop,
        orientation=tuple((int(a), int(f)) for a, f in ornt),
        oriented_shape=oriented_shape,  # type: ignore[arg-type]
        resampled_shape=resampled_shape,  # type: ignore[arg-type]
        input_voxel_ml=voxel_volume_ml(scan.affine),
        model_affine=oriented_affine @ scale @ shift,
        mirrored=tuple((a, b) for a, b in mirrored),
    )


def cut_faces(brain: np.ndarray, spacing: np.ndarray) -> list[tuple[int, int, int]]:
    """``(axis, side, index)`` for each face of the scan toward which ``brain`` is cut (see
    ``CUT_REACH_MM``): side 0 is index 0's face, 1 the last index's; ``index`` is the brain's
    outermost section toward it."""
    faces = []
    for axis in range(3):
        hits = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        if hits.size == 0:
            return []
        area = float(np.prod([spacing[a] for a in range(3) if a != axis]))
        for side, index, gap in ((0, hits[0], hits[0]), (1, hits[-1], brain.shape[axis] - 1 - hits[-1])):
            if gap * spacing[axis] <= CUT_REACH_MM and \
                    np.count_nonzero(np.take(brain, index, axis=axis)) * area >= CUT_MIN_AREA_MM2:
                faces.append((axis, side, int(index)))
    return faces


def to_model_grid(scan: Scan, transform: GridTransform) -> Scan:
    """A new Scan on the model grid (float32, channels first); ``scan`` is left untouched."""
    box = tuple(slice(a, b) for a, b in transform.crop)
    array = _orient(scan.array[(slice(None),) + box], transform.orientation)
    if transform.resampled:
        array = _resize(array, transform.resampled_shape)
    array = _mirror(array, transform.mirrored)
    return scan.with_array(np.ascontiguousarray(array, dtype=np.float32), transform.model_affine)


def probabilities_to_input_grid(probs: np.ndarray, transform: GridTransform) -> np.ndarray:
    """Class probabilities (L, *model_shape) back on the input grid (L, *input_shape).

    Outside the cropped box every voxel is background (channel 0 = 1).
    """
    if probs.shape[1:] != transform.model_shape:
        raise ValueError(f"probabilities of shape {probs.shape} for model grid {transform.model_shape}")
    probs = probs[(slice(None),) + tuple(slice(a, a + n) for n, (a, _) in zip(transform.resampled_shape,
                                                                           transform.mirrored))]
    full = np.zeros((probs.shape[0],) + transform.input_shape, dtype=np.float32)
    full[0] = 1.0
    box = tuple(slice(a, b) for a, b in transform.crop)
    # One class at a time, written straight into place: a 512 x 512 x 400 input held three
    # full-size copies of every class here (4.4 GB for four classes), now one.
    for c in range(probs.shape[0]):
        channel = _resize(probs[c:c + 1], transform.oriented_shape) if transform.resampled else probs[c:c + 1]
        full[(slice(c, c + 1),) + box] = _unorient(channel, transform.orientation, contiguous=False)
    return full


def labels_to_model_grid(labels: np.ndarray, transform: GridTransform) -> np.ndarray:
    """An integer (or boolean) array (I, J, K) on the model grid, by nearest neighbour."""
    box = tuple(slice(a, b) for a, b in transform.crop)
    array = _orient(labels[box][None], transform.orientation)
    if transform.resampled:
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
        # nearest-exact samples voxel centres as trilinear with align_corners=False does.
        array = F.interpolate(tensor, size=transform.resampled_shape, mode="nearest-exact")[0].numpy()
    return np.ascontiguousarray(_mirror(array, transform.mirrored)[0]).astype(labels.dtype)


def _mirror(array: np.ndarray, mirrored: tuple[tuple[int, int], ...]) -> np.ndarray:
    """``array`` (C, X, Y, Z) extended by its mirror image across each face (the face voxel repeated)."""
    if not any(a or b for a, b in mirrored):
        return array
    return np.pad(array, ((0, 0),) + tuple(mirrored), mode="symmetric")


def _bounding_box(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    nonzero = mask
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(nonzero.any(axis=other))
        n = nonzero.shape[axis]
        if hits.size == 0:
            box.append((0, n))
        else:
            box.append((max(0, int(hits[0]) - CROP_MARGIN), min(n, int(hits[-1]) + 1 + CROP_MARGIN)))
    return tuple(box)


def _orient(array: np.ndarray, ornt: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Flip input axes marked -1, then move input axis i to output axis ornt[i][0]."""
    for axis, (_, flip) in enumerate(ornt):
        if flip == -1:
            array = np.flip(array, axis=axis + 1)
    order = [0] + [1 + i for i in np.argsort([a for a, _ in ornt])]
    return np.transpose(array, order)


def _unorient(array: np.ndarray, ornt: tuple[tuple[int, int], ...], contiguous: bool = True) -> np.ndarray:
    order = [0] + [1 + a for a, _ in ornt]
    array = np.transpose(array, order)
    for axis, (_, flip) in enumerate(ornt):
        if flip == -1:
            array = np.flip(array, axis=axis + 1)
    return np.ascontiguousarray(array) if contiguous else array


def _resize(array: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    out = F.interpolate(tensor, size=tuple(shape), mode="trilinear", align_corners=False)
    return out[0].numpy()
