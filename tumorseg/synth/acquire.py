"""The scanner's part: a random head pose and voxel grid, slice-profile blur, resampling, a smooth
bias field, Rician noise and an arbitrary intensity scale."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .anatomy import Anatomy
from .render import Look
from .shapes import random_rotation
from .tumour import Scene

_MAX_DIM = 256


@dataclass(frozen=True)
class Geometry:
    head_pose: np.ndarray  # 4x4, MNI mm -> world mm
    affine: np.ndarray  # 4x4, output voxel -> world mm
    shape: tuple[int, int, int]


def draw_geometry(rng: np.random.Generator, anat: Anatomy, look: Look) -> Geometry:
    """A head pose in the scanner and an output grid around the head (or the brain, without skull):
    slice orientation, axis order and flips, obliquity, spacing and field of view."""
    pose = np.eye(4)
    if rng.random() < 0.6:
        pose[:3, :3] = random_rotation(rng, 8.0)
    pose[:3, 3] = rng.uniform(-15, 15, 3)

    slice_axis = int(rng.choice([2, 0, 1], p=[0.6, 0.2, 0.2]))  # axial, sagittal, coronal
    order = [a for a in range(3) if a != slice_axis] + [slice_axis]
    if rng.random() < 0.2:
        order = list(rng.permutation(3))
    direction = np.zeros((3, 3))
    for voxel_axis, world_axis in enumerate(order):
        direction[world_axis, voxel_axis] = rng.choice([-1.0, 1.0])
    head_tilted = not np.allclose(pose[:3, :3], np.eye(3))
    if rng.random() < 0.35:  # oblique slices, often aligned to the (tilted) head as technologists do
        aligned = head_tilted and rng.random() < 0.5
        direction = (pose[:3, :3] if aligned else random_rotation(rng, 10.0)) @ direction

    mode = rng.choice(3, p=[0.3, 0.4, 0.3])
    in_plane = 1.0 if mode == 0 else rng.uniform(0.9, 1.3 if mode == 1 else 1.5)
    through = 1.0 if mode == 0 else rng.uniform(1.0, 1.5) if mode == 1 else rng.uniform(2.0, 3.0)
    spacing = np.where(np.array(order) == slice_axis, through, in_plane)

    lo, hi = anat.brain_box_mm
    margin = look.shell_mm[2] if look.skull else 0.0
    corners = np.array([[x, y, z] for x in (lo[0] - margin, hi[0] + margin)
                        for y in (lo[1] - margin, hi[1] + margin) for z in (lo[2] - margin, hi[2] + margin)])
    world = corners @ pose[:3, :3].T + pose[:3, 3]
    along = world @ direction  # coordinates along the output axes
    need_lo, need_hi = along.min(0), along.max(0)
    need = need_hi - need_lo
    factor = rng.uniform(0.92, 1.2, 3) if look.skull else rng.uniform(1.0, 1.35, 3)
    shape = np.clip(np.ceil(need * factor / spacing).astype(int), 16, _MAX_DIM)
    extent = shape * spacing
    slack = extent - need
    start = need_lo - rng.uniform(0, 1, 3) * slack  # slack < 0 crops a random side
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = direction @ start
    return Geometry(head_pose=pose, affine=affine, shape=tuple(int(n) for n in shape))


def acquire(rng: np.random.Generator, anat: Anatomy, scene: Scene, look: Look,
             channels: list[np.ndarray], geom: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Blur, resample onto the output grid, add bias field and Rician noise, scale."""
    to_template = np.linalg.inv(anat.affine) @ np.linalg.inv(geom.head_pose) @ geom.affine
    matrix, offset = to_template[:3, :3], to_template[:3, 3]
    footprint = np.abs(matrix).max(axis=1)  # template voxels per output voxel, per template axis
    # A slight blur, plus the slice profile (FWHM ~ voxel size) where output voxels exceed 1 mm.
    base_blur = rng.uniform(0.3, 0.7)
    sigma = np.sqrt(base_blur**2 + 0.42**2 * np.maximum(footprint**2 - 1, 0))
    labels = ndi.affine_transform(scene.labels, matrix, offset, output_shape=geom.shape, order=0)
    image = np.empty((4, *geom.shape), np.float32)
    for c, (ch, bias) in enumerate(zip(channels, _bias_profiles(rng, geom.shape))):
        ch = ndi.gaussian_filter(ch, sigma)
        if not look.skull:
            ch *= anat.mask
        clean = ndi.affine_transform(ch, matrix, offset, output_shape=geom.shape, order=1)
        del ch
        image[c] = _rician(rng, clean, bias, 0.5 * (look.means["wm"][c] + look.means["gm"][c]))
        if not look.skull:  # clean only got positive factors: its zeros are still the outside
            image[c][clean <= 0] = 0
        image[c] *= np.float32(np.exp(rng.uniform(np.log(50.0), np.log(5000.0))))
    return image, labels


def _bias_profiles(rng: np.random.Generator, shape: tuple[int, int, int]) -> list[list[np.ndarray]]:
    """Four smooth multiplicative bias fields (shared coil part + per sequence part).

    Each is separable along the voxel axes: three 1D float32 profiles whose outer product is the field,
    which costs one multiplication per voxel and axis instead of a full 3D field per channel.
    """

    def log_profiles(amplitude: float) -> list[np.ndarray]:
        out = []
        for n in shape:
            x = np.linspace(-1, 1, n)
            a = rng.normal(0, amplitude, 3)
            out.append(a[0] * x + a[1] * (x * x - 1 / 3) + a[2] * np.cos(np.pi * x + rng.uniform(0, 2 * np.pi)))
        return out

    shared = log_profiles(rng.uniform(0.04, 0.12))
    return [[np.exp(s + o).astype(np.float32) for s, o in zip(shared, log_profiles(0.04))] for _ in range(4)]


def _rician(rng: np.random.Generator, clean: np.ndarray, bias: list[np.ndarray], level: float) -> np.ndarray:
    """|clean * bias + complex Gaussian noise|, noise sd 1-4 % of ``level``; reuses ``clean``'s memory."""
    clean *= bias[0][:, None, None]
    clean *= bias[1][None, :, None]
    clean *= bias[2][None, None, :]
    sd = np.float32(rng.uniform(0.01, 0.04) * level)
    real = rng.standard_normal(clean.shape, dtype=np.float32)
    real *= sd
    real += clean
    real *= real
    imag = rng.standard_normal(clean.shape, dtype=np.float32)
    imag *= sd
    imag *= imag
    real += imag
    return np.sqrt(real, out=real)


# --------------------------------------------------------------------------- public API
