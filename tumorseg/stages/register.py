"""Register stage: every sequence onto the reference sequence's grid, before normalisation.

A hospital study has each sequence on its own grid (a 5 mm axial FLAIR, a 1 mm 3D T1 after
contrast, often coronal) and a patient who may move between series. Each sequence other than the
reference is brought onto the reference's voxels by one of:

- ``same grid``: it is on them already (copied, not interpolated);
- ``scanner coordinates``: resampled where the scanner says it lies (``--registration none``:
  for sequences known to be aligned);
- ``rigid``: a rigid transform found by Mattes mutual information over three resolutions, from
  three starts (the centres of mass, the grids' centres, the scanner's placement; so 20 mm and 15
  degrees of motion are within reach), then resampled through it (linear interpolation; 0 outside
  the sequence's field of view).

Every transform is recorded as ``matrix_ras``: the 4x4 map from a point of the reference's world
(RAS mm) to the same anatomy in that sequence's world (RAS mm); the identity means the scanner's
coordinates were trusted. Registration is deterministic: each search runs on one thread (ITK's
multi-threaded Mattes metric adds in a different order on every run) with a fixed sampling seed, so
the same inputs give the same bytes on any machine (tested); the three starts are searched side by
side. Inputs that cannot be registered (almost no
overlap, fewer than 3 slices, a failed optimisation) are refused, naming the sequence.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import GeometryError
from ..config import REGISTRATION_MODES
from ..itk import lps_matrix, matrix_ras, resample_to_grid, to_sitk
from ..scan import Scan, same_grid
from .read import Volume, stack_volumes

log = logging.getLogger(__name__)

#: Resolutions of the rigid search: shrink factors and smoothing sigmas (mm), coarse to fine.
SHRINK_FACTORS = (4, 2, 1)
SMOOTHING_MM = (2.0, 1.0, 0.0)
#: Share of the sampled (fixed) image's voxels the metric uses (regular grid, fixed seed): 10 % was
#: within 0.25 mm of 20 % on the three cases tried, in about half the time; 5 % lost accuracy.
SAMPLING = 0.1
SAMPLING_SEED = 25
HISTOGRAM_BINS = 32
#: A head mask covering less of the fixed image than this is not trusted for sampling.
MIN_MASK_SHARE = 0.02
#: How far around the head the full-resolution search samples (mm).
MASK_MARGIN_MM = 10.0
#: A registered sequence must cover this share of the reference's head, or it is refused.
MIN_OVERLAP = 0.5
#: Motion larger than this is reported as a warning (patients move 10-15 degrees and 10-20 mm).
WARN_ROTATION_DEG = 20.0
WARN_SHIFT_MM = 30.0
#: Mattes MI is negative, lower is better: above WARN_METRIC the images share little structure
#: (warned); above REFUSE_METRIC the search ended in a wrong place or the series are not of one head
#: (refused). Real sequence pairs of one head ended at -0.46 to -0.98 (BraTS FLAIR/T1/T2 onto T1c
#: at 1-5 mm and 0-30 degrees, the FLAIR with Rician noise of 30 % of the brain's mean: -0.46; the
#: decubitus T1 series -0.90 to -0.98); a search left in a wrong basin (the series turned 60, 90 or
#: 180 degrees by its header) at -0.14 to -0.25, another patient's head at -0.29 and -0.39.
WARN_METRIC = -0.4
REFUSE_METRIC = -0.3
#: A volume needs this many voxels along each axis to be registered (the pyramid's smoothing).
MIN_SLICES = 4


@dataclass(frozen=True)
class Registration:
    """How one sequence reached the reference grid."""

    sequence: str
    method: str  # "reference", "same grid", "scanner coordinates" or "rigid"
    matrix_ras: np.ndarray  # 4x4: reference world (RAS mm) -> this sequence's world (RAS mm)
    metric: float | None = None  # Mattes mutual information at the end (rigid only; lower is better)
    coverage: float = 1.0  # share of the reference grid inside this sequence's field of view
    warning: str | None = None

    @property
    def rotation_deg(self) -> float:
        cos = (np.trace(self.matrix_ras[:3, :3]) - 1.0) / 2.0
        return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))

    def translation_mm(self, centre_ras: np.ndarray) -> np.ndarray:
        """How far the anatomy at ``centre_ras`` (the reference's centre) moved, RAS mm."""
        centre = np.append(np.asarray(centre_ras, dtype=np.float64), 1.0)
        return (self.matrix_ras @ centre)[:3] - centre[:3]

    def to_report(self, centre_ras: np.ndarray) -> dict[str, Any]:
        shift = self.translation_mm(centre_ras)
        return {
            "method": self.method,
            "matrix_ras": np.round(self.matrix_ras, 6).tolist(),
            "rotation_deg": round(self.rotation_deg, 3),
            "translation_mm": [round(float(v), 3) for v in shift],
            "metric": None if self.metric is None else round(self.metric, 5),
            "coverage": round(self.coverage, 4),
            "warning": self.warning,
        }


def grid_centre(shape, affine: np.ndarray) -> np.ndarray:
    """The RAS position of a grid's centre voxel."""
    return (affine @ np.append((np.asarray(shape[:3], dtype=np.float64) - 1) / 2, 1.0))[:3]


def register_volumes(volumes: dict[str, Volume], reference: str, mode: str = "auto",
                     untrusted: frozenset[str] = frozenset()) -> tuple[dict[str, Volume], list[Registration]]:
    """Every volume on ``reference``'s grid, and how each got there (reference first).

    ``mode``: ``auto`` registers the sequences whose grid differs from the reference's and copies
    the others; ``rigid`` registers every one; ``none`` resamples by scanner coordinates alone.
    ``untrusted``: sequences whose scanner coordinates mean nothing beside the reference's (another
    DICOM Frame of Reference): registered under ``auto`` even on the same grid. Pure: the input
    volumes are not changed.
    """
    if mode not in REGISTRATION_MODES:
        raise ValueError(f"registration must be one of {', '.join(REGISTRATION_MODES)}, got {mode!r}")
    ref = volumes[reference]
    identity = np.eye(4)
    out = {reference: ref}
    records = [Registration(reference, "reference", identity)]
    for seq, vol in volumes.items():
        if seq == reference:
            continue
        on_grid = same_grid(vol.array.shape, vol.affine, ref.array.shape, ref.affine)
        if not on_grid and mode != "rigid" and (reordered := _reoriented_onto(vol, ref)) is not None:
            vol, on_grid = reordered, True  # the same voxels stored in another order: reordered, not interpolated
        if mode == "none" or (mode == "auto" and on_grid and seq not in untrusted):
            if on_grid:
                out[seq], record = vol, Registration(seq, "same grid", identity)
            else:
                array, covered = resample_to_grid(vol.array, vol.affine, ref.array.shape, ref.affine,
                                                  default=_background(vol.array))
                out[seq] = Volume(array, ref.affine, ref.nifti_header, vol.path)
                record = Registration(seq, "scanner coordinates", identity, coverage=covered)
        else:
            matrix, metric = rigid_transform(ref, vol, seq, reference)
            fill = _background(vol.array)
            array, covered = resample_to_grid(vol.array, vol.affine, ref.array.shape, ref.affine, matrix_ras=matrix,
                                              default=fill)
            out[seq] = Volume(array, ref.affine, ref.nifti_header, vol.path)
            record = Registration(seq, "rigid", matrix, metric, covered)
            overlap = _head_overlap(ref.array, array, fill)
            if overlap < MIN_OVERLAP:
                raise GeometryError(
                    f"the {seq} sequence could not be registered to the {reference} reference: after "
                    f"registration it covers {100 * overlap:.0f} % of the reference's head (at least "
                    f"{100 * MIN_OVERLAP:.0f} % needed); check that both series show the same head", vol.path)
        record = _with_warning(record, grid_centre(ref.array.shape, ref.affine))  # logged with the report's warnings
        log.info("registration: %s onto %s by %s (rotation %.1f deg)", seq, reference, record.method,
                 record.rotation_deg)
        records.append(record)
    return out, records


def register_study(volumes: dict[str, Volume], reference: str, mode: str = "auto") -> Scan:
    """``register_volumes``, stacked into one Scan on the reference's grid (reference first, so its
    header is the one the label map is written with); ``meta["registration"]`` holds the records
    and ``meta["reference_sequence"]`` the reference."""
    on_grid, records = register_volumes(volumes, reference, mode)
    scan = stack_volumes(on_grid)
    scan.meta.update(registration=records, reference_sequence=reference)
    return scan


def rigid_transform(fixed: Volume, moving: Volume, sequence: str,
                    reference: str = "reference") -> tuple[np.ndarray, float]:
    """The rigid ``matrix_ras`` (reference world -> ``moving``'s world) that best aligns ``moving``
    to ``fixed`` by mutual information, and the final metric. Refuses what cannot be registered."""
    import SimpleITK as sitk

    for volume, name in ((moving, sequence), (fixed, reference)):
        if min(volume.array.shape[:3]) < MIN_SLICES:
            raise GeometryError(f"the {name} sequence has {min(volume.array.shape[:3])} slices along one axis: "
                                f"too few to register (at least {MIN_SLICES}); give the whole series", volume.path)
    # The metric samples the fixed image's voxels and interpolates the moving one: the image with
    # fewer voxels (usually the thick-slice series) is sampled, where its data really is, and the
    # finer one interpolated; the transform found is then inverted. On BraTS FLAIR re-acquired at
    # 5 mm this lowered the mean TRE of three cases from 1.07 to 0.83 mm (benchmarks/registration.py).
    swap = moving.array.size < fixed.array.size
    if swap:
        fixed, moving = moving, fixed
    fixed_image = to_sitk(fixed.array.astype(np.float32, copy=False), fixed.affine)
    moving_image = to_sitk(moving.array.astype(np.float32, copy=False), moving.affine)
    # One thread for every filter of the search (the metric alone is not enough: the pyramid's
    # smoothing and the initializer change the last bits with the thread count), so that the
    # same inputs give the same transform on any machine.
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        # Three starts searched at the coarse levels (the coarsest alone chose wrongly), the best
        # (lowest metric there) refined at full resolution: the centres of mass alone went 6 mm wrong on a FLAIR that covers part
        # of the brain (its centre of mass is not the brain's), where the scanner's placement or
        # the grids' centres start closer.
        starts = [sitk.CenteredTransformInitializer(fixed_image, moving_image, sitk.Euler3DTransform(), mode)
                  for mode in (sitk.CenteredTransformInitializerFilter.MOMENTS,
                               sitk.CenteredTransformInitializerFilter.GEOMETRY)]
        starts.append(sitk.Euler3DTransform())  # where the scanner put it

        def search_from(start):
            try:
                return _search(fixed_image, moving_image, start, SHRINK_FACTORS[:-1], SMOOTHING_MM[:-1])
            except RuntimeError as e:  # a start with no overlap (the scanner's, far off): the others may do
                return e

        # The starts searched side by side: each search is one-threaded (its result does not
        # depend on how many run at once), and SimpleITK lets go of the GIL while it searches.
        with ThreadPoolExecutor(max_workers=min(len(starts), len(os.sched_getaffinity(0)))) as pool:
            searched = list(pool.map(search_from, starts))
        coarse = [found for found in searched if not isinstance(found, RuntimeError)]
        failures = [found for found in searched if isinstance(found, RuntimeError)]
        if not coarse:
            raise failures[0]
        best, _ = min(coarse, key=lambda found: found[1])
        final, metric = _search(fixed_image, moving_image, best, SHRINK_FACTORS[-1:], SMOOTHING_MM[-1:],
                                _sampling_mask(fixed))
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise GeometryError(f"the {sequence} sequence could not be registered to the reference "
                            f"({lines[-1] if lines else type(e).__name__})", (fixed if swap else moving).path) from None
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    if not np.isfinite(metric) or metric > REFUSE_METRIC:
        raise GeometryError(f"the {sequence} sequence could not be registered to the reference: the images share "
                            f"next to no structure after registration (mutual information {metric:.3f}; one head's "
                            f"series reach {WARN_METRIC} or lower): the search failed (is a header's orientation "
                            "wrong?) or the series do not show the same head", (fixed if swap else moving).path)
    matrix = matrix_ras(final)
    return (np.linalg.inv(matrix) if swap else matrix), metric


def _sampling_mask(fixed: Volume):
    """Where the full-resolution search samples the fixed image: its head, grown by 3 voxels (the
    edges inform the metric most), as a SimpleITK mask; None where no head is found. Background
    samples add time, not information: on BraTS FLAIR re-acquired at 5 mm the mask (16-24 % of the
    series) brought the search from 21-23 s to 11-14 s and the worst TRE from 1.25 to 0.50 mm."""
    from scipy import ndimage as ndi

    head = head_mask(fixed.array)
    if head.mean() < MIN_MASK_SHARE:
        return None
    spacing = np.sqrt((fixed.affine[:3, :3] ** 2).sum(0))
    mask = ndi.distance_transform_edt(~head, sampling=spacing) <= MASK_MARGIN_MM
    if mask.mean() < MIN_MASK_SHARE:
        return None
    return to_sitk(mask.astype(np.uint8), fixed.affine)


def _search(fixed_image, moving_image, start, shrink: tuple[int, ...], smoothing_mm: tuple[float, ...],
            fixed_mask=None):
    """Mattes MI rigid registration from ``start`` over the given resolutions (sampling the fixed
    image within ``fixed_mask`` when given): (transform, metric)."""
    import SimpleITK as sitk

    centre = np.array(fixed_image.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in fixed_image.GetSize()]))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(SAMPLING, SAMPLING_SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=200,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel(list(smoothing_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(_as_euler(start, centre), inPlace=False)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    found = method.Execute(fixed_image, moving_image)
    return _as_euler(found, centre), float(method.GetMetricValue())


def _as_euler(transform, centre):
    """A rigid SimpleITK transform of any wrapping (the initializer's, a composite from a search)
    as one Euler3DTransform about ``centre`` (LPS mm)."""
    import SimpleITK as sitk

    lps = lps_matrix(transform)
    euler = sitk.Euler3DTransform()
    euler.SetCenter(tuple(float(v) for v in centre))
    euler.SetMatrix(tuple(float(v) for v in lps[:3, :3].ravel()))
    euler.SetTranslation(tuple(float(v) for v in lps[:3, 3] + lps[:3, :3] @ centre - centre))
    return euler


def head_mask(array: np.ndarray) -> np.ndarray:
    """The head (or, skull-stripped, the brain): voxels above an Otsu threshold of the image."""
    from skimage.filters import threshold_otsu

    sample = array[::2, ::2, ::2]
    if sample.min() == sample.max():
        return np.zeros(array.shape, dtype=bool)
    return array > threshold_otsu(sample)


def _head_overlap(reference: np.ndarray, moved: np.ndarray, background: float = 0.0) -> float:
    """Share of the reference's head where the moved sequence holds data (not its background)."""
    head = head_mask(reference)
    return float(np.count_nonzero(head & (moved != background)) / max(1, np.count_nonzero(head)))


def _background(array: np.ndarray) -> float:
    """What a sequence holds outside its field of view once resampled: its own constant background
    (-3.16 in z-scored BraTS 2015 files, where 0 is average tissue), else 0."""
    from .normalize import background_value

    value = background_value(array)
    return 0.0 if value is None else value


def _reoriented_onto(vol: Volume, ref: Volume) -> Volume | None:
    """``vol`` with its axes permuted and flipped onto ``ref``'s grid when both are the same voxels
    stored in another order (a LAS file beside a RAS one); None otherwise."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    ornt = ornt_transform(io_orientation(vol.affine), io_orientation(ref.affine))
    array = apply_orientation(vol.array, ornt)
    affine = vol.affine @ inv_ornt_aff(ornt, vol.array.shape)
    if not same_grid(array.shape, affine, ref.array.shape, ref.affine):
        return None
    return Volume(np.ascontiguousarray(array), affine, vol.nifti_header, vol.path)


def _with_warning(record: Registration, centre_ras: np.ndarray) -> Registration:
    notes = []
    shift = float(np.linalg.norm(record.translation_mm(centre_ras)))
    if record.rotation_deg > WARN_ROTATION_DEG or shift > WARN_SHIFT_MM:
        notes.append(f"moved {record.rotation_deg:.1f} degrees and {shift:.1f} mm from where the scanner put it")
    if record.metric is not None and record.metric > WARN_METRIC:
        notes.append(f"little shared structure after registration (mutual information {record.metric:.3f})")
    if record.coverage < 0.9 and record.method != "same grid":
        notes.append(f"covers {100 * record.coverage:.0f} % of the reference grid")
    if not notes:
        return record
    return replace(record, warning=f"registration of {record.sequence}: " + "; ".join(notes)
                   + ": check it in overview.png (or --save-registered)")
