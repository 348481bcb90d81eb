"""tumorseg validate: scores on whole data sets agree with MONAI's metrics on the same masks."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import ndimage
from scipy.spatial import cKDTree

from conftest import make_tiny_model, save_nifti, shared_data
from tumorseg.cli import main
from tumorseg.errors import SOME_CASES_FAILED, ConfigError
from tumorseg.labels import REGIONS, get_scheme
from tumorseg.scan import voxel_spacing


def monai_scores(pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[float, float]:
    """Dice and HD95 from MONAI (the independent implementation) for two non-empty masks."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    p = torch.from_numpy(pred[None, None].astype(np.float32))
    t = torch.from_numpy(truth[None, None].astype(np.float32))
    dice = float(compute_dice(p, t, include_background=True)[0, 0])
    hd95 = float(compute_hausdorff_distance(p, t, include_background=True, percentile=95, directed=False,
                                            spacing=[float(s) for s in spacing])[0, 0])
    return dice, hd95


def check_against_monai(document: dict, predictions: dict[str, Path], truths: dict[str, Path], truth_scheme: str,
                        prediction_scheme: str = "msd") -> int:
    """Compare every case's region Dice and HD95 with MONAI; return how many empty masks were met."""
    empties = 0
    pred_scheme, true_scheme = get_scheme(prediction_scheme), get_scheme(truth_scheme)
    for case in document["cases"]:
        assert case["status"] == "ok", case
        pred_img, truth_img = nib.load(predictions[case["case_id"]]), nib.load(truths[case["case_id"]])
        pred = np.rint(np.asarray(pred_img.dataobj)).astype(int)
        truth = np.rint(np.asarray(truth_img.dataobj)).astype(int)
        spacing = voxel_spacing(truth_img.affine)
        assert case["spacing_mm"] == pytest.approx(list(spacing), abs=1e-5)
        for region in REGIONS:
            p, t = pred_scheme.region_mask(pred, region), true_scheme.region_mask(truth, region)
            ours = case["scores"][region]
            if not p.any() or not t.any():
                empties += 1
                diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(truth.shape, spacing)))
                assert ours["dice"] == (1.0 if not p.any() and not t.any() else 0.0)
                assert ours["hd95_mm"] == pytest.approx(0.0 if not p.any() and not t.any() else diagonal)
                continue
            dice, hd95 = monai_scores(p, t, spacing)
            assert abs(ours["dice"] - dice) <= 1e-6, (case["case_id"], region)
            assert abs(ours["hd95_mm"] - hd95) <= 1e-3, (case["case_id"], region)
    return empties


def validate(*args: str):
    return CliRunner().invoke(main, ["validate", *args, "-q"], catch_exceptions=False)


def test_validate_synthetic_dataset_predicts_and_agrees_with_monai(tmp_path):
    pytest.importorskip("nilearn", reason="tumorseg synth needs nilearn (the test extra)")
    from tumorseg.synth import write_synth_dataset

    data = write_synth_dataset(tmp_path / "synth", 2, seed=21, version=2)  # MNI152 only: no need for Debian's mricron-data
    # A background bias keeps the random model's masks tumour-sized (and the test quick).
    model = make_tiny_model(tmp_path / "model", spacing=(3.0, 3.0, 3.0), background_bias=3.5)
    out = tmp_path / "report"
    result = validate("--dataset", str(data), "-o", str(out), "--model", str(model))
    assert result.exit_code == 0, result.output
    document = json.loads((out / "metrics.json").read_text())
    assert document["truth_scheme"] == "msd" and document["model"]["name"] == "tiny-test"
    ids = [c["case_id"] for c in document["cases"]]
    predictions = {i: out / "predictions" / "cases" / i / "segmentation.nii.gz" for i in ids}
    truths = {i: data / "labelsTr" / f"{i}.nii.gz" for i in ids}
    check_against_monai(document, predictions, truths, "msd")
    spacings = {tuple(c["spacing_mm"]) for c in document["cases"]}
    assert any(len(set(s)) > 1 for s in spacings), f"expected an anisotropic synthetic case, got {spacings}"
    # The CSV files hold the same numbers as the JSON.
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    first = document["cases"][0]
    row = next(r for r in rows if r["case_id"] == first["case_id"] and r["structure"] == "WT")
    assert float(row["dice"]) == first["scores"]["WT"]["dice"]
    with open(out / "summary.csv", newline="") as f:
        summary = {(r["structure"], r["metric"]): r for r in csv.DictReader(f)}
    assert float(summary[("WT", "dice")]["mean"]) == pytest.approx(np.mean([c["scores"]["WT"]["dice"] for c in document["cases"]]))
    html = (out / "report.html").read_text()
    assert all(i in html for i in ids) and html.count("data:image/png;base64,") >= len(ids) + 1
    # A rerun reuses the predictions.
    assert validate("--dataset", str(data), "-o", str(out), "--model", str(model)).exit_code == 0
    manifest = json.loads((out / "predictions" / "manifest.json").read_text())
    assert manifest["counts"]["reused"] == 2


