"""DICOM series in: find the image series under a folder and build one 3D volume per series.

Conventions (the same as the rest of tumorseg and as :mod:`tumorseg.dicom.rtstruct`):

- A series is stacked from ImagePositionPatient (IPP) and ImageOrientationPatient (IOP) only,
  never from SliceLocation, InstanceNumber or file names. The slice normal is
  ``n = row cosine x column cosine`` (the two triplets of IOP); slices are sorted by ``IPP . n``,
  ascending, so the slice axis points along ``+n``.
- The array is float32 of shape ``(I, J, K) = (Columns, Rows, slices)``: ``i`` is the column
  index (along the row cosine), ``j`` the row index (along the column cosine), ``k`` the sorted
  slice index; i.e. each slice's ``pixel_array`` transposed. RescaleSlope/RescaleIntercept are
  applied per slice.
- The affine maps ``(i, j, k, 1)`` to RAS+ mm (nibabel's convention). In LPS (DICOM's patient
  coordinates) its columns are ``row cosine * PixelSpacing[1]``, ``column cosine *
  PixelSpacing[0]``, ``n * slice step`` and the IPP of the first sorted slice; RAS is
  ``diag(-1, -1, 1, 1) @ LPS``. The slice step is ``(IPP . n of the last slice - that of the
  first) / (slices - 1)``.

What is refused, each with a named error that names the file or the series folder:

- a file that carries the DICOM marker but cannot be parsed (truncated or corrupt), wherever it
  is: its series cannot be known, and skipping it could silently drop an end slice
  (:class:`~tumorseg.errors.InputError`);
- pixel data that is truncated or cannot be decoded, and transfer syntaxes pydicom has no
  installed decoder for, naming the syntax (``InputError``);
- multi-frame images (NumberOfFrames > 1) and 4D series: several images at one position that
  differ in EchoNumbers, TemporalPositionIdentifier, AcquisitionTime, TriggerTime or b-value
  (:class:`~tumorseg.errors.GeometryError`);
- mixed orientations (IOP differing by more than :data:`ORIENTATION_TOLERANCE`), mixed
  Rows/Columns or PixelSpacing, a duplicated position (two images at one position that differ in
  nothing else), missing slices (a gap that is a multiple of the usual one), non-uniform spacing
  (a gap more than :data:`GAP_TOLERANCE` off the median gap, or a slice more than
  ``max(SLICE_POSITION_TOLERANCE_MM, GAP_TOLERANCE * step)`` off the uniform grid through the
  first and last slices), gantry tilt or sheared stacks (a slice more than
  :data:`IN_PLANE_TOLERANCE_MM` off the normal through the first slice) (``GeometryError``).

Objects without an image (RTSTRUCT, SEG, SR, presentation states, raw data, spectroscopy ...)
are ignored with a log line. DICOMDIR files and files without the DICOM marker are skipped.

Patient and study attributes are kept on :class:`PatientStudy` for the writers to copy; they are
never logged, and its ``repr`` hides them.
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import GeometryError, InputError
from ..itk import LPS_TO_RAS
from ..stages.read import MAX_VOXELS, Volume, check_values

log = logging.getLogger(__name__)

#: Largest difference between two slices' ImageOrientationPatient values (direction cosines).
ORIENTATION_TOLERANCE = 1e-4
#: Largest difference between two slices' PixelSpacing values, mm.
PIXEL_SPACING_TOLERANCE_MM = 1e-4
#: Largest distance of a slice's IPP from the slice normal through the first slice, mm (larger:
#: gantry tilt or a sheared stack). The RTSTRUCT writer uses the same bound.
IN_PLANE_TOLERANCE_MM = 0.01
#: Largest relative deviation of a gap between neighbouring slices from the median gap.
GAP_TOLERANCE = 0.01
#: Floor of the tolerance for a slice's distance from the uniform grid, mm.
SLICE_POSITION_TOLERANCE_MM = 0.01
#: Two slices closer than this along the normal share one position, mm.
SAME_POSITION_MM = 1e-3

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
# Attributes that tell the images of a 4D series apart at one position (multi-echo, dynamic,
# diffusion, magnitude and phase). AcquisitionTime is last: alone it marks a repeated acquisition.
_FOURTH_DIMENSION = (
    "EchoNumbers", "TemporalPositionIdentifier", "TriggerTime", "DiffusionBValue",
    "InversionTime", "ImageType", "AcquisitionTime",
)
# Header attributes read while scanning a folder (enough to group, describe and stack a series).
_PATIENT_STUDY_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName",
)


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientStudy:
    """Patient and General Study module values of a series, as strings ("" when absent).

    For the RTSTRUCT/SEG writers to copy. Never log these; ``repr`` and ``str`` hide them.
    """

    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    study_id: str
    accession_number: str
    referring_physician_name: str

    def __repr__(self) -> str:
        return "PatientStudy(<not shown: patient data>)"

    __str__ = __repr__

    def as_keywords(self) -> dict[str, str]:
        """The values keyed by DICOM keyword (PatientName, PatientID, ...)."""
        return dict(zip(_PATIENT_STUDY_ATTRIBUTES, (
            self.patient_name, self.patient_id, self.patient_birth_date, self.patient_sex,
            self.study_date, self.study_time, self.study_id, self.accession_number,
            self.referring_physician_name,
        )))


@dataclass(frozen=True)
class SeriesInfo:
    """One image series found under a folder, described from its first file (no geometry yet).

    Everything here but ``patient`` may be logged. ``paths`` are the series' image files in
    file-name order; :func:`read_series` sorts them by position.
    """

    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    modality: str
    series_number: int | None
    series_description: str
    protocol_name: str
    image_type: tuple[str, ...]
    #: ContrastBolusAgent (0018,0010); "" when absent or empty.
    contrast_agent: str
    #: SequenceName (0018,0024), e.g. "*tfl3d1" (Siemens MPRAGE).
    sequence_name: str
    paths: tuple[Path, ...]
    patient: PatientStudy = field(repr=False, compare=False)

    @property
    def label(self) -> str:
        """``series 3 't1_fl2d_sag'``: how logs and messages name a series."""
        number = "?" if self.series_number is None else str(self.series_number)
        return f"series {number} {self.series_description or self.protocol_name or '(no description)'!r}"

    @property
    def folder(self) -> Path:
        """The deepest folder holding all of the series' files."""
        if len(self.paths) == 1:
            return self.paths[0].parent
        return Path(os.path.commonpath([str(p) for p in self.paths]))


