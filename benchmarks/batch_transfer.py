"""What a pipelined batch's main process pays to receive a prepared scan and send back its
probabilities: through the executor's pipe (pickled) against shared memory (tumorseg.batch.shared).

    python benchmarks/batch_transfer.py                 # 4x240x240x155 float32 (143 MB) each way
    python benchmarks/batch_transfer.py --shape 4,128,128,128 --repeats 10

For each way and size it prints the median seconds of one round trip (worker -> main -> worker),
the main process's CPU seconds in that time (what the network's Python thread competes with),
and the ratios. The arrays are checked to arrive intact.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from tumorseg.batch.shared import batch_prefix, release, share, take


def _make(shape: tuple[int, ...], seed: int, prefix: str | None):
    """In the worker: a prepared image, shared or not."""
    array = np.random.default_rng(seed).random(shape, dtype=np.float32)
    return array if prefix is None else share(array, prefix)


def _check(value, seed: int) -> float:
    """In the worker: the probabilities back; their first voxel, to check they arrived."""
    return float(take(value).flat[0])


def round_trip(pool: ProcessPoolExecutor, shape, seed: int, prefix: str | None) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    image = take(pool.submit(_make, shape, seed, prefix).result())
    probs = image  # stands in for the network's output: as large as its input
    sent = probs if prefix is None else share(probs, prefix)
    first = pool.submit(_check, sent, seed).result()
    release(sent)
    assert first == float(probs.flat[0])
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4,240,240,155")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    megabytes = np.prod(shape) * 4 / 1e6
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(int).result()  # the worker is up
        results = {}
        for name, prefix in (("pipe", None), ("shared memory", batch_prefix())):
            runs = [round_trip(pool, shape, n, prefix) for n in range(args.repeats)]
            wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            results[name] = (wall, cpu)
            print(f"{name:14s} {megabytes:.0f} MB each way: round trip {wall:.3f} s, main process CPU {cpu:.3f} s")
    (pw, pc), (sw, sc) = results["pipe"], results["shared memory"]
    print(f"ratio pipe / shared memory: wall {pw / sw:.2f}x, main process CPU {pc / max(sc, 1e-6):.2f}x")


if __name__ == "__main__":
    main()
