"""Stack one series: check that its images form one regular 3D grid and sort them (no pixels read).

See :mod:`tumorseg.dicom.series` for the conventions. An enhanced multi-frame image is stacked
frame by frame (:mod:`~tumorseg.dicom.frames`), like a series of slice files. Refused, each with a
named error that names the file or the series folder and says what the series is
(:class:`~tumorseg.errors.GeometryError`): multi-frame images without functional groups; mosaics
(Siemens, UIH: a whole volume tiled into one image); 4D series (several images at one position
that differ in echo, time, b-value or image type, or whole volumes repeated at the same positions
and told apart only by private attributes: fMRI, ASL, diffusion); mixed orientations (IOP differing
by more than :data:`ORIENTATION_TOLERANCE`), mixed Rows/Columns or PixelSpacing; a duplicated
position (an extra image at some positions only); missing slices (a gap that is a multiple of the
usual one); non-uniform spacing (a gap more than :data:`GAP_TOLERANCE` off the median gap, or a
slice more than ``max(SLICE_POSITION_TOLERANCE_MM, GAP_TOLERANCE * step)`` off the uniform grid
through the first and last slices); gantry tilt or sheared stacks (a slice more than
:data:`IN_PLANE_TOLERANCE_MM` off the normal through the first slice).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from ..errors import GeometryError, InputError
from ..stages.read import MAX_VOXELS_ENV, max_voxels
from .files import first_line, header_text, numbers, read_dataset, sop_class_name, whole_number
from .frames import frame_headers, has_functional_groups, is_multi_frame, number_of_frames
from .series import DicomSeries, SeriesInfo, is_orthonormal, unit_axes

log = logging.getLogger(__name__)

#: Largest difference between two slices' ImageOrientationPatient values (direction cosines).
ORIENTATION_TOLERANCE = 1e-4
#: Largest difference between two slices' PixelSpacing values, mm.
PIXEL_SPACING_TOLERANCE_MM = 1e-4
#: Largest distance of a slice's IPP from the slice normal through the first slice, mm (larger:
#: gantry tilt or a sheared stack). The RTSTRUCT writer uses the same bound.
IN_PLANE_TOLERANCE_MM = 0.01
#: Largest angle (radians) between the slice normal and the line from the first slice to another
#: that is not called a tilt: rounding of IOP to 4 decimals reaches ~1e-4.
TILT_TOLERANCE_RAD = 3e-4
#: Largest relative deviation of a gap between neighbouring slices from the median gap.
GAP_TOLERANCE = 0.01
#: Floor of the tolerance for a slice's distance from the uniform grid, mm.
SLICE_POSITION_TOLERANCE_MM = 0.01
#: Two slices closer than this along the normal share one position, mm.
SAME_POSITION_MM = 1e-3

# Attributes that tell the images of a 4D series apart at one position (multi-echo, dynamic,
# diffusion, magnitude and phase). The acquisition times are last: alone they mark a repeated
# acquisition.
_FOURTH_DIMENSION = (
    "EchoNumbers", "EchoTime", "TemporalPositionIdentifier", "TriggerTime", "DiffusionBValue",
    "InversionTime", "ImageType", "AcquisitionDateTime", "AcquisitionTime",
)


def stack_series(series: SeriesInfo) -> DicomSeries:
    """Check the series' headers form one regular stack and sort them (no pixel data read)."""
    headers = []
    for path in series.paths:
        try:
            headers.append((path, read_dataset(path, stop_before_pixels=True)))
        except Exception as e:
            raise InputError(f"a DICOM file that cannot be parsed ({first_line(e)})", path) from None
    headers = _drop_repeated_instances(headers)
    where = series.folder
    headers, frame_numbers = _frames(headers)
    _check_not_mosaic(headers, series)
    _check_present(headers)
    iop = _common_orientation(headers, series)
    rows, columns, spacing = _common_size(headers, series)
    if rows * columns * len(headers) > max_voxels():
        raise InputError(f"{series.label} of {columns} x {rows} x {len(headers)} voxels exceeds the limit "
                         f"of {max_voxels()} voxels ({MAX_VOXELS_ENV} raises it)", where)
    if not is_orthonormal(iop):
        raise GeometryError(
            f"{series.label}: ImageOrientationPatient {_fmt(iop)} is not two orthogonal unit "
            "vectors", headers[0][0],
        )
    _, _, normal = unit_axes(iop)
    positions = np.array([numbers(h, "ImagePositionPatient", 3, p) for p, h in headers])
    z = positions @ normal
    order = np.argsort(z, kind="stable")
    headers = [headers[i] for i in order]
    frame_numbers = [frame_numbers[i] for i in order]
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
        frame_numbers=tuple(frame_numbers),
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
    """One file per SOP Instance UID: the same instance stored twice is one image. Two files that
    share a UID but hold different images are refused: which one the UID names cannot be known."""
    seen: dict[str, Path] = {}
    kept = []
    copies = 0
    for path, h in headers:
        uid = str(h.SOPInstanceUID)
        if uid in seen:
            if not _same_image(seen[uid], path):
                raise InputError(
                    f"{seen[uid].name} and {path.name} carry the same SOP Instance UID but hold different "
                    "images (pixel data or position); a UID names one image, so the series is damaged: "
                    "export it again", path)
            copies += 1
            # Names at debug level only: exporters put patient names in file names too.
            log.debug("%s is another copy of the instance in %s", path.name, seen[uid].name)
            continue
        seen[uid] = path
        kept.append((path, h))
    if copies:
        log.warning("skipped %d file(s) holding another copy of an instance already read", copies)
    return kept


