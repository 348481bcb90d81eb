"""Region Dice across label schemes, and reading empty ground truth."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import save_nifti
from tumorseg.errors import GeometryError, InputError
from tumorseg.evaluate import read_label_file, region_scores
from tumorseg.metrics import dice
from tumorseg.labels import convert, get_scheme


def test_dice_conventions():
    a = np.zeros((3, 3, 3), bool)
    assert dice(a, a) == 1.0
    b = a.copy()
    b[0, 0, 0] = True
    assert dice(a, b) == 0.0
    c = b.copy()
    c[1, 1, 1] = True
    assert dice(b, c) == pytest.approx(2 * 1 / 3)


def test_region_scores_across_schemes_match_converted_maps():
    rng = np.random.default_rng(0)
    truth_2015 = rng.integers(0, 5, (8, 8, 8))
    pred_msd = rng.integers(0, 4, (8, 8, 8))
    msd, b15 = get_scheme("msd"), get_scheme("brats2015")
    scores = region_scores(pred_msd, msd, truth_2015, b15)
    truth_msd = convert(truth_2015, b15, msd)
    same_scheme = region_scores(pred_msd, msd, truth_msd, msd)
    for region in ("WT", "TC", "ET"):
        assert scores[region] == pytest.approx(same_scheme[region])
    assert region_scores(truth_msd, msd, truth_2015, b15) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}


def test_region_scores_refuse_mismatched_shapes_and_unknown_labels():
    msd = get_scheme("msd")
    with pytest.raises(GeometryError):
        region_scores(np.zeros((2, 2, 2), int), msd, np.zeros((2, 2, 3), int), msd)
    with pytest.raises(Exception, match="values \\[7\\]"):
        region_scores(np.zeros((2, 2, 2), int), msd, np.full((2, 2, 2), 7), msd)
    with pytest.raises(Exception, match="prediction.*values \\[4\\]"):  # a BraTS 2021 map scored as MSD
        region_scores(np.full((2, 2, 2), 4), msd, np.zeros((2, 2, 2), int), msd)


def test_empty_ground_truth_reads_but_empty_scan_does_not(tmp_path):
    from tumorseg.stages.read import read_volume

    path = save_nifti(tmp_path / "seg.nii.gz", np.zeros((5, 6, 7), np.uint8), np.eye(4))
    assert not read_label_file(path).labels.any()
    with pytest.raises(InputError, match="constant"):
        read_volume(path)


def test_a_probability_map_is_not_read_as_labels(tmp_path):
    labels = np.zeros((5, 6, 7), np.float32)
    labels[1:3, 2:4, 3:5] = 2.0
    labels[0, 0, 0] = 1.0 + 1e-5  # float storage rounding: still the label 1
    assert sorted(np.unique(read_label_file(save_nifti(tmp_path / "seg.nii.gz", labels, np.eye(4))).labels)) == [0, 1, 2]
    labels[1, 2, 3] = 0.6  # a probability, or a linearly resampled edge
    path = save_nifti(tmp_path / "probs.nii.gz", labels, np.eye(4))
    with pytest.raises(InputError, match=r"not a label map: 1 voxels hold non-integer values \(e.g. 0.6\)") as err:
        read_label_file(path)
    assert "probs.nii.gz" in str(err.value)
