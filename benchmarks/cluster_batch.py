"""The same batch with the local runner and on a Ray cluster of one and of two nodes, in one run.

    python benchmarks/cluster_batch.py [--cases 8] [--model default] [--no-tta]

Synthetic four-sequence cases (tumorseg synth) go through `tumorseg batch` three times into fresh
output folders: locally (`--workers 0`), on a Ray cluster of one node (the head, 2 CPUs) and of two
nodes (a head and a joined node, 1 CPU each), all on 127.0.0.1 with this script's own ports and
stopped at the end. It prints wall seconds, cases per hour, the ratio to the local run, and the
overhead per case that Ray adds (its wall time minus the local one, per case). On this 2-core
machine the nodes share the same two cores: it can show Ray's overhead and that the results are the
same, not a speed-up; docs/cluster.md has the capacity plan for real clusters.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
PORT = 26400


def ray(*args: str) -> None:
    subprocess.run([str(BIN / "ray"), *args], check=True, capture_output=True,
                   env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def start_cluster(nodes: int, temp: str) -> str:
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    ray("start", "--head", f"--port={PORT}", f"--temp-dir={temp}", "--include-dashboard=false",
        f"--num-cpus={2 if nodes == 1 else 1}", f"--node-manager-port={PORT + 1}", f"--object-manager-port={PORT + 2}",
        *common)
    if nodes == 2:
        ray("start", f"--address=127.0.0.1:{PORT}", "--num-cpus=1", f"--node-manager-port={PORT + 31}",
            f"--object-manager-port={PORT + 32}", *common)
    return f"127.0.0.1:{PORT}"


def timed_batch(cases: Path, out: Path, extra: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([str(BIN / "tumorseg"), "batch", str(cases), "-o", str(out), "-q", *extra], check=True)
    return time.perf_counter() - start


def same_outputs(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a) for p in (a / "cases").rglob("segmentation.nii.gz"))
    return names == sorted(p.relative_to(b) for p in (b / "cases").rglob("segmentation.nii.gz")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--model", default="default")
    parser.add_argument("--no-tta", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    subprocess.run([str(BIN / "tumorseg"), "synth", "-o", str(work / "synth"), "--cases", str(args.cases),
                    "--seed", "3", "--workers", "2", "-q"], check=True)
    extra = ["--model", args.model] + (["--no-tta"] if args.no_tta else [])
    results = {"local": timed_batch(work / "synth" / "imagesTr", work / "local", extra)}
    for nodes in (1, 2):
        try:
            address = start_cluster(nodes, temp)
            results[f"ray, {nodes} node{'s' if nodes > 1 else ''}"] = timed_batch(
                work / "synth" / "imagesTr", work / f"ray{nodes}", extra + ["--ray", address])
        finally:
            subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)
    local = results["local"]
    print(f"{args.cases} synthetic cases, model {args.model}{', no mirroring' if args.no_tta else ''}, 2-core machine")
    for name, seconds in results.items():
        print(f"{name:14s} {seconds:7.1f} s  {3600 * args.cases / seconds:7.0f} cases/hour  ratio {local / seconds:.2f}"
              + ("" if name == "local" else f"  overhead {(seconds - local) / args.cases:+.2f} s per case"))
    for nodes in (1, 2):
        print(f"ray, {nodes} node(s): label maps identical to the local run: {same_outputs(work / 'local', work / f'ray{nodes}')}")
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
