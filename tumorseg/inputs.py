"""What one case is read from, as light types (no torch, no stage imported): the batch runner,
the DICOM node and the pipeline all name cases with these."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .sequences import StudyInputs


@dataclass(frozen=True)
class DicomInputs:
    """A DICOM study: the folders to search, and series named per sequence (SeriesNumber or UID)."""

    folders: tuple[Path, ...]
    explicit: tuple[tuple[str, str], ...] = ()


#: What one case is read from: image files (or one 4D file), or DICOM folders.
CaseInputs = StudyInputs | DicomInputs