def brats_predictions(folder: Path, brats: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Predictions in the MSD scheme made from each case's truth (eroded, shifted, a label
    dropped), named as nnU-Net names them, and one empty prediction."""
    folder.mkdir()
    predictions, truths = {}, {}
    cases = sorted(p for p in brats.iterdir() if p.is_dir())
    for n, case in enumerate(cases):
        truth_img = nib.load(case / "OTMultiClass.nii.gz")
        truth = np.rint(np.asarray(truth_img.dataobj)).astype(int)
        lut = np.array([0, 2, 1, 2, 3])  # BraTS 2015 -> MSD
        pred = lut[truth]
        if n == 0:
            pred[:] = 0  # an empty prediction: the conventions apply
        elif n == 1:
            pred = np.where(ndimage.binary_erosion(pred > 0, iterations=2), pred, 0)
        elif n == 2:
            pred = np.roll(pred, 3, axis=0)
            pred[pred == 3] = 2  # no enhancing tumour predicted
        else:
            pred = np.where(ndimage.binary_dilation(pred > 0, iterations=1) & (pred == 0), 1, pred)
        path = save_nifti(folder / f"{case.name}.nii.gz", pred.astype(np.uint8), truth_img.affine)
        predictions[case.name], truths[case.name] = path, case / "OTMultiClass.nii.gz"
    return predictions, truths


def test_validate_brats2015_with_other_tools_predictions(tmp_path):
    brats = shared_data("brats2015-dev")
    predictions, truths = brats_predictions(tmp_path / "nnunet", brats)
    out = tmp_path / "report"
    result = validate("--dataset", str(brats), "--truth-scheme", "brats2015", "--predictions", str(tmp_path / "nnunet"),
                      "-o", str(out), "--no-html")
    assert result.exit_code == 0, result.output
    document = json.loads((out / "metrics.json").read_text())
    assert document["truth_scheme"] == "brats2015" and document["model"] is None
    assert check_against_monai(document, predictions, truths, "brats2015") >= 3  # the empty case's regions
    assert not (out / "report.html").exists()
    # BraTS 2015 labels convert to MSD, so per-label scores exist too.
    assert {"edema", "non_enhancing_tumour", "enhancing_tumour"} <= set(document["structures"])
    empty = document["cases"][0]["scores"]["WT"]
    assert empty["dice"] == 0.0 and empty["volume_pred_ml"] == 0.0 and empty["relative_volume_diff"] == -1.0
    assert document["aggregate"]["WT"]["dice"]["worst"] == 0.0 and document["aggregate"]["WT"]["dice"]["n"] == 4


def test_validate_takes_the_scheme_tumorseg_recorded_beside_its_predictions(tmp_path):
    """Perfect predictions in the BraTS 2021 scheme, as a tumorseg predict folder per case with its
    report.json: scored in that scheme without being told (as MSD their TC would be wrong), and
    refused when the option says otherwise."""
    brats = shared_data("brats2015-dev")
    lut = np.array([0, 1, 2, 1, 4])  # BraTS 2015 -> 2021: necrosis and non-enhancing are one core
    for case in sorted(p for p in brats.iterdir() if p.is_dir()):
        truth = nib.load(case / "OTMultiClass.nii.gz")
        folder = tmp_path / "preds" / case.name
        folder.mkdir(parents=True)
        save_nifti(folder / "segmentation.nii.gz", lut[np.rint(np.asarray(truth.dataobj)).astype(int)].astype(np.uint8),
                   truth.affine)
        (folder / "report.json").write_text(json.dumps({"results": {"label_scheme": "brats2021"}}))
    out = tmp_path / "report"
    result = validate("--dataset", str(brats), "--truth-scheme", "brats2015", "--predictions", str(tmp_path / "preds"),
                      "-o", str(out), "--no-html")
    assert result.exit_code == 0, result.output
    document = json.loads((out / "metrics.json").read_text())
    assert document["prediction_scheme"] == "brats2021"
    assert all(c["scores"][r]["dice"] == 1.0 for c in document["cases"] for r in REGIONS)
    result = validate("--dataset", str(brats), "--truth-scheme", "brats2015", "--predictions", str(tmp_path / "preds"),
                      "-o", str(out), "--no-html", "--prediction-scheme", "msd")
    assert result.exit_code == ConfigError.exit_code and "record label scheme brats2021" in result.output


def test_validate_keeps_the_scores_of_a_case_whose_overlay_fails(tmp_path, monkeypatch):
    """A picture that cannot be drawn (no image beside the labels, another shape) costs the
    picture, not the case's scores."""
    import tumorseg.validate

    brats = shared_data("brats2015-dev")
    brats_predictions(tmp_path / "preds", brats)
    first = sorted(p.name for p in brats.iterdir() if p.is_dir())[0]
    draw = tumorseg.validate.background_image

    def failing(case, *args):
        if case.case_id == first:
            raise ValueError("image (240, 240, 150) is not on the label grid")
        return draw(case, *args)
    monkeypatch.setattr(tumorseg.validate, "background_image", failing)
    out = tmp_path / "report"
    result = validate("--dataset", str(brats), "--truth-scheme", "brats2015", "--predictions", str(tmp_path / "preds"),
                      "-o", str(out))
    assert result.exit_code == 0, result.output
    document = json.loads((out / "metrics.json").read_text())
    assert document["counts"] == {"ok": 4, "failed": 0}
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 3


