"""Deterministic synthetic brain-tumour MRI cases on real healthy anatomy.

A case starts from one of two healthy heads: the MNI ICBM152 2009a symmetric template (T1 and
grey/white-matter probability maps, 1 mm, the copy inside the nilearn wheel), or, from generator version
3 on, the Colin27 single-subject T1 with and without skull (Debian's mricron-data), whose tissue maps are
fitted to its own intensities and whose real scalp, skull and face are kept in scans with skull. It
pushes the tissue away from a tumour (mass effect), paints a three-compartment glioma (necrotic core,
enhancing rim, white-matter-following edema), renders four MR contrasts (FLAIR, T1w, T1gd, T2w),
then "acquires" them like a scanner would: a random head pose, a random voxel grid (spacing, axis
order and flips, small obliquity, field of view), slice-profile blur, a smooth bias field, Rician
noise and an arbitrary intensity scale. Some cases keep a scalp and skull, others are skull-stripped
(zero outside the brain, as in BraTS).

Normal structures that enhance on T1gd (the superior sagittal and transverse sinuses, the choroid
plexus) are painted as well and stay background: on real scans they are the commonest false
"enhancing tumour", and a model that never saw them cannot learn that (generator version 2).

Every random choice comes from one ``numpy.random.Generator`` seeded by the case seed, and every
operation is deterministic, so a seed always gives byte-identical arrays.

Two coordinate frames matter (both in mm, RAS+ as nibabel):

* MNI: the template's frame; ``template affine`` maps template voxels to it.
* world: the scanner's frame; ``world = head_pose @ mni`` (the head is placed and tilted in the scanner)
  and ``world = case.affine @ voxel``.

The label map is resampled (nearest neighbour) with exactly the same voxel mapping as the image
(trilinear), so both share ``case.affine``.
"""
from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .atomic import atomic_path, write_bytes_atomic
from .errors import ConfigError

__all__ = ["SynthCase", "synth_case", "write_synth_dataset", "CHANNELS", "LABELS"]

log = logging.getLogger(__name__)

#: Channel order of the image (Medical Segmentation Decathlon Task01).
CHANNELS = ("flair", "t1", "t1gd", "t2")
#: Label scheme (Medical Segmentation Decathlon Task01).
LABELS = {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}
EDEMA, CORE, ENHANCING = 1, 2, 3
#: Bumped whenever a seed's images change; recorded in dataset.json, a folder never mixes versions.
GENERATOR_VERSION = 3
#: Versions this code still makes, byte for byte (version 1: no enhancing normal structures, and the
#: default model was trained on it, so its card's command needs it; version 2: MNI152 anatomy only).
GENERATOR_VERSIONS = (1, 2, 3)
#: Healthy anatomies: versions 1 and 2 use the first only, version 3 draws one per case.
ANATOMIES = ("mni152", "colin27")

_TEMPLATE_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
_COLIN_FOLDER = Path("/usr/share/mricron/templates")
#: Colin27 with skull and skull-stripped, and the sha256 of their voxels (uint8) as Debian's
#: mricron-data 1.2.20211006 ships them: other voxels would make other cases from the same seed.
_COLIN_FILES = {
    "head": ("ch2.nii.gz", "f5a6ac5d280552d299bc4fb0e6724485f25bad45f69117e87fa5880ebdcce7af"),
    "brain": ("ch2bet.nii.gz", "1848bfb33c39fdd1c23b7eefefa2aa77442e2c6e620b080b1e0663bf57a04a25"),
}
_MNI_LICENCE = (
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
    "Institute, McGill University. Permission to use, copy, modify, and distribute this software and "
    "its documentation for any purpose and without fee is hereby granted, provided that the above "
    "copyright notice appear in all copies. The authors and McGill University make no representations "
    "about the suitability of this software for any purpose. It is provided 'as is' without express or "
    "implied warranty."
)

# Relative tissue intensities per channel (flair, t1, t1gd, t2); white matter on T1 = 1.
_MEANS: dict[str, tuple[float, float, float, float]] = {
    "wm": (0.55, 1.00, 1.00, 0.45),
    "gm": (0.75, 0.68, 0.70, 0.65),
    "csf": (0.10, 0.25, 0.27, 1.45),
    "edema": (1.20, 0.55, 0.57, 1.15),
    "necrosis": (0.70, 0.35, 0.38, 1.30),  # FLAIR is redrawn per case: necrosis is variable there
    "enhancing": (0.95, 0.62, 1.70, 0.85),
    "bone": (0.05, 0.08, 0.08, 0.06),
    "marrow": (0.35, 0.65, 0.70, 0.45),
    "scalp": (0.75, 1.15, 1.20, 0.80),
    # Venous sinuses and choroid plexus: flow void or intermediate on FLAIR and T2 (redrawn per
    # case), bright after contrast.
    "vessel": (0.40, 0.60, 1.65, 0.50),
}
_MAX_DIM = 256


@dataclass(frozen=True)
class SynthCase:
    """One synthetic case.

    image: float32 (4, I, J, K), channels :data:`CHANNELS` (flair, t1, t1gd, t2), arbitrary units.
    labels: uint8 (I, J, K), :data:`LABELS` (0 background, 1 edema, 2 necrotic/non-enhancing core,
        3 enhancing tumour), on the same voxel grid as ``image``.
    affine: float64 (4, 4), voxel (i, j, k) -> RAS+ world mm, as nibabel.
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray


# --------------------------------------------------------------------------- anatomy (cached)


@dataclass(frozen=True)
class _Anatomy:
    """The healthy template on its 1 mm grid; arrays are shared across cases: never mutate them."""

    name: str  # one of ANATOMIES
    affine: np.ndarray  # template voxel -> MNI mm
    t1: np.ndarray  # float32, template T1 scaled so that white matter ~ 1
    gm: np.ndarray  # float32 probability
    wm: np.ndarray  # float32 probability
    mask: np.ndarray  # bool brain mask
    band: np.ndarray  # int64 flat indices of voxels outside the brain within 25 mm of it
    band_dist: np.ndarray  # float32 distance (mm) of those voxels to the brain
    centres: np.ndarray  # int64 flat indices of candidate tumour centres
    centre_depth: np.ndarray  # float32 depth (mm) of those centres inside the brain
    centre_in_wm: np.ndarray  # bool, centre is in white matter
    brain_box_mm: np.ndarray  # (2, 3) min/max MNI mm of the brain
    head: np.ndarray | None  # float32 T1 of the real scalp, skull and face at ``band`` (scaled as t1), or None


def _template_paths() -> dict[str, Path]:
    """Paths of the MNI152 2009a files inside the installed nilearn, found without importing it."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "tumorseg.synth needs the MNI152 template shipped inside the 'nilearn' package, which is not "
            "installed: pip install nilearn",
            name="nilearn",
        )
    folder = Path(os.path.dirname(spec.origin)) / "datasets" / "data"
    paths = {k: folder / name for k, name in _TEMPLATE_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the installed nilearn lacks the MNI152 2009 template files {missing}; install a nilearn "
            "release that bundles them (0.10 or later): pip install -U nilearn"
        )
    return paths


