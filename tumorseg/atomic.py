"""Atomic file writes: a reader never sees a half-written file at a final path."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: Path, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it is fsynced and renamed onto it.

    ``private``: readable by its owner only (0600); otherwise the usual mode under the umask.

    On any exception the temporary file is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffixes so writers that choose a format by extension (.nii.gz) still work.
    suffix = "".join(final.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".partial{suffix}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        if not private:
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes_atomic(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def check_output_folder(folder: Path) -> None:
    """Refuse, before any work, an output folder that cannot be created or written (ConfigError).

    Checked by trying, not by ``os.access`` (which passes for root under /proc or /sys): the
    folder is made, a file written in it and removed, and the folders this made are removed
    again, so a run that fails later leaves nothing behind."""
    from .errors import ConfigError

    folder = Path(folder)
    made: list[Path] = []
    try:
        if folder.is_symlink() and not folder.exists():
            raise ConfigError(f"cannot write the output folder {folder}: it is a symbolic link to nothing", folder)
        existing = folder
        while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
            made.append(existing)
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"cannot write the output folder {folder}: {existing} is a file, not a folder",
                              existing)
        for path in reversed(made):
            path.mkdir()
        fd, probe = tempfile.mkstemp(prefix=".tumorseg-write-test.", dir=folder)
        try:
            os.write(fd, b"tumorseg")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"cannot write the output folder {folder}: {e.strerror or type(e).__name__}", folder) from None
    finally:
        for path in made:  # deepest first
            try:
                path.rmdir()
            except OSError:
                pass
