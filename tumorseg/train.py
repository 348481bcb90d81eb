"""``tumorseg train``: fit a DynUNet on a Decathlon-layout data set or a folder of BraTS cases.

Determinism and resumption: the network is initialised from the seed, and every iteration
draws its patches and augmentation from a generator seeded by (seed, epoch, iteration). A
checkpoint is written atomically after each epoch; ``--resume`` restarts the interrupted
epoch from it and so repeats exactly what an uninterrupted run would have done.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from . import __version__
from .atomic import atomic_path, write_bytes_atomic
from .augment import AugmentConfig, augment, draw_kept_channels
from .config import FIXED_PRECISIONS, InferenceConfig
from .configio import to_dict
from .batch.cases import unique_case_ids
from .datasets import LabelledCase, discover_cases, patient_groups
from .errors import ConfigError, InputError, TumorsegError
from .evaluate import check_same_grid, read_label_file, region_scores
from .heap import keep_freed_heap_memory
from .labels import REGIONS, LabelScheme, conversion_table
from .model import (Architecture, InputSpec, LoadedModel, ModelCard, Normalization, Weights, build_network,
                    save_model)
from .sequences import SEQUENCES
from .runner import model_grid_parts, model_input
from .stages import geometry, infer, normalize, read

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    name: str = "tumorseg-model"
    sequences: tuple[str, ...] = SEQUENCES
    label_scheme: str = "msd"
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    patch_size: tuple[int, int, int] = (96, 96, 96)
    filters: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (1, 2, 2, 2, 2)
    epochs: int = 50
    iterations_per_epoch: int = 100
    batch_size: int = 2
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    foreground_fraction: float = 0.5
    validation_fraction: float = 0.1
    #: Validate after every this many epochs (and after the last).
    validate_every: int = 1
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    #: Written into the card (the network gets such a set alone when it is available) and trained
    #: on alone with probability ``augment.preferred_set``. None (no sets) and the weights' None
    #: are left out of saved settings, so checkpoints of earlier versions still resume.
    preferred_sets: tuple[tuple[str, ...], ...] | None = None
    #: Share of the patches drawn from each data set, in ``--dataset`` order; None: equal shares.
    dataset_weights: tuple[float, ...] | None = None
    #: sha256 of the weights training starts from (``--init``); None for random initialisation
    #: (left out of the saved settings then, so checkpoints of earlier versions still resume).
    init_weights_sha256: str | None = None
    #: The network's arithmetic: fp32, bf16 (autocast; fast on a CPU with AVX512-BF16 or AMX) or
    #: fp16 (autocast with loss scaling; GPUs only). None: the device's, fp16 on a GPU and fp32 on
    #: the CPU (left out of the saved settings then, so checkpoints of earlier versions still resume).
    precision: str | None = None

    def __post_init__(self) -> None:
        if len(self.spacing_mm) != 3 or len(self.patch_size) != 3:
            raise ValueError(f"spacing ({len(self.spacing_mm)} values) and patch size ({len(self.patch_size)} "
                             "values) need three values each, one per axis")
        if self.seed < 0:
            raise ValueError(f"the seed must be a non-negative integer, got {self.seed}")
        if min(self.epochs, self.iterations_per_epoch, self.batch_size, self.validate_every) < 1:
            raise ValueError("epochs, iterations, batch size and validate_every must be >= 1")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        for s in self.sequences:
            if s not in SEQUENCES:
                raise ValueError(f"unknown sequence {s!r}")
        if self.precision not in (None, *FIXED_PRECISIONS):
            raise ValueError(f"precision must be one of {', '.join(FIXED_PRECISIONS)}, got {self.precision!r}")
        if self.dataset_weights is not None and not all(math.isfinite(w) and w > 0 for w in self.dataset_weights):
            raise ValueError(f"dataset weights must be positive numbers (leave a data set out instead of "
                             f"weighting it 0), got {self.dataset_weights}")

    def card(self, weights_file: str = "model.safetensors") -> ModelCard:
        return ModelCard(
            name=self.name,
            input=InputSpec(sequences=self.sequences, spacing_mm=self.spacing_mm, patch_size=self.patch_size,
                            min_sequences=1, preferred_sets=self.preferred_sets or ()),
            labels=self.label_scheme,
            architecture=Architecture(filters=self.filters, strides=self.strides),
            weights=Weights(weights_file, "0" * 64),
            normalization=Normalization(),
        )


@dataclass
class PreparedCase:
    case_id: str
    image: np.ndarray | None  # (C, X, Y, Z) float32, normalised, model channel order, zeros for missing
    labels: np.ndarray  # (X, Y, Z) uint8 class indices 0..L
    present: list[int]
    foreground: np.ndarray  # (N, 3) indices of tumour voxels
    #: With ``AugmentConfig.subset_normalisation`` (then ``image`` is None): the model-grid image
    #: before normalisation, each channel's own brain region, and for every non-empty subset of
    #: ``present`` the statistics (``normalize.channel_statistics``) of its channels inside the union
    #: of their regions, as ``predict`` given only those sequences computes them.
    raw: np.ndarray | None = None
    regions: np.ndarray | None = None
    stats: dict[tuple[int, ...], dict[int, tuple]] | None = None

    def patch(self, keep: tuple[int, ...] | None, start: np.ndarray, size: np.ndarray) -> np.ndarray:
        """The normalised crop (zero-padded) of the channels ``keep`` (None: ``present``), the others 0."""
        if self.raw is None:
            img = _crop(self.image, start, size, channel_axis=True)
            if keep is not None:
                img[[c for c in range(len(img)) if c not in keep]] = 0.0
            return img
        keep = tuple(sorted(self.present if keep is None else keep))
        raw = _crop(self.raw, start, size, channel_axis=True)
        region = _crop(self.regions[list(keep)], start, size, channel_axis=True).any(axis=0)
        out = np.zeros_like(raw)
        for c in keep:
            out[c][region] = normalize.z_scores(raw[c][region], self.stats[keep][c])
        return out


def prepare_case(case: LabelledCase, card: ModelCard, as_predict: bool = False,
                 subset_normalisation: bool = False) -> PreparedCase:
    """Read, move to the model grid and normalise exactly as ``predict`` does. ``as_predict``
    (validation cases): only the sequences ``predict`` gives the network (the card's
    ``preferred_sets``), so the validation Dice measures what ``predict`` does; training cases
    keep all, for sequence dropout and the preferred-set draw. ``subset_normalisation`` (training
    cases): keep the image unnormalised with what normalising any subset of its sequences needs
    (``PreparedCase.patch``)."""
    scan = read.read_study(case.inputs)
    if as_predict and (used := card.input.choose(scan.channels)) != scan.channels:
        scan = scan.with_channels(used)
    truth = read_label_file(case.label_path)
    check_same_grid(scan.source.shape, scan.source.affine, truth, case.label_path)
    case.scheme.validate_array(truth.labels, "the label map", case.label_path)
    target = card.scheme
    to_index = np.zeros(target.max_label + 1, dtype=np.uint8)
    to_index[target.class_values] = np.arange(len(target.class_values))
    indices = to_index[conversion_table(case.scheme, target)[truth.labels]]
    order = card.input.sequences
    present = [c for c, s in enumerate(order) if s in scan.channels]
    if subset_normalisation and not as_predict:
        raw, regions, transform = model_grid_parts(scan, card)
        stats = {}
        for n in range(1, len(present) + 1):
            for keep in itertools.combinations(present, n):
                region = regions[list(keep)].any(axis=0)
                if not region.any():
                    raise InputError("the brain region is empty: every voxel is background",
                                     scan.meta.get("paths", {}).get(order[keep[0]]))
                stats[keep] = {c: normalize.channel_statistics(raw[c][region], card.normalization, order[c],
                                                               scan.meta.get("paths", {}).get(order[c]))
                               for c in keep}
        channels = None
    else:
        channels, transform = model_input(scan, card)
        raw = regions = stats = None
    labels = geometry.labels_to_model_grid(indices.astype(np.uint8), transform)
    return PreparedCase(case.case_id, channels, labels, present, np.argwhere(labels > 0), raw, regions, stats)


def check_init_compatible(init: ModelCard, card: ModelCard) -> None:
    """Refuse to fine-tune from a model whose weights or meaning differ from the training options."""
    if init.imported is not None:
        raise ConfigError(f"--init model {init.name} is an imported {init.imported.format} model; tumorseg trains its "
                          "own models only (fine-tune it with the tool that trained it)")
    def traits(c: ModelCard) -> dict[str, Any]:
        return {"sequences": c.input.sequences, "labels": c.labels, "spacing_mm": c.input.spacing_mm,
                "architecture": c.architecture, "normalization": c.normalization}

    wanted, found = traits(card), traits(init)
    differ = [f"{k}: {found[k]} in the model, {wanted[k]} in the training options" for k in wanted if found[k] != wanted[k]]
    if differ:
        raise ConfigError(f"--init model {init.name} does not match: " + "; ".join(differ)
                          + " (give the model's --spacing and --filters)")


def split_cases(cases: list[LabelledCase], fraction: float, seed: int) -> tuple[list, list]:
    if fraction == 0 or len(cases) < 2:
        return cases, []
    order = np.random.default_rng([seed, 7]).permutation(len(cases))
    # A small data set may give no validation case; at least one case is always left to train on.
    n_val = min(int(round(fraction * len(cases))), len(cases) - 1)
    val = {int(i) for i in order[:n_val]}
    return [c for i, c in enumerate(cases) if i not in val], [c for i, c in enumerate(cases) if i in val]


def sample_batch(groups: list[list[PreparedCase]], cfg: TrainConfig, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of augmented patches (float images, uint8 class indices); data sets (groups) are
    drawn by ``cfg.dataset_weights``."""
    images, labels = [], []
    patch = np.array(cfg.patch_size)
    spec = cfg.card().input
    weights = None if cfg.dataset_weights is None else np.array(cfg.dataset_weights) / sum(cfg.dataset_weights)
    for _ in range(cfg.batch_size):
        # Equal shares keep the draw of earlier versions, so their card commands still reproduce.
        group = groups[int(rng.integers(len(groups))) if weights is None else int(rng.choice(len(groups), p=weights))]
        case = group[int(rng.integers(len(group)))]
        shape = np.array(case.labels.shape)
        if len(case.foreground) and rng.random() < cfg.foreground_fraction:
            centre = case.foreground[int(rng.integers(len(case.foreground)))] + rng.integers(-patch // 4, patch // 4 + 1)
        else:
            centre = np.array([int(rng.integers(0, n)) for n in shape])
        start = centre - patch // 2
        lab = _crop(case.labels, start, patch, channel_axis=False)
        # The channels predict would give the network for this case (the card's preferred sets).
        preferred = tuple(spec.sequences.index(s) for s in spec.choose(tuple(spec.sequences[c] for c in case.present)))
        if cfg.augment.subset_normalisation:
            # The kept channels are drawn first and normalised as predict given only them would.
            keep = draw_kept_channels(case.present, preferred, rng, cfg.augment) or tuple(case.present)
            img = case.patch(keep, start, patch)
            img_t, lab_t = augment(torch.from_numpy(img), torch.from_numpy(lab.astype(np.int64)), sorted(keep), rng,
                                   cfg.augment, dropout=False)
        else:
            img = case.patch(None, start, patch)
            img_t, lab_t = augment(torch.from_numpy(img), torch.from_numpy(lab.astype(np.int64)), case.present, rng,
                                   cfg.augment, preferred)
        images.append(img_t)
        labels.append(lab_t.to(torch.uint8))  # an eighth of int64's bytes between processes
    return torch.stack(images), torch.stack(labels)[:, None]


class _PreparedCases(torch.utils.data.Dataset):
    """``prepare_case`` of each case, for ``_in_order``."""

    def __init__(self, cases: list[LabelledCase], card: ModelCard, first_validation: int,
                 subset_normalisation: bool = False) -> None:
        self.cases, self.card, self.first_validation = cases, card, first_validation
        self.subset_normalisation = subset_normalisation

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> PreparedCase | TumorsegError:
        try:
            return prepare_case(self.cases[i], self.card, as_predict=i >= self.first_validation,
                                subset_normalisation=self.subset_normalisation)
        except TumorsegError as e:  # returned, not raised: a worker would re-raise it as a traceback
            return e


class _Batches(torch.utils.data.Dataset):
    """The training batches from ``start_epoch`` on, in order: batch (epoch, it) is drawn from a
    generator seeded by (seed, epoch, it) alone, so any process can draw any batch."""

    def __init__(self, prepared: list[list[PreparedCase]], cfg: TrainConfig, start_epoch: int) -> None:
        self.prepared, self.cfg, self.start_epoch = prepared, cfg, start_epoch

    def __len__(self) -> int:
        return (self.cfg.epochs - self.start_epoch) * self.cfg.iterations_per_epoch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, it = divmod(i, self.cfg.iterations_per_epoch)
        return sample_batch(self.prepared, self.cfg, np.random.default_rng([self.cfg.seed, self.start_epoch + epoch, it]))


def _in_order(items: torch.utils.data.Dataset, workers: int, pin_memory: bool = False):
    """The items of ``items`` in order, made in this process (``workers`` 0) or ahead of use by
    ``workers`` processes. Forked on Linux, so the workers share the prepared cases instead of
    receiving a copy each."""
    if workers == 0:
        return (items[i] for i in range(len(items)))
    # Not on macOS, where forking a process that has started torch is unsafe.
    context = "fork" if sys.platform.startswith("linux") else None
    return torch.utils.data.DataLoader(items, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                       multiprocessing_context=context, prefetch_factor=2, pin_memory=pin_memory,
                                       generator=torch.Generator())  # leaves the global RNG as with 0 workers


def _as_is(item):
    return item


def _crop(array: np.ndarray, start: np.ndarray, size: np.ndarray, channel_axis: bool) -> np.ndarray:
    """A zero-padded crop of ``size`` from ``start`` (may reach outside the array)."""
    spatial = array.shape[1:] if channel_axis else array.shape
    out = np.zeros(((array.shape[0],) if channel_axis else ()) + tuple(size), dtype=array.dtype)
    src, dst = [], []
    for s, n, z in zip(start, spatial, size):
        a, b = max(0, s), min(n, s + z)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    lead = (slice(None),) if channel_axis else ()
    out[lead + tuple(dst)] = array[lead + tuple(src)]
    return out


def region_dice(pred: np.ndarray, truth: np.ndarray, scheme: LabelScheme) -> dict[str, float]:
    """Dice of WT, TC, ET for two class-index maps (0..L) of ``scheme``."""
    values = scheme.class_values
    return region_scores(values[pred], scheme, values[truth], scheme)


def score_validation_cases(network, cases: list[PreparedCase], card: ModelCard, device: torch.device) -> dict[str, Any]:
    per_case = {}
    # Ids repeated across data sets (two synthetic sets both hold synth_0000) get -2, -3: each case
    # is scored and counted in the mean.
    for name, case in zip(unique_case_ids([c.case_id for c in cases]), cases):
        # One pass (no mirroring): validation tracks training, and is 8x cheaper than predict's default.
        probs = infer.predict_probabilities(network, case.image, card.input.patch_size, InferenceConfig(tta=False), device)
        per_case[name] = region_dice(np.argmax(probs, axis=0), case.labels, card.scheme)
    if not per_case:
        return {}
    mean = {r: float(np.mean([d[r] for d in per_case.values()])) for r in REGIONS}
    return {"mean": mean, "cases": per_case}


def dataset_schemes(datasets: list[Path], label_schemes: tuple[str, ...]) -> list[str | None]:
    """The ground truth's label scheme for each data set: none given (Decathlon data sets declare
    theirs), one for all, or one per data set in order (BraTS 2018 and 2015 folders differ)."""
    if not label_schemes:
        return [None] * len(datasets)
    if len(label_schemes) == 1:
        return list(label_schemes) * len(datasets)
    if len(label_schemes) != len(datasets):
        raise ConfigError(f"{len(label_schemes)} label schemes for {len(datasets)} data sets: give one for all "
                          "of them or one per --dataset, in the same order")
    return list(label_schemes)


def train(datasets: list[Path], output: Path, cfg: TrainConfig, label_schemes: tuple[str, ...] = (), resume: bool = False,
          device_name: str = "auto", progress: bool = True, command: str = "",
          exclude: tuple[str, ...] = (), init: LoadedModel | None = None, workers: int = 0) -> ModelCard:
    """Train, checkpointing every epoch; returns the card of the model written to ``output``.

    Each data set in ``datasets`` is split into training and validation cases on its own and
    contributes the share of the patches ``cfg.dataset_weights`` gives it (equal by default);
    ``exclude`` names cases left out entirely (for leave-one-out evaluation). ``label_schemes``: see
    ``dataset_schemes``. ``init`` is a model
    to fine-tune instead of starting from random weights; ``cfg.init_weights_sha256`` must name
    its weights. ``workers`` processes prepare the cases and draw the augmented batches ahead of the
    network (on a GPU the CPU work is the bottleneck); the batches are the same as with 0 workers.
    """
    from monai.losses import DiceCELoss
    from tqdm import tqdm

    keep_freed_heap_memory()
    output = Path(output)
    device = infer.select_device(device_name)
    # None: fp16 on a GPU, fp32 on the CPU; a recipe's command then trains alike on any CPU.
    dtype = infer.autocast_dtype(cfg.precision or ("fp16" if device.type == "cuda" else "fp32"), device)
    card = cfg.card()
    if (init.sha256 if init else None) != cfg.init_weights_sha256:
        raise ValueError("cfg.init_weights_sha256 must be the sha256 of the init model's weights")
    if init is not None:
        check_init_compatible(init.card, card)
    if cfg.dataset_weights is not None and len(cfg.dataset_weights) != len(datasets):
        raise ConfigError(f"{len(cfg.dataset_weights)} dataset weights for {len(datasets)} data sets")
    train_groups, val_cases, split = _split_datasets(datasets, label_schemes, cfg, exclude)
    train_cases = [c for group in train_groups for c in group]
    checkpoint_path = output / CHECKPOINT_NAME
    saved_state = None
    if resume:  # checked before the cases are prepared, which takes minutes on a large data set
        saved_state = _read_checkpoint(checkpoint_path, cfg, split)
    elif checkpoint_path.exists():
        raise ConfigError(f"{checkpoint_path} exists: pass --resume to continue it, or choose another --output")
    log.info("%d training and %d validation cases", len(train_cases), len(val_cases))
    prepared, prepared_val = _prepare_all(train_groups, val_cases, card, workers, progress,
                                          bool(cfg.augment.subset_normalisation))

    torch.manual_seed(cfg.seed)
    network = build_network(card)
    if init is not None:
        network.load_state_dict(init.network.state_dict())
    network = network.to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * cfg.iterations_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / total_steps) ** 0.9)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # bf16 needs no loss scaling
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if saved_state is not None:
        start_epoch, history = _restore_checkpoint(saved_state, network, optimizer, scheduler, scaler)
        del saved_state
        log.info("resuming after epoch %d", start_epoch)

    network.train()
    batches = iter(_in_order(_Batches(prepared, cfg, start_epoch), workers, pin_memory=device.type == "cuda"))
    try:
        for epoch in range(start_epoch, cfg.epochs):
            started = time.perf_counter()
            bar = tqdm(range(cfg.iterations_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
            losses = _train_epoch(network, batches, bar, _Optimisation(optimizer, scheduler, scaler, loss_fn), device, dtype)
            val = {}
            if (epoch + 1) % cfg.validate_every == 0 or epoch + 1 == cfg.epochs:
                network.eval()
                val = score_validation_cases(network, prepared_val, card, device)
                network.train()
            history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.perf_counter() - started, 1),
                            "validation_dice": val.get("mean"), "validation_cases": val.get("cases")})
            log.info("epoch %d: loss %.4f, validation Dice %s", epoch + 1, np.mean(losses), val.get("mean"))
            _save_checkpoint(checkpoint_path, cfg, split, network, optimizer, scheduler, scaler, epoch + 1, history)
    finally:
        del batches  # ends the workers now, also when an exception keeps this frame alive

    network.eval()
    card = dataclasses.replace(
        card,
        description=f"DynUNet trained by tumorseg {__version__} train",
        training={
            "command": command,
            "datasets": [Path(d).name for d in datasets],
            "excluded_cases": split["excluded"],
            "seed": cfg.seed,
            "epochs": cfg.epochs,
            "iterations_per_epoch": cfg.iterations_per_epoch,
            "training_cases": [c.case_id for c in train_cases],
            "validation_cases": [c.case_id for c in val_cases],
            "config": to_dict(cfg),
            **({"initialised_from": _provenance(init)} if init else {}),
        },
        metrics={"validation_dice": history[-1]["validation_dice"] or {}} if history else {},
    )
    card = save_model(output, card, network.cpu())
    record = {"training": [c.case_id for c in train_cases], "validation": split["validation"]}
    write_bytes_atomic(output / LOG_NAME, json.dumps({"split": record, "history": history}, indent=2).encode())
    return card


