"""Find the image series under a folder: group DICOM files by SeriesInstanceUID and describe each.

Objects without an image (RTSTRUCT, SEG, SR, presentation states, raw data, spectroscopy ...)
are ignored with a log line. DICOMDIR files and files without the DICOM marker are skipped. A file
that carries the marker but cannot be parsed is refused wherever it is: its series cannot be known,
and skipping it could silently drop an end slice.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from ..errors import InputError
from .files import (check_complete, check_image_header, first_line, has_dicom_marker, header_text, is_valid_uid,
                    read_header, sop_class_name, walk_files)
from .series import PATIENT_STUDY_ATTRIBUTES, PatientStudy, SeriesInfo

log = logging.getLogger(__name__)

_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


def find_series(folder: str | Path) -> list[SeriesInfo]:
    """Every image series under ``folder`` (recursively, any file names), by SeriesInstanceUID.

    Files without the DICOM marker and DICOMDIR files are skipped; objects without an image
    (RTSTRUCT, SEG, SR, presentation states ...) are ignored with a log line, as is a file whose
    SOP Class UID is not a UID unless it shares its series with images. A file that carries the
    DICOM marker but cannot be parsed, or a damaged one in an image series, is refused
    (InputError naming it). Series are returned ordered by SeriesNumber, then description.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError("folder not found", folder)
    if not folder.is_dir():
        raise InputError("not a folder (give the folder that holds the DICOM files)", folder)
    groups: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    ignored: dict[tuple[str, str], list[Path]] = defaultdict(list)
    unknown_class: dict[str, Path] = {}  # series UID -> a file whose SOP Class UID is no UID
    for path in walk_files(folder):
        header = read_header(path)
        if header is None:
            continue
        try:
            if not is_valid_uid(header_text(header, "SOPClassUID").rstrip("\0")):
                unknown_class.setdefault(header_text(header, "SeriesInstanceUID"), path)
                continue
            reason = _non_image_reason(header)
            if reason is not None:
                ignored[(header_text(header, "SeriesInstanceUID"), reason)].append(path)
                continue
        except Exception as e:  # a damaged value among the few it reads
            raise InputError(f"a DICOM file that cannot be parsed (truncated or corrupt: {first_line(e)}); "
                             "remove or replace it", path) from None
        check_image_header(header, path)
        check_complete(header, path)
        groups[str(header.SeriesInstanceUID)].append((path, header))
    for series_uid, path in unknown_class.items():
        # Damaged rather than another kind of object when its series is an image series: skipped,
        # it would leave a gap refused with the wrong reason (or none, at the end of the stack).
        if series_uid in groups:
            raise InputError("SOPClassUID is not a valid DICOM UID (digits and dots, at most 64 characters); "
                             "the file is damaged", path)
        ignored[(series_uid, "a SOP Class UID that is not a UID")].append(path)
    for (_, reason), paths in ignored.items():
        # File names at debug level only: exporters put patient names and IDs in them.
        log.info("ignored %d non-image object(s) (%s)", len(paths), reason)
        log.debug("the first of them: %s", paths[0])
    series = [_series_info(uid, members) for uid, members in groups.items()]
    series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_description,
                               s.series_uid))
    log.debug("searched %s", folder)  # folder names may be patient names: debug only
    log.info("found %d image series: %s", len(series),
             "; ".join(f"{s.label} ({len(s.paths)} files)" for s in series) or "none")
    return series


def looks_like_dicom_folder(folder: str | Path, max_files: int = 200) -> bool:
    """True when a file with the DICOM marker lies under ``folder`` (checks up to ``max_files``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    for n, path in enumerate(walk_files(folder)):
        if n >= max_files:
            return False
        if has_dicom_marker(path):
            return True
    return False

def _non_image_reason(header) -> str | None:
    """Why an object is not an image tumorseg can stack, or None when it is one."""
    uid = str(header.SOPClassUID)
    name = sop_class_name(uid)
    modality = str(header.get("Modality", "") or "?")
    if name and "Image Storage" not in name:
        return f"{modality}, {name}"
    if uid.startswith(_SECONDARY_CAPTURE_PREFIX):
        return f"{modality}, {name or uid} (a screen capture, no patient geometry)"
    if "Rows" not in header or "Columns" not in header:
        return f"{modality}, {name or uid} without Rows/Columns"
    return None


def _series_info(uid: str, members: list[tuple[Path, object]]) -> SeriesInfo:
    first = members[0][1]
    number = first.get("SeriesNumber", None)
    try:
        series_number = None if number in (None, "") else int(number)
    except (TypeError, ValueError):
        series_number = None
    image_type = first.get("ImageType", ())
    if isinstance(image_type, str):
        image_type = (image_type,)
    return SeriesInfo(
        series_uid=uid,
        study_uid=header_text(first, "StudyInstanceUID"),
        frame_of_reference_uid=header_text(first, "FrameOfReferenceUID"),
        sop_class_uid=header_text(first, "SOPClassUID"),
        modality=header_text(first, "Modality"),
        series_number=series_number,
        series_description=header_text(first, "SeriesDescription"),
        protocol_name=header_text(first, "ProtocolName"),
        image_type=tuple(str(v).strip().upper() for v in image_type),
        contrast_agent=_contrast_agent(first),
        # Enhanced MR images name the sequence PulseSequenceName.
        sequence_name=header_text(first, "SequenceName") or header_text(first, "PulseSequenceName"),
        paths=tuple(p for p, _ in members),
        patient=_patient_study(first),
    )


def _contrast_agent(header) -> str:
    """ContrastBolusAgent, or the coded agent of an enhanced image (Enhanced Contrast/Bolus module)."""
    text = header_text(header, "ContrastBolusAgent")
    if text:
        return text
    for item in header.get("ContrastBolusAgentSequence", None) or []:
        meaning = header_text(item, "CodeMeaning")
        if meaning:
            return meaning
    return ""


def _patient_study(header) -> PatientStudy:
    return PatientStudy(*(header_text(header, k) for k in PATIENT_STUDY_ATTRIBUTES))

