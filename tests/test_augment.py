"""Training augmentation: deterministic for a generator state, labels kept aligned, thick slices."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from tumorseg.augment import AugmentConfig, _rotate_scale, _thick_slices, augment, moved_during_scan

OFF = AugmentConfig(flip=0, rotate_scale=0, intensity=0, gamma=0, noise=0, blur=0, sequence_dropout=0,
                    low_resolution=0)


def _patch(seed: int = 0):
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.normal(size=(4, 16, 12, 10)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 4, size=(16, 12, 10)))
    return image, labels


def test_same_generator_state_same_result():
    image, labels = _patch()
    a = augment(image, labels, [0, 1, 2, 3], np.random.default_rng(5), AugmentConfig())
    b = augment(image, labels, [0, 1, 2, 3], np.random.default_rng(5), AugmentConfig())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_everything_off_is_identity():
    image, labels = _patch()
    out, lab = augment(image, labels, [0, 1, 2, 3], np.random.default_rng(1), OFF)
    assert torch.equal(out, image) and torch.equal(lab, labels)


def test_flips_move_image_and_labels_together():
    image, labels = _patch()
    image[0] = labels.float()  # channel 0 is the label map itself
    cfg = dataclasses.replace(OFF, flip=1.0)
    out, lab = augment(image, labels, [0], np.random.default_rng(2), cfg)
    assert torch.equal(out[0], lab.float())
    assert torch.equal(lab, labels.flip(0, 1, 2))


class _Draws:
    """A generator stand-in that gives ``_rotate_scale`` chosen angles (degrees) and scale."""

    def __init__(self, angles_deg, scale):
        self.values = [np.asarray(angles_deg, float), scale]

    def uniform(self, *args):
        return self.values.pop(0)


def test_rotation_of_a_non_cubic_patch_keeps_its_shape_and_rotates_rather_than_shears():
    """The patch window need not be a cube (--patch-size 48,48,24): before, rotation gave the patch
    back with its first and last axes swapped (and training stopped when patches were stacked)."""
    shape = (48, 40, 24)
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    sphere = torch.from_numpy((np.sqrt((grid**2).sum(0)) <= 9).astype(np.int64))
    image = torch.stack([sphere.float(), torch.from_numpy(grid[0]).float()])
    cfg = AugmentConfig(max_rotation_deg=90)
    same, same_labels = _rotate_scale(image, sphere, _Draws(np.zeros(3), 1.0), cfg)
    assert same.shape == image.shape and torch.allclose(same, image, atol=1e-4) and torch.equal(same_labels, sphere)
    # 40 degrees about axis 0, in the plane of the 40- and 24-voxel axes: a sphere stays a sphere.
    out, labels = _rotate_scale(image, sphere, _Draws([40.0, 0.0, 0.0], 1.0), cfg)
    assert out.shape == image.shape and labels.shape == sphere.shape
    extents = [int(labels.any(dim=tuple(a for a in range(3) if a != axis)).sum()) for axis in range(3)]
    assert max(extents) - min(extents) <= 1, extents
    assert abs(int(labels.sum()) - int(sphere.sum())) < 0.03 * int(sphere.sum())


def test_thick_slices_average_along_one_axis_only():
    x = torch.zeros(16, 12, 10)
    x[8] = 1.0  # one bright thin slice across axis 0
    out = _thick_slices(x, axis=0, factor=4.0)
    assert out.shape == x.shape
    assert torch.allclose(out.sum(), x.sum(), rtol=0.05)  # the signal is spread, not lost
    assert out.max() < 0.5  # a thick slice averages it with its thin neighbours
    assert (out[6:11, 0, 0] > 0).all() and out[0, 0, 0] == 0 and out[15, 0, 0] == 0
    # Along the other axes nothing varies, and thick slices there change nothing.
    assert torch.allclose(_thick_slices(x, axis=1, factor=3.0), x, atol=1e-6)
    assert torch.allclose(_thick_slices(x, axis=2, factor=2.0), x, atol=1e-6)


def test_low_resolution_leaves_labels_and_absent_channels_alone():
    image, labels = _patch()
    image[3] = 0.0  # an absent sequence stays all zeros
    cfg = dataclasses.replace(OFF, low_resolution=1.0)
    out, lab = augment(image, labels, [0, 1, 2], np.random.default_rng(3), cfg)
    assert torch.equal(lab, labels)
    assert torch.equal(out[3], image[3])
    for c in range(3):
        assert not torch.allclose(out[c], image[c])
        assert out[c].std() < image[c].std()  # white noise loses variance when slices are thickened


def _kept_channels(out: torch.Tensor) -> tuple[int, ...]:
    return tuple(c for c in range(out.shape[0]) if out[c].abs().sum() > 0)


def test_preferred_set_kept_alone_at_its_probability():
    image, labels = _patch()
    cfg = dataclasses.replace(OFF, preferred_set=0.25)
    kept = [_kept_channels(augment(image, labels, [0, 1, 2, 3], np.random.default_rng(s), cfg, (0, 2))[0])
            for s in range(400)]
    share = kept.count((0, 2)) / len(kept)
    assert 0.18 < share < 0.32
    assert set(kept) == {(0, 2), (0, 1, 2, 3)}  # sequence dropout is off: nothing else


def test_preferred_set_needs_more_than_itself_present():
    image, labels = _patch()
    only_preferred = dataclasses.replace(OFF, preferred_set=1.0)
    # A case with exactly the set gets no preferred-set step, so sequence dropout still applies.
    with_dropout = dataclasses.replace(only_preferred, sequence_dropout=1.0)
    out, _ = augment(image, labels, [0, 2, 3], np.random.default_rng(0), with_dropout, (0, 2, 3))
    kept = set(_kept_channels(out))  # channel 1 is not "present", so it is never zeroed
    assert 1 in kept and len(kept & {0, 2, 3}) in (1, 2)
    # A case without any of the card's sets is given all it has (InputSpec.choose): left alone.
    out, _ = augment(image, labels, [0, 1], np.random.default_rng(0), only_preferred, (0, 1))
    assert torch.equal(out, image)


def test_no_preferred_sets_keeps_the_random_stream():
    """Models trained before preferred sets existed reproduce from their card's command."""
    image, labels = _patch()
    cfg = dataclasses.replace(AugmentConfig(), preferred_set=0.25)
    a = augment(image, labels, [0, 1, 2, 3], np.random.default_rng(9), AugmentConfig())
    b = augment(image, labels, [0, 1, 2, 3], np.random.default_rng(9), cfg, ())
    assert torch.equal(a[0], b[0])