def _colin_paths() -> dict[str, Path]:
    """Paths of Colin27 with and without skull, from Debian's mricron-data package."""
    paths = {k: _COLIN_FOLDER / name for k, (name, _) in _COLIN_FILES.items()}
    missing = [p for p in paths.values() if not p.is_file()]
    if missing:
        raise ConfigError(
            "is missing, and synthetic generator version 3 draws half its cases on this Colin27 head: "
            "install Debian's mricron-data package (apt-get install mricron-data), or make MNI152-only "
            "cases with --generator-version 2", path=missing[0])
    return paths


@functools.lru_cache(maxsize=None)
def _anatomy(name: str = "mni152") -> _Anatomy:
    """The healthy anatomy ``name`` (one of :data:`ANATOMIES`), loaded once per process."""
    if name == "colin27":
        return _colin27()
    if name != "mni152":
        raise ValueError(f"unknown anatomy {name!r}; known: {list(ANATOMIES)}")
    import nibabel as nib

    paths = _template_paths()
    t1_img = nib.load(str(paths["t1"]))
    raw_t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(str(paths["gm"])).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(str(paths["wm"])).dataobj, dtype=np.float32) / 255.0
    # The template is skull-stripped: its scans with skull get a drawn shell (_render).
    return _finish_anatomy("mni152", paths["t1"], t1_img.affine, raw_t1, gm, wm, raw_t1 > 0, None)


def _colin27() -> _Anatomy:
    import nibabel as nib

    paths = _colin_paths()
    images = {k: nib.load(str(p)) for k, p in paths.items()}
    voxels = {k: np.asarray(im.dataobj) for k, im in images.items()}
    for key, (name, digest) in _COLIN_FILES.items():
        if hashlib.sha256(np.ascontiguousarray(voxels[key]).tobytes()).hexdigest() != digest:
            raise ConfigError(f"its voxels differ from the Colin27 {name} this generator was written for "
                              "(Debian mricron-data 1.2.20211006), so seeds would not give the documented "
                              "cases; make cases with --generator-version 2 instead", path=paths[key])
    if not np.allclose(images["head"].affine, images["brain"].affine) or voxels["head"].shape != voxels["brain"].shape:
        raise ConfigError(f"is not on the grid of {paths['brain']}", path=paths["head"])
    brain = voxels["brain"].astype(np.float32)
    mask = ndi.binary_fill_holes(_largest_component(brain > 0))  # BET left a few specks outside
    gm, wm = _tissue_fractions(brain, mask)
    raw_t1 = np.where(mask, brain, 0).astype(np.float32)
    return _finish_anatomy("colin27", paths["brain"], images["brain"].affine, raw_t1, gm, wm, mask,
                           voxels["head"].astype(np.float32))


