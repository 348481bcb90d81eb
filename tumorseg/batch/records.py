"""What a batch knows about each case: its outcome (a manifest row), its record on disk
(``OUT/cases/<case_id>/batch-case.json``: the fingerprint of what made the outputs and their
sha256, written last), the checks that let a rerun reuse it, and the retraction of outputs that no
longer hold."""
from __future__ import annotations

import hashlib
import json
import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import write_bytes_atomic
from ..configio import to_dict
from ..errors import InputError, TumorsegError
from ..model import sha256_file
from .cases import BatchCase
from .layout import CASE_RECORD

if TYPE_CHECKING:
    from ..pipeline import PipelineSpec

log = logging.getLogger("tumorseg.batch.runner")


@dataclass
class CaseOutcome:
    """One manifest row."""

    case_id: str
    source: str
    status: str = "ok"  # ok | failed
    reused: bool = False
    error_code: int | None = None
    error_kind: str | None = None
    error_message: str | None = None
    sequences_used: list[str] = field(default_factory=list)
    volumes_ml: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # name -> path relative to OUT
    timings_s: dict[str, float] = field(default_factory=dict)
    inputs_sha256: str | None = None
    warnings: list[str] = field(default_factory=list)  # the report's: what to check in this result
    sequences_ignored: list[str] = field(default_factory=list)

    def row(self, fingerprint: dict[str, str]) -> dict[str, Any]:
        return {
            "case_id": self.case_id, "status": self.status, "reused": self.reused,
            "error_code": self.error_code, "error_kind": self.error_kind, "error_message": self.error_message,
            "warnings": "; ".join(self.warnings),
            "source": self.source, "sequences_used": " ".join(self.sequences_used),
            "sequences_ignored": " ".join(self.sequences_ignored),
            "wt_ml": self.volumes_ml.get("WT"), "tc_ml": self.volumes_ml.get("TC"), "et_ml": self.volumes_ml.get("ET"),
            "label_map": self.outputs.get("label_map"), "report": self.outputs.get("report"),
            "rtstruct": self.outputs.get("rtstruct"), "seg": self.outputs.get("seg"),
            "read_prepare_s": self.timings_s.get("read_prepare"), "infer_s": self.timings_s.get("infer"),
            "finish_write_s": self.timings_s.get("finish_write"),
            "inputs_sha256": self.inputs_sha256, "model_sha256": fingerprint["model_sha256"],
            "config_sha256": fingerprint["config_sha256"],
        }


@dataclass
class BatchSummary:
    outcomes: list[CaseOutcome]
    seconds: float
    #: Seconds the network ran (the device was busy); the rest of ``seconds`` it waited.
    network_seconds: float = 0.0

    @property
    def network_busy_fraction(self) -> float:
        return self.network_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status != "ok"]

    @property
    def reused(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.reused]


#: Settings that change how fast the outputs are made, not what they are (windows_per_batch,
#: compile), or that are hashed as what they resolved to (device, precision: "auto" is fp16 on a
#: GPU, bf16 or fp32 on a CPU); and how the model was named (its weights and card have their own
#: entries in the fingerprint), so that --model DIR for --model NAME, or rerunning a
#: pipeline.resolved.toml (model_sha256 set), reuses the cases it made.
_NOT_OUTPUT_INFERENCE = ("windows_per_batch", "compile", "device", "precision")


