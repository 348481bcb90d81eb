"""MONAI bundles (``configs/inference.json`` or ``.yaml``, ``configs/metadata.json``,
``models/model.pt`` or ``models/model.ts``): import, safe loading, and inference that reproduces the
bundle's own ``monai.bundle run`` on a :class:`~tumorseg.scan.Scan`.

A bundle's configuration can hold Python expressions (``$...``), which MONAI evaluates. tumorseg
reads only the parts that describe the model, as literals: ``network_def`` (a MONAI network from an
allow-list), ``preprocessing`` and ``postprocessing`` (MONAI transforms from an allow-list) and
``inferer``; reading the images is tumorseg's own, and the bundle's last steps (a ``Lambdad`` that
paints labels, ``SaveImaged``) are replaced by the label conversion recorded at import from the
bundle's metadata (``channel_def`` of its output). Anything else, and TorchScript (``model.ts``),
is refused unless the user imports with ``--trust-code``, which then lets MONAI's ConfigParser
evaluate the configuration.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from ..labels import ED, ET, NCR, NET, REGIONS, get_scheme
from . import load_torch
from .nnunet import channel_sequences

log = logging.getLogger(__name__)

#: MONAI networks a bundle's ``network_def`` may name (monai.networks.nets).
NETWORKS = {"SegResNet", "SegResNetDS", "SegResNetVAE", "UNet", "BasicUNet", "DynUNet", "SwinUNETR", "UNETR",
            "AttentionUnet", "VNet", "HighResNet"}
#: MONAI dictionary transforms the preprocessing may hold (reading is tumorseg's: LoadImaged is skipped).
PREPROCESSING = {"LoadImaged", "EnsureChannelFirstd", "EnsureTyped", "ToTensord", "CastToTyped", "Orientationd",
                 "Spacingd", "NormalizeIntensityd", "ScaleIntensityd", "ScaleIntensityRanged",
                 "ScaleIntensityRangePercentilesd"}
#: The postprocessing steps reproduced, in the bundle's order; LAST_STEPS are replaced by tumorseg's labels.
POSTPROCESSING = {"Activationsd", "Invertd", "AsDiscreted", "EnsureTyped", "ToTensord"}
LAST_STEPS = {"Lambdad", "SaveImaged", "CopyItemsd", "DeleteItemsd"}
CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")

#: Output channel names of region-based bundles (brats_mri_segmentation: TC, WT, ET), by keyword.
_REGIONS = [("WT", ("whole", "wt")), ("TC", ("core", "tc")), ("ET", ("enhanc", "et"))]
_LABEL_WORDS = [(frozenset({NCR, NET}), ("necro", "non-enhancing", "non_enhancing", "core")),
                (frozenset({ET}), ("enhanc",)), (frozenset({ED}), ("edema", "oedema"))]  # core first: "non-enhancing"


def read_config(bundle: Path) -> tuple[Path, dict]:
    """The bundle's inference configuration, found as MONAI finds it (for import)."""
    configs = bundle / "configs"
    for name in CONFIG_NAMES:
        path = configs / name
        if path.is_file():
            return path, parse_config(path)
    raise ModelError(f"not a MONAI bundle: no configs/{CONFIG_NAMES[0]} (or .yaml)", bundle)


