"""Rigid registration accuracy and time on real cases with known motions and re-sampled acquisitions.

    python benchmarks/registration.py --cases ../shared/data/brats2018-train --limit 4 [--json reg.json]

For each case (its T1 after contrast is the reference, at 1 mm), the FLAIR is made into what a
hospital would send: moved by a known rigid motion (rotations up to 15 degrees about each axis,
shifts up to 20 mm, drawn from --seed) and acquired on another grid: 5 mm axial slices (256 x 256
in plane), 0.45 mm in plane with 3 mm slices, a coronal 3D and a sagittal 3D series at 1 mm. Slices
thicker than the reference's voxels are the average of the anatomy across them (a Gaussian of the
slice's FWHM), not a thin sample. Each moved series is registered back by tumorseg's register stage,
by the other libraries given with --compare (itk-elastix when installed), and by scanner coordinates
alone (the baseline: what tumorseg did before); target registration error (TRE) is the distance
between where each method and the known motion put every brain voxel of the reference, in mm.
Prints mean and largest TRE per registration, seconds, and the summary against the targets
(mean TRE <= 1.0 mm, worst case <= 2.0 mm, <= 20 s for a 5 mm series).

``--segment``: each moved series is also segmented with the reference as ``predict`` runs (FLAIR and
T1gd, registration auto), and again with its affine corrected by the known motion and registration
``none`` (a perfect registration): the whole-tumour Dice between the two label maps, and of each
against the expert labels, isolates what registration costs the segmentation from what the thick
slices do.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from tumorseg.itk import matrix_ras, resample_to_grid
from tumorseg.stages import register
from tumorseg.stages.read import Volume, read_volume
from tumorseg.datasets import discover_cases

#: Acquisitions: name -> (voxel spacing (i, j, k) mm, shape, the RAS direction of each voxel axis
#: (as a scanner's series would run), slice thickness per axis mm). The 5 mm axial series is the
#: issue's 256 x 256 x 26, 5 mm slices 1 mm apart (160 mm, the whole brain).
ACQUISITIONS = {
    "axial 5 mm": ((0.9375, 0.9375, 6.0), (256, 256, 26), ((-1, 0, 0), (0, -1, 0), (0, 0, 1)), (0.9375, 0.9375, 5.0)),
    "0.45 mm in plane, 3 mm": ((0.45, 0.45, 3.0), (512, 512, 50), ((-1, 0, 0), (0, -1, 0), (0, 0, 1)), (0.45, 0.45, 3.0)),
    "coronal 3D 1 mm": ((1.0, 1.0, 1.0), (200, 180, 220), ((-1, 0, 0), (0, 0, -1), (0, -1, 0)), (1.0, 1.0, 1.0)),
    "sagittal 3D 1 mm": ((1.0, 1.0, 1.0), (220, 180, 200), ((0, -1, 0), (0, 0, -1), (1, 0, 0)), (1.0, 1.0, 1.0)),
}


def rotation(angles_deg: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    for axis, angle in enumerate(np.radians(angles_deg)):
        c, s = np.cos(angle), np.sin(angle)
        r = np.eye(3)
        a, b = [x for x in range(3) if x != axis]
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        out = out @ r
    return out


def motion(rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """A rigid motion about ``centre`` (RAS mm): up to 15 degrees about each axis, 20 mm along each."""
    m = np.eye(4)
    m[:3, :3] = rotation(rng.uniform(-15, 15, 3))
    m[:3, 3] = centre - m[:3, :3] @ centre + rng.uniform(-20, 20, 3)
    return m


def acquisition_grid(name: str, centre: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    spacing, shape, axes, _ = ACQUISITIONS[name]
    affine = np.eye(4)
    affine[:3, :3] = np.array(axes, dtype=np.float64).T * np.array(spacing)
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return shape, affine


def acquire(source: Volume, name: str, moved: np.ndarray, centre: np.ndarray) -> Volume:
    """``source`` (on the reference's world) as a series of acquisition ``name`` taken after the
    patient moved by ``moved`` (reference world -> scanner world of the new series)."""
    shape, affine = acquisition_grid(name, centre)
    spacing, thickness = np.array(ACQUISITIONS[name][0]), np.array(ACQUISITIONS[name][3])
    source_spacing = np.sqrt((source.affine[:3, :3] ** 2).sum(0))
    # Thick voxels average the anatomy across them: blur the source by each new voxel's thickness
    # (as FWHM) along the source axis that runs closest to it.
    direction = np.abs(np.linalg.inv(source.affine[:3, :3] / source_spacing) @ (affine[:3, :3] / spacing))
    fwhm = np.array([thickness[int(np.argmax(direction[axis]))] for axis in range(3)])
    sigma = np.sqrt(np.maximum(fwhm ** 2 - source_spacing ** 2, 0)) / 2.355 / source_spacing
    blurred = ndi.gaussian_filter(source.array, sigma) if sigma.max() > 0.3 else source.array
    array, _ = resample_to_grid(blurred, source.affine, shape, affine, matrix_ras=np.linalg.inv(moved))
    return Volume(array, affine, None, source.path)


def tre(estimate: np.ndarray, truth: np.ndarray, points: np.ndarray) -> tuple[float, float]:
    """Mean and largest distance (mm) between where two matrices send ``points`` (N, 4)."""
    d = np.linalg.norm((points @ (estimate - truth).T)[:, :3], axis=1)
    return float(d.mean()), float(d.max())


def elastix_rigid(fixed: Volume, moving: Volume) -> np.ndarray | None:
    """The same task with itk-elastix's default rigid registration, as a RAS matrix (None when
    itk-elastix is not installed)."""
    try:
        import itk
    except ImportError:
        return None
    from tumorseg.itk import LPS_TO_RAS

    def image(v: Volume):
        img = itk.GetImageFromArray(np.ascontiguousarray(v.array.transpose(2, 1, 0)).astype(np.float32))
        lps = LPS_TO_RAS @ v.affine
        spacing = np.sqrt((lps[:3, :3] ** 2).sum(0))
        img.SetSpacing(spacing.tolist())
        img.SetOrigin(lps[:3, 3].tolist())
        img.SetDirection(itk.matrix_from_array(lps[:3, :3] / spacing))
        return img

    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("rigid"))
    _, result = itk.elastix_registration_method(image(fixed), image(moving), parameter_object=params,
                                                log_to_console=False)
    p = result.GetParameterMap(0)
    angles = [float(v) for v in p["TransformParameters"][:3]]
    shift = np.array([float(v) for v in p["TransformParameters"][3:6]])
    centre = np.array([float(v) for v in p["CenterOfRotationPoint"]])
    import SimpleITK as sitk

    euler = sitk.Euler3DTransform(centre.tolist(), *angles, shift.tolist())
    return matrix_ras(euler)


def segment_both(segmenters: dict, reference_path: Path, moving: Volume, truth_motion: np.ndarray,
                 label_path: Path, scheme: str, workdir: Path) -> dict[str, float]:
    """WT Dice of the registered run against the perfectly registered one, and each against truth."""
    import nibabel as nib

    from tumorseg.evaluate import read_label_file
    from tumorseg.labels import get_scheme
    from tumorseg.sequences import StudyInputs

    masks = {}
    corrected = np.linalg.inv(truth_motion) @ moving.affine  # where the scanner should have put it
    for name, affine in (("registered", moving.affine), ("perfect", corrected)):
        image = nib.Nifti1Image(moving.array, affine)
        image.header.set_qform(affine, code=1)
        image.header.set_sform(affine, code=1)
        path = workdir / f"{name}-flair.nii.gz"
        nib.save(image, str(path))
        segmenter = segmenters[name]
        result = segmenter.segment_inputs(StudyInputs(files=(("flair", path), ("t1gd", reference_path))))
        masks[name] = segmenter.card.scheme.region_mask(result.labels.array, "WT")
    truth = read_label_file(label_path)
    masks["truth"] = get_scheme(scheme).region_mask(truth.labels, "WT")

    def dice(a, b):
        return 2 * float(np.count_nonzero(a & b)) / max(1, int(a.sum()) + int(b.sum()))

    return {"registered_vs_perfect": round(dice(masks["registered"], masks["perfect"]), 4),
            "perfect_vs_truth": round(dice(masks["perfect"], masks["truth"]), 4),
            "registered_vs_truth": round(dice(masks["registered"], masks["truth"]), 4)}


def decubitus(folder: Path, out: Path | None) -> dict:
    """The four-position DICOM series of one volunteer registered onto the supine one: the motion
    found, how well chained registrations agree, and a quick-look image per position."""
    from tumorseg.dicom.find import find_series
    from tumorseg.dicom.volume import read_series
    from tumorseg.labels import get_scheme
    from tumorseg.stages import overview

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    volumes = {p: read_series(find_series(folder / p)[0])[0] for p in ("HFS", "HFP", "HFDL", "HFDR")}
    reference = volumes["HFS"]
    centre = register.grid_centre(reference.array.shape, reference.affine)
    head = np.argwhere(register.head_mask(reference.array))[::50]
    points = np.c_[head, np.ones(len(head))] @ reference.affine.T
    found, rows = {}, {}
    for position in ("HFP", "HFDL", "HFDR"):
        start = time.perf_counter()
        matrix, metric = register.rigid_transform(reference, volumes[position], position)
        record = register.Registration(position, "rigid", matrix, metric)
        found[position] = matrix
        rows[position] = {**record.to_report(centre), "seconds": round(time.perf_counter() - start, 1)}
        if out is not None:
            moved, _ = resample_to_grid(volumes[position].array, volumes[position].affine, reference.array.shape,
                                        reference.affine, matrix_ras=matrix)
            grey = {"HFS": overview.window(reference.array), position: overview.window(moved)}
            rgb = overview.render(grey, "HFS", np.zeros(reference.array.shape, np.uint8), reference.affine,
                                  get_scheme("msd"))
            (out / f"decubitus-{position}.png").write_bytes(overview.png_bytes(rgb))
        print(f"decubitus {position} onto HFS: rotation {rows[position]['rotation_deg']:.1f} deg, translation "
              f"{np.linalg.norm(rows[position]['translation_mm']):.1f} mm, MI {metric:.3f}, {rows[position]['seconds']} s")
    # Chained against direct: HFS -> HFP -> HFDL should be HFS -> HFDL.
    chained = register.rigid_transform(volumes["HFP"], volumes["HFDL"], "HFDL")[0] @ found["HFP"]
    mean, worst = tre(chained, found["HFDL"], points)
    print(f"decubitus: HFS->HFP->HFDL against HFS->HFDL: {mean:.2f} mm mean, {worst:.2f} mm largest over the head")
    return {"onto_HFS": rows, "chain_disagreement_mm": {"mean": round(mean, 3), "max": round(worst, 3)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=Path, action="append", default=[], help="BraTS case folders (T1gd and FLAIR)")
    parser.add_argument("--label-scheme", default="brats2021")
    parser.add_argument("--limit", type=int, default=4, help="cases per folder")
    parser.add_argument("--acquisition", action="append", choices=list(ACQUISITIONS), help="default: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--segment", action="store_true", help="also segment each moved series (see above)")
    parser.add_argument("--decubitus", type=Path, help="the decubitus-t1 DICOM folder (HFS, HFP, HFDL, HFDR)")
    parser.add_argument("--images", type=Path, help="write the decubitus quick-look images here")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True, help="with --segment")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rng = np.random.default_rng(args.seed)
    rows = []
    segmenters = {}
    if args.segment:
        from tumorseg.config import load_pipeline
        from tumorseg.model import load_model
        from tumorseg.pipeline import Segmenter

        model, pipeline = load_model("default"), load_pipeline("default").with_overrides(tta=args.tta)
        segmenters = {"registered": Segmenter(model, pipeline.with_preprocess(registration="auto")),
                      "perfect": Segmenter(model, pipeline.with_preprocess(registration="none"))}
    workdir = Path(tempfile.mkdtemp(prefix="registration-"))
    for root in args.cases:
        for case in discover_cases(root, args.label_scheme)[:args.limit]:
            files = dict(case.inputs.files)
            reference, flair = read_volume(files["t1gd"]), read_volume(files["flair"])
            brain = np.argwhere(reference.array != reference.array[0, 0, 0])[::50]
            points = np.c_[brain, np.ones(len(brain))] @ reference.affine.T
            centre = register.grid_centre(reference.array.shape, reference.affine)
            for name in args.acquisition or ACQUISITIONS:
                truth = motion(rng, centre)
                moving = acquire(flair, name, truth, centre)
                row = {"case": case.case_id, "acquisition": name, "moving_shape": list(moving.array.shape),
                       "motion_deg": round(float(np.degrees(np.arccos((np.trace(truth[:3, :3]) - 1) / 2))), 2),
                       "motion_mm": round(float(np.linalg.norm(truth[:3, 3] - (centre - truth[:3, :3] @ centre))), 2)}
                metric = []  # tumorseg's final mutual information, against register.WARN/REFUSE_METRIC
                methods = {"scanner coordinates": lambda: np.eye(4),
                           "tumorseg (SimpleITK)": lambda: metric.append(
                               register.rigid_transform(reference, moving, "flair")) or metric[-1][0],
                           "itk-elastix": lambda: elastix_rigid(reference, moving)}
                for method, run in methods.items():
                    start = time.perf_counter()
                    estimate = run()
                    if estimate is None:
                        continue
                    mean, worst = tre(estimate, truth, points)
                    row[method] = {"tre_mean_mm": round(mean, 3), "tre_max_mm": round(worst, 3),
                                   "seconds": round(time.perf_counter() - start, 2)}
                    if method == "tumorseg (SimpleITK)":
                        row[method]["metric"] = round(float(metric[-1][1]), 3)
                if segmenters:
                    row["wt_dice"] = segment_both(segmenters, files["t1gd"], moving, truth, case.label_path,
                                                  args.label_scheme, workdir)
                rows.append(row)
                print(f"{case.case_id:22s} {name:24s} motion {row['motion_deg']:5.1f} deg {row['motion_mm']:5.1f} mm  "
                      + "  ".join(f"{m}: TRE {r['tre_mean_mm']:.2f} (max {r['tre_max_mm']:.2f}) mm {r['seconds']:.1f} s"
                                  + (f" MI {r['metric']:.3f}" if "metric" in r else "")
                                  for m, r in row.items() if isinstance(r, dict) and "tre_mean_mm" in r)
                      + (f"  WT Dice registered/perfect {row['wt_dice']['registered_vs_perfect']:.3f}" if segmenters else ""),
                      flush=True)
    summary = {}
    for method in ("scanner coordinates", "tumorseg (SimpleITK)", "itk-elastix"):  # the TRE columns
        done = [r[method] for r in rows if method in r]
        if done:
            summary[method] = {"registrations": len(done),
                               "tre_mean_mm": round(float(np.mean([d["tre_mean_mm"] for d in done])), 3),
                               "worst_mean_tre_mm": round(float(np.max([d["tre_mean_mm"] for d in done])), 3),
                               "worst_max_tre_mm": round(float(np.max([d["tre_max_mm"] for d in done])), 3),
                               "seconds_mean": round(float(np.mean([d["seconds"] for d in done])), 2)}
            s = summary[method]
            print(f"{method}: {s['registrations']} registrations, mean TRE {s['tre_mean_mm']:.2f} mm, worst case "
                  f"{s['worst_mean_tre_mm']:.2f} mm (largest at one voxel {s['worst_max_tre_mm']:.2f}), "
                  f"{s['seconds_mean']:.1f} s each")
    if segmenters:
        dice = {k: round(float(np.mean([r["wt_dice"][k] for r in rows])), 4) for k in rows[0]["wt_dice"]}
        summary["segmentation"] = dice
        print(f"WT Dice, registered against perfectly registered: mean {dice['registered_vs_perfect']:.3f} "
              f"(against the expert labels: registered {dice['registered_vs_truth']:.3f}, perfect "
              f"{dice['perfect_vs_truth']:.3f})")
    shutil.rmtree(workdir, ignore_errors=True)
    if args.decubitus:
        summary["decubitus"] = decubitus(args.decubitus, args.images)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
