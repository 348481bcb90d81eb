"""nnU-Net v2 trained models: import (a card that points at the results folder), safe loading, and
inference that reproduces ``nnUNetv2_predict`` on a :class:`~tumorseg.scan.Scan`.

A results folder holds ``dataset.json``, ``plans.json`` and ``fold_*/checkpoint_*.pth``. The
checkpoints are pickles: they are read with ``torch.load(weights_only=True)`` and an allow-list of
the few types nnU-Net puts in them, so loading runs no code; the network is built from the plans by
dynamic_network_architectures, from an allow-list of classes (``pip install tumorseg[nnunet]``).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from ..labels import ED, ET, NCR, NET, get_scheme
from . import load_torch

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'tumorseg[nnunet]' (dynamic-network-architectures)"
#: Network classes that plans may name, and the torch building blocks their arguments may name.
NETWORK_CLASSES = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
}
TORCH_OPS = {
    f"torch.nn{prefix}.{name}"
    for name, module in [("Conv2d", "conv"), ("Conv3d", "conv"), ("InstanceNorm2d", "instancenorm"),
                         ("InstanceNorm3d", "instancenorm"), ("BatchNorm2d", "batchnorm"), ("BatchNorm3d", "batchnorm"),
                         ("Dropout", "dropout"), ("Dropout2d", "dropout"), ("Dropout3d", "dropout"),
                         ("LeakyReLU", "activation"), ("ReLU", "activation"), ("GELU", "activation")]
    for prefix in ("", f".modules.{module}")
}

#: Channel names in dataset.json, recognised case-insensitively (the BraTS, MSD and nnU-Net spellings).
_CHANNEL_PATTERNS = [
    ("flair", r"^(t2[-_ ]?)?flair$"),
    ("t1gd", r"^t1[-_ ]?(c|ce|gd|post|contrast|[-_ ]?gad.*)$"),
    ("t1", r"^t1[-_ ]?(w|n|native|pre)?$"),
    ("t2", r"^t2[-_ ]?(w)?$"),
]
#: Label names in dataset.json, recognised by keyword, and the tissue classes they stand for; the
#: core is tried first, so that "non-enhancing tumour" is not taken for enhancing.
_LABEL_KEYWORDS = [
    (frozenset({NCR, NET}), ("necro", "ncr", "net", "netc", "non_enhancing", "non-enhancing", "nonenhancing", "core")),
    (frozenset({ET}), ("enhanc", "et")),
    (frozenset({ED}), ("edema", "oedema", "ed", "snfh")),
]


def channel_sequences(dataset: dict, given: dict[int, str] | None = None) -> tuple[str, ...]:
    """The tumorseg sequence of each nnU-Net input channel, in channel order, from
    ``channel_names`` (or ``modality``) in dataset.json, or from ``given`` (channel -> sequence)."""
    names = dataset.get("channel_names") or dataset.get("modality") or {}
    count = len(names)
    if given:
        if sorted(given) != list(range(count)):
            raise ModelError(f"--channels must name each of the {count} channels 0..{count - 1} once, got {sorted(given)}")
        out = tuple(given[c] for c in range(count))
        if len(set(out)) != len(out):
            raise ModelError(f"--channels names a sequence twice: {', '.join(out)}")
        return out
    out = []
    for c in range(count):
        name = str(names[str(c)]).strip()
        match = [seq for seq, pattern in _CHANNEL_PATTERNS if re.match(pattern, name.lower())]
        if not match:
            raise ModelError(f"channel {c} of dataset.json is named {name!r}, which is not a sequence tumorseg "
                             "recognises; name every channel with --channels 0=flair,1=t1,2=t1gd,3=t2")
        out.append(match[0])
    if len(set(out)) != len(out):
        raise ModelError(f"dataset.json channels {list(names.values())} map to {out}: a sequence twice; "
                         "name them with --channels")
    return tuple(out)


def label_map(dataset: dict, scheme_name: str, given: dict[int, str] | None = None) -> dict[int, int]:
    """nnU-Net output value -> label value of ``scheme_name``. Region-based models (BraTS style:
    nested regions painted in ``regions_class_order``) by the nesting; plain labels by name."""
    scheme = get_scheme(scheme_name)
    labels = dataset.get("labels", {})
    if labels and all(str(k).isdigit() and isinstance(v, str) for k, v in labels.items()):
        # nnU-Net v1's table runs value -> name ("1": "edema"); v2's converter turns it round too.
        labels = {name: int(value) for value, name in labels.items()}
    labels = {name: v for name, v in labels.items() if name != "ignore"}  # nnU-Net's ignore label: no output
    regions = {name: (tuple(v) if isinstance(v, list) else (v,)) for name, v in labels.items()}
    tissue: dict[int, frozenset[str]] = {}
    if given:
        expected = output_values(dataset)
        if sorted(given) != expected:
            raise ModelError(f"--labels must name each output value of the model once, {expected} "
                             f"(0 is background), got {sorted(given)}")
        return {value: scheme.label(name).value for value, name in given.items()}
    if "regions_class_order" in dataset:
        # Nested regions, as nnU-Net's BraTS data sets: a value in all three is enhancing, in two
        # (whole tumour and core) is the rest of the core, in one (whole tumour only) is oedema.
        fg = [r for name, r in regions.items() if r != (0,)]
        by_depth = {1: frozenset({ED}), 2: frozenset({NCR, NET}), 3: frozenset({ET})}
        for value in dataset["regions_class_order"]:
            depth = sum(value in r for r in fg)
            if len(fg) != 3 or depth not in by_depth:
                raise ModelError(f"dataset.json regions {labels} are not the three nested tumour regions "
                                 "(whole tumour, core, enhancing); name each output with --labels 1=edema,...")
            tissue[int(value)] = by_depth[depth]
    else:
        for name, value in labels.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelError(f"dataset.json label {name!r} has the value {value!r}: a plain-label model needs "
                                 "one integer per label (a region list needs regions_class_order)")
            if value == 0:
                continue
            key = name.lower().replace(" ", "_")
            found = [classes for classes, words in _LABEL_KEYWORDS
                     if any(w == key or (len(w) > 3 and w in key) for w in words)]
            if not found:
                raise ModelError(f"dataset.json label {name!r} ({value}) is not a tumour label tumorseg recognises; "
                                 "name each output with --labels 1=edema,2=...")
            tissue[int(value)] = found[0]
    if not tissue:
        raise ModelError(f"dataset.json labels {labels} name no tumour label; "
                         "name each output with --labels 1=edema,2=...")
    out = {}
    for value, classes in sorted(tissue.items()):
        matches = [label for label in scheme.labels if classes <= label.classes]
        if not matches:
            raise ModelError(f"nnU-Net label {value} ({', '.join(sorted(classes))}) has no label in scheme "
                             f"{scheme_name}; choose another --label-scheme")
        out[value] = min(matches, key=lambda label: len(label.classes)).value
    return out


def output_heads(dataset: dict) -> int:
    """The network's output channels: one per region of a region-based model, else one per label
    (nnU-Net's ``LabelManager.num_segmentation_heads``: the ignore label has none)."""
    if "regions_class_order" in dataset:
        return len(dataset["regions_class_order"])
    return len([name for name in dataset["labels"] if name != "ignore"])


def output_values(dataset: dict) -> list[int]:
    """The label values nnU-Net writes besides background: ``regions_class_order``, or 1..heads-1."""
    if "regions_class_order" in dataset:
        return sorted(int(v) for v in dataset["regions_class_order"])
    return list(range(1, output_heads(dataset)))


#: nnU-Net readers that give the file's voxels as SimpleITK does, (k, j, i), as tumorseg feeds them;
#: the *WithReorient ones turn the image to RAS first, which tumorseg does not reproduce.
READERS = ("SimpleITKIO", "NibabelIO")


def check_reader(plans: dict, where: Path) -> None:
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in READERS:
        raise ModelError(f"plans use image_reader_writer {reader!r}, which reads images in another voxel order "
                         f"than the file's; tumorseg reproduces {', '.join(READERS)} only", where)


def configuration_of(plans: dict, name: str, where: Path | None = None) -> dict:
    """A configuration of the plans with its ``inherits_from`` chain resolved, as nnU-Net's
    ``PlansManager.get_configuration`` does."""
    configurations = plans.get("configurations", {})
    seen: list[str] = []
    chain = []
    while True:
        if name not in configurations:
            raise ModelError(f"plans.json has no configuration {name!r}", where)
        if name in seen:
            raise ModelError(f"plans.json configurations inherit in a circle: {' -> '.join([*seen, name])}", where)
        seen.append(name)
        chain.append(configurations[name])
        if "inherits_from" not in configurations[name]:
            break
        name = configurations[name]["inherits_from"]
    out: dict = {}
    for config in reversed(chain):
        out.update(config)
    return out


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError("not an nnU-Net results folder: file missing", path) from None
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read: {e}", path) from None


def checkpoint_files(folder: Path, folds: tuple[str, ...] | None, checkpoint: str) -> dict[str, Path]:
    """fold -> checkpoint file; all ``fold_*`` folders holding ``checkpoint`` when ``folds`` is None."""
    name = f"checkpoint_{checkpoint}.pth"
    if folds is None:
        # nnU-Net's auto_detect_available_folds: every fold_* but fold_all
        found = sorted((p.name[len("fold_"):] for p in folder.glob("fold_*")
                        if p.name != "fold_all" and (p / name).is_file()),
                       key=lambda f: (0, int(f), f) if f.isdigit() else (1, 0, f))
        if not found:
            raise ModelError(f"no fold_*/{name} in the results folder", folder)
        folds = tuple(found)
    files = {}
    for fold in folds:
        path = folder / f"fold_{fold}" / name
        if not path.is_file():
            raise ModelError(f"fold {fold} has no {name}", path)
        files[fold] = path
    return files


# -- loading without running code ----------------------------------------------------------------

def _safe_globals() -> list:
    """The types a checkpoint written by nnU-Net's trainer holds besides tensors, containers and
    builtins: numpy scalars in its training log (and their dtypes). None of them runs code."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return [core.multiarray.scalar, np.dtype, *dtypes]


def load_checkpoint(path: Path, trust_code: bool = False) -> dict[str, Any]:
    """A checkpoint's dict, read without running code (see :func:`load_torch`): nnU-Net's
    trainer writes numpy scalars besides tensors, which are allowed."""
    return load_torch(path, trust_code, allowed=tuple(_safe_globals()), holds="the checkpoint")


def build_network(plans: dict, configuration: str, in_channels: int, out_channels: int):
    """The network ``plans`` describe for ``configuration``: nnU-Net's ``get_network_from_plans``,
    with the class and its building blocks checked against the allow-lists first."""
    import pydoc

    try:
        import dynamic_network_architectures  # noqa: F401
    except ImportError:
        raise ModelError(f"nnU-Net models need dynamic-network-architectures, which is not installed: "
                         f"{INSTALL_HINT}") from None
    arch = configuration_of(plans, configuration)["architecture"]
    name = arch["network_class_name"]
    if name not in NETWORK_CLASSES:
        raise ModelError(f"plans name network class {name!r}; tumorseg builds only {sorted(NETWORK_CLASSES)}")
    kwargs = dict(arch["arch_kwargs"])
    for key in arch.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            if kwargs[key] not in TORCH_OPS:
                raise ModelError(f"plans name {key} = {kwargs[key]!r}, which is not an allowed torch building block")
            kwargs[key] = pydoc.locate(kwargs[key])
    network_class = pydoc.locate(name)
    return network_class(input_channels=in_channels, num_classes=out_channels, deep_supervision=False, **kwargs)


class FoldEnsemble:
    """One network and the weights of each fold: nnU-Net runs the whole sliding window once per
    fold with that fold's weights loaded, and averages the logits."""

    def __init__(self, network, fold_weights: list[dict]) -> None:
        self.network = network
        self.fold_weights = fold_weights

    def folds(self):
        for weights in self.fold_weights:
            self.network.load_state_dict(weights)
            yield self.network

    # What PreparedNetwork asks of a network.
    def to(self, device=None, **kwargs):
        self.network.to(device, **kwargs)
        self.fold_weights = [{k: v.to(device) for k, v in w.items()} for w in self.fold_weights]
        return self

    def eval(self):
        self.network.eval()
        return self

    def __call__(self, x):
        return self.network(x)


@dataclass(frozen=True)
class NnunetSettings:
    """What inference needs from the results folder, read once when the model is loaded."""

    configuration: str
    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    normalization: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    intensity: tuple[dict, ...]
    resampling_data: dict
    resampling_probabilities: dict
    mirror_axes: tuple[int, ...]
    heads: int
    regions_class_order: tuple[int, ...] | None
    #: nnU-Net output value -> tumorseg label value (index = nnU-Net value)
    lut: np.ndarray


def read_settings(folder: Path, card) -> NnunetSettings:
    """The settings of the card's configuration from the results folder's plans and dataset.json."""
    from .nnunet_ops import NORMALIZATION_SCHEMES, RESAMPLING_FUNCTIONS

    imported = card.imported
    configuration = imported.configuration
    plans = read_json(folder / "plans.json")
    dataset = read_json(folder / "dataset.json")
    config = configuration_of(plans, configuration, folder / "plans.json")
    check_reader(plans, folder / "plans.json")
    if len(config["patch_size"]) != 3:
        raise ModelError(f"configuration {configuration} is 2D; tumorseg runs 3D configurations only", folder)
    if config.get("previous_stage"):
        raise ModelError(f"configuration {configuration} is a cascade stage; tumorseg does not run cascades", folder)
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if config[key] not in RESAMPLING_FUNCTIONS:
            raise ModelError(f"plans use {key} = {config[key]!r}; tumorseg reproduces {RESAMPLING_FUNCTIONS} only")
    for scheme in config["normalization_schemes"]:
        if scheme not in NORMALIZATION_SCHEMES:
            raise ModelError(f"plans use normalisation {scheme!r}; tumorseg reproduces {NORMALIZATION_SCHEMES}")
    regions = "regions_class_order" in dataset
    heads = output_heads(dataset)
    lut = np.zeros(max([0, *(int(k) for k in imported.label_map)]) + 1, dtype=np.uint8)
    for value, target in imported.label_map.items():
        lut[int(value)] = target
    intensity = plans.get("foreground_intensity_properties_per_channel", {})

    def kwargs(key: str) -> dict:
        out = dict(config.get(f"{key}_kwargs", {}))
        out.pop("is_seg", None)
        return out

    forward = tuple(plans["transpose_forward"])
    return NnunetSettings(
        configuration=configuration,
        spacing=tuple(float(s) for s in config["spacing"]),
        patch_size=tuple(int(p) for p in config["patch_size"]),
        transpose_forward=forward,
        transpose_backward=tuple(plans["transpose_backward"]),
        normalization=tuple(config["normalization_schemes"]),
        use_mask_for_norm=tuple(bool(u) for u in config["use_mask_for_norm"]),
        intensity=tuple(intensity.get(str(c)) for c in range(len(config["normalization_schemes"]))),
        resampling_data=kwargs("resampling_fn_data"),
        resampling_probabilities=kwargs("resampling_fn_probabilities"),
        mirror_axes=tuple(imported.mirror_axes),
        heads=heads,
        regions_class_order=tuple(int(v) for v in dataset["regions_class_order"]) if regions else None,
        lut=lut,
    )


def _fit(network, checkpoint: dict, path: Path) -> dict:
    """Load a checkpoint's weights into ``network``; the state dict (``_orig_mod.`` prefixes of a
    compiled training run removed)."""
    state = checkpoint.get("network_weights") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ModelError("not an nnU-Net checkpoint: no network_weights", path)
    state = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in state.items()}
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"the weights do not fit the network the plans describe: {str(e).splitlines()[0]}",
                         path) from None
    return state


