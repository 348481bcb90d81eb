"""Keep freed memory in the process heap instead of handing it back to the kernel at once.

glibc's malloc serves blocks above its mmap threshold (at most 32 MiB by default) with fresh
``mmap`` calls and unmaps them on ``free``; a 3D network's activations are tens of MiB, so every
layer of every window maps new pages and the kernel zeroes them again. On the CPU this cost
tumorseg's inference 40 % of its time (5.4 s against 3.2 s on the example scan, 1.7 million page
faults against 5,000; ``benchmarks/cpu_predict.py``). Raising the mmap and trim thresholds lets
freed blocks be reused, as a caching allocator would. The price: freed heap is not handed
back at once, so a process may keep memory up to its peak use resident until it exits.

Where the user has set glibc's own malloc variables (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, or malloc tunables in ``GLIBC_TUNABLES``) they are left to rule.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

#: Blocks up to this size come from the heap; up to this much free heap is kept at its top.
THRESHOLD_BYTES = 1 << 30
#: The largest mmap threshold that glibc releases which limit it to half a heap accept.
FALLBACK_MMAP_THRESHOLD_BYTES = 32 << 20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3

_applied: bool | None = None


def keep_freed_heap_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where there is no glibc."""
    global _applied
    if _applied is None:
        _applied = _set_thresholds()
    return _applied


def _set_thresholds() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_SETTINGS) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        log.debug("glibc malloc settings come from the environment; left as they are")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mmap_ok = (libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1
                   or libc.mallopt(_M_MMAP_THRESHOLD, FALLBACK_MMAP_THRESHOLD_BYTES) == 1)
        ok = mmap_ok and libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD_BYTES) == 1
    except (OSError, AttributeError):
        return False
    if not ok:
        log.warning("could not raise glibc's malloc thresholds: CPU inference will be slower")
    return ok
