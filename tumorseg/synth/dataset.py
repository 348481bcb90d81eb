"""One case from its seed, and a Decathlon (Task01) data set of them written atomically and resumably."""
from __future__ import annotations

import builtins
import contextlib
import importlib.metadata
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, write_bytes_atomic
from ..errors import ConfigError
from .acquire import Geometry, acquire, draw_geometry
from .anatomy import (ANATOMIES, COLIN_FILES, COLIN_FOLDER, MNI_LICENCE, TEMPLATE_FILES, colin_paths, load_anatomy,
                      template_paths)
from .render import draw_look, render
from .tumour import LABELS, Scene, build_scene, plan_tumour

log = logging.getLogger(__name__)

#: Bumped whenever a seed's images change; recorded in dataset.json, a folder never mixes versions.
GENERATOR_VERSION = 3
#: Versions this code still makes, byte for byte (version 1: no enhancing normal structures, and the
#: default model was trained on it, so its card's command needs it; version 2: MNI152 anatomy only).
GENERATOR_VERSIONS = (1, 2, 3)


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



def synthesise(seed: int, version: int = GENERATOR_VERSION) -> tuple[SynthCase, Scene, Geometry]:
    """The case of ``seed``, with its scene on the template grid and its acquisition geometry (for
    tests that follow a structure from one frame to the other)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"synthetic case seed must be a non-negative integer, got {seed!r}")
    _check_version(version)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed)))
    anat = load_anatomy(_draw_anatomy(rng, version))
    plan = plan_tumour(rng, anat)
    scene = build_scene(rng, anat, plan)
    look = draw_look(rng, version)
    channels = render(rng, anat, scene, look)
    geom = draw_geometry(rng, anat, look)
    image, labels = acquire(rng, anat, scene, look, channels, geom)
    return SynthCase(image=image, labels=labels, affine=geom.affine.copy()), scene, geom


def _draw_anatomy(rng: np.random.Generator, version: int) -> str:
    """The case's healthy head: the first draw of its random stream from version 3 on (versions 1 and 2
    draw nothing, which keeps their stream, so their cases)."""
    return ANATOMIES[int(rng.integers(len(ANATOMIES)))] if version >= 3 else ANATOMIES[0]


def case_anatomy(seed: int, version: int) -> str:
    return _draw_anatomy(np.random.default_rng(np.random.SeedSequence(int(seed))), version)


def synth_case(seed: int, version: int = GENERATOR_VERSION) -> SynthCase:
    """Generate one synthetic glioma case; the same ``seed`` (>= 0) and generator ``version`` give
    byte-identical arrays.

    Returns a :class:`SynthCase`: image float32 (4, I, J, K) in :data:`CHANNELS` order, labels uint8
    (I, J, K) in the MSD scheme, affine voxel -> RAS+ mm. Each dimension is at most 256 voxels.
    Raises ModuleNotFoundError when nilearn (which ships the MNI152 template) is not installed, and
    ConfigError for version 3 without Colin27 (Debian's mricron-data) or with other Colin27 voxels.
    """
    return synthesise(seed, version)[0]


def _check_version(version: int) -> None:
    if version not in GENERATOR_VERSIONS:
        raise ConfigError(f"synthetic generator version must be one of {list(GENERATOR_VERSIONS)}, got {version!r}")


def case_seeds(seed: int, cases: int) -> list[int]:
    return [int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint32)[0]) for i in range(cases)]


def _provenance(version: int) -> list[dict[str, object]]:
    try:
        nilearn_version = importlib.metadata.version("nilearn")
    except importlib.metadata.PackageNotFoundError:
        nilearn_version = "unknown"
    colin = [{
        "name": "Colin27 single-subject T1 (27 averaged scans of one head), with skull and skull-stripped",
        "files": [name for name, _ in COLIN_FILES.values()],
        "voxels_sha256": {name: digest for name, digest in COLIN_FILES.values()},
        "source": f"Debian package mricron-data 1.2.20211006 ({COLIN_FOLDER}), originally "
                  "https://www.bic.mni.mcgill.ca/ServicesAtlases/Colin27",
        "licence": "MRIcron templates: BSD-3-clause, Copyright 2006-2010 Chris Rorden (Debian copyright "
                   "file); Colin27: " + MNI_LICENCE,
        "references": ["Holmes et al., J Comput Assist Tomogr 22(2), 1998, doi:10.1097/00004728-199803000-00032"],
    }] if version >= 3 else []
    return [{
        "name": "MNI ICBM152 2009a nonlinear symmetric template (T1, GM and WM probability maps)",
        "files": sorted(TEMPLATE_FILES.values()),
        "source": f"copy bundled in the nilearn {nilearn_version} wheel (nilearn/datasets/data), "
                  "originally https://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009",
        "licence": MNI_LICENCE,
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
    template_paths()  # fail before creating anything when nilearn (or Colin27) is missing
    if version >= 3:
        colin_paths()
    _check_previous_seed(output, int(seed), version)
    output.mkdir(parents=True, exist_ok=True)
    marker = {"tumorseg_synth": {"seed": int(seed), "generator_version": version}}
    write_bytes_atomic(output / STARTED_MARKER, (json.dumps(marker) + "\n").encode())
    seeds = case_seeds(int(seed), int(cases))
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
                           "case_anatomies": [case_anatomy(s, version) for s in seeds],
                           "templates": _provenance(version)},
    }
    write_bytes_atomic(output / "dataset.json", (json.dumps(description, indent=2) + "\n").encode())
    return output
