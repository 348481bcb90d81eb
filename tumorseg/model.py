"""Model cards (``models/<name>/model.toml``), the network they describe, and safe weight loading.

Weights are safetensors files: loading them runs no code. Their sha256 is checked against the
card before anything is loaded.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .configio import from_dict, read_toml
from .errors import ModelError
from .labels import REGIONS, SCHEMES, LabelScheme, get_scheme
from .sequences import SEQUENCES

log = logging.getLogger(__name__)

CARD_NAME = "model.toml"


@dataclass(frozen=True)
class InputSpec:
    """What the network takes: sequences in channel order, which may be absent, and the grid."""

    sequences: tuple[str, ...]
    #: Sequences that must be present; the others may be missing (their channel is zeros).
    required: tuple[str, ...] = ()
    #: Fewest sequences a prediction may be based on.
    min_sequences: int = 1
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    patch_size: tuple[int, int, int] = (128, 128, 128)
    #: When every sequence of one of these sets is available, the network gets that set alone (the
    #: first such set) and the other sequences are ignored and reported. For a model whose real
    #: training scans had only some sequences: its other inputs it knows only from synthetic data.
    preferred_sets: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        for seq in self.sequences:
            if seq not in SEQUENCES:
                raise ValueError(f"unknown sequence {seq!r} in sequences (known: {SEQUENCES})")
        if len(set(self.sequences)) != len(self.sequences):
            raise ValueError(f"sequences repeat: {self.sequences}")
        missing = set(self.required) - set(self.sequences)
        if missing:
            raise ValueError(f"required sequences {sorted(missing)} are not in sequences")
        if not 1 <= self.min_sequences <= len(self.sequences):
            raise ValueError(f"min_sequences must be 1..{len(self.sequences)}, got {self.min_sequences}")
        if any(s <= 0 for s in self.spacing_mm):
            raise ValueError(f"spacing_mm must be positive, got {self.spacing_mm}")
        if any(p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size entries must be positive, got {self.patch_size}")
        for chosen in self.preferred_sets:
            if not set(chosen) <= set(self.sequences) or not set(self.required) <= set(chosen):
                raise ValueError(f"preferred set {list(chosen)} must lie within sequences and hold every required one")
            if len(set(chosen)) < self.min_sequences:
                raise ValueError(f"preferred set {list(chosen)} has fewer than min_sequences sequences")

    def choose(self, available: tuple[str, ...]) -> tuple[str, ...]:
        """The sequences of ``available`` to give the network (see ``preferred_sets``)."""
        for chosen in self.preferred_sets:
            if set(chosen) <= set(available):
                return tuple(s for s in available if s in chosen)
        return tuple(available)

    def check_available(self, available: tuple[str, ...]) -> None:
        from .errors import SequenceError

        extra = [s for s in available if s not in self.sequences]
        if extra:
            raise SequenceError(
                f"the model does not take {', '.join(extra)} (it takes {', '.join(self.sequences)})"
            )
        missing = [s for s in self.required if s not in available]
        if missing:
            raise SequenceError(
                f"the model needs {', '.join(missing)} as well; add "
                + " ".join(f"--{s} FILE" for s in missing)
            )
        if len(available) < self.min_sequences:
            absent = [s for s in self.sequences if s not in available]
            raise SequenceError(
                f"the model needs at least {self.min_sequences} of {', '.join(self.sequences)}; "
                f"got {', '.join(available) or 'none'}; add one of "
                + ", ".join(f"--{s}" for s in absent)
            )


@dataclass(frozen=True)
class Normalization:
    """Per-channel z-score inside the non-zero (brain) region after percentile clipping."""

    lower_percentile: float = 0.5
    upper_percentile: float = 99.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ValueError(
                "need 0 <= lower_percentile < upper_percentile <= 100, got "
                f"{self.lower_percentile}, {self.upper_percentile}"
            )


@dataclass(frozen=True)
class Decoding:
    """How the class probabilities become labels where the argmax alone is biased (a model that
    draws tumour too small): each listed region (WT, TC, ET of the card's scheme) is the argmax's
    region grown, inside its decoded parent region, into connected voxels whose summed probability
    for it exceeds the threshold. A region grows only from its argmax voxels inside a lesion (an argmax
    whole-tumour component) of at least ``grow_from_ml``, so the boundary of a large lesion moves, no new
    island appears, and smaller lesions stay as drawn unless a large one's growth reaches them.
    Unlisted regions are the argmax's."""

    thresholds: Mapping[str, float]
    grow_from_ml: float = 1.0
    #: Provenance of the thresholds: how and on which cases they were chosen. Free-form.
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for region, value in self.thresholds.items():
            if region not in REGIONS:
                raise ValueError(f"decoding threshold for unknown region {region!r} (regions: {', '.join(REGIONS)})")
            if not 0.0 < value < 1.0:
                raise ValueError(f"decoding threshold of {region} must lie between 0 and 1, got {value}")
        if not self.grow_from_ml >= 0.0:
            raise ValueError(f"grow_from_ml must be >= 0, got {self.grow_from_ml}")

    def settings(self) -> dict[str, Any]:
        """What decides the labels (not the provenance): for reports and score caches."""
        return {"thresholds": dict(self.thresholds), "grow_from_ml": self.grow_from_ml}


@dataclass(frozen=True)
class Architecture:
    """A MONAI DynUNet (nnU-Net's 3D U-Net): one entry of filters/strides per resolution level."""

    name: str = "DynUNet"
    filters: tuple[int, ...] = (32, 64, 128, 256, 320)
    strides: tuple[int, ...] = (1, 2, 2, 2, 2)
    kernel_size: int = 3
    norm: str = "instance"
    deep_supervision: bool = False

    def __post_init__(self) -> None:
        if self.name != "DynUNet":
            raise ValueError(f"architecture name must be 'DynUNet', got {self.name!r}")
        if len(self.filters) != len(self.strides) or len(self.filters) < 3:  # MONAI's DynUNet needs 3 levels
            raise ValueError(f"filters and strides need the same length, at least 3 (DynUNet levels), got "
                             f"{len(self.filters)} filters and {len(self.strides)} strides")
        if self.strides[0] != 1:
            raise ValueError(f"the first stride must be 1, got {self.strides[0]}")

    @property
    def divisor(self) -> int:
        """Patch sides must be multiples of this (the product of the strides)."""
        out = 1
        for s in self.strides:
            out *= s
        return out


@dataclass(frozen=True)
class Weights:
    file: str
    sha256: str

    def __post_init__(self) -> None:
        if not self.file.endswith(".safetensors"):
            raise ValueError(f"weights must be a .safetensors file, got {self.file!r}")
        _check_sha256(self.sha256, self.file)


@dataclass(frozen=True)
class ImportedModel:
    """A model trained by another tool, run through tumorseg (``tumorseg models import``)."""

    #: "nnunet" (an nnU-Net v2 results folder) or "monai-bundle"
    format: str
    #: The folder holding its files: absolute, or relative to the card's folder (a copy).
    folder: str
    #: sha256 of every file used, by path relative to ``folder``; checked before loading.
    files: Mapping[str, str]
    #: Loading may run code (a pickle outside the allow-list, TorchScript): the user said so at import.
    trust_code: bool = False
    #: nnU-Net: the plans configuration, the folds ensembled, the checkpoint (final or best).
    configuration: str = ""
    folds: tuple[str, ...] = ()
    checkpoint: str = "final"
    #: The network's mirroring axes for test-time augmentation (from the checkpoint or bundle).
    mirror_axes: tuple[int, ...] = ()
    #: The model's output value (nnU-Net) or output channel (bundle) -> label value of the card's scheme.
    label_map: Mapping[str, int] = field(default_factory=dict)
    #: Bundles: the activation of the outputs ("sigmoid": nested regions; "softmax": labels), and for
    #: regions the channels in the order they are painted (outermost first).
    activation: str = ""
    paint_order: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.format not in IMPORT_FORMATS:
            raise ValueError(f"imported format must be one of {IMPORT_FORMATS}, got {self.format!r}")
        if not self.files:
            raise ValueError("imported files must list each file with its sha256")
        for name, digest in self.files.items():
            _check_sha256(digest, name)

    def folder_path(self, card_dir: Path) -> Path:
        return (card_dir / self.folder).resolve()


IMPORT_FORMATS = ("nnunet", "monai-bundle")


def _check_sha256(digest: str, what: str) -> None:
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"sha256 of {what} must be 64 lower-case hex digits, got {digest!r}")


