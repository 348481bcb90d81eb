"""``tumorseg batch`` on this machine: every case of a folder through the pipeline, without losing work.

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

Modules: :mod:`.layout` (what goes where under OUT), :mod:`.records` (outcomes, case records,
reuse), :mod:`.manifest` (manifest files, the lock), :mod:`.steps` (what a worker runs), this one
(the scheduling on one machine: inline, whole cases per worker, or pipelined around the network).
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, NamedTuple

from .. import __version__
from ..configio import to_dict
from ..model import CARD_NAME as MODEL_CARD_FILE, sha256_file
from ..pipeline import Segmenter
from .cases import BatchCase
from .layout import CASES_DIR, RESULTS_VERSION
from .manifest import exclusive_output, write_manifest
from .records import BatchSummary, CaseOutcome, check_case, config_sha256, failure
from .shared import batch_prefix, release, remove_leftovers, share, take
from .steps import (Finish, finish_and_write, finish_shared, init_worker, logger_levels, prepare_shared, read_and_prepare,
                    release_prepared, run_case)

log = logging.getLogger(__name__)


#: A worker died while the case was in its pool (the case may be innocent: see ``_run_alone``).
_DIED = object()
#: Pools (or lone retries) that may die in a row, no case finishing in between, before the batch
#: stops starting workers: a worker that cannot even start would otherwise be respawned per case.
MAX_DEATHS_IN_A_ROW = 3
#: Threads that checksum the inputs before a batch starts.
CHECK_THREADS = 4


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
            return failure(case, e)
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
            "brain_extractor": self.spec.brain_extractor,
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
        with exclusive_output(self.output, self._shm_prefix):
            bar = self._progress_bar(len(cases))
            try:
                todo = []
                for case, (outcome, fingerprint) in zip(cases, self._check_cases(cases)):
                    if outcome is not None:
                        self._record(outcome, bar, write=False)
                    else:
                        todo.append((case, fingerprint))
                self._write_manifest(final=False)  # once for all reused cases, not once each
                if todo:
                    log.info("%d of %d cases to run (%d reused or failed at discovery)", len(todo), len(cases),
                             len(cases) - len(todo))
                self._schedule(todo, bar)
            finally:
                if bar is not None:
                    bar.close()
            outcomes = [self._outcomes[c] for c in self._order if c in self._outcomes]
            summary = BatchSummary(outcomes, time.perf_counter() - start, self._network_seconds)
            self._write_manifest(final=True, seconds=summary.seconds)
        return summary

    def _schedule(self, todo: list[tuple[BatchCase, str]], bar) -> None:
        """Run the cases that are not reused; another scheduler (tumorseg.cluster) overrides this."""
        if self.workers == 0:
            self._run_inline(todo, bar)
        elif self.worker_mode == "whole_cases":
            self._run_whole_cases(todo, bar)
        else:
            self._run_pipelined(todo, bar)

    def _check_cases(self, cases: list[BatchCase]) -> list[tuple[CaseOutcome | None, str | None]]:
        """Per case, the outcome without running it (broken at discovery, or done before) and the
        checksum of its inputs; another scheduler (tumorseg.cluster) may leave the checksum (None)
        to where the case runs. Threads: hashing releases the GIL, and on network storage
        reading one file after the other would leave the bandwidth idle."""
        with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
            return list(pool.map(lambda case: check_case(case, self.case_dir(case.case_id), self.fingerprint,
                                                         self.force, exclude=self.output), cases))

    def case_dir(self, case_id: str) -> Path:
        return self.output / CASES_DIR / case_id

    # -- running: inline ----------------------------------------------------------------------
    def _run_inline(self, cases: list[tuple[BatchCase, str]], bar) -> None:
        for case, fingerprint in cases:
            job = self._infer(case, read_and_prepare(self.spec, case, fingerprint), bar)
            if job is not None:
                self._record(finish_and_write(job), bar)

    def _infer(self, case: BatchCase, prepared, bar) -> Finish | None:
        """Run the network on a prepared case; what its finishing step needs, or None when the
        case failed (and was recorded)."""
        if isinstance(prepared, CaseOutcome):
            self._record(prepared, bar)
            return None
        try:
            probs, infer_seconds = self.segmenter.infer(prepared.scan)
            self._network_seconds += infer_seconds
        except Exception as e:  # e.g. out of memory on the device: this case fails, the batch goes on
            self._record(failure(case, e), bar)
            return None
        return Finish(self.spec, case, prepared.scan, probs, infer_seconds, prepared.read_seconds,
                      prepared.fingerprint, str(self.case_dir(case.case_id)), str(self.output), self.fingerprint)

    # -- running: worker processes --------------------------------------------------------------
    def _run_pipelined(self, cases: list[tuple[BatchCase, str]], bar) -> None:
        """Workers prepare up to ``workers + 1`` cases ahead and finish behind the network; the
        network's input and output travel through shared memory (see :mod:`.shared`)."""
        queue = deque(cases)
        preparing: deque[_Preparing] = deque()
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
                    for item in preparing:
                        release_prepared(item.future)
                        queue.appendleft((item.case, item.fingerprint))
                    preparing.clear()
                while queue and len(preparing) < lookahead and not pool.broken:
                    case, fingerprint = queue.popleft()
                    future = pool.submit(prepare_shared, self.spec, case, fingerprint, prefix)
                    if future is None:
                        queue.appendleft((case, fingerprint))
                    else:
                        preparing.append(_Preparing(case, fingerprint, future))
                if pool.broken:
                    continue
                case, fingerprint, future = preparing.popleft()
                prepared = pool.result(case, future)
                if prepared is _DIED:
                    suspects.append((case, fingerprint))
                    continue
                if not isinstance(prepared, CaseOutcome):
                    try:
                        prepared.prepared.scan.image = take(prepared.image)
                    except OSError as e:
                        self._record(failure(case, e), bar)
                        continue
                    prepared = prepared.prepared
                job = self._infer(case, prepared, bar)
                if job is not None:
                    job = job._replace(probs=share(job.probs, prefix))
                    future = pool.submit(finish_shared, job)
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
            self._fail_all([*queue, *((item.case, item.fingerprint) for item in preparing),
                            *((item.case, item.fingerprint) for item in finishing), *suspects], e, bar)
            suspects = []
        finally:
            pool.shutdown()
            for item in preparing:
                release_prepared(item.future)
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
                    future = pool.submit(run_case, self.spec, case, fingerprint, str(self.case_dir(case.case_id)),
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
                future = pool.submit(run_case, self.spec, case, fingerprint, str(self.case_dir(case.case_id)),
                                     str(self.output), self.fingerprint)
                outcome = _DIED if future is None else pool.result(case, future)
            finally:
                pool.shutdown()
            deaths_in_a_row = deaths_in_a_row + 1 if outcome is _DIED else 0
            if outcome is _DIED:
                outcome = failure(case, RuntimeError("the worker process running this case alone died "
                                                      "(killed, or out of memory)"))
            self._network_seconds += outcome.timings_s.get("infer", 0.0)
            self._record(outcome, bar)

    def _fail_all(self, cases, error: BaseException, bar) -> None:
        for case, _ in cases:
            self._record(failure(case, error), bar)

    def _executor_factory(self, model_dir: str | None = None, threads: int = 1, workers: int | None = None
                          ) -> Callable[[], ProcessPoolExecutor]:
        # spawn: a fresh interpreter per worker, no forked copy of the main process' threads.
        return functools.partial(
            ProcessPoolExecutor, workers or self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker, initargs=(logger_levels(), model_dir, threads, self.spec.config))

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
        write_manifest(self.output, outcomes, len(self._order), self.fingerprint, final, {
            "seconds": None if seconds is None else round(seconds, 2),
            # Share of the wall time the network ran: what --workers is there to raise.
            "network_busy_fraction": None if not seconds else round(self._network_seconds / seconds, 3),
            **self._run_info(),
            "model": {"name": self.spec.card.name, "version": self.spec.card.version,
                      "weights_sha256": self.spec.model_sha256},
            "config_sha256": self.fingerprint["config_sha256"],
            "configuration": to_dict(self.spec.config),
        })

    def _run_info(self) -> dict[str, Any]:
        """The manifest's entries on how the cases ran."""
        return {"workers": self.workers, "worker_mode": self.worker_mode if self.workers else None}



class _Preparing(NamedTuple):
    """A case being read and prepared by a worker."""

    case: BatchCase
    fingerprint: str
    future: Future


class _Finishing(NamedTuple):
    """A case being finished by a worker, and the shared block its probabilities are in."""

    case: BatchCase
    fingerprint: str
    future: Future
    probs: Any


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
