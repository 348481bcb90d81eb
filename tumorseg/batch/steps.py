"""The steps of a batch case, module-level so that worker processes (and any other scheduler)
can run them: read and prepare, run a whole case with the worker's own model, finish and write
(the outputs, then the case record)."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple

from .. import logredact
from ..config import PipelineConfig
from ..heap import keep_freed_heap_memory
from ..pipeline import PipelineSpec, PreparedScan, Segmenter, write_outputs
from .cases import BatchCase
from .records import CaseOutcome, failure, retract_previous_outputs, write_case_record
from .shared import release, share, take

#: Per-stage messages that would bury the progress bar; shown with --verbose.
STAGE_LOGGERS = ("tumorseg.pipeline", "tumorseg.dicom", "tumorseg.stages")


@contextlib.contextmanager
def quiet_stage_logs(enabled: bool = True) -> Iterator[None]:
    """Only warnings from the stages while the block runs (levels restored after)."""
    loggers = [logging.getLogger(name) for name in STAGE_LOGGERS]
    before = [logger.level for logger in loggers]
    if enabled:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, before):
            logger.setLevel(level)


def logger_levels() -> dict[str, int]:
    return {name: logging.getLogger(name).level for name in ("",) + STAGE_LOGGERS}


#: The worker's own model, when workers run whole cases (CPU device).
_WORKER_SEGMENTER: Segmenter | None = None


def init_worker(levels: dict[str, int], model_dir: str | None, threads: int, config: PipelineConfig) -> None:
    import torch

    global _WORKER_SEGMENTER
    _exit_with_parent()
    torch.set_num_threads(threads)
    keep_freed_heap_memory()
    if model_dir is None:
        # Lowest CPU priority: these workers only prepare and finish cases; they fill idle time
        # and never slow down the main process, which feeds the GPU.
        os.nice(19)
    logging.basicConfig(level=levels.pop(""), format="%(asctime)s %(levelname)s [worker] %(message)s",
                        datefmt="%H:%M:%S")
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logredact.install()  # as in the main process: no header values from libraries in the log
    if model_dir is not None:  # the weights' checksum is verified again here
        _WORKER_SEGMENTER = Segmenter(model_dir, config)


def _exit_with_parent() -> None:
    """End this worker when the batch that started it is gone (killed, even by SIGKILL): a
    process pool's workers otherwise wait for work forever, each holding its copy of the model."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="tumorseg-parent-watch", daemon=True).start()


class Prepared(NamedTuple):
    """A case read and prepared for the network, and what its finishing step needs of that."""

    scan: PreparedScan
    read_seconds: float
    fingerprint: str


class PreparedShared(NamedTuple):
    """A ``Prepared`` case whose network input travels in shared memory (``prepare_shared``)."""

    prepared: Prepared
    image: Any


def read_and_prepare(spec: PipelineSpec, case: BatchCase, fingerprint: str) -> Prepared | CaseOutcome:
    start = time.perf_counter()
    try:
        prepared = spec.read_and_prepare(case.inputs)
    except Exception as e:
        return failure(case, e)
    return Prepared(prepared, time.perf_counter() - start, fingerprint)


def run_case(spec: PipelineSpec, case: BatchCase, fingerprint: str, case_dir: str, output_root: str,
              batch_fingerprint: dict[str, str]) -> CaseOutcome:
    """One whole case in a worker that holds its own model (see ``_run_whole_cases``)."""
    assert _WORKER_SEGMENTER is not None
    prepared = read_and_prepare(spec, case, fingerprint)
    if isinstance(prepared, CaseOutcome):
        return prepared
    try:
        probs, infer_seconds = _WORKER_SEGMENTER.infer(prepared.scan)
    except Exception as e:
        return failure(case, e)
    return finish_and_write(Finish(spec, case, prepared.scan, probs, infer_seconds, prepared.read_seconds,
                                   fingerprint, case_dir, output_root, batch_fingerprint))


def prepare_shared(spec: PipelineSpec, case: BatchCase, fingerprint: str, prefix: str):
    """``read_and_prepare`` for a pipelined batch: the network input goes back in shared memory."""
    prepared = read_and_prepare(spec, case, fingerprint)
    if isinstance(prepared, CaseOutcome):
        return prepared
    image = share(prepared.scan.image, prefix)
    prepared.scan.image = None
    return PreparedShared(prepared, image)


def release_prepared(future: Future) -> None:
    """Free the shared network input of a prepared case that will not be run from it."""
    if future.done() and not future.cancelled() and future.exception() is None:
        result = future.result()
        if isinstance(result, PreparedShared):
            release(result.image)


class Finish(NamedTuple):
    """What finishing one case needs: its prepared scan, the network's output, and where to write."""

    spec: PipelineSpec
    case: BatchCase
    prepared: PreparedScan
    probs: Any  # np.ndarray; a SharedArray on its way to a worker
    infer_seconds: float
    read_seconds: float
    fingerprint: str
    case_dir: str
    output_root: str
    batch_fingerprint: dict[str, str]




def finish_shared(job: Finish) -> CaseOutcome:
    """``finish_and_write`` in a worker, on probabilities that came through shared memory."""
    return finish_and_write(job._replace(probs=take(job.probs)))


def finish_and_write(job: Finish) -> CaseOutcome:
    start = time.perf_counter()
    spec, case, fingerprint = job.spec, job.case, job.fingerprint
    case_path, root = Path(job.case_dir), Path(job.output_root)
    try:
        result = spec.finish(job.prepared, job.probs, job.infer_seconds)
        paths = write_outputs(result, spec, case_path)
    except Exception as e:
        _remove_written(case_path)
        return failure(case, e)
    try:
        outcome = CaseOutcome(
            case_id=case.case_id, source=case.source,
            sequences_used=list(result.report["sequences_used"]),
            volumes_ml={r: v["volume_ml"] for r, v in result.report["results"]["regions"].items()},
            outputs={name: str(p.relative_to(root)) for name, p in paths.items()},
            timings_s={"read_prepare": round(job.read_seconds, 3), "infer": round(job.infer_seconds, 3),
                       "finish_write": round(time.perf_counter() - start, 3)},
            inputs_sha256=fingerprint,
            warnings=list(result.report["warnings"]),
            sequences_ignored=list(result.report["sequences_ignored"]),
        )
        write_case_record(case_path, {**job.batch_fingerprint, "inputs_sha256": fingerprint}, paths, outcome)
    except Exception as e:  # e.g. a full disk
        _remove_written(case_path)
        return failure(case, e)
    return outcome


def _remove_written(case_path: Path) -> None:
    """A failed case keeps no outputs: a label map left by a write that failed part way (a full
    disk) would be scored by ``validate`` as the case's result."""
    try:
        retract_previous_outputs(case_path)
    except OSError as e:
        logging.getLogger(__name__).warning("could not remove the outputs of a failed case (%s)", e.strerror)
