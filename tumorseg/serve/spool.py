"""Received instances on disk: ``studies/<study>/<series>/<instance>.dcm``, each written atomically
and fsynced (file and folder) before the sender hears success. The names are hashes of the
Study, Series and SOP Instance UIDs (:func:`spool_name`), never the UIDs themselves: a vendor's UID
may encode the acquisition date and the scanner's serial number. Only UIDs that pass
:func:`tumorseg.dicom.files.is_valid_uid` are accepted."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import tempfile

from ..dicom.files import is_valid_uid

log = logging.getLogger(__name__)


def spool_name(uid: str) -> str:
    """The file or folder name for a UID: 128 bits of its SHA-256, so two studies never share a folder."""
    return hashlib.sha256(uid.encode()).hexdigest()[:32]


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("studies", "results", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for left in (self.root / "tmp").iterdir():  # partial writes of a killed node
            left.unlink(missing_ok=True)
        self._rename_uid_paths()

    def study_folder(self, study_uid: str) -> Path:
        if not is_valid_uid(study_uid):
            raise ValueError("not a valid StudyInstanceUID")
        return self.root / "studies" / spool_name(study_uid)

    def results_folder(self, key: str, generation: int) -> Path:
        return self.root / "results" / key / f"g{int(generation)}"

    def _instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise ValueError("an instance UID is not a valid DICOM UID")
        return self.study_folder(study_uid) / spool_name(series_uid) / f"{spool_name(sop_uid)}.dcm"

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

    def _rename_uid_paths(self) -> None:
        """Give a spool written before 2026-12-08 (folders and files named by their UIDs) hashed
        names. File by file with os.replace, so a kill part way loses nothing and the next start
        finishes the job; the instances' own headers name their study and series."""
        studies = self.root / "studies"
        old = [folder for folder in studies.iterdir() if _named_by_uid(folder.name)]
        for study in old:
            for series in [s for s in study.iterdir() if s.is_dir() and _named_by_uid(s.name)]:
                target = studies / spool_name(study.name) / spool_name(series.name)
                target.mkdir(parents=True, exist_ok=True)
                for instance in series.glob("*.dcm"):
                    if _named_by_uid(instance.stem):
                        os.replace(instance, target / f"{spool_name(instance.stem)}.dcm")
                _fsync_dir(target)
                _remove_if_empty(series)
            _remove_if_empty(study)
        if old:
            _fsync_dir(studies)
            log.info("spool: %d received studies renamed from their UIDs to hashed names", len(old))


def _named_by_uid(name: str) -> bool:
    # A hashed name is 32 hex digits, never with a dot; every real UID has one ("1.2...", "2.25...").
    return "." in name and is_valid_uid(name)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # something that is not an instance: left for clean_up, which knows the studies
        pass


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