def _tissue_fractions(t1: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grey- and white-matter fractions of the voxels in ``mask`` of an integer-valued T1 (the rest
    of the brain is CSF).

    Partial-volume model: a voxel between two tissues' typical intensities is a linear mix of them.
    The typical intensities are histogram peaks: white matter the highest, grey matter the highest at
    least 15 levels darker, CSF the highest darker than half the grey matter. Colin27 (27 averaged
    scans) has little noise or bias, which is what a histogram model needs.
    """
    counts = ndi.gaussian_filter1d(np.bincount(t1[mask].astype(np.int64)).astype(np.float64), 2.0)
    white = int(np.argmax(counts))
    grey = int(np.argmax(counts[:white - 15]))
    csf_level = int(np.argmax(counts[:grey // 2]))
    wm = np.clip((t1 - grey) / (white - grey), 0, 1) * mask
    csf = np.clip((grey - t1) / (grey - csf_level), 0, 1) * mask
    return (mask - wm - csf).astype(np.float32), wm.astype(np.float32)


def _finish_anatomy(name: str, path: Path, affine, raw_t1: np.ndarray, gm: np.ndarray, wm: np.ndarray,
                    mask: np.ndarray, head: np.ndarray | None) -> _Anatomy:
    """The derived maps every anatomy needs; ``head`` is the full-head T1 (same scale as raw_t1) or None."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.allclose(affine[:3, :3], np.eye(3)):  # the code below counts mm in template voxels
        raise ValueError(f"{path}: expected a 1 mm RAS template grid, got affine {affine.tolist()}")
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    gm *= mask
    wm *= mask
    white = np.float32(raw_t1[wm > 0.9].mean())
    t1 = raw_t1 / white

    outside = ndi.distance_transform_edt(~mask).astype(np.float32)
    band = np.flatnonzero((outside > 0) & (outside < 25))
    # Depth only chooses tumour centres: a 2 mm grid is precise enough and 8x cheaper.
    depth = ndi.distance_transform_edt(mask[::2, ::2, ::2], sampling=2.0).astype(np.float32)
    depth = ndi.affine_transform(depth, np.full(3, 0.5), output_shape=mask.shape, order=1, mode="nearest")
    z_mm = affine[2, 2] * np.arange(mask.shape[2]) + affine[2, 3]
    x_mm = affine[0, 0] * np.arange(mask.shape[0]) + affine[0, 3]
    # Hemispheres only: above the cerebellum and brainstem, off the midline.
    hemisphere = (z_mm[None, None, :] > -22) & (np.abs(x_mm)[:, None, None] > 8)
    candidate = hemisphere & (depth >= 12) & (gm + wm > 0.5)
    centres = np.flatnonzero(candidate)
    index = np.argwhere(mask)
    lo, hi = index.min(0), index.max(0)
    box = np.stack([lo, hi]).astype(np.float64) @ affine[:3, :3].T + affine[:3, 3]
    return _Anatomy(
        name=name, affine=affine, t1=t1, gm=gm, wm=wm, mask=mask,
        band=band, band_dist=outside.ravel()[band],
        centres=centres, centre_depth=depth.ravel()[centres], centre_in_wm=wm.ravel()[centres] > 0.6,
        brain_box_mm=np.sort(box, axis=0),
        head=None if head is None else head.ravel()[band] / white,
    )


# --------------------------------------------------------------------------- random helpers


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Smooth (low-frequency) float32 noise of ``shape``, about unit std, features ~``scale`` voxels."""
    step = max(float(scale), 1.0)
    coarse = tuple(int(np.ceil(n / step)) + 3 for n in shape)
    grid = ndi.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), 0.8)
    grid /= max(float(grid.std()), 1e-6)
    return ndi.affine_transform(grid, np.full(3, 1.0 / step), offset=1.0, output_shape=shape,
                                order=1, mode="nearest")


def _random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(0.0, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


# --------------------------------------------------------------------------- tumour


@dataclass(frozen=True)
class _TumourPlan:
    centre: np.ndarray  # template voxel (3,) int
    whole_ml: float  # target whole-tumour volume
    core_radius: float  # mm
    rim_mm: float  # enhancing rim thickness, 0 = non-enhancing tumour
    rim_gap: float  # fraction of the rim missing
    mass_effect: float  # displacement at the core surface, as a fraction of the core radius


def _plan_tumour(rng: np.random.Generator, anat: _Anatomy) -> _TumourPlan:
    whole_ml = float(np.exp(rng.uniform(np.log(10.0), np.log(150.0))))
    core_fraction = rng.uniform(0.2, 0.55)
    radius = float((3 * core_fraction * whole_ml * 1000 / (4 * np.pi)) ** (1 / 3))
    in_wm = rng.random() < 0.85
    for need in (0.8 * radius + 4, 0.6 * radius + 2, 12.0):
        pick = (anat.centre_depth >= need) & (anat.centre_in_wm if in_wm else True)
        if pick.any():
            break
    chosen = np.flatnonzero(pick)[rng.integers(int(pick.sum()))]
    radius = min(radius, float(anat.centre_depth[chosen]) + 4)
    enhancing = rng.random() >= 0.1  # ~10 % non-enhancing tumours
    return _TumourPlan(
        centre=np.array(np.unravel_index(anat.centres[chosen], anat.mask.shape)),
        whole_ml=whole_ml,
        core_radius=radius,
        rim_mm=float(min(rng.uniform(2.5, 5.0), 0.45 * radius)) if enhancing else 0.0,
        rim_gap=float(rng.choice([0.0, rng.uniform(0.05, 0.35)])),  # half the rims are incomplete
        mass_effect=rng.uniform(0.1, 0.45),
    )


@dataclass(frozen=True)
class _Scene:
    """The case on the template grid, before acquisition."""

    anatomy: str  # the name of the _Anatomy whose grid this is
    gm: np.ndarray
    wm: np.ndarray
    t1: np.ndarray
    labels: np.ndarray  # uint8
    box: tuple[slice, slice, slice]  # where the tumour and the mass effect are
    soft: dict[str, np.ndarray]  # partial-volume weights of edema, necrosis, enhancing inside box
    edema_strength: np.ndarray  # 0..1 inside box: edema signal fades away from the core


def _box_half(plan: _TumourPlan) -> int:
    """Half-size (voxels = mm) of the cube holding the tumour, its edema and its mass effect."""
    whole_radius = (3 * plan.whole_ml * 1000 / (4 * np.pi)) ** (1 / 3)
    return int(np.ceil(min(75.0, max(2.6 * plan.core_radius, 1.9 * whole_radius + 8))))


def _box(plan: _TumourPlan, shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    half = _box_half(plan)
    return tuple(slice(max(0, c - half), min(n, c + half + 1)) for c, n in zip(plan.centre, shape))


def _mass_effect(anat: _Anatomy, plan: _TumourPlan, box, offsets) -> dict[str, np.ndarray]:
    """Warp gm, wm and t1 inside ``box`` radially away from the tumour centre.

    Backward mapping: the tissue shown at distance r came from r - d(r), with d growing linearly to
    its maximum at the core surface, then decaying as (R/r)^2 and tapering to 0 at the box's edge.
    d'(r) < 1 everywhere, so the warp folds nothing; the brain's outline is kept (tissue pushed
    against the skull is compressed, not pushed through it).
    """
    dx, dy, dz = offsets
    r = np.sqrt(dx * dx + dy * dy + dz * dz)
    big_r, peak = plan.core_radius, plan.mass_effect * plan.core_radius
    taper = np.clip(1 - (r / max(_box_half(plan), big_r + 1)) ** 2, 0, 1) ** 2
    disp = np.where(r < big_r, peak * r / big_r, peak * (big_r / np.maximum(r, 1e-3)) ** 2 * taper)
    moving = anat.mask[box] & (disp > 0.05)
    scale = (1 - disp[moving] / np.maximum(r[moving], 1e-3)).astype(np.float32)
    coords = np.stack([
        plan.centre[0] + dx[moving] * scale,
        plan.centre[1] + dy[moving] * scale,
        plan.centre[2] + dz[moving] * scale,
    ])
    out = {}
    for name in ("gm", "wm", "t1"):
        full = getattr(anat, name)
        local = full[box].copy()
        local[moving] = ndi.map_coordinates(full, coords, order=1, mode="nearest")
        out[name] = local
    return out


def _core_mask(rng, plan: _TumourPlan, offsets, brain: np.ndarray) -> np.ndarray:
    rotation = _random_rotation(rng, 180.0)
    axes = rng.uniform(0.75, 1.3, 3)
    axes /= np.prod(axes) ** (1 / 3)
    dx, dy, dz = offsets
    rho2 = np.zeros(dx.shape, np.float32)
    for row, a in zip(rotation.T, axes):
        rho2 += ((row[0] * dx + row[1] * dy + row[2] * dz) / a) ** 2
    lumpy = 1 + 0.22 * _smooth_noise(rng, dx.shape, max(3.0, 0.5 * plan.core_radius))
    core = (rho2 < (plan.core_radius * lumpy) ** 2) & brain
    return _largest_component(core)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _rim(rng, plan: _TumourPlan, core: np.ndarray) -> np.ndarray:
    if plan.rim_mm <= 0 or not core.any():
        return np.zeros_like(core)
    lo = np.maximum(np.argwhere(core).min(0) - 2, 0)
    hi = np.argwhere(core).max(0) + 3
    sub = tuple(slice(a, b) for a, b in zip(lo, hi))
    depth = ndi.distance_transform_edt(core[sub])
    wobble = 1 + 0.3 * _smooth_noise(rng, depth.shape, 4.0)
    rim = np.zeros_like(core)
    rim[sub] = core[sub] & (depth <= plan.rim_mm * wobble)
    if plan.rim_gap > 0:
        gaps = _smooth_noise(rng, core.shape, max(4.0, 0.5 * plan.core_radius))
        if rim.any():
            rim &= gaps > np.quantile(gaps[rim], plan.rim_gap)
    return rim


def _edema(rng, plan: _TumourPlan, core, gm, wm, brain) -> tuple[np.ndarray, np.ndarray]:
    """Edema grown from the core along a white-matter-weighted geodesic distance (2 mm grid).

    Crossing white matter is cheap, grey matter is ~25x dearer and CSF (ventricles, sulci) and the
    outside of the brain are impassable, so edema fingers along the white-matter tracts and spares the
    cortex, as vasogenic edema does. Returns the edema mask and a 0..1 strength (1 at the core).
    """
    from skimage.graph import MCP_Geometric

    csf = brain & (gm + wm < 0.45)
    passable = brain & ~csf
    cost = np.where(passable, 1.0 / (0.04 + wm), -1.0)[::2, ::2, ::2]
    core2 = core[::2, ::2, ::2]
    starts = np.argwhere(core2 & ~ndi.binary_erosion(core2))
    if len(starts) == 0:
        starts = np.argwhere(core2) if core2.any() else np.array([[s // 2 for s in core2.shape]])
    cost[core2] = 0.5
    dist2, _ = MCP_Geometric(cost, fully_connected=True).find_costs([tuple(p) for p in starts])
    dist2 = np.where(np.isfinite(dist2), dist2, 1e6).astype(np.float32)
    # Output voxel o sits at o / 2 on the 2 mm grid (which took every second voxel from 0).
    dist = ndi.affine_transform(dist2, np.full(3, 0.5), output_shape=core.shape, order=1, mode="nearest")
    score = dist * (1 + 0.3 * _smooth_noise(rng, core.shape, 6.0))
    candidates = passable & ~core & (dist < 1e5)
    want = int(plan.whole_ml * 1000 - core.sum())
    edema = np.zeros_like(core)
    if want > 0 and candidates.any():
        values = score[candidates]
        k = min(want, values.size) - 1
        threshold = np.partition(values, k)[k]
        edema = candidates & (score <= threshold)
        edema = _largest_component(edema | core) & ~core
    else:
        threshold = 1.0
    strength = np.clip(1 - 0.5 * score / max(float(threshold), 1e-3), 0.5, 1.0).astype(np.float32)
    return edema, strength


def _build_scene(rng: np.random.Generator, anat: _Anatomy, plan: _TumourPlan) -> _Scene:
    box = _box(plan, anat.mask.shape)
    grids = np.ogrid[tuple(box)]
    offsets = tuple((g - c).astype(np.float32) for g, c in zip(grids, plan.centre))
    offsets = np.broadcast_arrays(*offsets)
    warped = _mass_effect(anat, plan, box, offsets)
    brain = anat.mask[box]
    core = _core_mask(rng, plan, offsets, brain)
    rim = _rim(rng, plan, core)
    edema, strength = _edema(rng, plan, core, warped["gm"], warped["wm"], brain)
    local = np.zeros(brain.shape, np.uint8)
    local[edema] = EDEMA
    local[core] = CORE
    local[rim] = ENHANCING
    labels = np.zeros(anat.mask.shape, np.uint8)
    labels[box] = local
    gm, wm, t1 = anat.gm.copy(), anat.wm.copy(), anat.t1.copy()
    gm[box], wm[box], t1[box] = warped["gm"], warped["wm"], warped["t1"]
    soft = {name: ndi.gaussian_filter((local == value).astype(np.float32), 0.6)
            for name, value in (("edema", EDEMA), ("necrosis", CORE), ("enhancing", ENHANCING))}
    return _Scene(anatomy=anat.name, gm=gm, wm=wm, t1=t1, labels=labels, box=box, soft=soft, edema_strength=strength)


# --------------------------------------------------------------------------- contrast


@dataclass(frozen=True)
class _Look:
    means: dict[str, np.ndarray]  # tissue -> (4,) channel means
    skull: bool
    shell_mm: tuple[float, float, float]  # outer edge of CSF, bone, scalp from the brain surface
    vessels: bool  # enhancing normal structures painted (generator version 2)


def _draw_look(rng: np.random.Generator, version: int) -> _Look:
    vessels = version >= 2
    # Version 1 drew no vessel values: leaving them out keeps its random stream, so its cases.
    tissues = {k: v for k, v in _MEANS.items() if vessels or k != "vessel"}
    means = {k: np.asarray(v, np.float64) * rng.uniform(0.9, 1.1, 4) for k, v in tissues.items()}
    means["necrosis"][0] = rng.uniform(0.35, 1.1)
    if vessels:
        means["vessel"][[0, 3]] = rng.uniform(0.15, 0.9), rng.uniform(0.2, 1.0)
        means["vessel"][2] = rng.uniform(1.2, 2.0)
    csf_layer = rng.uniform(1.0, 2.5)
    bone = csf_layer + rng.uniform(4.0, 7.0)
    return _Look(means=means, skull=bool(rng.random() < 0.5), shell_mm=(csf_layer, bone, bone + rng.uniform(4.0, 8.0)),
                 vessels=vessels)


@functools.lru_cache(maxsize=None)
def _vessel_paths(name: str = "mni152") -> dict[str, np.ndarray]:
    """Template-voxel centrelines of the superior sagittal and transverse sinuses, and candidate
    voxels of the choroid plexus (atria of the lateral ventricles), from anatomy ``name``'s own mask."""
    anat = _anatomy(name)
    aff = anat.affine
    mm = [aff[a, a] * np.arange(n) + aff[a, 3] for a, n in enumerate(anat.mask.shape)]
    midline = int(np.argmin(np.abs(mm[0])))
    # Superior sagittal sinus: the upper and posterior outline of the midline sagittal slice.
    sagittal = ndi.binary_fill_holes(anat.mask[midline - 3:midline + 4].any(0))
    outline = np.argwhere(sagittal & ~ndi.binary_erosion(sagittal))
    y, z = mm[1][outline[:, 0]], mm[2][outline[:, 1]]
    keep = (z > 10) | ((y < -60) & (z > -8))
    sss = np.column_stack([np.full(keep.sum(), midline), outline[keep]])
    # Transverse sinuses: from the most posterior midline point at the torcular level, laterally
    # along the back of the brain, descending slightly.
    z0 = float(mm[2][sss[np.argmin(sss[:, 1]), 2]])
    transverse = []
    for i in np.flatnonzero((np.abs(mm[0]) > 2) & (np.abs(mm[0]) < 55)):
        k = int(np.argmin(np.abs(mm[2] - (z0 - 0.25 * abs(mm[0][i])))))
        column = np.flatnonzero(anat.mask[i, :, k])
        if column.size:
            transverse.append((i, column[0], k))
    csf = anat.mask & (anat.gm + anat.wm < 0.35)
    depth = ndi.distance_transform_edt(anat.mask)
    grid = np.meshgrid(*mm, indexing="ij", sparse=True)
    atria = (csf & (depth > 15) & (grid[1] > -50) & (grid[1] < -15) & (np.abs(grid[0]) > 10)
             & (np.abs(grid[0]) < 40) & (grid[2] > 0) & (grid[2] < 30))
    return {"sss": sss, "transverse": np.asarray(transverse, np.int64).reshape(-1, 3),
            "choroid": np.argwhere(atria)}


def _vessels(rng: np.random.Generator, anat: _Anatomy) -> np.ndarray:
    """Partial-volume weights (0..1, template grid) of the enhancing normal structures of one case."""
    paths = _vessel_paths(anat.name)
    inward = np.array([0.0, 1.0, -1.0])  # a sinus lies partly inside the brain's outline: forward, down
    tubes = [(paths["sss"] + rng.uniform(0.5, 3.5) * inward, rng.uniform(2.0, 4.5))]
    if rng.random() < 0.7:
        tubes.append((paths["transverse"] + rng.uniform(0.5, 3.0) * np.array([0.0, 1.0, 0.0]), rng.uniform(2.0, 4.0)))
    if rng.random() < 0.8 and len(paths["choroid"]):
        for _ in range(int(rng.integers(1, 4))):
            tubes.append((paths["choroid"][rng.integers(len(paths["choroid"]))][None].astype(float), rng.uniform(2.5, 5.0)))
    weight = np.zeros(anat.mask.shape, np.float32)
    for points, radius in tubes:
        if not len(points):
            continue
        lo = np.maximum(np.floor(points.min(0) - radius - 2).astype(int), 0)
        hi = np.minimum(np.ceil(points.max(0) + radius + 3).astype(int), anat.mask.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        centre = np.ones(tuple(hi - lo), bool)
        index = np.clip(np.round(points).astype(int) - lo, 0, hi - lo - 1)
        centre[tuple(index.T)] = False
        soft = np.clip(radius + 0.5 - ndi.distance_transform_edt(centre), 0, 1).astype(np.float32)
        weight[box] = np.maximum(weight[box], soft)
    return weight


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def _render(rng: np.random.Generator, anat: _Anatomy, scene: _Scene, look: _Look) -> list[np.ndarray]:
    """Four float32 contrasts on the template grid (outside the brain only for skull cases: the
    anatomy's real head where it has one, else a drawn shell of CSF, bone, marrow and scalp)."""
    csf = np.clip(anat.mask - scene.gm - scene.wm, 0, 1)
    if look.skull:
        d = anat.band_dist
        a1, a2, a3 = look.shell_mm
        beyond_csf, beyond_bone, head = _sigmoid((d - a1) / 0.6), _sigmoid((d - a2) / 0.6), _sigmoid((a3 - d) / 0.6)
        diploe = _sigmoid((d - a1 - 1.5) / 0.6) * _sigmoid((a2 - 1.5 - d) / 0.6)
        if anat.head is not None:
            # The real head is a T1 only. Other contrasts: T1-dark is CSF next to the brain and bone or
            # air beyond it, T1-bright is fat (scalp, marrow), in between a mix (muscle, partial volume).
            fat = np.clip((anat.head - 0.25) / 0.75, 0, 1)
    box = scene.box
    het = {k: 1 + 0.08 * _smooth_noise(rng, scene.labels[box].shape, 5.0) for k in ("edema", "necrosis", "enhancing")}
    vessels = _vessels(rng, anat) if look.vessels else None
    channels = []
    for c in range(4):
        m = {k: np.float32(v[c]) for k, v in look.means.items()}
        ch = m["wm"] * scene.wm + m["gm"] * scene.gm + m["csf"] * csf
        if CHANNELS[c] in ("t1", "t1gd"):  # the real template's T1 contrast adds anatomical detail
            ch = 0.5 * ch + (0.5 * m["wm"]) * scene.t1
        if look.skull and anat.head is not None:
            if CHANNELS[c] in ("t1", "t1gd"):
                shell = m["wm"] * anat.head
            else:
                dark = (1 - beyond_csf) * m["csf"] + beyond_csf * m["bone"]
                shell = (1 - fat) * dark + fat * m["scalp"]
            ch.ravel()[anat.band] = shell
        elif look.skull:
            shell = ((1 - beyond_csf) * m["csf"] + (beyond_csf - beyond_bone) * m["bone"]
                     + diploe * (m["marrow"] - m["bone"]) + beyond_bone * head * m["scalp"])
            ch.ravel()[anat.band] = shell
        if vessels is not None:
            ch += vessels * (m["vessel"] - ch)
        channels.append(_paint_tumour(ch, scene, m, het))
    return channels


def _paint_tumour(ch: np.ndarray, scene: _Scene, m: dict[str, np.float32], het) -> np.ndarray:
    base = ch[scene.box]
    w_e, w_n, w_r = scene.soft["edema"], scene.soft["necrosis"], scene.soft["enhancing"]
    total = np.maximum(w_e + w_n + w_r, 1.0)
    w_e, w_n, w_r = w_e / total, w_n / total, w_r / total
    alpha = 0.8 * scene.edema_strength  # edema infiltrates tissue: part of the normal signal remains
    edema = (1 - alpha) * base + alpha * m["edema"] * het["edema"]
    ch[scene.box] = ((1 - w_e - w_n - w_r) * base + w_e * edema
                     + w_n * m["necrosis"] * het["necrosis"] + w_r * m["enhancing"] * het["enhancing"])
    return ch


# --------------------------------------------------------------------------- acquisition


@dataclass(frozen=True)
class _Geometry:
    head_pose: np.ndarray  # 4x4, MNI mm -> world mm
    affine: np.ndarray  # 4x4, output voxel -> world mm
    shape: tuple[int, int, int]


def _draw_geometry(rng: np.random.Generator, anat: _Anatomy, look: _Look) -> _Geometry:
    pose = np.eye(4)
    if rng.random() < 0.6:
        pose[:3, :3] = _random_rotation(rng, 8.0)
    pose[:3, 3] = rng.uniform(-15, 15, 3)

    slice_axis = int(rng.choice([2, 0, 1], p=[0.6, 0.2, 0.2]))  # axial, sagittal, coronal
    order = [a for a in range(3) if a != slice_axis] + [slice_axis]
    if rng.random() < 0.2:
        order = list(rng.permutation(3))
    direction = np.zeros((3, 3))
    for voxel_axis, world_axis in enumerate(order):
        direction[world_axis, voxel_axis] = rng.choice([-1.0, 1.0])
    head_tilted = not np.allclose(pose[:3, :3], np.eye(3))
    if rng.random() < 0.35:  # oblique slices, often aligned to the (tilted) head as technologists do
        aligned = head_tilted and rng.random() < 0.5
        direction = (pose[:3, :3] if aligned else _random_rotation(rng, 10.0)) @ direction

    mode = rng.choice(3, p=[0.3, 0.4, 0.3])
    in_plane = 1.0 if mode == 0 else rng.uniform(0.9, 1.3 if mode == 1 else 1.5)
    through = 1.0 if mode == 0 else rng.uniform(1.0, 1.5) if mode == 1 else rng.uniform(2.0, 3.0)
    spacing = np.where(np.array(order) == slice_axis, through, in_plane)

    lo, hi = anat.brain_box_mm
    margin = look.shell_mm[2] if look.skull else 0.0
    corners = np.array([[x, y, z] for x in (lo[0] - margin, hi[0] + margin)
                        for y in (lo[1] - margin, hi[1] + margin) for z in (lo[2] - margin, hi[2] + margin)])
    world = corners @ pose[:3, :3].T + pose[:3, 3]
    along = world @ direction  # coordinates along the output axes
    need_lo, need_hi = along.min(0), along.max(0)
    need = need_hi - need_lo
    factor = rng.uniform(0.92, 1.2, 3) if look.skull else rng.uniform(1.0, 1.35, 3)
    shape = np.clip(np.ceil(need * factor / spacing).astype(int), 16, _MAX_DIM)
    extent = shape * spacing
    slack = extent - need
    start = need_lo - rng.uniform(0, 1, 3) * slack  # slack < 0 crops a random side
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = direction @ start
    return _Geometry(head_pose=pose, affine=affine, shape=tuple(int(n) for n in shape))


def _acquire(rng: np.random.Generator, anat: _Anatomy, scene: _Scene, look: _Look,
             channels: list[np.ndarray], geom: _Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Blur, resample onto the output grid, add bias field and Rician noise, scale."""
    to_template = np.linalg.inv(anat.affine) @ np.linalg.inv(geom.head_pose) @ geom.affine
    matrix, offset = to_template[:3, :3], to_template[:3, 3]
    footprint = np.abs(matrix).max(axis=1)  # template voxels per output voxel, per template axis
    # A slight blur, plus the slice profile (FWHM ~ voxel size) where output voxels exceed 1 mm.
    base_blur = rng.uniform(0.3, 0.7)
    sigma = np.sqrt(base_blur**2 + 0.42**2 * np.maximum(footprint**2 - 1, 0))
    labels = ndi.affine_transform(scene.labels, matrix, offset, output_shape=geom.shape, order=0)
    image = np.empty((4, *geom.shape), np.float32)
    for c, (ch, bias) in enumerate(zip(channels, _bias_profiles(rng, geom.shape))):
        ch = ndi.gaussian_filter(ch, sigma)
        if not look.skull:
            ch *= anat.mask
        clean = ndi.affine_transform(ch, matrix, offset, output_shape=geom.shape, order=1)
        del ch
        image[c] = _rician(rng, clean, bias, 0.5 * (look.means["wm"][c] + look.means["gm"][c]))
        if not look.skull:  # clean only got positive factors: its zeros are still the outside
            image[c][clean <= 0] = 0
        image[c] *= np.float32(np.exp(rng.uniform(np.log(50.0), np.log(5000.0))))
    return image, labels


def _bias_profiles(rng: np.random.Generator, shape: tuple[int, int, int]) -> list[list[np.ndarray]]:
    """Four smooth multiplicative bias fields (shared coil part + per sequence part).

    Each is separable along the voxel axes: three 1D float32 profiles whose outer product is the field,
    which costs one multiplication per voxel and axis instead of a full 3D field per channel.
    """

    def log_profiles(amplitude: float) -> list[np.ndarray]:
        out = []
        for n in shape:
            x = np.linspace(-1, 1, n)
            a = rng.normal(0, amplitude, 3)
            out.append(a[0] * x + a[1] * (x * x - 1 / 3) + a[2] * np.cos(np.pi * x + rng.uniform(0, 2 * np.pi)))
        return out

    shared = log_profiles(rng.uniform(0.04, 0.12))
    return [[np.exp(s + o).astype(np.float32) for s, o in zip(shared, log_profiles(0.04))] for _ in range(4)]


def _rician(rng: np.random.Generator, clean: np.ndarray, bias: list[np.ndarray], level: float) -> np.ndarray:
    """|clean * bias + complex Gaussian noise|, noise sd 1-4 % of ``level``; reuses ``clean``'s memory."""
    clean *= bias[0][:, None, None]
    clean *= bias[1][None, :, None]
    clean *= bias[2][None, None, :]
    sd = np.float32(rng.uniform(0.01, 0.04) * level)
    real = rng.standard_normal(clean.shape, dtype=np.float32)
    real *= sd
    real += clean
    real *= real
    imag = rng.standard_normal(clean.shape, dtype=np.float32)
    imag *= sd
    imag *= imag
    real += imag
    return np.sqrt(real, out=real)


# --------------------------------------------------------------------------- public API


def _synthesise(seed: int, version: int = GENERATOR_VERSION) -> tuple[SynthCase, _Scene, _Geometry]:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"synthetic case seed must be a non-negative integer, got {seed!r}")
    _check_version(version)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed)))
    anat = _anatomy(_draw_anatomy(rng, version))
    plan = _plan_tumour(rng, anat)
    scene = _build_scene(rng, anat, plan)
    look = _draw_look(rng, version)
    channels = _render(rng, anat, scene, look)
    geom = _draw_geometry(rng, anat, look)
    image, labels = _acquire(rng, anat, scene, look, channels, geom)
    return SynthCase(image=image, labels=labels, affine=geom.affine.copy()), scene, geom


