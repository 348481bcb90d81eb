"""The batch's manifest (``OUT/manifest.csv`` and ``manifest.json``, rewritten atomically after
every case) and the lock that keeps a second batch out of the same output folder."""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import write_bytes_atomic
from ..errors import ConfigError
from .layout import LOCK_FILE, MANIFEST_COLUMNS, MANIFEST_CSV, MANIFEST_JSON
from .records import CaseOutcome, remove_stale_partials
from .shared import prefix_pid, remove_leftovers

log = logging.getLogger("tumorseg.batch.runner")


def write_manifest(output: Path, outcomes: list[CaseOutcome], cases_total: int, fingerprint: dict[str, str],
                   final: bool, run: dict[str, Any]) -> None:
    """Both manifest files for the batch so far; ``run``: the batch's own entries (seconds, the
    network's busy share, workers, model, configuration)."""
    rows = [o.row(fingerprint) for o in outcomes]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(output / MANIFEST_CSV, buffer.getvalue().encode())
    document = {
        "tumorseg_version": __version__,
        "complete": final,
        "cases_total": cases_total,
        "counts": {
            "ok": sum(o.status == "ok" for o in outcomes),
            "failed": sum(o.status != "ok" for o in outcomes),
            "reused": sum(o.reused for o in outcomes),
            "pending": cases_total - len(outcomes),
        },
        **run,
        "cases": rows,
    }
    write_bytes_atomic(output / MANIFEST_JSON, (json.dumps(document, indent=2) + "\n").encode())


@contextlib.contextmanager
def exclusive_output(output: Path, shm_prefix: str) -> Iterator[None]:
    """Hold ``OUT/.batch.lock`` for the batch, or refuse when another batch holds it.

    The kernel drops an flock when its holder dies, even by SIGKILL, so a lock is never stale.
    The file keeps the holder's shared memory prefix: the next batch to get the lock removes
    the blocks a killed one left in /dev/shm (about 143 MB each), and the temporaries of its
    manifest. Without a lock (a file system that has none) nothing is removed: another batch
    may be running.
    """
    try:
        output.mkdir(parents=True, exist_ok=True)
        fd = os.open(output / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot write into the output folder ({e.strerror})", output) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise ConfigError("another tumorseg batch is writing into this folder; let it finish, "
                              "or give this one another -o", output) from None
        except OSError as e:  # e.g. ENOLCK on some network shares: run unguarded
            log.warning("cannot lock %s (%s): nothing stops a second batch into this folder",
                        output / LOCK_FILE, e.strerror)
            locked = False
        if locked:
            previous = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            pid = prefix_pid(previous)
            if pid is not None and not _process_alive(pid):
                left = remove_leftovers(previous)
                if left:
                    log.info("removed %d shared memory blocks left by a killed batch", left)
            remove_stale_partials(output)
            os.ftruncate(fd, 0)
            os.pwrite(fd, shm_prefix.encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (a copied folder's lock file may name a live batch)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    return True
