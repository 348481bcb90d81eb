"""nnU-Net v2's preprocessing, sliding window and export, reproduced operation by operation.

Ported from nnunetv2 2.8 (Apache-2.0, DKFZ): ``preprocessing/cropping``, the default normalisation
schemes, ``preprocessing/resampling/default_resampling``, ``inference/sliding_window_prediction``,
``nnUNetPredictor``'s window loop and ``export_prediction``. Same order, same dtypes (the window
accumulators are fp16, as nnU-Net's are), same interpolation (scikit-image ``resize`` with
``mode='edge'``, ``anti_aliasing=False``; order 0 along an anisotropic axis), so that a model gives
the labels its own ``nnUNetv2_predict`` gives (tests/test_imported.py measures the agreement).
Arrays here are in nnU-Net's axis order (after ``transpose_forward``); :mod:`.nnunet` does the
conversion from a tumorseg :class:`~tumorseg.scan.Scan`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy.ndimage import binary_fill_holes, gaussian_filter, map_coordinates
from skimage.transform import resize

#: nnU-Net's ANISO_THRESHOLD: spacing max/min above this resamples the coarse axis separately.
ANISOTROPY_THRESHOLD = 3.0
#: The normalisation schemes nnU-Net's default planner writes into plans.
NORMALIZATION_SCHEMES = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization")
#: The resampling functions reproduced here (nnU-Net's default).
RESAMPLING_FUNCTIONS = ("resample_data_or_seg_to_shape",)


# -- cropping ------------------------------------------------------------------------------------

def nonzero_bbox(data: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """nnU-Net's ``crop_to_nonzero`` without a segmentation: the bounding box of the voxels non-zero
    in any channel (holes filled), as slices, and that mask inside the box."""
    mask = data[0] != 0
    for c in range(1, data.shape[0]):
        mask |= data[c] != 0
    mask = binary_fill_holes(mask)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        # an empty mask keeps the whole axis, as acvl_utils' get_bbox_from_mask does
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, mask.shape[axis]))
    box_t = tuple(box)
    return box_t, mask[box_t]


# -- normalisation -------------------------------------------------------------------------------

def normalize_channel(image: np.ndarray, scheme: str, use_mask: bool, inside: np.ndarray,
                      intensity: dict | None) -> np.ndarray:
    """One channel (float32, changed in place) by nnU-Net's scheme ``scheme``; ``inside`` is the
    non-zero region (nnU-Net's ``seg >= 0``)."""
    eps = 1e-8
    image = image.astype(np.float32, copy=False)
    if scheme == "ZScoreNormalization":
        if use_mask:
            values = image[inside]
            mean, std = values.mean(), values.std()
            image[inside] = (values - mean) / max(std, eps)
        else:
            mean, std = image.mean(), image.std()
            image -= mean
            image /= max(std, eps)
    elif scheme == "CTNormalization":
        assert intensity is not None
        np.clip(image, intensity["percentile_00_5"], intensity["percentile_99_5"], out=image)
        image -= intensity["mean"]
        image /= max(intensity["std"], eps)
    elif scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=eps, a_max=None)
    elif scheme != "NoNormalization":
        raise ValueError(f"normalisation scheme {scheme!r} is not one of {NORMALIZATION_SCHEMES}")
    return image


# -- resampling ----------------------------------------------------------------------------------

def new_shape(shape, old_spacing, new_spacing) -> tuple[int, ...]:
    return tuple(int(round(o / n * s)) for o, n, s in zip(old_spacing, new_spacing, shape))


def _lowres_axis(spacing) -> np.ndarray:
    return np.where(max(spacing) / np.array(spacing) == 1)[0]


def separate_axis(current_spacing, new_spacing, force_separate_z: bool | None = False,
                  threshold: float = ANISOTROPY_THRESHOLD) -> int | None:
    """The axis resampled on its own (order 0), or None: nnU-Net's ``determine_do_sep_z_and_axis``."""
    if force_separate_z is not None:
        axis = _lowres_axis(current_spacing) if force_separate_z else None
    elif max(current_spacing) / min(current_spacing) > threshold:
        axis = _lowres_axis(current_spacing)
    elif max(new_spacing) / min(new_spacing) > threshold:
        axis = _lowres_axis(new_spacing)
    else:
        axis = None
    if axis is None or len(axis) != 1:  # two or three equally coarse axes: not anisotropic
        return None
    return int(axis[0])


def resample(data: np.ndarray, shape, current_spacing, new_spacing, order: int = 3, order_z: int = 0,
             force_separate_z: bool | None = False,
             separate_z_anisotropy_threshold: float = ANISOTROPY_THRESHOLD) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for images and logits (not label maps):
    (C, X, Y, Z) to (C, *shape), in the input's dtype."""
    axis = separate_axis(current_spacing, new_spacing, force_separate_z, separate_z_anisotropy_threshold)
    old = np.array(data.shape[1:])
    target = np.array(shape)
    if np.all(old == target):
        return data
    out = np.zeros((data.shape[0], *target), dtype=data.dtype)
    data = data.astype(float, copy=False)
    kwargs = {"mode": "edge", "anti_aliasing": False}
    for c in range(data.shape[0]):
        if axis is None:
            out[c] = resize(data[c], target, order, **kwargs)
            continue
        in_plane = target[[a for a in range(3) if a != axis]]
        partial_shape = target.copy()
        partial_shape[axis] = old[axis]
        partial = np.zeros(partial_shape)
        for i in range(old[axis]):
            index = [slice(None)] * 3
            index[axis] = i
            partial[tuple(index)] = resize(data[c][tuple(index)], in_plane, order, **kwargs)
        if old[axis] == target[axis]:
            out[c] = partial
            continue
        scale = np.array(partial.shape) / target
        grid = np.mgrid[:target[0], :target[1], :target[2]].astype(float)
        coords = np.array([scale[d] * (grid[d] + 0.5) - 0.5 for d in range(3)])
        out[c] = map_coordinates(partial, coords, order=order_z, mode="nearest")
    return out