@dataclass(frozen=True)
class ModelCard:
    """A model: tumorseg's own (``architecture`` and ``weights``) or one imported from another
    tool (``imported``)."""

    name: str
    input: InputSpec
    labels: str
    architecture: Architecture | None = None
    weights: Weights | None = None
    imported: ImportedModel | None = None
    version: str = "0"
    description: str = ""
    normalization: Normalization = field(default_factory=Normalization)
    #: Provenance: command, data sets and their licenses, date. Free-form, recorded in reports.
    training: dict[str, Any] = field(default_factory=dict)
    license: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    #: None: the argmax of the class probabilities.
    decoding: Decoding | None = None

    def __post_init__(self) -> None:
        if self.labels not in SCHEMES:
            raise ValueError(f"unknown label scheme {self.labels!r}; known: {', '.join(SCHEMES)}")
        if self.imported is not None:
            if self.architecture is not None or self.weights is not None:
                raise ValueError("an imported model has no [architecture] or [weights] table")
            if self.decoding is not None:
                raise ValueError("an imported model decodes its outputs as its own tool does: no [decoding] table")
            return
        if self.architecture is None or self.weights is None:
            raise ValueError("a tumorseg model needs [architecture] and [weights] tables (or [imported])")
        bad = [p for p in self.input.patch_size if p % self.architecture.divisor]
        if bad:
            raise ValueError(
                f"patch_size {self.input.patch_size} must be multiples of {self.architecture.divisor}"
            )

    @property
    def scheme(self) -> LabelScheme:
        return get_scheme(self.labels)

    @property
    def out_channels(self) -> int:
        return len(self.scheme.labels) + 1

    @property
    def fingerprint(self) -> str:
        """The weights' sha256; for an imported model, the sha256 of what decides its output: its
        files' sha256s, the settings it runs with and the labels it writes (not where it lives)."""
        if self.imported is None:
            assert self.weights is not None
            return self.weights.sha256
        import json

        from .configio import to_dict

        settings = {k: v for k, v in to_dict(self.imported).items() if k != "folder"}
        record = {"imported": settings, "labels": self.labels, "sequences": list(self.input.sequences)}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def build_network(card: ModelCard):  # -> torch.nn.Module
    """The untrained network the card describes (MONAI DynUNet, output = logits per class)."""
    from monai.networks.nets import DynUNet

    arch = card.architecture
    assert arch is not None, "imported models are built by tumorseg.imported"
    strides = list(arch.strides)
    return DynUNet(
        spatial_dims=3,
        in_channels=len(card.input.sequences),
        out_channels=card.out_channels,
        kernel_size=[arch.kernel_size] * len(strides),
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(arch.filters),
        norm_name=arch.norm,
        deep_supervision=arch.deep_supervision,
        deep_supr_num=1,
        res_block=False,
    )


