"""``tumorseg batch --ray`` on a real local Ray cluster of two nodes (a head and a node joining it,
each with one CPU, on 127.0.0.1 with this test's own ports), stopped at the end."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import SHARED_DATA
from tumorseg.errors import SOME_CASES_FAILED
from test_batch import (assert_stopped_batch_resumes, batch_command, batch_model, manifest,  # noqa: F401 - a fixture
                        phantom_case, run_batch)

pytest.importorskip("ray", reason="the cluster runner needs Ray (pip install 'tumorseg[cluster]'; the test extra has it)")

RAY = str(Path(sys.executable).parent / "ray")
#: Each running test cluster's temporary folder (its logs), by its head's address.
TEMP_DIRS: dict[str, str] = {}


def _ray(*args: str, env: dict) -> None:
    subprocess.run([RAY, *args], env=env, check=True, capture_output=True, timeout=180)


@contextlib.contextmanager
def _cluster(base: int, joined: bool = True, gpus: int = 0):
    """A head (and a node joining it) of one CPU each on 127.0.0.1, on ports base to base + 49;
    ``gpus`` declared on the head (Ray takes the number as given: on this machine none are real).
    Yields the head's address and the joined node's raylet port (to find and kill it)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    try:
        _ray("start", "--head", f"--port={base}", f"--temp-dir={temp}", "--include-dashboard=false",
             f"--node-manager-port={base + 1}", f"--object-manager-port={base + 2}",
             f"--dashboard-agent-listen-port={base + 4}", f"--dashboard-agent-grpc-port={base + 5}",
             f"--runtime-env-agent-port={base + 6}", f"--metrics-export-port={base + 7}",
             f"--min-worker-port={base + 10}", f"--max-worker-port={base + 29}", f"--num-gpus={gpus}", *common,
             env=env)
        if joined:
            _ray("start", f"--address=127.0.0.1:{base}", f"--node-manager-port={base + 31}",
                 f"--object-manager-port={base + 32}", f"--dashboard-agent-listen-port={base + 34}",
                 f"--dashboard-agent-grpc-port={base + 35}", f"--runtime-env-agent-port={base + 36}",
                 f"--metrics-export-port={base + 37}", f"--min-worker-port={base + 38}",
                 f"--max-worker-port={base + 49}", "--num-gpus=0", *common, env=env)
        TEMP_DIRS[f"127.0.0.1:{base}"] = temp
        yield f"127.0.0.1:{base}", base + 31
    finally:
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _ports(offset: int = 0) -> int:
    return 20000 + offset + (os.getpid() % 200) * 50  # this test run's own ports


@pytest.fixture(scope="module")
def ray_cluster():
    with _cluster(_ports()) as cluster:
        yield cluster


def _stop_cluster(temp: str) -> None:
    """Stop this test's cluster only: its processes name its temporary folder, and the workers
    are their children. (``ray stop`` would stop every Ray cluster on the machine, a user's too.)"""
    rows = [line.split(None, 2) for line in subprocess.run(["ps", "-eww", "-o", "pid=,ppid=,args="],
                                                             capture_output=True, text=True).stdout.splitlines()]
    rows = [(int(row[0]), int(row[1]), row[2] if len(row) > 2 else "") for row in rows]
    ours = {pid for pid, _, args in rows if f"{temp}/" in args or f"={temp} " in f"{args} "}
    while more := {pid for pid, parent, _ in rows if parent in ours} - ours:
        ours |= more
    # Ray's gcs_server and autoscaler monitor outlive SIGTERM by more than 15 s: 5 s, then SIGKILL.
    for sig, grace_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 15)):
        for pid in ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_running(pid) for pid in ours):
            time.sleep(0.2)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def run_on_ray(*args: str) -> subprocess.CompletedProcess:
    """``tumorseg batch`` in its own process: a Ray driver is ended when its cluster stops, and
    the test process must not be one."""
    return subprocess.run([str(Path(sys.executable).parent / "tumorseg"), "batch", *args, "-q"], capture_output=True,
                          text=True, timeout=600)


