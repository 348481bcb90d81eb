"""Normalize stage: per-channel z-score inside the brain, after percentile clipping.

The brain region is where any channel differs from its constant background. Skull-stripped
scans have one: the value (0, or -3.16 in z-scored BraTS 2015 files) that fills most of the
image border. Scans with skull and noise have none, and the region is the whole image.
Outside it every channel is set to 0, the value a missing sequence's channel also gets.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..model import Normalization
from ..scan import Scan


#: A border value is the background when at least this fraction of border voxels hold it.
BACKGROUND_BORDER_FRACTION = 0.5


def background_value(channel: np.ndarray) -> float | None:
    """The constant background of one channel (I, J, K), or None when it has none."""
    faces = [channel[0], channel[-1], channel[:, 0], channel[:, -1], channel[:, :, 0], channel[:, :, -1]]
    border = np.concatenate([f.ravel() for f in faces])
    values, counts = np.unique(border, return_counts=True)
    best = int(np.argmax(counts))
    return float(values[best]) if counts[best] >= BACKGROUND_BORDER_FRACTION * border.size else None


#: A channel holding image data over less of the brain region than this is reported (partial
#: field of view, a sequence registered off the others). Real multi-sequence scans: 0.997-1.0.
PARTIAL_COVERAGE_FRACTION = 0.9


def channel_masks(array: np.ndarray) -> list[np.ndarray] | None:
    """For each channel of ``array`` (C, I, J, K), where it differs from its constant background;
    None when a channel has none (scans with skull and noise)."""
    masks = []
    for channel in array:
        background = background_value(channel)
        if background is None:
            return None
        masks.append(channel != background)
    return masks


def channel_coverage(array: np.ndarray) -> list[float] | None:
    """For each channel of ``array`` (C, I, J, K), the fraction of the brain region (the union over
    channels, :func:`brain_mask`) where it differs from its own background; None when the scan has
    no constant background. Outside its coverage a channel is background, which ``normalize``
    turns into its lowest z-score, so the network sees tissue there as dark."""
    masks = channel_masks(array)
    if masks is None:
        return None
    total = int(np.count_nonzero(np.logical_or.reduce(masks)))
    return [int(np.count_nonzero(m)) / total if total else 0.0 for m in masks]


def brain_mask(array: np.ndarray) -> np.ndarray:
    """Voxels where any channel of ``array`` (C, I, J, K) differs from its constant background;
    every voxel when a channel has none."""
    masks = channel_masks(array)
    return np.ones(array.shape[1:], dtype=bool) if masks is None else np.logical_or.reduce(masks)


def channel_statistics(values: np.ndarray, params: Normalization, name: str = "",
                       path=None) -> tuple[float, float, np.floating, float]:
    """The clip bounds, mean and standard deviation of one channel's ``values`` inside the brain
    region (``normalize``); an InputError when the channel is constant there after clipping."""
    lo, hi = np.percentile(values, [params.lower_percentile, params.upper_percentile])
    clipped = np.clip(values, lo, hi)
    mean, std = clipped.mean(), float(clipped.std())
    if not std > 1e-8 * max(1.0, abs(float(mean))):
        raise InputError(
            f"the {name} channel is constant inside the brain region after clipping "
            f"(value {float(mean):g}); nothing to segment",
            path,
        )
    return lo, hi, mean, std


def z_scores(values: np.ndarray, stats: tuple[float, float, np.floating, float]) -> np.ndarray:
    """``values`` clipped and z-scored by ``stats`` (``channel_statistics``)."""
    lo, hi, mean, std = stats
    return (np.clip(values, lo, hi) - mean) / std


def normalize(scan: Scan, params: Normalization, mask: np.ndarray) -> Scan:
    """A new Scan with every channel clipped to its percentiles and z-scored inside ``mask``."""
    if not mask.any():
        raise InputError("the brain region is empty: every voxel is background")
    out = np.zeros_like(scan.array, dtype=np.float32)
    for c, name in enumerate(scan.channels):
        values = scan.array[c][mask]
        stats = channel_statistics(values, params, name, scan.meta.get("paths", {}).get(name))
        out[c][mask] = z_scores(values, stats)
    return scan.with_array(out)
