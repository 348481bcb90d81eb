"""Infer stage: sliding-window inference with Gaussian blending.

The windows and the Gaussian weights are MONAI's (``dense_patch_slices`` with MONAI's scan
interval, ``compute_importance_map`` with sigma 0.125), so results match
``monai.inferers.sliding_window_inference`` with ``mode="gaussian"``; the loop is our own to be
fast on a GPU:

* the Gaussian and the sum of weights are computed once per image shape and reused by every
  window, flip and scan of that shape;
* several windows per forward pass (``windows_per_batch``), gathered into one preallocated
  input buffer, and blended into a preallocated output on the device;
* reduced precision where it is fast (``precision``): fp16 autocast and cuDNN's autotuner on CUDA,
  bf16 autocast on a CPU with bf16 instructions (oneDNN; about twice as fast as fp32 there);
* optionally ``torch.compile`` (``compile = true``), which fuses the normalisation and
  activation kernels; it costs a compilation per process and window-batch size, so it pays for
  batches on a GPU, and falls back to the eager network when compiling fails;
* on out-of-memory: halve the windows per pass, then stitch on the host (only the windows
  travel to the device), instead of failing.

Mirroring test-time augmentation (``tta``, on in the default pipeline) averages the softmax of all 8
flips of the three axes.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..config import InferenceConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)

#: torch >= 2.5 names it torch.OutOfMemoryError; earlier releases only torch.cuda.OutOfMemoryError.
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
#: Standard deviation of the Gaussian window weights, as a fraction of the window size (MONAI's and nnU-Net's).
SIGMA_SCALE = 0.125


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX); elsewhere oneDNN emulates
    bf16, more slowly than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: absent -> False
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


#: Each of ``config.FIXED_PRECISIONS`` as an autocast type (None: no autocast), and back.
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_NAMES = {dtype: name for name, dtype in AUTOCAST_DTYPES.items()}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast type of ``precision`` (``InferenceConfig.precision``) on ``device``; None: fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and native_bf16_cpu() else None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 is for CUDA GPUs; on the CPU use bf16 (fast where the CPU has "
                          "AVX512-BF16 or AMX) or fp32")
    return AUTOCAST_DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; None: none (fp32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class PreparedNetwork:
    """A network in eval mode on its device, called on window batches (N, C, X, Y, Z).

    ``compile``: through ``torch.compile`` with fixed shapes, falling back to the eager network
    (with a warning) when compilation fails; :func:`sliding_window` then feeds it full window
    batches only, so a scan compiles once per window-batch size, not once more for its last,
    shorter batch. ``channels_last``: weights and window batches in channels-last layout (measured
    slower for DynUNet on an H200 with torch 2.11, so off by default; kept for other networks).
    ``precision``: see ``InferenceConfig.precision``; the window loop runs in autocast of
    ``autocast_dtype`` (None: fp32), named by ``precision``.
    """

    def __init__(self, network: torch.nn.Module, device: torch.device, compile: bool = False,
                 channels_last: bool = False, backend: str = "inductor", precision: str = "auto") -> None:
        self.autocast_dtype = autocast_dtype(precision, device)
        self.precision = PRECISION_NAMES[self.autocast_dtype]
        if device.type == "cpu" and self.autocast_dtype == torch.bfloat16 and not native_bf16_cpu():
            log.warning("precision bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX) is emulated "
                        "and slower than fp32")
        self.device = device
        network = network.to(device).eval()
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        if channels_last:
            network = network.to(memory_format=torch.channels_last_3d)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the window shape repeats: autotuned kernels pay
        self.eager = network
        self.compiled = torch.compile(network, dynamic=False, backend=backend) if compile else None
        self.failed = False

    @property
    def static_shapes(self) -> bool:
        """Whether :func:`sliding_window` must feed full window batches (compiled networks)."""
        return self.compiled is not None

    def __call__(self, x: torch.Tensor):
        if self.compiled is not None and not self.failed:
            try:
                return self.compiled(x)
            except OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - any compiler failure: run eagerly instead
                log.warning("torch.compile failed (%s: %s); running the network without it",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.failed = True
        return self.eager(x)


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows of one (padded) image lie, and how the image was padded to hold one."""

    padded_shape: tuple[int, int, int]
    pad: tuple[tuple[int, int], ...]  # (before, after) per spatial axis
    starts: tuple[tuple[int, int, int], ...]


