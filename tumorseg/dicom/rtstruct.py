"""Write a label map as a DICOM RT Structure Set (RTSTRUCT) that references its source MR series.

Conventions (see docs/rtstruct.md):

- The label map is on the source series' voxel grid, indexed ``labels[i, j, k]`` with
  ``i`` = column, ``j`` = row and ``k`` = slice index after sorting the slices by the projection
  of ImagePositionPatient on the slice normal ``n = row direction x column direction``,
  ascending. Its shape is therefore ``(Columns, Rows, n_slices)``.
- Contours are traced per slice with marching squares (``skimage.measure.find_contours`` at level
  0.5) on pixel centres. Along a straight border the polygon runs on the pixel edges, half a pixel
  outside the centres of the border voxels, and it cuts corners diagonally through the edge
  midpoints; so a voxel is inside the structure exactly when its centre is inside the polygon,
  which is how planning systems rasterise contours.
- A hole gives a separate inner contour (CLOSED_PLANAR, like every contour); contours of one ROI
  on one slice combine by the even-odd rule (XOR), which is how planning systems and the
  common readers fill them. Contours never cross, so the rule is unambiguous.
- Coordinates are patient LPS millimetres (DICOM's own), rounded to 1e-4 mm, and every
  Decimal String is written with at most 16 characters.
- An empty ROI (no voxel of that label or region) is still written, with no Contour Sequence; the
  returned :class:`RtstructSummary` says which ROIs are empty.
"""
from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from .. import __version__
from ..atomic import atomic_path
from ..errors import ConfigError, GeometryError, InputError
from ..labels import LabelScheme
# The reader's tolerances and axes: a series it stacks is one the writers accept.
from .series import is_orthonormal, unit_axes
from .stack import GAP_TOLERANCE, IN_PLANE_TOLERANCE_MM, ORIENTATION_TOLERANCE, PIXEL_SPACING_TOLERANCE_MM

log = logging.getLogger(__name__)

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: What the RT Referenced Study Sequence names as the study's SOP class (PS3.3 C.8.8.5).
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"

#: Default ROI names of the evaluation regions; at most 16 characters, Eclipse's structure ID limit.
REGION_NAMES: dict[str, str] = {"WT": "WT whole tumour", "TC": "TC tumour core", "ET": "ET enhancing"}
REGION_COLOURS: dict[str, tuple[int, int, int]] = {
    "WT": (0, 220, 220),
    "TC": (220, 0, 220),
    "ET": (255, 140, 0),
}
REGION_TITLES = {"WT": "whole tumour", "TC": "tumour core", "ET": "enhancing tumour"}


# The patient and study attributes copied from the source (Patient and General Study modules).
_PATIENT_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_PATIENT_OPTIONAL = (
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthTime", "OtherPatientIDsSequence", "OtherPatientNames", "EthnicGroup",
    "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence", "QualityControlSubject",
    "PatientSpeciesDescription", "PatientSpeciesCodeSequence",
)
_STUDY_TYPE2 = ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
_STUDY_OPTIONAL = ("StudyDescription",)
# Patient Study module (user optional in the IOD): copied so that the study reads the same in every
# instance (dcentvfy compares them).
_PATIENT_STUDY = ("PatientAge", "PatientSize", "PatientWeight")


# --------------------------------------------------------------------------------------------
# The source series as one regular stack
# --------------------------------------------------------------------------------------------


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
    offset = float(np.linalg.norm(in_plane, axis=1).max())
    if offset > IN_PLANE_TOLERANCE_MM:
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


# --------------------------------------------------------------------------------------------
# Contours
# --------------------------------------------------------------------------------------------


