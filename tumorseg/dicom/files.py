"""DICOM files: recognising them, parsing headers, and the small helpers every reader module shares.

Nothing here knows about series; :mod:`tumorseg.dicom.find` groups the files this reads.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import GeometryError, InputError
from ..logredact import without_quoted

log = logging.getLogger(__name__)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: The UIDs an image must carry valid: digits and dots (PS3.5 9.1; leading zeros, which some old
#: scanners write, are let through), at most 64 characters. Checked before they name a spool
#: file, an RTSTRUCT reference or a dictionary key.
IMAGE_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
#: Largest magnitude of a position or spacing (mm) in an image header; larger is a damaged header.
MAX_HEADER_MM = 1e6


def walk_files(folder: Path) -> Iterable[Path]:
    """Every file under ``folder``, recursively, in a fixed (sorted) order."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path.is_file():
                yield path


def has_dicom_marker(path: Path) -> bool:
    """The file carries the DICOM marker ('DICM' after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_dataset(path: Path, **kwargs):
    """``pydicom.dcmread`` that also reads files without the 128-byte preamble (and file meta).

    Some exporters write the file meta, or (ACR-NEMA style) the data set, straight away; pydicom
    then needs ``force``. Without file meta it knows the encoding only by guessing, so that guess
    is recorded as the transfer syntax the pixel decoder asks for.
    """
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if has_dicom_marker(path):
        return pydicom.dcmread(path, **kwargs)
    ds = pydicom.dcmread(path, force=True, **kwargs)
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit
                                          else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def shallow_copy(dataset):
    """A new data set sharing ``dataset``'s elements (and file meta): replace them in the copy, never
    assign into them."""
    from pydicom.dataset import Dataset

    out = Dataset()
    out.file_meta = getattr(dataset, "file_meta", Dataset())
    out.update(dataset)
    return out


def can_decode(transfer_syntax: str) -> bool:
    """pydicom has a decoder for ``transfer_syntax`` (a UID) installed here."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    try:
        return bool(get_decoder(UID(transfer_syntax)).is_available)
    except NotImplementedError:
        return False


