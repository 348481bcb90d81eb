"""Build tests/data/nnunet_tiny: a tiny nnU-Net v2 model trained by nnU-Net's own commands.

Run once (about 10 minutes on 2 CPU cores) when nnU-Net's file layout changes; the tests import the
folder this writes and compare tumorseg's predictions with ``nnUNetv2_predict``'s. nnU-Net runs from its
own virtual environment (``--nnunet-venv``, made as .ci/run makes it: ``pip install nnunetv2`` beside a
torch with its matching torchvision), tumorseg from this one.

    python tests/data/make_nnunet_model.py --nnunet-venv /work/nnunet-ref [--work /tmp/nnunet-build]

What it does, all with nnU-Net's commands except the plan edit:
1. ``tumorseg synth`` makes 6 synthetic four-sequence cases (1 mm), written in nnU-Net's raw layout
   with BraTS-style regions (whole tumour, tumour core, enhancing) as nnU-Net's BraTS models use.
2. ``nnUNetv2_plan_and_preprocess``; the plans are then shrunk into ``nnUNetTinyPlans`` (2 mm,
   48^3 patch, 4..32 features) so that the checkpoints stay small (< 1 MB each) and inference on
   the 1 mm test cases exercises nnU-Net's resampling both ways.
3. ``nnUNetv2_preprocess`` with those plans, ``nnUNetv2_train`` (nnUNetTrainer_1epoch) folds 0 and 1
   on the CPU.
4. The results folder, without logs and validation outputs, is copied to tests/data/nnunet_tiny.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
DATASET = "Dataset501_TumorsegTiny"
TRAINER = "nnUNetTrainer_1epoch"
PLANS = "nnUNetTinyPlans"
CHANNELS = {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"}  # the Decathlon order of tumorseg synth
SYNTH_SEED = 11


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def write_raw(synth: Path, raw: Path) -> None:
    """Decathlon 4D cases to nnU-Net's raw layout: one file per channel, MSD labels kept."""
    images, labels = raw / "imagesTr", raw / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    cases = sorted(p.name[:-len(".nii.gz")] for p in (synth / "imagesTr").glob("*.nii.gz"))
    for case in cases:
        img = nib.load(synth / "imagesTr" / f"{case}.nii.gz")
        data = np.asarray(img.dataobj, dtype=np.float32)
        for c in range(data.shape[3]):
            nib.save(nib.Nifti1Image(data[..., c], img.affine), images / f"{case}_{c:04d}.nii.gz")
        seg = nib.load(synth / "labelsTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(seg.dataobj).astype(np.uint8), seg.affine), labels / f"{case}.nii.gz")
    # MSD labels: 1 edema, 2 non-enhancing / necrotic core, 3 enhancing. Regions as nnU-Net's BraTS datasets.
    dataset = {
        "channel_names": CHANNELS,
        "labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]},
        "regions_class_order": [1, 2, 3],
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "name": "tumorseg tiny test model",
        "licence": "synthetic data from tumorseg synth",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset, indent=2))


def shrink_plans(preprocessed: Path) -> None:
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLANS
    config = plans["configurations"]["3d_fullres"]
    config.update(data_identifier=f"{PLANS}_3d_fullres", spacing=[2.0, 2.0, 2.0], patch_size=[48, 48, 48],
                  batch_size=2)
    arch = config["architecture"]["arch_kwargs"]
    arch.update(n_stages=4, features_per_stage=[4, 8, 16, 32], kernel_sizes=[[3, 3, 3]] * 4,
                strides=[[1, 1, 1]] + [[2, 2, 2]] * 3, n_conv_per_stage=[2] * 4, n_conv_per_stage_decoder=[2] * 3)
    plans["configurations"] = {"3d_fullres": config}
    (preprocessed / f"{PLANS}.json").write_text(json.dumps(plans, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/nnunet-build"))
    parser.add_argument("--nnunet-venv", type=Path, default=Path(os.environ.get("TUMORSEG_NNUNET_VENV", "")),
                        help="virtual environment with nnunetv2 (default: $TUMORSEG_NNUNET_VENV)")
    parser.add_argument("--output", type=Path, default=HERE / "nnunet_tiny")
    args = parser.parse_args()
    work = args.work
    nnunet = args.nnunet_venv / "bin"
    if not (nnunet / "nnUNetv2_train").is_file():
        parser.error(f"no nnUNetv2_train in {nnunet}: give --nnunet-venv")
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results"), "nnUNet_n_proc_DA": "1", "OMP_NUM_THREADS": "2"}
    run([str(Path(sys.executable).parent / "tumorseg"), "synth", "-o", str(work / "synth"), "--cases", "6",
         "--seed", str(SYNTH_SEED), "--workers", "2", "-q"], env)
    write_raw(work / "synth", work / "raw" / DATASET)
    run([str(nnunet / "nnUNetv2_plan_and_preprocess"), "-d", "501", "-c", "3d_fullres", "-np", "2", "--verify_dataset_integrity",
         "--no_pp"], env)
    shrink_plans(work / "preprocessed" / DATASET)
    run([str(nnunet / "nnUNetv2_preprocess"), "-d", "501", "-plans_name", PLANS, "-c", "3d_fullres", "-np", "2"], env)
    for fold in ("0", "1"):
        run([str(nnunet / "nnUNetv2_train"), "501", "3d_fullres", fold, "-tr", TRAINER, "-p", PLANS, "-device", "cpu"], env)
    results = work / "results" / DATASET / f"{TRAINER}__{PLANS}__3d_fullres"
    shutil.rmtree(args.output, ignore_errors=True)
    args.output.mkdir(parents=True)
    for name in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
        shutil.copy(results / name, args.output / name)
    for fold in ("0", "1"):
        (args.output / f"fold_{fold}").mkdir()
        for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
            shutil.copy(results / f"fold_{fold}" / name, args.output / f"fold_{fold}" / name)
    total = sum(p.stat().st_size for p in args.output.rglob("*") if p.is_file())
    print(f"wrote {args.output} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