def trace_slice(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2D binary mask, each (m, 2) in (i, j) voxel coordinates, m >= 3.

    Marching squares at level 0.5 on the pixel centres; the mask is padded so that structures
    touching the image border still give closed contours. The closing point is not repeated
    (CLOSED_PLANAR implies it) and collinear vertices are dropped, which changes no polygon.
    Outer borders and hole borders are both returned; combine them with the even-odd rule.
    """
    from skimage.measure import find_contours

    padded = np.pad(np.asarray(mask, dtype=np.uint8), 1)
    contours = []
    for contour in find_contours(padded, 0.5):
        contour = contour - 1.0
        if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
            contour = contour[:-1]
        contour = _drop_collinear(contour)
        if len(contour) >= 3:  # a polygon needs three corners; fewer is noise, not a contour
            contours.append(contour)
    return contours


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    if len(points) < 3:
        return points
    incoming = points - np.roll(points, 1, axis=0)
    outgoing = np.roll(points, -1, axis=0) - points
    cross = incoming[:, 0] * outgoing[:, 1] - incoming[:, 1] * outgoing[:, 0]
    return points[np.abs(cross) > 1e-9]


def format_ds(value: float) -> str:
    """A Decimal String of at most 16 characters for a coordinate in mm (rounded to 1e-4 mm)."""
    if not math.isfinite(value):
        raise GeometryError(f"a contour coordinate is not finite ({value})")
    text = f"{round(value, 4):.4f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        text = format_number_as_ds(float(value))
    return text


# --------------------------------------------------------------------------------------------
# ROIs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoiSummary:
    """One written ROI: its number, name, which label values it covers, and what was traced."""

    number: int
    name: str
    kind: str  # "label" or "region"
    key: str  # the label name or region code (WT, TC, ET)
    values: tuple[int, ...]
    contours: int
    slices: int
    voxels: int
    volume_ml: float

    @property
    def empty(self) -> bool:
        return self.contours == 0


@dataclass(frozen=True)
class RtstructSummary:
    """What :func:`write_rtstruct` wrote: the file, its UIDs and one entry per ROI."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    rois: tuple[RoiSummary, ...]

    @property
    def roi_names(self) -> list[str]:
        return [roi.name for roi in self.rois]

    @property
    def contour_counts(self) -> dict[str, int]:
        return {roi.name: roi.contours for roi in self.rois}

    @property
    def empty(self) -> bool:
        """True when no ROI has a contour: the file holds ROIs but no Contour Sequence at all."""
        return all(roi.empty for roi in self.rois)

    @property
    def empty_rois(self) -> list[str]:
        return [roi.name for roi in self.rois if roi.empty]


@dataclass(frozen=True)
class _RoiSpec:
    name: str
    kind: str
    key: str
    values: tuple[int, ...]
    colour: tuple[int, int, int]
    description: str


def roi_specs(scheme: LabelScheme, roi_names: Mapping[str, str] | None = None,
              include_regions: bool = True) -> list[_RoiSpec]:
    """One ROI per label of ``scheme`` and, with ``include_regions``, per region (WT, TC, ET).

    ``roi_names`` renames ROIs: keys are label names or region codes, values the ROI names.
    """
    names = dict(roi_names or {})
    known = [label.name for label in scheme.labels] + (list(scheme.regions) if include_regions else [])
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigError(f"roi_names has keys {unknown} that are neither labels of scheme "
                          f"{scheme.name!r} nor regions; known keys: {', '.join(known)}")
    specs = [
        _RoiSpec(names.get(label.name, label.name), "label", label.name, (label.value,),
                 tuple(label.color), f"label {label.value} {label.name} ({scheme.title})")
        for label in scheme.labels
    ]
    if include_regions:
        for code, values in scheme.regions.items():
            if not values:
                continue
            specs.append(_RoiSpec(
                names.get(code, REGION_NAMES.get(code, code)), "region", code, tuple(values),
                REGION_COLOURS.get(code, (255, 255, 255)),
                f"region {code} {REGION_TITLES.get(code, code)} = labels "
                f"{', '.join(map(str, values))} ({scheme.title})",
            ))
    _check_roi_names([s.name for s in specs])
    return specs


def _check_roi_names(names: list[str]) -> None:
    for name in names:
        if not name.strip() or len(name) > 64 or "\\" in name or any(ord(c) < 32 for c in name):
            raise ConfigError(f"ROI name {name!r} is not valid: 1 to 64 characters, no backslash "
                              "or control characters")
    long_names = [n for n in names if len(n) > 16]
    if long_names:
        log.warning("ROI names %s are longer than 16 characters; Eclipse truncates or rejects "
                    "structure IDs that long (rename them with roi_names)", long_names)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"ROI names {duplicates} are used twice; give each ROI its own name")


