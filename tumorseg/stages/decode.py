"""Decode stage: class probabilities on the input grid -> label values. Pure functions.

The argmax, unless the model card calibrates regions (``[decoding]``, :class:`~tumorseg.model.Decoding`):
then, outermost region first (WT, TC, ET), a listed region is the argmax's region plus the voxels
inside its decoded parent whose summed probability for it exceeds the card's threshold and that
connect (26-neighbourhood) to the region's argmax voxels in a lesion (an argmax whole-tumour component)
of at least ``grow_from_ml``. Each voxel then takes the label of the innermost region it lies in (among
several labels there, the likeliest).
"""
from __future__ import annotations

import cc3d
import numpy as np

from ..labels import LabelScheme
from ..model import Decoding
from .postprocess import CONNECTIVITY, remove_small_components


def decode(probs: np.ndarray, scheme: LabelScheme, decoding: Decoding | None, voxel_ml: float) -> np.ndarray:
    """Label values (uint8, I x J x K) from class probabilities (C, I, J, K) in the card's class order."""
    labels = scheme.class_values[_argmax_classes(probs)]
    if decoding is None or not decoding.thresholds:
        return labels
    values = [int(v) for v in scheme.class_values]
    # Outermost first: WT holds TC holds ET for every scheme.
    chain = [(name, members) for name, members in sorted(scheme.regions.items(), key=lambda kv: -len(kv[1])) if members]
    lesions = remove_small_components(np.isin(labels, chain[0][1]), decoding.grow_from_ml / voxel_ml)
    regions: list[np.ndarray] = []
    for name, members in chain:
        region = np.isin(labels, members)
        if name in decoding.thresholds:
            likely = probs[[values.index(v) for v in members]].sum(axis=0) > decoding.thresholds[name]
            if regions:
                likely &= regions[-1]
            region = _grown(region, likely, region & lesions)
        regions.append(region)
    out = np.zeros_like(labels)
    for i, (_, members) in enumerate(chain):
        inner = set(chain[i + 1][1]) if i + 1 < len(chain) else set()
        own = [v for v in members if v not in inner]
        here = regions[i] & ~regions[i + 1] if i + 1 < len(chain) else regions[i]
        if len(own) == 1:
            out[here] = own[0]
        elif own:
            likeliest = np.argmax(probs[[values.index(v) for v in own]][:, here], axis=0)
            out[here] = np.asarray(own, dtype=np.uint8)[likeliest]
    return out


def _argmax_classes(probs: np.ndarray) -> np.ndarray:
    """``np.argmax(probs, axis=0)`` (the first class among ties) as uint8, without the
    transposed copy of ``probs`` and the int64 result numpy makes (2.5 GB for four classes on a
    512 x 512 x 400 grid)."""
    best = probs[0].copy()
    index = np.zeros(probs.shape[1:], dtype=np.uint8)
    for c in range(1, probs.shape[0]):
        higher = probs[c] > best
        index[higher] = c
        np.copyto(best, probs[c], where=higher)
    return index


def _grown(region: np.ndarray, likely: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """``region`` and the parts of ``region | likely`` connected to ``seeds``."""
    if not seeds.any():
        return region
    components = cc3d.connected_components(region | likely, connectivity=CONNECTIVITY)
    keep = np.zeros(int(components.max()) + 1, dtype=bool)
    keep[np.unique(components[seeds])] = True
    keep[0] = False
    return region | keep[components]

