"""``tumorseg validate``: score label maps against ground truth over a whole data set.

Predictions are made with ``tumorseg batch`` (and reused when up to date) or read from a folder
another tool wrote (``--predictions``: ``<case_id>.nii.gz`` as nnU-Net writes them, or
``<case_id>/segmentation.nii.gz``, or a ``tumorseg batch`` output folder). Ground truth in any
known label scheme is mapped through the scheme tables: regions (WT, TC, ET) always, and each
label of the prediction's scheme where the truth converts to it without guessing.

Metrics and their conventions are in :mod:`tumorseg.metrics`. Outputs: ``metrics.json`` (every
number), ``metrics.csv`` (one row per case and structure), ``summary.csv`` (aggregates) and
``report.html`` (self-contained: tables, box plots, overlays).
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .atomic import write_bytes_atomic
from .datasets import LabelledCase, discover_cases
from .errors import ConfigError, GeometryError, InputError, TumorsegError
from .evaluate import LabelFile, read_label_file
from .labels import REGIONS, LabelScheme, conversion_table, get_scheme
from .scan import grid_difference, same_grid, voxel_spacing, voxel_volume_ml
from .stages import read

log = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
SUMMARY_CSV = "summary.csv"
REPORT_HTML = "report.html"
PREDICTIONS_DIR = "predictions"
SCORES = ("dice", "hd95_mm", "nsd", "volume_pred_ml", "volume_truth_ml", "volume_diff_ml", "relative_volume_diff")
#: Metrics aggregated over cases, and whether a higher value is better (for "worst").
AGGREGATED = {"dice": True, "hd95_mm": False, "nsd": True, "volume_diff_ml": None}


@dataclass(frozen=True)
class ScoredCase:
    case_id: str
    status: str  # ok | failed
    error: str | None
    spacing_mm: list[float] | None
    scores: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"case_id": self.case_id, "status": self.status, "error": self.error,
                "spacing_mm": self.spacing_mm, "scores": self.scores}


def structures(pred_scheme: LabelScheme, truth_scheme: LabelScheme) -> tuple[list[str], dict[str, int] | None]:
    """Regions, then the prediction scheme's labels when the truth converts to that scheme."""
    try:
        lut = conversion_table(truth_scheme, pred_scheme)
    except ConfigError as e:
        log.warning("per-label scores skipped: %s (regions are still scored)", e)
        return list(REGIONS), None
    del lut
    labels = {label.name: label.value for label in pred_scheme.labels}
    return list(REGIONS) + list(labels), labels


def score_case(case_id: str, pred: LabelFile, pred_scheme: LabelScheme, truth: LabelFile, truth_scheme: LabelScheme,
               truth_path: Path, tolerance_mm: float, pred_path: Path | None = None) -> ScoredCase:
    """Every structure's scores for one case (prediction and truth on one grid)."""
    if not same_grid(pred.labels.shape, pred.affine, truth.labels.shape, truth.affine):
        where = f"prediction {pred_path}" if pred_path is not None else "prediction"
        raise GeometryError(f"{where} (shape {pred.labels.shape}) is not on the grid of its ground truth "
                            f"(shape {truth.labels.shape}); {grid_difference(pred.affine, truth.affine)}; "
                            "scores need the same voxels (resample the prediction with nearest neighbour)",
                            truth_path)
    pred_scheme.validate_array(pred.labels, "the prediction", pred_path)
    truth_scheme.validate_array(truth.labels, "the ground truth", truth_path)
    spacing = voxel_spacing(truth.affine)
    names, label_values = structures(pred_scheme, truth_scheme)
    masks = {r: (pred_scheme.region_mask(pred.labels, r), truth_scheme.region_mask(truth.labels, r)) for r in REGIONS}
    if label_values is not None:
        truth_in_pred_scheme = conversion_table(truth_scheme, pred_scheme)[truth.labels]
        for name, value in label_values.items():
            masks[name] = (pred.labels == value, truth_in_pred_scheme == value)
    voxel_ml = voxel_volume_ml(truth.affine)
    scores = {name: metrics.score_masks(*masks[name], spacing, tolerance_mm, voxel_ml, truth.affine).to_dict() for name in names}
    return ScoredCase(case_id, "ok", None, [round(float(s), 6) for s in spacing], scores)


