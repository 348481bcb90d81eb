"""The pipeline: stages run in order on one Scan. The CLI is a thin layer over this module.

>>> seg = Segmenter("default")                       # load the model once
>>> result = seg.segment_files(inputs)               # or seg.segment(scan)
>>> result.labels.array, result.report["results"]["regions"]["WT"]["volume_ml"]
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import __version__
from .atomic import write_bytes_atomic
from .config import PipelineConfig, load_pipeline
from .configio import to_dict
from .model import LoadedModel, ModelCard, load_model, sha256_file
from .scan import LabelMap, Scan, voxel_spacing
from .sequences import StudyInputs
from .stages import geometry, infer, normalize, postprocess, read, report, write

log = logging.getLogger(__name__)

LABEL_MAP_NAME = "segmentation.nii.gz"
REPORT_NAME = "report.json"
CONFIG_NAME = "pipeline.resolved.toml"
RTSTRUCT_NAME = "rtstruct.dcm"
SEG_NAME = "seg.dcm"


@dataclass
class Result:
    labels: LabelMap
    report: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


class Segmenter:
    """A loaded model with its pipeline configuration; segments many scans."""

    def __init__(
        self,
        model: LoadedModel | str | None = None,
        config: PipelineConfig | None = None,
        progress: bool = False,
    ) -> None:
        self.config = config or load_pipeline("default")
        if model is None:
            model = self.config.model
        self.model = model if isinstance(model, LoadedModel) else load_model(model)
        self.device = infer.select_device(self.config.inference.device)
        self.progress = progress
        for name in self.config.postprocess.labels:
            self.model.card.scheme.label(name)  # unknown label names fail now, not mid-batch

    @property
    def card(self):
        return self.model.card

    def segment_files(self, inputs: StudyInputs) -> Result:
        """Read the study, check its sequences against the model, and segment it."""
        self.card.input.check_available(inputs.sequences)  # before reading: fail fast
        return self._read_and_segment(lambda: read.read_study(inputs), lambda scan: {
            seq: {"sha256": sha256_file(Path(p)), "format": _format_name(Path(p))}
            for seq, p in scan.meta.get("paths", {}).items()
        })

    def segment_dicom(self, folders: list[Path], explicit: dict[str, str] | None = None) -> Result:
        """Find and choose the series of each sequence under ``folders``, and segment them.

        ``explicit`` names a series per sequence (SeriesNumber or SeriesInstanceUID). The
        label map lands on the reference series' grid (see :mod:`tumorseg.dicom.study`).
        """
        from .dicom.study import inputs_report, read_dicom_study

        return self._read_and_segment(
            lambda: read_dicom_study(folders, sequences=self.card.input.sequences, explicit=explicit),
            inputs_report,
        )

    def _read_and_segment(self, read_scan: Callable[[], Scan], describe_inputs: Callable[[Scan], dict]) -> Result:
        """Time the read, segment, and record the inputs (format, sha256; no paths) in the report."""
        timings: dict[str, float] = {}
        with _timed(timings, "read"):
            scan = read_scan()
        result = self.segment(scan)
        result.timings = {**timings, **result.timings}
        result.report["timings_s"] = _rounded(result.timings)
        result.report["inputs"] = describe_inputs(scan)
        return result

    def segment(self, scan: Scan) -> Result:
        """Segment a Scan; the label map has the Scan's source shape and affine."""
        card = self.card
        card.input.check_available(scan.channels)
        timings: dict[str, float] = {}
        image, transform = model_input(scan, card, timings)
        with _timed(timings, "infer"):
            probs = infer.predict_probabilities(
                self.model.network, image, card.input.patch_size, self.config.inference,
                self.device, progress=self.progress,
            )
        with _timed(timings, "restore_geometry"):
            probs = geometry.probabilities_to_input_grid(probs, transform)
            raw = np.argmax(probs, axis=0).astype(np.uint8)
            del probs
            raw = card.scheme.class_values[raw]
        with _timed(timings, "postprocess"):
            cleaned = postprocess.postprocess(
                raw, voxel_spacing(scan.source.affine), self.config.postprocess, card.scheme
            )
        labels = LabelMap(cleaned, scan.source.affine, card.scheme, scan.source)
        with _timed(timings, "report"):
            summary = report.summarize(labels)
        return Result(labels=labels, report=self._report(scan, transform, summary, timings), timings=timings)

    def _report(self, scan: Scan, transform, summary: dict, timings: dict) -> dict[str, Any]:
        card = self.card
        used = [s for s in card.input.sequences if s in scan.channels]
        return {
            "tumorseg_version": __version__,
            "model": {"name": card.name, "version": card.version, "weights_sha256": self.model.sha256},
            "sequences_used": used,
            "sequences_missing": [s for s in card.input.sequences if s not in scan.channels],
            "device": str(self.device),
            "input_grid": {
                "shape": list(scan.source.shape),
                "spacing_mm": [round(float(s), 4) for s in scan.spacing],
                "affine_ras": np.round(scan.source.affine, 6).tolist(),
            },
            "model_grid": {"shape": list(transform.model_shape), "resampled": transform.resampled},
            "results": summary,
            "empty": summary["regions"]["WT"]["voxels"] == 0,
            "timings_s": _rounded(timings),
            "configuration": to_dict(self.config),
            "disclaimer": "Research software; not a medical device. Check every contour before clinical use.",
        }


