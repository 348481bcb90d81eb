"""A batch on a Ray cluster.

Per case, three steps chained in Ray: a task reads and prepares the case (CPU), an actor runs the
network (the model loaded once per actor: one per GPU, or per CPU worker where there is no GPU),
and a task finishes and writes it (CPU). The prepared network input and the network's output travel
through Ray's object store, never through files. The steps are those of the local batch
(:mod:`tumorseg.batch.steps`), and what is written, where, and when a rerun reuses it are the local
batch's (:mod:`tumorseg.batch.records`, :mod:`tumorseg.batch.manifest`): a case's outputs are
written atomically and its record last, so a Ray run and a local run over the same input give the
same label maps and reports.

Faults: Ray retries a task whose worker or node died (``max_retries``) and restarts a dead actor
(``max_restarts``), and the driver replaces an actor whose restarts are spent; a case whose steps still fail for the cluster's sake (a worker killed, a node
lost) is run again from the start up to ``attempts`` times, then recorded as failed with the
reason. A case that fails on its own (a bad input) is recorded at once, as locally. Ctrl-C stops
starting cases and finishes those in flight (a second Ctrl-C stops at once); the manifest and
records say what was done, and a rerun resumes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import secrets
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..batch.cases import BatchCase
from ..batch.records import CaseOutcome, check_case, failure
from ..batch.runner import BatchRunner
from ..batch.steps import Finish, finish_and_write, read_and_prepare
from ..errors import ConfigError
from ..pipeline import PipelineSpec, Segmenter
from ..stages.infer import native_bf16_cpu

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'tumorseg[cluster]' (Ray)"
#: How often a case is started again after the cluster lost it (a worker or node died).
ATTEMPTS = 3
#: Seconds a lost case waits, times its attempt, before it is started again.
RETRY_DELAY_S = 3.0
#: Seconds an actor that lost a case is given no new one (while Ray restarts it elsewhere).
ACTOR_REST_S = 20.0
#: How long a node may take to run the output folder check.
CHECK_WAIT_S = 120
#: Seconds to wait for the head's port to answer before ``ray.init`` (which retries for minutes).
REACH_WAIT_S = 10.0


def require_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


# -- the steps as Ray runs them --------------------------------------------------------------------

def _prepare(spec: PipelineSpec, case: BatchCase, case_dir: str, check: tuple[dict[str, str], bool, str]):
    """(network input, the rest) or (None, CaseOutcome): two objects, so that the finishing task
    does not fetch the network input again. The case is checked here first (its inputs hashed,
    a previous run's outputs reused), on the node that reads the inputs anyway."""
    from .. import logredact

    logredact.install()  # this worker's log too: pydicom quotes header values in its warnings
    batch_fingerprint, force, output_root = check
    outcome, fingerprint = check_case(case, Path(case_dir), batch_fingerprint, force, exclude=Path(output_root))
    if outcome is not None:
        return None, outcome
    # Ray gives this task no GPU, whatever the driver has: brain extraction runs on the node's CPU.
    spec = dataclasses.replace(spec, device="cpu", precision="bf16" if native_bf16_cpu() else "fp32")
    prepared = read_and_prepare(spec, case, fingerprint)
    if isinstance(prepared, CaseOutcome):
        return None, prepared
    image, prepared.scan.image = prepared.scan.image, None
    return image, prepared


def _finish(spec: PipelineSpec, case: BatchCase, rest, inferred, case_dir: str, output_root: str,
            batch_fingerprint: dict[str, str]) -> CaseOutcome:
    from .. import logredact

    logredact.install()
    if isinstance(rest, CaseOutcome):
        return rest
    if isinstance(inferred, CaseOutcome):
        return inferred
    probs, infer_seconds, device, precision = inferred
    spec = dataclasses.replace(spec, device=device, precision=precision)  # the report names the actor's
    return finish_and_write(Finish(spec, case, rest.scan, probs, infer_seconds, rest.read_seconds, rest.fingerprint,
                                   case_dir, output_root, batch_fingerprint))


class _InputRebuilt(RuntimeError):
    """Raised by the actor for a network input Ray rebuilt without its scan: the driver starts the
    case again, as for a case the cluster lost (it is not the case's own error)."""


class _Inference:
    """A Ray actor holding one loaded model (its weights' checksum verified again where it runs)."""

    def __init__(self, model_dir: str, config, threads: int) -> None:
        import torch

        from .. import logredact
        from ..heap import keep_freed_heap_memory

        torch.set_num_threads(threads)
        keep_freed_heap_memory()
        logredact.install()
        self.segmenter = Segmenter(model_dir, config)

    def ready(self) -> bool:
        """Called once before any case: the model loaded (an error loading it is raised here)."""
        return True

    def infer(self, case: BatchCase, image, rest):
        if isinstance(rest, CaseOutcome):
            return rest
        if image is None:
            # Ray rebuilt the network input lost with a node by running the preparing task again,
            # which found the case's outputs written by the first attempt: the pair no longer
            # matches. Raised, not returned: the driver starts the case again, and it is reused.
            raise _InputRebuilt(f"{case.case_id}: the network input was rebuilt without the case's scan")
        # A copy: Ray may run this again in this process with the same argument objects (when it
        # rebuilds an output lost with a node), and inferring empties the scan's image.
        scan = dataclasses.replace(rest[0], image=image)
        try:
            return (*self.segmenter.infer(scan), self.segmenter.spec.device, self.segmenter.spec.precision)
        except Exception as e:  # e.g. out of memory on the device: this case fails, the batch goes on
            return failure(case, e)


class _Flight:
    """The cases of a Ray batch: waiting, in flight (two per actor), and lost ones waiting to be
    started again. A lost case waits a little (a node's loss takes Ray seconds to notice, an actor
    seconds to restart) and avoids, for a while, the actor it was sent to."""

    def __init__(self, todo: list[tuple[BatchCase, str | None]], actors: int) -> None:
        self.pending = deque((case, 1) for case, _ in todo)
        self.running: dict[Any, tuple[BatchCase, int, int]] = {}  # ref -> case, attempt, actor
        self.later: list[tuple[float, BatchCase, int]] = []  # start time, case, attempt
        self.actors = actors
        self._next = 0
        self._resting: dict[int, float] = {}  # actor -> until when it is avoided

    def to_start(self) -> Iterator[tuple[BatchCase, int, int]]:
        """(case, attempt, actor) for each case to start now."""
        now = time.monotonic()
        self.pending.extendleft((case, attempt) for when, case, attempt in reversed(self.later) if when <= now)
        self.later = [entry for entry in self.later if entry[0] > now]
        while self.pending and len(self.running) < 2 * self.actors:
            case, attempt = self.pending.popleft()
            yield case, attempt, self._actor(now)

    def lost(self, case: BatchCase, attempt: int, actor: int) -> None:
        now = time.monotonic()
        self._resting[actor] = now + ACTOR_REST_S
        self.later.append((now + RETRY_DELAY_S * attempt, case, attempt + 1))

    def _actor(self, now: float) -> int:
        for step in range(self.actors):
            actor = (self._next + step) % self.actors
            if self._resting.get(actor, 0.0) <= now:
                break
        else:
            actor = self._next % self.actors  # all resting: round robin
        self._next = actor + 1
        return actor


def _can_read(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


# -- the driver -------------------------------------------------------------------------------------

class RayBatchRunner(BatchRunner):
    """:class:`BatchRunner` whose cases run on a Ray cluster (``address``: ``auto`` for a running
    local cluster, or ``HOST:PORT`` of its head)."""

    def __init__(self, segmenter: Segmenter, output: Path, address: str, force: bool = False, progress: bool = True,
                 actors: int | None = None, attempts: int = ATTEMPTS, max_retries: int = 2) -> None:
        # Absolute: Ray's workers run in folders of their own, not the driver's.
        super().__init__(segmenter, Path(output).absolute(), workers=0, force=force, progress=progress)
        self.address = address
        self.actors = actors
        self.attempts = attempts
        self.max_retries = max_retries
        self._actor_count = 0

    def _check_cases(self, cases: list[BatchCase]) -> list[tuple[CaseOutcome | None, str | None]]:
        """Only what discovery found (a broken case fails, its earlier outputs retracted, as
        locally): the inputs are hashed, and earlier outputs reused, by each case's first task on
        the cluster. Hashing on the driver would read the whole archive through one machine
        before the first case starts."""
        return [check_case(case, self.case_dir(case.case_id), self.fingerprint) if case.problem is not None
                else (None, None) for case in cases]

    def _run_info(self) -> dict[str, Any]:
        return {"workers": self._actor_count, "worker_mode": "ray", "ray_address": self.address}

    def run(self, cases: list[BatchCase]):
        """The local batch's run, connected to the cluster first: an address that cannot be
        reached is refused before the output folder's manifest is touched."""
        ray = require_ray()
        connect = not ray.is_initialized()
        if connect:
            _check_reachable(self.address)
            try:
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ConfigError(f"cannot connect to the Ray cluster at {self.address}: {e}") from None
        try:
            return super().run(cases)
        finally:
            if connect:  # a driver still connected would be ended when the cluster stops
                ray.shutdown()

    def _schedule(self, todo: list[tuple[BatchCase, str]], bar) -> None:
        self._run_on_ray(require_ray(), todo, bar)

    def _run_on_ray(self, ray, todo: list[tuple[BatchCase, str]], bar) -> None:
        self._check_shared_output(ray)
        if not todo:
            return
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = self.actors or gpus or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._actor_count = count
        # An actor reserves its GPU, but no CPU: on a CPU cluster it shares the cores with the
        # preparing and finishing tasks (one thread each). Reserving CPUs for actors deadlocks a
        # cluster that lost a node: the restarted actors take the cores the tasks wait for.
        actor_options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_cpus": 0}
        Actor = ray.remote(max_restarts=self.max_retries, max_task_retries=self.max_retries)(_Inference)
        model_dir = str(self.segmenter.model.directory.absolute())
        self._new_actor = lambda: Actor.options(**actor_options, scheduling_strategy="SPREAD").remote(
            model_dir, self.spec.config, 1 if not gpus else 4)
        actors = self._actors = [self._new_actor() for _ in range(count)]
        try:
            ray.get([actor.ready.remote() for actor in actors])
        except ray.exceptions.RayError as e:  # the same model and settings load on the driver
            raise ConfigError(f"the model could not be loaded on the cluster ({_last_line(e)}): every node needs the "
                              "model folder at the same path, and the same tumorseg") from None
        prepare = ray.remote(num_cpus=0.5, num_returns=2, max_retries=self.max_retries)(_prepare)
        finish = ray.remote(num_cpus=0.5, max_retries=self.max_retries)(_finish)
        spec = ray.put(self.spec)
        log.info("%d cases go to the cluster, which skips those done before", len(todo))
        check = ray.put((self.fingerprint, self.force, str(self.output)))
        flight = _Flight(todo, count)
        interrupted = False
        while flight.pending or flight.running or flight.later:
            try:
                with _sigint_deferred():  # a case is never half submitted
                    for case, attempt, actor in flight.to_start():
                        case_dir = str(self.case_dir(case.case_id))
                        image, rest = prepare.remote(spec, case, case_dir, check)
                        inferred = actors[actor].infer.remote(case, image, rest)
                        done = finish.remote(spec, case, rest, inferred, case_dir, str(self.output), self.fingerprint)
                        flight.running[done] = (case, attempt, actor)
                ready, _ = ray.wait(list(flight.running), num_returns=1, timeout=1.0) if flight.running else ([], [])
                if not ready and not flight.running:
                    time.sleep(1.0)  # only cases waiting to be started again
                with _sigint_deferred():  # nor half recorded
                    for ref in ready:
                        self._collect(ray, ref, flight, bar, retry=not interrupted)
            except KeyboardInterrupt:
                if interrupted:
                    raise
                # No ray.cancel: it races with completing tasks and can abort the driver inside
                # Ray's core (ray-project/ray#54846). The cases in flight are finished instead.
                interrupted = True
                flight.pending.clear()
                flight.later.clear()
                log.warning("interrupted: finishing the %d cases in flight (Ctrl-C again to stop at once; "
                            "the rerun resumes either way)", len(flight.running))
        if interrupted:
            raise KeyboardInterrupt

    def _collect(self, ray, ref, flight: _Flight, bar, retry: bool) -> None:
        case, attempt, actor = flight.running.pop(ref)
        try:
            outcome = ray.get(ref)
        except Exception as e:
            outcome = self._lost(ray, e, case, attempt, actor, flight, retry)
            if outcome is None:
                return
        if not outcome.reused:
            self._network_seconds += outcome.timings_s.get("infer", 0.0)
            for warning in outcome.warnings:  # the workers' logs stay on their nodes
                log.warning("%s: %s", case.case_id, warning)
        self._record(outcome, bar)

    def _lost(self, ray, error: Exception, case: BatchCase, attempt: int, actor: int, flight: _Flight,
              retry: bool) -> CaseOutcome | None:
        """The outcome of a case whose steps raised: its own error (a step's bug) is recorded at
        once; a loss to the cluster (a worker, actor or node died) starts it again, up to
        ``attempts`` times (None: started again, or left to the rerun after Ctrl-C)."""
        cause = getattr(error, "cause", None) if isinstance(error, ray.exceptions.RayTaskError) else None
        if cause is not None and not isinstance(cause, (ray.exceptions.RayError, _InputRebuilt)):
            return failure(case, cause)
        if isinstance(error, ray.exceptions.ActorDiedError):  # its restarts spent: a new one in its place
            with contextlib.suppress(Exception):
                ray.kill(self._actors[actor], no_restart=True)
            self._actors[actor] = self._new_actor()
        if not retry:  # after Ctrl-C: not done, and not failed either; the rerun runs it
            log.info("%s: lost on the cluster while stopping", case.case_id)
            return None
        if attempt < self.attempts:
            log.warning("%s: lost on the cluster (%s); starting it again (attempt %d of %d)",
                        case.case_id, type(error).__name__, attempt + 1, self.attempts)
            flight.lost(case, attempt, actor)
            return None
        return failure(case, RuntimeError(f"lost on the cluster {attempt} times ({type(error).__name__}: "
                                          f"{_first_line(error)})"))

    def _check_shared_output(self, ray) -> None:
        """Every node must see OUT: a marker written here is read back by a task on each node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = secrets.token_hex(16)
        marker = self.output / f".ray-check-{token[:8]}"
        marker.write_text(token)
        try:
            check = ray.remote(num_cpus=0)(_can_read)
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(str(marker.resolve()), token) for n in nodes]
            start = time.monotonic()
            blind = [n["NodeManagerAddress"] for n, ref in zip(nodes, refs) if _sees(ray, ref, n) is False]
            log.info("%d Ray nodes checked for the output folder in %.1f s", len(nodes), time.monotonic() - start)
        finally:
            marker.unlink(missing_ok=True)
        if blind:
            raise ConfigError(f"the output folder is not shared with every Ray node: {', '.join(blind)} cannot read "
                              "it; give -o a path on storage every node mounts at the same path", self.output)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Ctrl-C held back while the block runs, and raised (KeyboardInterrupt) once it has ended.
    (Blocking the signal would not do: any of Ray's threads may receive it.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _sees(ray, ref, node: dict) -> bool | None:
    """Whether the node read the marker; None for a node that has gone since it was listed (the
    cluster notices a lost node with a delay), which runs nothing."""
    try:
        return ray.get(ref, timeout=CHECK_WAIT_S)
    except ray.exceptions.TaskUnschedulableError:
        return None
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(f"Ray node {node['NodeManagerAddress']} did not run the output folder check within "
                          f"{CHECK_WAIT_S} s; is it overloaded or failing?") from None


def _check_reachable(address: str) -> None:
    """Refuse a HOST:PORT where nothing answers within seconds (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not host or not port.isdigit():
        return  # Ray's own forms: it says what is wrong with them
    try:
        socket.create_connection((host, int(port)), timeout=REACH_WAIT_S).close()
    except OSError as e:
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: nothing answers there "
                          f"({e.strerror or type(e).__name__}); is its head started (ray start --head)?") from None


def _lines(error: BaseException) -> list[str]:
    """Ray's text for an error, without its colours, in non-empty lines."""
    return [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]


def _last_line(error: BaseException) -> str:
    """The exception raised on the node, after its traceback."""
    lines = _lines(error)
    return lines[-1][:300] if lines else type(error).__name__


def _first_line(error: BaseException) -> str:
    lines = _lines(error)
    return lines[0][:200] if lines else ""
