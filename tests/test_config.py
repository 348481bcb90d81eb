"""Pipeline files, the TOML loader, and model cards."""
from __future__ import annotations

import dataclasses
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from click.testing import CliRunner

from conftest import brain_phantom, save_nifti
from tumorseg.cli import main
from tumorseg.config import (
    InferenceConfig,
    LabelPostprocess,
    PipelineConfig,
    bundled_pipelines_dir,
    load_pipeline,
)
from tumorseg.errors import EXIT_CODES, ConfigError, ModelError
from tumorseg.model import CARD_NAME, load_card, load_model


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# --- pipelines ---------------------------------------------------------------------------

def test_bundled_default_pipeline_loads():
    path = bundled_pipelines_dir() / "default.toml"
    raw = tomllib.loads(path.read_text())
    config = load_pipeline("default")
    assert isinstance(config, PipelineConfig)
    assert config == load_pipeline(path)
    assert config.model == raw["model"]
    assert config.inference.overlap == raw["inference"]["overlap"]
    assert config.inference.windows_per_batch == raw["inference"]["windows_per_batch"]
    assert config.inference.device == raw["inference"]["device"]
    assert config.postprocess.tumour_min_component_ml == raw["postprocess"]["tumour_min_component_ml"]
    assert set(config.postprocess.labels) == set(raw["postprocess"]["labels"])
    for name, settings in raw["postprocess"]["labels"].items():
        for key, value in settings.items():
            assert getattr(config.postprocess.labels[name], key) == value


def test_missing_pipeline_names_bundled(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_pipeline(str(tmp_path / "nope.toml"))
    assert "nope.toml" in str(info.value)
    assert "default" in str(info.value)


def test_invalid_toml(tmp_path):
    path = write(tmp_path / "p.toml", "[inference\noverlap = 0.5\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_pipeline(path)


@pytest.mark.parametrize(
    "text, bad, suggestion",
    [
        ("modle = 'x'\n", "modle", "model"),
        ("[inference]\noverlapp = 0.3\n", "overlapp", "overlap"),
        ("[inference]\nwindows_per_bach = 2\n", "windows_per_bach", "windows_per_batch"),
        ("[postprocess]\ntumour_min_component = 0.1\n", "tumour_min_component", "tumour_min_component_ml"),
        ("[postprocess.labels.edema]\nmin_component_mll = 0.1\n", "min_component_mll", "min_component_ml"),
    ],
)
def test_unknown_key_suggests_closest(tmp_path, text, bad, suggestion):
    path = write(tmp_path / "p.toml", text)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert str(path) in message
    assert f"unknown key {bad!r}" in message
    assert f"did you mean {suggestion!r}" in message


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    path = write(tmp_path / "p.toml", "[inference]\nzzzz = 1\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    for key in ("overlap", "windows_per_batch", "tta", "device"):
        assert key in str(info.value)


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("[inference]\noverlap = '0.5'\n", "overlap", "a number"),
        ("[inference]\noverlap = true\n", "overlap", "a number"),
        ("[inference]\nwindows_per_batch = true\n", "windows_per_batch", "an integer"),
        ("[inference]\nwindows_per_batch = 2.0\n", "windows_per_batch", "an integer"),
        ("[inference]\ntta = 1\n", "tta", "true or false"),
        ("[inference]\ndevice = 0\n", "device", "a string"),
        ("model = 3\n", "model", "a string"),
        ("inference = 3\n", "inference", "table"),
        ("[postprocess.labels]\nedema = 3\n", "edema", "table"),
        ("[postprocess.labels.edema]\nkeep_largest = 'yes'\n", "keep_largest", "true or false"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, text, key, expected):
    path = write(tmp_path / "p.toml", text)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert key in message
    assert expected in message
    assert str(path) in message


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[inference]\noverlap = 1.0\n", "overlap"),
        ("[inference]\noverlap = -0.1\n", "overlap"),
        ("[inference]\noverlap = nan\n", "overlap"),
        ("[inference]\nwindows_per_batch = 0\n", "windows_per_batch"),
        ("[inference]\ndevice = 'tpu'\n", "tpu"),
        ("[inference]\nprecision = 'fp8'\n", "fp8"),
        ("[postprocess]\ntumour_min_component_ml = -1\n", "tumour_min_component_ml"),
        ("[postprocess.labels.edema]\nsmoothing_radius_mm = -1\n", "smoothing_radius_mm"),
        # [dicom]: a value of the wrong type is refused by key, never read as something else
        # tuple("KM") was the patterns 'K' and 'M': every "T1 MPRAGE" became T1gd
        ("[dicom]\ncontrast_patterns = 'KM'\n", "contrast_patterns"),
        # tuple("DARKFLUID") matched any description holding an 'a': every T1 and T2 became FLAIR
        ("[[dicom.rules]]\nsequence = 'flair'\ninclude = 'DARKFLUID'\n", "include"),
        ("[[dicom.rules]]\nsequence = 't2'\ninclude = ['T2']\nexlude = ['TSE']\n", "did you mean 'exclude'"),
        ("[[dicom.rules]]\nsequence = 't1'\ninclude = ['T1']\ncontrast = 'false'\n", "contrast"),
        ("[dicom]\nskip_derived = 'false'\n", "skip_derived"),  # bool('false') is True
        ("[[dicom.rules]]\nsequence = 'flair'\ninclude = [1]\n", "include"),  # was internal error (TypeError)
        ("[dicom]\nrules = 3\n", "rules"),
        ("[dicom]\nskip_descriptions = ['SURVEY']\n", "skip_descriptions"),
    ],
)
def test_invalid_values(tmp_path, text, needle):
    path = write(tmp_path / "p.toml", text)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "[postprocess.labels.edema]\nsmoothing_radius_mm = nan\n",
        "[postprocess.labels.edema]\nsmoothing_radius_mm = inf\n",
        "[postprocess.labels.edema]\nmin_component_ml = nan\n",
        "[postprocess]\ntumour_min_component_ml = nan\n",
    ],
    ids=["radius-nan", "radius-inf", "min-ml-nan", "tumour-min-ml-nan"],
)
def test_non_finite_postprocess_values_refused(tmp_path, text):
    path = write(tmp_path / "p.toml", text)
    with pytest.raises(ConfigError):
        load_pipeline(path)