def _draw_anatomy(rng: np.random.Generator, version: int) -> str:
    """The case's healthy head: the first draw of its random stream from version 3 on (versions 1 and 2
    draw nothing, which keeps their stream, so their cases)."""
    return ANATOMIES[int(rng.integers(len(ANATOMIES)))] if version >= 3 else ANATOMIES[0]


def _case_anatomy(seed: int, version: int) -> str:
    return _draw_anatomy(np.random.default_rng(np.random.SeedSequence(int(seed))), version)


def synth_case(seed: int, version: int = GENERATOR_VERSION) -> SynthCase:
    """Generate one synthetic glioma case; the same ``seed`` (>= 0) and generator ``version`` give
    byte-identical arrays.

    Returns a :class:`SynthCase`: image float32 (4, I, J, K) in :data:`CHANNELS` order, labels uint8
    (I, J, K) in the MSD scheme, affine voxel -> RAS+ mm. Each dimension is at most 256 voxels.
    Raises ModuleNotFoundError when nilearn (which ships the MNI152 template) is not installed, and
    ConfigError for version 3 without Colin27 (Debian's mricron-data) or with other Colin27 voxels.
    """
    return _synthesise(seed, version)[0]


def _check_version(version: int) -> None:
    if version not in GENERATOR_VERSIONS:
        raise ConfigError(f"synthetic generator version must be one of {list(GENERATOR_VERSIONS)}, got {version!r}")


