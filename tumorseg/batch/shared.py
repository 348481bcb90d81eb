"""Arrays handed between batch processes through shared memory instead of a pipe.

In a pipelined batch the main process receives each prepared scan from a worker and sends its
probabilities to another: on a BraTS-sized case at 1 mm that is about 143 MB each way. Through
the executor's pipe each is pickled, written, read and unpickled by threads of the main process,
which then hold the interpreter lock that the network's launches need. A :class:`SharedArray`
is a name, a shape and a dtype: only that travels, and the receiver maps the same pages.

Ownership: whoever reads a block unlinks it at once (:func:`take`; its mapping stays valid as
long as the array lives), the main process unlinks the probabilities it shared once their case
is collected, whatever the outcome, and blocks that a dead worker left behind carry the batch's
name prefix and are removed by :func:`remove_leftovers` when the batch ends.

Shared memory is a RAM file system (``/dev/shm``) that containers often keep small (Docker: 64
MB unless ``--shm-size``); writing past its end kills the process with SIGBUS. So :func:`share`
checks the free space first and, when it lacks room, hands back the array itself, which then
goes through the pipe as before.
"""
from __future__ import annotations

import logging
import mmap
import os
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Where Linux shows POSIX shared memory blocks as files.
_SHM_DIR = Path("/dev/shm")


def batch_prefix() -> str:
    """A name prefix for one batch's blocks: this process and a random part."""
    return f"tumorseg-{os.getpid()}-{secrets.token_hex(4)}-"


@dataclass(frozen=True)
class SharedArray:
    """A picklable handle on an array in a named shared memory block."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def put(cls, array: np.ndarray, prefix: str) -> SharedArray:
        """Copy ``array`` into a new block (which outlives this call and this process)."""
        array = np.ascontiguousarray(array)
        block = shared_memory.SharedMemory(name=prefix + secrets.token_hex(8), create=True,
                                           size=max(1, array.nbytes))
        try:
            np.ndarray(array.shape, array.dtype, buffer=block.buf)[...] = array
        except BaseException:
            block.close()
            block.unlink()
            raise
        handle = cls(block.name, tuple(array.shape), array.dtype.str)
        block.close()
        return handle

    def read(self) -> np.ndarray:
        """The array. On Linux the block's pages are mapped, not copied, and stay mapped exactly
        as long as the array (or a view of it) lives; elsewhere it is a copy."""
        count = int(np.prod(self.shape))
        path = _SHM_DIR / self.name
        if path.is_file():
            with open(path, "r+b") as file:
                pages = mmap.mmap(file.fileno(), 0)
            return np.frombuffer(pages, dtype=np.dtype(self.dtype), count=count).reshape(self.shape)
        block = shared_memory.SharedMemory(name=self.name)
        try:
            return np.ndarray(self.shape, np.dtype(self.dtype), buffer=block.buf).copy()
        finally:
            block.close()

    def unlink(self) -> None:
        """Free the block (mappings still open elsewhere stay valid until closed)."""
        try:
            block = shared_memory.SharedMemory(name=self.name)
        except FileNotFoundError:
            return
        block.close()
        block.unlink()


#: Free space to leave in /dev/shm for others when sharing an array.
SHM_RESERVE_BYTES = 64 << 20


def share(array: np.ndarray, prefix: str) -> np.ndarray | SharedArray:
    """A handle on a shared copy of ``array``, or ``array`` itself where /dev/shm lacks room."""
    try:
        stats = os.statvfs(_SHM_DIR)
    except OSError:  # no /dev/shm: not Linux
        return array
    if stats.f_bavail * stats.f_frsize < array.nbytes + SHM_RESERVE_BYTES:
        log.debug("/dev/shm lacks room for %d bytes; the array goes through the pipe", array.nbytes)
        return array
    return SharedArray.put(array, prefix)


def take(value: np.ndarray | SharedArray) -> np.ndarray:
    """The array behind what :func:`share` returned; a shared block is unlinked once mapped."""
    if not isinstance(value, SharedArray):
        return value
    array = value.read()
    value.unlink()
    return array


def release(value: np.ndarray | SharedArray) -> None:
    """Free what :func:`share` returned without reading it."""
    if isinstance(value, SharedArray):
        value.unlink()


def remove_leftovers(prefix: str) -> int:
    """Unlink blocks named with ``prefix`` that are still there; how many there were."""
    if not _SHM_DIR.is_dir():
        return 0
    names = [p.name for p in _SHM_DIR.glob(prefix + "*")]
    for name in names:
        SharedArray(name, (0,), "|u1").unlink()
    return len(names)