# --------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------


def write_rtstruct(
    labels: np.ndarray,
    scheme: LabelScheme,
    source: Sequence[Dataset],
    path: Path,
    *,
    algorithm_name: str,
    algorithm_version: str,
    roi_names: Mapping[str, str] | None = None,
    include_regions: bool = True,
) -> RtstructSummary:
    """Write ``labels`` as an RTSTRUCT referencing the ``source`` series; return a summary.

    ``labels``: integer label map of shape (Columns, Rows, n_slices), axes (i = column,
    j = row, k = slice index in ascending order of ImagePositionPatient on the slice normal),
    values from ``scheme``. ``source``: the series' image slices as pydicom Datasets, any order
    (pixel data not needed). ``path``: the output file; if it is an existing directory, the file
    is named ``RS.<SOPInstanceUID>.dcm`` inside it (never after patient data). Written
    atomically: on any error nothing is left at ``path``.
    """
    series = sort_source_series(source)
    labels = _check_labels(labels, scheme, series)
    specs = roi_specs(scheme, roi_names, include_regions)

    now = datetime.datetime.now()
    sop_uid, series_uid = generate_uid(), generate_uid()
    texts = [algorithm_name, algorithm_version] + [t for spec in specs for t in (spec.name, spec.description)]
    ds = _base_dataset(series, sop_uid, series_uid, now, algorithm_name, algorithm_version, texts)
    summaries = _add_rois(ds, labels, series, specs, algorithm_name, algorithm_version)

    final = Path(path)
    if final.is_dir():
        final = final / f"RS.{sop_uid}.dcm"
    with atomic_path(final) as tmp:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    summary = RtstructSummary(final, sop_uid, series_uid, tuple(summaries))
    log.info("wrote RTSTRUCT %s: %d ROIs, %d contours%s", final.name, len(summaries),
             sum(r.contours for r in summaries), " (empty: no contours at all)" if summary.empty else "")
    return summary


def _check_labels(labels: np.ndarray, scheme: LabelScheme, series: SourceSeries) -> np.ndarray:
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


def _base_dataset(series: SourceSeries, sop_uid: str, series_uid: str, now: datetime.datetime,
                  algorithm_name: str, algorithm_version: str, texts: Sequence[str]) -> Dataset:
    src = series.first
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    # SOP Common. Our own text is usually ASCII and the source's character set fits it; ROI
    # names or a model name beyond ASCII switch the file to UTF-8 (pydicom re-encodes the
    # copied patient name).
    if not all(text.isascii() for text in texts):
        ds.SpecificCharacterSet = "ISO_IR 192"
    elif "SpecificCharacterSet" in src:
        ds.SpecificCharacterSet = src.SpecificCharacterSet
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient and General Study, copied from the source (Type 2 present even when empty there)
    for keyword in _PATIENT_TYPE2 + _STUDY_TYPE2:
        setattr(ds, keyword, src.get(keyword, ""))
    for keyword in _PATIENT_OPTIONAL + _STUDY_OPTIONAL + _PATIENT_STUDY:
        if keyword in src:
            ds[keyword] = src[keyword]
    ds.StudyInstanceUID = src.StudyInstanceUID
    # RT Series
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = _series_number(src)
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = _lo(f"{algorithm_name} auto-contours")
    ds.OperatorsName = ""
    # General Equipment
    ds.Manufacturer = "tumorseg"
    ds.ManufacturerModelName = _lo(algorithm_name)
    ds.SoftwareVersions = [_lo(f"tumorseg {__version__}"), _lo(f"{algorithm_name} {algorithm_version}")]
    # Frame of Reference
    ds.FrameOfReferenceUID = src.FrameOfReferenceUID
    ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "")
    # Structure Set
    ds.StructureSetLabel = "tumorseg"
    ds.StructureSetName = _lo(f"{algorithm_name} {algorithm_version}")
    ds.StructureSetDescription = (
        f"Automatic segmentation by {algorithm_name} {algorithm_version} (tumorseg {__version__}); "
        "not reviewed"
    )
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame(series)])
    # Approval: automatic contours are unapproved until a clinician reviews them
    ds.ApprovalStatus = "UNAPPROVED"
    ds.StructureSetROISequence = DicomSequence()
    ds.ROIContourSequence = DicomSequence()
    ds.RTROIObservationsSequence = DicomSequence()
    return ds


