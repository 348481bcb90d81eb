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
(``max_restarts``); a case whose steps still fail for the cluster's sake (a worker killed, a node
lost) is run again from the start up to ``attempts`` times, then recorded as failed with the
reason. A case that fails on its own (a bad input) is recorded at once, as locally. Ctrl-C cancels
what is in flight; the manifest and records say what was done, and a rerun resumes.
"""
from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from pathlib import Path
from typing import Any

from ..batch.cases import BatchCase
from ..batch.records import CaseOutcome, failure
from ..batch.runner import BatchRunner
from ..batch.steps import Finish, finish_and_write, read_and_prepare
from ..errors import ConfigError
from ..pipeline import PipelineSpec, Segmenter

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'tumorseg[cluster]' (Ray)"
#: How often a case is started again after the cluster lost it (a worker or node died).
ATTEMPTS = 3


def require_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


# -- the steps as Ray runs them --------------------------------------------------------------------

def _prepare(spec: PipelineSpec, case: BatchCase, fingerprint: str):
    """(network input, the rest) or (None, CaseOutcome): two objects, so that the finishing task
    does not fetch the network input again."""
    prepared = read_and_prepare(spec, case, fingerprint)
    if isinstance(prepared, CaseOutcome):
        return None, prepared
    scan, seconds, fingerprint = prepared
    image, scan.image = scan.image, None
    return image, (scan, seconds, fingerprint)


def _finish(spec: PipelineSpec, case: BatchCase, rest, inferred, case_dir: str, output_root: str,
            batch_fingerprint: dict[str, str]) -> CaseOutcome:
    if isinstance(rest, CaseOutcome):
        return rest
    if isinstance(inferred, CaseOutcome):
        return inferred
    scan, read_seconds, fingerprint = rest
    probs, infer_seconds = inferred
    return finish_and_write(Finish(spec, case, scan, probs, infer_seconds, read_seconds, fingerprint, case_dir,
                                   output_root, batch_fingerprint))


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

    def infer(self, case: BatchCase, image, rest):
        if isinstance(rest, CaseOutcome):
            return rest
        scan = rest[0]
        scan.image = image
        try:
            return self.segmenter.infer(scan)
        except Exception as e:  # e.g. out of memory on the device: this case fails, the batch goes on
            return failure(case, e)


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
        super().__init__(segmenter, output, workers=0, force=force, progress=progress)
        self.address = address
        self.actors = actors
        self.attempts = attempts
        self.max_retries = max_retries
        self._actor_count = 0

    def _run_info(self) -> dict[str, Any]:
        return {"workers": self._actor_count, "worker_mode": "ray", "ray_address": self.address}

    def _schedule(self, todo: list[tuple[BatchCase, str]], bar) -> None:
        ray = require_ray()
        connect = not ray.is_initialized()
        if connect:
            try:
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ConfigError(f"cannot connect to the Ray cluster at {self.address}: {e}") from None
        try:
            self._run_on_ray(ray, todo, bar)
        finally:
            if connect:  # a driver still connected would be ended when the cluster stops
                ray.shutdown()

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
        actors = [Actor.options(**actor_options, scheduling_strategy="SPREAD").remote(str(self.segmenter.model.directory), self.spec.config,
                                                         1 if not gpus else 4) for _ in range(count)]
        prepare = ray.remote(num_cpus=0.5, num_returns=2, max_retries=self.max_retries)(_prepare)
        finish = ray.remote(num_cpus=0.5, max_retries=self.max_retries)(_finish)
        spec = ray.put(self.spec)
        pending = deque((case, fingerprint, 1) for case, fingerprint in todo)
        running: dict[Any, tuple[BatchCase, str, int]] = {}
        next_actor = 0
        try:
            while pending or running:
                while pending and len(running) < 2 * count:
                    case, fingerprint, attempt = pending.popleft()
                    image, rest = prepare.remote(spec, case, fingerprint)
                    inferred = actors[next_actor % count].infer.remote(case, image, rest)
                    next_actor += 1
                    done = finish.remote(spec, case, rest, inferred, str(self.case_dir(case.case_id)),
                                         str(self.output), self.fingerprint)
                    running[done] = (case, fingerprint, attempt)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=5.0)
                for ref in ready:
                    case, fingerprint, attempt = running.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as e:  # the cluster lost the case: a worker, actor or node died
                        if attempt < self.attempts:
                            log.warning("%s: lost on the cluster (%s); starting it again (attempt %d of %d)",
                                        case.case_id, type(e).__name__, attempt + 1, self.attempts)
                            pending.append((case, fingerprint, attempt + 1))
                            continue
                        outcome = failure(case, RuntimeError(
                            f"lost on the cluster {attempt} times ({type(e).__name__}: {_first_line(e)})"))
                    self._network_seconds += outcome.timings_s.get("infer", 0.0)
                    self._record(outcome, bar)
        except KeyboardInterrupt:
            for ref in running:
                ray.cancel(ref)
            raise

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
            blind = [n["NodeManagerAddress"] for n, seen in zip(nodes, ray.get(refs, timeout=120)) if not seen]
            log.info("%d Ray nodes see the output folder (checked in %.1f s)", len(nodes) - len(blind),
                     time.monotonic() - start)
        finally:
            marker.unlink(missing_ok=True)
        if blind:
            raise ConfigError(f"the output folder is not shared with every Ray node: {', '.join(blind)} cannot read "
                              "it; give -o a path on storage every node mounts at the same path", self.output)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""
