"""Arrays handed between batch processes through shared memory instead of a pipe.

In a pipelined batch the main process receives each prepared scan from a worker and sends its
probabilities to another: on a BraTS-sized case at 1 mm that is about 143 MB each way. Through
the executor's pipe each is pickled, written, read and unpickled by threads of the main process,
which then hold the interpreter lock that the network's launches need. A :class:`SharedArray`
is a name, a shape and a dtype: only that travels, and the receiver maps the same pages.

A block is a file in ``/dev/shm`` (Linux's RAM file system for POSIX shared memory). Ownership:
whoever reads a block unlinks it at once (:func:`take`; its mapping stays valid as long as the
array lives), the main process unlinks the probabilities it shared once their case is
collected, whatever the outcome, and blocks that a dead worker left behind carry the batch's
name prefix and are removed by :func:`remove_leftovers` when the batch ends.

``/dev/shm`` is often small in containers (Docker: 64 MB unless ``--shm-size``), and writing to
a file there past its free space kills the process with SIGBUS. So a block's pages are reserved
(``posix_fallocate``) before anything is written; when they cannot be, or there is no
``/dev/shm``, :func:`share` hands back the array itself, which then goes through the pipe as
before (with one warning per process).
"""
from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_warned = False


def batch_prefix() -> str:
    """A name prefix for one batch's blocks: this process and a random part."""
    return f"tumorseg-{os.getpid()}-{secrets.token_hex(4)}-"


_PREFIX = re.compile(r"tumorseg-(\d+)-[0-9a-f]{8}-")


def prefix_pid(text: str) -> int | None:
    """The process id in a :func:`batch_prefix`, or None when ``text`` is not one."""
    match = _PREFIX.fullmatch(text)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class SharedArray:
    """A picklable handle on an array in a shared memory block."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def path(self) -> Path:
        return SHM_DIR / self.name

    @classmethod
    def put(cls, array: np.ndarray, prefix: str) -> SharedArray:
        """Copy ``array`` into a new block (which outlives this call and this process); OSError
        (ENOSPC) when /dev/shm cannot hold it, and then nothing is left behind."""
        array = np.ascontiguousarray(array)
        handle = cls(prefix + secrets.token_hex(8), tuple(array.shape), array.dtype.str)
        size = max(1, array.nbytes)
        fd = os.open(handle.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # reserve every page now: no SIGBUS while copying
            with mmap.mmap(fd, size) as pages:
                np.frombuffer(pages, dtype=array.dtype, count=array.size).reshape(array.shape)[...] = array
        except BaseException:
            handle.unlink()
            raise
        finally:
            os.close(fd)
        return handle

    def read(self) -> np.ndarray:
        """The array on the block's pages (no copy); they stay mapped exactly as long as the
        array, or a view of it, lives."""
        with open(self.path, "r+b") as file:
            pages = mmap.mmap(file.fileno(), 0)
        return np.frombuffer(pages, dtype=np.dtype(self.dtype), count=int(np.prod(self.shape))).reshape(self.shape)

    def unlink(self) -> None:
        """Free the block once no process maps it any more."""
        self.path.unlink(missing_ok=True)


def share(array: np.ndarray, prefix: str) -> np.ndarray | SharedArray:
    """A handle on a shared copy of ``array``, or ``array`` itself where shared memory lacks room."""
    global _warned
    try:
        return SharedArray.put(array, prefix)
    except OSError as e:
        if not _warned:
            _warned = True
            log.warning("shared memory (%s) cannot hold %.0f MB (%s): arrays go through the pipe, which is "
                        "slower; give it room (docker run --shm-size)", SHM_DIR, array.nbytes / 1e6, e.strerror or e)
        return array


def take(value: np.ndarray | SharedArray) -> np.ndarray:
    """The array behind what :func:`share` returned; a shared block is unlinked once mapped."""
    if not isinstance(value, SharedArray):
        return value
    try:
        return value.read()
    finally:
        value.unlink()


def release(value: np.ndarray | SharedArray) -> None:
    """Free what :func:`share` returned without reading it."""
    if isinstance(value, SharedArray):
        value.unlink()


def remove_leftovers(prefix: str) -> int:
    """Unlink blocks named with ``prefix`` that are still there; how many there were."""
    paths = list(SHM_DIR.glob(prefix + "*")) if SHM_DIR.is_dir() else []
    for path in paths:
        path.unlink(missing_ok=True)
    return len(paths)