#: What must agree for two files with one SOP Instance UID to count as copies of one image.
_SAME_IMAGE = ("PixelData", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
               "Columns", "RescaleSlope", "RescaleIntercept", "PerFrameFunctionalGroupsSequence")


def _same_image(a: Path, b: Path) -> bool:
    try:
        first, second = read_dataset(a), read_dataset(b)
    except Exception as e:
        raise InputError(f"a DICOM file that cannot be parsed ({first_line(e)})", b) from None
    return all(first.get(k, None) == second.get(k, None) for k in _SAME_IMAGE)


def _frames(headers: list[tuple[Path, object]]) -> tuple[list[tuple[Path, object]], list[int]]:
    """Each image as one header per frame it holds, and its frame number (0: a single-frame image).

    An enhanced image (functional groups) gives one flattened header per frame; any other
    multi-frame image is refused, its frames having no position of their own.
    """
    out: list[tuple[Path, object]] = []
    numbers: list[int] = []
    for path, h in headers:
        enhanced = has_functional_groups(h)  # an enhanced image of one frame has them too
        if not enhanced and not is_multi_frame(h):
            out.append((path, h))
            numbers.append(0)
            continue
        if not enhanced:
            name = sop_class_name(str(h.SOPClassUID)) or str(h.SOPClassUID)
            raise GeometryError(
                f"a multi-frame image ({number_of_frames(h)} frames, {name}) without per-frame "
                "functional groups, so its frames have no position; convert it to NIfTI (e.g. with "
                "dcm2niix) and give that", path,
            )
        for number, frame in enumerate(frame_headers(h), start=1):
            frame.file_meta = getattr(h, "file_meta", Dataset())
            out.append((path, frame))
            numbers.append(number)
    return out, numbers


def _check_not_mosaic(headers, series: SeriesInfo) -> None:
    """A mosaic (Siemens, UIH) tiles a whole volume's slices into one image: no slice of its own."""
    for path, h in headers:
        image_type = {str(v).strip().upper() for v in (h.get("ImageType", None) or [])}
        tiles = h.get((0x0019, 0x100A), None)  # Siemens NumberOfImagesInMosaic (CSA, private)
        if "MOSAIC" in image_type or (tiles is not None and _int(tiles.value) > 1 and _is_siemens(h)):
            count = f" of {_int(tiles.value)} slices" if tiles is not None and _int(tiles.value) else ""
            raise GeometryError(
                f"{series.label} is a mosaic: each image tiles a whole volume{count} into one "
                "frame (how Siemens and UIH store fMRI and diffusion), not a slice; tumorseg does "
                "not unpack mosaics: convert the series with dcm2niix and give the NIfTI file",
                path,
            )


