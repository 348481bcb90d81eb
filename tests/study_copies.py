"""Copies of a DICOM series as new studies, each with its own UIDs (for tests and benchmarks that
send many studies to the node), and a free TCP port on 127.0.0.1."""
from __future__ import annotations

import socket
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_as_new_studies(source: Path, target: Path, count: int) -> list[Path]:
    """``count`` folders ``target/study<k>``, each a copy of the series in ``source`` with new
    study, series, frame of reference and instance UIDs."""
    folders = []
    for k in range(count):
        folder = target / f"study{k}"
        folder.mkdir(parents=True)
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        for path in sorted(source.glob("*.dcm")):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(folder / path.name)
        folders.append(folder)
    return folders
