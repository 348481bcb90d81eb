"""Normalize stage: per-channel z-score inside the brain, after percentile clipping.

The brain region is where any channel is non-zero (skull-stripped scans have a zero
background); for scans with no zero background it is the whole image. Outside it, every
channel is set to 0, which is also the value a missing sequence's channel gets.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..model import Normalization
from ..scan import Scan


def brain_mask(array: np.ndarray) -> np.ndarray:
    """Voxels where any channel of ``array`` (C, I, J, K) is non-zero."""
    return np.any(array != 0, axis=0)


def normalize(scan: Scan, params: Normalization) -> Scan:
    """A new Scan with every channel clipped to its percentiles and z-scored in the brain."""
    mask = brain_mask(scan.array)
    out = np.zeros_like(scan.array, dtype=np.float32)
    for c, name in enumerate(scan.channels):
        values = scan.array[c][mask]
        lo, hi = np.percentile(values, [params.lower_percentile, params.upper_percentile])
        clipped = np.clip(values, lo, hi)
        std = float(clipped.std())
        if not std > 1e-8 * max(1.0, abs(float(clipped.mean()))):
            path = scan.meta.get("paths", {}).get(name)
            raise InputError(
                f"the {name} channel is constant inside the brain region after clipping "
                f"(value {float(clipped.mean()):g}); nothing to segment",
                path,
            )
        out[c][mask] = (clipped - clipped.mean()) / std
    return scan.with_array(out)
