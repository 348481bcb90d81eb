"""The four MR contrasts (FLAIR, T1w, T1gd, T2w) of a scene on the template grid: tissue means drawn
per case, an optional head around the brain, enhancing normal structures and the painted tumour."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .anatomy import Anatomy, vessel_paths
from .shapes import smooth_noise
from .tumour import Scene

#: Channel order of the image (Medical Segmentation Decathlon Task01).
CHANNELS = ("flair", "t1", "t1gd", "t2")

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


@dataclass(frozen=True)
class Look:
    means: dict[str, np.ndarray]  # tissue -> (4,) channel means
    skull: bool
    shell_mm: tuple[float, float, float]  # outer edge of CSF, bone, scalp from the brain surface
    vessels: bool  # enhancing normal structures painted (generator version 2)


def draw_look(rng: np.random.Generator, version: int) -> Look:
    """The case's tissue means per contrast, whether it keeps a skull, and its shell thicknesses."""
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
    return Look(means=means, skull=bool(rng.random() < 0.5), shell_mm=(csf_layer, bone, bone + rng.uniform(4.0, 8.0)),
                 vessels=vessels)




def vessel_weights(rng: np.random.Generator, anat: Anatomy) -> np.ndarray:
    """Partial-volume weights (0..1, template grid) of the enhancing normal structures of one case."""
    paths = vessel_paths(anat.name)
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


def render(rng: np.random.Generator, anat: Anatomy, scene: Scene, look: Look) -> list[np.ndarray]:
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
    het = {k: 1 + 0.08 * smooth_noise(rng, scene.labels[box].shape, 5.0) for k in ("edema", "necrosis", "enhancing")}
    vessels = vessel_weights(rng, anat) if look.vessels else None
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


def _paint_tumour(ch: np.ndarray, scene: Scene, m: dict[str, np.float32], het) -> np.ndarray:
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
