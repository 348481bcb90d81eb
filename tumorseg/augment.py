"""Training augmentation on one patch. Pure: new tensors out, driven by a numpy Generator.

Every random draw comes from the Generator passed in, so an iteration's augmentation depends
only on its seed: training resumed from a checkpoint repeats it exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Largest head shift of ``AugmentConfig.motion``, voxels per axis (4 mm at 1 mm, 6 at 1.5).
MOTION_SHIFT = 4.0


@dataclass(frozen=True)
class AugmentConfig:
    flip: float = 0.5  # per axis
    rotate_scale: float = 0.3
    max_rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    intensity: float = 0.3  # per-channel scale and shift
    gamma: float = 0.3
    noise: float = 0.15
    blur: float = 0.15
    #: Per channel: thick slices along one random axis (block-averaged by ``low_resolution_factor``,
    #: then interpolated back), as in the 3-6 mm 2D sequences of many hospital protocols.
    low_resolution: float = 0.2
    low_resolution_factor: tuple[float, float] = (1.5, 4.0)
    #: Per channel: a smooth multiplicative bias field (log-gain trilinear across the patch, up to
    #: about 1.6x corner to corner), as in scans without bias correction. None: off (and left out
    #: of saved settings, so checkpoints of earlier versions still resume and their streams stay).
    bias_field: float | None = None
    #: Per channel: the head moved once during the acquisition (k-space lines after a random moment
    #: see it shifted by up to ``MOTION_SHIFT`` voxels), giving the ghosts and blur of a patient
    #: who moved. None: off (and left out of saved settings, as ``bias_field``).
    motion: float | None = None
    #: Probability of keeping only a random non-empty subset of the sequences present.
    sequence_dropout: float = 0.5
    #: Probability of keeping the ``preferred`` channel set passed to ``augment`` alone (the set a
    #: model's card makes it use at inference), drawn before ``sequence_dropout``. None: off (and
    #: left out of saved settings, so checkpoints of earlier versions still resume).
    preferred_set: float | None = None
    #: Normalise the sequences a patch keeps (sequence dropout, the preferred set) as ``predict``
    #: does when given only those files: z-scored inside the brain region of the kept sequences alone
    #: (their percentiles, mean and sd there), not inside the region of all the case's sequences.
    #: None: off (and left out of saved settings, as ``bias_field``; the draws of earlier models stay).
    subset_normalisation: bool | None = None


def draw_kept_channels(present: list[int], preferred: tuple[int, ...], rng: np.random.Generator,
                       cfg: AugmentConfig) -> tuple[int, ...] | None:
    """The channels a patch keeps (the ``preferred`` set, or a random non-empty subset of
    ``present``), or None to keep them all."""
    # No draw without a set to keep: the random stream, and so models trained before, stay as they were.
    if cfg.preferred_set and preferred and set(preferred) < set(present) and rng.random() < cfg.preferred_set:
        return tuple(preferred)
    if len(present) > 1 and rng.random() < cfg.sequence_dropout:
        return tuple(int(c) for c in rng.choice(present, size=int(rng.integers(1, len(present))), replace=False))
    return None


def augment(image: torch.Tensor, labels: torch.Tensor, present: list[int], rng: np.random.Generator,
            cfg: AugmentConfig, preferred: tuple[int, ...] = (), dropout: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment ``image`` (C, X, Y, Z) float and ``labels`` (X, Y, Z) long; ``present`` channels.

    ``preferred``: the channels inference would give the network for this case (the card's
    ``InputSpec.choose``); kept alone with probability ``cfg.preferred_set`` when ``present`` has more.
    ``dropout`` False: every ``present`` channel is kept (the caller drew the kept channels and
    normalised them as predict would, ``cfg.subset_normalisation``).
    """
    if rng.random() < cfg.rotate_scale:
        image, labels = _rotate_scale(image, labels, rng, cfg)
    for axis in range(3):
        if rng.random() < cfg.flip:
            image, labels = image.flip(axis + 1), labels.flip(axis)
    image = image.clone()
    # Outside the brain every channel is 0 (normalize stage); a bias field or motion must leave it so.
    inside = (image[present] != 0).any(dim=0) if cfg.bias_field or cfg.motion else None
    for c in present:
        channel = image[c]
        # No draw when off: the random stream, and so models trained before, stay as they were.
        if cfg.bias_field and rng.random() < cfg.bias_field:
            channel.copy_(torch.where(inside, _bias(channel, rng), channel))
        if cfg.motion and rng.random() < cfg.motion:
            moved = moved_during_scan(channel, int(rng.integers(3)), float(rng.uniform(0.2, 0.8)),
                                      rng.uniform(-MOTION_SHIFT, MOTION_SHIFT, 3))
            channel.copy_(torch.where(inside, moved, channel))
        if rng.random() < cfg.intensity:
            channel.mul_(float(rng.uniform(0.8, 1.2))).add_(float(rng.uniform(-0.2, 0.2)))
        if rng.random() < cfg.gamma:
            lo, hi = channel.min(), channel.max()
            span = (hi - lo).clamp_min(1e-6)
            channel.copy_(((channel - lo) / span) ** float(rng.uniform(0.7, 1.5)) * span + lo)
        if rng.random() < cfg.low_resolution:
            channel.copy_(_thick_slices(channel, int(rng.integers(3)), float(rng.uniform(*cfg.low_resolution_factor))))
        if rng.random() < cfg.noise:
            noise = torch.from_numpy(rng.normal(0, rng.uniform(0, 0.15), channel.shape).astype(np.float32))
            channel.add_(noise)
        if rng.random() < cfg.blur:
            channel.copy_(_blur(channel, float(rng.uniform(0.5, 1.2))))
    keep = draw_kept_channels(present, preferred, rng, cfg) if dropout else None
    if keep is not None:
        for c in present:
            if c not in keep:
                image[c] = 0.0
    return image, labels