def parse_config(path: Path) -> dict:
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        import yaml

        return yaml.safe_load(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the bundle's inference configuration: {e}", path) from None


def recorded_file(card, folder: Path, names: tuple[str, ...]) -> Path:
    """The first of ``names`` (paths relative to the bundle) that the card's checksums cover: after
    import only the files checked are read, whatever has appeared beside them since (a model.pt
    beside an imported model.ts, an inference.json beside an imported inference.yaml)."""
    for name in names:
        if name in card.imported.files:
            return folder / name
    raise ModelError(f"the model card's checked files include none of {', '.join(names)}: import the bundle again",
                     folder)


def recorded_config(card, folder: Path) -> dict:
    return parse_config(recorded_file(card, folder, tuple(f"configs/{name}" for name in CONFIG_NAMES)))


def _lookup(config: dict, reference: str, where: str) -> Any:
    node: Any = config
    for part in reference.replace("#", "::").split("::"):
        if isinstance(node, list) and part.isdigit():
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise ModelError(f"{where}: the reference @{reference} names nothing in the configuration")
    return node


def literal(value: Any, config: dict, where: str) -> Any:
    """``value`` with ``@`` references resolved; an expression (``$...``, ``%...``) is refused."""
    if isinstance(value, str):
        if value.startswith("@"):
            return literal(_lookup(config, value[1:], where), config, where)
        if value.startswith(("$", "%")):
            raise ModelError(f"{where} is a Python expression ({value[:60]!r}), which tumorseg does not evaluate; "
                             "import with --trust-code to let MONAI evaluate it")
        return value
    if isinstance(value, list):
        return [literal(v, config, where) for v in value]
    if isinstance(value, dict):
        return {k: literal(v, config, f"{where}.{k}") for k, v in value.items()}
    return value


#: Where MONAI's own classes live; a ``_target_`` in another module (the bundle's ``scripts``) is
#: the bundle's own code, which tumorseg does not replace by MONAI's class of the same name.
MONAI_MODULES = ("monai.",)


def _disabled(entry: Any, config: dict, where: str) -> bool:
    """MONAI's ``_disabled_``: a component so marked is left out (of a list: dropped)."""
    if not isinstance(entry, dict) or "_disabled_" not in entry:
        return False
    flag = literal(entry["_disabled_"], config, f"{where}._disabled_")
    return flag.lower().strip() == "true" if isinstance(flag, str) else bool(flag)


def _component(entry: dict, allowed: set[str], config: dict, where: str) -> tuple[str, dict]:
    if not isinstance(entry, dict) or "_target_" not in entry:
        raise ModelError(f"{where} is not a MONAI component (no _target_)")
    full = str(entry["_target_"])
    target = full.rsplit(".", 1)[-1]
    if target not in allowed:
        raise ModelError(f"{where}: {entry['_target_']} is not one of the components tumorseg reproduces "
                         f"({', '.join(sorted(allowed))}); import with --trust-code to let MONAI build it")
    if "." in full and not full.startswith(MONAI_MODULES):
        raise ModelError(f"{where}: {full} is the bundle's own class, not MONAI's {target}; import with "
                         "--trust-code to let MONAI build it")
    if entry.get("_mode_", "default") != "default":
        raise ModelError(f"{where}: _mode_ {entry['_mode_']!r} is not reproduced; import with --trust-code")
    kwargs = {k: v for k, v in entry.items() if not k.startswith("_")}
    return target, kwargs


@dataclass(frozen=True)
class BundleSpec:
    """The parts of a bundle's inference configuration tumorseg runs, as literals."""

    network: tuple[str, dict]
    preprocessing: tuple[tuple[str, dict], ...]
    inferer: dict
    activation: str  # "sigmoid", "softmax" or "" (the network's raw output)
    invert: bool
    nearest_interp: bool
    discrete: dict  # AsDiscreted's arguments: threshold or argmax


def _transforms(config: dict, key: str) -> list:
    """The transforms of ``config[key]`` (a Compose or a list); the key must be the one the bundle
    uses: a dataset, evaluator or Invertd that names other transforms is refused."""
    if key not in config:
        raise ModelError(f"the bundle's inference configuration has no {key!r}, the transforms tumorseg reproduces; "
                         "import with --trust-code to let MONAI build its configuration")
    entries = config[key]
    entries = entries.get("transforms") if isinstance(entries, dict) else entries
    if not isinstance(entries, list):
        raise ModelError(f"the bundle's {key} is not a list of transforms (or a Compose of one)")
    return entries


def _check_references(config: dict) -> None:
    """The transforms the bundle's own run uses are ``preprocessing`` and ``postprocessing``."""
    uses = [("dataset.transform", (config.get("dataset") or {}).get("transform"), "@preprocessing"),
            ("evaluator.postprocessing", (config.get("evaluator") or {}).get("postprocessing"), "@postprocessing")]
    post = config.get("postprocessing")
    for i, entry in enumerate(post.get("transforms", []) if isinstance(post, dict) else post or []):
        if isinstance(entry, dict) and str(entry.get("_target_", "")).endswith("Invertd"):
            uses.append((f"postprocessing.transforms[{i}].transform", entry.get("transform"), "@preprocessing"))
    for where, value, expected in uses:
        if value is not None and value != expected:
            raise ModelError(f"the bundle's {where} is {value!r}, not {expected}: tumorseg reproduces {expected[1:]} "
                             "only; import with --trust-code to let MONAI build its configuration")


def read_spec(config: dict) -> BundleSpec:
    net_name, net_kwargs = _component(config.get("network_def"), NETWORKS, config, "network_def")
    _check_references(config)
    pre_entries = _transforms(config, "preprocessing")
    pre = []
    for i, entry in enumerate(pre_entries):
        if _disabled(entry, config, f"preprocessing.transforms[{i}]"):
            continue
        name, kwargs = _component(entry, PREPROCESSING, config, f"preprocessing.transforms[{i}]")
        if name != "LoadImaged":
            pre.append((name, literal(kwargs, config, f"preprocessing.transforms[{i}]")))
    inferer_name, inferer = _component(config.get("inferer"), {"SlidingWindowInferer"}, config, "inferer")
    post_entries = _transforms(config, "postprocessing")
    activation, invert, nearest, discrete = "", False, False, {}
    last = None  # the first of the bundle's last steps
    for i, entry in enumerate(post_entries):
        where = f"postprocessing.transforms[{i}]"
        if _disabled(entry, config, where):
            continue
        name = str(entry.get("_target_", "")).rsplit(".", 1)[-1] if isinstance(entry, dict) else ""
        if name in LAST_STEPS:
            last = last or f"{where} ({name})"
            continue  # label painting and saving: tumorseg's own, from the metadata
        if last is not None:
            raise ModelError(f"{where} ({name}) comes after {last}, which tumorseg replaces by its own labels: "
                             "what that step does to the output would be lost; import with --trust-code")
        name, kwargs = _component(entry, POSTPROCESSING, config, where)
        if name == "Activationsd":
            kwargs = literal({k: v for k, v in kwargs.items() if k in ("sigmoid", "softmax")}, config, where)
            activation = "sigmoid" if kwargs.get("sigmoid") else "softmax" if kwargs.get("softmax") else ""
        elif name == "Invertd":
            invert = True
            nearest = bool(literal(kwargs.get("nearest_interp", True), config, where))
        elif name == "AsDiscreted":
            discrete = literal({k: v for k, v in kwargs.items() if k in ("threshold", "argmax")}, config, where)
    if not discrete:
        raise ModelError("the bundle's postprocessing has no AsDiscreted (threshold or argmax): tumorseg cannot "
                         "tell how it turns the network's output into labels; import with --trust-code")
    return BundleSpec((net_name, literal(net_kwargs, config, "network_def")), tuple(pre),
                      literal(inferer, config, "inferer"), activation, invert, nearest, discrete)


def output_labels(metadata: dict, activation: str, scheme_name: str) -> tuple[dict[int, int], tuple[int, ...]]:
    """Output channel -> label value of the scheme, and the order channels are painted in.

    Sigmoid outputs are nested regions (whole tumour, core, enhancing), painted outermost first, so
    a voxel in the enhancing region is enhancing; softmax outputs are labels (argmax), channel 0
    background."""
    scheme = get_scheme(scheme_name)
    names = (((metadata.get("network_data_format") or {}).get("outputs") or {}).get("pred") or {}).get("channel_def")
    if not names:
        raise ModelError("the bundle's metadata.json gives no output channel_def; tumorseg cannot tell which "
                         "channel is which tumour region")

    def value_of(classes: frozenset[str]) -> int:
        matches = [label for label in scheme.labels if classes <= label.classes]
        if not matches:
            raise ModelError(f"scheme {scheme_name} has no label for {', '.join(sorted(classes))}")
        return min(matches, key=lambda label: len(label.classes)).value

    out: dict[int, int] = {}
    if activation == "sigmoid":
        found: dict[str, int] = {}
        for channel, name in names.items():
            key = str(name).lower()
            region = next((r for r, words in _REGIONS if any(w in key.split() or (len(w) > 3 and w in key)
                                                             for w in words)), None)
            if region is None or region in found:
                raise ModelError(f"output channel {channel} ({name!r}) is not one of whole tumour, tumour core, "
                                 "enhancing tumour")
            found[region] = int(channel)
        if set(found) != {"WT", "TC", "ET"}:
            raise ModelError(f"the bundle's sigmoid outputs {names} are not whole tumour, core and enhancing")
        tissue = {"WT": frozenset({ED}), "TC": frozenset({NCR, NET}), "ET": frozenset({ET})}
        order = tuple(found[r] for r in REGIONS)
        out = {found[r]: value_of(tissue[r]) for r in REGIONS}
        return out, order
    for channel, name in names.items():
        key = str(name).lower()
        if int(channel) == 0 or "background" in key:
            continue
        classes = next((c for c, words in _LABEL_WORDS if any(w in key for w in words)), None)
        if classes is None:
            raise ModelError(f"output channel {channel} ({name!r}) is not a tumour label tumorseg recognises")
        out[int(channel)] = value_of(classes)
    return out, ()


def weights_file(bundle: Path) -> Path:
    models = bundle / "models"
    if (models / "model.pt").is_file():
        return models / "model.pt"
    if (models / "model.ts").is_file():
        return models / "model.ts"
    raise ModelError("the bundle has no models/model.pt or models/model.ts", bundle)


def import_bundle(bundle: Path, name: str, channels: dict[int, str] | None = None, scheme: str = "brats2021",
                  trust_code: bool = False):
    """The model card (not yet written) for a MONAI bundle, and the files it uses."""
    from ..model import ImportedModel, InputSpec, ModelCard, sha256_file

    bundle = Path(bundle)
    config_path, config = read_config(bundle)
    metadata_path = bundle / "configs" / "metadata.json"
    from .nnunet import read_json

    metadata = read_json(metadata_path)
    spec = read_spec(config) if not trust_code else None
    activation = spec.activation if spec else _trusted_activation(config)
    inputs = ((metadata.get("network_data_format") or {}).get("inputs") or {}).get("image") or {}
    sequences = channel_sequences({"channel_names": inputs.get("channel_def") or {}}, channels)
    if not sequences:
        raise ModelError("the bundle's metadata gives no input channel_def; name the channels with --channels", metadata_path)
    labels, order = output_labels(metadata, activation, scheme)
    weights = weights_file(bundle)
    state = _load_weights(weights, trust_code)  # refused now rather than at the first prediction
    network = build_network(config, spec)
    _fit(network, state, weights)
    used = {"configs/metadata.json": metadata_path, f"configs/{config_path.name}": config_path,
            f"models/{weights.name}": weights}
    roi = (spec.inferer if spec else {}).get("roi_size") or [96, 96, 96]
    spacing = _card_spacing(next((kw.get("pixdim") for n, kw in (spec.preprocessing if spec else ())
                                  if n == "Spacingd"), None))
    card = ModelCard(
        name=name,
        input=InputSpec(sequences=sequences, required=sequences, min_sequences=len(sequences),
                        spacing_mm=tuple(float(s) for s in (spacing or (1.0, 1.0, 1.0))),
                        patch_size=tuple(int(r) for r in roi)),
        labels=scheme,
        imported=ImportedModel(format="monai-bundle", folder=str(bundle.resolve()),
                               files={rel: sha256_file(p) for rel, p in used.items()}, trust_code=trust_code,
                               label_map={str(k): v for k, v in labels.items()}, paint_order=order,
                               activation=activation),
        version=str(metadata.get("version", "0")),
        description=f"MONAI bundle {metadata.get('name', bundle.name)}: {metadata.get('description', '')}".strip(),
        license=str(metadata.get("copyright", "")),
        training={"tool": "MONAI bundle", "monai_version": str(metadata.get("monai_version", "")),
                  "data_source": str(metadata.get("data_source", ""))},
    )
    return card, used


def _card_spacing(pixdim) -> tuple[float, float, float] | None:
    """Spacingd's ``pixdim`` as MONAI reads it (a number or a shorter list padded with its last value),
    for the card; None where an axis keeps the input's spacing (a non-positive entry)."""
    if pixdim is None:
        return None
    values = [float(v) for v in (pixdim if isinstance(pixdim, (list, tuple)) else [pixdim])][:3]
    values += [values[-1]] * (3 - len(values))
    return tuple(values) if all(v > 0 for v in values) else None  # type: ignore[return-value]


def _trusted_activation(config: dict) -> str:
    entries = config.get("postprocessing", {})
    entries = entries.get("transforms", []) if isinstance(entries, dict) else entries
    for entry in entries:
        if isinstance(entry, dict) and str(entry.get("_target_", "")).endswith("Activationsd"):
            return "sigmoid" if entry.get("sigmoid") is True else "softmax" if entry.get("softmax") is True else ""
    return ""


def _load_weights(path: Path, trust_code: bool):
    import torch

    if path.suffix == ".ts":
        if not trust_code:
            raise ModelError("the bundle has TorchScript weights (model.ts), whose loading runs code; "
                             "import it with --trust-code if you trust its source", path)
        return torch.jit.load(str(path), map_location="cpu")
    state = load_torch(path, trust_code, holds="the weights file")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # ignite's CheckpointSaver layout
        state = state["model"]
    return state


def build_network(config: dict, spec: BundleSpec | None):
    """The bundle's network_def: from the literal ``spec``, or (None: --trust-code) by MONAI's
    ConfigParser, expressions and all."""
    if spec is None:
        from monai.bundle import ConfigParser

        return ConfigParser(config).get_parsed_content("network_def")
    import monai.networks.nets as nets

    name, kwargs = spec.network
    return getattr(nets, name)(**kwargs)


def _fit(network, state, path: Path) -> None:
    if not isinstance(state, dict):
        return  # TorchScript: the module is the network
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"the weights do not fit network_def: {str(e).splitlines()[0]}", path) from None