def _split_datasets(datasets: list[Path], label_schemes: tuple[str, ...], cfg: TrainConfig,
                    exclude: tuple[str, ...]) -> tuple[list[list[LabelledCase]], list[LabelledCase], dict[str, Any]]:
    """Each data set's training cases (one group per data set) and all validation cases, each data
    set split on its own; and the split as the checkpoint records it."""
    train_groups, val_groups, excluded = [], [], set()
    for dataset, scheme in zip(datasets, dataset_schemes(datasets, label_schemes)):
        found = discover_cases(dataset, scheme)
        excluded |= {c.case_id for c in found if c.case_id in exclude}
        cases = [c for c in found if c.case_id not in exclude]
        if not cases:
            raise InputError("no training cases left after --exclude", dataset)
        train_part, val_part = split_cases(cases, cfg.validation_fraction, cfg.seed)
        train_groups.append(train_part)
        val_groups.append(val_part)
    if unmatched := sorted(set(exclude) - excluded):
        # A misspelt id would train on the case it was meant to hold out, and the card would say otherwise.
        raise ConfigError(f"--exclude {', '.join(unmatched)}: no such case in the data sets (case ids are "
                          "file or folder names, case-sensitive)")
    val_cases, trained_patients = _without_trained_patients(train_groups, val_groups)
    split = {"training": [[c.case_id for c in group] for group in train_groups],
             "validation": [c.case_id for c in val_cases], "excluded": sorted(excluded)}
    if trained_patients:
        split["left_out_of_validation"] = trained_patients
    return train_groups, val_cases, split