def _cases(root: Path, count: int) -> Path:
    for n in range(count):
        phantom_case(root / f"p{n}", n)
    return root


def _labels_and_reports(out: Path) -> dict[str, tuple[bytes, dict]]:
    result = {}
    for case in sorted((out / "cases").iterdir()):
        report = json.loads((case / "report.json").read_text())
        report.pop("timings_s")
        result[case.name] = (np.asarray(nib.load(case / "segmentation.nii.gz").dataobj).tobytes(), report)
    return result


def test_with_gpus_one_actor_runs_per_gpu(tmp_path, batch_model):  # noqa: F811
    """The GPU path's scheduling (one actor per GPU, none per CPU), on a head that declares two
    GPUs; the actors find no CUDA here and run on the CPU. Before the module's cluster starts."""
    with _cluster(_ports(10000), joined=False, gpus=2) as (address, _):
        out = tmp_path / "out"
        result = run_on_ray(str(_cases(tmp_path / "in", 3)), "-o", str(out), "--model", str(batch_model),
                            "--ray", address)
    assert result.returncode == 0, result.stderr
    doc = manifest(out)
    assert doc["workers"] == 2 and doc["counts"]["ok"] == 3  # two GPUs, one CPU: two actors


def test_ray_batch_gives_the_local_batch_outputs(tmp_path, ray_cluster, batch_model):  # noqa: F811
    address, _ = ray_cluster
    root = _cases(tmp_path / "in", 3)
    real = SHARED_DATA / "brats2018-train" / "Brats18_2013_11_1"
    if real.is_dir():  # a real BraTS case beside the phantoms, where ../shared is present (it is in CI)
        shutil.copytree(real, root / "real")
    elif os.environ.get("CI"):
        pytest.fail("CI must have ../shared/data/brats2018-train")
    local = run_batch(str(root), "-o", str(tmp_path / "local"), "--model", str(batch_model))
    assert local.exit_code in (0, 8), local.output
    on_ray = run_on_ray(str(root), "-o", str(tmp_path / "ray"), "--model", str(batch_model), "--ray", address)
    assert on_ray.returncode == local.exit_code, on_ray.stderr
    ours, theirs = _labels_and_reports(tmp_path / "ray"), _labels_and_reports(tmp_path / "local")
    assert sorted(ours) == sorted(theirs) and len(ours) >= 3
    for case in ours:
        assert ours[case][0] == theirs[case][0], case  # label maps identical, byte for byte
        assert ours[case][1] == theirs[case][1], case  # reports identical but for the timings
    doc = manifest(tmp_path / "ray")
    assert doc["worker_mode"] == "ray" and doc["complete"]
    rerun = run_on_ray(str(root), "-o", str(tmp_path / "ray"), "--model", str(batch_model), "--ray", address)
    assert rerun.returncode == local.exit_code and manifest(tmp_path / "ray")["counts"]["reused"] == len(ours)


def test_relative_paths_reach_the_cluster_as_the_driver_means_them(tmp_path, ray_cluster, batch_model):  # noqa: F811
    """Ray's workers run in folders of their own: a relative -o wrote the outputs under the head's
    working folder (the manifest said done), and a relative input failed every case."""
    address, _ = ray_cluster
    _cases(tmp_path / "in", 2)
    (tmp_path / "model").symlink_to(batch_model)
    result = subprocess.run([str(Path(sys.executable).parent / "tumorseg"), "batch", "in", "-o", "out", "--model",
                             "model", "--ray", address, "-q"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "cases").iterdir()) == ["p0", "p1"]
    assert all((tmp_path / "out" / "cases" / c / "segmentation.nii.gz").is_file() for c in ("p0", "p1"))


