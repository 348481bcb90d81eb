"""Enhanced multi-frame images (Enhanced MR Image Storage): one header per frame, as for slice files.

What Siemens XA, current Philips and Canon scanners export by default is one file per series that
holds every slice as a frame. Position, orientation, pixel spacing and rescaling live in functional
groups: the Shared Functional Groups Sequence for values common to all frames, the Per-frame
Functional Groups Sequence for the rest (a per-frame value overrides a shared one). Each frame is
flattened here into a plain header carrying the attributes a single-frame image would, so that
:mod:`~tumorseg.dicom.stack` checks and sorts frames exactly as it does files (one way of stacking).

Read with pydicom rather than highdicom's volume API: the refusals (4D, gaps, tilt, mixed
orientations) and their messages must be the reader's own for every series, whichever form it
came in.
"""
from __future__ import annotations

from pydicom.dataset import Dataset

from ..errors import GeometryError
from .files import shallow_copy

# (functional group, attribute in it, attribute of the flattened frame header).
_GROUP_ATTRIBUTES = (
    ("PlanePositionSequence", "ImagePositionPatient", "ImagePositionPatient"),
    ("PlaneOrientationSequence", "ImageOrientationPatient", "ImageOrientationPatient"),
    ("PixelMeasuresSequence", "PixelSpacing", "PixelSpacing"),
    ("PixelMeasuresSequence", "SliceThickness", "SliceThickness"),
    ("PixelValueTransformationSequence", "RescaleSlope", "RescaleSlope"),
    ("PixelValueTransformationSequence", "RescaleIntercept", "RescaleIntercept"),
    # What tells the frames of a 4D image apart at one position (stack.py's fourth dimension).
    ("FrameContentSequence", "TemporalPositionIndex", "TemporalPositionIdentifier"),
    ("FrameContentSequence", "FrameAcquisitionDateTime", "AcquisitionDateTime"),
    ("MREchoSequence", "EffectiveEchoTime", "EchoTime"),
    ("MRDiffusionSequence", "DiffusionBValue", "DiffusionBValue"),
    ("MRImageFrameTypeSequence", "FrameType", "ImageType"),
)
# A frame's geometry, set at the top level of frame_as_image's header (the Enhanced MR IOD keeps it
# in functional groups only, so image_of_frame can remove it again).
_FRAME_TOP_LEVEL = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness")
# Copied from the image's top level into every frame header.
_TOP_LEVEL = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
              "FrameOfReferenceUID", "Rows", "Columns", "BitsAllocated")


def is_multi_frame(header) -> bool:
    """The image holds more than one frame (NumberOfFrames > 1)."""
    return number_of_frames(header) > 1


def has_functional_groups(header) -> bool:
    """The image describes its frames in functional groups (an enhanced image, of any frame count)."""
    return "PerFrameFunctionalGroupsSequence" in header


def number_of_frames(header) -> int:
    try:
        return max(int(header.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def frame_headers(header) -> list[Dataset]:
    """One header per frame (frame ``n`` at index ``n - 1``) of an image with functional groups
    (:func:`has_functional_groups`; stack.py refuses multi-frame images without them).

    Raises :class:`GeometryError` when the per-frame sequence does not hold one item per frame.
    """
    frames = number_of_frames(header)
    per_frame = header.PerFrameFunctionalGroupsSequence
    shared_items = header.get("SharedFunctionalGroupsSequence", None) or [Dataset()]
    if len(per_frame) != frames:
        raise GeometryError(
            f"the image declares {frames} frames but describes {len(per_frame)} in its "
            "Per-frame Functional Groups Sequence (damaged or cut short)", getattr(header, "filename", None),
        )
    shared = shared_items[0]
    top = Dataset()
    for keyword in _TOP_LEVEL:
        if keyword in header:
            setattr(top, keyword, header[keyword].value)
    out = []
    for item in per_frame:
        frame = Dataset()
        frame.update(top)
        for group, keyword, target in _GROUP_ATTRIBUTES:
            value = _group_value(item, group, keyword)
            if value is None:
                value = _group_value(shared, group, keyword)
            if value is None and keyword in header:  # legacy converted images keep some at top level
                value = header[keyword].value
            if value is not None:
                setattr(frame, target, value)
        out.append(frame)
    return out


def _group_value(item: Dataset, group: str, keyword: str):
    sequence = item.get(group, None)
    if not sequence:
        return None
    value = sequence[0].get(keyword, None)
    return None if value in (None, "") else value


def frame_as_image(header, frame: Dataset, number: int) -> Dataset:
    """The image's header with one frame's geometry also at the top level, as a slice file has it.

    ``ReferencedFrameNumber`` holds ``number``: the writers copy it into their references to the
    frame, as PS3.3's Image SOP Instance Reference Macro requires for a multi-frame image. The
    functional groups stay, so :func:`image_of_frame` gives the image's own header back.
    """
    out = _copy_without_frame_geometry(header)
    for keyword in _FRAME_TOP_LEVEL:
        if keyword in frame:
            setattr(out, keyword, frame[keyword].value)
    out.ReferencedFrameNumber = number
    return out


def image_of_frame(frame_image: Dataset) -> Dataset:
    """The multi-frame image's own header from one :func:`frame_as_image` (a copy)."""
    return _copy_without_frame_geometry(frame_image)


def _copy_without_frame_geometry(header) -> Dataset:
    """A shallow copy of ``header`` without a frame's top-level geometry and frame number. It shares
    the header's elements: callers replace elements, never assign into them."""
    out = shallow_copy(header)
    for keyword in (*_FRAME_TOP_LEVEL, "ReferencedFrameNumber"):
        if keyword in out:
            delattr(out, keyword)
    return out
