"""Pipeline configuration: ``pipelines/*.toml`` loaded into frozen, validated dataclasses."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .configio import from_dict, read_toml
from .errors import ConfigError
from .sequences import SEQUENCES

DEVICES = ("auto", "cpu", "cuda")
#: The network's arithmetic; ``auto`` (``[inference] precision`` only) is resolved in ``stages/infer.py``.
FIXED_PRECISIONS = ("fp32", "bf16", "fp16")
PRECISIONS = ("auto",) + FIXED_PRECISIONS


@dataclass(frozen=True)
class InferenceConfig:
    """Sliding-window inference settings."""

    #: Fraction by which neighbouring windows overlap, 0 <= overlap < 1.
    overlap: float = 0.5
    #: Windows per forward pass; on the CPU larger batches do not help.
    windows_per_batch: int = 4
    #: Mirroring test-time augmentation: the mean of the softmax of 8 flips. 8x the network time;
    #: on by default, as it scored higher on unseen real and synthetic cases (docs/default-model.md).
    tta: bool = True
    device: str = "auto"
    #: auto: fp16 on a GPU, bf16 on a CPU with bf16 instructions (AVX512-BF16 or AMX: about twice
    #: as fast as fp32 there), fp32 on other CPUs. fp32: full precision everywhere.
    precision: str = "auto"
    #: torch.compile the network: faster on a GPU after a compilation per process (batches).
    compile: bool = False
    #: Give the network every available sequence, even where the model card prefers a subset.
    all_sequences: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be >= 0 and < 1, got {self.overlap}")
        if self.windows_per_batch < 1:
            raise ValueError(f"windows_per_batch must be >= 1, got {self.windows_per_batch}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def _check_finite_non_negative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class LabelPostprocess:
    """Clean-up of one label's mask, in this order: smoothing, small components, largest, holes."""

    #: Radius in mm of a morphological opening then closing; 0 turns smoothing off.
    smoothing_radius_mm: float = 0.0
    #: Connected components of this label smaller than this volume (mL) are removed.
    min_component_ml: float = 0.0
    #: Keep only the largest connected component of this label.
    keep_largest: bool = False
    #: Fill background enclosed by this label with this label.
    fill_holes: bool = False

    def __post_init__(self) -> None:
        for name in ("smoothing_radius_mm", "min_component_ml"):
            _check_finite_non_negative(name, getattr(self, name))


@dataclass(frozen=True)
class PostprocessConfig:
    #: Components of the whole tumour (all labels together) smaller than this (mL) are removed.
    tumour_min_component_ml: float = 0.1
    #: Per-label settings, keyed by label name in the model's label scheme.
    labels: Mapping[str, LabelPostprocess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_finite_non_negative("tumour_min_component_ml", self.tumour_min_component_ml)


@dataclass(frozen=True)
class OutputConfig:
    """What is written besides the NIfTI label map and the report."""

    #: An RTSTRUCT referencing the source series, when the input was DICOM.
    rtstruct: bool = True
    #: A DICOM SEG as well, when the input was DICOM.
    seg: bool = False
    #: ROI names by label name or region code (WT, TC, ET); planning systems may cut names
    #: longer than 16 characters.
    roi_names: Mapping[str, str] = field(default_factory=dict)
    #: ROIs for the regions WT, TC and ET besides one per label.
    include_regions: bool = True
    #: Each sequence as the network's input was made from it: on the reference grid, after
    #: registration, before normalisation (registered/<sequence>.nii.gz), for checking in a viewer.
    save_registered: bool = False
    #: overview.png: three planes through the largest tumour with each label's outline, and each
    #: moved sequence with the reference's edges over it.
    overview: bool = True


REGISTRATION_MODES = ("auto", "rigid", "none")
#: auto: extract the brain when the scan still has its skull; on: always; off: never.
BRAIN_EXTRACTION_MODES = ("auto", "on", "off")
#: "" for the default order (sequences.REFERENCE_ORDER).
REFERENCES = ("",) + SEQUENCES


@dataclass(frozen=True)
class PreprocessConfig:
    """How the sequences of a study reach one grid (tumorseg/stages/register.py), and whether the
    network sees only the brain (tumorseg/stages/brain.py)."""

    #: auto: register the sequences whose grid differs from the reference's (same-grid ones are
    #: copied); rigid: register every one; none: trust the scanner's coordinates (resample only).
    registration: str = "auto"
    #: The sequence whose grid the others go onto and the outputs land on; "": the first of T1gd,
    #: FLAIR, T1, T2 present (T1 after contrast is what radiotherapy planners contour on).
    reference: str = ""
    #: auto: the network sees only the brain when the scan still has its skull (tumorseg/stages/brain.py:
    #: HD-BET, the ``brain`` extra), skull-stripped scans are left as they are; on: always; off: never.
    brain_extraction: str = "auto"
    #: Where the brain the pipeline extracted is cut (the field of view ends inside it, or the
    #: extractor's mask stops short of the scan's edge: stages/geometry.py ``cut_faces``), the
    #: network's grid goes on by this many mm of the scan's mirror image, instead of zeros; 0: zeros.
    #: Skull-stripped input is never mirrored (the models learned BraTS' own cuts with zeros beyond).
    #: tumorseg's own models only; measured in docs/performance.md.
    mirror_cuts_mm: float = 32.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mirror_cuts_mm) and self.mirror_cuts_mm >= 0):
            raise ValueError(f"mirror_cuts_mm must be a finite number >= 0, got {self.mirror_cuts_mm}")
        if self.brain_extraction not in BRAIN_EXTRACTION_MODES:
            raise ValueError(f"brain_extraction must be one of {', '.join(BRAIN_EXTRACTION_MODES)}, "
                             f"got {self.brain_extraction!r}")
        if self.registration not in REGISTRATION_MODES:
            raise ValueError(f"registration must be one of {', '.join(REGISTRATION_MODES)}, got {self.registration!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(SEQUENCES)} (or empty), got {self.reference!r}")