def load_network(card, folder: Path) -> FoldEnsemble:
    """The card's folds' weights in one network built from the plans (files already verified)."""
    imported = card.imported
    plans = read_json(folder / "plans.json")
    dataset = read_json(folder / "dataset.json")
    heads = output_heads(dataset)
    network = build_network(plans, imported.configuration, len(card.input.sequences), heads)
    files = checkpoint_files(folder, imported.folds, imported.checkpoint)
    weights = [_fit(network, load_checkpoint(path, imported.trust_code), path) for path in files.values()]
    network.eval()
    log.info("nnU-Net model %s: %s, folds %s", card.name, imported.configuration, ", ".join(files))
    return FoldEnsemble(network, weights)


# -- inference on a Scan -------------------------------------------------------------------------

@dataclass(frozen=True)
class NnunetTransform:
    """Where a scan went on its way to nnU-Net's grid, to put the result back (nnU-Net's
    ``properties``). Axes are nnU-Net's: the file's (k, j, i), then ``transpose_forward``."""

    input_shape: tuple[int, ...]  # the scan's (i, j, k)
    bbox: tuple[slice, ...]  # the non-zero crop, in nnU-Net axes
    cropped_shape: tuple[int, ...]
    spacing: tuple[float, ...]  # of the scan, in nnU-Net axes
    model_shape: tuple[int, ...]

    @property
    def resampled(self) -> bool:
        return self.model_shape != self.cropped_shape


