"""MONAI bundles through tumorseg: a bundle laid out as brats_mri_segmentation (SegResNet, channels
T1c/T1/T2/FLAIR, sigmoid TC/WT/ET, its label-painting Lambdad) with random weights, made here, gives
through ``tumorseg predict`` the labels of the bundle's own ``monai.bundle run``."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tumorseg.cli import main

pytest.importorskip("ignite", reason="the bundle's own run (the reference) needs pytorch-ignite (the test extra)")

AGREEMENT = 0.999

#: brats_mri_segmentation's inference.json (MONAI model zoo), smaller network and window, and a
#: Spacingd to 2 mm with Orientationd so that the bundle's Invertd has work to do.
INFERENCE = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": ".",
    "output_dir": "$@bundle_root + '/eval'",
    "data_list_file_path": "$@bundle_root + '/configs/datalist.json'",
    "dataset_dir": "/nonexistent",
    "test_datalist": "$monai.data.load_decathlon_datalist(@data_list_file_path, data_list_key='testing', base_dir=@dataset_dir)",
    "device": "$torch.device('cpu')",
    "network_def": {"_target_": "SegResNet", "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "init_filters": 8,
                    "in_channels": 4, "out_channels": 3, "dropout_prob": 0.2},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image", "image_only": False},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"},
        {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
    ]},
    "dataset": {"_target_": "Dataset", "data": "@test_datalist", "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 0},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 64], "sw_batch_size": 1, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "meta_keys": "pred_meta_dict", "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
        {"_target_": "Lambdad", "keys": "pred", "func": "$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, torch.where(x[[1]] > 0, 2, 0)))"},
        {"_target_": "SaveImaged", "keys": "pred", "meta_keys": "pred_meta_dict", "output_dir": "@output_dir",
         "output_postfix": "seg", "output_dtype": "uint8", "resample": False, "squeeze_end_dims": True},
    ]},
    "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                  "load_dict": {"model": "@network"}}],
    "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                  "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                  "val_handlers": "@handlers", "amp": False},
    "run": ["$@evaluator.run()"],
}

METADATA = {
    "version": "0.0.1", "name": "tumorseg test bundle", "description": "brats_mri_segmentation layout, random weights",
    "network_data_format": {
        "inputs": {"image": {"num_channels": 4, "channel_def": {"0": "T1c", "1": "T1", "2": "T2", "3": "FLAIR"}}},
        "outputs": {"pred": {"num_channels": 3,
                             "channel_def": {"0": "Tumor core", "1": "Whole tumor", "2": "Enhancing tumor"}}},
    },
}


def make_bundle(root: Path, seed: int = 0, inference: dict | None = None) -> Path:
    from monai.networks.nets import SegResNet

    bundle = root / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference or INFERENCE, indent=1))
    (bundle / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=1))
    torch.manual_seed(seed)
    network = SegResNet(blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=8, in_channels=4, out_channels=3,
                        dropout_prob=0.2)
    with torch.no_grad():  # random weights that mark some of each region, not nothing or everything
        network.conv_final[-1].conv.bias.copy_(torch.tensor([0.0, 0.3, -0.2]))
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """A synthetic case cut around its tumour, oblique-free but 1.2 x 1.2 x 2.2 mm."""
    root = tmp_path_factory.mktemp("bundle-case")
    result = subprocess.run([str(Path(sys.executable).parent / "tumorseg"), "synth", "-o", str(root / "synth"),
                             "--cases", "2", "--seed", "101", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    img = nib.load(root / "synth" / "imagesTr" / "synth_0001.nii.gz")
    data = np.asarray(img.dataobj, dtype=np.float32)[20:120, 30:130, 20:70]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ [20, 30, 20] + img.affine[:3, 3]
    files = {}
    for c, seq in enumerate(("flair", "t1", "t1gd", "t2")):  # the Decathlon order of tumorseg synth
        files[seq] = root / f"case_{seq}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data[..., c]), affine), files[seq])
    return files


def _bundle_run(bundle: Path, case: dict[str, Path]) -> np.ndarray:
    datalist = {"testing": [{"image": [str(case[s]) for s in ("t1gd", "t1", "t2", "flair")]}]}
    (bundle / "configs" / "datalist.json").write_text(json.dumps(datalist))
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                    "--bundle_root", str(bundle)], check=True, capture_output=True, cwd=bundle)
    (saved,) = sorted((bundle / "eval").rglob("*_seg.nii.gz"))
    return np.asarray(nib.load(saved).dataobj)


@pytest.fixture()
def models_dir(tmp_path, monkeypatch) -> Path:
    out = tmp_path / "user-models"
    monkeypatch.setenv("TUMORSEG_MODELS", str(out))
    return out


def test_bundle_gives_its_own_labels(tmp_path, case, models_dir):
    bundle = make_bundle(tmp_path)
    theirs = _bundle_run(bundle, case)
    result = CliRunner().invoke(main, ["models", "import", "monai-bundle", str(bundle), "--name", "segresnet",
                                       "--label-scheme", "brats2021"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from tumorseg.model import load_card

    card = load_card(models_dir / "segresnet")
    assert card.input.sequences == ("t1gd", "t1", "t2", "flair")
    assert dict(card.imported.label_map) == {"1": 2, "0": 1, "2": 4} and card.imported.paint_order == (1, 0, 2)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", *[a for s, f in case.items() for a in (f"--{s}", str(f))],
                                       "--model", "segresnet", "--pipeline", "as-trained", "--device", "cpu",
                                       "-o", str(out), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ours = nib.load(out / "segmentation.nii.gz")
    reference = nib.load(case["flair"])
    assert ours.shape == reference.shape and np.allclose(ours.affine, reference.affine, atol=1e-5)
    ours = np.asarray(ours.dataobj)
    assert theirs.shape == ours.shape
    agreement = float((ours == theirs).mean())
    counts = {int(v): int((theirs == v).sum()) for v in (1, 2, 4)}
    print(f"MONAI bundle: labels identical on {100 * agreement:.4f} % of {ours.size} voxels; bundle's labels {counts}")
    assert all(n > 100 for n in counts.values()), "the reference should mark some of every label"
    assert agreement >= AGREEMENT


def test_expressions_and_torchscript_need_trust_code(tmp_path, models_dir):
    inference = copy.deepcopy(INFERENCE)
    inference["network_def"]["init_filters"] = "$8"
    bundle = make_bundle(tmp_path, inference=inference)
    result = CliRunner().invoke(main, ["models", "import", "monai-bundle", str(bundle), "--name", "x"])
    assert result.exit_code != 0 and "Python expression" in result.output and "--trust-code" in result.output
    ts = make_bundle(tmp_path / "ts")
    (ts / "models" / "model.pt").unlink()
    torch.jit.save(torch.jit.script(torch.nn.Identity()), ts / "models" / "model.ts")
    result = CliRunner().invoke(main, ["models", "import", "monai-bundle", str(ts), "--name", "ts"])
    assert result.exit_code != 0 and "TorchScript" in result.output and not (models_dir / "ts").exists()


def test_a_network_outside_the_allow_list_is_refused(tmp_path, models_dir):
    inference = copy.deepcopy(INFERENCE)
    inference["network_def"]["_target_"] = "torch.nn.Module"
    bundle = make_bundle(tmp_path, inference=inference)
    result = CliRunner().invoke(main, ["models", "import", "monai-bundle", str(bundle), "--name", "x"])
    assert result.exit_code != 0 and "torch.nn.Module is not one of" in result.output
    assert os.listdir(models_dir) == [] if models_dir.exists() else True


class _RunsCodeWhenLoaded:
    """A pickle that creates a file when it is unpickled (as a malicious one would do worse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_only_the_files_checked_at_import_are_loaded(tmp_path, models_dir):
    from tumorseg.imported.monai_bundle import BundleRunner
    from tumorseg.model import load_card, load_model

    # A bundle imported with inference.yaml, and an inference.json that appears beside it later.
    bundle = make_bundle(tmp_path / "yaml")
    (bundle / "configs" / "inference.json").rename(bundle / "configs" / "inference.yaml")  # JSON is YAML
    result = CliRunner().invoke(main, ["models", "import", "monai-bundle", str(bundle), "--name", "y"])
    assert result.exit_code == 0, result.output
    planted = copy.deepcopy(INFERENCE)
    planted["network_def"]["_target_"] = "torch.nn.Module"
    (bundle / "configs" / "inference.json").write_text(json.dumps(planted))
    assert isinstance(load_model("y").network, torch.nn.Module)
    runner = BundleRunner(load_card(models_dir / "y"), bundle)
    assert runner.config["network_def"]["_target_"] == INFERENCE["network_def"]["_target_"]

    # TorchScript imported with --trust-code, and a pickled model.pt that appears beside it later.
    ts = make_bundle(tmp_path / "ts")
    (ts / "models" / "model.pt").unlink()
    torch.jit.save(torch.jit.script(torch.nn.Identity()), ts / "models" / "model.ts")
    result = CliRunner().invoke(main, ["models", "import", "monai-bundle", str(ts), "--name", "ts", "--trust-code"])
    assert result.exit_code == 0, result.output
    marker = tmp_path / "code-ran"
    torch.save(_RunsCodeWhenLoaded(marker), ts / "models" / "model.pt")
    load_model("ts")
    assert not marker.exists()
