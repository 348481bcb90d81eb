"""Random smooth fields, rotations and connected components: the shape helpers of the generator."""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Smooth (low-frequency) float32 noise of ``shape``, about unit std, features ~``scale`` voxels."""
    step = max(float(scale), 1.0)
    coarse = tuple(int(np.ceil(n / step)) + 3 for n in shape)
    grid = ndi.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), 0.8)
    grid /= max(float(grid.std()), 1e-6)
    return ndi.affine_transform(grid, np.full(3, 1.0 / step), offset=1.0, output_shape=shape,
                                order=1, mode="nearest")


def random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(0.0, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


# --------------------------------------------------------------------------- tumour



def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected (6-neighbour) component of ``mask``; ``mask`` itself when it has at
    most one. Not the pipeline's 26-neighbour ``postprocess.largest_component``: the seeds' cases
    depend on this one."""
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))