#: On the CPU, a network this small costs less per mirrored copy when the copies share a forward pass
#: (the tiny test model: 7.6 s against 42.8 s); an nnU-Net-sized one (31 M parameters, 128^3) costs
#: more (51.9 s against 31.0 s): benchmarks/imported_models.py, docs/performance.md.
SMALL_NETWORK_PARAMETERS = 1_000_000


def flips_per_pass(network, device, windows_per_batch: int) -> int:
    """How many mirrored copies of a window go through the network at once: ``windows_per_batch``
    on a GPU or for a small network on the CPU, else one at a time, as nnU-Net does. It depends on
    the network and the device only, so the same inputs give the same numbers on every run."""
    if device.type == "cuda":
        return windows_per_batch
    parameters = sum(p.numel() for p in network.parameters())
    return windows_per_batch if parameters < SMALL_NETWORK_PARAMETERS else 1


class NnunetRunner:
    """``nnUNetv2_predict`` on a Scan (see :mod:`.nnunet_ops` for the operations)."""

    def __init__(self, card, settings: NnunetSettings) -> None:
        self.card = card
        self.settings = settings

    def _to_nnunet_axes(self, array: np.ndarray) -> np.ndarray:
        # SimpleITK, which nnU-Net reads NIfTI with, gives (k, j, i); then the plans' transpose.
        kji = array.transpose(0, 3, 2, 1)
        return kji.transpose([0, *[a + 1 for a in self.settings.transpose_forward]])

    def prepare(self, scan, timings: dict[str, float],
                mirror_cuts_mm: float = 0.0) -> tuple[np.ndarray, NnunetTransform]:  # nnU-Net's own: no mirroring
        from ..timing import timed
        from . import nnunet_ops as ops

        s = self.settings
        with timed(timings, "geometry"):
            channels = np.stack([scan.array[scan.channels.index(seq)] for seq in self.card.input.sequences])
            data = self._to_nnunet_axes(channels.astype(np.float32))
            spacing_kji = tuple(float(v) for v in scan.spacing[::-1])
            spacing = tuple(spacing_kji[a] for a in s.transpose_forward)
            bbox, inside = ops.nonzero_bbox(data)
            data = np.array(data[(slice(None), *bbox)], dtype=np.float32)
            cropped = data.shape[1:]
            target = ops.new_shape(cropped, spacing, s.spacing)
        with timed(timings, "normalize"):
            for c in range(data.shape[0]):
                data[c] = ops.normalize_channel(data[c], s.normalization[c], s.use_mask_for_norm[c], inside,
                                                s.intensity[c])
        with timed(timings, "resample"):
            data = ops.resample(data, target, spacing, s.spacing, **s.resampling_data)
        transform = NnunetTransform(tuple(scan.spatial_shape), bbox, tuple(cropped), spacing, tuple(data.shape[1:]))
        return data, transform

    def predict(self, network, image: np.ndarray, config, device, progress: bool = False) -> np.ndarray:
        """Mean fp16 logits of the folds (nnU-Net's ``predict_logits_from_preprocessed_data``)."""
        import torch

        from . import nnunet_ops as ops

        ensemble: FoldEnsemble = network.eager
        window = ops.WindowSettings(self.settings.patch_size, step_size=1.0 - config.overlap,
                                    mirror_axes=self.settings.mirror_axes if config.tta else (),
                                    per_pass=flips_per_pass(ensemble.network, device, config.windows_per_batch))
        data = torch.from_numpy(np.ascontiguousarray(image))
        total = None
        for fold_network in ensemble.folds():
            logits = ops.sliding_window_logits(fold_network, data, window, self.settings.heads, device)
            total = logits if total is None else total + logits
        assert total is not None
        if len(ensemble.fold_weights) > 1:
            total /= len(ensemble.fold_weights)
        return total.numpy()

    def precision(self, network) -> str:
        from . import tool_precision

        return tool_precision(network)

    def to_labels(self, output: np.ndarray, transform: NnunetTransform) -> np.ndarray:
        import torch

        from . import nnunet_ops as ops

        s = self.settings
        logits = ops.resample(output, transform.cropped_shape, s.spacing, transform.spacing,
                              **s.resampling_probabilities)
        seg = ops.logits_to_labels(torch.from_numpy(logits), s.regions_class_order)
        full = np.zeros(tuple(transform.input_shape[::-1][a] for a in s.transpose_forward), dtype=np.uint8)
        full[transform.bbox] = seg
        kji = full.transpose(s.transpose_backward)
        return s.lut[kji.transpose(2, 1, 0)]


