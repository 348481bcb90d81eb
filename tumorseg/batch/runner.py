"""``tumorseg batch``: every case of a folder through the pipeline, without losing work.

Per case, under ``OUT/cases/<case_id>/``: the ``predict`` outputs, then ``batch-case.json`` written
last. That record holds the fingerprint of what made the outputs (the inputs' sha256, the model's
and the configuration's) and the sha256 of each output; a rerun skips a case whose fingerprint is
unchanged and whose outputs are all there with those checksums. Every file is written atomically,
so a kill leaves either the old file or the new one at a final path, never a half-written one.

``OUT/manifest.csv`` and ``OUT/manifest.json`` are rewritten (atomically) after every case, so they
describe the batch so far even when it is killed.

A batch holds ``OUT/.batch.lock`` while it runs: a second batch into the same folder (a nightly run
that overlaps the last one) is refused instead of mixing its files with the first's.

With ``workers`` > 0, worker processes read and prepare the next cases and finish and write the
done ones (probabilities back to the input grid, post-processing, outputs), while the main process
runs only the network: on a GPU server the GPU does not wait for the CPU.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .. import __version__, logredact
from ..atomic import write_bytes_atomic
from ..config import PipelineConfig
from ..configio import to_dict
from ..errors import ConfigError, InputError, TumorsegError
from ..heap import keep_freed_heap_memory
from ..model import CARD_NAME as MODEL_CARD_FILE, sha256_file
from ..pipeline import PipelineSpec, PreparedScan, Segmenter, write_outputs
from .cases import BatchCase
from .shared import batch_prefix, prefix_pid, release, remove_leftovers, share, take

log = logging.getLogger(__name__)

#: Raise when a change to tumorseg changes the outputs it writes: earlier outputs are redone.
RESULTS_VERSION = 3
CASES_DIR = "cases"
CASE_RECORD = "batch-case.json"
MANIFEST_CSV = "manifest.csv"
MANIFEST_JSON = "manifest.json"
LOCK_FILE = ".batch.lock"

MANIFEST_COLUMNS = (
    "case_id", "status", "reused", "error_code", "error_kind", "error_message", "warnings", "source", "sequences_used", "sequences_ignored",
    "wt_ml", "tc_ml", "et_ml", "label_map", "report", "rtstruct", "seg",
    "read_prepare_s", "infer_s", "finish_write_s", "inputs_sha256", "model_sha256", "config_sha256",
)


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


def config_sha256(spec: PipelineSpec) -> str:
    return hashlib.sha256(json.dumps(to_dict(spec.config), sort_keys=True).encode()).hexdigest()


def inputs_sha256(case: BatchCase, exclude: Path | None = None) -> str:
    """One checksum over the case's input files' names and contents (``exclude``: the batch's
    output folder, which may lie inside a DICOM case's folder)."""
    digest = hashlib.sha256()
    for path in case.files(exclude):
        digest.update(path.name.encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return digest.hexdigest()


#: A worker died while the case was in its pool (the case may be innocent: see ``_run_alone``).
_DIED = object()
#: Pools (or lone retries) that may die in a row, no case finishing in between, before the batch
#: stops starting workers: a worker that cannot even start would otherwise be respawned per case.
MAX_DEATHS_IN_A_ROW = 3


class _WorkersKeepDying(RuntimeError):
    def __init__(self, deaths: int) -> None:
        super().__init__(f"not run: worker processes died {deaths} times in a row with no case finishing "
                         "(they cannot start, or every case kills them); see the log with --verbose")


class _WorkerPool:
    """A process pool that notices a dead worker, and is replaced by a fresh one on ``renew``.

    Only futures of the current executor can mark it broken: a future of a replaced executor
    reporting its old death must not shut down the healthy new one.
    """

    def __init__(self, factory: Callable[[], ProcessPoolExecutor]) -> None:
        self._factory = factory
        self._executor = factory()
        self._current: set[Future] = set()
        self.broken = False
        self._deaths_in_a_row = 0

    def submit(self, fn, *args) -> Future | None:
        """The future, or None when the pool is broken (the caller keeps the case for later)."""
        try:
            future = self._executor.submit(fn, *args)
        except BrokenProcessPool:
            self.broken = True
            return None
        self._current.add(future)
        return future

    def result(self, case: BatchCase, future: Future):
        """The step's result; ``_DIED`` when a worker of its pool died."""
        current = future in self._current
        self._current.discard(future)
        try:
            result = future.result()
        except (BrokenProcessPool, CancelledError):
            self.broken = self.broken or current
            return _DIED
        except Exception as e:  # e.g. a result that could not be sent back: this case fails alone
            return _failure(case, e)
        self._deaths_in_a_row = 0
        return result

    def renew(self) -> None:
        """A fresh executor in place of the broken one; raises after too many deaths in a row."""
        self._deaths_in_a_row += 1
        if self._deaths_in_a_row >= MAX_DEATHS_IN_A_ROW:
            raise _WorkersKeepDying(self._deaths_in_a_row)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor, self._current, self.broken = self._factory(), set(), False

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class BatchRunner:
    """Runs cases through one loaded :class:`Segmenter` into ``output``."""

    def __init__(self, segmenter: Segmenter, output: Path, workers: int = 0, force: bool = False,
                 progress: bool = True, worker_mode: str = "auto") -> None:
        """``worker_mode``: ``pipelined`` (workers prepare and finish, this process runs the
        network), ``whole_cases`` (each worker runs whole cases with its own copy of the model), or
        ``auto``: pipelined on a GPU, whole cases on a CPU device."""
        if workers < 0:
            raise ValueError("workers must be >= 0")
        if worker_mode not in ("auto", "pipelined", "whole_cases"):
            raise ValueError(f"unknown worker_mode {worker_mode!r}")
        if worker_mode == "auto":
            worker_mode = "whole_cases" if segmenter.device.type == "cpu" else "pipelined"
        self.worker_mode = worker_mode
        self.segmenter = segmenter
        self.spec = segmenter.spec
        self.output = Path(output)
        self.workers = workers
        self.force = force
        self.progress = progress
        self.fingerprint = {
            "model_sha256": self.spec.model_sha256,
            "model_card_sha256": sha256_file(segmenter.model.directory / MODEL_CARD_FILE),
            "results_version": RESULTS_VERSION,
            "config_sha256": config_sha256(self.spec),
            "tumorseg_version": __version__,
        }
        self._outcomes: dict[str, CaseOutcome] = {}
        self._order: list[str] = []
        self._shm_prefix = ""  # this batch's shared memory blocks (set by run)

    # -- the batch ---------------------------------------------------------------------------
    def run(self, cases: list[BatchCase]) -> BatchSummary:
        start = time.perf_counter()
        if len({c.case_id.lower() for c in cases}) != len(cases):
            raise ValueError("case ids must be unique (ignoring case); see batch.cases.unique_case_ids")
        self._network_seconds = 0.0
        self._order = [c.case_id for c in cases]
        self._outcomes = {}
        self._shm_prefix = batch_prefix()
        with _exclusive_output(self.output, self._shm_prefix):
            bar = self._progress_bar(len(cases))
            try:
                todo = []
                for case in cases:
                    outcome, fingerprint = self._check_case(case)
                    if outcome is not None:
                        self._record(outcome, bar, write=False)
                    else:
                        todo.append((case, fingerprint))
                self._write_manifest(final=False)  # once for all reused cases, not once each
                if todo:
                    log.info("%d of %d cases to run (%d reused or failed at discovery)", len(todo), len(cases),
                             len(cases) - len(todo))
                if self.workers == 0:
                    self._run_inline(todo, bar)
                elif self.worker_mode == "whole_cases":
                    self._run_whole_cases(todo, bar)
                else:
                    self._run_pipelined(todo, bar)
            finally:
                if bar is not None:
                    bar.close()
            outcomes = [self._outcomes[c] for c in self._order if c in self._outcomes]
            summary = BatchSummary(outcomes, time.perf_counter() - start, self._network_seconds)
            self._write_manifest(final=True, seconds=summary.seconds)
        return summary

    def _check_case(self, case: BatchCase) -> tuple[CaseOutcome | None, str]:
        """The outcome without running (a case broken at discovery, or one already done), and
        the checksum of the case's inputs."""
        case_dir = self.case_dir(case.case_id)
        if case.problem is not None:
            _retract_previous_outputs(case_dir)
            return _failure(case, case.problem), ""
        try:
            fingerprint = inputs_sha256(case, exclude=self.output)
        except OSError as e:
            _retract_previous_outputs(case_dir)
            return _failure(case, InputError(f"cannot read input ({e.strerror})", e.filename)), ""
        _remove_stale_partials(case_dir)
        reused = None if self.force else self._reuse(case, case_dir, fingerprint)
        if reused is None:
            _retract_previous_outputs(case_dir)
        return reused, fingerprint

    def _reuse(self, case: BatchCase, case_dir: Path, fingerprint: str) -> CaseOutcome | None:
        try:
            return self._reuse_record(case, case_dir, fingerprint)
        except Exception as e:  # an unreadable or old-format record: run the case again
            log.info("%s: previous outputs not reusable (%s)", case.case_id, e)
            return None

    def _reuse_record(self, case: BatchCase, case_dir: Path, fingerprint: str) -> CaseOutcome | None:
        record_path = case_dir / CASE_RECORD
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            return None
        if record.get("fingerprint") != {**self.fingerprint, "inputs_sha256": fingerprint}:
            return None
        for name, info in record.get("outputs", {}).items():
            path = case_dir / info["file"]
            if not path.is_file() or sha256_file(path) != info["sha256"]:
                log.info("%s: output %s missing or changed; running the case again", case.case_id, name)
                return None
        outcome = CaseOutcome(**{**record["outcome"], "source": case.source})
        outcome.reused = True
        return outcome

    def case_dir(self, case_id: str) -> Path:
        return self.output / CASES_DIR / case_id

    # -- running: inline ----------------------------------------------------------------------
    def _run_inline(self, cases: list[tuple[BatchCase, str]], bar) -> None:
        for case, fingerprint in cases:
            job = self._infer(case, _read_and_prepare(self.spec, case, fingerprint), bar)
            if job is not None:
                self._record(_finish_and_write(job), bar)

    def _infer(self, case: BatchCase, prepared, bar) -> _Finish | None:
        """Run the network on a prepared case; what its finishing step needs, or None when the
        case failed (and was recorded)."""
        if isinstance(prepared, CaseOutcome):
            self._record(prepared, bar)
            return None
        prepared_scan, read_seconds, fingerprint = prepared
        try:
            probs, infer_seconds = self.segmenter.infer(prepared_scan)
            self._network_seconds += infer_seconds
        except Exception as e:  # e.g. out of memory on the device: this case fails, the batch goes on
            self._record(_failure(case, e), bar)
            return None
        return _Finish(self.spec, case, prepared_scan, probs, infer_seconds, read_seconds, fingerprint,
                       str(self.case_dir(case.case_id)), str(self.output), self.fingerprint)

    # -- running: worker processes --------------------------------------------------------------
    def _run_pipelined(self, cases: list[tuple[BatchCase, str]], bar) -> None:
        """Workers prepare up to ``workers + 1`` cases ahead and finish behind the network; the
        network's input and output travel through shared memory (see :mod:`.shared`)."""
        queue = deque(cases)
        preparing: deque[tuple[BatchCase, str, Future]] = deque()
        finishing: deque[_Finishing] = deque()
        lookahead = self.workers + 1
        prefix = self._shm_prefix
        pool = _WorkerPool(self._executor_factory())
        suspects: list[tuple[BatchCase, str]] = []

        def collect(item: _Finishing) -> None:
            try:
                self._collect(pool, item.case, item.fingerprint, item.future, suspects, bar, network_in_worker=False)
            finally:
                release(item.probs)  # the worker unlinked it already, unless it died first

        try:
            while queue or preparing:
                if pool.broken:  # a worker died: new workers; cases still being read go round again
                    pool.renew()
                    for case, fingerprint, future in preparing:
                        _release_prepared(future)
                        queue.appendleft((case, fingerprint))
                    preparing.clear()
                while queue and len(preparing) < lookahead and not pool.broken:
                    case, fingerprint = queue.popleft()
                    future = pool.submit(_prepare_shared, self.spec, case, fingerprint, prefix)
                    if future is None:
                        queue.appendleft((case, fingerprint))
                    else:
                        preparing.append((case, fingerprint, future))
                if pool.broken:
                    continue
                case, fingerprint, future = preparing.popleft()
                prepared = pool.result(case, future)
                if prepared is _DIED:
                    suspects.append((case, fingerprint))
                    continue
                if not isinstance(prepared, CaseOutcome):
                    prepared_scan, read_seconds, _, image = prepared
                    try:
                        prepared_scan.image = take(image)
                    except OSError as e:
                        self._record(_failure(case, e), bar)
                        continue
                    prepared = (prepared_scan, read_seconds, fingerprint)
                job = self._infer(case, prepared, bar)
                if job is not None:
                    job = job._replace(probs=share(job.probs, prefix))
                    future = pool.submit(_finish_shared, job)
                    if future is None:
                        suspects.append((case, fingerprint))
                        release(job.probs)
                    else:
                        finishing.append(_Finishing(case, fingerprint, future, job.probs))
                    del job
                while finishing and (finishing[0].future.done() or len(finishing) > self.workers):
                    collect(finishing.popleft())
            while finishing:
                collect(finishing.popleft())
        except _WorkersKeepDying as e:
            self._fail_all([*queue, *((c, fp) for c, fp, _ in preparing),
                            *((item.case, item.fingerprint) for item in finishing), *suspects], e, bar)
            suspects = []
        finally:
            pool.shutdown()
            for _, _, future in preparing:
                _release_prepared(future)
            for item in finishing:
                release(item.probs)
            left = remove_leftovers(prefix)
            if left:
                log.debug("removed %d shared memory blocks left by dead workers", left)
        self._run_alone(suspects, bar)

    def _run_whole_cases(self, cases: list[tuple[BatchCase, str]], bar) -> None:
        """On a CPU device the network is CPU work too: each worker runs whole cases with its share
        of the cores (a network's threads use cores less well than separate cases do)."""
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        # Largest inputs first, so that no big case is left running alone at the end.
        queue = deque(sorted(cases, key=lambda item: -sum(_size(p) for p in item[0].files())))
        running: dict[Future, tuple[BatchCase, str]] = {}
        pool = _WorkerPool(self._executor_factory(str(self.segmenter.model.directory), threads))
        suspects: list[tuple[BatchCase, str]] = []
        try:
            while queue or running:
                if pool.broken:
                    pool.renew()
                while queue and len(running) < self.workers and not pool.broken:
                    case, fingerprint = queue.popleft()
                    future = pool.submit(_run_case, self.spec, case, fingerprint, str(self.case_dir(case.case_id)),
                                         str(self.output), self.fingerprint)
                    if future is None:
                        queue.appendleft((case, fingerprint))
                    else:
                        running[future] = (case, fingerprint)
                if not running:
                    continue
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    self._collect(pool, *running.pop(future), future, suspects, bar, network_in_worker=True)
        except _WorkersKeepDying as e:
            self._fail_all([*queue, *running.values(), *suspects], e, bar)
            suspects = []
        finally:
            pool.shutdown()
        self._run_alone(suspects, bar)

    def _collect(self, pool: _WorkerPool, case: BatchCase, fingerprint: str, future: Future, suspects: list, bar,
                 network_in_worker: bool) -> None:
        """Record a finished case, or note it as a suspect when a worker of its pool died."""
        outcome = pool.result(case, future)
        if outcome is _DIED:
            suspects.append((case, fingerprint))
            return
        if network_in_worker:
            self._network_seconds += outcome.timings_s.get("infer", 0.0)
        self._record(outcome, bar)

    def _run_alone(self, suspects: list[tuple[BatchCase, str]], bar) -> None:
        """Cases that were in a pool when a worker died, run again one at a time in a fresh worker:
        the case that kills its worker (out of memory, say) fails alone, the others succeed."""
        if not suspects:
            return
        log.warning("a worker process died; running %d affected case(s) again, one at a time", len(suspects))
        factory = self._executor_factory(str(self.segmenter.model.directory), os.cpu_count() or 1, workers=1)
        deaths_in_a_row = 0
        for n, (case, fingerprint) in enumerate(suspects):
            if deaths_in_a_row == MAX_DEATHS_IN_A_ROW:
                self._fail_all(suspects[n:], _WorkersKeepDying(deaths_in_a_row), bar)
                return
            pool = _WorkerPool(factory)
            try:
                future = pool.submit(_run_case, self.spec, case, fingerprint, str(self.case_dir(case.case_id)),
                                     str(self.output), self.fingerprint)
                outcome = _DIED if future is None else pool.result(case, future)
            finally:
                pool.shutdown()
            deaths_in_a_row = deaths_in_a_row + 1 if outcome is _DIED else 0
            if outcome is _DIED:
                outcome = _failure(case, RuntimeError("the worker process running this case alone died "
                                                      "(killed, or out of memory)"))
            self._network_seconds += outcome.timings_s.get("infer", 0.0)
            self._record(outcome, bar)

    def _fail_all(self, cases, error: BaseException, bar) -> None:
        for case, _ in cases:
            self._record(_failure(case, error), bar)

    def _executor_factory(self, model_dir: str | None = None, threads: int = 1, workers: int | None = None
                          ) -> Callable[[], ProcessPoolExecutor]:
        # spawn: a fresh interpreter per worker, no forked copy of the main process' threads.
        return functools.partial(
            ProcessPoolExecutor, workers or self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(_logger_levels(), model_dir, threads, self.spec.config))

    # -- bookkeeping ------------------------------------------------------------------------
    def _record(self, outcome: CaseOutcome, bar, write: bool = True) -> None:
        self._outcomes[outcome.case_id] = outcome
        if outcome.status != "ok":
            # No message here: it names input files, whose folders may carry patient names.
            log.warning("%s failed: %s error (code %s); the message is in the manifest", outcome.case_id,
                        outcome.error_kind, outcome.error_code)
        if write:
            self._write_manifest(final=False)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(failed=sum(o.status != "ok" for o in self._outcomes.values()), refresh=False)

    def _progress_bar(self, total: int):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, unit="case", desc="batch", dynamic_ncols=True)

    def _write_manifest(self, final: bool, seconds: float | None = None) -> None:
        outcomes = [self._outcomes[c] for c in self._order if c in self._outcomes]
        rows = [o.row(self.fingerprint) for o in outcomes]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_bytes_atomic(self.output / MANIFEST_CSV, buffer.getvalue().encode())
        document = {
            "tumorseg_version": __version__,
            "complete": final,
            "cases_total": len(self._order),
            "counts": {
                "ok": sum(o.status == "ok" for o in outcomes),
                "failed": sum(o.status != "ok" for o in outcomes),
                "reused": sum(o.reused for o in outcomes),
                "pending": len(self._order) - len(outcomes),
            },
            "seconds": None if seconds is None else round(seconds, 2),
            # Share of the wall time the network ran: what --workers is there to raise.
            "network_busy_fraction": None if not seconds else round(self._network_seconds / seconds, 3),
            "workers": self.workers,
            "worker_mode": self.worker_mode if self.workers else None,
            "model": {"name": self.spec.card.name, "version": self.spec.card.version,
                      "weights_sha256": self.spec.model_sha256},
            "config_sha256": self.fingerprint["config_sha256"],
            "configuration": to_dict(self.spec.config),
            "cases": rows,
        }
        write_bytes_atomic(self.output / MANIFEST_JSON, (json.dumps(document, indent=2) + "\n").encode())


# -- steps, module-level so worker processes can run them ------------------------------------------
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


def _logger_levels() -> dict[str, int]:
    return {name: logging.getLogger(name).level for name in ("",) + STAGE_LOGGERS}


#: The worker's own model, when workers run whole cases (CPU device).
_WORKER_SEGMENTER: Segmenter | None = None


def _init_worker(levels: dict[str, int], model_dir: str | None, threads: int, config: PipelineConfig) -> None:
    import torch

    global _WORKER_SEGMENTER
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


def _read_and_prepare(spec: PipelineSpec, case: BatchCase, fingerprint: str
                      ) -> tuple[PreparedScan, float, str] | CaseOutcome:
    start = time.perf_counter()
    try:
        prepared = spec.read_and_prepare(case.inputs)
    except Exception as e:
        return _failure(case, e)
    return prepared, time.perf_counter() - start, fingerprint


def _run_case(spec: PipelineSpec, case: BatchCase, fingerprint: str, case_dir: str, output_root: str,
              batch_fingerprint: dict[str, str]) -> CaseOutcome:
    """One whole case in a worker that holds its own model (see ``_run_whole_cases``)."""
    assert _WORKER_SEGMENTER is not None
    prepared = _read_and_prepare(spec, case, fingerprint)
    if isinstance(prepared, CaseOutcome):
        return prepared
    prepared_scan, read_seconds, _ = prepared
    try:
        probs, infer_seconds = _WORKER_SEGMENTER.infer(prepared_scan)
    except Exception as e:
        return _failure(case, e)
    return _finish_and_write(_Finish(spec, case, prepared_scan, probs, infer_seconds, read_seconds, fingerprint,
                                     case_dir, output_root, batch_fingerprint))


def _prepare_shared(spec: PipelineSpec, case: BatchCase, fingerprint: str, prefix: str):
    """``_read_and_prepare`` for a pipelined batch: the network input goes back shared, as a
    fourth item."""
    prepared = _read_and_prepare(spec, case, fingerprint)
    if isinstance(prepared, CaseOutcome):
        return prepared
    prepared_scan, read_seconds, fingerprint = prepared
    image = share(prepared_scan.image, prefix)
    prepared_scan.image = None
    return prepared_scan, read_seconds, fingerprint, image


def _release_prepared(future: Future) -> None:
    """Free the shared network input of a prepared case that will not be run from it."""
    if future.done() and not future.cancelled() and future.exception() is None:
        result = future.result()
        if isinstance(result, tuple):
            release(result[-1])


class _Finish(NamedTuple):
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


class _Finishing(NamedTuple):
    """A case being finished by a worker, and the shared block its probabilities are in."""

    case: BatchCase
    fingerprint: str
    future: Future
    probs: Any


def _finish_shared(job: _Finish) -> CaseOutcome:
    """``_finish_and_write`` in a worker, on probabilities that came through shared memory."""
    return _finish_and_write(job._replace(probs=take(job.probs)))


def _finish_and_write(job: _Finish) -> CaseOutcome:
    start = time.perf_counter()
    spec, case, fingerprint = job.spec, job.case, job.fingerprint
    case_path, root = Path(job.case_dir), Path(job.output_root)
    try:
        result = spec.finish(job.prepared, job.probs, job.infer_seconds)
        paths = write_outputs(result, spec, case_path)
    except Exception as e:
        return _failure(case, e)
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
        record = {
            "fingerprint": {**job.batch_fingerprint, "inputs_sha256": fingerprint},
            # Relative to the case folder (registered/<sequence>.nii.gz sits one level down).
            "outputs": {name: {"file": p.relative_to(case_path).as_posix(), "sha256": sha256_file(p)}
                        for name, p in paths.items()},
            # Not the source path: case folders are what gets shared, and with --hashed-ids the
            # input folders are named after patients (the manifest keeps the mapping).
            "outcome": {k: v for k, v in outcome.__dict__.items() if k != "source"},
        }
        # Written last: its presence says every output above is complete.
        write_bytes_atomic(case_path / CASE_RECORD, (json.dumps(record, indent=2) + "\n").encode())
    except Exception as e:  # e.g. a full disk
        return _failure(case, e)
    return outcome


def _failure(case: BatchCase, error: BaseException) -> CaseOutcome:
    if isinstance(error, TumorsegError):
        code, kind, message = error.exit_code, error.code, str(error)
    elif isinstance(error, MemoryError):
        code, kind, message = 1, "memory", "out of memory"
    else:  # a bug or an environment problem: keep the type, and the traceback in the log
        log.debug("%s: %s", case.case_id, "".join(traceback.format_exception(error)))
        code, kind, message = 1, "internal", f"{type(error).__name__}: {error}"
    return CaseOutcome(case_id=case.case_id, source=case.source, status="failed", error_code=code,
                       error_kind=kind, error_message=message)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@contextlib.contextmanager
def _exclusive_output(output: Path, shm_prefix: str) -> Iterator[None]:
    """Hold ``OUT/.batch.lock`` for the batch, or refuse when another batch holds it.

    The kernel drops an flock when its holder dies, even by SIGKILL, so a lock is never stale.
    The file keeps the holder's shared memory prefix: the next batch to get the lock removes
    the blocks a killed one left in /dev/shm (about 143 MB each), and the temporaries of its
    manifest. Without a lock (a file system that has none) nothing is removed: another batch
    may be running.
    """
    try:
        output.mkdir(parents=True, exist_ok=True)
        fd = os.open(output / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot write into the output folder ({e.strerror})", output) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise ConfigError("another tumorseg batch is writing into this folder; let it finish, "
                              "or give this one another -o", output) from None
        except OSError as e:  # e.g. ENOLCK on some network shares: run unguarded
            log.warning("cannot lock %s (%s): nothing stops a second batch into this folder",
                        output / LOCK_FILE, e.strerror)
            locked = False
        if locked:
            previous = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            pid = prefix_pid(previous)
            if pid is not None and not _process_alive(pid):
                left = remove_leftovers(previous)
                if left:
                    log.info("removed %d shared memory blocks left by a killed batch", left)
            _remove_stale_partials(output)
            os.ftruncate(fd, 0)
            os.pwrite(fd, shm_prefix.encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (a copied folder's lock file may name a live batch)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    return True


def _retract_previous_outputs(case_dir: Path) -> None:
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


def _remove_stale_partials(case_dir: Path) -> None:
    """Temporary files left by a killed run (see :mod:`tumorseg.atomic`)."""
    if case_dir.is_dir():
        for stale in case_dir.glob(".*.partial*"):
            stale.unlink(missing_ok=True)