def read_header(path: Path):
    """The file's header without pixel data, or None when the file is not a DICOM object."""
    import pydicom

    if path.name.upper() == "DICOMDIR":
        log.debug("skipped DICOMDIR %s", path)
        return None
    if not has_dicom_marker(path):
        # Files without the 128-byte preamble start straight with their file meta (group 0002) or,
        # from old exporters, their data set (group 0008); skipping one could drop an end slice.
        try:
            with open(path, "rb") as f:
                start = f.read(4)
        except OSError as e:
            raise InputError(f"cannot read the file ({e.strerror})", path) from None
        if start[:2] not in (b"\x08\x00", b"\x02\x00"):
            log.debug("skipped non-DICOM file %s", path)
            return None
        try:
            # As for files with the marker: pixel data located, not read (see _check_complete).
            header = read_dataset(path, defer_size=1024)
        except Exception:  # a guess that failed: not a DICOM file after all
            log.debug("skipped non-DICOM file %s", path)
            return None
        if "SOPClassUID" not in header or "SeriesInstanceUID" not in header:
            log.debug("skipped non-DICOM file %s", path)
            return None
        return header
    try:
        # Values over 1 KiB (pixel data, vendor blobs) are not read now, only located.
        header = pydicom.dcmread(path, defer_size=1024)
    except Exception as e:  # pydicom's parser raises many types (zlib.error for a false deflate syntax)
        raise InputError(
            f"a DICOM file that cannot be parsed (truncated or corrupt: {first_line(e)}); "
            "remove or replace it", path,
        ) from None
    sop_class = str(getattr(header, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
    if sop_class == DICOMDIR_SOP_CLASS or str(header.get("SOPClassUID", "")) == DICOMDIR_SOP_CLASS:
        log.debug("skipped DICOMDIR %s", path)
        return None
    missing = [a for a in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID") if a not in header]
    if missing:
        raise InputError(
            f"a DICOM file without {', '.join(missing)} (truncated or not a stored instance); "
            "remove or replace it", path,
        )
    return header


def check_image_header(header, path: Path) -> None:
    """For an image tumorseg will stack: every element converted now (pydicom converts raw values
    when first used, so a damaged value fails here, as a named refusal, not in whichever stage
    first reads it) and its UIDs valid. Not applied to objects that are ignored (SR, RTSTRUCT ...):
    an odd one of those must not refuse the folder."""
    try:
        convert_all(header.file_meta)
        convert_all(header)
    except Exception as e:
        raise InputError(f"a DICOM file that cannot be parsed (truncated or corrupt: {first_line(e)}); "
                         "remove or replace it", path) from None
    check_uids(header, path)


def convert_all(dataset) -> None:
    """Convert every element now (pydicom converts raw values when first used), so a damaged
    value fails here, as a named refusal, not in whichever stage first reads it; values that
    were deferred (over ``defer_size``) stay unread."""
    from pydicom.dataelem import RawDataElement

    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            continue  # deferred: located, not read
        element = dataset[tag]
        if element.VR == "SQ":
            for item in element.value:
                convert_all(item)


def check_uids(header, path: Path) -> None:
    """Refuse a header whose UIDs (:data:`IMAGE_UIDS`, where present) are not valid UIDs; the
    value is not shown (it could hold anything, a name included)."""
    for keyword in IMAGE_UIDS:
        if keyword not in header:
            continue
        try:
            value = header[keyword].value
        except Exception:  # pydicom could not even decode the element
            value = None
        text = value if isinstance(value, str) else None
        if keyword in ("StudyInstanceUID", "FrameOfReferenceUID") and text is not None and not text.strip():
            continue  # empty where optional: the series' own checks decide
        if text is None or not is_valid_uid(text.strip("\0 ")):
            raise InputError(f"{keyword} is not a valid DICOM UID (digits and dots, at most 64 "
                             "characters); the file is damaged", path)


def is_valid_uid(text: str) -> bool:
    """Digits and dots, at most 64 characters (:data:`IMAGE_UIDS`): safe as a file name too."""
    return isinstance(text, str) and len(text) <= 64 and _UID.fullmatch(text) is not None


def numbers(header, keyword: str, count: int, path: Path) -> list[float]:
    """A numeric attribute's ``count`` values as floats; refused, naming the attribute (not its
    value, which could be any text), when they are text, NaN, infinite, absurdly large or too few
    or many."""
    raw = header.get(keyword, None)
    values = list(raw) if hasattr(raw, "__iter__") and not isinstance(raw, (str, bytes)) else [raw]
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(f"{keyword} does not hold numbers; the file is damaged", path) from None
    if len(floats) != count:
        raise GeometryError(f"{keyword} holds {len(floats)} values, not {count}; the file is damaged", path)
    if not all(math.isfinite(v) and abs(v) <= MAX_HEADER_MM for v in floats):
        raise GeometryError(f"{keyword} holds NaN, infinite or absurdly large values; the file is damaged", path)
    return floats


def whole_number(header, keyword: str, path: Path, default: int | None = None) -> int:
    """A positive integer attribute (Rows, Columns, BitsAllocated), refused by name when it is not
    one; ``default`` where it is absent or empty, when given."""
    raw = header.get(keyword, None)
    if default is not None and raw in (None, ""):
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = 0
    if value <= 0:
        raise InputError(f"{keyword} is not a positive whole number; the file is damaged", path)
    return value


def check_complete(header, path: Path) -> None:
    """Refuse an image file cut short: pydicom parses a truncated file silently, as far as it goes.

    An image without pixel data was cut before it; pixel data that would end beyond the end of
    the file was cut inside it (checked on the undecoded element, so no pixel data is read).
    """
    if not any(k in header for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InputError(
            "an image file without pixel data: the file is truncated or damaged; remove or "
            "replace it (copy it again from the source)", path,
        )
    raw = getattr(header, "_dict", {}).get(0x7FE00010)
    tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
    if tell is None or length in (None, 0xFFFFFFFF):
        return
    size = path.stat().st_size
    if tell + length > size:
        raise InputError(
            f"truncated pixel data: {max(size - tell, 0)} of {length} bytes; the file is damaged "
            "(copy it again from the source)", path,
        )


def sop_class_name(uid: str) -> str:
    """The SOP class's name ('Enhanced MR Image Storage'), or "" when pydicom does not know it."""
    from pydicom.uid import UID

    name = UID(uid).name
    return "" if name == uid else name


def header_text(header, keyword: str) -> str:
    """An attribute's value as stripped text ("" when absent or empty)."""
    value = header.get(keyword, "")
    return "" if value is None else str(value).strip()


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type's name), quoted values
    removed: a DICOM library quotes the header value it failed on, and that may be a name."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return without_quoted(lines[0]) if lines else type(e).__name__
