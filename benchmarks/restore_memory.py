"""Memory and time of putting the network's output back on the input grid and decoding it, against
the way it was done before 2026-12-08 (all classes resized, un-oriented and copied at once, then
``np.argmax``), in the same run, on a synthetic 4-class output.

    python benchmarks/restore_memory.py [--shape 512,512,400] [--model-shape 171,171,133]

Prints numpy's peak allocation (tracemalloc) and seconds for each, their ratios, and whether the
label maps are identical (they must be).
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from tumorseg.labels import get_scheme
from tumorseg.stages import decode, geometry


def _before(probs: np.ndarray, transform: geometry.GridTransform) -> np.ndarray:
    """The pre-2026-12-08 restore and argmax, kept here as the baseline."""
    probs = probs[(slice(None),) + tuple(slice(a, a + n) for n, (a, _) in zip(transform.resampled_shape,
                                                                           transform.mirrored))]
    probs = geometry._unorient(geometry._resize(probs, transform.oriented_shape), transform.orientation)
    full = np.zeros((probs.shape[0],) + transform.input_shape, dtype=np.float32)
    full[0] = 1.0
    full[(slice(None),) + tuple(slice(a, b) for a, b in transform.crop)] = probs
    return get_scheme("msd").class_values[np.argmax(full, axis=0)]


def _now(probs: np.ndarray, transform: geometry.GridTransform) -> np.ndarray:
    full = geometry.probabilities_to_input_grid(probs, transform)
    return decode.decode(full, get_scheme("msd"), None, transform.input_voxel_ml)


def _measure(fn, *args):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        out = fn(*args)
        return out, tracemalloc.get_traced_memory()[1], time.perf_counter() - start
    finally:
        tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512,512,400")
    parser.add_argument("--model-shape", default="171,171,133")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    model_shape = tuple(int(v) for v in args.model_shape.split(","))
    transform = geometry.GridTransform(input_shape=shape, crop=tuple((0, n) for n in shape),
                                       orientation=((0, -1), (1, -1), (2, 1)), oriented_shape=shape,
                                       resampled_shape=model_shape, input_voxel_ml=0.001, model_affine=np.eye(4))
    probs = np.random.default_rng(0).random((4,) + model_shape).astype(np.float32)
    before, peak_before, s_before = _measure(_before, probs, transform)
    now, peak_now, s_now = _measure(_now, probs, transform)
    print(f"before: {peak_before / 2**30:.2f} GiB peak, {s_before:.1f} s")
    print(f"now:    {peak_now / 2**30:.2f} GiB peak, {s_now:.1f} s")
    print(f"ratio now/before: memory {peak_now / peak_before:.2f}, time {s_now / s_before:.2f}; "
          f"labels identical: {np.array_equal(before, now)}")


if __name__ == "__main__":
    main()
