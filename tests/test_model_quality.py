"""benchmarks/model_quality.py: the whole-tumour error split adds up and respects voxel size."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import model_quality  # noqa: E402


def _cube(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return mask


def test_wt_errors_splits_near_far_and_missed():
    spacing, voxel_ml = np.array([2.0, 2.0, 2.0]), 8 / 1000  # 8 mm3 voxels
    truth = _cube((60, 60, 60), (10, 10, 10), (20, 20, 20))  # 1000 voxels
    pred = _cube((60, 60, 60), (12, 10, 10), (22, 20, 20))  # shifted 2 voxels (4 mm): 200 near, 200 missed
    pred |= _cube((60, 60, 60), (40, 40, 40), (45, 45, 45))  # 125 voxels, >= 40 mm away: far
    e = model_quality.wt_errors(pred, truth, spacing, voxel_ml)
    assert e["true_ml"] == pytest.approx(1000 * 8 / 1000)
    assert e["pred_ml"] == pytest.approx(1125 * 8 / 1000)
    assert e["fp_near_ml"] == pytest.approx(200 * 8 / 1000)
    assert e["fp_far_ml"] == pytest.approx(125 * 8 / 1000)
    assert e["fn_ml"] == pytest.approx(200 * 8 / 1000)
    assert e["pred_ml"] == pytest.approx(e["true_ml"] - e["fn_ml"] + e["fp_near_ml"] + e["fp_far_ml"])


def test_wt_errors_near_is_measured_in_mm_not_voxels():
    truth = _cube((40, 40, 40), (10, 10, 10), (20, 20, 20))
    pred = truth | _cube((40, 40, 40), (26, 10, 10), (27, 20, 20))  # 7 voxels beyond the truth's edge
    near = model_quality.wt_errors(pred, truth, np.array([1.0, 1.0, 1.0]), 1 / 1000)  # 7 mm: near
    far = model_quality.wt_errors(pred, truth, np.array([2.0, 1.0, 1.0]), 2 / 1000)  # 14 mm: far
    assert near["fp_far_ml"] == 0 and near["fp_near_ml"] > 0
    assert far["fp_near_ml"] == 0 and far["fp_far_ml"] > 0


def test_wt_errors_without_truth_counts_every_false_voxel_as_far():
    truth = np.zeros((10, 10, 10), bool)
    pred = _cube((10, 10, 10), (2, 2, 2), (4, 4, 4))
    e = model_quality.wt_errors(pred, truth, np.ones(3), 1 / 1000)
    assert e["fp_far_ml"] == pytest.approx(8 / 1000) and e["fp_near_ml"] == 0 and e["true_ml"] == 0
