"""DICOM series in: the types of a found and a stacked series, and the conventions of every reader module.

The reader is split by step: :mod:`~tumorseg.dicom.files` parses files, :mod:`~tumorseg.dicom.find`
groups them into series, :mod:`~tumorseg.dicom.stack` checks and sorts a series' geometry and
:mod:`~tumorseg.dicom.volume` reads its pixels into a volume (:func:`~tumorseg.dicom.volume.read_series`).

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

What each step refuses is listed in its module's docstring; every refusal names the file or
the series folder.

Patient and study attributes are kept on :class:`PatientStudy` for the writers to copy; they are
never logged, and its ``repr`` hides them.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..itk import LPS_TO_RAS
from .files import read_dataset
from .frames import frame_as_image, frame_headers

# Header attributes copied for the writers (Patient and General Study modules).
PATIENT_STUDY_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName",
)


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
        return dict(zip(PATIENT_STUDY_ATTRIBUTES, (
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

    Per-slice tuples (``paths``, ``sop_instance_uids``, ``positions``, ``frame_numbers``) are in
    sorted slice order (``k``); a multi-frame image appears once per frame. ``positions`` are IPP
    in LPS mm; ``orientation`` is IOP (row cosine, then column cosine); ``pixel_spacing`` is
    PixelSpacing (row spacing, column spacing) in mm; ``slice_step`` the distance between
    neighbouring slices along the normal in mm.
    """

    sop_instance_uids: tuple[str, ...]
    positions: tuple[tuple[float, float, float], ...]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    slice_step: float
    rows: int
    columns: int
    transfer_syntax_uids: tuple[str, ...]
    #: Per slice: its frame number in a multi-frame (enhanced) image, 0 for a single-frame image.
    frame_numbers: tuple[int, ...]

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
        """The slices' pydicom Datasets without pixel data, in sorted slice order.

        A frame of a multi-frame image comes as the image's header with that frame's position,
        orientation and pixel spacing at the top level and ``ReferencedFrameNumber`` set to its
        frame number: what a reference to it (an RTSTRUCT's Contour Image Sequence) must carry.
        """
        out, images = [], {}
        for path, number in zip(self.paths, self.frame_numbers):
            if number == 0:
                out.append(read_dataset(path, stop_before_pixels=True))
                continue
            if path not in images:
                header = read_dataset(path, stop_before_pixels=True)
                images[path] = (header, frame_headers(header))
            header, frames = images[path]
            out.append(frame_as_image(header, frames[number - 1], number))
        return out


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