def _is_siemens(header) -> bool:
    return "SIEMENS" in header_text(header, "Manufacturer").upper()


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


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
    iops = np.array([numbers(h, "ImageOrientationPatient", 6, p) for p, h in headers])
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
    rows, columns = whole_number(h0, "Rows", path0), whole_number(h0, "Columns", path0)
    spacing = np.array(numbers(h0, "PixelSpacing", 2, path0))
    for path, h in headers[1:]:
        size = (whole_number(h, "Rows", path), whole_number(h, "Columns", path))
        if size != (rows, columns):
            raise GeometryError(
                f"mixed image sizes in {series.label}: {rows} x {columns} (Rows x Columns) in "
                f"{path0.name} but {size[0]} x {size[1]} in {path.name}", series.folder,
            )
        other = np.array(numbers(h, "PixelSpacing", 2, path))
        if np.abs(other - spacing).max() > PIXEL_SPACING_TOLERANCE_MM:
            raise GeometryError(
                f"mixed PixelSpacing in {series.label}: {_fmt(spacing)} mm in {path0.name} but "
                f"{_fmt(other)} mm in {path.name}", series.folder,
            )
    if (spacing <= 0).any():
        raise GeometryError(f"PixelSpacing {_fmt(spacing)} is not two positive values", path0)
    return rows, columns, (float(spacing[0]), float(spacing[1]))


def _check_repeated_positions(headers, z: np.ndarray, series: SeriesInfo) -> None:
    """Several images at one position: a 4D series (they differ in echo/time) or a duplicate."""
    same = np.flatnonzero(np.diff(z) < SAME_POSITION_MM)
    if same.size == 0:
        return
    a, b = headers[same[0]], headers[same[0] + 1]
    for keyword in _FOURTH_DIMENSION:
        if header_text(a[1], keyword) != header_text(b[1], keyword):
            values = {header_text(h, keyword) for _, h in headers}
            n_positions = len(np.unique(np.round(z / SAME_POSITION_MM)))
            shown = ", ".join(sorted(values)[:6]) + (" ..." if len(values) > 6 else "")
            if "Date" in keyword:  # a date is patient data: the count only
                shown = f"{len(values)} values"
            raise GeometryError(
                f"{series.label} is a 4D series: {len(headers)} images at {n_positions} positions, "
                f"differing in {keyword} ({shown}); tumorseg reads one 3D volume per series "
                "(multi-echo, dynamic, diffusion and magnitude-with-phase series are not supported): "
                "export one echo, time point or image type as its own series or convert it to "
                "NIfTI and give one volume",
                series.folder,
            )
    images, counts = np.unique(np.round(z / SAME_POSITION_MM), return_counts=True)
    if counts.min() == counts.max():
        # The same number of images at every position: whole volumes repeated, told apart only by
        # vendor-private attributes (GE fMRI, diffusion with private b-values, Philips ASL).
        raise GeometryError(
            f"{series.label} holds {int(counts[0])} images at each of its {len(images)} positions: "
            "a series of repeated volumes (a time series such as fMRI, perfusion or ASL label and "
            "control, or diffusion directions), not one 3D volume; tumorseg reads one 3D volume "
            "per series: export one volume as its own series or convert the series with dcm2niix "
            "and give one volume as NIfTI",
            series.folder,
        )
    if a[0] == b[0]:
        raise GeometryError(
            f"{series.label}: two frames of {a[0].name} lie at the same position "
            f"({z[same[0]]:.3f} mm along the slice normal) and differ in nothing tumorseg reads; "
            "it is not one 3D volume", series.folder,
        )
    repeated = int((counts > 1).sum())
    raise GeometryError(
        f"duplicated slice in {series.label}: {a[0].name} and {b[0].name} are different images "
        f"(SOP Instance UIDs differ) at the same position ({z[same[0]]:.3f} mm along the slice "
        f"normal); {repeated} of {len(images)} positions hold more than one image. If one of them "
        "is a re-sent or reprocessed copy, give the series without it",
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
    # Cosines written to 4 decimals tilt the normal by up to ~1e-4 rad, positions written to 2
    # decimals move a slice by up to ~0.01 mm: neither is a gantry tilt (a degree and more).
    allowed = np.maximum(2 * IN_PLANE_TOLERANCE_MM, TILT_TOLERANCE_RAD * np.abs(z - z[0]))
    k = int(np.argmax(offset - allowed))
    if offset[k] > allowed[k]:
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


def _fmt(values: Sequence[float] | np.ndarray) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"