@lru_cache(maxsize=32)
def plan_windows(shape: tuple[int, int, int], patch: tuple[int, int, int], overlap: float) -> WindowPlan:
    """MONAI's window positions: images smaller than a window are padded symmetrically first."""
    from monai.data.utils import dense_patch_slices

    pad = tuple(((p - n) // 2, (p - n) - (p - n) // 2) if n < p else (0, 0) for n, p in zip(shape, patch))
    padded = tuple(n + a + b for n, (a, b) in zip(shape, pad))
    # MONAI's scan interval: the whole axis when the window fills it, else (1 - overlap) of a window.
    interval = tuple(p if p == n else max(int(p * (1 - overlap)), 1) for n, p in zip(padded, patch))
    slices = dense_patch_slices(padded, patch, interval)
    return WindowPlan(padded, pad, tuple(tuple(s.start for s in window) for window in slices))  # type: ignore[arg-type]


@lru_cache(maxsize=8)
def _gaussian(patch: tuple[int, int, int], device: str) -> torch.Tensor:
    from monai.data.utils import compute_importance_map

    return compute_importance_map(patch, mode="gaussian", sigma_scale=SIGMA_SCALE, device=device, dtype=torch.float32)


@lru_cache(maxsize=4)
def _weight_sum(plan: WindowPlan, patch: tuple[int, int, int], device: str) -> torch.Tensor:
    """The sum of the Gaussian weights of all windows, voxel by voxel (1, 1, X, Y, Z)."""
    weight = _gaussian(patch, device)
    total = torch.zeros((1, 1) + plan.padded_shape, device=device)
    px, py, pz = patch
    for x, y, z in plan.starts:
        total[0, 0, x:x + px, y:y + py, z:z + pz] += weight
    return total


def sliding_window(
    network,
    image: torch.Tensor,
    patch: tuple[int, int, int],
    overlap: float,
    windows_per_batch: int,
    device: torch.device,
    stitch_device: torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Blended logits (1, L, X, Y, Z) float32 for ``image`` (1, C, X, Y, Z), on ``stitch_device``
    (default ``device``). The network (a :class:`PreparedNetwork`) runs on ``device``, in
    autocast of its ``autocast_dtype`` (a bare module: fp16 on CUDA, fp32 on the CPU)."""
    stitch_device = stitch_device or device
    shape = tuple(int(n) for n in image.shape[2:])
    plan = plan_windows(shape, tuple(patch), float(overlap))  # type: ignore[arg-type]
    if any(a or b for a, b in plan.pad):
        flat_pad = [v for a, b in reversed(plan.pad) for v in (a, b)]
        image = torch.nn.functional.pad(image, flat_pad)
    image = image.to(stitch_device)
    weight = _gaussian(tuple(patch), str(stitch_device))  # type: ignore[arg-type]
    dtype = getattr(network, "autocast_dtype", torch.float16 if device.type == "cuda" else None)
    px, py, pz = patch
    starts = plan.starts
    windows_per_batch = min(windows_per_batch, len(starts))
    full_batches = getattr(network, "static_shapes", False)
    batch = torch.empty((windows_per_batch, image.shape[1], px, py, pz), device=device,
                        memory_format=getattr(network, "memory_format", torch.contiguous_format))
    total = None
    chunks = range(0, len(starts), windows_per_batch)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="windows", unit="batch", leave=False)
    with autocast(device, dtype):
        for first in chunks:
            group = starts[first:first + windows_per_batch]
            for n, (x, y, z) in enumerate(group):
                batch[n].copy_(image[0, :, x:x + px, y:y + py, z:z + pz], non_blocking=True)
            logits = network(batch if full_batches else batch[:len(group)])
            if isinstance(logits, (tuple, list)):  # deep supervision: the full-resolution head
                logits = logits[0]
            # A blocking copy: a non-blocking device-to-host copy may not have landed when it is read.
            logits = logits[:len(group)].float().to(stitch_device) * weight
            if total is None:
                total = torch.zeros((1, logits.shape[1]) + plan.padded_shape, device=stitch_device)
            for n, (x, y, z) in enumerate(group):
                total[0, :, x:x + px, y:y + py, z:z + pz] += logits[n]
    assert total is not None
    total /= _weight_sum(plan, tuple(patch), str(stitch_device))
    (ax, _), (ay, _), (az, _) = plan.pad
    return total[:, :, ax:ax + shape[0], ay:ay + shape[1], az:az + shape[2]]


#: The attempt (windows per pass, stitching device) that last fitted after an out-of-memory, by
#: device, patch and image size: later scans of that size start there instead of failing again
#: (each failed attempt costs an allocation failure and, with cuDNN's autotuner, a search).
_FITTED: dict[tuple, tuple[int, str]] = {}


def robust_sliding_window(network, image, patch, overlap, windows_per_batch, device, progress=False) -> torch.Tensor:
    """:func:`sliding_window`, retried with fewer windows per pass and then host stitching when
    the device runs out of memory."""
    key = (str(device), tuple(patch), tuple(image.shape[1:]), windows_per_batch)
    attempts = []
    n = windows_per_batch
    while n >= 1:
        attempts.append((n, device))
        n //= 2
    if device.type == "cuda":
        attempts.append((1, torch.device("cpu")))  # stitch on the host: only windows on the GPU
    if key in _FITTED:
        attempts = attempts[[(n, str(stitch)) for n, stitch in attempts].index(_FITTED[key]):]
    for tried, (n, stitch) in enumerate(attempts):
        try:
            result = sliding_window(network, image, patch, overlap, n, device, stitch, progress)
        except OutOfMemoryError:
            log.warning("out of memory with %d windows per pass, stitching on %s; retrying with less", n, stitch)
            _weight_sum.cache_clear()  # cached device tensors would hold on to memory
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if tried:  # an earlier attempt ran out of memory: start here next time
            _FITTED[key] = (n, str(stitch))
        return result
    raise MemoryError(f"out of memory even with one window per pass and stitching on the host (patch {patch})")


def predict_probabilities(
    network: torch.nn.Module,
    image: np.ndarray,
    patch_size: tuple[int, int, int],
    config: InferenceConfig,
    device: torch.device,
    progress: bool = False,
) -> np.ndarray:
    """Softmax class probabilities (L, I, J, K) float32 for a normalized image (C, I, J, K).

    ``network`` is a :class:`PreparedNetwork` for ``device`` (``config.compile`` is applied
    there, once per process, not here)."""
    inputs = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    flips = [()] if not config.tta else [
        tuple(a for a in combo) for r in range(4) for combo in itertools.combinations((2, 3, 4), r)
    ]
    total = None
    with torch.inference_mode():
        for dims in flips:
            x = torch.flip(inputs, dims) if dims else inputs
            logits = robust_sliding_window(network, x, tuple(patch_size), config.overlap, config.windows_per_batch,
                                           device, progress=progress)
            probs = torch.softmax(logits, dim=1)
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total.to(probs.device) + probs
    assert total is not None
    return (total / len(flips))[0].float().cpu().numpy()
