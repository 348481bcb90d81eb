"""Scoring label maps against ground truth, region by region (WT, TC, ET).

Prediction and ground truth may use different label schemes: each is turned into region masks
through its own scheme, so no label conversion (and no guess) is needed. Dice is 1.0 when
both masks are empty and 0.0 when exactly one is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GeometryError, InputError
from .labels import REGIONS, LabelScheme
from .metrics import dice
from .scan import grid_difference, same_grid
from .stages.read import read_volume


def region_scores(pred: np.ndarray, pred_scheme: LabelScheme, truth: np.ndarray, truth_scheme: LabelScheme) -> dict[str, float]:
    """Dice per region for two label maps on one grid, each in its own scheme."""
    if pred.shape != truth.shape:
        raise GeometryError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
    truth_scheme.validate_array(truth, "ground truth")
    pred_scheme.validate_array(pred, "prediction")
    return {r: dice(pred_scheme.region_mask(pred, r), truth_scheme.region_mask(truth, r)) for r in REGIONS}


@dataclass(frozen=True)
class LabelFile:
    """A label map read from a file, ground truth or prediction, with its voxel-to-world affine."""

    labels: np.ndarray
    affine: np.ndarray


#: Largest distance of a label voxel from an integer (float storage rounding); more is refused.
LABEL_ROUNDING = 1e-3


def read_label_file(path: Path) -> LabelFile:
    """A label map (ground truth or prediction). Non-integer values are refused, not rounded: a
    probability map or a linearly resampled label map would otherwise be scored as labels."""
    volume = read_volume(path, allow_constant=True)
    labels = np.rint(volume.array)
    off = np.abs(volume.array - labels) > LABEL_ROUNDING
    if off.any():
        raise InputError(
            f"not a label map: {int(off.sum())} voxels hold non-integer values (e.g. "
            f"{float(volume.array[off][0]):g}); give integer labels (nearest-neighbour resampling)",
            path,
        )
    return LabelFile(labels.astype(np.int64), volume.affine)


def check_same_grid(shape: tuple[int, ...], affine: np.ndarray, truth: LabelFile, path: Path) -> None:
    """Refuse ground truth whose shape or affine differs from its scan's grid."""
    if not same_grid(truth.labels.shape, truth.affine, shape, affine):
        raise GeometryError(
            f"ground truth (shape {truth.labels.shape}) is not on the grid of the scan it belongs to "
            f"(shape {tuple(shape)}; {grid_difference(truth.affine, affine)})", path)
