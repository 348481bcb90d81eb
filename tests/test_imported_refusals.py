"""Imported nnU-Net models and MONAI bundles: what nnU-Net and MONAI themselves do that tumorseg
must reproduce or refuse (inheritance, folds, readers, label tables, disabled and foreign
transforms, a bundle without Invertd)."""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tumorseg.cli import main
from tumorseg.errors import ModelError

pytest.importorskip("dynamic_network_architectures", reason="nnU-Net models need the nnunet extra (.ci/run installs it)")

HERE = Path(__file__).resolve().parent
TINY = HERE / "data" / "nnunet_tiny"
sys.path.insert(0, str(HERE))  # test_imported_bundle's bundle maker


@pytest.fixture()
def models_dir(tmp_path, monkeypatch) -> Path:
    out = tmp_path / "user-models"
    monkeypatch.setenv("TUMORSEG_MODELS", str(out))
    return out


def _results(tmp_path: Path, plans_fn=None, configuration: str | None = None, folds=("0",)) -> Path:
    import torch

    out = tmp_path / "results"
    out.mkdir()
    plans = json.loads((TINY / "plans.json").read_text())
    if plans_fn:
        plans_fn(plans)
    (out / "plans.json").write_text(json.dumps(plans))
    shutil.copy(TINY / "dataset.json", out / "dataset.json")
    for fold in folds:
        (out / f"fold_{fold}").mkdir()
        src = TINY / "fold_0" / "checkpoint_final.pth"
        if configuration is None:
            shutil.copy(src, out / f"fold_{fold}" / "checkpoint_final.pth")
        else:
            checkpoint = torch.load(src, weights_only=False, map_location="cpu")
            checkpoint["init_args"]["configuration"] = configuration
            torch.save(checkpoint, out / f"fold_{fold}" / "checkpoint_final.pth")
    return out


def _import(*args: str):
    return CliRunner().invoke(main, ["models", "import", "nnunet", *args], catch_exceptions=False)


def test_a_configuration_that_inherits_is_resolved_as_nnunet_does(tmp_path, models_dir):
    from tumorseg.imported.nnunet import configuration_of

    def plans_fn(plans):  # nnU-Net's documented way to add a configuration (plans_handler.py)
        plans["configurations"]["3d_fullres_bs4"] = {"inherits_from": "3d_fullres", "batch_size": 4}

    results = _results(tmp_path, plans_fn, "3d_fullres_bs4")
    result = _import(str(results), "--name", "bs4")
    assert result.exit_code == 0, result.output  # was: internal error KeyError 'architecture'
    plans = json.loads((results / "plans.json").read_text())
    assert configuration_of(plans, "3d_fullres_bs4")["patch_size"] == [48, 48, 48]


def test_a_cascade_stage_is_refused_at_import(tmp_path, models_dir):
    def plans_fn(plans):
        plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}

    result = _import(str(_results(tmp_path, plans_fn, "3d_cascade_fullres")), "--name", "c")
    assert result.exit_code != 0 and "cascade" in result.output


def test_fold_all_is_not_ensembled_unless_asked(tmp_path, models_dir):
    # nnUNetPredictor.auto_detect_available_folds leaves fold_all out; -f defaults to 0..4
    result = _import(str(_results(tmp_path, folds=("0", "1", "all"))), "--name", "f")
    assert result.exit_code == 0, result.output
    assert "folds = [\n    \"0\",\n    \"1\",\n]" in (models_dir / "f" / "model.toml").read_text()


def test_a_reorienting_reader_is_refused(tmp_path, models_dir):
    def plans_fn(plans):
        plans["image_reader_writer"] = "NibabelIOWithReorient"

    result = _import(str(_results(tmp_path, plans_fn)), "--name", "r")
    assert result.exit_code != 0 and "NibabelIOWithReorient" in result.output


@pytest.mark.parametrize("labels", ["1=edema,2=non_enhancing_tumour",  # value 3: IndexError at predict
                                    "0=edema,1=edema,2=non_enhancing_tumour,3=enhancing_tumour",  # all tumour
                                    "1=edema,2=non_enhancing_tumour,3=enhancing_tumour,4=edema"])
def test_labels_must_name_each_output_value(labels, models_dir):
    result = _import(str(TINY), "--name", "l", "--labels", labels)
    assert result.exit_code != 0 and "each output value" in result.output, result.output


def test_channels_named_twice_are_a_clear_error(models_dir):
    result = _import(str(TINY), "--name", "c", "--channels", "0=flair,1=flair,2=t1gd,3=t2")
    assert result.exit_code != 0 and "internal error" not in result.output and "twice" in result.output


def test_the_ignore_label_has_no_output():
    from tumorseg.imported.nnunet import label_map, output_heads

    labels = {"background": 0, "edema": 1, "non_enhancing": 2, "enhancing": 3, "ignore": 4}
    assert output_heads({"labels": labels}) == 4  # nnU-Net's LabelManager.num_segmentation_heads
    assert label_map({"labels": labels}, "msd") == {1: 1, 2: 2, 3: 3}