def _without_trained_patients(train_groups: list[list[LabelledCase]],
                              val_groups: list[list[LabelledCase]]) -> tuple[list[LabelledCase], list[str]]:
    """All data sets' validation cases less those whose patient is trained on from another data set
    (BraTS 2018's Brats18_2013_20_1 is BraTS 2015's pat0006), and the ids left out: each data set is
    split on its own, so one copy could train while the other scored the model. (Within one data set
    a case is one patient: two synthetic cases alike are not.)"""
    val_cases = [c for group in val_groups for c in group]
    if len(train_groups) < 2 or not val_cases:
        return val_cases, []
    cases = [(d, c, False) for d, group in enumerate(train_groups) for c in group]
    cases += [(d, c, True) for d, group in enumerate(val_groups) for c in group]
    leaked: set[int] = set()
    for group in patient_groups([c for _, c, _ in cases]):
        trained_from = {cases[i][0] for i in group if not cases[i][2]}
        leaked |= {i for i in group if cases[i][2] and trained_from - {cases[i][0]}}
    for i in sorted(leaked):
        log.info("validation: %s left out: the same patient is trained on from another data set", cases[i][1].case_id)
    kept = [c for i, (_, c, validating) in enumerate(cases) if validating and i not in leaked]
    return kept, [cases[i][1].case_id for i in sorted(leaked)]