def test_validate_refuses_a_truth_scheme_it_would_ignore(tmp_path):
    data = tmp_path / "decathlon"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "NCR", "2": "ED", "3": "ET"}, "training": []}))
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["validate", "--dataset", str(data), "--truth-scheme", "brats2023",
                                       "--predictions", str(tmp_path), "-o", str(out), "-q"])
    assert result.exit_code == ConfigError.exit_code, result.output
    assert "--truth-scheme brats2023" in result.output and "dataset.json" in result.output
    assert not out.exists()


def test_validate_records_cases_it_cannot_score(tmp_path):
    brats = shared_data("brats2015-dev")
    predictions, _ = brats_predictions(tmp_path / "preds", brats)
    name = sorted(predictions)[1]
    predictions[name].unlink()  # missing
    name2 = sorted(predictions)[2]
    img = nib.load(predictions[name2])
    save_nifti(predictions[name2], np.asarray(img.dataobj)[:, :, :100], img.affine)  # wrong grid
    out = tmp_path / "report"
    result = validate("--dataset", str(brats), "--truth-scheme", "brats2015", "--predictions", str(tmp_path / "preds"),
                      "-o", str(out))
    assert result.exit_code == SOME_CASES_FAILED
    cases = {c["case_id"]: c for c in json.loads((out / "metrics.json").read_text())["cases"]}
    assert cases[name]["status"] == "failed" and "no prediction" in cases[name]["error"]
    assert cases[name2]["status"] == "failed" and "not on the grid" in cases[name2]["error"]
    html = (out / "report.html").read_text()
    assert "no prediction" in html
    # A rerun without HTML must not leave the earlier report.html beside its metrics.
    predictions[name2].unlink()
    result = validate("--dataset", str(brats), "--truth-scheme", "brats2015", "--predictions", str(tmp_path / "preds"),
                      "-o", str(out), "--no-html")
    assert result.exit_code == SOME_CASES_FAILED and not (out / "report.html").exists()


def test_validate_never_scores_a_prediction_left_by_an_earlier_run(tmp_path):
    import shutil

    brats = shared_data("brats2015-dev")
    data = tmp_path / "data"
    for case in sorted(p for p in brats.iterdir() if p.is_dir())[:2]:
        shutil.copytree(case, data / case.name)
    model = make_tiny_model(tmp_path / "model", sequences=("flair", "t1gd"), spacing=(3.0, 3.0, 3.0),
                            background_bias=3.5)
    out = tmp_path / "report"
    args = ["--dataset", str(data), "--truth-scheme", "brats2015", "-o", str(out), "--model", str(model), "--no-html"]
    assert validate(*args).exit_code == 0
    broken = sorted(data.iterdir())[0]
    image = nib.load(broken / "T1c_subtrMeanDivStd.nii.gz")
    array = np.asarray(image.dataobj).copy()
    array[100, 100, 70] = np.nan
    save_nifti(broken / "T1c_subtrMeanDivStd.nii.gz", array, image.affine)
    assert validate(*args).exit_code == SOME_CASES_FAILED
    cases = {c["case_id"]: c for c in json.loads((out / "metrics.json").read_text())["cases"]}
    assert cases[broken.name]["status"] == "failed" and "prediction failed" in cases[broken.name]["error"]
    assert cases[sorted(data.iterdir())[1].name]["status"] == "ok"