def test_with_overrides():
    config = PipelineConfig()
    assert config.with_overrides(overlap=None, tta=None) is config
    changed = config.with_overrides(overlap=0.25, tta=False)  # tta is on by default: turning it off is the change
    assert changed.inference == InferenceConfig(overlap=0.25, windows_per_batch=4, tta=False, device="auto")
    assert (config.inference.overlap, config.inference.tta) == (0.5, True)  # the original is untouched
    with pytest.raises(ConfigError, match="overlap"):
        config.with_overrides(overlap=1.0)
    with pytest.raises(ConfigError, match="windows_per_batch"):
        config.with_overrides(windows_per_batch=0)


def test_segmenter_refuses_postprocess_label_unknown_to_scheme(tmp_path, tiny_model):
    from tumorseg.pipeline import Segmenter

    # "necrosis" is a BraTS 2015 label, not one of the tiny model's MSD labels.
    path = write(tmp_path / "p.toml", "[postprocess.labels.necrosis]\nfill_holes = true\n")
    config = load_pipeline(path)
    with pytest.raises(ConfigError) as info:
        Segmenter(str(tiny_model), config)
    assert "necrosis" in str(info.value)
    assert "msd" in str(info.value)


def test_segmenter_accepts_known_postprocess_label(tmp_path, tiny_model):
    from tumorseg.pipeline import Segmenter

    path = write(tmp_path / "p.toml", "[postprocess.labels.edema]\nkeep_largest = true\n")
    segmenter = Segmenter(str(tiny_model), load_pipeline(path))
    assert segmenter.config.postprocess.labels["edema"] == LabelPostprocess(keep_largest=True)


# --- model cards -------------------------------------------------------------------------

@pytest.fixture
def card_dir(tmp_path, tiny_model):
    """A writable copy of the tiny model, with its card as a dict to edit."""
    directory = tmp_path / "model"
    shutil.copytree(tiny_model, directory)
    return directory


def edit_card(directory: Path, edit) -> Path:
    card = tomllib.loads((directory / CARD_NAME).read_text())
    edit(card)
    (directory / CARD_NAME).write_text(tomli_w.dumps(card))
    return directory


def test_tiny_card_loads(card_dir):
    card = load_card(card_dir)
    assert card.input.sequences == ("flair", "t1", "t1gd", "t2")
    assert card.labels == "msd"
    assert card.out_channels == 4


