"""``tumorseg batch --ray`` on a real local Ray cluster of two nodes (a head and a node joining it,
each with one CPU, on 127.0.0.1 with this test's own ports), stopped at the end."""
from __future__ import annotations

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
from test_batch import batch_model, manifest, phantom_case, run_batch  # noqa: F401 - batch_model is a fixture

pytest.importorskip("ray", reason="the cluster runner needs Ray (pip install 'tumorseg[cluster]'; the test extra has it)")

RAY = str(Path(sys.executable).parent / "ray")


def _ray(*args: str, env: dict) -> None:
    subprocess.run([RAY, *args], env=env, check=True, capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """The head's address and the joined node's raylet port (to find and kill it)."""
    base = 20000 + (os.getpid() % 200) * 50  # this test's own ports
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    _ray("start", "--head", f"--port={base}", f"--temp-dir={temp}", "--include-dashboard=false",
         f"--node-manager-port={base + 1}", f"--object-manager-port={base + 2}",
         f"--dashboard-agent-listen-port={base + 4}", f"--dashboard-agent-grpc-port={base + 5}",
         f"--runtime-env-agent-port={base + 6}", f"--metrics-export-port={base + 7}",
         f"--min-worker-port={base + 10}", f"--max-worker-port={base + 29}", *common, env=env)
    try:
        _ray("start", f"--address=127.0.0.1:{base}", f"--node-manager-port={base + 31}",
             f"--object-manager-port={base + 32}", f"--dashboard-agent-listen-port={base + 34}",
             f"--dashboard-agent-grpc-port={base + 35}", f"--runtime-env-agent-port={base + 36}",
             f"--metrics-export-port={base + 37}", f"--min-worker-port={base + 38}", f"--max-worker-port={base + 49}",
             *common, env=env)
        yield f"127.0.0.1:{base}", base + 31
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


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
    print(f"node killed mid-batch: {len(done)} of 8 cases done, {8 - len(done)} failed with a reason")
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