# -- import --------------------------------------------------------------------------------------

def import_nnunet(results: Path, name: str, folds: tuple[str, ...] | None = None, checkpoint: str = "final",
                  channels: dict[int, str] | None = None, labels: dict[int, str] | None = None,
                  scheme: str = "msd", trust_code: bool = False):
    """The model card (not yet written) for an nnU-Net v2 results folder, and the files it uses
    (relative path -> absolute path). Reads every chosen checkpoint as loading will, so a
    checkpoint that would be refused at load is refused now."""
    from ..model import ImportedModel, InputSpec, ModelCard, sha256_file

    results = Path(results)
    if checkpoint not in ("final", "best"):
        raise ModelError(f"--checkpoint must be final or best, got {checkpoint!r}")
    dataset = read_json(results / "dataset.json")
    plans = read_json(results / "plans.json")
    files = checkpoint_files(results, folds, checkpoint)
    first = load_checkpoint(next(iter(files.values())), trust_code)
    configuration = (first.get("init_args") or {}).get("configuration")
    if configuration not in plans.get("configurations", {}):
        raise ModelError(f"the checkpoint's configuration {configuration!r} is not in plans.json", results)
    mirror = first.get("inference_allowed_mirroring_axes") or ()
    for path in list(files.values())[1:]:
        other = load_checkpoint(path, trust_code)
        if (other.get("init_args") or {}).get("configuration") != configuration:
            raise ModelError(f"this fold was trained with another configuration than fold {next(iter(files))}", path)
    config = configuration_of(plans, configuration, results / "plans.json")
    if len(config.get("patch_size", ())) != 3:
        raise ModelError(f"configuration {configuration} is not 3D; tumorseg runs 3D nnU-Net models only", results)
    if config.get("previous_stage"):
        raise ModelError(f"configuration {configuration} is a cascade stage; tumorseg does not run cascades", results)
    check_reader(plans, results / "plans.json")
    sequences = channel_sequences(dataset, channels)
    values = label_map(dataset, scheme, labels)
    heads = output_heads(dataset)
    _fit(build_network(plans, configuration, len(sequences), heads), first, next(iter(files.values())))
    # The plans are in nnU-Net's axes, (k, j, i) then transpose_forward: back to the file's (i, j, k).
    backward = plans["transpose_backward"]
    spacing_kji = [config["spacing"][a] for a in backward]
    patch_kji = [config["patch_size"][a] for a in backward]
    used = {"dataset.json": results / "dataset.json", "plans.json": results / "plans.json"}
    used.update({f"fold_{fold}/{path.name}": path for fold, path in files.items()})
    imported = ImportedModel(
        format="nnunet", folder=str(results.resolve()),
        files={rel: sha256_file(path) for rel, path in used.items()}, trust_code=trust_code,
        configuration=configuration, folds=tuple(files), checkpoint=checkpoint,
        mirror_axes=tuple(int(a) for a in mirror), label_map={str(k): v for k, v in values.items()})
    card = ModelCard(
        name=name,
        input=InputSpec(sequences=sequences, required=sequences, min_sequences=len(sequences),
                        spacing_mm=tuple(float(v) for v in spacing_kji[::-1]),
                        patch_size=tuple(int(v) for v in patch_kji[::-1])),
        labels=scheme,
        imported=imported,
        version=str(first.get("trainer_name", "nnUNetTrainer")),
        description=f"nnU-Net v2 model ({first.get('trainer_name', 'nnUNetTrainer')}, {configuration}, "
                    f"folds {', '.join(files)}, checkpoint_{checkpoint}) imported from {dataset.get('name', results.name)}",
        license=str(dataset.get("licence") or dataset.get("license") or ""),
        training={"tool": "nnU-Net v2", "dataset": str(dataset.get("name", "")),
                  "plans": str(plans.get("plans_name", "")), "trainer": str(first.get("trainer_name", ""))},
    )
    return card, used