def _brain_patch():
    """A 24^3 patch: a brain cube with FLAIR and T1 (channels 0, 1) inside, T1gd and T2 absent."""
    rng = np.random.default_rng(3)
    inside = torch.zeros(24, 24, 24, dtype=torch.bool)
    inside[4:20, 4:20, 4:20] = True
    image = torch.zeros(4, 24, 24, 24)
    image[:2, inside] = torch.from_numpy(rng.normal(size=(2, int(inside.sum()))).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 4, size=(24, 24, 24)))
    return inside, image, labels


def test_bias_field_is_a_smooth_gain_inside_the_brain_only():
    inside, image, labels = _brain_patch()
    cfg = dataclasses.replace(OFF, bias_field=1.0)
    out, lab = augment(image, labels, [0, 1], np.random.default_rng(4), cfg)
    assert torch.equal(lab, labels)
    assert (out[:, ~inside] == 0).all() and (out[2:] == 0).all()  # background and absent sequences stay 0
    # out = g * z + (g - 1) * k. The same draws on z + 1 give g * (z + 1) + (g - 1) * k: the
    # difference is the gain field g itself.
    shifted = image.clone()
    shifted[0, inside] += 1.0
    out_shifted, _ = augment(shifted, labels, [0, 1], np.random.default_rng(4), cfg)
    gain = (out_shifted - out)[0, 4:20, 4:20, 4:20]
    assert gain.min() > 0.3 and gain.max() < 3.0 and gain.max() - gain.min() > 0.01
    # Smooth (log-trilinear): second differences along each axis are tiny against its range.
    for axis in range(3):
        second = gain.diff(dim=axis).diff(dim=axis)
        assert second.abs().max() < 0.02 * float(gain.max() - gain.min()) + 1e-5


