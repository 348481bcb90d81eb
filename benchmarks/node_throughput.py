"""Studies per hour through the DICOM node (`tumorseg serve`), and where the time goes.

    python benchmarks/node_throughput.py --shared ../shared/data [--studies 4] [--model default]

N copies of a real series (decubitus-t1 HFS: sagittal T1, 35 slices of 256 x 256, skull on), each
with its own UIDs, are sent at once by N senders to a node started here (its own spool and
ports, the bundled pipeline with the given model); the node sends every RTSTRUCT to a storage SCP
run here. Baseline in the same run: `tumorseg predict` on the same series in a fresh process.
Printed: wall time from the first instance sent to the last RTSTRUCT received, studies per hour,
the node's time per study against predict's (the ratio), and per stage from each result's
report.json: reading, brain extraction, inference, postprocessing, writing, with sending and
receiving as what is left.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom
from pynetdicom import AE, evt
from pynetdicom import sop_class as sop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from study_copies import copy_as_new_studies, free_port  # noqa: E402


def send(folder: Path, port: int) -> None:
    for _ in range(600):
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(sop.MRImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="TUMORSEG")
        if assoc.is_established:
            for path in sorted(folder.glob("*.dcm")):
                assoc.send_c_store(pydicom.dcmread(path))
            assoc.release()
            return
        time.sleep(0.5)  # rejected for the association limit: try again, as a PACS does
    raise SystemExit(f"could not send {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--model", default="default")
    parser.add_argument("--idle-seconds", type=float, default=2.0)
    args = parser.parse_args()
    source = args.shared / "dicom" / "decubitus-t1" / "HFS"
    work = Path(tempfile.mkdtemp(prefix="tumorseg-node-bench-"))
    try:
        run(args, source, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, source: Path, work: Path) -> None:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tumorseg.cli", "predict", str(source), "-o", str(work / "predict"),
                           "-q", "--model", args.model], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr)
    predict_s = time.perf_counter() - start
    print(f"baseline: tumorseg predict on the series in a fresh process: {predict_s:.1f} s", flush=True)

    received: list[float] = []
    receiver = AE(ae_title="PLANNING")
    receiver.add_supported_context(sop.RTStructureSetStorage)
    receiver_port, node_port = free_port(), free_port()
    server = receiver.start_server(("127.0.0.1", receiver_port), block=False,
                                   evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(time.perf_counter()) or 0)])
    config = work / "node.toml"
    config.write_text(f'[node]\nport = {node_port}\nspool = "{work / "spool"}"\nidle_seconds = {args.idle_seconds}\n'
                      f'allowed_callers = ["BENCH"]\n'
                      + (f'pipeline = "{work / "pipeline.toml"}"\n' if args.model != "default" else "")
                      + f'[[destinations]]\nname = "planning"\nae_title = "PLANNING"\nhost = "127.0.0.1"\n'
                        f"port = {receiver_port}\n")
    if args.model != "default":
        (work / "pipeline.toml").write_text(f'model = "{args.model}"\n')
    folders = copy_as_new_studies(source, work / "studies", args.studies)
    node = subprocess.Popen([sys.executable, "-m", "tumorseg.cli", "serve", "--config", str(config)],
                            stdout=open(work / "node.log", "w"), stderr=subprocess.STDOUT)
    try:
        while socket.socket().connect_ex(("127.0.0.1", node_port)) != 0:
            if node.poll() is not None:
                raise SystemExit((work / "node.log").read_text())
            time.sleep(0.2)
        start = time.perf_counter()
        senders = [threading.Thread(target=send, args=(f, node_port)) for f in folders]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        sent = time.perf_counter()
        while len(received) < args.studies:
            if node.poll() is not None:
                raise SystemExit((work / "node.log").read_text())
            time.sleep(0.2)
        wall = time.perf_counter() - start
    finally:
        node.terminate()
        node.wait(timeout=600)
        server.shutdown()
    stages: dict[str, float] = {}
    for report in (work / "spool" / "results").glob("*/g*/report.json"):
        for stage, seconds in json.loads(report.read_text())["timings_s"].items():
            stages[stage] = stages.get(stage, 0.0) + seconds / args.studies
    per_study = wall / args.studies
    print(f"{args.studies} studies of {len(list(source.glob('*.dcm')))} instances sent at once: received in "
          f"{sent - start:.1f} s, last RTSTRUCT after {wall:.1f} s: {3600 / per_study:.0f} studies per hour")
    print(f"node per study {per_study:.1f} s against predict {predict_s:.1f} s: ratio {per_study / predict_s:.2f} "
          f"(the node loads the model once; it also waits idle_seconds {args.idle_seconds:g} per study)")
    accounted = sum(stages.values())
    print("per study, from the reports: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
          + f"; receiving, waiting and sending {max(per_study - accounted, 0):.1f} s")


if __name__ == "__main__":
    main()
