"""The tumour on the template grid: where it grows, its three compartments (necrotic core, enhancing
rim, white-matter-following edema) and the mass effect that pushes the tissue away from it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .anatomy import Anatomy
from .shapes import largest_component, random_rotation, smooth_noise

#: Label scheme (Medical Segmentation Decathlon Task01).
LABELS = {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}
EDEMA, CORE, ENHANCING = 1, 2, 3


@dataclass(frozen=True)
class TumourPlan:
    """The random choices that fix one tumour, before it is drawn."""

    centre: np.ndarray  # template voxel (3,) int
    whole_ml: float  # target whole-tumour volume
    core_radius: float  # mm
    rim_mm: float  # enhancing rim thickness, 0 = non-enhancing tumour
    rim_gap: float  # fraction of the rim missing
    mass_effect: float  # displacement at the core surface, as a fraction of the core radius


def plan_tumour(rng: np.random.Generator, anat: Anatomy) -> TumourPlan:
    """Where the tumour grows (a white-matter centre deep enough for its core, most of the time)
    and how large, with its rim and mass effect."""
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
    return TumourPlan(
        centre=np.array(np.unravel_index(anat.centres[chosen], anat.mask.shape)),
        whole_ml=whole_ml,
        core_radius=radius,
        rim_mm=float(min(rng.uniform(2.5, 5.0), 0.45 * radius)) if enhancing else 0.0,
        rim_gap=float(rng.choice([0.0, rng.uniform(0.05, 0.35)])),  # half the rims are incomplete
        mass_effect=rng.uniform(0.1, 0.45),
    )


@dataclass(frozen=True)
class Scene:
    """The case on the template grid, before acquisition."""

    anatomy: str  # the name of the Anatomy whose grid this is
    gm: np.ndarray
    wm: np.ndarray
    t1: np.ndarray
    labels: np.ndarray  # uint8
    box: tuple[slice, slice, slice]  # where the tumour and the mass effect are
    soft: dict[str, np.ndarray]  # partial-volume weights of edema, necrosis, enhancing inside box
    edema_strength: np.ndarray  # 0..1 inside box: edema signal fades away from the core


def _box_half(plan: TumourPlan) -> int:
    """Half-size (voxels = mm) of the cube holding the tumour, its edema and its mass effect."""
    whole_radius = (3 * plan.whole_ml * 1000 / (4 * np.pi)) ** (1 / 3)
    return int(np.ceil(min(75.0, max(2.6 * plan.core_radius, 1.9 * whole_radius + 8))))


def _box(plan: TumourPlan, shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    half = _box_half(plan)
    return tuple(slice(max(0, c - half), min(n, c + half + 1)) for c, n in zip(plan.centre, shape))


def _mass_effect(anat: Anatomy, plan: TumourPlan, box, offsets) -> dict[str, np.ndarray]:
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


def _core_mask(rng, plan: TumourPlan, offsets, brain: np.ndarray) -> np.ndarray:
    rotation = random_rotation(rng, 180.0)
    axes = rng.uniform(0.75, 1.3, 3)
    axes /= np.prod(axes) ** (1 / 3)
    dx, dy, dz = offsets
    rho2 = np.zeros(dx.shape, np.float32)
    for row, a in zip(rotation.T, axes):
        rho2 += ((row[0] * dx + row[1] * dy + row[2] * dz) / a) ** 2
    lumpy = 1 + 0.22 * smooth_noise(rng, dx.shape, max(3.0, 0.5 * plan.core_radius))
    core = (rho2 < (plan.core_radius * lumpy) ** 2) & brain
    return largest_component(core)



def _rim(rng, plan: TumourPlan, core: np.ndarray) -> np.ndarray:
    if plan.rim_mm <= 0 or not core.any():
        return np.zeros_like(core)
    lo = np.maximum(np.argwhere(core).min(0) - 2, 0)
    hi = np.argwhere(core).max(0) + 3
    sub = tuple(slice(a, b) for a, b in zip(lo, hi))
    depth = ndi.distance_transform_edt(core[sub])
    wobble = 1 + 0.3 * smooth_noise(rng, depth.shape, 4.0)
    rim = np.zeros_like(core)
    rim[sub] = core[sub] & (depth <= plan.rim_mm * wobble)
    if plan.rim_gap > 0:
        gaps = smooth_noise(rng, core.shape, max(4.0, 0.5 * plan.core_radius))
        if rim.any():
            rim &= gaps > np.quantile(gaps[rim], plan.rim_gap)
    return rim


def _edema(rng, plan: TumourPlan, core, gm, wm, brain) -> tuple[np.ndarray, np.ndarray]:
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
    score = dist * (1 + 0.3 * smooth_noise(rng, core.shape, 6.0))
    candidates = passable & ~core & (dist < 1e5)
    want = int(plan.whole_ml * 1000 - core.sum())
    edema = np.zeros_like(core)
    if want > 0 and candidates.any():
        values = score[candidates]
        k = min(want, values.size) - 1
        threshold = np.partition(values, k)[k]
        edema = candidates & (score <= threshold)
        edema = largest_component(edema | core) & ~core
    else:
        threshold = 1.0
    strength = np.clip(1 - 0.5 * score / max(float(threshold), 1e-3), 0.5, 1.0).astype(np.float32)
    return edema, strength


def build_scene(rng: np.random.Generator, anat: Anatomy, plan: TumourPlan) -> Scene:
    """The planned tumour painted into the anatomy: tissue pushed aside, core, rim and edema labelled,
    with the partial-volume weights the renderer needs."""
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
    return Scene(anatomy=anat.name, gm=gm, wm=wm, t1=t1, labels=labels, box=box, soft=soft, edema_strength=strength)
