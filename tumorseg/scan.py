"""The one in-memory type that carries a scan between stages.

Convention: ``array`` is indexed ``[channel, i, j, k]`` in the voxel order of the file it came
from, and ``affine`` maps voxel indices ``(i, j, k, 1)`` to RAS+ world millimetres (nibabel's
convention). DICOM/ITK LPS is converted once, at the reading edge.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .labels import LabelScheme


#: Affines may differ by this much (mm, per entry) and still count as one grid.
AFFINE_TOLERANCE_MM = 1e-3


def same_grid(shape_a, affine_a: np.ndarray, shape_b, affine_b: np.ndarray) -> bool:
    """Whether two (I, J, K) grids are the same voxels: equal shapes, affines within
    AFFINE_TOLERANCE_MM per entry."""
    return tuple(shape_a) == tuple(shape_b) and bool(
        np.allclose(affine_a, affine_b, atol=AFFINE_TOLERANCE_MM, rtol=0))


def grid_difference(a: np.ndarray, b: np.ndarray) -> str:
    """What differs between two voxel-to-world affines, in words a user can act on."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    origin = float(np.linalg.norm(a[:3, 3] - b[:3, 3]))
    axes = float(np.abs(a[:3, :3] - b[:3, :3]).max())
    if axes <= AFFINE_TOLERANCE_MM and origin <= AFFINE_TOLERANCE_MM:
        return "the affines agree, the shapes differ"
    if axes <= AFFINE_TOLERANCE_MM:
        return f"the affines differ only in origin, by {origin:.4g} mm"
    return (f"the affines differ: voxel axes by up to {axes:.4g} mm per entry (another orientation or spacing), "
            f"origin by {origin:.4g} mm")


@dataclass(frozen=True)
class SourceGeometry:
    """What the writer needs to put a result back on the input's exact grid.

    ``shape`` is the spatial shape (i, j, k); ``affine`` the RAS affine; ``nifti_header`` the
    reference NIfTI header (bytes) when the reference input was NIfTI, so that qform/sform and
    their codes are copied bit for bit; None for other formats. ``dicom_series`` is the
    reference series (:class:`tumorseg.dicom.series.DicomSeries`) when the input was DICOM:
    the RTSTRUCT and SEG writers reference its instances.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    nifti_header: bytes | None = None
    dicom_series: Any = None


@dataclass(frozen=True)
class Scan:
    """A multi-channel image: ``array`` float32 of shape (C, I, J, K), one channel per sequence."""

    array: np.ndarray
    affine: np.ndarray
    channels: tuple[str, ...]
    source: SourceGeometry
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 4:
            raise ValueError(f"Scan.array must be (C, I, J, K), got shape {self.array.shape}")
        if len(self.channels) != self.array.shape[0]:
            raise ValueError(
                f"{len(self.channels)} channel names for {self.array.shape[0]} channels"
            )
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along (i, j, k): the column norms of the affine."""
        return voxel_spacing(self.affine)

    def with_array(self, array: np.ndarray, affine: np.ndarray | None = None) -> "Scan":
        return replace(self, array=array, affine=self.affine if affine is None else affine)

    def with_channels(self, names: tuple[str, ...]) -> "Scan":
        """A copy holding only the channels ``names``, in that order."""
        keep = [self.channels.index(s) for s in names]
        return replace(self, array=self.array[keep], channels=tuple(names))


@dataclass(frozen=True)
class LabelMap:
    """An integer label map of shape (I, J, K) with its RAS affine and label scheme."""

    array: np.ndarray
    affine: np.ndarray
    scheme: LabelScheme
    source: SourceGeometry

    @property
    def spacing(self) -> np.ndarray:
        return voxel_spacing(self.affine)

    @property
    def voxel_volume_ml(self) -> float:
        return voxel_volume_ml(self.affine)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each voxel axis (column norms of the 3x3 part)."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL: |det| of the 3x3 part / 1000. Equals the product of
    :func:`voxel_spacing` unless the affine has shear, where that product overstates it."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
