"""tumorseg batch: discovery, manifest, failures that do not stop the batch, reruns, kills, workers."""
from __future__ import annotations

import csv
import errno
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import brain_phantom, make_tiny_model, save_nifti, shared_data
from tumorseg.batch.cases import case_id_key, discover, safe_case_id
from tumorseg.cli import main
from tumorseg.errors import SOME_CASES_FAILED, GeometryError, InputError, SequenceError
from tumorseg.inputs import DicomInputs
from tumorseg.sequences import StudyInputs
from tumorseg.validate import find_prediction

AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])
NAMES = {"flair": "case-t2f.nii.gz", "t1": "case-t1n.nii.gz", "t1gd": "case-t1c.nii.gz", "t2": "case-t2w.nii.gz"}


@pytest.fixture(scope="module")
def batch_model(tmp_path_factory) -> Path:
    """Tiny random model at 3 mm that needs T1gd (so a case without it is refused)."""
    return make_tiny_model(tmp_path_factory.mktemp("batch-model"), required=("t1gd",), spacing=(3.0, 3.0, 3.0))


def phantom_case(folder: Path, seed: int, sequences=("flair", "t1", "t1gd", "t2")) -> Path:
    folder.mkdir(parents=True)
    for n, seq in enumerate(sequences):
        save_nifti(folder / NAMES[seq], brain_phantom(seed=seed * 10 + n), AFFINE)
    return folder


