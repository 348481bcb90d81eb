"""``tumorseg rtstruct``: an existing label map into an RTSTRUCT (and SEG) for its DICOM series.

The mask must cover exactly the series' voxels. A mask on the same grid with its axes permuted
or flipped (dcm2niix, for one, flips the row axis) is reoriented without interpolation; any
other grid is refused, never resampled: a contour must come from the voxels it was drawn on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from .. import __version__
from ..errors import GeometryError, InputError, SequenceError
from ..labels import get_scheme
from ..stages.read import read_volume
from .find import find_series
from .series import DicomSeries
from .stack import stack_series

#: A mask's affine may differ from the series' by this much (mm) and still be on its grid
#: (NIfTI converters store affines in float32).
GRID_TOLERANCE_MM = 0.01


def choose_series(folder: Path, ref: str | None) -> DicomSeries:
    found = find_series(folder)
    if ref is not None:
        found = [s for s in found if ref in (s.series_uid, str(s.series_number))]
    if len(found) != 1:
        listing = "; ".join(s.label for s in find_series(folder)) or "none"
        what = f"no series {ref!r}" if ref is not None and not found else f"{len(found)} image series"
        raise SequenceError(f"{what} in the folder (series: {listing}); name one with --series-uid", folder)
    return stack_series(found[0])


def mask_on_series_grid(mask_path: Path, series: DicomSeries) -> np.ndarray:
    """The mask's integer labels as (Columns, Rows, slices) of ``series``; refuses other grids."""
    volume = read_volume(mask_path, allow_constant=True)
    array = volume.array
    if array.ndim != 3:
        raise GeometryError(f"a mask must be 3D, got shape {array.shape}", mask_path)
    labels = np.rint(array)
    if not np.array_equal(labels, array):
        raise InputError("the mask holds non-integer values; give a label map", mask_path)
    transform = ornt_transform(io_orientation(volume.affine), io_orientation(series.affine))
    labels = apply_orientation(labels, transform)
    affine = volume.affine @ inv_ornt_aff(transform, array.shape)
    if labels.shape != series.shape:
        raise GeometryError(f"the mask is not on the grid of {series.label}: in the series' axis order "
                            f"it has shape {labels.shape}, the series {series.shape} (Columns, Rows, "
                            "slices)", mask_path)
    difference = float(np.abs(affine - series.affine).max())
    if difference > GRID_TOLERANCE_MM:
        raise GeometryError(f"the mask is not on the grid of {series.label}: its affine differs by "
                            f"{difference:.4g} mm (tolerance {GRID_TOLERANCE_MM} mm)", mask_path)
    return np.ascontiguousarray(labels).astype(np.int64)


def export_mask(mask: Path, series_folder: Path, output: Path, label_scheme: str, series_ref: str | None,
                algorithm: str, seg: bool) -> dict[str, Path]:
    from .rtstruct import write_rtstruct
    from .seg import write_seg
    from ..pipeline import RTSTRUCT_NAME, SEG_NAME

    scheme = get_scheme(label_scheme)
    series = choose_series(Path(series_folder), series_ref)
    labels = mask_on_series_grid(Path(mask), series)
    scheme.validate_array(labels, "the mask", mask)
    headers = series.read_headers()
    version = f"tumorseg {__version__}"
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"rtstruct": write_rtstruct(labels, scheme, headers, output / RTSTRUCT_NAME,
                                        algorithm_name=algorithm, algorithm_version=version).path}
    if seg:
        paths["seg"] = write_seg(labels, scheme, headers, output / SEG_NAME, algorithm_name=algorithm,
                                 algorithm_version=version)
    return paths
