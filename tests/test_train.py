"""Training: data set discovery, label conversion, and exact resumption after a kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import brain_phantom, save_nifti, shared_data
from tumorseg.errors import ConfigError
from tumorseg.model import load_model
from tumorseg.datasets import discover_cases
from tumorseg.train import PreparedCase, TrainConfig, prepare_case, region_dice, split_cases


def make_folder_dataset(root: Path, cases: int = 3) -> Path:
    """BraTS-2023-named case folders: a bright 'tumour' with core (1), edema (2), rim (3)."""
    for n in range(cases):
        folder = root / f"case{n}"
        folder.mkdir(parents=True)
        shape = (36, 40, 32)
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
        r = np.linalg.norm(grid - np.array([15 + n, 20, 14]), axis=-1)
        labels = np.select([r < 3, r < 5, r < 8], [1, 3, 2], 0).astype(np.uint8)
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])
        for seq, gain in (("t2f", 3.0), ("t1c", 2.0)):
            image = brain_phantom(shape, seed=n + 10 * len(seq))
            image[labels > 0] *= gain
            save_nifti(folder / f"case{n}-{seq}.nii.gz", image, affine)
        save_nifti(folder / f"case{n}-seg.nii.gz", labels, affine)
    return root


def test_discover_folder_dataset_needs_label_scheme(tmp_path):
    root = make_folder_dataset(tmp_path / "ds")
    with pytest.raises(ConfigError, match="--label-scheme"):
        discover_cases(root, None)
    cases = discover_cases(root, "brats2023")
    assert [c.case_id for c in cases] == ["case0", "case1", "case2"]
    assert cases[0].inputs.sequences == ("flair", "t1gd")


def test_label_scheme_once_for_all_data_sets_or_once_each():
    from tumorseg.train import dataset_schemes

    two = [Path("brats2018"), Path("brats2015")]
    assert dataset_schemes(two, ()) == [None, None]  # Decathlon data sets declare theirs
    assert dataset_schemes(two, ("brats2021",)) == ["brats2021", "brats2021"]
    assert dataset_schemes(two, ("brats2021", "brats2015")) == ["brats2021", "brats2015"]
    with pytest.raises(ConfigError, match="3 label schemes for 2 data sets"):
        dataset_schemes(two, ("msd", "brats2021", "brats2015"))


def test_each_data_set_read_with_its_own_label_scheme(tmp_path):
    """BraTS 2015 label 3 is non-enhancing core, BraTS 2023 label 3 enhancing: two folders trained
    together must each be read with their own scheme, and a wrong count is refused before any work."""
    a, b = make_folder_dataset(tmp_path / "a", cases=2), make_folder_dataset(tmp_path / "b", cases=2)
    result = subprocess.run([sys.executable, "-m", "tumorseg.cli", "train", "--dataset", str(a), "--dataset", str(b),
                             "-o", str(tmp_path / "m"), "--label-scheme", "brats2023", "--label-scheme", "brats2015",
                             "--label-scheme", "msd", "-q"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 6 and "3 label schemes for 2 data sets" in result.stderr
    assert not (tmp_path / "m" / "checkpoint.pt").exists()
    from tumorseg.train import dataset_schemes
    cases = [discover_cases(d, s) for d, s in zip((a, b), dataset_schemes([a, b], ("brats2023", "brats2015")))]
    assert [c[0].scheme.name for c in cases] == ["brats2023", "brats2015"]


def test_discovery_skips_masks_and_refuses_two_files_for_a_sequence(tmp_path):
    from tumorseg.errors import SequenceError

    root = make_folder_dataset(tmp_path / "ds", cases=1)
    case = root / "case0"
    (case / "case0-flair_mask.nii.gz").write_bytes((case / "case0-seg.nii.gz").read_bytes())
    (case / "brainmask.nii.gz").write_bytes((case / "case0-seg.nii.gz").read_bytes())
    (case / "._case0-t1c.nii.gz").write_bytes(b"macOS resource fork")  # hidden: never a sequence
    assert dict(discover_cases(root, "brats2023")[0].inputs.files)["flair"].name == "case0-t2f.nii.gz"
    (case / "case0_flair.nii.gz").write_bytes((case / "case0-t2f.nii.gz").read_bytes())
    with pytest.raises(SequenceError, match="two files for flair"):
        discover_cases(root, "brats2023")


def test_discovery_reads_every_image_format_predict_reads(tmp_path):
    """A case in MetaImage (.mhd + .raw) with NRRD-header (.nhdr) labels, as ITK tools write them."""
    import SimpleITK as sitk

    root = make_folder_dataset(tmp_path / "ds", cases=1)
    case = root / "case0"
    for name, new in (("case0-t2f.nii.gz", "case0-t2f.mhd"), ("case0-seg.nii.gz", "case0-seg.nhdr")):
        sitk.WriteImage(sitk.ReadImage(str(case / name)), str(case / new))
        (case / name).unlink()
    found = discover_cases(root, "brats2023")[0]
    assert dict(found.inputs.files)["flair"].name == "case0-t2f.mhd"
    assert found.label_path.name == "case0-seg.nhdr"


def test_scoring_does_not_load_the_training_stack():
    code = "import sys, tumorseg.validate; print('torch' in sys.modules, 'monai' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_prepare_case_converts_labels_to_model_classes(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", cases=1)
    case = discover_cases(root, "brats2023")[0]
    cfg = TrainConfig(patch_size=(32, 32, 32), filters=(4, 8, 16), strides=(1, 2, 2))
    prepared = prepare_case(case, cfg.card())
    assert prepared.present == [0, 2]  # flair and t1gd in (flair, t1, t1gd, t2)
    assert not prepared.image[1].any() and not prepared.image[3].any()
    # BraTS 2023 (1 NCR, 2 ED, 3 ET) -> MSD classes (1 edema, 2 core, 3 enhancing)
    import nibabel as nib
    truth = np.asarray(nib.load(str(case.label_path)).dataobj)
    counts = {v: int((truth == v).sum()) for v in (1, 2, 3)}
    assert int((prepared.labels == 2).sum()) == counts[1]
    assert int((prepared.labels == 1).sum()) == counts[2]
    assert int((prepared.labels == 3).sum()) == counts[3]


def test_validation_cases_get_the_sequences_predict_would_give_the_network(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", cases=1)
    case = discover_cases(root, "brats2023")[0]
    cfg = TrainConfig(patch_size=(32, 32, 32), filters=(4, 8, 16), strides=(1, 2, 2), preferred_sets=(("flair",),))
    training = prepare_case(case, cfg.card())
    validation = prepare_case(case, cfg.card(), as_predict=True)
    assert training.present == [0, 2] and validation.present == [0]
    assert not validation.image[2].any()
    np.testing.assert_array_equal(validation.labels, training.labels)


def test_split_leaves_a_case_to_train_on():
    cases = [f"case{n}" for n in range(2)]
    train, val = split_cases(cases, 0.75, seed=3)  # round(1.5) would take both
    assert len(train) == 1 and len(val) == 1


@pytest.mark.parametrize("text, message", [
    ("{not json", "JSONDecodeError"),
    (json.dumps({"channel_names": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},  # nnU-Net v2 style
                 "labels": {"background": 0, "edema": 1, "core": 2, "enhancing": 3}}), "background"),
    (json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                 "labels": {"0": "b", "1": "e", "2": "n", "3": "t"}, "training": [{"image": "./imagesTr/a.nii.gz"}]}),
     "KeyError: 'label'"),
    (json.dumps({"modality": {"0": "ADC"}, "labels": {}}), "ADC"),
])
def test_a_dataset_json_that_cannot_be_read_is_named(tmp_path, text, message):
    (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(ConfigError, match=message) as refused:
        discover_cases(tmp_path, None)
    assert Path(refused.value.path) == tmp_path / "dataset.json"


@pytest.mark.parametrize("settings, message", [
    ({"spacing_mm": (1.0, 1.0)}, "three values"), ({"patch_size": (32, 32)}, "three values"), ({"seed": -1}, "seed")])
def test_malformed_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_two_level_network_is_refused_before_training(tmp_path):
    """MONAI's DynUNet needs three levels; --filters 4,8 ended as an internal error after the cases
    were prepared."""
    result = subprocess.run(_train_cmd(make_folder_dataset(tmp_path / "ds", cases=1), tmp_path / "m", "--filters", "4,8"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 6 and "at least 3" in result.stderr and "internal error" not in result.stderr


def test_one_patient_in_two_data_sets_is_never_trained_on_and_validated():
    """brats2018-train's Brats18_2013_20_1 is brats2015-dev's pat0006: each data set is split on its
    own, so with the default seed one copy trained and the other scored the model."""
    import dataclasses

    from tumorseg.train import _split_datasets

    datasets = [shared_data("brats2018-train"), shared_data("brats2015-dev")]
    twins = {"Brats18_2013_20_1", "brats_2013_pat0006_1"}
    left_out = 0
    for seed in range(4):
        config = dataclasses.replace(TrainConfig(), validation_fraction=0.25, seed=seed)
        groups, validation, split = _split_datasets(datasets, ("brats2021", "brats2015"), config, ())
        trained = {c.case_id for group in groups for c in group}
        validated = {c.case_id for c in validation}
        assert not (twins & trained and twins & validated), seed
        assert set(split.get("left_out_of_validation", [])) <= twins - trained
        left_out += len(split.get("left_out_of_validation", []))
    assert left_out  # seeds 0 and 2 split the twins


def test_validation_scores_every_case_when_ids_repeat_across_data_sets():
    import torch

    from tumorseg.labels import get_scheme
    from tumorseg.train import score_validation_cases

    class Background(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros((x.shape[0], 4) + tuple(x.shape[2:]))
            out[:, 0] = 1.0
            return out

    tumour = np.zeros((16, 16, 16), np.uint8)
    tumour[4:10, 4:10, 4:10] = 1
    cases = [PreparedCase("synth_0000", np.zeros((1, 16, 16, 16), np.float32), labels, [0], np.zeros((0, 3)))
             for labels in (tumour, np.zeros_like(tumour))]

    class Card:
        scheme = get_scheme("msd")
        input = type("Input", (), {"patch_size": (16, 16, 16)})()

    scores = score_validation_cases(Background(), cases, Card(), torch.device("cpu"))
    assert sorted(scores["cases"]) == ["synth_0000", "synth_0000-2"]
    assert scores["mean"]["WT"] == pytest.approx(0.5)  # 0 on the tumour, 1 on the empty case


def test_region_dice_counts_empty_as_perfect():
    from tumorseg.labels import get_scheme

    truth = np.zeros((4, 4, 4), np.uint8)
    truth[1, 1, 1] = 3
    pred = truth.copy()
    pred[2, 2, 2] = 1
    dice = region_dice(pred, truth, get_scheme("msd"))
    assert dice["ET"] == 1.0 and dice["TC"] == 1.0
    assert dice["WT"] == pytest.approx(2 / 3)


def _train_cmd(dataset: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tumorseg.cli", "train", "--dataset", str(dataset), "-o", str(output),
            "--label-scheme", "brats2023", "--epochs", "3", "--iterations", "8", "--patch-size", "32,32,32",
            "--filters", "4,8,16", "--validation-fraction", "0.34", "--seed", "3", "-q", *extra]


@pytest.mark.slow
def test_killed_and_resumed_training_matches_uninterrupted(tmp_path):
    dataset = make_folder_dataset(tmp_path / "ds")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(dataset, straight), check=True, env=env, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(dataset, killed), env=env)
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 2
    assert proc.poll() is None, "training ended before it could be killed mid-epoch"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.toml").exists()
    subprocess.run(_train_cmd(dataset, killed, "--resume"), check=True, env=env, timeout=600)

    a = json.loads((straight / "training.json").read_text())
    b = json.loads((killed / "training.json").read_text())
    assert a["history"][-1]["validation_dice"] == b["history"][-1]["validation_dice"]
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert load_model(str(straight)).sha256 == load_model(str(killed)).sha256
    assert a["split"]["validation"] == ["case1"] or len(a["split"]["validation"]) == 1


def _quick_model(tmp_path: Path, name: str, iterations: int = 1) -> list[str]:
    """Train a one-epoch model on two cases into tmp_path/name; returns its command."""
    cmd = _train_cmd(make_folder_dataset(tmp_path / "ds", cases=2), tmp_path / name)
    cmd[cmd.index("--epochs") + 1] = "1"
    cmd[cmd.index("--iterations") + 1] = str(iterations)
    subprocess.run(cmd, check=True, timeout=300)
    return cmd


def _with_output(cmd: list[str], old: Path, new: Path) -> list[str]:
    return [str(new) if c == str(old) else c for c in cmd]


def test_resume_refuses_other_settings(tmp_path):
    cmd = _quick_model(tmp_path, "m")
    other = [*cmd, "--resume"]
    other[other.index("--seed") + 1] = "4"
    result = subprocess.run(other, capture_output=True, text=True, timeout=300)
    assert result.returncode == ConfigError.exit_code
    assert "other training settings" in result.stderr and "(seed differ" in result.stderr


def test_resume_refuses_other_cases_and_unknown_exclusions(tmp_path):
    cmd = _quick_model(tmp_path, "m")
    dataset = tmp_path / "ds"
    # A case added before resuming would move cases between training and validation.
    added = dataset / "case2"
    added.mkdir()
    for f in (dataset / "case1").iterdir():
        (added / f.name.replace("case1", "case2")).write_bytes(f.read_bytes())
    result = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == ConfigError.exit_code, result.stderr
    assert "other cases" in result.stderr
    # An --exclude that matches no case (a typo: ids are case-sensitive) is refused, not recorded.
    result = subprocess.run([*_with_output(cmd, tmp_path / "m", tmp_path / "x"), "--exclude", "Case0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == ConfigError.exit_code and "--exclude Case0: no such case" in result.stderr
    assert not (tmp_path / "x" / "model.toml").exists()


def _state(model_dir: Path) -> dict:
    return {k: v.clone() for k, v in load_model(str(model_dir)).network.state_dict().items()}


def test_bf16_training_computes_in_bf16_is_recorded_and_resumes_only_in_bf16(tmp_path, monkeypatch):
    """--precision bf16: the network computes in bf16 (the loss in fp32), the card records it, a
    resume in another precision is refused, and fp16 is refused on the CPU before any work."""
    import torch
    from click.testing import CliRunner

    from tumorseg import train as train_module
    from tumorseg.cli import main

    seen: set = set()
    build = train_module.build_network

    def recording(card):
        network = build(card)
        network.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype) if module.training else None)
        return network

    monkeypatch.setattr(train_module, "build_network", recording)
    cmd = _train_cmd(make_folder_dataset(tmp_path / "ds", cases=2), tmp_path / "m", "--precision", "bf16",
                     "--device", "cpu")
    cmd[cmd.index("--epochs") + 1] = "1"
    cmd[cmd.index("--iterations") + 1] = "2"
    args = cmd[cmd.index("train"):]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert seen == {torch.bfloat16}
    model = load_model(str(tmp_path / "m"))
    assert model.card.training["config"]["precision"] == "bf16"
    other = [*args, "--resume"]
    other[other.index("--precision") + 1] = "fp32"
    (tmp_path / "m" / "model.toml").unlink()  # a killed run: only its checkpoint is left
    result = CliRunner().invoke(main, other)
    assert result.exit_code == ConfigError.exit_code and "(precision differ" in result.output
    fp16 = [a if a != "bf16" else "fp16" for a in _with_output(args, tmp_path / "m", tmp_path / "h")]
    result = CliRunner().invoke(main, fp16)
    assert result.exit_code == ConfigError.exit_code and "fp16 is for CUDA GPUs" in result.output
    assert not (tmp_path / "h").exists()


def test_init_fine_tunes_from_a_model_and_records_it(tmp_path):
    import torch

    base = tmp_path / "base"
    cmd = _quick_model(tmp_path, "base", iterations=2)
    base_sha = load_model(str(base)).sha256

    # With a zero learning rate, fine-tuning must leave the initial weights exactly as they were:
    # proof that training started from the base model and not from the seed's random weights.
    frozen = _with_output(cmd, base, tmp_path / "frozen") + ["--init", str(base), "--lr", "0"]
    subprocess.run(frozen, check=True, timeout=300)
    a, b = _state(base), _state(tmp_path / "frozen")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    tuned = tmp_path / "tuned"
    subprocess.run(_with_output(cmd, base, tuned) + ["--init", str(base)], check=True, timeout=300)
    card = load_model(str(tuned)).card
    assert card.training["initialised_from"]["weights_sha256"] == base_sha
    assert card.training["initialised_from"]["command"].startswith("tumorseg train")
    assert card.training["config"]["init_weights_sha256"] == base_sha
    b = _state(tuned)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_init_refuses_a_model_of_another_size(tmp_path):
    base = tmp_path / "base"
    cmd = _quick_model(tmp_path, "base")
    other = _with_output(cmd, base, tmp_path / "other") + ["--init", str(base)]
    other[other.index("--filters") + 1] = "8,16,32"
    result = subprocess.run(other, capture_output=True, text=True, timeout=300)
    assert result.returncode == ConfigError.exit_code
    assert "does not match" in result.stderr and "architecture" in result.stderr
    assert not (tmp_path / "other" / "model.toml").exists()


def test_brats2015_folder_discovered():
    root = shared_data("brats2015-dev")
    cases = discover_cases(root, "brats2015")
    assert len(cases) == 4
    assert all(c.label_path.name == "OTMultiClass.nii.gz" for c in cases)
    assert all(c.inputs.sequences == ("flair", "t1gd") for c in cases)


def _prepared(case_id: str) -> PreparedCase:
    image = np.zeros((4, 8, 8, 8), np.float32)
    return PreparedCase(case_id, image + len(case_id), np.zeros((8, 8, 8), np.uint8), [0, 1, 2, 3], np.zeros((0, 3), int))


def test_dataset_weights_set_each_data_set_share():
    from tumorseg.augment import AugmentConfig
    from tumorseg.train import sample_batch

    groups = [[_prepared("a")], [_prepared("bb")]]  # told apart by their intensity
    off = AugmentConfig(flip=0, rotate_scale=0, intensity=0, gamma=0, noise=0, blur=0, sequence_dropout=0,
                        low_resolution=0)
    cfg = TrainConfig(patch_size=(8, 8, 8), filters=(4, 8, 16), strides=(1, 2, 2), batch_size=1, augment=off,
                      dataset_weights=(1.0, 3.0))
    firsts = [float(sample_batch(groups, cfg, np.random.default_rng(s))[0].max()) for s in range(400)]
    assert 0.68 < firsts.count(2.0) / len(firsts) < 0.82
    for bad in ((1.0, 0.0), (1.0, float("nan")), (float("inf"),)):
        with pytest.raises(ValueError, match="dataset weights"):
            TrainConfig(dataset_weights=bad)


def test_settings_without_the_new_options_match_earlier_checkpoints():
    """Options added later are left out of the saved settings when unused, so --resume still
    accepts a checkpoint written before they existed."""
    from tumorseg.configio import to_dict

    saved = to_dict(TrainConfig())
    assert "preferred_sets" not in saved and "dataset_weights" not in saved
    assert "preferred_set" not in saved["augment"] and "bias_field" not in saved["augment"]
    assert "motion" not in saved["augment"] and "precision" not in saved
    assert "subset_normalisation" not in saved["augment"]


def test_preferred_set_trained_is_the_one_predict_would_choose():
    from tumorseg.augment import AugmentConfig
    from tumorseg.train import sample_batch

    off = AugmentConfig(flip=0, rotate_scale=0, intensity=0, gamma=0, noise=0, blur=0, sequence_dropout=0,
                        low_resolution=0, preferred_set=1.0)
    cfg = TrainConfig(patch_size=(8, 8, 8), filters=(4, 8, 16), strides=(1, 2, 2), batch_size=1, augment=off,
                      preferred_sets=(("flair", "t1gd", "t2"), ("flair", "t1gd")))
    groups = [[_prepared("a")]]  # all four sequences
    # The first set the case holds is what inference would give the network: FLAIR, T1gd and T2
    # (channels 0, 2, 3), even though FLAIR and T1gd alone are also held.
    for seed in range(10):
        image = sample_batch(groups, cfg, np.random.default_rng(seed))[0][0]
        assert tuple(c for c in range(4) if image[c].abs().sum() > 0) == (0, 2, 3)


def test_preferred_set_written_into_the_card(tmp_path):
    cmd = _train_cmd(make_folder_dataset(tmp_path / "ds", cases=2), tmp_path / "m",
                     "--preferred-set", "t2f,t1c", "--dataset-weights", "1")
    cmd[cmd.index("--epochs") + 1] = "1"
    cmd[cmd.index("--iterations") + 1] = "1"
    subprocess.run(cmd, check=True, timeout=300)
    card = load_model(str(tmp_path / "m")).card
    assert card.input.preferred_sets == (("flair", "t1gd"),)
    assert card.training["config"]["augment"]["preferred_set"] == 0.25
    bad = _with_output(cmd, tmp_path / "m", tmp_path / "bad")
    bad[bad.index("--dataset-weights") + 1] = "1,1"
    result = subprocess.run(bad, capture_output=True, text=True, timeout=300)
    assert result.returncode == ConfigError.exit_code and "2 dataset weights for 1 data sets" in result.stderr


@pytest.mark.slow
def test_workers_draw_the_same_batches_as_the_main_process(tmp_path):
    dataset = make_folder_dataset(tmp_path / "ds")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for workers in ("0", "2"):
        cmd = _train_cmd(dataset, tmp_path / f"w{workers}", "--workers", workers)
        cmd[cmd.index("--epochs") + 1] = "2"
        subprocess.run(cmd, check=True, env=env, timeout=600)
    a = json.loads((tmp_path / "w0" / "training.json").read_text())
    b = json.loads((tmp_path / "w2" / "training.json").read_text())
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["history"][-1]["validation_dice"] == b["history"][-1]["validation_dice"]
    assert load_model(str(tmp_path / "w0")).sha256 == load_model(str(tmp_path / "w2")).sha256


def test_a_bad_case_in_a_worker_is_reported_as_an_input_error(tmp_path):
    dataset = make_folder_dataset(tmp_path / "ds", cases=2)
    broken = dataset / "case1" / "case1-t1c.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    result = subprocess.run(_train_cmd(dataset, tmp_path / "m", "--workers", "2"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 3, result.stderr
    assert str(broken) in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m" / "model.toml").exists()


def _case_with_dark_flair(root: Path) -> Path:
    """One case whose FLAIR covers only part of the brain that the T1 shows (Brats18_2013_20_1's
    FLAIR ends 38 mm short of its brain: 66 % of the region the four sequences cover) and holds
    exact zeros inside it."""
    folder = root / "dark"
    folder.mkdir(parents=True)
    shape = (18, 18, 18)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    r = np.linalg.norm(grid - 8.5, axis=-1)
    brain = r < 8
    t1 = np.where(brain, 100 + 3 * grid[..., 0] + np.random.default_rng(1).normal(0, 5, shape), 0)
    flair = np.where(brain & (grid[..., 1] > 3), 80 + 5 * grid[..., 2] + np.random.default_rng(2).normal(0, 5, shape), 0)
    flair[(r < 4) & (grid[..., 0] > 8)] = 0
    labels = ((r < 3) * 2).astype(np.uint8)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    save_nifti(folder / "dark-t2f.nii.gz", flair.astype(np.float32), affine)
    save_nifti(folder / "dark-t1n.nii.gz", t1.astype(np.float32), affine)
    save_nifti(folder / "dark-seg.nii.gz", labels, affine)
    return root


def test_sequence_dropout_normalises_the_kept_sequence_as_predict_given_only_it(tmp_path):
    """Training on FLAIR alone (sequence dropout) must show the network what predict shows it when
    given the FLAIR file alone: z-scores inside the FLAIR's own brain region, not inside the region
    of FLAIR and T1 together (where the T1-only voxels gave the FLAIR dark z-scores and moved its
    percentiles, mean and sd)."""
    from tumorseg.augment import AugmentConfig
    from tumorseg.runner import model_input
    from tumorseg.sequences import StudyInputs
    from tumorseg.stages import read
    from tumorseg.train import sample_batch

    case = discover_cases(_case_with_dark_flair(tmp_path / "ds"), "brats2023")[0]
    off = AugmentConfig(flip=0, rotate_scale=0, intensity=0, gamma=0, noise=0, blur=0, low_resolution=0,
                        sequence_dropout=1.0, subset_normalisation=True)
    # A patch 4x the model grid holds all of it wherever it is centred: the values can be compared.
    cfg = TrainConfig(patch_size=(80, 80, 80), filters=(4, 8, 16), strides=(1, 2, 2), batch_size=1, augment=off)
    card = cfg.card()
    prepared = prepare_case(case, card, subset_normalisation=True)
    alone = {s: model_input(read.read_study(StudyInputs(files=((s, p),))), card)[0]
             for s, p in case.inputs.files}
    seen = set()
    for seed in range(8):
        image = sample_batch([[prepared]], cfg, np.random.default_rng(seed))[0][0].numpy()
        kept = [c for c in range(4) if np.abs(image[c]).sum() > 0]
        assert len(kept) == 1  # two sequences, one dropped
        c = kept[0]
        expected = alone[card.input.sequences[c]][c]
        np.testing.assert_allclose(np.sort(image[c][image[c] != 0]), np.sort(expected[expected != 0]), atol=1e-6)
        seen.add(c)
    assert seen == {0, 1}


@pytest.mark.parametrize("option, value", [("--lr", "-1"), ("--sequence-dropout", "2"), ("--low-resolution", "-1"),
                                           ("--epochs", "0"), ("--validation-fraction", "1")])
def test_train_options_out_of_range_are_refused_before_reading_data(tmp_path, option, value):
    """--lr -1 was an internal error (exit 1) after the cases were read; --sequence-dropout 2 and
    --low-resolution -1 were accepted."""
    from click.testing import CliRunner

    from tumorseg.cli import main

    result = CliRunner().invoke(main, ["train", "--dataset", str(tmp_path), "-o", str(tmp_path / "m"), option, value])
    assert result.exit_code == 2 and option in result.output, result.output
