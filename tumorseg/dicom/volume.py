"""Read one series into a volume: its pixels, decoded and rescaled, on the stacked grid.

Pixel data that is truncated or cannot be decoded, and transfer syntaxes pydicom has no installed
decoder for, are refused naming the file and the syntax (:class:`~tumorseg.errors.InputError`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..stages.read import Volume, check_affine, check_values
from .files import first_line, header_text, read_dataset, whole_number
from .find import find_series
from .frames import frame_headers, number_of_frames
from .series import DicomSeries, SeriesInfo
from .stack import stack_series

log = logging.getLogger(__name__)


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
    folder = dicom.folder
    check_affine(dicom.affine, folder)
    array = _read_pixels(dicom)
    check_values(array, folder, allow_constant=False)
    log.info("read %s: %d x %d x %d voxels, %.4g x %.4g x %.4g mm", dicom.label, *dicom.shape,
             dicom.pixel_spacing[1], dicom.pixel_spacing[0], dicom.slice_step)
    return Volume(array, dicom.affine, None, folder), dicom


def _read_pixels(series: DicomSeries) -> np.ndarray:
    """float32 (Columns, Rows, slices) with RescaleSlope/Intercept applied (per frame when enhanced)."""
    for path, ts in dict(zip(series.paths, series.transfer_syntax_uids)).items():
        _check_transfer_syntax(ts, path)
    array = np.empty(series.shape, dtype=np.float32)
    slices_of: dict[tuple[Path, str], list[int]] = {}
    for k, key in enumerate(zip(series.paths, series.sop_instance_uids)):
        slices_of.setdefault(key, []).append(k)
    for (path, uid), ks in slices_of.items():  # each file read once, however many frames it holds
        try:
            ds = read_dataset(path)
        except Exception as e:
            raise InputError(f"a DICOM file that cannot be parsed (truncated or corrupt: "
                             f"{first_line(e)})", path) from None
        if str(ds.SOPInstanceUID) != uid:
            raise InputError("the file changed while it was read; read the series again", path)
        if series.frame_numbers[ks[0]] == 0:
            array[:, :, ks[0]] = _rescaled(_image_pixels(ds, path, series, 1), ds).T
            continue
        count = number_of_frames(ds)
        pixels = _image_pixels(ds, path, series, count)
        if count == 1:  # an enhanced image of one frame: pydicom gives (Rows, Columns)
            pixels = pixels[np.newaxis]
        frames = frame_headers(ds)
        for k in ks:
            n = series.frame_numbers[k] - 1
            array[:, :, k] = _rescaled(pixels[n], frames[n]).T
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


def _image_pixels(ds, path: Path, series: DicomSeries, frames: int) -> np.ndarray:
    """The decoded stored values: (Rows, Columns), or (frames, Rows, Columns) for several frames."""
    if "PixelData" not in ds:
        raise InputError("the image has no pixel data", path)
    samples = whole_number(ds, "SamplesPerPixel", path, default=1)
    photometric = header_text(ds, "PhotometricInterpretation")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2", ""):
        raise InputError(
            f"a colour image ({photometric}, {samples} samples per pixel); MR sequences are "
            "greyscale", path,
        )
    ts = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
    if ts and not _is_compressed(ts):
        bits = whole_number(ds, "BitsAllocated", path, default=16)
        expected = series.rows * series.columns * bits // 8 * frames
        if len(ds.PixelData) < expected:
            raise InputError(
                f"truncated pixel data: {len(ds.PixelData)} of {expected} bytes; the file is "
                "damaged (copy it again from the source)", path,
            )
    try:
        pixels = ds.pixel_array
    except Exception as e:
        name = _sop_ts_name(ts)
        raise InputError(f"cannot decode the pixel data ({name}: {first_line(e)})", path) from None
    expected_shape = (series.rows, series.columns) if frames == 1 else (frames, series.rows, series.columns)
    if pixels.shape != expected_shape:
        raise InputError(f"pixel data of shape {pixels.shape}, expected {expected_shape} "
                         "((frames,) Rows, Columns)", path)
    return pixels


def _rescaled(pixels: np.ndarray, header) -> np.ndarray:
    """Stored values to real values with the image's (or frame's) RescaleSlope/Intercept, float32."""
    slope = _float(header, "RescaleSlope", 1.0)
    intercept = _float(header, "RescaleIntercept", 0.0)
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
        raise InputError(f"{keyword} is not a number; the file is damaged", getattr(ds, "filename", None)) from None