@pytest.mark.parametrize(
    "edit, needles",
    [
        (lambda c: c["input"].update(sequences=["flair", "dwi"]), ["unknown sequence", "dwi"]),
        (lambda c: c["input"].update(required=["t2"], sequences=["flair"]), ["required", "t2"]),
        (lambda c: c["weights"].update(file="weights.pt"), ["safetensors", "weights.pt"]),
        (lambda c: c["weights"].update(sha256="abc123"), ["sha256", "abc123"]),
        (lambda c: c["weights"].update(sha256="A" * 64), ["sha256"]),
        (lambda c: c["weights"].update(sha256="g" * 64), ["sha256"]),
        (
            lambda c: (c["architecture"].update(filters=[4, 8, 16, 32, 64], strides=[1, 2, 2, 2, 2]),
                       c["input"].update(patch_size=[40, 40, 40])),
            ["patch_size", "16"],
        ),
        (lambda c: c["input"].update(patch_size=[30, 32, 32]), ["patch_size", "8"]),
        (lambda c: c["architecture"].update(strides=[2, 2, 2]), ["first stride"]),
        (lambda c: c["weights"].pop("sha256"), ["missing required key", "sha256"]),
        (lambda c: c.update(colour="red"), ["unknown key 'colour'"]),
    ],
    ids=["unknown-sequence", "required-not-taken", "not-safetensors", "short-sha", "upper-sha",
         "non-hex-sha", "patch-vs-strides", "patch-not-8", "first-stride", "no-sha", "unknown-key"],
)
def test_card_errors(card_dir, edit, needles):
    edit_card(card_dir, edit)
    with pytest.raises(ModelError) as info:
        load_card(card_dir)
    message = str(info.value)
    assert info.value.exit_code == 5
    assert CARD_NAME in message
    for needle in needles:
        assert needle in message


def test_card_unknown_label_scheme_is_model_error(card_dir):
    edit_card(card_dir, lambda c: c.update(labels="brats2099"))
    with pytest.raises(ModelError) as info:
        load_card(card_dir)
    assert CARD_NAME in str(info.value)
    assert "brats2099" in str(info.value)


def test_card_not_toml(card_dir):
    (card_dir / CARD_NAME).write_text("name = \n")
    with pytest.raises(ModelError, match="not valid TOML"):
        load_card(card_dir)


def test_load_model_missing_weights(card_dir):
    (card_dir / "weights.safetensors").unlink()
    with pytest.raises(ModelError) as info:
        load_model(str(card_dir))
    assert "weights file not found" in str(info.value)
    assert "weights.safetensors" in str(info.value)


def test_load_model_unknown_name():
    with pytest.raises(ModelError, match="no model 'surely-not-a-model'"):
        load_model("surely-not-a-model")


def test_load_model_ok_and_card_file_path(tiny_model):
    loaded = load_model(str(tiny_model))
    assert loaded.directory == tiny_model
    assert not loaded.network.training
    # a path to model.toml itself also works
    assert load_model(str(tiny_model / CARD_NAME)).sha256 == loaded.sha256


# --- CLI ---------------------------------------------------------------------------------

def test_models_command_with_no_models(monkeypatch, tmp_path):
    import tumorseg.model

    monkeypatch.setattr(tumorseg.model, "bundled_models_dir", lambda: tmp_path / "empty")
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    assert "no models installed" in result.output


def test_models_command_lists_and_survives_broken_card(monkeypatch, tmp_path, tiny_model):
    import tumorseg.model

    root = tmp_path / "models"
    shutil.copytree(tiny_model, root / "good")
    broken = root / "broken"
    broken.mkdir()
    (broken / CARD_NAME).write_text("name = 'x'\n")  # missing required keys
    monkeypatch.setattr(tumorseg.model, "bundled_models_dir", lambda: root)
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "good  tiny-test" in result.output
    assert "flair, t1, t1gd, t2" in result.output
    assert "broken: unusable model card" in result.output


def test_help_shows_exit_codes():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "Exit codes" in result.output
    for code, text in EXIT_CODES.items():
        assert f"{code}  {text}" in result.output


def test_preferred_sets_choose_the_first_complete_set_and_are_validated():
    from tumorseg.model import InputSpec

    spec = InputSpec(sequences=("flair", "t1", "t1gd", "t2"), preferred_sets=(("flair", "t1gd"), ("t2",)))
    assert spec.choose(("flair", "t1", "t1gd", "t2")) == ("flair", "t1gd")
    assert spec.choose(("t1gd", "flair")) == ("t1gd", "flair")  # the order given is kept
    assert spec.choose(("flair", "t1", "t2")) == ("t2",)  # the first set lacks T1gd: the next one
    assert spec.choose(("flair", "t1")) == ("flair", "t1")  # no set complete: everything available
    with pytest.raises(ValueError, match="within sequences"):
        InputSpec(sequences=("flair", "t1gd"), preferred_sets=(("flair", "t2"),))
    with pytest.raises(ValueError, match="every required"):
        InputSpec(sequences=("flair", "t1gd"), required=("t1gd",), preferred_sets=(("flair",),))
    with pytest.raises(ValueError, match="min_sequences"):
        InputSpec(sequences=("flair", "t1gd"), min_sequences=2, preferred_sets=(("flair",),))