def _case_seeds(seed: int, cases: int) -> list[int]:
    return [int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint32)[0]) for i in range(cases)]


def _provenance(version: int) -> list[dict[str, object]]:
    try:
        nilearn_version = importlib.metadata.version("nilearn")
    except importlib.metadata.PackageNotFoundError:
        nilearn_version = "unknown"
    colin = [{
        "name": "Colin27 single-subject T1 (27 averaged scans of one head), with skull and skull-stripped",
        "files": [name for name, _ in _COLIN_FILES.values()],
        "voxels_sha256": {name: digest for name, digest in _COLIN_FILES.values()},
        "source": f"Debian package mricron-data 1.2.20211006 ({_COLIN_FOLDER}), originally "
                  "https://www.bic.mni.mcgill.ca/ServicesAtlases/Colin27",
        "licence": "MRIcron templates: BSD-3-clause, Copyright 2006-2010 Chris Rorden (Debian copyright "
                   "file); Colin27: " + _MNI_LICENCE,
        "references": ["Holmes et al., J Comput Assist Tomogr 22(2), 1998, doi:10.1097/00004728-199803000-00032"],
    }] if version >= 3 else []
    return [{
        "name": "MNI ICBM152 2009a nonlinear symmetric template (T1, GM and WM probability maps)",
        "files": sorted(_TEMPLATE_FILES.values()),
        "source": f"copy bundled in the nilearn {nilearn_version} wheel (nilearn/datasets/data), "
                  "originally https://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009",
        "licence": _MNI_LICENCE,
        "references": ["Fonov et al., NeuroImage 54(1), 2011, doi:10.1016/j.neuroimage.2010.07.033",
                       "Fonov et al., NeuroImage 47 S1, 2009, doi:10.1016/S1053-8119(09)70884-5"],
    }] + colin


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.set_data_dtype(array.dtype)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))


