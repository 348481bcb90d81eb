"""A DICOM study in: the chosen series of each sequence, on one grid, as one multi-channel Scan.

The reference grid is the chosen series of the first sequence in
:data:`~tumorseg.sequences.REFERENCE_ORDER` that is present (or the one named): T1 after contrast
(usually the finest 3D series, and the one planners contour on), else FLAIR, else native T1, else
T2. The other sequences reach it through the register stage (:mod:`tumorseg.stages.register`):
by default a series on another grid, or of another Frame of Reference, is registered rigidly and
resampled; a series on the reference grid already is copied, not interpolated. Series of
different Patient IDs are never combined.

The Scan's ``source`` is the reference series' grid (shape and RAS affine, no NIfTI header),
``meta["dicom_series"]`` its :class:`~tumorseg.dicom.series.DicomSeries` (for the RTSTRUCT/SEG
writers), ``meta["dicom_series_by_sequence"]`` every chosen series, ``meta["reference_sequence"]``
the reference's sequence and ``meta["paths"]`` each sequence's series folder.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import GeometryError, InputError, SequenceError
from ..scan import Scan, SourceGeometry
from ..sequences import SEQUENCES, reference_sequence
from ..stages.read import Volume
from ..stages.register import register_volumes
from .select import SelectionRules, select_series
from .find import find_series
from .series import DicomSeries, SeriesInfo
from .volume import read_series

log = logging.getLogger(__name__)


def series_to_scan(volume: Volume, series: DicomSeries, sequence: str) -> Scan:
    """One series as a one-channel Scan on its own grid (``meta`` as described in the module)."""
    array = volume.array[np.newaxis].astype(np.float32, copy=False)
    return Scan(
        array=array,
        affine=volume.affine,
        channels=(sequence,),
        source=SourceGeometry(shape=series.shape, affine=volume.affine, dicom_series=series),
        meta={
            "paths": {sequence: volume.path},
            "dicom_series": series,
            "dicom_series_by_sequence": {sequence: series},
            "reference_sequence": sequence,
        },
    )


def read_dicom_study(
    folder: str | Path | Sequence[str | Path],
    sequences: Sequence[str] = SEQUENCES,
    rules: SelectionRules | None = None,
    explicit: Mapping[str, str | int] | None = None,
    reference: str | None = None,
    use: Callable[[tuple[str, ...]], tuple[str, ...]] | None = None,
    registration: str = "auto",
) -> Scan:
    """Find, choose, read and combine the series under ``folder`` (one folder or several).

    ``sequences``: the sequences wanted (channels come in SEQUENCES order, only those found);
    ``rules``/``explicit``: see :func:`~tumorseg.dicom.select.select_series`; ``reference``:
    the sequence whose grid to use (default: the first of sequences.REFERENCE_ORDER read); ``use``: given
    the sequences found, those to read (a model card's preferred sets); the reference is read in
    any case. The others are neither read nor on the reference's shortlist;
    ``meta["unread_sequences"]`` names them. ``registration``: see
    :func:`~tumorseg.stages.register.register_volumes`.
    Raises SequenceError when no wanted sequence is found or a choice is ambiguous.
    """
    folders = [folder] if isinstance(folder, (str, Path)) else list(folder)
    found: list[SeriesInfo] = []
    for f in folders:
        found.extend(find_series(f))
    found = _merge_same_series(found)
    if not found:
        raise InputError("no DICOM image series found", ", ".join(str(f) for f in folders))
    ambiguous: dict[str, str] = {}
    chosen = select_series(found, rules=rules, explicit=explicit, sequences=sequences, ambiguous=ambiguous)
    if not chosen and not ambiguous:
        listing = "; ".join(s.label for s in found)
        raise SequenceError(
            f"none of the series found is recognised as {', '.join(sequences)} ({listing}); "
            "name the series to use per sequence (SeriesNumber or SeriesInstanceUID)",
            ", ".join(str(f) for f in folders),
        )
    found_sequences = tuple(seq for seq in SEQUENCES if seq in chosen or seq in ambiguous)
    ref_seq = reference_sequence(found_sequences, reference)
    wanted = set(use(found_sequences) if use else found_sequences) | {ref_seq}
    # Several candidates for a sequence that will not be read stop nothing (a study often holds
    # three T1-like series); for one that will, the run is refused, never guessed.
    for seq, message in ambiguous.items():
        if seq in wanted:
            raise SequenceError(message)
        log.info("DICOM: %s not read (the model does not use it), so its several candidates do not matter", seq)
    _check_same_patient(chosen)
    _check_one_study({seq: info for seq, info in chosen.items() if seq in wanted}, explicit or {})
    volumes = {seq: read_series(info) for seq, info in chosen.items() if seq in wanted}
    scan = combine_series(volumes, reference=ref_seq, registration=registration)
    scan.meta["unread_sequences"] = tuple(seq for seq in found_sequences if seq not in wanted)
    return scan


def combine_series(volumes: Mapping[str, tuple[Volume, DicomSeries]], reference: str | None = None,
                   registration: str = "auto") -> Scan:
    """Every sequence's volume on the reference series' grid, stacked into one Scan. Series of
    another Frame of Reference are registered (``registration`` ``auto`` or ``rigid``), never
    placed by their scanner coordinates, which mean nothing beside the reference's."""
    if not volumes:
        raise SequenceError("no series to combine")
    ref_seq = reference_sequence(tuple(volumes), reference)
    ref_volume, ref_series = volumes[ref_seq]
    other_frame = frozenset(seq for seq, (_, series) in volumes.items()
                            if seq != ref_seq and not _same_frame(series, ref_series))
    if registration == "none" and other_frame:
        seq = sorted(other_frame)[0]
        raise GeometryError(
            f"{volumes[seq][1].label} ({seq}) and {ref_series.label} ({ref_seq}) have different Frame of "
            "Reference UIDs, so their patient coordinates are not comparable (the patient was repositioned or "
            "they come from different sessions); register them (--registration auto)", volumes[seq][1].folder)
    ordered = {ref_seq: ref_volume, **{seq: volume for seq, (volume, _) in volumes.items() if seq != ref_seq}}
    on_grid, records = register_volumes(ordered, ref_seq, registration, untrusted=other_frame)
    channels = tuple(seq for seq in SEQUENCES if seq in volumes)
    scan = series_to_scan(ref_volume, ref_series, ref_seq)
    meta = dict(scan.meta)
    meta["paths"] = {seq: volumes[seq][0].path for seq in channels}
    meta["dicom_series_by_sequence"] = {seq: volumes[seq][1] for seq in channels}
    meta["registration"] = records
    return Scan(array=np.stack([on_grid[seq].array for seq in channels]).astype(np.float32, copy=False),
                affine=ref_volume.affine, channels=channels, source=scan.source, meta=meta)


def series_sha256(series: DicomSeries) -> str:
    """sha256 over the series' files in sorted slice order (what the report records as the input)."""
    import hashlib

    digest = hashlib.sha256()
    for path in series.paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def inputs_report(scan: Scan) -> dict[str, dict]:
    """The report's ``inputs`` entry for a Scan read from DICOM: per sequence the format, the
    series number and description, the grid, whether it was resampled, and the files' sha256.
    No patient data and no UIDs."""
    reference = scan.meta["reference_sequence"]
    out = {}
    for seq, series in scan.meta["dicom_series_by_sequence"].items():
        out[seq] = {
            "format": "dicom",
            "series_number": series.series_number,
            "series_description": series.series_description,
            "shape": list(series.shape),
            "spacing_mm": [series.pixel_spacing[1], series.pixel_spacing[0], round(series.slice_step, 6)],
            "reference_grid": seq == reference,
            "sha256": series_sha256(series),
        }
    return out


def _merge_same_series(found: list[SeriesInfo]) -> list[SeriesInfo]:
    """One SeriesInfo per SeriesInstanceUID: folders that overlap, or a series split over two
    folders, must not become two candidates that no choice can tell apart."""
    merged: dict[str, SeriesInfo] = {}
    for info in found:
        if info.series_uid in merged:
            first = merged[info.series_uid]
            paths = tuple(dict.fromkeys(p.resolve() for p in first.paths + info.paths))
            merged[info.series_uid] = replace(first, paths=paths)
        else:
            merged[info.series_uid] = info
    return list(merged.values())


def _check_same_patient(chosen: Mapping[str, SeriesInfo]) -> None:
    items = list(chosen.items())
    seq0, first = items[0]
    for seq, s in items[1:]:
        if s.patient.patient_id != first.patient.patient_id:
            # Never show the IDs themselves: name the series only.
            raise InputError(
                f"{s.label} ({seq}) and {first.label} ({seq0}) have different Patient IDs: the "
                "folder mixes patients; give one patient's series", s.folder,
            )


def _check_one_study(chosen: Mapping[str, SeriesInfo], explicit: Mapping[str, str | int]) -> None:
    """The series to be read come from one study (one visit): a tumour changes between visits, so
    series of two studies are combined only where the user named each of them."""
    studies = {info.study_uid for info in chosen.values()}
    if len(studies) < 2 or all(seq in explicit for seq in chosen):
        return
    listing = "; ".join(f"{info.label} ({seq})" for seq, info in chosen.items())
    raise SequenceError(
        f"the series chosen come from {len(studies)} different studies (visits): {listing}; give one "
        "study's folder, or name each series (SeriesNumber or SeriesInstanceUID) to combine them anyway",
        ", ".join(sorted({str(info.folder) for info in chosen.values()})),
    )


def _same_frame(series: DicomSeries, ref: DicomSeries) -> bool:
    return bool(series.frame_of_reference_uid) and series.frame_of_reference_uid == ref.frame_of_reference_uid