def load_network(card, folder: Path):
    """The bundle's network with its weights, in eval mode on the CPU (files already verified)."""
    imported = card.imported
    config = recorded_config(card, folder)
    weights = recorded_file(card, folder, ("models/model.pt", "models/model.ts"))
    state = _load_weights(weights, imported.trust_code)
    if not isinstance(state, dict):
        return state.eval()
    network = build_network(config, None if imported.trust_code else read_spec(config))
    _fit(network, state, weights)
    return network.eval()


def _anonymous(operations):
    """The applied operations with the transform instances' ids cleared (MONAI's own way for
    operations recorded in another process), so the inverse may run in a worker other than the one
    that prepared the scan, with new transform instances built from the same configuration."""
    from monai.utils import TraceKeys

    if isinstance(operations, dict):
        return {k: (TraceKeys.NONE if k == TraceKeys.ID else _anonymous(v)) for k, v in operations.items()}
    if isinstance(operations, list):
        return [_anonymous(v) for v in operations]
    return operations


# -- inference on a Scan -------------------------------------------------------------------------

@dataclass(frozen=True)
class BundleTransform:
    """What the bundle's inverse needs: the preprocessed image's metadata and applied operations."""

    input_shape: tuple[int, ...]
    model_shape: tuple[int, ...]
    meta: dict
    applied_operations: list

    @property
    def resampled(self) -> bool:
        return self.model_shape != self.input_shape