def aggregate(cases: list[ScoredCase], names: list[str]) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Mean, median, standard deviation (population), worst and n over the cases scored."""
    out: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for name in names:
        out[name] = {}
        for metric, higher_is_better in AGGREGATED.items():
            values = np.array([c.scores[name][metric] for c in cases if c.status == "ok" and name in c.scores],
                              dtype=np.float64)
            if values.size == 0:
                out[name][metric] = {"mean": None, "median": None, "std": None, "worst": None, "n": 0}
                continue
            if higher_is_better is None:  # a signed error: the worst is the largest in size
                worst = float(values[np.argmax(np.abs(values))])
            else:
                worst = float(values.min() if higher_is_better else values.max())
            out[name][metric] = {"mean": float(values.mean()), "median": float(np.median(values)),
                                 "std": float(values.std()), "worst": worst, "n": int(values.size)}
    return out


def find_prediction(folder: Path, case_id: str) -> Path | None:
    """A prediction for ``case_id`` in a folder written by nnU-Net, tumorseg batch or predict."""
    for candidate in (folder / f"{case_id}.nii.gz", folder / f"{case_id}.nii", folder / case_id / "segmentation.nii.gz",
                      folder / "cases" / case_id / "segmentation.nii.gz"):
        if candidate.is_file():
            return candidate
    return None


def background_image(case: LabelledCase, truth: LabelFile | None = None) -> np.ndarray:
    """The image under the overlays: FLAIR if the case has it, else its first sequence. With
    ``truth``, an image on another grid than the ground truth's is refused (GeometryError): drawn
    on it, the outlines would land on other anatomy (a flipped axis: the other hemisphere)."""
    inputs = case.inputs
    if inputs.decathlon_4d is not None:
        volume = read.read_volume(inputs.decathlon_4d)
        array = volume.array[..., 0] if volume.array.ndim == 4 else volume.array
    else:
        files = dict(inputs.files)
        volume = read.read_volume(files.get("flair", inputs.files[0][1]))
        array = volume.array
    if truth is not None and not same_grid(array.shape[:3], volume.affine, truth.labels.shape, truth.affine):
        raise GeometryError(f"the image (shape {array.shape[:3]}) is not on the grid of the ground truth "
                            f"(shape {truth.labels.shape}); {grid_difference(volume.affine, truth.affine)}",
                            volume.path)
    return array


def validate(
    dataset: Path,
    output: Path,
    truth_scheme: str | None = None,
    predictions: Path | None = None,
    prediction_scheme: LabelScheme | None = None,
    tolerance_mm: float = metrics.DEFAULT_NSD_TOLERANCE_MM,
    segmenter=None,
    workers: int = 0,
    force: bool = False,
    html: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict (or find predictions), score every case, and write the reports. Returns metrics."""
    from .batch.cases import safe_case_id, unique_case_ids

    output = Path(output)
    if truth_scheme not in (None, "msd") and (Path(dataset) / "dataset.json").is_file():
        # discover_cases reads a Decathlon set's labels as Task01's: say so rather than ignore it.
        raise ConfigError(
            f"{Path(dataset) / 'dataset.json'}: a Decathlon data set is scored in the MSD Task01 "
            f"scheme that its dataset.json declares, so --truth-scheme {truth_scheme} cannot apply; "
            "give the cases as a folder of case folders to score another scheme"
        )
    problems: list[tuple[str, str]] = []
    cases = discover_cases(Path(dataset), truth_scheme, problems)
    if not cases:
        raise InputError(f"no case folder can be scored ({problems[0][0]}: {problems[0][1]})", Path(dataset))
    all_ids = unique_case_ids([safe_case_id(c.case_id) for c in cases] + [safe_case_id(n) for n, _ in problems])
    ids, problem_ids = all_ids[:len(cases)], all_ids[len(cases):]
    model = None
    batch_failures: dict[str, str] = {}
    if predictions is None:
        if segmenter is None:
            raise ValueError("give a segmenter or a predictions folder")
        predictions = output / PREDICTIONS_DIR
        batch_failures = _predict_cases(segmenter, ids, cases, predictions, workers, force, progress)
        prediction_scheme = segmenter.card.scheme
        model = {"name": segmenter.card.name, "version": segmenter.card.version,
                 "weights_sha256": segmenter.model.sha256}
    prediction_scheme = _prediction_scheme(Path(predictions), ids, prediction_scheme)

    scored: list[ScoredCase] = []
    overlays: dict[str, bytes] = {}
    names: list[str] = list(REGIONS)
    for case_id, case in _progress(list(zip(ids, cases)), progress):
        try:
            if case_id in batch_failures:
                raise TumorsegError(batch_failures[case_id])
            result, overlay = _score_one(case_id, case, Path(predictions), prediction_scheme, tolerance_mm, html)
            names, _ = structures(prediction_scheme, case.scheme)
            if overlay is not None:
                overlays[case_id] = overlay
        except TumorsegError as e:
            log.warning("%s not scored: %s", case_id, e)
            result = ScoredCase(case_id, "failed", f"{type(e).__name__}: {e}", None, {})
        scored.append(result)
    for case_id, (_, why) in zip(problem_ids, problems):
        log.warning("%s not scored: %s", case_id, why)
        scored.append(ScoredCase(case_id, "failed", f"InputError: {why}", None, {}))

    from . import __version__

    document = {
        "title": f"tumorseg validation: {Path(dataset).name}",
        "tumorseg_version": __version__,
        "dataset": Path(dataset).name,
        "model": model,
        "prediction_scheme": prediction_scheme.name,
        "truth_scheme": cases[0].scheme.name,
        "nsd_tolerance_mm": tolerance_mm,
        "conventions": metrics.CONVENTIONS,
        "structures": names,
        "cases": [c.to_dict() for c in scored],
        "aggregate": aggregate(scored, names),
        "counts": {"ok": sum(c.status == "ok" for c in scored), "failed": sum(c.status != "ok" for c in scored)},
    }
    write_reports(output, document, overlays if html else None)
    return document