def verify_file(path: Path, expected: str, what: str = "file the model card lists") -> None:
    """Refuse a missing file or one whose sha256 is not ``expected`` (the card's)."""
    if not path.is_file():
        raise ModelError(f"{what} not found", path)
    actual = sha256_file(path)
    if actual != expected:
        raise ModelError(f"checksum mismatch: sha256 is {actual}, the model card says {expected}; "
                         "the file is corrupt or not the one the card describes", path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedModel:
    card: ModelCard
    directory: Path
    network: Any  # torch.nn.Module in eval mode, on the CPU

    @property
    def sha256(self) -> str:
        return self.card.fingerprint


def bundled_models_dir() -> Path:
    """``models/`` of a source checkout, or the copy inside an installed wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_bundled" / "models", package.parent / "models"):
        if candidate.is_dir():
            return candidate
    return package.parent / "models"


def user_models_dir() -> Path:
    """Where ``tumorseg models import`` puts models: $TUMORSEG_MODELS, else
    $XDG_DATA_HOME/tumorseg/models (~/.local/share/tumorseg/models)."""
    import os

    if os.environ.get("TUMORSEG_MODELS"):
        return Path(os.environ["TUMORSEG_MODELS"]).expanduser()
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "tumorseg" / "models"


def find_model_dir(name_or_path: str) -> Path:
    """A model folder given as a path, or by name among the user's and the bundled models (the
    user's first)."""
    path = Path(name_or_path)
    if (path / CARD_NAME).is_file():
        return path
    if path.name == CARD_NAME and path.is_file():
        return path.parent
    if path.name == name_or_path:  # a bare name
        for root in (user_models_dir(), bundled_models_dir()):
            if (root / name_or_path / CARD_NAME).is_file():
                return root / name_or_path
    known = ", ".join(sorted({p.name for p in list_model_dirs()})) or "none installed"
    raise ModelError(f"no model {name_or_path!r} (a folder with {CARD_NAME}, or one of: {known})")


def list_model_dirs() -> list[Path]:
    """The bundled models, then the user's (``user_models_dir``)."""
    out = []
    for root in (bundled_models_dir(), user_models_dir()):
        if root.is_dir():
            out += sorted(p for p in root.iterdir() if (p / CARD_NAME).is_file())
    return out


def load_card(model_dir: Path) -> ModelCard:
    path = model_dir / CARD_NAME
    return from_dict(ModelCard, read_toml(path, ModelError), str(path), ModelError)


def load_model(name_or_path: str) -> LoadedModel:
    """Find a model, verify its weights' checksum, and load them into its network."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_safetensors

    model_dir = find_model_dir(name_or_path)
    card = load_card(model_dir)
    if card.imported is not None:
        from .imported import load_imported

        return LoadedModel(card=card, directory=model_dir, network=load_imported(card, model_dir))
    assert card.weights is not None
    weights_path = model_dir / card.weights.file
    verify_file(weights_path, card.weights.sha256, "weights file")
    network = build_network(card)
    try:
        load_safetensors(network, str(weights_path), strict=True, device="cpu")
    except (SafetensorError, OSError) as e:
        raise ModelError(f"cannot read weights: {e}", weights_path) from None
    except RuntimeError as e:
        raise ModelError(f"weights do not fit the architecture in the card: {e}", weights_path) from None
    network.eval()
    log.info("model %s %s (sha256 %s...)", card.name, card.version, card.weights.sha256[:12])
    return LoadedModel(card=card, directory=model_dir, network=network)


def save_model(directory: Path, card: ModelCard, network) -> ModelCard:
    """Write weights (safetensors) and a card carrying their sha256 into ``directory``.

    Returns the card as written. Both files are written atomically, weights first.
    """
    import dataclasses

    from safetensors.torch import save_file

    from .atomic import atomic_path

    directory = Path(directory)
    weights_path = directory / card.weights.file
    with atomic_path(weights_path) as tmp:
        save_file(_unaliased_state(network), str(tmp))
    card = dataclasses.replace(card, weights=Weights(card.weights.file, sha256_file(weights_path)))
    write_card(directory, card)
    return card


def write_card(directory: Path, card: ModelCard) -> None:
    """Write ``card`` as ``directory``'s model.toml, atomically (the weights are not touched)."""
    import tomli_w

    from .atomic import write_bytes_atomic
    from .configio import to_dict

    write_bytes_atomic(Path(directory) / CARD_NAME, tomli_w.dumps(to_dict(card)).encode())


def _unaliased_state(network) -> dict:
    """The state dict with each shared tensor once, under its first name in sorted order.

    DynUNet's ``skip_layers`` alias other layers' tensors; safetensors refuses aliases, and its
    own ``save_model`` picks among them in set order, which makes the file differ between runs.
    """
    state = network.state_dict()
    kept: dict[tuple, str] = {}
    for name in sorted(state):
        tensor = state[name]
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        kept.setdefault(key, name)
    return {name: state[name].detach().cpu().contiguous() for name in sorted(kept.values())}
