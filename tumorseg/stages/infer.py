"""Infer stage: sliding-window inference with MONAI and Gaussian blending.

On CUDA the windows run in fp16 autocast, several per batch, and the blending happens on the
device; on the CPU in fp32. Optional mirroring test-time augmentation averages the softmax of
all 8 flips of the three axes.
"""
from __future__ import annotations

import itertools
import logging

import numpy as np
import torch

from ..config import InferenceConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def predict_probabilities(
    network: torch.nn.Module,
    image: np.ndarray,
    patch_size: tuple[int, int, int],
    config: InferenceConfig,
    device: torch.device,
    progress: bool = False,
) -> np.ndarray:
    """Softmax class probabilities (L, I, J, K) float32 for a normalized image (C, I, J, K)."""
    from monai.inferers import sliding_window_inference

    network = network.to(device).eval()
    inputs = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    flips = [()] if not config.tta else [
        tuple(a for a in combo) for r in range(4) for combo in itertools.combinations((2, 3, 4), r)
    ]
    use_amp = device.type == "cuda"
    total = None
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
        for dims in flips:
            x = torch.flip(inputs, dims) if dims else inputs
            logits = sliding_window_inference(
                x,
                roi_size=patch_size,
                sw_batch_size=config.windows_per_batch,
                predictor=network,
                overlap=config.overlap,
                mode="gaussian",
                sw_device=device,
                device=device,
                progress=progress,
            )
            probs = torch.softmax(logits.float(), dim=1)
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total + probs
    assert total is not None
    return (total / len(flips))[0].float().cpu().numpy()
