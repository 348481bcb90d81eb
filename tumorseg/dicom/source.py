"""The source series of a derived object (RTSTRUCT, SEG) as one regular stack, and what both
writers check and write alike: the label map against that stack, the series number, Long Strings.

The checks use the reader's tolerances and axes (``series.py``, ``stack.py``), so a series the
reader stacks is one the writers accept.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from ..errors import GeometryError, InputError
from ..labels import LabelScheme
from .files import shallow_copy
from .series import is_orthonormal, unit_axes
from .stack import (GAP_TOLERANCE, IN_PLANE_TOLERANCE_MM, ORIENTATION_TOLERANCE, PIXEL_SPACING_TOLERANCE_MM,
                    TILT_TOLERANCE_RAD)

log = logging.getLogger(__name__)


# The patient and study attributes a derived object copies from its source (Patient, General Study
# and Patient Study modules): Type 2 ones present even when empty there. The Patient Study module is
# user optional in the IODs; it is copied so that the study reads the same in every instance
# (dcentvfy compares them).
COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
COPIED_OPTIONAL = (
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthTime", "OtherPatientIDsSequence", "OtherPatientNames", "EthnicGroup",
    "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence", "QualityControlSubject",
    "PatientSpeciesDescription", "PatientSpeciesCodeSequence",
    "StudyDescription", "PatientAge", "PatientSize", "PatientWeight",
)


@dataclass(frozen=True)
class SourceSeries:
    """The source image slices sorted into one stack, with the geometry the writers need.

    ``slices`` are sorted by ``dot(ImagePositionPatient, normal)``, ascending; ``positions`` are
    their ImagePositionPatient (n, 3) in LPS mm. ``row_direction`` is the direction of
    increasing column index ``i`` (the first triplet of ImageOrientationPatient),
    ``column_direction`` that of increasing row index ``j``; ``pixel_spacing`` is
    (row spacing, column spacing) in mm as in PixelSpacing.
    """

    slices: tuple[Dataset, ...]
    positions: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    normal: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """The label map shape this series expects: (Columns, Rows, n_slices)."""
        return (self.columns, self.rows, len(self.slices))

    @property
    def slice_gap(self) -> float:
        """Distance between slice centres along the normal in mm (1.0 for a single slice)."""
        if len(self.slices) < 2:
            return 1.0
        z = self.positions @ self.normal
        return float((z[-1] - z[0]) / (len(z) - 1))

    @property
    def voxel_volume_ml(self) -> float:
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_gap / 1000.0

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 matrix mapping voxel indices (i, j, k, 1) to LPS mm."""
        affine = np.eye(4)
        affine[:3, 0] = self.row_direction * self.pixel_spacing[1]
        affine[:3, 1] = self.column_direction * self.pixel_spacing[0]
        affine[:3, 2] = self.normal * self.slice_gap
        affine[:3, 3] = self.positions[0]
        return affine

    @property
    def first(self) -> Dataset:
        return self.slices[0]

    def slice_points_to_patient(self, k: int, ij: np.ndarray) -> np.ndarray:
        """Map (m, 2) in-plane voxel coordinates (i, j) on slice ``k`` to (m, 3) LPS mm."""
        row_step = self.row_direction * self.pixel_spacing[1]
        col_step = self.column_direction * self.pixel_spacing[0]
        return self.positions[k] + ij[:, :1] * row_step + ij[:, 1:2] * col_step


def sort_source_series(source: Sequence[Dataset]) -> SourceSeries:
    """Sort image slices (any order) into one stack and check that it is regular.

    Raises :class:`InputError` for a series that is not one set of images (or of frames, each given
    with its ReferencedFrameNumber by ``DicomSeries.read_headers``), and
    :class:`GeometryError` for mixed orientations or sizes, gantry tilt, duplicate or missing
    slices (non-uniform spacing).
    """
    slices = list(source)
    if not slices:
        raise InputError("the source series holds no image slices")
    for attr in ("SeriesInstanceUID", "FrameOfReferenceUID", "StudyInstanceUID"):
        values = {str(ds.get(attr, "")) for ds in slices}
        if "" in values:
            raise InputError(f"a source slice lacks {attr}; an RTSTRUCT cannot reference it")
        if len(values) > 1:
            raise InputError(f"the source slices come from {len(values)} different {attr} values; "
                             "pass the slices of one series")
    for ds in slices:
        missing = [a for a in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                               "Rows", "Columns", "SOPInstanceUID", "SOPClassUID") if a not in ds]
        if missing:
            raise InputError(f"source slice {ds.get('InstanceNumber', '?')} lacks {', '.join(missing)}")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 and "ReferencedFrameNumber" not in ds:
            raise InputError("a multi-frame source image given whole; pass one header per frame "
                             "(DicomSeries.read_headers)")
    if len({_frame_key(ds) for ds in slices}) != len(slices):
        raise InputError("the source series holds the same SOP Instance UID twice (the same frame of it, for a multi-frame image)")

    iop = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in slices])
    if np.abs(iop - iop[0]).max() > ORIENTATION_TOLERANCE:
        raise GeometryError("the source slices have different ImageOrientationPatient values")
    if not is_orthonormal(iop[0]):
        raise GeometryError(f"ImageOrientationPatient {iop[0].tolist()} is not two orthonormal vectors")
    row_dir, col_dir, normal = unit_axes(iop[0])

    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in slices}
    spacings = np.array([[float(v) for v in ds.PixelSpacing] for ds in slices])
    if len(sizes) > 1 or np.abs(spacings - spacings[0]).max() > PIXEL_SPACING_TOLERANCE_MM:
        raise GeometryError("the source slices differ in Rows/Columns or PixelSpacing")

    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    z = positions @ normal
    order = np.argsort(z, kind="stable")
    positions, z = positions[order], z[order]
    slices = [slices[i] for i in order]
    _check_stack(positions, z, normal)

    rows, columns = sizes.pop()
    return SourceSeries(
        slices=tuple(slices), positions=positions, row_direction=row_dir,
        column_direction=col_dir, normal=normal,
        pixel_spacing=tuple(float(v) for v in slices[0].PixelSpacing),  # type: ignore[arg-type]
        rows=rows, columns=columns,
    )


