"""Received instances on disk: ``studies/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``,
each written atomically and fsynced (file and folder) before the sender hears success. Paths are
built only from UIDs that passed :func:`tumorseg.dicom.files.is_valid_uid` (digits and dots)."""
from __future__ import annotations

import os
from pathlib import Path

import tempfile

from ..dicom.files import is_valid_uid


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("studies", "results", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for left in (self.root / "tmp").iterdir():  # partial writes of a killed node
            left.unlink(missing_ok=True)

    def study_folder(self, study_uid: str) -> Path:
        if not is_valid_uid(study_uid):
            raise ValueError("not a valid StudyInstanceUID")
        return self.root / "studies" / study_uid

    def results_folder(self, key: str, generation: int) -> Path:
        return self.root / "results" / key / f"g{int(generation)}"

    def _instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise ValueError("an instance UID is not a valid DICOM UID")
        return self.study_folder(study_uid) / series_uid / f"{sop_uid}.dcm"

    def stored_size(self, study_uid: str, series_uid: str, sop_uid: str) -> int:
        """The size of the instance already stored under these UIDs (0 when there is none): a
        sender that sends a study again replaces its files, and they count once."""
        try:
            return self._instance_path(study_uid, series_uid, sop_uid).stat().st_size
        except FileNotFoundError:
            return 0

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one instance durably; the UIDs must be valid (ValueError otherwise)."""
        path = self._instance_path(study_uid, series_uid, sop_uid)
        folder = path.parent
        new_folder = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        # Written under tmp/ (same file system), fsynced, then renamed into place: a kill never
        # leaves a partial file among a study's instances.
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", suffix=".dcm")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(folder)
        if new_folder:
            _fsync_dir(folder.parent)
            _fsync_dir(folder.parent.parent)
        return path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
