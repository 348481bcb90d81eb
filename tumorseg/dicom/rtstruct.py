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
from ..errors import ConfigError, GeometryError
from ..labels import LabelScheme
from .source import (COPIED_OPTIONAL, COPIED_TYPE2, SourceSeries, check_labels, derived_series_number, long_string,
                     sort_source_series, with_valid_patient_study)

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
    regions_off = [k for k in unknown if k in scheme.regions]
    if regions_off:
        raise ConfigError(f"roi_names names the regions {regions_off}, but include_regions is false, so no "
                          "region ROIs are written: remove those names, or set include_regions = true")
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
    labels = check_labels(labels, scheme, series)
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
    (src,) = with_valid_patient_study([src], "RTSTRUCT")
    for keyword in COPIED_TYPE2:
        setattr(ds, keyword, src.get(keyword, ""))
    for keyword in COPIED_OPTIONAL:
        if keyword in src:
            ds[keyword] = src[keyword]
    ds.StudyInstanceUID = src.StudyInstanceUID
    # RT Series
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = derived_series_number(src)
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = long_string(f"{algorithm_name} auto-contours")
    ds.OperatorsName = ""
    # General Equipment
    ds.Manufacturer = "tumorseg"
    ds.ManufacturerModelName = long_string(algorithm_name)
    ds.SoftwareVersions = [long_string(f"tumorseg {__version__}"), long_string(f"{algorithm_name} {algorithm_version}")]
    # Frame of Reference
    ds.FrameOfReferenceUID = src.FrameOfReferenceUID
    ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "")
    # Structure Set
    ds.StructureSetLabel = "tumorseg"
    ds.StructureSetName = long_string(f"{algorithm_name} {algorithm_version}")
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
        roi.ROIGenerationDescription = long_string(f"{algorithm_name} {algorithm_version}")
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