def test_bias_field_off_draws_nothing():
    """Models trained before the bias field existed reproduce from their card's command: off, it
    takes no draw from the generator, where on (even almost never applied) it takes one per sequence."""
    image, labels = _patch()
    off, rarely = np.random.default_rng(9), np.random.default_rng(9)
    a = augment(image, labels, [0, 1, 2, 3], off, AugmentConfig())
    b = augment(image, labels, [0, 1, 2, 3], rarely, dataclasses.replace(AugmentConfig(), bias_field=1e-12))
    assert off.bit_generator.state != rarely.bit_generator.state
    assert not torch.equal(a[0], b[0])  # the later draws moved


def test_motion_during_the_whole_scan_is_a_shift_and_after_it_nothing():
    """A head shifted for every k-space line is the image shifted (circularly, as k-space is);
    shifted after the last line, the image is untouched; half way, ghosts along the read axis."""
    image = torch.from_numpy(np.random.default_rng(0).normal(size=(16, 20, 12)).astype(np.float32))
    shift = np.array([2.0, 0.0, -3.0])
    assert torch.allclose(moved_during_scan(image, 1, 0.0, shift), torch.roll(image, (2, 0, -3), (0, 1, 2)), atol=1e-5)
    assert torch.allclose(moved_during_scan(image, 1, 1.0, shift), image, atol=1e-5)
    half = moved_during_scan(image, 0, 0.5, np.array([0.0, 3.0, 0.0]))
    assert not torch.allclose(half, image, atol=0.1)
    assert abs(float(half.mean() - image.mean())) < 1e-4  # the centre line (the mean) was read before the move


def test_motion_after_the_centre_of_k_space_leaves_the_image_where_its_labels_are():
    """The low frequencies are read first, so the object stays where it was (its labels' place) and
    the move only adds ghosts: before, a moment under 0.5 moved the whole image off its labels."""
    cube = torch.zeros(24, 24, 24)
    cube[8:16, 8:16, 8:16] = 1.0
    for moment in (0.2, 0.4, 0.6):
        moved = moved_during_scan(cube, 0, moment, np.array([0.0, 3.0, 0.0])).clamp_min(0)
        centroid = [float((moved.sum(dim=tuple(a for a in range(3) if a != axis)) * torch.arange(24)).sum() / moved.sum())
                    for axis in range(3)]
        assert np.allclose(centroid, 11.5, atol=0.6), (moment, centroid)


def test_motion_leaves_background_labels_and_absent_sequences_alone():
    inside, image, labels = _brain_patch()
    out, lab = augment(image, labels, [0, 1], np.random.default_rng(4), dataclasses.replace(OFF, motion=1.0))
    assert torch.equal(lab, labels)
    assert (out[:, ~inside] == 0).all() and (out[2:] == 0).all()
    assert not torch.equal(out[:2], image[:2])


def test_motion_off_draws_nothing():
    image, labels = _patch()
    off, rarely = np.random.default_rng(9), np.random.default_rng(9)
    augment(image, labels, [0, 1, 2, 3], off, AugmentConfig())
    augment(image, labels, [0, 1, 2, 3], rarely, dataclasses.replace(AugmentConfig(), motion=1e-12))
    assert off.bit_generator.state != rarely.bit_generator.state