def test_volumes_on_a_sheared_grid_match_the_report():
    # Spacing 1 x 1.25 x 1 mm but 1 mm^3 per voxel (shear): validate must give predict's volume.
    from tumorseg.evaluate import LabelFile
    from tumorseg.scan import LabelMap, SourceGeometry
    from tumorseg.stages.report import summarize
    from tumorseg.validate import score_case
    affine = np.eye(4)
    affine[0, 1] = 0.75
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:7, 2:7, 2:6] = 1  # 100 voxels
    pred = np.zeros_like(truth)
    pred[2:7, 2:7, 2:8] = 1  # 150 voxels
    msd = get_scheme("msd")
    scored = score_case("c", LabelFile(pred, affine), msd, LabelFile(truth, affine), msd, Path("t.nii.gz"), 2.0)
    wt = scored.scores["WT"]
    report_ml = summarize(LabelMap(pred, affine, msd, SourceGeometry(pred.shape, affine)))["regions"]["WT"]["volume_ml"]
    assert wt["volume_pred_ml"] == pytest.approx(report_ml) == pytest.approx(0.150)
    assert wt["volume_truth_ml"] == pytest.approx(0.100)
    assert wt["dice"] == pytest.approx(2 * 100 / 250)


def test_a_decathlon_set_whose_labels_are_named_in_another_scheme_is_not_scored_as_msd(tmp_path):
    """dataset.json declaring 1 NCR, 2 ED, 3 ET (BraTS 2023 order) was scored as Task01 (1 = edema):
    a perfect prediction got TC Dice 0.32, silently."""
    data = tmp_path / "dec"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    preds = tmp_path / "preds"
    preds.mkdir()
    rng = np.random.default_rng(0)
    lab = np.zeros((24, 24, 24), np.uint8)
    lab[4:20, 4:20, 4:20] = 2
    lab[7:17, 7:17, 7:17] = 3
    lab[10:14, 10:14, 10:14] = 1
    nib.save(nib.Nifti1Image(rng.normal(size=(24, 24, 24, 4)).astype(np.float32), np.eye(4)),
             data / "imagesTr" / "c1.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), data / "labelsTr" / "c1.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), preds / "c1.nii.gz")
    (data / "dataset.json").write_text(json.dumps({
        "modality": {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "NCR", "2": "ED", "3": "ET"},
        "training": [{"image": "./imagesTr/c1.nii.gz", "label": "./labelsTr/c1.nii.gz"}]}))
    result = CliRunner().invoke(main, ["validate", "--dataset", str(data), "--predictions", str(preds),
                                       "--prediction-scheme", "brats2023", "-o", str(tmp_path / "out"), "-q",
                                       "--no-html"])
    assert result.exit_code == ConfigError.exit_code, result.output
    assert "NCR" in result.output


def test_the_overlay_is_not_drawn_on_an_image_of_another_grid(tmp_path):
    """docs/validation.md: an overlay whose image is 'on another grid' is left out. An image of the
    same shape but another affine (left-right flipped voxel order) was drawn anyway, the contours
    on the wrong hemisphere."""
    src = shared_data("brats2018-train") / "Brats18_2013_11_1" / "Brats18_2013_11_1"
    case = tmp_path / "data" / "caseA"
    case.mkdir(parents=True)
    seg, flair = nib.load(f"{src}_seg.nii.gz"), nib.load(f"{src}_flair.nii.gz")
    nib.save(seg, case / "caseA_seg.nii.gz")
    flipped = np.asarray(flair.dataobj)[::-1].copy()
    affine = flair.affine.copy()
    affine[:3, 0] *= -1
    affine[:3, 3] = flair.affine[:3, :3] @ [flipped.shape[0] - 1, 0, 0] + flair.affine[:3, 3]
    nib.save(nib.Nifti1Image(flipped, affine), case / "caseA_flair.nii.gz")
    preds = tmp_path / "preds"
    preds.mkdir()
    nib.save(seg, preds / "caseA.nii.gz")
    out = tmp_path / "out"
    result = validate("--dataset", str(tmp_path / "data"), "--predictions", str(preds), "--prediction-scheme", "brats2021",
                  "--truth-scheme", "brats2021", "-o", str(out))
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    assert 'alt="overlay caseA"' not in html
    assert "No overlay image was made for this case." in html