@dataclass(frozen=True)
class DicomSeries(SeriesInfo):
    """A series stacked into one regular 3D grid: what the RTSTRUCT/SEG writers need.

    Per-slice tuples (``paths``, ``sop_instance_uids``, ``positions``) are in sorted slice order
    (``k``). ``positions`` are IPP in LPS mm; ``orientation`` is IOP (row cosine, then column
    cosine); ``pixel_spacing`` is PixelSpacing (row spacing, column spacing) in mm;
    ``slice_step`` the distance between neighbouring slices along the normal in mm.
    """

    sop_instance_uids: tuple[str, ...]
    positions: tuple[tuple[float, float, float], ...]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    slice_step: float
    rows: int
    columns: int
    transfer_syntax_uids: tuple[str, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(I, J, K) = (Columns, Rows, slices)."""
        return (self.columns, self.rows, len(self.positions))

    @property
    def normal(self) -> np.ndarray:
        return unit_axes(self.orientation)[2]

    @property
    def lps_affine(self) -> np.ndarray:
        """4x4 map from voxel (i, j, k, 1) to LPS mm."""
        row, col, normal = unit_axes(self.orientation)
        affine = np.eye(4)
        affine[:3, 0] = row * self.pixel_spacing[1]
        affine[:3, 1] = col * self.pixel_spacing[0]
        affine[:3, 2] = normal * self.slice_step
        affine[:3, 3] = np.asarray(self.positions[0], dtype=np.float64)
        return affine

    @property
    def affine(self) -> np.ndarray:
        """4x4 map from voxel (i, j, k, 1) to RAS mm (tumorseg's convention)."""
        return LPS_TO_RAS @ self.lps_affine

    def read_headers(self) -> list:
        """The slices' pydicom Datasets without pixel data, in sorted slice order."""
        return [read_dataset(p, stop_before_pixels=True) for p in self.paths]


# --------------------------------------------------------------------------------------------
# Finding series
# --------------------------------------------------------------------------------------------


def find_series(folder: str | Path) -> list[SeriesInfo]:
    """Every image series under ``folder`` (recursively, any file names), by SeriesInstanceUID.

    Files without the DICOM marker and DICOMDIR files are skipped; objects without an image
    (RTSTRUCT, SEG, SR, presentation states ...) are ignored with a log line. A file that
    carries the DICOM marker but cannot be parsed is refused (InputError naming it). Series are
    returned ordered by SeriesNumber, then description.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError("folder not found", folder)
    if not folder.is_dir():
        raise InputError("not a folder (give the folder that holds the DICOM files)", folder)
    groups: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    ignored: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for path in _walk(folder):
        header = _read_header(path)
        if header is None:
            continue
        reason = _non_image_reason(header)
        if reason is not None:
            ignored[(str(header.get("SeriesInstanceUID", "")), reason)].append(path)
            continue
        _check_complete(header, path)
        groups[str(header.SeriesInstanceUID)].append((path, header))
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
    for n, path in enumerate(_walk(folder)):
        if n >= max_files:
            return False
        if has_dicom_marker(path):
            return True
    return False


def _walk(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path.is_file():
                yield path


def has_dicom_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_orthonormal(iop: Sequence[float]) -> bool:
    """ImageOrientationPatient holds two orthogonal unit vectors (within 1e-3)."""
    row, col = np.asarray(iop[:3], dtype=np.float64), np.asarray(iop[3:], dtype=np.float64)
    return (abs(np.linalg.norm(row) - 1) <= 1e-3 and abs(np.linalg.norm(col) - 1) <= 1e-3
            and abs(row @ col) <= 1e-3)


def unit_axes(iop: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and slice-normal directions of ImageOrientationPatient at unit length.

    Cosines stored to few decimals are not unit length, and the tilt checks measure millimetres
    off the normal (and slices step along it), so every geometry uses these.
    """
    iop = np.asarray(iop, dtype=np.float64)
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def read_dataset(path: Path, **kwargs):
    """``pydicom.dcmread`` that also reads files without the 128-byte preamble and file meta.

    Old exporters (ACR-NEMA style) write the data set straight away; pydicom then needs ``force``
    and knows the encoding only by guessing, so it is recorded as the transfer syntax the pixel
    decoder asks for.
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


def _read_header(path: Path):
    """The file's header without pixel data, or None when the file is not a DICOM object."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if path.name.upper() == "DICOMDIR":
        log.debug("skipped DICOMDIR %s", path)
        return None
    if not has_dicom_marker(path):
        # Old files without the 128-byte preamble start straight with a group 0008 element.
        try:
            with open(path, "rb") as f:
                start = f.read(4)
        except OSError as e:
            raise InputError(f"cannot read the file ({e.strerror})", path) from None
        if start[:2] != b"\x08\x00":
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
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"a DICOM file that cannot be parsed (truncated or corrupt: {_first_line(e)}); "
            "remove or replace it", path,
        ) from None
    sop_class = str(getattr(header, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
    if sop_class == _DICOMDIR_SOP_CLASS or str(header.get("SOPClassUID", "")) == _DICOMDIR_SOP_CLASS:
        log.debug("skipped DICOMDIR %s", path)
        return None
    missing = [a for a in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID") if a not in header]
    if missing:
        raise InputError(
            f"a DICOM file without {', '.join(missing)} (truncated or not a stored instance); "
            "remove or replace it", path,
        )
    return header


def _check_complete(header, path: Path) -> None:
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


def _sop_class_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return "" if name == uid else name


def _non_image_reason(header) -> str | None:
    """Why an object is not an image tumorseg can stack, or None when it is one."""
    uid = str(header.SOPClassUID)
    name = _sop_class_name(uid)
    modality = str(header.get("Modality", "") or "?")
    if name and "Image Storage" not in name:
        return f"{modality}, {name}"
    if uid.startswith(_SECONDARY_CAPTURE_PREFIX):
        return f"{modality}, {name or uid} (a screen capture, no patient geometry)"
    if "Rows" not in header or "Columns" not in header:
        return f"{modality}, {name or uid} without Rows/Columns"
    return None


def _str(header, keyword: str) -> str:
    value = header.get(keyword, "")
    return "" if value is None else str(value).strip()


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
        study_uid=_str(first, "StudyInstanceUID"),
        frame_of_reference_uid=_str(first, "FrameOfReferenceUID"),
        sop_class_uid=_str(first, "SOPClassUID"),
        modality=_str(first, "Modality"),
        series_number=series_number,
        series_description=_str(first, "SeriesDescription"),
        protocol_name=_str(first, "ProtocolName"),
        image_type=tuple(str(v).strip().upper() for v in image_type),
        contrast_agent=_str(first, "ContrastBolusAgent"),
        sequence_name=_str(first, "SequenceName"),
        paths=tuple(p for p, _ in members),
        patient=_patient_study(first),
    )


def _patient_study(header) -> PatientStudy:
    return PatientStudy(*(_str(header, k) for k in _PATIENT_STUDY_ATTRIBUTES))


# --------------------------------------------------------------------------------------------
# Stacking and reading one series
# --------------------------------------------------------------------------------------------


def read_series(series: SeriesInfo | str | Path) -> tuple[Volume, DicomSeries]:
    """Read one series into a float32 volume (I, J, K) with its RAS affine, and its metadata.

    ``series`` is a :class:`SeriesInfo` from :func:`find_series`, or a folder that holds exactly
    one image series. The returned :class:`~tumorseg.stages.read.Volume` has
    ``nifti_header=None`` and ``path`` = the series' folder. See the module docstring for the
    axis and affine conventions and for what is refused.
    """
    if not isinstance(series, SeriesInfo):
        found = find_series(series)
        if len(found) != 1:
            listing = "; ".join(s.label for s in found) or "none"
            raise InputError(
                f"expected one image series in the folder, found {len(found)} ({listing}); "
                "choose one with select_series", series,
            )
        series = found[0]
    dicom = stack_series(series)
    array = _read_pixels(dicom)
    folder = dicom.folder
    check_values(array, folder, allow_constant=False)
    log.info("read %s: %d x %d x %d voxels, %.4g x %.4g x %.4g mm", dicom.label, *dicom.shape,
             dicom.pixel_spacing[1], dicom.pixel_spacing[0], dicom.slice_step)
    return Volume(array, dicom.affine, None, folder), dicom


def stack_series(series: SeriesInfo) -> DicomSeries:
    """Check the series' headers form one regular stack and sort them (no pixel data read)."""
    headers = []
    for path in series.paths:
        try:
            headers.append((path, read_dataset(path, stop_before_pixels=True)))
        except Exception as e:
            raise InputError(f"a DICOM file that cannot be parsed ({_first_line(e)})", path) from None
    headers = _drop_repeated_instances(headers)
    where = series.folder
    _check_single_frame(headers)
    _check_present(headers)
    iop = _common_orientation(headers, series)
    rows, columns, spacing = _common_size(headers, series)
    if rows * columns * len(headers) > MAX_VOXELS:
        raise InputError(f"{series.label} of {columns} x {rows} x {len(headers)} voxels exceeds "
                         f"{MAX_VOXELS} voxels", where)
    if not is_orthonormal(iop):
        raise GeometryError(
            f"{series.label}: ImageOrientationPatient {_fmt(iop)} is not two orthogonal unit "
            "vectors", headers[0][0],
        )
    _, _, normal = unit_axes(iop)
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for _, h in headers])
    z = positions @ normal
    order = np.argsort(z, kind="stable")
    headers = [headers[i] for i in order]
    positions, z = positions[order], z[order]
    _check_repeated_positions(headers, z, series)
    if len(headers) < 2:
        raise GeometryError(f"{series.label} holds a single slice; tumorseg segments 3D volumes",
                            where)
    step = float((z[-1] - z[0]) / (len(z) - 1))
    _check_gaps(headers, z, series)
    _check_grid(headers, positions, z, normal, step, series)
    return DicomSeries(
        series_uid=series.series_uid,
        study_uid=series.study_uid,
        frame_of_reference_uid=series.frame_of_reference_uid,
        sop_class_uid=series.sop_class_uid,
        modality=series.modality,
        series_number=series.series_number,
        series_description=series.series_description,
        protocol_name=series.protocol_name,
        image_type=series.image_type,
        contrast_agent=series.contrast_agent,
        sequence_name=series.sequence_name,
        paths=tuple(p for p, _ in headers),
        patient=series.patient,
        sop_instance_uids=tuple(str(h.SOPInstanceUID) for _, h in headers),
        positions=tuple(tuple(float(v) for v in p) for p in positions),  # type: ignore[misc]
        orientation=tuple(float(v) for v in iop),  # type: ignore[arg-type]
        pixel_spacing=spacing,
        slice_step=step,
        rows=rows,
        columns=columns,
        transfer_syntax_uids=tuple(
            str(getattr(h, "file_meta", {}).get("TransferSyntaxUID", "")) for _, h in headers
        ),
    )


def _drop_repeated_instances(headers: list[tuple[Path, object]]) -> list[tuple[Path, object]]:
    """One file per SOP Instance UID: the same instance stored twice is one image."""
    seen: dict[str, Path] = {}
    kept = []
    copies = 0
    for path, h in headers:
        uid = str(h.SOPInstanceUID)
        if uid in seen:
            copies += 1
            # Names at debug level only: exporters put patient names in file names too.
            log.debug("%s is another copy of the instance in %s", path.name, seen[uid].name)
            continue
        seen[uid] = path
        kept.append((path, h))
    if copies:
        log.warning("skipped %d file(s) holding another copy of an instance already read", copies)
    return kept


def _check_single_frame(headers) -> None:
    for path, h in headers:
        try:
            frames = int(h.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            frames = 1
        if frames > 1:
            name = _sop_class_name(str(h.SOPClassUID)) or str(h.SOPClassUID)
            raise GeometryError(
                f"a multi-frame image ({frames} frames, {name}); tumorseg reads series of "
                "single-frame images only: convert it to NIfTI (e.g. with dcm2niix) and give that",
                path,
            )


def _check_present(headers) -> None:
    needed = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    for path, h in headers:
        missing = [a for a in needed if a not in h or h.get(a) in (None, "")]
        if missing:
            raise GeometryError(
                f"the image lacks {', '.join(missing)}, so its position in the patient is unknown",
                path,
            )


def _common_orientation(headers, series: SeriesInfo) -> np.ndarray:
    iops = np.array([[float(v) for v in h.ImageOrientationPatient] for _, h in headers])
    if iops.shape[1] != 6:
        raise GeometryError(f"ImageOrientationPatient has {iops.shape[1]} values, not 6",
                            headers[0][0])
    worst = np.abs(iops - iops[0]).max(axis=1)
    if worst.max() > ORIENTATION_TOLERANCE:
        k = int(np.argmax(worst))
        raise GeometryError(
            f"mixed orientations in {series.label}: ImageOrientationPatient {_fmt(iops[0])} in "
            f"{headers[0][0].name} but {_fmt(iops[k])} in {headers[k][0].name} (a localizer or "
            "several stacks in one series); choose another series",
            series.folder,
        )
    return iops[0]


def _common_size(headers, series: SeriesInfo) -> tuple[int, int, tuple[float, float]]:
    path0, h0 = headers[0]
    rows, columns = int(h0.Rows), int(h0.Columns)
    spacing = np.array([float(v) for v in h0.PixelSpacing])
    for path, h in headers[1:]:
        if (int(h.Rows), int(h.Columns)) != (rows, columns):
            raise GeometryError(
                f"mixed image sizes in {series.label}: {rows} x {columns} (Rows x Columns) in "
                f"{path0.name} but {int(h.Rows)} x {int(h.Columns)} in {path.name}", series.folder,
            )
        other = np.array([float(v) for v in h.PixelSpacing])
        if other.shape != spacing.shape or np.abs(other - spacing).max() > PIXEL_SPACING_TOLERANCE_MM:
            raise GeometryError(
                f"mixed PixelSpacing in {series.label}: {_fmt(spacing)} mm in {path0.name} but "
                f"{_fmt(other)} mm in {path.name}", series.folder,
            )
    if spacing.shape != (2,) or (spacing <= 0).any():
        raise GeometryError(f"PixelSpacing {_fmt(spacing)} is not two positive values", path0)
    return rows, columns, (float(spacing[0]), float(spacing[1]))


def _check_repeated_positions(headers, z: np.ndarray, series: SeriesInfo) -> None:
    """Several images at one position: a 4D series (they differ in echo/time) or a duplicate."""
    same = np.flatnonzero(np.diff(z) < SAME_POSITION_MM)
    if same.size == 0:
        return
    a, b = headers[same[0]], headers[same[0] + 1]
    for keyword in _FOURTH_DIMENSION:
        if _str(a[1], keyword) != _str(b[1], keyword):
            values = {_str(h, keyword) for _, h in headers}
            n_positions = len(np.unique(np.round(z / SAME_POSITION_MM)))
            shown = ", ".join(sorted(values)[:6]) + (" ..." if len(values) > 6 else "")
            raise GeometryError(
                f"{series.label} is a 4D series: {len(headers)} images at {n_positions} positions, "
                f"differing in {keyword} ({shown}); tumorseg reads one 3D volume per series "
                "(multi-echo, dynamic, diffusion and magnitude-with-phase series are not supported): "
                "export one echo, time point or image type as its own series or convert it to "
                "NIfTI and give one volume",
                series.folder,
            )
    raise GeometryError(
        f"duplicated slice in {series.label}: {a[0].name} and {b[0].name} are different images "
        f"(SOP Instance UIDs differ) at the same position ({z[same[0]]:.3f} mm along the slice "
        "normal); remove the extra file",
        series.folder,
    )


def _check_gaps(headers, z: np.ndarray, series: SeriesInfo) -> None:
    gaps = np.diff(z)
    median = float(np.median(gaps))
    off = np.abs(gaps - median) > GAP_TOLERANCE * median
    if not off.any():
        return
    k = int(np.argmax(np.abs(gaps - median)))
    ratio = gaps[k] / median
    before, after = headers[k][0].name, headers[k + 1][0].name
    if round(ratio) >= 2 and abs(ratio - round(ratio)) < 0.1:
        missing = int(round(ratio)) - 1
        raise GeometryError(
            f"missing slice{'s' if missing > 1 else ''} in {series.label}: a gap of "
            f"{gaps[k]:.3f} mm between {before} and {after} where the series steps "
            f"{median:.3f} mm ({missing} slice{'s' if missing > 1 else ''} missing); "
            "give the complete series",
            series.folder,
        )
    raise GeometryError(
        f"non-uniform slice spacing in {series.label}: gaps from {gaps.min():.3f} to "
        f"{gaps.max():.3f} mm (median {median:.3f} mm, tolerance {100 * GAP_TOLERANCE:g}%), "
        f"worst between {before} and {after}; tumorseg does not stack such series "
        "(the slices would be misplaced)",
        series.folder,
    )


def _check_grid(headers, positions: np.ndarray, z: np.ndarray, normal: np.ndarray, step: float,
                series: SeriesInfo) -> None:
    """Each slice on the orthogonal uniform grid through the first and last slices."""
    in_plane = (positions - positions[0]) - np.outer(z - z[0], normal)
    offset = np.linalg.norm(in_plane, axis=1)
    k = int(np.argmax(offset))
    if offset[k] > IN_PLANE_TOLERANCE_MM:
        angle = np.degrees(np.arctan2(offset[k], abs(z[k] - z[0])))
        raise GeometryError(
            f"{series.label} is not stacked along its slice normal: {headers[k][0].name} lies "
            f"{offset[k]:.3f} mm off the normal through the first slice ({angle:.2f} degrees; "
            "gantry tilt or a sheared stack); tumorseg does not correct tilt: convert the series "
            "with tilt correction (e.g. dcm2niix) and give the NIfTI file",
            series.folder,
        )
    along = np.abs(z - (z[0] + step * np.arange(len(z))))
    tolerance = max(SLICE_POSITION_TOLERANCE_MM, GAP_TOLERANCE * step)
    k = int(np.argmax(along))
    if along[k] > tolerance:
        raise GeometryError(
            f"non-uniform slice spacing in {series.label}: {headers[k][0].name} lies "
            f"{along[k]:.3f} mm from where a uniform step of {step:.4f} mm puts it "
            f"(tolerance {tolerance:.3f} mm)",
            series.folder,
        )


def _read_pixels(series: DicomSeries) -> np.ndarray:
    """float32 (Columns, Rows, slices) with RescaleSlope/Intercept applied."""
    for ts, path in zip(series.transfer_syntax_uids, series.paths):
        _check_transfer_syntax(ts, path)
    array = np.empty(series.shape, dtype=np.float32)
    for k, (path, uid) in enumerate(zip(series.paths, series.sop_instance_uids)):
        try:
            ds = read_dataset(path)
        except Exception as e:
            raise InputError(f"a DICOM file that cannot be parsed (truncated or corrupt: "
                             f"{_first_line(e)})", path) from None
        if str(ds.SOPInstanceUID) != uid:
            raise InputError("the file changed while it was read; read the series again", path)
        array[:, :, k] = _slice_pixels(ds, path, series).T
    return array


def _check_transfer_syntax(uid: str, path: Path) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    if not uid:
        return  # none recorded: pydicom guessed the encoding
    name = UID(uid).name
    try:
        decoder = get_decoder(UID(uid))
    except NotImplementedError:
        raise InputError(
            f"transfer syntax {name} ({uid}) cannot be decoded: pydicom has no decoder for it; "
            "convert the series to an uncompressed syntax (e.g. dcmtk's dcmconv +te or "
            "gdcmconv --raw) or to NIfTI with dcm2niix",
            path,
        ) from None
    if not decoder.is_available:
        needs = "; ".join(getattr(decoder, "missing_dependencies", []) or []) or "a decoder plugin"
        raise InputError(
            f"transfer syntax {name} ({uid}) cannot be decoded here (install {needs}), or "
            "convert the series to an uncompressed syntax first",
            path,
        )


def _slice_pixels(ds, path: Path, series: DicomSeries) -> np.ndarray:
    if "PixelData" not in ds:
        raise InputError("the image has no pixel data", path)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = _str(ds, "PhotometricInterpretation")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2", ""):
        raise InputError(
            f"a colour image ({photometric}, {samples} samples per pixel); MR sequences are "
            "greyscale", path,
        )
    ts = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
    if ts and not _is_compressed(ts):
        bits = int(ds.get("BitsAllocated", 16) or 16)
        expected = series.rows * series.columns * bits // 8
        if len(ds.PixelData) < expected:
            raise InputError(
                f"truncated pixel data: {len(ds.PixelData)} of {expected} bytes; the file is "
                "damaged (copy it again from the source)", path,
            )
    try:
        pixels = ds.pixel_array
    except Exception as e:
        name = _sop_ts_name(ts)
        raise InputError(f"cannot decode the pixel data ({name}: {_first_line(e)})", path) from None
    if pixels.shape != (series.rows, series.columns):
        raise InputError(
            f"pixel data of shape {pixels.shape}, expected (Rows, Columns) = "
            f"({series.rows}, {series.columns})", path,
        )
    slope = _float(ds, "RescaleSlope", 1.0)
    intercept = _float(ds, "RescaleIntercept", 0.0)
    values = pixels.astype(np.float64)
    if slope != 1.0 or intercept != 0.0:
        values = values * slope + intercept
    return values.astype(np.float32)


def _is_compressed(uid: str) -> bool:
    from pydicom.uid import UID

    u = UID(uid)
    return bool(u.is_transfer_syntax and u.is_compressed)


def _sop_ts_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name if uid else "unknown transfer syntax"


def _float(ds, keyword: str, default: float) -> float:
    value = ds.get(keyword, None)
    if value in (None, ""):
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{keyword} {value!r} is not a number", getattr(ds, "filename", None)) from None


def _fmt(values: Sequence[float] | np.ndarray) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"


def _first_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return lines[0] if lines else type(e).__name__