class BundleRunner:
    """A bundle's preprocessing, sliding window and postprocessing on a Scan, with MONAI's own
    transforms and inferer built from the literal configuration."""

    def __init__(self, card, folder: Path) -> None:
        self.card = card
        config = recorded_config(card, folder)
        self.config = config
        self.spec = read_spec(config) if not card.imported.trust_code else None

    def __getstate__(self) -> dict:
        """Sent to worker processes without what is built in them again on first use."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_preprocessing", "_inferer")}

    @functools.cached_property
    def _preprocessing(self):
        """The bundle's preprocessing Compose, built once (its transforms keep no state between
        cases: what Invertd needs travels in each image's applied_operations)."""
        if self.spec is None:
            from monai.bundle import ConfigParser

            compose = ConfigParser(self.config).get_parsed_content("preprocessing")
            transforms = [t for t in compose.transforms if type(t).__name__ != "LoadImaged"]
        else:
            import monai.transforms as mt

            transforms = [getattr(mt, name)(**{**kwargs, "keys": "image"}) for name, kwargs in self.spec.preprocessing]
        from monai.transforms import Compose

        return Compose(transforms)

    @functools.cached_property
    def _inferer(self):
        if self.spec is None:
            from monai.bundle import ConfigParser

            return ConfigParser(self.config).get_parsed_content("inferer")
        from monai.inferers import SlidingWindowInferer

        return SlidingWindowInferer(**self.spec.inferer)

    def prepare(self, scan, timings: dict[str, float], mirror_cuts_mm: float = 0.0):  # the bundle's own preparation: no mirroring
        import torch
        from monai.data import MetaTensor

        from ..timing import timed

        with timed(timings, "normalize"):
            channels = np.stack([scan.array[scan.channels.index(s)] for s in self.card.input.sequences]).astype(np.float32)
            affine = torch.as_tensor(scan.affine, dtype=torch.float64)
            # What MONAI's LoadImaged gives for files stacked as channels (NibabelReader).
            image = MetaTensor(torch.from_numpy(channels), affine=affine,
                               meta={"original_affine": affine.clone(), "spatial_shape": np.array(scan.spatial_shape),
                                     "original_channel_dim": 0, "space": "RAS"})
            data = self._preprocessing({"image": image})["image"]
        array = data.detach().cpu().numpy().astype(np.float32)
        return array, BundleTransform(tuple(scan.spatial_shape), tuple(array.shape[1:]), dict(data.meta),
                                      _anonymous(list(data.applied_operations)))

    def predict(self, network, image: np.ndarray, config, device, progress: bool = False) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
        autocast = torch.autocast("cuda") if device.type == "cuda" else torch.autocast("cpu", enabled=False)
        with torch.inference_mode(), autocast:
            out = self._inferer(x, network.eager)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out[0].float().cpu().numpy()

    def precision(self, network) -> str:
        from . import tool_precision

        return tool_precision(network)

    def to_labels(self, output: np.ndarray, transform: BundleTransform) -> np.ndarray:
        import torch
        from monai.data import MetaTensor
        from monai.transforms import Activations, AsDiscrete

        imported = self.card.imported
        pred = torch.from_numpy(output)
        activation = self.spec.activation if self.spec else imported.activation
        if activation:
            pred = Activations(sigmoid=activation == "sigmoid", softmax=activation == "softmax")(pred)
        if self.spec is None or self.spec.invert:
            nearest = self.spec.nearest_interp if self.spec else False
            image = MetaTensor(pred, meta=transform.meta, applied_operations=transform.applied_operations)
            inverted = self._invert(image, nearest)
            pred = torch.as_tensor(inverted)
        discrete = self.spec.discrete if self.spec else {"threshold": 0.5} if activation == "sigmoid" else {"argmax": True}
        pred = AsDiscrete(**discrete)(pred)
        if self.spec is not None and not self.spec.invert and transform.applied_operations:
            # No Invertd: the bundle's own run saves its labels on the preprocessed grid (RAS, its
            # spacing) with that grid's affine; on the input grid they are those labels, nearest.
            image = MetaTensor(pred, meta=transform.meta, applied_operations=transform.applied_operations)
            pred = torch.as_tensor(self._invert(image, True))
        values = pred.cpu().numpy()
        shape = transform.input_shape
        out = np.zeros(shape, dtype=np.uint8)
        if imported.paint_order:  # nested regions, outermost first
            for channel in imported.paint_order:
                out[values[channel] > 0] = imported.label_map[str(channel)]
        else:
            classes = values[0].astype(np.int64) if values.shape[0] == 1 else values.argmax(0)
            for channel, value in imported.label_map.items():
                out[classes == int(channel)] = value
        return out

    def _invert(self, image, nearest: bool):
        """The bundle's Invertd: undo the preprocessing (resampling, orientation) on the prediction."""
        from monai.transforms import Invertd

        data = {"image": image.clone(), "pred": image}
        return Invertd(keys="pred", transform=self._preprocessing, orig_keys="image",
                       nearest_interp=nearest)(data)["pred"]
