"""Report stage: volumes, components and centroids of each label and region.

Volumes are in mL (voxel count x voxel volume from the affine). Centroids are in world
millimetres in RAS+ (as nibabel), and also in LPS (as DICOM and most planning systems).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..scan import LabelMap
from .postprocess import count_components


def mask_summary(mask: np.ndarray, affine: np.ndarray, voxel_ml: float) -> dict[str, Any]:
    count = int(np.count_nonzero(mask))
    summary: dict[str, Any] = {
        "volume_ml": round(count * voxel_ml, 4),
        "voxels": count,
        "components": count_components(mask),
        "centroid_ras_mm": None,
        "centroid_lps_mm": None,
    }
    if count:
        index = np.argwhere(mask).mean(axis=0)
        ras = affine[:3, :3] @ index + affine[:3, 3]
        summary["centroid_ras_mm"] = [round(float(v), 2) for v in ras]
        summary["centroid_lps_mm"] = [round(float(v), 2) for v in ras * [-1, -1, 1]]
    return summary


def summarize(labels: LabelMap) -> dict[str, Any]:
    """Per label and per region (WT, TC, ET) summaries of a label map."""
    voxel_ml = labels.voxel_volume_ml
    scheme = labels.scheme
    return {
        "label_scheme": scheme.name,
        "voxel_volume_ml": voxel_ml,
        "labels": {
            label.name: {"value": label.value, **mask_summary(labels.array == label.value, labels.affine, voxel_ml)}
            for label in scheme.labels
        },
        "regions": {
            region: {"labels": list(values), **mask_summary(np.isin(labels.array, values), labels.affine, voxel_ml)}
            for region, values in scheme.regions.items()
        },
    }