# -- sliding window ------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def gaussian(patch: tuple[int, ...], device: str) -> torch.Tensor:
    """nnU-Net's ``compute_gaussian`` (sigma 1/8 of the patch, scaled to a maximum of 10, fp16)."""
    tmp = np.zeros(patch)
    tmp[tuple(p // 2 for p in patch)] = 1
    weights = gaussian_filter(tmp, [p / 8 for p in patch], 0, mode="constant", cval=0)
    weights /= np.max(weights) / 10
    out = torch.from_numpy(weights).to(device=device, dtype=torch.float16)
    zero = out == 0
    out[zero] = torch.min(out[~zero])
    return out


def window_starts(image_size, patch, step_size: float) -> list[list[int]]:
    """nnU-Net's ``compute_steps_for_sliding_window``."""
    steps = []
    for size, tile in zip(image_size, patch):
        n = int(np.ceil((size - tile) / (tile * step_size))) + 1
        stride = (size - tile) / (n - 1) if n > 1 else 0
        steps.append([int(np.round(stride * i)) for i in range(n)])
    return steps


def pad_to_patch(data: torch.Tensor, patch) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """acvl_utils' ``pad_nd_image`` as nnU-Net calls it: zero padding, centred, up to the patch."""
    shape = data.shape[1:]
    pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(shape, patch)]
    if not any(a or b for a, b in pads):
        return data, tuple(slice(0, s) for s in shape)
    flat = [v for a, b in reversed(pads) for v in (a, b)]
    padded = torch.nn.functional.pad(data, flat, mode="constant", value=0)
    return padded, tuple(slice(a, a + s) for (a, _), s in zip(pads, shape))


@dataclass(frozen=True)
class WindowSettings:
    patch: tuple[int, ...]
    step_size: float = 0.5
    mirror_axes: tuple[int, ...] = ()  # spatial axes (0, 1, 2); empty: no mirroring
    #: Mirrored copies of a window per forward pass (nnU-Net: 1). More pays where a call costs more
    #: than its arithmetic (small networks, GPUs); see docs/performance.md.
    per_pass: int = 1


def mirrored_logits(network, x: torch.Tensor, mirror_axes: tuple[int, ...], per_pass: int = 1) -> torch.Tensor:
    """nnU-Net's ``_internal_maybe_mirror_and_predict``: the mean logits over all flips of
    ``mirror_axes``, summed in nnU-Net's order; ``per_pass`` flips go through the network at once."""
    axes = [a + 2 for a in mirror_axes]
    combos = [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
    prediction = None
    for first in range(0, len(combos), max(per_pass, 1)):
        group = combos[first:first + max(per_pass, 1)]
        out = network(torch.cat([torch.flip(x, c) if c else x for c in group]))
        for n, c in enumerate(group):
            one = torch.flip(out[n:n + 1], c) if c else out[n:n + 1]
            prediction = one.clone() if prediction is None else prediction + one
    assert prediction is not None
    return prediction / len(combos) if len(combos) > 1 else prediction


def sliding_window_logits(network, data: torch.Tensor, settings: WindowSettings, heads: int,
                          device: torch.device) -> torch.Tensor:
    """nnU-Net's ``predict_sliding_window_return_logits`` for one set of weights: fp16 logits
    (heads, X, Y, Z) on the CPU for ``data`` (C, X, Y, Z)."""
    data, unpad = pad_to_patch(data, settings.patch)
    steps = window_starts(data.shape[1:], settings.patch, settings.step_size)
    weights = gaussian(tuple(settings.patch), "cpu")
    logits = torch.zeros((heads, *data.shape[1:]), dtype=torch.half)
    counts = torch.zeros(data.shape[1:], dtype=torch.half)
    autocast = torch.autocast(device.type) if device.type == "cuda" else _nothing()
    with torch.inference_mode(), autocast:
        for start in itertools.product(*steps):
            window = tuple(slice(s, s + p) for s, p in zip(start, settings.patch))
            x = data[(slice(None), *window)][None].contiguous().to(device)
            prediction = mirrored_logits(network, x, settings.mirror_axes, settings.per_pass)[0].to("cpu")
            prediction *= weights
            logits[(slice(None), *window)] += prediction
            counts[window] += weights
    torch.div(logits, counts, out=logits)
    if torch.isinf(logits).any():
        raise RuntimeError("infinite logits in the sliding window (fp16 overflow)")
    return logits[(slice(None), *unpad)]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- export --------------------------------------------------------------------------------------

def logits_to_labels(logits: torch.Tensor, regions_class_order: tuple[int, ...] | None) -> np.ndarray:
    """nnU-Net's ``convert_logits_to_segmentation``: argmax of the logits, or for region-based models
    sigmoid > 0.5 painted in ``regions_class_order``."""
    if regions_class_order is None:
        return logits.float().numpy().argmax(0).astype(np.uint8)
    probabilities = torch.sigmoid(logits.float())
    seg = np.zeros(logits.shape[1:], dtype=np.uint8)
    for i, value in enumerate(regions_class_order):
        seg[(probabilities[i] > 0.5).numpy()] = value
    return seg