def _prepare_all(train_groups: list[list[LabelledCase]], val_cases: list[LabelledCase], card: ModelCard,
                 workers: int, progress: bool,
                 subset_normalisation: bool = False) -> tuple[list[list[PreparedCase]], list[PreparedCase]]:
    """The cases on the model grid, normalised: per training group, and the validation cases."""
    from tqdm import tqdm

    train_cases = [c for group in train_groups for c in group]
    with tqdm(total=len(train_cases) + len(val_cases), desc="preparing", disable=not progress) as bar:
        ready = []
        for case in _in_order(_PreparedCases(train_cases + val_cases, card, len(train_cases), subset_normalisation), workers):
            if isinstance(case, TumorsegError):
                raise case
            ready.append(case)
            bar.update()
    in_order = iter(ready)
    prepared = [list(itertools.islice(in_order, len(group))) for group in train_groups]
    return prepared, list(in_order)


class _Optimisation(NamedTuple):
    optimizer: Any
    scheduler: Any
    scaler: Any
    loss_fn: Any


def _train_epoch(network, batches, bar, opt: _Optimisation, device: torch.device, dtype) -> list[float]:
    """One epoch's steps (one per item of ``bar``); the loss of each."""
    losses = []
    for _ in bar:
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True).long()
        opt.optimizer.zero_grad(set_to_none=True)
        with infer.autocast(device, dtype):
            logits = network(images)
        loss = opt.loss_fn(logits.float(), labels)  # softmax, Dice and cross-entropy in fp32
        opt.scaler.scale(loss).backward()
        opt.scaler.unscale_(opt.optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.scheduler.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


def _provenance(init: LoadedModel) -> dict[str, Any]:
    """What a fine-tuned model started from: enough to rebuild the chain of training commands."""
    base = init.card
    out = {"name": base.name, "version": base.version, "weights_sha256": base.weights.sha256}
    for key in ("command", "synthetic_data_command", "datasets", "excluded_cases", "initialised_from"):
        if key in base.training:
            out[key] = base.training[key]
    return out


def _save_checkpoint(path, cfg, split, network, optimizer, scheduler, scaler, epoch, history) -> None:
    state = {
        "config": json.dumps(to_dict(cfg), sort_keys=True),
        "split": json.dumps(split, sort_keys=True),  # the cases trained and validated on, by data set
        "epoch": epoch,
        "history": json.dumps(history),
        "network": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),  # the loss scale of mixed precision ({} on the CPU)
    }
    with atomic_path(path) as tmp:
        torch.save(state, str(tmp))


def _read_checkpoint(path: Path, cfg: TrainConfig, split: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's state, refused when it was made with other settings or other cases (a case
    added to a data set, or another --exclude, would move cases between training and validation)."""
    if not path.is_file():
        raise ConfigError("--resume given but there is no checkpoint", path)
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if state["config"] != json.dumps(to_dict(cfg), sort_keys=True):
        saved, now = json.loads(state["config"]), to_dict(cfg)
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ConfigError(f"the checkpoint was made with other training settings ({', '.join(differ)} differ; "
                          "init_weights_sha256 is set by --init); resume with the same options", path)
    if "split" in state and state["split"] != json.dumps(split, sort_keys=True):  # absent before 2026-11-29
        saved = json.loads(state["split"])
        differ = [k for k in ("training", "validation", "excluded") if saved.get(k) != split[k]]
        raise ConfigError(f"the checkpoint was made with other cases ({', '.join(differ)} differ: the data sets' "
                          "cases or --exclude changed); resume with the same data sets and options", path)
    return state


def _restore_checkpoint(state: dict[str, Any], network, optimizer, scheduler, scaler) -> tuple[int, list]:
    network.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):  # absent from earlier checkpoints and from CPU runs
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]), json.loads(state["history"])
