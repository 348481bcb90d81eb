"""The healthy heads synthetic cases start from: the MNI152 2009a template (inside the nilearn wheel)
and Colin27 with and without skull (Debian's mricron-data), on their 1 mm grids, loaded once per
process, with the maps every case needs (tissue fractions, the band outside the brain, tumour
centres) and the centrelines of the structures that enhance on T1gd."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..errors import ConfigError
from .shapes import largest_component

#: Healthy anatomies: versions 1 and 2 use the first only, version 3 draws one per case.
ANATOMIES = ("mni152", "colin27")

TEMPLATE_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
COLIN_FOLDER = Path("/usr/share/mricron/templates")
#: Colin27 with skull and skull-stripped, and the sha256 of their voxels (uint8) as Debian's
#: mricron-data 1.2.20211006 ships them: other voxels would make other cases from the same seed.
COLIN_FILES = {
    "head": ("ch2.nii.gz", "f5a6ac5d280552d299bc4fb0e6724485f25bad45f69117e87fa5880ebdcce7af"),
    "brain": ("ch2bet.nii.gz", "1848bfb33c39fdd1c23b7eefefa2aa77442e2c6e620b080b1e0663bf57a04a25"),
}
MNI_LICENCE = (
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
    "Institute, McGill University. Permission to use, copy, modify, and distribute this software and "
    "its documentation for any purpose and without fee is hereby granted, provided that the above "
    "copyright notice appear in all copies. The authors and McGill University make no representations "
    "about the suitability of this software for any purpose. It is provided 'as is' without express or "
    "implied warranty."
)

# Relative tissue intensities per channel (flair, t1, t1gd, t2); white matter on T1 = 1.


@dataclass(frozen=True)
class Anatomy:
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


def template_paths() -> dict[str, Path]:
    """Paths of the MNI152 2009a files inside the installed nilearn, found without importing it."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "tumorseg.synth needs the MNI152 template shipped inside the 'nilearn' package, which is not "
            "installed: pip install nilearn",
            name="nilearn",
        )
    folder = Path(os.path.dirname(spec.origin)) / "datasets" / "data"
    paths = {k: folder / name for k, name in TEMPLATE_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the installed nilearn lacks the MNI152 2009 template files {missing}; install a nilearn "
            "release that bundles them (0.10 or later): pip install -U nilearn"
        )
    return paths


def colin_paths() -> dict[str, Path]:
    """Paths of Colin27 with and without skull, from Debian's mricron-data package."""
    paths = {k: COLIN_FOLDER / name for k, (name, _) in COLIN_FILES.items()}
    missing = [p for p in paths.values() if not p.is_file()]
    if missing:
        raise ConfigError(
            "is missing, and synthetic generator version 3 draws half its cases on this Colin27 head: "
            "install Debian's mricron-data package (apt-get install mricron-data), or make MNI152-only "
            "cases with --generator-version 2", path=missing[0])
    return paths


@functools.lru_cache(maxsize=None)
def load_anatomy(name: str = "mni152") -> Anatomy:
    """The healthy anatomy ``name`` (one of :data:`ANATOMIES`), loaded once per process."""
    if name == "colin27":
        return _colin27()
    if name != "mni152":
        raise ValueError(f"unknown anatomy {name!r}; known: {list(ANATOMIES)}")
    import nibabel as nib

    paths = template_paths()
    t1_img = nib.load(str(paths["t1"]))
    raw_t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(str(paths["gm"])).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(str(paths["wm"])).dataobj, dtype=np.float32) / 255.0
    # The template is skull-stripped: its scans with skull get a drawn shell (render).
    return _finish_anatomy("mni152", paths["t1"], t1_img.affine, raw_t1, gm, wm, raw_t1 > 0, None)


def _colin27() -> Anatomy:
    import nibabel as nib

    paths = colin_paths()
    images = {k: nib.load(str(p)) for k, p in paths.items()}
    voxels = {k: np.asarray(im.dataobj) for k, im in images.items()}
    for key, (name, digest) in COLIN_FILES.items():
        if hashlib.sha256(np.ascontiguousarray(voxels[key]).tobytes()).hexdigest() != digest:
            raise ConfigError(f"its voxels differ from the Colin27 {name} this generator was written for "
                              "(Debian mricron-data 1.2.20211006), so seeds would not give the documented "
                              "cases; make cases with --generator-version 2 instead", path=paths[key])
    if not np.allclose(images["head"].affine, images["brain"].affine) or voxels["head"].shape != voxels["brain"].shape:
        raise ConfigError(f"is not on the grid of {paths['brain']}", path=paths["head"])
    brain = voxels["brain"].astype(np.float32)
    mask = ndi.binary_fill_holes(largest_component(brain > 0))  # BET left a few specks outside
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
                    mask: np.ndarray, head: np.ndarray | None) -> Anatomy:
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
    return Anatomy(
        name=name, affine=affine, t1=t1, gm=gm, wm=wm, mask=mask,
        band=band, band_dist=outside.ravel()[band],
        centres=centres, centre_depth=depth.ravel()[centres], centre_in_wm=wm.ravel()[centres] > 0.6,
        brain_box_mm=np.sort(box, axis=0),
        head=None if head is None else head.ravel()[band] / white,
    )


# --------------------------------------------------------------------------- random helpers



@functools.lru_cache(maxsize=None)
def vessel_paths(name: str = "mni152") -> dict[str, np.ndarray]:
    """Template-voxel centrelines of the superior sagittal and transverse sinuses, and candidate
    voxels of the choroid plexus (atria of the lateral ventricles), from anatomy ``name``'s own mask."""
    anat = load_anatomy(name)
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
