"""Write a label map as a binary DICOM Segmentation (SEG) through highdicom.

One segment per label of the scheme, numbered 1..n in the scheme's label order (segment numbers
must be consecutive, label values need not be: BraTS 2021's 1, 2, 4 become segments 1, 2, 3;
each segment's label and description name the label value). The SEG references every slice of
the source series, shares its Frame of Reference, and omits frames in which no segment is present.
The label map's axes are those of :func:`tumorseg.dicom.rtstruct.write_rtstruct`:
(i = column, j = row, k = slice index ascending along the slice normal).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from .. import __version__
from ..atomic import atomic_path
from ..labels import ED, NCR, Label, LabelScheme
from ..errors import InputError
from .frames import image_of_frame
from .files import shallow_copy
from .source import check_labels, derived_series_number, long_string, sort_source_series, with_valid_patient_study

log = logging.getLogger(__name__)


def _highdicom():
    try:
        import highdicom
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("DICOM SEG output needs highdicom: pip install 'highdicom>=0.22'") from None
    return highdicom


def _property_type(label: Label):
    """The SNOMED CT code of what a label segments (edema, necrosis, otherwise neoplasm)."""
    if label.classes == {ED}:
        return codes.SCT.Edema
    if label.classes == {NCR}:
        return codes.SCT.Necrosis
    return codes.SCT.Neoplasm  # enhancing, non-enhancing and combined core: the tumour itself


def segment_descriptions(scheme: LabelScheme, algorithm_name: str, algorithm_version: str) -> list:
    """highdicom SegmentDescriptions, one per label, numbered 1..n in the scheme's order."""
    hd = _highdicom()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=long_string(algorithm_name), family=codes.cid7162.ArtificialIntelligence,
        version=long_string(algorithm_version),
    )
    descriptions = []
    for number, label in enumerate(scheme.labels, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=long_string(label.name),
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=_property_type(label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=long_string(f"{scheme.name} label {label.value} {label.name}"),
            tracking_uid=generate_uid(),
            display_color=hd.color.CIELabColor.from_rgb(*label.color),
        )
        description.SegmentDescription = long_string(f"label {label.value} {label.name} ({scheme.title})")
        descriptions.append(description)
    return descriptions


def write_seg(
    labels: np.ndarray,
    scheme: LabelScheme,
    source: Sequence[Dataset],
    path: Path,
    *,
    algorithm_name: str,
    algorithm_version: str,
) -> Path:
    """Write ``labels`` (Columns, Rows, n_slices) as a binary DICOM SEG; return the file written.

    ``source`` are the series' image slices (any order; highdicom needs their full headers, not
    the pixel data). If ``path`` is an existing directory the file is named
    ``SEG.<SOPInstanceUID>.dcm`` inside it. Written atomically.
    """
    hd = _highdicom()
    series = sort_source_series(source)
    labels = check_labels(labels, scheme, series)

    # Label values -> segment numbers 1..n; frames are (slice, row, column).
    lut = np.zeros(int(max(scheme.max_label, labels.max(initial=0))) + 1, dtype=np.uint8)
    for number, label in enumerate(scheme.labels, start=1):
        lut[label.value] = number
    segment_map = lut[labels.astype(np.intp)].transpose(2, 1, 0)
    source_images, segment_map = _source_images(series, segment_map)
    source_images = with_valid_patient_study(source_images, "DICOM SEG")

    sop_uid = generate_uid()
    with warnings.catch_warnings():
        # highdicom checks the patient name it copies from the source; a warning about the
        # source's name form is not ours to fix (the RTSTRUCT copies it unchanged too).
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = _segmentation(hd, series, source_images, segment_map, scheme, sop_uid, algorithm_name,
                            algorithm_version)

    final = Path(path)
    if final.is_dir():
        final = final / f"SEG.{sop_uid}.dcm"
    with atomic_path(final) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    log.info("wrote DICOM SEG %s: %d segments, %d frames", final.name, len(scheme.labels),
             int(seg.NumberOfFrames))
    return final


def _source_images(series, segment_map: np.ndarray) -> tuple[list[Dataset], np.ndarray]:
    """What highdicom takes as the source, and the mask frames in its order.

    Slice files go as they are. The frames of one multi-frame image go as that image, with one mask
    frame per source frame in frame-number order: highdicom then takes each frame's position from
    the image's own functional groups.
    """
    if not any("ReferencedFrameNumber" in ds for ds in series.slices):
        return list(series.slices), segment_map
    if not all("ReferencedFrameNumber" in ds for ds in series.slices):
        raise InputError("a DICOM SEG is not written for a series that mixes slice files and frames of "
                         "multi-frame images")
    image = image_of_frame(series.first)
    numbers = [int(ds.ReferencedFrameNumber) for ds in series.slices]
    frames = int(image.get("NumberOfFrames", 0) or 0)
    if ({str(ds.SOPInstanceUID) for ds in series.slices} != {str(image.SOPInstanceUID)}
            or sorted(numbers) != list(range(1, frames + 1))):
        raise InputError("a DICOM SEG is written for a multi-frame source only when the series is "
                         "exactly the frames of one image")
    ordered = np.empty_like(segment_map)
    ordered[np.asarray(numbers) - 1] = segment_map
    return [_with_shared_geometry(image)], ordered


def _with_shared_geometry(image: Dataset) -> Dataset:
    """The image with its pixel measures and orientation in the shared functional groups.

    highdicom reads them there only; scanners (Siemens XA) repeat them in every frame's groups
    instead. The stack check made them equal across frames, so the first frame's are the shared.
    """
    from pydicom.sequence import Sequence as DicomSequence

    shared = Dataset()
    shared.update((image.get("SharedFunctionalGroupsSequence") or [Dataset()])[0])
    first = image.PerFrameFunctionalGroupsSequence[0]
    for group in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        if group not in shared and group in first:
            shared[group] = first[group]
    out = shallow_copy(image)
    if "SharedFunctionalGroupsSequence" in out:
        del out.SharedFunctionalGroupsSequence
    out.SharedFunctionalGroupsSequence = DicomSequence([shared])
    return out


def _segmentation(hd, series, source_images: list[Dataset], segment_map: np.ndarray,
                  scheme: LabelScheme, sop_uid: str, algorithm_name: str, algorithm_version: str):
    return hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=np.ascontiguousarray(segment_map),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(scheme, algorithm_name, algorithm_version),
        series_instance_uid=generate_uid(),
        series_number=derived_series_number(series.first) or 1,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="tumorseg",
        manufacturer_model_name=long_string(algorithm_name),
        software_versions=long_string(f"tumorseg {__version__} / {algorithm_name} {algorithm_version}"),
        device_serial_number="0",
        content_label="TUMORSEG",
        content_description=long_string(f"Automatic segmentation by {algorithm_name} {algorithm_version}"),
        series_description=long_string(f"{algorithm_name} segmentation"),
    )