#: Seed and generator version of a folder's cases, written before the first case: an interrupted
#: run has no dataset.json (written last), and its rerun must still not mix seeds or versions.
STARTED_MARKER = ".tumorseg_synth.json"


def _check_previous_seed(output: Path, seed: int, generator_version: int) -> None:
    """Refuse to mix cases of two seeds or generator versions in one folder (existing cases are
    kept, not regenerated): the folder's dataset.json, or the marker an interrupted run left,
    must record the same; case files with neither are of unknown origin."""
    previous = next((p for p in (output / "dataset.json", output / STARTED_MARKER) if p.is_file()), None)
    if previous is None:
        strays = [p for folder in ("imagesTr", "labelsTr") for p in sorted((output / folder).glob("*.nii*"))]
        if strays:
            raise ConfigError("holds image files but no dataset.json saying which seed and generator version made "
                              "them; choose an empty output folder", path=strays[0])
        return
    try:
        recorded = json.loads(previous.read_text())["tumorseg_synth"]
        old, version = recorded["seed"], recorded.get("generator_version", 1)
    except (ValueError, KeyError, TypeError):
        raise ConfigError("exists but is not a tumorseg synthetic dataset; choose an empty output folder",
                          path=previous) from None
    if old != seed:
        raise ConfigError(f"holds a synthetic dataset made with seed {old}, not {seed}; rerun with seed {old} "
                          "to resume or extend it, or choose another output folder", path=previous)
    if version != generator_version:
        raise ConfigError(f"holds synthetic cases of generator version {version}, not {generator_version}, "
                          f"whose cases differ: rerun with --generator-version {version} to resume or extend it, "
                          "or choose another output folder", path=previous)


