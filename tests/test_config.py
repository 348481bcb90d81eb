"""Pipeline files, the TOML loader, and model cards."""
from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner

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


def write(path: Path, text: str) -> Path:
    path.write_text(text)
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