# --- a pipeline file that is not UTF-8: a configuration error (exit 6), not an internal one ------

def test_non_utf8_pipeline_is_a_config_error(tmp_path):
    path = write(tmp_path / "site.toml", '[output.roi_names]\nedema = "\xd6dem"\n'.encode("latin-1"))
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "x.nii.gz"), "--pipeline", str(path)])
    assert result.exit_code == 6, result.output
    assert "site.toml" in result.output and "UTF-8" in result.output


# --- model_sha256 must be a whole sha256; a prefix was refused as a 'mismatch' of equal prefixes --

@pytest.mark.parametrize("value", ["d80f0123456789ab", "A" * 64])
def test_model_sha256_format_checked_at_load(tmp_path, value):
    path = write(tmp_path / "p.toml", f"model_sha256 = '{value}'\n")
    with pytest.raises(ConfigError, match="model_sha256"):
        load_pipeline(path)


# --- input limits: a bad value stops batch at once with exit 6, as docs/configuration.md says -----

@pytest.fixture
def two_cases(tmp_path):
    for case in ("c1", "c2"):
        folder = tmp_path / "data" / case
        folder.mkdir(parents=True)
        for seq, seed in (("t1c", 1), ("t2f", 2)):
            save_nifti(folder / f"{case}-{seq}.nii.gz", brain_phantom(seed=seed), np.eye(4))
    return tmp_path / "data"


def test_bad_input_limit_is_exit_6_for_batch(tmp_path, two_cases, tiny_model, monkeypatch):
    monkeypatch.setenv("TUMORSEG_MAX_VOXELS", "abc")
    result = CliRunner().invoke(main, ["batch", str(two_cases), "-o", str(tmp_path / "out"), "--model",
                                       str(tiny_model), "--brain-extraction", "off", "--no-tta", "-q"])
    assert result.exit_code == 6, result.output
    assert "TUMORSEG_MAX_VOXELS" in result.output


# --- the batch fingerprint: what the outputs depend on, not how they were asked for -------------

def _sha(tiny_model, config, **spec_changes):
    from tumorseg.batch.records import config_sha256
    from tumorseg.pipeline import Segmenter

    spec = Segmenter(str(tiny_model), config).spec
    return config_sha256(dataclasses.replace(spec, **spec_changes))


def test_config_sha256_ignores_speed_settings_and_model_spelling(tmp_path, tiny_model):
    from tumorseg.configio import to_dict
    from tumorseg.model import load_model

    base = load_pipeline("as-trained")
    same = _sha(tiny_model, dataclasses.replace(base, model=str(tiny_model)))
    resolved = {"tumorseg_version": "0", "model_card": "tiny",
                **to_dict(dataclasses.replace(base, model=str(tiny_model), model_sha256=load_model(str(tiny_model)).sha256))}
    path = write(tmp_path / "pipeline.resolved.toml", tomli_w.dumps(resolved))
    assert _sha(tiny_model, load_pipeline(path)) == same  # rerunning the resolved file reuses the cases
    for change in (dict(windows_per_batch=9), dict(device="cpu"), dict(compile=True)):
        changed = dataclasses.replace(base, model=str(tiny_model),
                                      inference=dataclasses.replace(base.inference, **change))
        assert _sha(tiny_model, changed) == same, change
    assert _sha(tiny_model, base.with_overrides(overlap=0.25)) != same  # an output setting still counts


def test_config_sha256_counts_the_precision_that_ran(tiny_model):
    base = load_pipeline("as-trained")  # precision = "auto" in both: fp32 on one CPU, bf16 on another
    assert _sha(tiny_model, base, precision="fp32") != _sha(tiny_model, base, precision="bf16")


# --- pipeline.resolved.toml reruns from another working directory -------------------------------

def test_resolved_records_model_folder_as_absolute_path(tmp_path, tiny_model, monkeypatch):
    from tumorseg.pipeline import Segmenter

    shutil.copytree(tiny_model, tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    segmenter = Segmenter("mine", dataclasses.replace(load_pipeline("as-trained"), model="mine"))
    assert Path(segmenter.config.model).is_absolute()
    assert Path(segmenter.config.model) == (tmp_path / "mine").resolve()