def model_input(
    scan: Scan, card: ModelCard, timings: dict[str, float] | None = None
) -> tuple[np.ndarray, geometry.GridTransform]:
    """The network's input for ``scan`` and the transform back: the model grid, normalised,
    channels in the card's order (zeros for missing sequences). ``predict`` and ``train`` both
    use this, so training and inference prepare scans identically."""
    timings = {} if timings is None else timings
    with _timed(timings, "geometry"):
        brain = normalize.brain_mask(scan.array)
        transform = geometry.plan_transform(scan, card.input.spacing_mm, brain)
        on_grid = geometry.to_model_grid(scan, transform)
        brain_on_grid = geometry.labels_to_model_grid(brain, transform)
    with _timed(timings, "normalize"):
        normalized = normalize.normalize(on_grid, card.normalization, brain_on_grid)
        image = _model_channels(normalized, card.input.sequences)
    return image, transform


def _model_channels(scan: Scan, order: tuple[str, ...]) -> np.ndarray:
    """(len(order), I, J, K): the scan's channels in model order, zeros for missing sequences."""
    out = np.zeros((len(order),) + scan.spatial_shape, dtype=np.float32)
    for c, name in enumerate(order):
        if name in scan.channels:
            out[c] = scan.array[scan.channels.index(name)]
    return out


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {stage: round(seconds, 3) for stage, seconds in timings.items()}


def _format_name(path: Path) -> str:
    return "nifti" if path.name.lower().endswith((".nii", ".nii.gz")) else path.suffix.lstrip(".").lower()


def write_dicom_outputs(result: Result, segmenter: Segmenter, output_dir: Path) -> dict[str, Path]:
    """RTSTRUCT (and SEG on request) referencing the source series, when the input was DICOM."""
    series = result.labels.source.dicom_series
    out = segmenter.config.output
    if series is None or not (out.rtstruct or out.seg):
        return {}
    headers = series.read_headers()
    card = segmenter.card
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


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    log.info("%s ...", stage)
    start = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - start
    log.info("%s done in %.2f s", stage, timings[stage])


def write_outputs(result: Result, segmenter: Segmenter, output_dir: Path) -> dict[str, Path]:
    """Write the label map, the JSON report and the resolved configuration, each atomically."""
    import json

    import tomli_w

    output_dir = Path(output_dir)
    start = time.perf_counter()
    paths = {
        "label_map": output_dir / LABEL_MAP_NAME,
        "report": output_dir / REPORT_NAME,
        "configuration": output_dir / CONFIG_NAME,
    }
    write.write_label_map(result.labels, paths["label_map"])
    paths.update(write_dicom_outputs(result, segmenter, output_dir))
    resolved = {
        "tumorseg_version": __version__,
        "model_sha256": segmenter.model.sha256,
        "model_card": str(segmenter.model.directory.name),
        **to_dict(segmenter.config),
    }
    write_bytes_atomic(paths["configuration"], tomli_w.dumps(resolved).encode())
    result.report["timings_s"]["write"] = round(time.perf_counter() - start, 3)
    result.report["outputs"] = {k: p.name for k, p in paths.items()}
    write_bytes_atomic(paths["report"], (json.dumps(result.report, indent=2) + "\n").encode())
    return paths