@dataclass(frozen=True)
class PipelineConfig:
    #: A bundled model's name, or the path of a model folder.
    model: str = "default"
    #: When set, the model's weights must have this sha256, or the run is refused. The
    #: ``pipeline.resolved.toml`` that ``predict`` writes sets it, so rerunning it as ``--pipeline``
    #: reproduces the run or says why it cannot.
    model_sha256: str | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    #: DICOM series selection (tumorseg/dicom/select.py ``SelectionRules.from_mapping`` keys: rules,
    #: skip_descriptions, contrast_patterns ...); keys left out keep the built-in rules. None (no
    #: table) keeps the resolved file and batch fingerprints of earlier versions unchanged.
    dicom: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.model_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.model_sha256):
            raise ValueError(f"model_sha256 must be the 64 lower-case hex digits of the weights' sha256 "
                             f"(as pipeline.resolved.toml writes it), got {self.model_sha256!r}")
        self.selection_rules()  # refuse a bad [dicom] table when the file is loaded

    def selection_rules(self):
        """The DICOM series-selection rules: the built-in ones with ``[dicom]``'s changes."""
        from .dicom.select import SelectionRules

        try:
            return SelectionRules.from_mapping(self.dicom or {})
        except ConfigError as e:
            raise ValueError(f"[dicom]: {e}") from None

    def with_overrides(self, **inference: object) -> "PipelineConfig":
        """A copy with the given inference settings replaced (None values are ignored)."""
        changes = {k: v for k, v in inference.items() if v is not None}
        if not changes:
            return self
        try:
            new = dataclasses.replace(self.inference, **changes)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return dataclasses.replace(self, inference=new)

    def with_preprocess(self, **preprocess: object) -> "PipelineConfig":
        """A copy with the given preprocess settings replaced (None values are ignored)."""
        changes = {k: v for k, v in preprocess.items() if v is not None}
        if not changes:
            return self
        try:
            return dataclasses.replace(self, preprocess=dataclasses.replace(self.preprocess, **changes))
        except ValueError as e:
            raise ConfigError(str(e)) from None


def bundled_pipelines_dir() -> Path:
    package = Path(__file__).resolve().parent
    for candidate in (package / "_bundled" / "pipelines", package.parent / "pipelines"):
        if candidate.is_dir():
            return candidate
    return package.parent / "pipelines"


def load_pipeline(name_or_path: str | Path = "default") -> PipelineConfig:
    """Load a pipeline file by path, or by name from the bundled ``pipelines/``."""
    path = Path(name_or_path)
    if not path.is_file():
        bundled = bundled_pipelines_dir() / f"{name_or_path}.toml"
        if not bundled.is_file():
            known = ", ".join(p.stem for p in sorted(bundled_pipelines_dir().glob("*.toml")))
            raise ConfigError(f"no pipeline file {str(name_or_path)!r} (bundled: {known or 'none'})")
        path = bundled
    data = read_toml(path)
    for key in RESOLVED_PROVENANCE:  # a pipeline.resolved.toml loads as the pipeline that ran
        data.pop(key, None)
    return from_dict(PipelineConfig, data, str(path))


#: Keys ``pipeline.resolved.toml`` adds to a pipeline file: a record, not settings.
RESOLVED_PROVENANCE = ("tumorseg_version", "model_card")