def test_an_address_where_nothing_answers_is_refused_at_once_and_keeps_the_manifest(tmp_path, batch_model):  # noqa: F811
    """Ray retried such an address for about 14 minutes, after emptying the previous manifest."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"complete": true}')
    start = time.monotonic()
    result = run_on_ray(str(_cases(tmp_path / "in", 1)), "-o", str(out), "--model", str(batch_model),
                        "--ray", f"127.0.0.1:{_ports(20000) + 3}")
    assert result.returncode == 6 and "nothing answers there" in result.stderr, result.stderr
    assert time.monotonic() - start < 60
    assert (out / "manifest.json").read_text() == '{"complete": true}'


def test_header_values_stay_out_of_the_workers_logs(tmp_path, ray_cluster, batch_model):  # noqa: F811
    """The preparing task's worker logged pydicom's warning quoting a planted UID value: the
    local batch's workers redact their logs, Ray's did not."""
    import pydicom

    from mutants import CANARY, set_raw, small_real_series

    address, _ = ray_cluster
    series = small_real_series(tmp_path / "in" / "study" / "s1")
    for path in sorted(series.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        set_raw(ds, "FrameOfReferenceUID", CANARY.encode())
        ds.save_as(path)
    result = run_on_ray(str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(batch_model), "--ray", address)
    assert result.returncode == SOME_CASES_FAILED  # refused: a UID of digits and dots only
    logs = [p for p in Path(TEMP_DIRS[address]).rglob("*") if p.is_file() and p.suffix in (".err", ".out", ".log")]
    assert logs and not [p.name for p in logs if CANARY.encode() in p.read_bytes()]
    assert CANARY not in result.stdout + result.stderr


def test_a_case_broken_at_discovery_keeps_no_old_outputs_on_ray(tmp_path, ray_cluster, batch_model):  # noqa: F811
    address, _ = ray_cluster
    case = phantom_case(tmp_path / "in" / "a", 1)
    out = tmp_path / "out"
    assert run_on_ray(str(tmp_path / "in"), "-o", str(out), "--model", str(batch_model), "--ray", address).returncode == 0
    assert (out / "cases" / "a" / "segmentation.nii.gz").is_file()
    for n, image in enumerate(sorted(case.iterdir())):  # files no sequence can be read from the names of
        image.rename(case / f"scan{n}.nii.gz")
    rerun = run_on_ray(str(tmp_path / "in"), "-o", str(out), "--model", str(batch_model), "--ray", address)
    assert rerun.returncode == SOME_CASES_FAILED and manifest(out)["cases"][0]["status"] == "failed"
    assert sorted(p.name for p in (out / "cases" / "a").iterdir()) == []  # as the local batch: retracted


def test_ctrl_c_stops_a_ray_batch_cleanly_and_the_rerun_resumes(tmp_path, ray_cluster, batch_model):  # noqa: F811
    address, _ = ray_cluster
    out = tmp_path / "out"
    # 12 cases: the ones in flight (two per actor) are finished after Ctrl-C, and some must be left.
    done = assert_stopped_batch_resumes(batch_command(_cases(tmp_path / "in", 12), out, batch_model, "--ray", address),
                                        out, 12, signal.SIGINT)
    print(f"Ctrl-C on a Ray batch: {done} of 12 cases done before it ended, the rest by the rerun")


def _raylet_pids(port: int) -> list[int]:
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "raylet" in line and f"node_manager_port={port} " in line + " "]


def test_a_node_killed_mid_batch_loses_no_case(tmp_path, ray_cluster, batch_model):  # noqa: F811
    address, node_port = ray_cluster
    root = _cases(tmp_path / "in", 8)
    out = tmp_path / "out"
    batch = subprocess.Popen([str(Path(sys.executable).parent / "tumorseg"), "batch", str(root), "-o", str(out),
                              "--model", str(batch_model), "--ray", address, "-q"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill the joined node once the batch is under way
        if (out / "manifest.json").is_file() and manifest(out)["counts"]["ok"] >= 1:
            break
        time.sleep(0.5)
    pids = _raylet_pids(node_port)
    assert pids, "the joined node's raylet was not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    stdout, stderr = batch.communicate(timeout=600)
    assert batch.returncode in (0, 8), stderr
    doc = manifest(out)
    ids = [row["case_id"] for row in doc["cases"]]
    assert sorted(ids) == sorted(f"p{n}" for n in range(8)) and len(set(ids)) == len(ids)  # each exactly once
    for row in doc["cases"]:
        assert row["status"] == "ok" or row["error_message"], row  # done, or failed with the reason
    done = {row["case_id"] for row in doc["cases"] if row["status"] == "ok"}
    failed = [(row["case_id"], row["error_message"]) for row in doc["cases"] if row["status"] != "ok"]
    print(f"node killed mid-batch: {len(done)} of 8 cases done, {len(failed)} failed with a reason: {failed}")
    stamps = {c: (out / "cases" / c / "batch-case.json").stat().st_mtime_ns for c in done}
    rerun = run_on_ray(str(root), "-o", str(out), "--model", str(batch_model), "--ray", address)
    assert rerun.returncode == 0, rerun.stderr
    assert {c: (out / "cases" / c / "batch-case.json").stat().st_mtime_ns for c in done} == stamps  # nothing redone
    assert manifest(out)["counts"]["reused"] == len(done)


def test_without_ray_the_option_says_what_to_install(tmp_path, batch_model, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    result = run_batch(str(_cases(tmp_path / "in", 1)), "-o", str(tmp_path / "out"), "--model", str(batch_model),
                       "--ray", "auto")
    assert result.exit_code == 6 and "tumorseg[cluster]" in result.output


def test_a_network_input_rebuilt_without_its_scan_starts_the_case_again():
    """Ray rebuilds a network input lost with a node by preparing the case again; when an earlier
    attempt already wrote the case's outputs, that returns no input beside the scan that survived.
    The actor raises then, so the driver starts the case again (and reuses the outputs), instead of
    failing a case that was done (seen once in test_a_node_killed_mid_batch_loses_no_case)."""
    from tumorseg.batch.cases import BatchCase
    from tumorseg.cluster import ray_batch

    actor = object.__new__(ray_batch._Inference)  # no model: the check comes before the network
    with pytest.raises(RuntimeError, match="rebuilt without"):
        actor.infer(BatchCase("p3", None, "p3"), None, ("scan", 0.0, "fingerprint"))


def test_a_lost_case_waits_and_avoids_the_actor_that_lost_it(monkeypatch):
    from tumorseg.cluster import ray_batch

    clock = [1000.0]
    monkeypatch.setattr(ray_batch.time, "monotonic", lambda: clock[0])
    flight = ray_batch._Flight([("a", None), ("b", None), ("c", None)], actors=2)
    assert list(flight.to_start()) == [("a", 1, 0), ("b", 1, 1), ("c", 1, 0)]
    flight.lost("b", 1, 1)
    assert list(flight.to_start()) == []  # not at once: Ray needs a moment to notice a lost node
    clock[0] += ray_batch.RETRY_DELAY_S
    assert list(flight.to_start()) == [("b", 2, 0)]  # on the other actor
    flight.lost("b", 2, 0)
    clock[0] += 2 * ray_batch.RETRY_DELAY_S
    assert list(flight.to_start()) == [("b", 3, 1)]  # both resting: round robin
    clock[0] += ray_batch.ACTOR_REST_S
    flight.pending.extend([("d", 1), ("e", 1)])
    assert [actor for _, _, actor in flight.to_start()] == [0, 1]  # rested: both used again


def test_a_steps_own_error_is_recorded_at_once_and_a_dead_actor_is_replaced():
    """A case whose step raised (not the cluster's fault) was retried three times as 'lost on the
    cluster' and recorded without its cause; an actor whose restarts were spent was sent every
    remaining case, which all failed."""
    import ray

    from tumorseg.batch.cases import BatchCase
    from tumorseg.cluster import ray_batch

    runner = object.__new__(ray_batch.RayBatchRunner)
    runner.attempts = 3
    runner._actors, made = ["first", "second"], []
    runner._new_actor = lambda: made.append("new") or "new"
    killed = []
    fake_ray = type("FakeRay", (), {"exceptions": ray.exceptions, "kill": staticmethod(lambda a, no_restart: killed.append(a))})
    case = BatchCase("p1", None, "p1")
    flight = ray_batch._Flight([], actors=2)
    own = ray.exceptions.RayTaskError("_finish", "Traceback ...", ValueError("a step's own bug")).as_instanceof_cause()
    outcome = runner._lost(fake_ray, own, case, 1, 0, flight, retry=True)
    assert outcome.status == "failed" and "a step's own bug" in outcome.error_message and not flight.later
    rebuilt = ray.exceptions.RayTaskError("_finish", "Traceback ...", ray_batch._InputRebuilt("p1")).as_instanceof_cause()
    assert runner._lost(fake_ray, rebuilt, case, 1, 0, flight, retry=True) is None  # the actor's own signal to retry
    died = ray.exceptions.ActorDiedError()
    assert runner._lost(fake_ray, died, case, 1, 1, flight, retry=True) is None  # started again
    assert killed == ["second"] and runner._actors == ["first", "new"] and len(flight.later) == 2
    outcome = runner._lost(fake_ray, died, case, 3, 1, flight, retry=True)
    assert outcome.status == "failed" and "lost on the cluster 3 times" in outcome.error_message


def test_the_report_names_the_device_and_precision_the_actor_ran_on(tmp_path, batch_model):  # noqa: F811
    """The finishing task wrote the driver's device and precision into report.json: a driver on a
    CPU with bf16 recorded bf16 for actors that ran in fp32 (or on a GPU)."""
    from tumorseg.batch.cases import discover
    from tumorseg.batch.runner import BatchRunner
    from tumorseg.cluster import ray_batch
    from tumorseg.pipeline import Segmenter

    (case,) = discover(_cases(tmp_path / "in", 1))
    segmenter = Segmenter(str(batch_model))
    runner = BatchRunner(segmenter, tmp_path / "out")
    actor = object.__new__(ray_batch._Inference)
    actor.segmenter = segmenter
    case_dir = tmp_path / "out" / "cases" / case.case_id
    image, rest = ray_batch._prepare(segmenter.spec, case, str(case_dir), (runner.fingerprint, False, str(tmp_path / "out")))
    probs, seconds, device, precision = actor.infer(case, image, rest)
    assert (device, precision) == (segmenter.spec.device, segmenter.spec.precision)
    outcome = ray_batch._finish(segmenter.spec, case, rest, (probs, seconds, "cuda:1", "fp16"), str(case_dir),
                                str(tmp_path / "out"), runner.fingerprint)
    assert outcome.status == "ok", outcome.error_message
    report = json.loads((case_dir / "report.json").read_text())
    assert (report["device"], report["precision"]) == ("cuda:1", "fp16")


def test_brain_extraction_on_the_cluster_runs_on_the_preparing_nodes_cpu(tmp_path, batch_model, monkeypatch):  # noqa: F811
    """The preparing task ran HD-BET on the driver's device: a driver with a GPU sent it to "cuda"
    in a task Ray gives no GPU, so every skull-on case failed (or took a GPU no actor knew of)."""
    from tumorseg import hdbet
    from tumorseg.batch.cases import discover
    from tumorseg.batch.runner import BatchRunner
    from tumorseg.cluster import ray_batch
    from tumorseg.config import load_pipeline
    from tumorseg.pipeline import Segmenter

    asked = []

    class Extractor:
        name = "the whole head"

        def __init__(self, device="cpu", bf16=False):
            asked.append(device)

        def __call__(self, image, affine):
            return image > 0

    monkeypatch.setattr(hdbet, "available", lambda: True)
    monkeypatch.setattr(hdbet, "load_extractor", Extractor)
    (case,) = discover(_cases(tmp_path / "in", 1))
    segmenter = Segmenter(str(batch_model), load_pipeline("default").with_preprocess(brain_extraction="on"))
    runner = BatchRunner(segmenter, tmp_path / "out")
    on_a_gpu_driver = dataclasses.replace(segmenter.spec, device="cuda", precision="fp16")
    image, rest = ray_batch._prepare(on_a_gpu_driver, case, str(tmp_path / "out" / "cases" / case.case_id),
                                     (runner.fingerprint, False, str(tmp_path / "out")))
    assert image is not None, getattr(rest, "error_message", rest)
    assert asked == ["cpu"] and rest.scan.brain_mask is not None