def _series_number(src: Dataset) -> int | str:
    try:
        return 1000 + int(src.SeriesNumber)
    except (AttributeError, TypeError, ValueError):
        return ""


def _lo(text: str) -> str:
    """Fit a Long String (64 characters, no backslash)."""
    return text.replace("\\", "/")[:64]


def _referenced_frame(series: SourceSeries) -> Dataset:
    src = series.first
    series_item = Dataset()
    series_item.SeriesInstanceUID = src.SeriesInstanceUID
    series_item.ContourImageSequence = DicomSequence([_image_reference(ds) for ds in series.slices])
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = src.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series_item])
    frame = Dataset()
    frame.FrameOfReferenceUID = src.FrameOfReferenceUID
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _image_reference(image: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = image.SOPClassUID
    item.ReferencedSOPInstanceUID = image.SOPInstanceUID
    if "ReferencedFrameNumber" in image:  # one frame of a multi-frame image (DicomSeries.read_headers)
        item.ReferencedFrameNumber = image.ReferencedFrameNumber
    return item


def _referenced_frame_key(item: Dataset) -> tuple[str, int]:
    return str(item.ReferencedSOPInstanceUID), int(item.get("ReferencedFrameNumber", 0) or 0)


def _frame_key(image: Dataset) -> tuple[str, int]:
    """What one slice of the source is: an instance, and its frame in a multi-frame image (0: none)."""
    return str(image.SOPInstanceUID), int(image.get("ReferencedFrameNumber", 0) or 0)


def _add_rois(ds: Dataset, labels: np.ndarray, series: SourceSeries, specs: list[_RoiSpec],
              algorithm_name: str, algorithm_version: str) -> list[RoiSummary]:
    summaries = []
    for number, spec in enumerate(specs, start=1):
        mask = np.isin(labels, spec.values)
        contours = _roi_contours(mask, series)

        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = series.first.FrameOfReferenceUID
        roi.ROIName = spec.name
        roi.ROIDescription = spec.description
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = _lo(f"{algorithm_name} {algorithm_version}")
        ds.StructureSetROISequence.append(roi)

        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = list(spec.colour)
        if contours:  # Type 3: an empty ROI has no Contour Sequence at all
            roi_contour.ContourSequence = DicomSequence(contours)
        ds.ROIContourSequence.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = ""  # the clinician assigns GTV, CTV, ... on review
        observation.ROIInterpreter = ""
        ds.RTROIObservationsSequence.append(observation)

        voxels = int(mask.sum())
        summaries.append(RoiSummary(
            number=number, name=spec.name, kind=spec.kind, key=spec.key, values=spec.values,
            contours=len(contours), slices=len({_referenced_frame_key(c.ContourImageSequence[0]) for c in contours}),
            voxels=voxels, volume_ml=voxels * series.voxel_volume_ml,
        ))
    return summaries


def _roi_contours(mask: np.ndarray, series: SourceSeries) -> list[Dataset]:
    items = []
    for k in np.flatnonzero(mask.any(axis=(0, 1))):
        for polygon in trace_slice(mask[:, :, k]):
            points = series.slice_points_to_patient(int(k), polygon)
            contour = Dataset()
            contour.ContourNumber = len(items) + 1
            contour.ContourImageSequence = DicomSequence([_image_reference(series.slices[k])])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [format_ds(v) for v in points.ravel()]
            items.append(contour)
    return items
