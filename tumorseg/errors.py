"""The exception hierarchy and the exit codes the CLI maps them to.

Every error a user can cause is a :class:`TumorsegError`; its message names the file (or option)
and the offending value, and says what to do next where that is known.
"""
from __future__ import annotations

from pathlib import Path


class TumorsegError(Exception):
    """Base class of the errors tumorseg reports to users (never a bug)."""

    exit_code = 1
    code = "error"

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        message = " ".join(message.split())  # one line: a library's text or a matrix folded in
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(TumorsegError):
    """An input scan cannot be read or is unfit for segmentation (missing, corrupt, NaN, constant)."""

    exit_code = 3
    code = "input"


class GeometryError(TumorsegError):
    """An input's geometry is unusable or inconsistent (2D, shapes or affines that disagree)."""

    exit_code = 4
    code = "geometry"


class ModelError(TumorsegError):
    """A model card or its weights are missing, malformed, or fail the checksum."""

    exit_code = 5
    code = "model"


class ConfigError(TumorsegError):
    """A pipeline file or option value is invalid."""

    exit_code = 6
    code = "config"


class SequenceError(TumorsegError):
    """Inputs cannot be mapped to the model's sequences unambiguously."""

    exit_code = 7
    code = "sequence"


#: Exit code of ``tumorseg batch`` (and ``validate``) when it finished but some cases failed.
SOME_CASES_FAILED = 8

#: Exit code after Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130

#: Exit codes of the command-line interface; docs/cli.md has the same table (tested).
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "internal error (a bug: rerun with --verbose and report it)",
    2: "usage error (unknown option, missing argument)",
    InputError.exit_code: "input error: a scan is missing, unreadable, truncated, NaN/inf or constant, or a label map holds values its scheme does not define",
    GeometryError.exit_code: "geometry error: 2D image, non-channel 4D file, unknown orientation, channels that disagree",
    ModelError.exit_code: "model error: model card or weights missing, malformed, or checksum mismatch",
    ConfigError.exit_code: "configuration error: invalid pipeline file or option value, or an output folder "
                           "that cannot be written or that another batch is writing into",
    SequenceError.exit_code: "sequence error: inputs cannot be mapped to the model's sequences",
    SOME_CASES_FAILED: "batch (and validate) finished, but some cases failed: see the manifest",
    INTERRUPTED: "interrupted",
}