def _write_case(job: tuple[Path, Path, int, int]) -> tuple[str, tuple[int, ...], float]:
    image_path, label_path, case_seed, version = job
    started = time.perf_counter()
    case = synth_case(case_seed, version)
    _save_nifti(image_path, np.moveaxis(case.image, 0, -1), case.affine)
    _save_nifti(label_path, case.labels, case.affine)
    return image_path.name, case.labels.shape, time.perf_counter() - started


def _ignore_interrupt() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle


@contextlib.contextmanager
def _pool(workers: int):
    """``map`` in order, in this process (``workers`` 0) or in that many processes; an error or
    Ctrl-C cancels the cases not started (files are written atomically, so a rerun resumes)."""
    if workers == 0:
        yield builtins
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_interrupt)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def write_synth_dataset(output: Path, cases: int, seed: int, version: int = GENERATOR_VERSION,
                        workers: int = 0) -> Path:
    """Write ``cases`` synthetic cases as a Decathlon (Task01) dataset under ``output``; return ``output``.

    Layout: ``dataset.json``, ``imagesTr/synth_NNNN.nii.gz`` (float32 4D, last axis the 4 channels)
    and ``labelsTr/synth_NNNN.nii.gz`` (uint8), qform and sform code 1. Case ``i`` is
    ``synth_case(s_i)`` with ``s_i`` drawn from ``SeedSequence([seed, i])`` (recorded in dataset.json).
    Files are written atomically; a case whose two files both exist is skipped, so an interrupted run
    can be resumed (or a dataset extended with more cases). ``workers`` processes make the cases in
    parallel (each case depends on its seed alone, so the files are the same). Raises ConfigError for cases < 1, seed < 0,
    an unknown generator ``version``, or an ``output`` whose dataset.json (or, after an interrupted run,
    :data:`STARTED_MARKER`) records another seed or version, or that holds case files with neither.
    """
    if isinstance(cases, bool) or not isinstance(cases, (int, np.integer)) or cases < 1:
        raise ConfigError(f"number of synthetic cases must be a positive integer, got {cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"synthetic dataset seed must be a non-negative integer, got {seed!r}")
    _check_version(version)
    output = Path(output)
    _template_paths()  # fail before creating anything when nilearn (or Colin27) is missing
    if version >= 3:
        _colin_paths()
    _check_previous_seed(output, int(seed), version)
    output.mkdir(parents=True, exist_ok=True)
    marker = {"tumorseg_synth": {"seed": int(seed), "generator_version": version}}
    write_bytes_atomic(output / STARTED_MARKER, (json.dumps(marker) + "\n").encode())
    seeds = _case_seeds(int(seed), int(cases))
    names = [f"synth_{i:04d}.nii.gz" for i in range(len(seeds))]
    training = [{"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"} for name in names]
    jobs = [(output / "imagesTr" / name, output / "labelsTr" / name, case_seed, version)
            for name, case_seed in zip(names, seeds)]
    todo = [job for job in jobs if not (job[0].is_file() and job[1].is_file())]
    log.debug("%d of %d synthetic cases exist, skipped", cases - len(todo), cases)
    with _pool(workers) as pool:
        for done, (name, shape, seconds) in enumerate(pool.map(_write_case, todo), start=cases - len(todo) + 1):
            log.info("%s written (%d of %d), shape %s (%.1f s)", name, done, cases, shape, seconds)
    description = {
        "name": "tumorseg-synth",
        "description": "Synthetic gliomas (edema, non-enhancing/necrotic core, enhancing tumour) on "
                       + ("the MNI152 2009a healthy template" if version < 3 else
                          "two healthy heads (the MNI152 2009a template, Colin27)")
                       + ", generated by tumorseg.synth",
        "reference": "tumorseg.synth",
        "licence": "synthetic data derived from the healthy anatomy in tumorseg_synth.templates, "
                   "under their licences",
        "release": "1.0",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": int(cases),
        "numTest": 0,
        "training": training,
        "test": [],
        "tumorseg_synth": {"seed": int(seed), "generator_version": version, "cases": int(cases),
                           "case_seeds": seeds,
                           "case_anatomies": [_case_anatomy(s, version) for s in seeds],
                           "templates": _provenance(version)},
    }
    write_bytes_atomic(output / "dataset.json", (json.dumps(description, indent=2) + "\n").encode())
    return output