def run_batch(*args: str):
    return CliRunner().invoke(main, ["batch", *args, "-q"], catch_exceptions=False)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def output_state(out: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under out/cases."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted((out / "cases").rglob("*")) if p.is_file()}


def assert_outputs_readable(out: Path) -> None:
    """Every file at a final path is complete; no temporary file was left at one."""
    for path in (out / "cases").rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.name.endswith(".nii.gz"):
            assert np.asarray(nib.load(path).dataobj).size > 0
        elif path.suffix == ".json":
            json.loads(path.read_text())


# -- discovery -----------------------------------------------------------------------------------
def test_safe_case_id_never_leaves_the_output_folder():
    assert safe_case_id("../../etc/passwd") == "etc_passwd"
    assert safe_case_id("Müller, Hans 1970") == "M_ller_Hans_1970"
    assert safe_case_id("..") == "case"
    assert "/" not in safe_case_id("a/b\\c") and len(safe_case_id("x" * 500)) <= 80


def test_discover_folder_tree_ignores_label_files_and_reports_unnamed_files(tmp_path):
    root = tmp_path / "in"
    phantom_case(root / "site A" / "p1", 1)
    p2 = phantom_case(root / "site A" / "p2", 2, ("flair", "t1gd"))
    save_nifti(p2 / "case_seg.nii.gz", np.zeros((40, 44, 36), np.uint8), AFFINE)
    save_nifti(p2 / "brainmask.nii.gz", np.ones((40, 44, 36), np.uint8), AFFINE)
    (root / "odd").mkdir()
    save_nifti(root / "odd" / "scan.nii.gz", brain_phantom(), AFFINE)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a case")
    cases = {c.case_id: c for c in discover(root)}
    assert set(cases) == {"odd", "site_A_p1", "site_A_p2"}
    assert cases["site_A_p2"].inputs.sequences == ("flair", "t1gd")
    assert cases["site_A_p1"].source == os.path.join("site A", "p1")
    assert isinstance(cases["odd"].problem, SequenceError) and cases["odd"].inputs is None


def test_discover_decathlon_and_csv_manifest(tmp_path):
    data = tmp_path / "Task01"
    (data / "imagesTr").mkdir(parents=True)
    (data / "imagesTs").mkdir()
    four_d = np.stack([brain_phantom(seed=s) for s in range(4)], axis=-1)
    save_nifti(data / "imagesTr" / "BRATS_001.nii.gz", four_d, AFFINE)
    save_nifti(data / "imagesTs" / "BRATS_900.nii.gz", four_d, AFFINE)
    (data / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS junk")
    cases = discover(data)
    assert [c.case_id for c in cases] == ["BRATS_001", "BRATS_900"]
    assert cases[0].inputs == StudyInputs(decathlon_4d=data / "imagesTr" / "BRATS_001.nii.gz")
    assert [c.case_id for c in discover(data / "imagesTs")] == ["BRATS_900"]

    phantom_case(tmp_path / "p", 3, ("flair", "t1gd"))
    table = tmp_path / "cases.csv"
    table.write_text("case_id,FLAIR,t1c,image\n"
                     "first,p/case-t2f.nii.gz,p/case-t1c.nii.gz,\n"
                     "first,,,Task01/imagesTr/BRATS_001.nii.gz\n"
                     "both,p/case-t2f.nii.gz,,Task01/imagesTr/BRATS_001.nii.gz\n")
    rows = discover(table)
    assert [c.case_id for c in rows] == ["first", "first-2", "both"]
    assert rows[0].inputs.files == (("flair", tmp_path / "p" / "case-t2f.nii.gz"), ("t1gd", tmp_path / "p" / "case-t1c.nii.gz"))
    assert rows[1].inputs.decathlon_4d == data / "imagesTr" / "BRATS_001.nii.gz"
    assert isinstance(rows[2].problem, InputError) and "line 4" in str(rows[2].problem)


def test_discover_refuses_what_holds_no_cases(tmp_path):
    with pytest.raises(InputError, match="no cases found"):
        discover(tmp_path)
    with pytest.raises(InputError, match="not found"):
        discover(tmp_path / "missing")
    (tmp_path / "bad.csv").write_text("case_id,colour\nx,red\n")
    with pytest.raises(InputError, match="unknown column"):
        discover(tmp_path / "bad.csv")


def test_discover_groups_dicom_files_by_study(tmp_path):
    hfs = shared_data("dicom", "decubitus-t1", "HFS")
    hfp = shared_data("dicom", "decubitus-t1", "HFP")
    shutil.copytree(hfs, tmp_path / "in" / "Patient X" / "series1")
    shutil.copytree(hfp, tmp_path / "in" / "Patient Y" / "deep" / "series7")
    cases = discover(tmp_path / "in")
    assert [c.case_id for c in cases] == ["Patient_X_series1", "Patient_Y_deep_series7"]
    assert all(isinstance(c.inputs, DicomInputs) for c in cases)
    assert len(cases[0].files()) == len(list(hfs.iterdir()))


# -- the batch -------------------------------------------------------------------------------------
def broken_cases(root: Path) -> dict[str, str]:
    """Four broken cases; returns case id -> expected error kind."""
    whole = phantom_case(root / "truncated", 50)
    data = (whole / NAMES["t1gd"]).read_bytes()
    (whole / NAMES["t1gd"]).write_bytes(data[: len(data) // 2])  # header intact, voxels cut off
    flat = root / "flat"
    flat.mkdir()
    save_nifti(flat / NAMES["t1gd"], brain_phantom((40, 44, 1))[:, :, 0], AFFINE)
    phantom_case(root / "no-t1gd", 51, ("flair", "t2"))
    nan = phantom_case(root / "nan", 52)
    image = brain_phantom(seed=3)
    image[10, 10, 10] = np.nan
    save_nifti(nan / NAMES["t1"], image, AFFINE)
    return {"truncated": "input", "flat": "geometry", "no-t1gd": "sequence", "nan": "input"}


def test_batch_with_broken_cases_rerun_and_workers(tmp_path, batch_model):
    root = tmp_path / "in"
    for n in range(6):
        phantom_case(root / f"ok{n}", n)
    expected_failures = broken_cases(root)
    out = tmp_path / "out"

    result = run_batch(str(root), "-o", str(out), "--model", str(batch_model))
    assert result.exit_code == SOME_CASES_FAILED, result.output
    doc = manifest(out)
    assert doc["complete"] and doc["counts"] == {"ok": 6, "failed": 4, "reused": 0, "pending": 0}
    rows = {r["case_id"]: r for r in doc["cases"]}
    for case_id, kind in expected_failures.items():
        assert rows[case_id]["status"] == "failed" and rows[case_id]["error_kind"] == kind, rows[case_id]
        code = {"input": InputError, "geometry": GeometryError, "sequence": SequenceError}[kind].exit_code
        assert rows[case_id]["error_code"] == code
        assert not (out / "cases" / case_id / "segmentation.nii.gz").exists()
    with open(out / "manifest.csv", newline="") as f:
        csv_rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert csv_rows.keys() == rows.keys() and csv_rows["ok0"]["status"] == "ok"
    assert csv_rows["ok0"]["model_sha256"] == doc["model"]["weights_sha256"]
    for n in range(6):
        row = rows[f"ok{n}"]
        label_map = nib.load(out / row["label_map"])
        assert label_map.shape == (40, 44, 36) and np.allclose(label_map.affine, AFFINE)
        report = json.loads((out / row["report"]).read_text())
        assert report["results"]["regions"]["WT"]["volume_ml"] == pytest.approx(row["wt_ml"])
        assert len(row["inputs_sha256"]) == 64 and row["config_sha256"]

    # Rerun: nothing is recomputed (failures are retried: their inputs may have been fixed).
    before = output_state(out)
    result = run_batch(str(root), "-o", str(out), "--model", str(batch_model))
    assert result.exit_code == SOME_CASES_FAILED
    doc = manifest(out)
    assert doc["counts"] == {"ok": 6, "failed": 4, "reused": 6, "pending": 0}
    assert output_state(out) == before

    # A changed input, a deleted output and a changed configuration each cause a rerun.
    save_nifti(root / "ok1" / NAMES["t2"], brain_phantom(seed=99), AFFINE)
    (out / "cases" / "ok2" / "report.json").unlink()
    result = run_batch(str(root), "-o", str(out), "--model", str(batch_model))
    assert manifest(out)["counts"]["reused"] == 4
    result = run_batch(str(root), "-o", str(out), "--model", str(batch_model), "--overlap", "0.25")
    assert manifest(out)["counts"]["reused"] == 0

    # Worker processes give the same label maps, byte for byte.
    out2 = tmp_path / "out-workers"
    result = run_batch(str(root), "-o", str(out2), "--model", str(batch_model), "--overlap", "0.25", "--workers", "2")
    assert result.exit_code == SOME_CASES_FAILED
    doc2 = manifest(out2)
    assert doc2["counts"] == {"ok": 6, "failed": 4, "reused": 0, "pending": 0} and doc2["workers"] == 2
    for n in range(6):
        name = f"cases/ok{n}/segmentation.nii.gz"
        assert (out / name).read_bytes() == (out2 / name).read_bytes()
    assert {r["case_id"]: r["error_kind"] for r in doc2["cases"] if r["status"] == "failed"} == expected_failures
    assert doc2["worker_mode"] == "whole_cases"  # the CPU default

    # The GPU mode (workers prepare and finish, this process runs the network) gives them too.
    from tumorseg.batch.cases import discover
    from tumorseg.batch.runner import BatchRunner
    from tumorseg.config import load_pipeline
    from tumorseg.pipeline import Segmenter

    config = load_pipeline("default").with_overrides(overlap=0.25)
    segmenter = Segmenter(str(batch_model), config)
    out3 = tmp_path / "out-pipelined"
    blocks_before = _shared_blocks()
    summary = BatchRunner(segmenter, out3, workers=2, progress=False, worker_mode="pipelined").run(discover(root))
    assert len(summary.failed) == 4 and manifest(out3)["worker_mode"] == "pipelined"
    assert 0 < summary.network_busy_fraction <= 1
    assert _shared_blocks() == blocks_before  # every shared memory block was freed
    for n in range(6):
        name = f"cases/ok{n}/segmentation.nii.gz"
        assert (out / name).read_bytes() == (out3 / name).read_bytes()


def test_batch_exit_code_zero_and_force(tmp_path, batch_model):
    root = tmp_path / "in"
    phantom_case(root / "a", 1)
    head = brain_phantom(seed=2) + np.random.default_rng(2).normal(20, 5, brain_phantom().shape).astype(np.float32)
    (root / "b").mkdir()
    save_nifti(root / "b" / NAMES["t1gd"], head, AFFINE)  # noise all round: no constant background
    out = tmp_path / "out"
    # Brain extraction off: the warning that stands where it does not run (tests/test_brain.py).
    off = ("--brain-extraction", "off")
    assert run_batch(str(root), "-o", str(out), "--model", str(batch_model), *off).exit_code == 0
    assert run_batch(str(root), "-o", str(out), "--model", str(batch_model), "--force", *off).exit_code == 0
    doc = manifest(out)
    assert doc["counts"] == {"ok": 2, "failed": 0, "reused": 0, "pending": 0}
    warnings = {row["case_id"]: row["warnings"] for row in doc["cases"]}
    assert warnings["a"] == "" and "skull-stripped" in warnings["b"]


def stop_mid_batch(command: list[str], out: Path, after_cases: int, sig: int) -> tuple[int, str]:
    """Run a batch command in its own process group and send ``sig`` to the group (as a terminal's
    Ctrl-C does) once ``after_cases`` cases are done; its exit code and stderr."""
    # SIGINT at its default, as under a terminal: a test run started in the background by a
    # non-interactive shell (nohup'd CI) inherits it ignored, and the batch would never see the Ctrl-C.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            try:
                done = manifest(out)["counts"]["ok"]
            except (OSError, ValueError, KeyError):
                done = 0
            if done >= after_cases:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the batch finished before it could be stopped"
        time.sleep(0.15)  # into the next case
        os.killpg(process.pid, sig)
        _, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, stderr


def assert_stopped_batch_resumes(command: list[str], out: Path, cases: int, sig: int) -> int:
    """Stop the batch mid-way: nothing half-written, nothing written after it exited, and the
    rerun finishes the rest without redoing a case. The number of cases done before the stop."""
    code, stderr = stop_mid_batch(command, out, 2, sig)
    if sig == signal.SIGINT:
        assert code == 130 and "interrupted" in stderr, (code, stderr)
    doc = manifest(out)
    assert not doc["complete"] and 2 <= doc["counts"]["ok"] < cases, doc["counts"]
    assert_outputs_readable(out)
    done = {row["case_id"] for row in doc["cases"] if row["status"] == "ok"}
    stamps = {c: (out / "cases" / c / "batch-case.json").stat().st_mtime_ns for c in done}
    state = output_state(out)
    time.sleep(3)
    assert output_state(out) == state, "something still wrote after the batch had stopped"

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    doc = manifest(out)
    assert doc["complete"] and doc["counts"]["ok"] == cases and doc["counts"]["reused"] >= len(done)
    assert {c: (out / "cases" / c / "batch-case.json").stat().st_mtime_ns for c in done} == stamps  # not redone
    assert_outputs_readable(out)
    assert not [p for p in (out / "cases").rglob(".*partial*")]  # stale temporary files removed
    return len(done)


def batch_command(root: Path, out: Path, model: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "tumorseg.cli", "batch", str(root), "-o", str(out), "--model", str(model), "-q",
            *options]


def test_batch_killed_mid_case_then_rerun_completes(tmp_path, batch_model):
    root = tmp_path / "in"
    for n in range(12):
        phantom_case(root / f"c{n:02d}", n)
    assert_stopped_batch_resumes(batch_command(root, tmp_path / "out", batch_model), tmp_path / "out", 12,
                                 signal.SIGKILL)


def test_ctrl_c_stops_a_batch_with_workers_cleanly(tmp_path, batch_model):
    root = tmp_path / "in"
    for n in range(8):
        phantom_case(root / f"c{n:02d}", n)
    out = tmp_path / "out"
    assert_stopped_batch_resumes(batch_command(root, out, batch_model, "--workers", "2"), out, 8, signal.SIGINT)


def test_batch_of_twenty_real_and_synthetic_cases(tmp_path, batch_model):
    """The issue's check: 20 cases (real BraTS, synthetic, phantoms), 4 of them broken."""
    brats = shared_data("brats2015-dev")
    gli = shared_data("brats-gli-00001-000")
    pytest.importorskip("nilearn", reason="tumorseg synth needs nilearn (the test extra)")
    from tumorseg.synth import write_synth_dataset

    root = tmp_path / "in"
    for case in sorted(brats.iterdir()):
        shutil.copytree(case, root / "brats2015" / case.name)
    shutil.copytree(gli, root / "brats-gli" / gli.name)
    synth = write_synth_dataset(tmp_path / "synth", 3, seed=7, version=2)  # MNI152 only: no need for Debian's mricron-data
    for image in sorted((synth / "imagesTr").glob("*.nii.gz")):
        (root / "synth" / image.name[:-7]).mkdir(parents=True)
        shutil.copy(image, root / "synth" / image.name[:-7] / image.name)
    for n in range(8):
        phantom_case(root / "phantoms" / f"p{n}", 100 + n)
    broken = broken_cases(root / "broken")
    out = tmp_path / "out"

    result = run_batch(str(root), "-o", str(out), "--model", str(batch_model))
    assert result.exit_code == SOME_CASES_FAILED
    doc = manifest(out)
    assert doc["cases_total"] == 20 and doc["counts"] == {"ok": 16, "failed": 4, "reused": 0, "pending": 0}
    failed = {r["case_id"]: r["error_kind"] for r in doc["cases"] if r["status"] == "failed"}
    assert failed == {f"broken_{k}": v for k, v in broken.items()}
    for row in doc["cases"]:
        if row["status"] == "ok":
            source_dir = root / row["source"]
            reference = nib.load(sorted(p for p in source_dir.iterdir() if "seg" not in p.name.lower()
                                        and "mask" not in p.name.lower() and "OTMulti" not in p.name)[0])
            mask = nib.load(out / row["label_map"])
            assert mask.shape == reference.shape[:3]
            assert np.allclose(mask.affine, reference.affine, atol=1e-4)
    before = output_state(out)
    assert run_batch(str(root), "-o", str(out), "--model", str(batch_model)).exit_code == SOME_CASES_FAILED
    assert manifest(out)["counts"]["reused"] == 16 and output_state(out) == before


def test_truncated_gzip_is_an_input_error_not_a_crash(tmp_path, batch_model):
    """A gzip cut inside its header also fails its case alone."""
    root = tmp_path / "in"
    case = phantom_case(root / "cut", 1)
    (case / NAMES["flair"]).write_bytes(gzip.compress(b"x" * 1000)[:30])
    phantom_case(root / "fine", 2)
    out = tmp_path / "out"
    assert run_batch(str(root), "-o", str(out), "--model", str(batch_model)).exit_code == SOME_CASES_FAILED
    rows = {r["case_id"]: r for r in manifest(out)["cases"]}
    assert rows["fine"]["status"] == "ok" and rows["cut"]["error_kind"] == "input"


def test_unique_case_ids_never_collide():
    from tumorseg.batch.cases import unique_case_ids

    assert unique_case_ids(["scan-2", "scan", "scan"]) == ["scan-2", "scan", "scan-3"]
    assert unique_case_ids(["Case_1", "case_1", "CASE_1"]) == ["Case_1", "case_1-2", "CASE_1-3"]


def test_output_folder_inside_the_input_tree_is_not_a_case(tmp_path, batch_model):
    root = tmp_path / "in"
    phantom_case(root / "a", 1)
    out = root / "results"
    assert run_batch(str(root), "-o", str(out), "--model", str(batch_model)).exit_code == 0
    assert [c.case_id for c in discover(root)] == ["a"]  # the outputs of a batch are recognised
    assert run_batch(str(root), "-o", str(out), "--model", str(batch_model)).exit_code == 0
    assert manifest(out)["counts"] == {"ok": 1, "failed": 0, "reused": 1, "pending": 0}


def test_a_case_that_fails_on_rerun_keeps_no_record_of_old_outputs(tmp_path, batch_model):
    root = tmp_path / "in"
    case = phantom_case(root / "a", 1)
    out = tmp_path / "out"
    assert run_batch(str(root), "-o", str(out), "--model", str(batch_model)).exit_code == 0
    assert find_prediction(out, "a") is not None
    image = brain_phantom(seed=5)
    image[0, 0, 0] = np.nan
    save_nifti(case / NAMES["t1gd"], image, AFFINE)
    assert run_batch(str(root), "-o", str(out), "--model", str(batch_model)).exit_code == SOME_CASES_FAILED
    assert manifest(out)["cases"][0]["status"] == "failed"
    # Nor the outputs themselves: validate would take the old segmentation for this run's.
    assert sorted(p.name for p in (out / "cases" / "a").iterdir()) == []
    assert find_prediction(out, "a") is None


# Loaded by every interpreter of the batch below (main process and spawned workers) through
# PYTHONPATH: a worker that reads a case named "killer" dies as if the kernel's OOM killer hit it.
_KILLER_SITECUSTOMIZE = '''
import os
import re
from tumorseg import pipeline
_read = pipeline.PipelineSpec.read_and_prepare
def read_and_prepare(self, inputs):
    if "killer" in str(inputs):
        os._exit(137)
    return _read(self, inputs)
pipeline.PipelineSpec.read_and_prepare = read_and_prepare
'''


# A worker dies while finishing the case named "killer", after its probabilities were shared.
_FINISH_KILLER_SITECUSTOMIZE = '''
import os
from tumorseg.batch import steps
_finish = steps.finish_and_write
def finish_and_write(job):
    if job.case.case_id == "killer":
        os._exit(137)
    return _finish(job)
steps.finish_and_write = finish_and_write
'''


_DEAD_WORKERS_SITECUSTOMIZE = '''
import os
from tumorseg.batch import steps
def init_worker(*args):
    os._exit(3)
steps.init_worker = init_worker
'''


def _batch_with_hook(tmp_path: Path, hook_code: str, root: Path, model: Path, mode: str):
    """Run a batch with 2 workers in a subprocess whose interpreters (workers too) load hook_code."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(hook_code)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys; from pathlib import Path; from tumorseg.batch.runner import BatchRunner; "
            "from tumorseg.batch.cases import discover; from tumorseg.pipeline import Segmenter; "
            "BatchRunner(Segmenter(sys.argv[1]), Path(sys.argv[2]), workers=2, progress=False, "
            "worker_mode=sys.argv[4]).run(discover(Path(sys.argv[3])))")
    result = subprocess.run([sys.executable, "-c", code, str(model), str(out), str(root), mode], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("mode", ["whole_cases", "pipelined"])
def test_a_case_that_kills_its_worker_fails_alone(tmp_path, batch_model, mode):
    root = tmp_path / "in"
    for n in range(4):
        phantom_case(root / f"c{n}", n)
    phantom_case(root / "killer", 9)
    out = _batch_with_hook(tmp_path, _KILLER_SITECUSTOMIZE, root, batch_model, mode)
    doc = manifest(out)
    status = {row["case_id"]: row for row in doc["cases"]}
    assert {c: r["status"] for c, r in status.items()} == {"c0": "ok", "c1": "ok", "c2": "ok", "c3": "ok",
                                                           "killer": "failed"}
    assert "died" in status["killer"]["error_message"]
    assert doc["complete"]
    assert_outputs_readable(out)


def _shared_blocks() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("tumorseg-*")} if Path("/dev/shm").is_dir() else set()


def test_a_worker_dying_while_finishing_leaves_no_shared_memory(tmp_path, batch_model):
    root = tmp_path / "in"
    for n in range(3):
        phantom_case(root / f"c{n}", n)
    phantom_case(root / "killer", 9)
    before = _shared_blocks()
    out = _batch_with_hook(tmp_path, _FINISH_KILLER_SITECUSTOMIZE, root, batch_model, "pipelined")
    doc = manifest(out)
    assert {r["case_id"]: r["status"] for r in doc["cases"]} == {"c0": "ok", "c1": "ok", "c2": "ok", "killer": "failed"}
    assert_outputs_readable(out)
    assert _shared_blocks() == before  # the killer's probabilities were freed by the main process


@pytest.mark.parametrize("mode", ["whole_cases", "pipelined"])
def test_workers_that_cannot_start_fail_the_batch_quickly(tmp_path, batch_model, mode):
    root = tmp_path / "in"
    for n in range(8):
        phantom_case(root / f"c{n}", n)
    started = time.monotonic()
    out = _batch_with_hook(tmp_path, _DEAD_WORKERS_SITECUSTOMIZE, root, batch_model, mode)
    doc = manifest(out)
    assert doc["complete"] and doc["counts"]["failed"] == 8
    assert all("died 3 times in a row" in row["error_message"] for row in doc["cases"])
    assert time.monotonic() - started < 120  # a few pools at most, not one per case


def test_hashed_ids_keep_folder_names_out_of_outputs_and_log(tmp_path, batch_model):
    root = tmp_path / "in"
    phantom_case(root / "DOE^JOHN 1234567", 1)
    phantom_case(root / "ROE^JANE 7654321", 2, ("flair", "t1"))  # no T1gd: this model refuses it
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tumorseg.cli", "batch", str(root), "-o", str(out), "--model", str(batch_model),
               "--hashed-ids", "-q"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == SOME_CASES_FAILED, result.stderr
    doc = manifest(out)
    ids = {row["source"]: row["case_id"] for row in doc["cases"]}
    assert set(ids) == {"DOE^JOHN 1234567", "ROE^JANE 7654321"}  # the mapping stays in the manifest
    assert all(re.fullmatch(r"case-[0-9a-f]{12}", i) for i in ids.values())
    names = [p.name for p in (out / "cases").rglob("*")]
    assert names and not [n for n in names if "DOE" in n or "ROE" in n or "1234567" in n]
    for path in (out / "cases").rglob("*"):  # no file of a case folder names the patient either
        if path.is_file():
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            assert b"DOE" not in data and b"1234567" not in data, path
    log = result.stdout + result.stderr
    assert ids["ROE^JANE 7654321"] in log and "ROE" not in log and "7654321" not in log
    # Same folder, same key, same ids: a rerun reuses the finished case.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == SOME_CASES_FAILED and manifest(out)["counts"]["reused"] == 1
    # The ids are keyed: without out/case-id.key a guessed name cannot be checked against one.
    import hashlib
    assert "case-" + hashlib.sha256(b"DOE_JOHN_1234567").hexdigest()[:12] not in ids.values()
    assert (out / "case-id.key").stat().st_mode & 0o077 == 0
    other = {c.case_id for c in discover(root, id_key=case_id_key(tmp_path / "other-out"))}
    assert other.isdisjoint(ids.values()) and len(other) == 2


def test_a_second_batch_into_the_same_folder_is_refused(tmp_path, batch_model):
    """A nightly batch that overlaps the last one must not mix its files with the first's."""
    import fcntl

    root = tmp_path / "in"
    phantom_case(root / "a", 1)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".batch.lock", "w") as held:  # what a running batch holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_batch(str(root), "-o", str(out), "--model", str(batch_model))
        assert result.exit_code == 6, result.output
        assert "another tumorseg batch is writing into this folder" in result.output
        assert not (out / "cases").exists() and not (out / "manifest.json").exists()
    assert run_batch(str(root), "-o", str(out), "--model", str(batch_model)).exit_code == 0  # free again


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm (Linux)")
def test_the_next_batch_removes_what_a_killed_one_left(tmp_path, batch_model):
    """A SIGKILLed batch leaves its shared memory blocks and its manifest's temporaries; the lock file
    names its block prefix, so the next batch into the folder removes exactly those."""
    root = tmp_path / "in"
    phantom_case(root / "a", 1)
    out = tmp_path / "out"
    out.mkdir()
    dead, alive = f"tumorseg-999999999-{os.urandom(4).hex()}-", f"tumorseg-999999998-{os.urandom(4).hex()}-"
    (out / ".batch.lock").write_text(dead)
    shm = Path("/dev/shm")
    try:
        for prefix in (dead, alive):
            (shm / f"{prefix}0123456789abcdef").write_bytes(b"x" * 64)
        (out / ".manifest.csv.k3j2.partial.csv").write_text("half")
        assert run_batch(str(root), "-o", str(out), "--model", str(batch_model)).exit_code == 0
        assert not (shm / f"{dead}0123456789abcdef").exists()
        assert (shm / f"{alive}0123456789abcdef").exists()  # another batch's: not ours to remove
        assert not list(out.glob(".*.partial*"))
        assert (out / ".batch.lock").read_text().startswith("tumorseg-")
    finally:
        for prefix in (dead, alive):
            (shm / f"{prefix}0123456789abcdef").unlink(missing_ok=True)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm (Linux)")
def test_without_a_lock_or_with_a_live_holder_nothing_is_removed(tmp_path, batch_model, monkeypatch):
    """A file system without locks, or a copied folder whose lock file names a live batch: that batch
    may be running, so its blocks and temporaries stay."""
    import errno

    from tumorseg.batch import manifest

    root = tmp_path / "in"
    phantom_case(root / "a", 1)
    shm = Path("/dev/shm")
    live = f"tumorseg-{os.getpid()}-{os.urandom(4).hex()}-"  # this process: alive
    dead = f"tumorseg-999999999-{os.urandom(4).hex()}-"
    blocks = [shm / f"{p}0123456789abcdef" for p in (live, dead)]
    try:
        for block in blocks:
            block.write_bytes(b"x")
        out = tmp_path / "live"
        out.mkdir()
        (out / ".batch.lock").write_text(live)
        assert run_batch(str(root), "-o", str(out), "--model", str(batch_model)).exit_code == 0
        assert blocks[0].exists()

        def no_locks(fd, op):
            raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(manifest.fcntl, "flock", no_locks)
        out = tmp_path / "unlocked"
        out.mkdir()
        (out / ".batch.lock").write_text(dead)
        (out / ".manifest.csv.k3j2.partial.csv").write_text("half")
        result = run_batch(str(root), "-o", str(out), "--model", str(batch_model))
        assert result.exit_code == 0, result.output
        assert blocks[1].exists() and (out / ".manifest.csv.k3j2.partial.csv").exists()
        assert (out / ".batch.lock").read_text() == dead
    finally:
        for block in blocks:
            block.unlink(missing_ok=True)


def test_an_output_folder_that_cannot_be_written_is_a_named_error(tmp_path, batch_model):
    root = tmp_path / "in"
    phantom_case(root / "a", 1)
    (tmp_path / "file").write_text("a file where a folder should be")
    result = run_batch(str(root), "-o", str(tmp_path / "file" / "out"), "--model", str(batch_model))
    assert result.exit_code == 6 and "cannot write into the output folder" in result.output, result.output
    # With hashed ids the id key is the first thing written there: the same named error.
    result = run_batch(str(root), "-o", str(tmp_path / "file" / "out"), "--model", str(batch_model), "--hashed-ids")
    assert result.exit_code == 6 and "cannot write the output folder" in result.output, result.output


def test_a_rerun_redoes_a_case_whose_sequences_or_brain_extractor_changed(tmp_path, batch_model, monkeypatch):
    from tumorseg import hdbet

    phantom_case(tmp_path / "p", 2)
    table = tmp_path / "cases.csv"
    # The T1 and T1gd columns mixed up, then corrected: the same files, another case.
    table.write_text("case_id,flair,t1,t1gd,t2\nc1,p/case-t2f.nii.gz,p/case-t1c.nii.gz,p/case-t1n.nii.gz,p/case-t2w.nii.gz\n")
    out = tmp_path / "out"
    monkeypatch.setattr(hdbet, "available", lambda: False)
    assert run_batch(str(table), "-o", str(out), "--model", str(batch_model)).exit_code == 0
    table.write_text("case_id,flair,t1,t1gd,t2\nc1,p/case-t2f.nii.gz,p/case-t1n.nii.gz,p/case-t1c.nii.gz,p/case-t2w.nii.gz\n")
    assert run_batch(str(table), "-o", str(out), "--model", str(batch_model)).exit_code == 0
    assert manifest(out)["counts"]["reused"] == 0
    assert run_batch(str(table), "-o", str(out), "--model", str(batch_model)).exit_code == 0
    assert manifest(out)["counts"]["reused"] == 1
    # Brain extraction installed since (the report of a scan with its skull said to install it).
    monkeypatch.setattr(hdbet, "available", lambda: True)
    assert run_batch(str(table), "-o", str(out), "--model", str(batch_model)).exit_code == 0
    assert manifest(out)["counts"]["reused"] == 0
    record = json.loads((out / "cases" / "c1" / "batch-case.json").read_text())
    assert record["fingerprint"]["brain_extractor"] == hdbet.METHOD


def test_another_tools_manifest_json_does_not_hide_a_case(tmp_path, batch_model):
    root = tmp_path / "in"
    phantom_case(root / "patA", 1)
    phantom_case(root / "patB", 2)
    (root / "patB" / "manifest.json").write_text('{"vendor": "a PACS export", "files": 4}')
    assert [c.case_id for c in discover(root)] == ["patA", "patB"]
    assert run_batch(str(root), "-o", str(root / "out"), "--model", str(batch_model)).exit_code == 0
    # The batch's own output folder inside the tree is still no case (nor are its case folders).
    assert [c.case_id for c in discover(root)] == ["patA", "patB"]


def test_outputs_in_a_subfolder_are_recorded_reused_and_retracted(tmp_path, batch_model):
    """registered/<sequence>.nii.gz (a pipeline with save_registered) sits one level down in the
    case folder: the case record must find it on a rerun (else the case ran again every time) and
    remove it when the case runs again, without ever reaching outside the case folder."""
    from tumorseg.batch.layout import CASE_RECORD

    root = tmp_path / "in"
    phantom_case(root / "a", 1)
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text('[output]\nsave_registered = true\n')
    out = tmp_path / "out"
    args = (str(root), "-o", str(out), "--model", str(batch_model), "--pipeline", str(pipeline))
    assert run_batch(*args).exit_code == 0
    case_dir = out / "cases" / "a"
    record = json.loads((case_dir / CASE_RECORD).read_text())
    assert record["outputs"]["registered_t1gd"]["file"] == "registered/t1gd.nii.gz"
    assert (case_dir / "registered" / "t1gd.nii.gz").is_file()
    assert run_batch(*args).exit_code == 0
    assert manifest(out)["counts"]["reused"] == 1
    (root / "a" / NAMES["t2"]).unlink()  # other inputs: the old outputs are retracted, then rewritten
    outside = tmp_path / "keep.txt"
    outside.write_text("not the batch's")
    record["outputs"]["evil"] = {"file": "../../keep.txt", "sha256": "0" * 64}
    (case_dir / CASE_RECORD).write_text(json.dumps(record))
    assert run_batch(*args).exit_code == 0
    assert manifest(out)["counts"] == {"ok": 1, "failed": 0, "reused": 0, "pending": 0}
    assert outside.read_text() == "not the batch's"
    assert not (case_dir / "registered" / "t2.nii.gz").exists() and (case_dir / "registered" / "t1gd.nii.gz").is_file()


def test_killed_before_record_then_failing_rerun_leaves_no_result(tmp_path, batch_model):
    phantom_case(tmp_path / "in" / "caseA", 0)
    out = tmp_path / "out"
    args = (str(tmp_path / "in"), "-o", str(out), "--model", str(batch_model), "--no-tta", "--brain-extraction", "off")
    assert run_batch(*args).exit_code == 0
    # What a SIGKILL between report.json and batch-case.json leaves (reproduced with a real kill too).
    (out / "cases" / "caseA" / "batch-case.json").unlink()
    (tmp_path / "in" / "caseA" / "case-t1n.nii.gz").write_bytes(b"garbage")  # the input is now broken
    result = run_batch(*args)
    assert result.exit_code == SOME_CASES_FAILED
    assert manifest(out)["cases"][0]["status"] == "failed"
    assert find_prediction(out, "caseA") is None, "the killed run's label map is taken for the failed case's result"
    assert not (out / "cases" / "caseA" / "report.json").exists()


def test_disk_full_while_writing_leaves_no_label_map(tmp_path, batch_model, monkeypatch):
    import tumorseg.pipeline as pipeline

    phantom_case(tmp_path / "in" / "caseA", 0)
    out = tmp_path / "out"
    write = pipeline.write_bytes_atomic

    def full(path, data):
        if path.name == "overview.png":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, data)

    monkeypatch.setattr(pipeline, "write_bytes_atomic", full)
    result = run_batch(str(tmp_path / "in"), "-o", str(out), "--model", str(batch_model), "--no-tta",
                       "--brain-extraction", "off", "-q")
    assert result.exit_code == SOME_CASES_FAILED
    assert find_prediction(out, "caseA") is None


def test_linked_case_folder_is_a_case(tmp_path):
    phantom_case(tmp_path / "elsewhere" / "caseA", 0)
    phantom_case(tmp_path / "in" / "caseB", 1)
    os.symlink(tmp_path / "elsewhere" / "caseA", tmp_path / "in" / "caseA")
    os.symlink(tmp_path / "in", tmp_path / "in" / "caseB" / "loop")  # no endless walk
    assert sorted(c.case_id for c in discover(tmp_path / "in")) == ["caseA", "caseB"]
