"""Arrays between batch processes through shared memory: lifetimes, cleanup and the pipe fallback."""
from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from tumorseg.batch import shared
from tumorseg.batch.shared import SharedArray, batch_prefix, release, remove_leftovers, share, take

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs Linux's /dev/shm")


def _blocks(prefix: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(prefix + "*"))


def test_shared_array_round_trip_and_unlink_on_take():
    prefix = batch_prefix()
    array = np.random.default_rng(0).normal(size=(4, 9, 8, 7)).astype(np.float32)
    handle = share(array, prefix)
    assert isinstance(handle, SharedArray) and len(_blocks(prefix)) == 1
    assert len(pickle.dumps(handle)) < 300  # what crosses the pipe: a name, a shape, a dtype
    received = take(pickle.loads(pickle.dumps(handle)))
    assert _blocks(prefix) == []  # unlinked as soon as it was mapped ...
    assert received.dtype == np.float32 and np.array_equal(received, array)  # ... and still readable
    received += 1  # writable, like the array a pipe would have delivered
    assert np.array_equal(received, array + 1)


def test_release_and_leftovers():
    prefix = batch_prefix()
    release(share(np.ones(10), prefix))
    assert _blocks(prefix) == []
    share(np.ones(10), prefix), share(np.zeros((0, 3)), prefix)  # a dead worker's blocks
    assert len(_blocks(prefix)) == 2
    assert remove_leftovers(prefix) == 2 and _blocks(prefix) == []
    release(np.ones(3))  # an array that went through the pipe: nothing to free


def test_falls_back_to_the_pipe_when_shared_memory_lacks_room(monkeypatch, caplog):
    prefix = batch_prefix()

    def full(fd, offset, length):  # as /dev/shm of a container started without --shm-size
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setattr(shared, "_warned", False)
    array = np.arange(12.0)
    assert share(array, prefix) is array and _blocks(prefix) == []  # nothing half-made left behind
    assert take(array) is array
    assert "cannot hold" in caplog.text and "--shm-size" in caplog.text
    share(array, prefix)
    assert caplog.text.count("cannot hold") == 1  # one warning per process, not one per case


def test_space_is_reserved_before_writing():
    """posix_fallocate makes the pages the block's own: a full /dev/shm fails the call instead of
    killing the process with SIGBUS when it writes."""
    prefix = batch_prefix()
    handle = share(np.ones((64, 64), np.float32), prefix)
    assert isinstance(handle, SharedArray)
    assert handle.path.stat().st_blocks * 512 >= 64 * 64 * 4
    release(handle)