def _check_stack(positions: np.ndarray, z: np.ndarray, normal: np.ndarray) -> None:
    in_plane = (positions - positions[0]) - np.outer(z - z[0], normal)
    offsets = np.linalg.norm(in_plane, axis=1)
    allowed = np.maximum(2 * IN_PLANE_TOLERANCE_MM, TILT_TOLERANCE_RAD * np.abs(z - z[0]))  # as stack.py
    offset = float(offsets.max())
    if (offsets > allowed).any():
        raise GeometryError(
            f"the slice positions drift {offset:.3f} mm across the slice plane (gantry tilt or "
            "a sheared stack); resample the series first"
        )
    if len(z) < 2:
        return
    gaps = np.diff(z)
    median = float(np.median(gaps))
    if gaps.min() < 1e-3:
        raise GeometryError("two source slices share the same position (a duplicated slice)")
    worst = float(np.abs(gaps - median).max())
    if worst > GAP_TOLERANCE * median:
        raise GeometryError(
            f"the slice spacing is not uniform (gaps {gaps.min():.3f} to {gaps.max():.3f} mm, "
            f"median {median:.3f} mm): a slice is missing or the series mixes stacks"
        )


def _frame_key(image: Dataset) -> tuple[str, int]:
    """What one slice of the source is: an instance, and its frame in a multi-frame image (0: none)."""
    return str(image.SOPInstanceUID), int(image.get("ReferencedFrameNumber", 0) or 0)


def check_labels(labels: np.ndarray, scheme: LabelScheme, series: SourceSeries) -> np.ndarray:
    """The label map as integers on ``series``' voxels, or the reason it cannot be written there."""
    labels = np.asarray(labels)
    if labels.shape != series.shape:
        raise GeometryError(
            f"the label map has shape {labels.shape} but the source series needs "
            f"(Columns, Rows, slices) = {series.shape}"
        )
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
            raise InputError("the label map holds non-integer values")
        labels = labels.astype(np.int64)
    scheme.validate_array(labels)
    return labels


def derived_series_number(src: Dataset) -> int | str:
    """The derived object's SeriesNumber: 1000 + the source's, or empty where it has none."""
    try:
        return 1000 + int(src.SeriesNumber)
    except (AttributeError, TypeError, ValueError):
        return ""


def long_string(text: str) -> str:
    """Fit a Long String (64 characters, no backslash)."""
    return text.replace("\\", "/")[:64]


def _valid_value(image: Dataset, keyword: str) -> bool:
    """The element's value is valid for its VR (sequences are not checked)."""
    from pydicom import config
    from pydicom.valuerep import validate_value

    try:
        element = image[keyword]
        if element.VR == "SQ":
            return True
        for value in (element.value if element.VM > 1 else [element.value]):
            validate_value(element.VR, value if isinstance(value, bytes) else str(value), config.RAISE)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def with_valid_patient_study(images: Sequence[Dataset], what: str) -> list[Dataset]:
    """``images`` with the copied patient and study values that are invalid for their VR (a weight
    written "72,5", a date "02.01.21") emptied (Type 2) or dropped, in shallow copies: the reader
    copes with such values, a writer must not repeat them (dciodvfy; planning systems check as
    strictly; highdicom stops at a date it cannot parse). ``what`` names the writer in the warning."""
    out, found = [], set()
    for image in images:
        invalid = [k for k in COPIED_TYPE2 + COPIED_OPTIONAL if k in image and not _valid_value(image, k)]
        if invalid:
            found.update(invalid)
            image = shallow_copy(image)
            for keyword in invalid:
                del image[keyword]
                if keyword in COPIED_TYPE2:
                    setattr(image, keyword, "")
        out.append(image)
    if found:
        log.warning("%s: the source's %s not valid for the value representation; left empty or out",
                    what, ", ".join(sorted(found)) + (" are" if len(found) > 1 else " is"))
    return out