# -- MONAI bundles ---------------------------------------------------------------------------

pytest.importorskip("monai")


def _spec(change):
    from test_imported_bundle import INFERENCE  # noqa: F401 - brats_mri_segmentation's layout

    from tumorseg.imported.monai_bundle import read_spec

    inference = copy.deepcopy(INFERENCE)
    change(inference)
    return read_spec(inference)


def _transforms(inference, key):
    return inference[key]["transforms"]


def test_preprocessing_under_another_key_is_refused():
    def change(inference):
        inference["test_transforms"] = inference.pop("preprocessing")
        inference["dataset"]["transform"] = "@test_transforms"
        _transforms(inference, "postprocessing")[1]["transform"] = "@test_transforms"

    with pytest.raises(ModelError, match="test_transforms"):  # was: run with no preprocessing at all
        _spec(change)


def test_sigmoid_outputs_without_asdiscreted_are_refused():
    def change(inference):  # the threshold in a Lambdad, which tumorseg skips: every voxel was enhancing
        _transforms(inference, "postprocessing")[2] = {"_target_": "Lambdad", "keys": "pred",
                                                       "func": "$lambda x: (x > 0.5).float()"}

    with pytest.raises(ModelError):
        _spec(change)


def test_a_disabled_transform_is_left_out_as_monai_does():
    def change(inference):
        next(t for t in _transforms(inference, "preprocessing") if t["_target_"] == "Spacingd")["_disabled_"] = True

    assert "Spacingd" not in [name for name, _ in _spec(change).preprocessing]


def test_the_bundles_own_class_is_not_replaced_by_monais():
    def change(inference):
        _transforms(inference, "preprocessing")[4]["_target_"] = "scripts.transforms.NormalizeIntensityd"

    with pytest.raises(ModelError, match="bundle's own class"):
        _spec(change)


def test_a_bundle_without_invertd_lands_on_the_input_grid(tmp_path, models_dir):
    """Orientationd to RAS on an LPS scan, no Invertd: the bundle saves RAS-ordered labels with the RAS
    affine; tumorseg painted that array on the LPS grid (left-right and front-back flipped)."""
    import nibabel as nib
    import torch
    from monai.networks.nets import SegResNet

    from test_imported_bundle import INFERENCE, make_bundle

    inference = copy.deepcopy(INFERENCE)
    inference["preprocessing"]["transforms"] = [t for t in inference["preprocessing"]["transforms"]
                                                if t["_target_"] != "Spacingd"]
    _transforms(inference, "postprocessing").pop(1)  # Invertd
    bundle = make_bundle(tmp_path, inference=inference)
    result = CliRunner().invoke(main, ["models", "import", "monai-bundle", str(bundle), "--name", "b",
                                       "--label-scheme", "brats2021"])
    assert result.exit_code == 0, result.output
    rng = np.random.default_rng(0)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS storage, as BraTS files
    data = rng.normal(100, 20, (4, 40, 44, 36)).astype(np.float32)
    data[:, 15:25, 10:30, 10:20] += 150  # something not symmetric
    files = []
    for c, seq in enumerate(("flair", "t1", "t1gd", "t2")):
        path = tmp_path / f"{seq}.nii.gz"
        nib.save(nib.Nifti1Image(data[c], affine), path)
        files += [f"--{seq}", str(path)]
    result = CliRunner().invoke(main, ["predict", *files, "--model", "b", "--pipeline", "as-trained",
                                       "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    ours = np.asarray(nib.load(tmp_path / "out" / "segmentation.nii.gz").dataobj)
    # The bundle's own computation: RAS is the LPS array flipped in i and j.
    network = SegResNet(blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=8, in_channels=4, out_channels=3,
                        dropout_prob=0.2)
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import NormalizeIntensity

    ras = np.ascontiguousarray(data[:, ::-1, ::-1])  # the RAS voxel order of the LPS array
    x = NormalizeIntensity(nonzero=True, channel_wise=True)(torch.from_numpy(ras.copy()))[None]
    with torch.inference_mode():
        # channel order of the bundle: T1c, T1, T2, FLAIR
        x = x[:, [2, 1, 3, 0]]
        p = torch.sigmoid(SlidingWindowInferer(roi_size=[64, 64, 64], sw_batch_size=1, overlap=0.5)(x, network.eval()))[0]
    p = (p >= 0.5).numpy()  # AsDiscreted's threshold
    theirs_ras = np.where(p[2], 4, np.where(p[0], 1, np.where(p[1], 2, 0)))
    theirs = theirs_ras[::-1, ::-1]
    assert np.mean(ours == theirs_ras) < 0.9  # this scan is not symmetric
    assert np.mean(ours == theirs) == 1.0
