"""tumorseg against nnU-Net's own predictor on the same nnU-Net model and case, in one run.

    python benchmarks/imported_models.py --nnunet-venv /tmp/tumorseg-nnunet-venv [--folds 0 1] [--repeat 2]
    python benchmarks/imported_models.py --nnunet-venv ... --network nnunet-sized --folds 0 --repeat 1

The model is tests/data/nnunet_tiny (trained by nnU-Net's commands, tests/data/make_nnunet_model.py)
on a full-size synthetic four-sequence case (tumorseg synth, seed 101); or, with ``--network
nnunet-sized``, the same plans with nnU-Net's BraTS 3d_fullres network (6 stages, 32-320 features,
128^3 patch, 1 mm; random weights in nnU-Net's checkpoint layout) on a 126 mm cube of that case (one
window, eight mirrored passes). Run it with the nnU-Net environment's python (tumorseg installed
there too) to time both tools on the same torch build. It prints, per tool:
the seconds of inference alone (nnU-Net's ``predict_logits_from_preprocessed_data``, tumorseg's
``Segmenter.infer``: folds, sliding window, mirroring, on the same preprocessed input), the wall
seconds of the whole command (``nnUNetv2_predict_from_modelfolder`` and ``tumorseg predict
--pipeline as-trained``, each from a cold process), the ratios, and the label agreement.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "nnunet_tiny"
BIN = Path(sys.executable).parent


def nnunet_sized(folder: Path, folds: list[str]) -> Path:
    """The tiny model's results folder with nnU-Net's BraTS-sized 3d_fullres network, random weights."""
    import torch

    from tumorseg.imported.nnunet import build_network

    shutil.copytree(TINY, folder, ignore=shutil.ignore_patterns("fold_*"))
    plans = json.loads((folder / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    config.update(spacing=[1.0, 1.0, 1.0], patch_size=[128, 128, 128])
    config["architecture"]["arch_kwargs"].update(
        n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320], kernel_sizes=[[3, 3, 3]] * 6,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * 5, n_conv_per_stage=[2] * 6, n_conv_per_stage_decoder=[2] * 5)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    for fold in folds:
        torch.manual_seed(int(fold))
        network = build_network(plans, "3d_fullres", 4, 3)
        (folder / f"fold_{fold}").mkdir()
        torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nnunet-venv", type=Path, default=Path(os.environ.get("TUMORSEG_NNUNET_VENV", "")))
    parser.add_argument("--folds", nargs="+", default=["0", "1"])
    parser.add_argument("--repeat", type=int, default=2, help="runs of each tool's inference; the fastest counts")
    parser.add_argument("--network", choices=["tiny", "nnunet-sized"], default="tiny")
    args = parser.parse_args()
    venv = args.nnunet_venv
    if not (venv / "bin" / "nnUNetv2_predict_from_modelfolder").is_file():
        parser.error("give --nnunet-venv (a virtual environment with nnunetv2; .ci/run makes one)")
    work = Path(tempfile.mkdtemp(prefix="imported-bench-"))
    os.environ["TUMORSEG_MODELS"] = str(work / "models")
    subprocess.run([str(BIN / "tumorseg"), "synth", "-o", str(work / "synth"), "--cases", "1", "--seed", "101", "-q"],
                   check=True)
    img = nib.load(work / "synth" / "imagesTr" / "synth_0000.nii.gz")
    data = np.asarray(img.dataobj, dtype=np.float32)
    model = TINY
    affine = img.affine
    if args.network == "nnunet-sized":
        model = nnunet_sized(work / "model", args.folds)
        side = int(round(126 / float(img.header.get_zooms()[0])))
        start = [(n - side) // 2 for n in data.shape[:3]]
        data = data[start[0]:start[0] + side, start[1]:start[1] + side, start[2]:start[2] + side]
        affine = img.affine.copy()
        affine[:3, 3] = img.affine[:3, :3] @ start + img.affine[:3, 3]
    (work / "in").mkdir()
    files = []
    for c in range(4):
        files.append(work / "in" / f"case_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data[..., c]), affine), files[-1])
    print(f"case: {data.shape[:3]} voxels at {np.round(img.header.get_zooms()[:3], 2).tolist()} mm; "
          f"model: {model.name}, folds {' '.join(args.folds)}, mirroring on")

    subprocess.run([str(BIN / "tumorseg"), "models", "import", "nnunet", str(model), "--name", "tiny",
                    "--folds", ",".join(args.folds)], check=True, capture_output=True)
    env = {**os.environ, "nnUNet_raw": str(work), "nnUNet_preprocessed": str(work), "nnUNet_results": str(work)}

    # Inference alone, same preprocessed input (nnU-Net's, which tumorseg's matches; tests/test_imported.py).
    nnunet_seconds = []
    for _ in range(args.repeat):
        subprocess.run([str(venv / "bin" / "python"), str(ROOT / "tests" / "nnunet_reference.py"), str(model), str(work),
                        "--folds", *args.folds, "--case", "case", *map(str, files)], check=True, env=env,
                       capture_output=True)
        nnunet_seconds.append(json.loads((work / "case_seconds.json").read_text())["logits_seconds"])
    from tumorseg.config import load_pipeline
    from tumorseg.pipeline import Segmenter
    from tumorseg.sequences import StudyInputs

    segmenter = Segmenter("tiny", load_pipeline("as-trained").with_overrides(device="cpu"))
    inputs = StudyInputs(files=tuple(zip(("flair", "t1", "t1gd", "t2"), files)))
    ours_seconds = []
    for _ in range(args.repeat):
        prepared = segmenter.spec.read_and_prepare(inputs)
        logits, seconds = segmenter.infer(prepared)
        ours_seconds.append(seconds)
    reference = np.load(work / "case_logits.npy").astype(np.float32)
    difference = np.abs(logits.astype(np.float32) - reference).max()

    # The whole command, cold.
    start = time.perf_counter()
    subprocess.run([str(venv / "bin" / "nnUNetv2_predict_from_modelfolder"), "-i", str(work / "in"), "-o",
                    str(work / "nnunet"), "-m", str(model), "-f", *args.folds, "-device", "cpu", "-npp", "1", "-nps", "1",
                    "--disable_progress_bar"], check=True, env=env, capture_output=True)
    nnunet_wall = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([str(BIN / "tumorseg"), "predict", *[a for s, f in zip(("flair", "t1", "t1gd", "t2"), files)
                                                      for a in (f"--{s}", str(f))],
                    "--model", "tiny", "--pipeline", "as-trained", "--device", "cpu", "-o", str(work / "ours"), "-q"],
                   check=True)
    ours_wall = time.perf_counter() - start
    a = np.asarray(nib.load(work / "ours" / "segmentation.nii.gz").dataobj)
    b = np.asarray(nib.load(work / "nnunet" / "case.nii.gz").dataobj)

    n, o = min(nnunet_seconds), min(ours_seconds)
    print(f"inference (folds, windows, mirroring): nnU-Net {n:.2f} s, tumorseg {o:.2f} s: ratio {n / o:.2f}x "
          f"(logits max |difference| {difference:.1e})")
    print(f"whole command, cold: nnUNetv2_predict_from_modelfolder {nnunet_wall:.1f} s, tumorseg predict {ours_wall:.1f} s: "
          f"ratio {nnunet_wall / ours_wall:.2f}x")
    print(f"labels identical on {100 * float((a == b).mean()):.4f} % of {a.size} voxels "
          f"(nnU-Net foreground {int((b > 0).sum())} voxels)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
