"""How a model turns a prepared :class:`~tumorseg.scan.Scan` into labels: its input, its inference,
and the way back to the input grid.

tumorseg's own models (:class:`NativeRunner`) resample to the card's spacing, normalise within the
brain and blend softmax probabilities; an imported model reproduces the preprocessing of the tool
that trained it (:mod:`tumorseg.imported`). Everything else in the pipeline (reading, registration,
brain extraction, post-processing, writing) is the same for both. A runner is picklable: batch
workers prepare and finish cases with it while the main process runs the network.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .config import InferenceConfig
from .model import ModelCard
from .scan import Scan
from .stages import decode, geometry, infer, normalize
from .timing import timed


class ModelRunner(Protocol):
    def prepare(self, scan: Scan, timings: dict[str, float], mirror_cuts_mm: float = 0.0) -> tuple[np.ndarray, Any]:
        """The network input and what :meth:`to_labels` needs to go back (it has ``model_shape``
        and ``resampled`` for the report). ``mirror_cuts_mm``: see ``PreprocessConfig``; a runner
        whose tool prepares scans its own way (imported models) does not mirror."""

    def predict(self, network, image: np.ndarray, config: InferenceConfig, device, progress: bool) -> np.ndarray:
        """The network's output on the model grid; ``network`` is an :class:`infer.PreparedNetwork`."""

    def to_labels(self, output: np.ndarray, transform: Any) -> np.ndarray:
        """Label values of the card's scheme (uint8) on the input grid."""

    def precision(self, network) -> str:
        """The arithmetic :meth:`predict` runs ``network`` in: fp32, bf16 or fp16 (for the report)."""


def runner_for(card: ModelCard, model_dir: Path) -> ModelRunner:
    if card.imported is None:
        return NativeRunner(card)
    from .imported import runner_for_imported

    return runner_for_imported(card, model_dir)


class NativeRunner:
    """tumorseg's own models: the card's spacing, brain-masked z-score, softmax probabilities."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card

    def prepare(self, scan: Scan, timings: dict[str, float],
                mirror_cuts_mm: float = 0.0) -> tuple[np.ndarray, geometry.GridTransform]:
        return model_input(scan, self.card, timings, mirror_cuts_mm)

    def predict(self, network, image: np.ndarray, config: InferenceConfig, device, progress: bool) -> np.ndarray:
        return infer.predict_probabilities(network, image, self.card.input.patch_size, config, device, progress)

    def precision(self, network) -> str:
        return network.precision  # [inference] precision, resolved for the device

    def to_labels(self, output: np.ndarray, transform: geometry.GridTransform) -> np.ndarray:
        probs = geometry.probabilities_to_input_grid(output, transform)
        return decode.decode(probs, self.card.scheme, self.card.decoding, transform.input_voxel_ml)


def model_input(
    scan: Scan, card: ModelCard, timings: dict[str, float] | None = None, mirror_cuts_mm: float = 0.0
) -> tuple[np.ndarray, geometry.GridTransform]:
    """The network's input for ``scan`` and the transform back: the model grid, normalised,
    channels in the card's order (zeros for missing sequences). ``predict`` and ``train`` both
    use this, so training and inference prepare scans identically (``prepare`` may first leave
    out sequences, following the card's ``preferred_sets``, and mirror the grid at cuts through a
    brain it extracted: ``mirror_cuts_mm``). Training on a subset of a case's sequences normalises
    them as here from ``model_grid_parts`` (``train.PreparedCase.patch``)."""
    timings = {} if timings is None else timings
    with timed(timings, "geometry"):
        brain = normalize.brain_mask(scan.array)
        transform = geometry.plan_transform(scan, card.input.spacing_mm, brain, mirror_cuts_mm)
        on_grid = geometry.to_model_grid(scan, transform)
        brain_on_grid = geometry.labels_to_model_grid(brain, transform)
    with timed(timings, "normalize"):
        normalized = normalize.normalize(on_grid, card.normalization, brain_on_grid)
        image = _model_channels(normalized, card.input.sequences)
    return image, transform


def model_grid_parts(scan: Scan, card: ModelCard) -> tuple[np.ndarray, np.ndarray, geometry.GridTransform]:
    """``scan`` on the model grid of ``model_input`` but not normalised, in the card's channel order
    (zeros for missing sequences), and each channel's own brain region there (where it differs from its constant
    background; every voxel for a channel without one, none for a missing one): the union of
    the masks of any subset of the channels is the brain region ``model_input`` would normalise
    that subset in, had only its sequences been given."""
    brain = normalize.brain_mask(scan.array)
    transform = geometry.plan_transform(scan, card.input.spacing_mm, brain)
    on_grid = geometry.to_model_grid(scan, transform)
    order = card.input.sequences
    raw = _model_channels(on_grid, order)
    regions = np.zeros(raw.shape, dtype=bool)
    for c, name in enumerate(order):
        if name in scan.channels:
            channel = scan.array[scan.channels.index(name)]
            background = normalize.background_value(channel)
            regions[c] = True if background is None else geometry.labels_to_model_grid(channel != background, transform)
    return raw, regions, transform


def _model_channels(scan: Scan, order: tuple[str, ...]) -> np.ndarray:
    """(len(order), I, J, K): the scan's channels in model order, zeros for missing sequences."""
    out = np.zeros((len(order),) + scan.spatial_shape, dtype=np.float32)
    for c, name in enumerate(order):
        if name in scan.channels:
            out[c] = scan.array[scan.channels.index(name)]
    return out