def _rotate_scale(image, labels, rng, cfg):
    angles = np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg, 3))
    scale = rng.uniform(*cfg.scale_range)
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        r = np.eye(3)
        a, b = [x for x in range(3) if x != axis]
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        matrix = matrix @ r
    # affine_grid works in coordinates normalised to each axis' extent: rotate in voxels, so that a
    # non-cubic patch is rotated, not sheared (for a cubic one ``extent`` is the identity).
    extent = np.diag(np.asarray(image.shape[1:], dtype=float) / image.shape[1])
    theta = torch.zeros(1, 3, 4)
    theta[0, :, :3] = torch.from_numpy(np.linalg.inv(extent) @ (matrix / scale) @ extent).float()
    size = (1, 1) + tuple(image.shape[1:])[::-1]  # (N, C, D, H, W) of the permuted volume below
    grid = F.affine_grid(theta, list(size), align_corners=False)
    # grid_sample's grid is (x, y, z) = (W, H, D): sample in reversed axis order consistently.
    img = F.grid_sample(image[None].permute(0, 1, 4, 3, 2), grid, mode="bilinear", align_corners=False)
    lab = F.grid_sample(labels[None, None].float().permute(0, 1, 4, 3, 2), grid, mode="nearest", align_corners=False)
    return img.permute(0, 1, 4, 3, 2)[0], lab.permute(0, 1, 4, 3, 2)[0, 0].long()


def _bias(channel: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """``channel`` (z-scored) as if its raw intensities had been multiplied by a smooth gain.

    Channels are z-scores, raw = mean + sd * z, so a gain g gives g * z + (g - 1) * mean / sd:
    mostly an offset, with mean / sd (1-4 in brain MRI) drawn too.
    """
    log_gain = torch.from_numpy(rng.normal(0, rng.uniform(0.05, 0.25), (1, 1, 2, 2, 2)).astype(np.float32))
    gain = torch.exp(F.interpolate(log_gain, size=tuple(channel.shape), mode="trilinear", align_corners=True))[0, 0]
    return gain * channel + (gain - 1) * float(rng.uniform(1.0, 4.0))


def moved_during_scan(channel: torch.Tensor, axis: int, moment: float, shift: np.ndarray) -> torch.Tensor:
    """``channel`` (X, Y, Z) as acquired by a scan whose k-space lines along ``axis`` are read
    in order, lowest frequency first, with the head shifted by ``shift`` voxels (X, Y, Z) for the
    lines read after ``moment`` (0-1 of the scan). A shift of k-space lines is a phase ramp; the
    image is the real part of the result (ghosts along ``axis``, blur across it)."""
    k = torch.fft.fftn(channel.to(torch.float64))
    freqs = [torch.fft.fftfreq(n, dtype=torch.float64) for n in channel.shape]
    ramp = sum(-2j * math.pi * float(d) * f.view([-1 if a == i else 1 for a in range(3)])
               for i, (f, d) in enumerate(zip(freqs, shift)))
    # Each line's place in the read order, the centre of k-space first: the image's position is
    # where the head was when the low frequencies were read, and so where its labels are.
    lines = freqs[axis].abs().argsort(stable=True).argsort()
    after = (lines >= moment * channel.shape[axis]).view([-1 if a == axis else 1 for a in range(3)])
    k = torch.where(after, k * torch.exp(ramp), k)
    return torch.fft.ifftn(k).real.to(channel.dtype)


def _thick_slices(channel: torch.Tensor, axis: int, factor: float) -> torch.Tensor:
    """``channel`` seen through slices ``factor`` times thicker along ``axis``."""
    size = list(channel.shape)
    coarse = list(size)
    coarse[axis] = max(1, int(round(size[axis] / factor)))
    out = F.adaptive_avg_pool3d(channel[None, None], coarse)  # each thick slice averages its thin ones
    return F.interpolate(out, size=size, mode="trilinear", align_corners=False)[0, 0]


def _blur(channel: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(2 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    out = channel[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[0, 0]
