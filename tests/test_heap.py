"""keep_freed_heap_memory: large blocks freed and allocated again stop faulting in fresh pages."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)

# Allocates and frees a 64 MiB array 21 times (a network layer's activations, window after
# window) and prints the minor page faults the last 20 took. The first block is left out: how many
# faults it takes depends on whether the kernel had huge pages free then (not when other processes
# fragment memory, as a parallel test run does), and kept memory is not faulted in again.
PROGRAM = """
import resource, sys
import numpy as np
from tumorseg.heap import keep_freed_heap_memory
if sys.argv[1] == "keep":
    assert keep_freed_heap_memory()
block = np.ones(16 * 1024 * 1024, dtype=np.float32)
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = np.ones(16 * 1024 * 1024, dtype=np.float32)
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_freed_blocks_are_reused_without_new_page_faults():
    default, kept = _faults("default"), _faults("keep")
    # Fault counts depend on page size (numpy asks for huge pages), so compare the two modes.
    assert default >= 20  # glibc maps every block afresh: at least one fault per block
    assert kept * 5 < default  # reused: (almost) no new pages


def test_idempotent():
    from tumorseg.heap import keep_freed_heap_memory

    assert keep_freed_heap_memory() is keep_freed_heap_memory()


def test_users_own_malloc_settings_are_left_alone():
    out = subprocess.run([sys.executable, "-c", "from tumorseg.heap import keep_freed_heap_memory as k; print(k())"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert out.stdout.strip() == "False"