def test_a_case_folder_with_two_label_files_is_not_dropped_silently(tmp_path):
    """A case folder holding the ground truth and a second label-like file (tumorseg predict's
    segmentation.nii.gz written beside the scans) vanished from the report: exit 0, n one smaller."""
    import shutil

    brats = shared_data("brats2015-dev")
    data = tmp_path / "data"
    preds = tmp_path / "preds"
    preds.mkdir()
    for case in sorted(p for p in brats.iterdir() if p.is_dir())[:2]:
        shutil.copytree(case, data / case.name)
        shutil.copy(case / "OTMultiClass.nii.gz", preds / f"{case.name}.nii.gz")
    first = sorted(data.iterdir())[0]
    shutil.copy(first / "OTMultiClass.nii.gz", first / "segmentation.nii.gz")
    out = tmp_path / "out"
    result = validate("--dataset", str(data), "--truth-scheme", "brats2015", "--predictions", str(preds),
                  "--prediction-scheme", "brats2015", "-o", str(out), "--no-html")
    assert result.exit_code == SOME_CASES_FAILED, result.output
    cases = {c["case_id"]: c for c in json.loads((out / "metrics.json").read_text())["cases"]}
    assert cases[first.name]["status"] == "failed" and "label files" in cases[first.name]["error"]


def test_surface_distances_on_a_sheared_grid_are_world_distances():
    """Volumes honour a sheared affine (|det|); HD95 and NSD used the column norms as if the axes were
    orthogonal: 5.48 mm against 6.93 mm measured in world coordinates."""
    from tumorseg.evaluate import LabelFile
    from tumorseg.labels import get_scheme
    from tumorseg.validate import score_case

    affine = np.eye(4)
    affine[0, 1] = 0.75
    truth = np.zeros((30, 30, 12), np.uint8)
    truth[8:16, 8:16, 3:9] = 1
    pred = np.zeros_like(truth)
    pred[11:20, 11:20, 3:9] = 1
    msd = get_scheme("msd")
    wt = score_case("c", LabelFile(pred, affine), msd, LabelFile(truth, affine), msd, Path("t.nii.gz"), 2.0).scores["WT"]

    def world_surface(m):
        s = m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1), border_value=0)
        return np.argwhere(s).astype(float) @ affine[:3, :3].T

    wp, wt_ = world_surface(pred > 0), world_surface(truth > 0)
    d_pt, d_tp = cKDTree(wt_).query(wp)[0], cKDTree(wp).query(wt_)[0]
    assert wt["hd95_mm"] == pytest.approx(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)), abs=1e-6)
    assert wt["nsd"] == pytest.approx((np.sum(d_pt <= 2) + np.sum(d_tp <= 2)) / (d_pt.size + d_tp.size))


def test_the_grid_mismatch_error_says_what_differs():
    """Same shapes, origins 2 mm apart: the error read 'prediction (shape (8, 8, 8)) is not on the
    grid of its ground truth (shape (8, 8, 8))' and named only the truth file."""
    from tumorseg.errors import GeometryError
    from tumorseg.evaluate import LabelFile
    from tumorseg.labels import get_scheme
    from tumorseg.validate import score_case

    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    labels = np.zeros((8, 8, 8), np.uint8)
    msd = get_scheme("msd")
    with pytest.raises(GeometryError) as error:
        score_case("c", LabelFile(labels, shifted), msd, LabelFile(labels, np.eye(4)), msd, Path("t.nii.gz"), 2.0,
                   Path("p.nii.gz"))
    assert "affine" in str(error.value) and "2" in str(error.value) and "p.nii.gz" in str(error.value)


@pytest.mark.parametrize("args", [["--model", "nope"], ["--overlap", "0.7"], ["--pipeline", "missing.toml"],
                                  ["--workers", "2"], ["--force"]])
def test_pipeline_options_with_predictions_are_refused_not_ignored(tmp_path, args):
    """With --predictions nothing is predicted: --model nope and a missing --pipeline file gave exit 0."""
    (tmp_path / "preds").mkdir()
    result = validate("--dataset", str(tmp_path), "--predictions", str(tmp_path / "preds"), "-o",
                      str(tmp_path / "out"), *args)
    assert result.exit_code == 2 and "with --predictions nothing is predicted" in result.output, result.output


def test_prediction_scheme_without_predictions_is_refused(tmp_path):
    result = validate("--dataset", str(tmp_path), "--prediction-scheme", "msd", "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and "--prediction-scheme is for --predictions" in result.output, result.output