def config_sha256(spec: PipelineSpec) -> str:
    settings = to_dict(spec.config)
    settings.pop("model", None)
    settings.pop("model_sha256", None)
    for key in _NOT_OUTPUT_INFERENCE:
        settings["inference"].pop(key, None)
    settings["inference"]["ran_on"] = {"device": spec.device.split(":")[0], "precision": spec.precision}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def inputs_sha256(case: BatchCase, exclude: Path | None = None) -> str:
    """One checksum over the case's input files' names and contents and the part each plays
    (``exclude``: the batch's output folder, which may lie inside a DICOM case's folder)."""
    digest = hashlib.sha256(case.roles().encode() + b"\n")
    for path in case.files(exclude):
        digest.update(path.name.encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return digest.hexdigest()


def failure(case: BatchCase, error: BaseException) -> CaseOutcome:
    if isinstance(error, TumorsegError):
        code, kind, message = error.exit_code, error.code, str(error)
    elif isinstance(error, MemoryError):
        code, kind, message = 1, "memory", "out of memory"
    else:  # a bug or an environment problem: keep the type, and the traceback in the log
        log.debug("%s: %s", case.case_id, "".join(traceback.format_exception(error)))
        code, kind, message = 1, "internal", f"{type(error).__name__}: {error}"
    return CaseOutcome(case_id=case.case_id, source=case.source, status="failed", error_code=code,
                       error_kind=kind, error_message=message)


def write_case_record(case_path: Path, fingerprint: dict[str, str], paths: dict[str, Path], outcome: CaseOutcome) -> None:
    """The case's record, written last: its presence says every output it lists is complete."""
    record = {
        "fingerprint": fingerprint,
        # Relative to the case folder (registered/<sequence>.nii.gz sits one level down).
        "outputs": {name: {"file": p.relative_to(case_path).as_posix(), "sha256": sha256_file(p)}
                    for name, p in paths.items()},
        # Not the source path: case folders are what gets shared, and with --hashed-ids the
        # input folders are named after patients (the manifest keeps the mapping).
        "outcome": {k: v for k, v in outcome.__dict__.items() if k != "source"},
    }
    write_bytes_atomic(case_path / CASE_RECORD, (json.dumps(record, indent=2) + "\n").encode())


def reusable_outcome(case: BatchCase, case_dir: Path, fingerprint: dict[str, str]) -> CaseOutcome | None:
    """The recorded outcome when the case's record has ``fingerprint`` and every output it lists
    is there with its sha256; else None (the case runs again)."""
    try:
        record = json.loads((case_dir / CASE_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    for name, info in record.get("outputs", {}).items():
        path = case_dir / info["file"]
        if not path.is_file() or sha256_file(path) != info["sha256"]:
            log.info("%s: output %s missing or changed; running the case again", case.case_id, name)
            return None
    outcome = CaseOutcome(**{**record["outcome"], "source": case.source})
    outcome.reused = True
    return outcome


def retract_previous_outputs(case_dir: Path) -> None:
    """Remove a case's record, then the outputs it lists: they came from other inputs or settings,
    and a rerun that fails must not leave them to be taken for its results (``validate`` reads
    ``segmentation.nii.gz`` wherever it finds one)."""
    record_path = case_dir / CASE_RECORD
    try:
        outputs = json.loads(record_path.read_text()).get("outputs", {})
    except (OSError, ValueError, AttributeError):
        outputs = {}
    record_path.unlink(missing_ok=True)  # first: from here on nothing claims the outputs
    for info in outputs.values() if isinstance(outputs, dict) else ():
        name = info.get("file") if isinstance(info, dict) else None
        # Inside the case folder only: never an absolute path or one that climbs out of it.
        if isinstance(name, str) and name and not Path(name).is_absolute() and ".." not in Path(name).parts:
            (case_dir / name).unlink(missing_ok=True)
    remove_unrecorded_outputs(case_dir)


def remove_unrecorded_outputs(case_dir: Path) -> None:
    """The outputs a run writes, whether or not a record lists them: a run killed after its outputs
    and before its record, or one that failed part way through writing them, leaves them with no
    record, and ``validate`` would score such a label map as the case's result."""
    from ..pipeline import (BRAIN_MASK_NAME, CONFIG_NAME, LABEL_MAP_NAME, OVERVIEW_NAME, REGISTERED_DIR,
                            REPORT_NAME, RTSTRUCT_NAME, SEG_NAME)

    # The report first: a folder without one claims no complete set.
    for name in (REPORT_NAME, LABEL_MAP_NAME, CONFIG_NAME, OVERVIEW_NAME, BRAIN_MASK_NAME, RTSTRUCT_NAME, SEG_NAME):
        (case_dir / name).unlink(missing_ok=True)
    for old in (case_dir / REGISTERED_DIR).glob("*.nii.gz"):
        old.unlink(missing_ok=True)


def remove_stale_partials(case_dir: Path) -> None:
    """Temporary files left by a killed run (see :mod:`tumorseg.atomic`)."""
    if case_dir.is_dir():
        for stale in [*case_dir.glob(".*.partial*"), *case_dir.glob("registered/.*.partial*")]:
            stale.unlink(missing_ok=True)


def check_case(case: BatchCase, case_dir: Path, batch_fingerprint: dict[str, str], force: bool = False,
               exclude: Path | None = None) -> tuple[CaseOutcome | None, str]:
    """What a batch knows of a case before running it: its outcome when there is nothing to run
    (broken at discovery, or done before with the same fingerprint and intact outputs), and the
    checksum of its inputs. A case that will run has its previous outputs retracted first."""
    if case.problem is not None:
        retract_previous_outputs(case_dir)
        return failure(case, case.problem), ""
    try:
        fingerprint = inputs_sha256(case, exclude=exclude)
    except OSError as e:
        retract_previous_outputs(case_dir)
        return failure(case, InputError(f"cannot read input ({e.strerror})", e.filename)), ""
    remove_stale_partials(case_dir)
    reused = None
    if not force:
        try:
            reused = reusable_outcome(case, case_dir, {**batch_fingerprint, "inputs_sha256": fingerprint})
        except Exception as e:  # an unreadable or old-format record: run the case again
            log.info("%s: previous outputs not reusable (%s)", case.case_id, e)
    if reused is None:
        retract_previous_outputs(case_dir)
    return reused, fingerprint