def recorded_scheme(prediction: Path) -> str | None:
    """The label scheme the report.json beside a tumorseg label map records, or None (no report:
    another tool's output)."""
    if prediction.name != "segmentation.nii.gz":
        return None
    try:
        scheme = json.loads((prediction.parent / "report.json").read_text())["results"]["label_scheme"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return scheme if isinstance(scheme, str) else None


def _prediction_scheme(predictions: Path, ids: list[str], given: LabelScheme | None) -> LabelScheme:
    """The predictions' label scheme: ``given``, else the one their tumorseg reports record, else
    MSD (nnU-Net's Task01 outputs); refused where the reports disagree with it or with each other
    (values 1-3 exist in several schemes, so a wrong one scores silently wrong)."""
    recorded: dict[str, list[str]] = {}
    for case_id in ids:
        path = find_prediction(predictions, case_id)
        scheme = recorded_scheme(path) if path is not None else None
        if scheme is not None:
            recorded.setdefault(scheme, []).append(case_id)
    if given is not None:
        others = {name: cases for name, cases in recorded.items() if name != given.name}
        if others:
            name, cases = next(iter(others.items()))
            raise ConfigError(f"the predictions are to be scored in label scheme {given.name}, but the reports of "
                              f"{len(cases)} of them (e.g. {cases[0]}) record label scheme {name}", predictions)
        return given
    if len(recorded) > 1:
        raise ConfigError(f"the predictions' reports record several label schemes ({', '.join(sorted(recorded))}); "
                          "score each scheme's predictions on their own", predictions)
    return get_scheme(next(iter(recorded), "msd"))


def _predict_cases(segmenter, ids: list[str], cases: list[LabelledCase], predictions: Path, workers: int,
                   force: bool, progress: bool) -> dict[str, str]:
    """Segment every case into ``predictions`` as ``tumorseg batch`` does; the reason of each case
    that failed now (it must not be scored on a label map an earlier run left behind)."""
    from .batch.cases import BatchCase
    from .batch.runner import BatchRunner

    batch = [BatchCase(i, c.inputs, c.case_id) for i, c in zip(ids, cases)]
    summary = BatchRunner(segmenter, predictions, workers=workers, force=force, progress=progress).run(batch)
    return {o.case_id: f"prediction failed: {o.error_message}" for o in summary.failed}


def _score_one(case_id: str, case: LabelledCase, predictions: Path, prediction_scheme: LabelScheme,
               tolerance_mm: float, html: bool) -> tuple[ScoredCase, bytes | None]:
    """One case's scores, and its overlay for the HTML report (None without ``html``, or when only
    the picture failed: the scores stand)."""
    path = find_prediction(predictions, case_id)
    if path is None:
        raise TumorsegError(f"no prediction for case {case_id}", predictions)
    pred = read_label_file(path)
    truth = read_label_file(case.label_path)
    result = score_case(case_id, pred, prediction_scheme, truth, case.scheme, case.label_path, tolerance_mm, path)
    overlay = None
    if html:
        try:
            overlay = _overlay(case, pred, prediction_scheme, truth)
        except (TumorsegError, ValueError) as e:
            log.warning("%s: no overlay in the HTML report (%s)", case_id, e)
    return result, overlay


def _overlay(case: LabelledCase, pred: LabelFile, pred_scheme: LabelScheme, truth: LabelFile) -> bytes:
    from .validation_report import overlay_png

    image = background_image(case, truth)
    return overlay_png(
        image, truth.affine,
        {r: pred_scheme.region_mask(pred.labels, r) for r in REGIONS},
        {r: case.scheme.region_mask(truth.labels, r) for r in REGIONS},
        title=case.case_id,
    )


def write_reports(output: Path, document: dict[str, Any], overlays: dict[str, bytes] | None) -> None:
    """Write the metrics files, then the HTML report (``overlays`` None: none). An earlier run's
    report.html is removed first, so it never sits beside other metrics."""
    (output / REPORT_HTML).unlink(missing_ok=True)
    write_bytes_atomic(output / METRICS_JSON, (json.dumps(document, indent=2) + "\n").encode())
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case_id", "status", "structure", *SCORES, "error"])
    for case in document["cases"]:
        if case["status"] != "ok":
            writer.writerow([case["case_id"], case["status"], "", *[""] * len(SCORES), case["error"]])
        for name, values in case["scores"].items():
            writer.writerow([case["case_id"], case["status"], name, *[_csv(values[s]) for s in SCORES], ""])
    write_bytes_atomic(output / METRICS_CSV, buffer.getvalue().encode())
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["structure", "metric", "mean", "median", "std", "worst", "n"])
    for name, by_metric in document["aggregate"].items():
        for metric, stats in by_metric.items():
            writer.writerow([name, metric, *[_csv(stats[k]) for k in ("mean", "median", "std", "worst", "n")]])
    write_bytes_atomic(output / SUMMARY_CSV, buffer.getvalue().encode())
    if overlays is not None:
        from .validation_report import write_html_report

        write_html_report(output / REPORT_HTML, document, overlays)


def _csv(value: Any) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, unit="case", desc="scoring", dynamic_ncols=True)
