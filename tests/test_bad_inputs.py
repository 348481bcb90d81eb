"""Bad inputs through the CLI: the documented exit code, a message naming the file and the
problem, no traceback, and no output written."""
from __future__ import annotations

import json

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from tumorseg.cli import main
from tumorseg.errors import (
    EXIT_CODES,
    ConfigError,
    GeometryError,
    InputError,
    ModelError,
    SequenceError,
)
from tumorseg.stages.read import read_volume

from conftest import brain_phantom, make_tiny_model, save_nifti

SHAPE = (40, 40, 40)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def test_exit_codes_are_distinct_and_documented():
    codes = [InputError.exit_code, GeometryError.exit_code, ModelError.exit_code,
             ConfigError.exit_code, SequenceError.exit_code]
    assert codes == [3, 4, 5, 6, 7]
    assert set(codes) <= set(EXIT_CODES)
    # docs/cli.md's table says what `tumorseg --help` says, code for code.
    docs = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    table = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", docs.split("## Exit codes", 1)[1], re.M))
    assert {int(code): text for code, text in table.items()} == EXIT_CODES


@pytest.fixture
def image():
    return brain_phantom(SHAPE)


@pytest.fixture
def flair(tmp_path, image):
    return save_nifti(tmp_path / "case-t2f.nii.gz", image, AFFINE)


def invoke(tmp_path: Path, model: Path | str, *args) -> tuple:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["predict", "--model", str(model), "-o", str(out), "-q", *map(str, args)]
    )
    return result, out


def assert_refused(result, out: Path, code: int, *needles: str) -> None:
    text = result.output
    assert result.exit_code == code, text
    assert "Traceback" not in text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "internal error" not in text
    for needle in needles:
        assert needle.lower() in text.lower(), f"{needle!r} not in {text!r}"
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


# --- input errors (exit 3) ---------------------------------------------------------------

def test_missing_file(tmp_path, tiny_model):
    missing = tmp_path / "nowhere-t2f.nii.gz"
    result, out = invoke(tmp_path, tiny_model, missing)
    assert_refused(result, out, 3, "nowhere-t2f.nii.gz", "not found")


def test_missing_file_given_by_option(tmp_path, tiny_model):
    missing = tmp_path / "nowhere.nii.gz"
    result, out = invoke(tmp_path, tiny_model, "--flair", missing)
    assert_refused(result, out, 3, "nowhere.nii.gz", "not found")


def test_text_file_with_nifti_name(tmp_path, tiny_model):
    fake = tmp_path / "x-t1c.nii.gz"
    fake.write_text("this is not an image\n")
    result, out = invoke(tmp_path, tiny_model, fake)
    assert_refused(result, out, 3, "x-t1c.nii.gz", "not a readable")


def test_truncated_gzip_nifti(tmp_path, tiny_model, image):
    path = save_nifti(tmp_path / "cut-t2f.nii.gz", image, AFFINE)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert nib.load(str(path)).shape == SHAPE  # the header still reads: only the data is cut
    result, out = invoke(tmp_path, tiny_model, path)
    assert_refused(result, out, 3, "cut-t2f.nii.gz", "truncated or corrupt")


def test_verbose_shows_where_the_error_behind_a_refusal_came_from(tmp_path, tiny_model, image):
    """The user's line stays one line; --verbose logs the library error it was raised from, redacted."""
    path = save_nifti(tmp_path / "cut-t2f.nii.gz", image, AFFINE)
    path.write_bytes(path.read_bytes()[:-200])

    def predict(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tumorseg.cli", "predict", "--model", str(tiny_model),
                               "-o", str(tmp_path / "out"), *extra, str(path)], capture_output=True, text=True,
                              timeout=300)

    verbose, plain = predict("-v"), predict("-q")
    assert verbose.returncode == plain.returncode == 3, verbose.stderr
    assert "caused by" in verbose.stderr and "stages/read.py" in verbose.stderr, verbose.stderr
    assert "Traceback" not in verbose.stderr
    assert plain.stderr.strip().count("\n") == 0 and "cut-t2f.nii.gz" in plain.stderr, plain.stderr


@pytest.mark.parametrize("value, needle", [(np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")])
def test_non_finite_voxels(tmp_path, tiny_model, image, value, needle):
    image = image.copy()
    image[20, 20, 20] = value
    image[21, 20, 20] = value
    path = save_nifti(tmp_path / "bad-t2f.nii.gz", image, AFFINE)
    result, out = invoke(tmp_path, tiny_model, path)
    assert_refused(result, out, 3, "bad-t2f.nii.gz", needle, "2 voxels")


def test_constant_image(tmp_path, tiny_model):
    path = save_nifti(tmp_path / "flat-t2f.nii.gz", np.full(SHAPE, 7.0, np.float32), AFFINE)
    result, out = invoke(tmp_path, tiny_model, path)
    assert_refused(result, out, 3, "flat-t2f.nii.gz", "constant", "7")


# --- geometry errors (exit 4) ------------------------------------------------------------

@pytest.mark.parametrize("shape", [(40, 40), (40, 40, 1)], ids=["2d", "single-slice"])
def test_two_dimensional_images(tmp_path, tiny_model, shape):
    rng = np.random.default_rng(1)
    path = save_nifti(tmp_path / "slice-t2f.nii.gz", rng.random(shape).astype(np.float32), AFFINE)
    result, out = invoke(tmp_path, tiny_model, path)
    assert_refused(result, out, 4, "slice-t2f.nii.gz", "2D", str(shape))


def test_4d_three_volumes_as_only_input(tmp_path, tiny_model, image):
    path = save_nifti(tmp_path / "study.nii.gz", np.stack([image] * 3, axis=-1), AFFINE)
    result, out = invoke(tmp_path, tiny_model, path)
    assert_refused(result, out, 4, "study.nii.gz", "3 volumes", "Decathlon")


def test_4d_three_volumes_given_as_flair(tmp_path, tiny_model, image):
    path = save_nifti(tmp_path / "series.nii.gz", np.stack([image] * 3, axis=-1), AFFINE)
    result, out = invoke(tmp_path, tiny_model, "--flair", path)
    assert_refused(result, out, 4, "series.nii.gz", "3 volumes", "flair")


def test_shapes_disagree_is_resampled_not_refused(tmp_path, tiny_model, flair):
    """Sequences on other grids were refused ("co-register first"); they now reach the reference
    grid (T1gd) through the register stage, which the report records (tests/test_register.py)."""
    other = save_nifti(tmp_path / "case-t1c.nii.gz", brain_phantom((40, 40, 38)), AFFINE)
    result, out = invoke(tmp_path, tiny_model, flair, other, "--registration", "none")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["registration"]["reference"] == "t1gd" and report["input_grid"]["shape"] == [40, 40, 38]
    assert report["registration"]["sequences"]["flair"]["method"] == "scanner coordinates"


def test_affines_disagree_is_registered(tmp_path, tiny_model, flair, image):
    shifted = AFFINE.copy()
    shifted[0, 3] = 3.0
    other = save_nifti(tmp_path / "case-t1c.nii.gz", image, shifted)
    result, out = invoke(tmp_path, tiny_model, flair, other)
    assert result.exit_code == 0, result.output
    entry = json.loads((out / "report.json").read_text())["registration"]["sequences"]["flair"]
    # The same image: the T1gd reference lies 3 mm further along x, so its points are 3 mm back in the FLAIR.
    assert entry["method"] == "rigid" and abs(entry["translation_mm"][0] + 3.0) < 0.5


def test_nifti_without_qform_or_sform(tmp_path, tiny_model, image):
    # conftest.save_nifti(qform_code=0, sform_code=0) cannot make this file: nibabel resets the
    # sform code to 2 when it saves an image that has an affine. Build the header by hand.
    header = nib.Nifti1Header()
    header.set_data_shape(image.shape)
    header.set_data_dtype(np.float32)
    header["qform_code"] = 0
    header["sform_code"] = 0
    path = tmp_path / "nogeo-t2f.nii.gz"
    nib.save(nib.Nifti1Image(image, None, header=header), str(path))
    saved = nib.load(str(path)).header
    assert int(saved["qform_code"]) == 0 and int(saved["sform_code"]) == 0
    result, out = invoke(tmp_path, tiny_model, path)
    assert_refused(result, out, 4, "nogeo-t2f.nii.gz", "qform", "sform")


def save_with_forms(path: Path, image: np.ndarray, sform: np.ndarray, qform: np.ndarray) -> Path:
    nifti = nib.Nifti1Image(image, sform)
    nifti.header.set_sform(sform, code=2)
    nifti.header.set_qform(qform, code=1)
    nib.save(nifti, str(path))
    return path


def test_qform_and_sform_that_disagree(tmp_path, tiny_model, image):
    """Readers differ on which form wins, so a file whose two forms disagree is refused."""
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0]) @ AFFINE  # a left-right flip: LAS against RAS
    path = save_with_forms(tmp_path / "forms-t2f.nii.gz", image, AFFINE, flipped)
    result, out = invoke(tmp_path, tiny_model, path)
    assert_refused(result, out, 4, "forms-t2f.nii.gz", "qform and sform disagree")


def test_qform_and_sform_a_rounding_apart_are_one_grid(tmp_path, image):
    nudged = AFFINE.copy()
    nudged[:3, 3] += 0.02  # mm, under a tenth of a 1 mm voxel
    path = save_with_forms(tmp_path / "forms-t2f.nii.gz", image, AFFINE, nudged)
    assert np.array_equal(read_volume(path).affine, AFFINE)


# --- sequence errors (exit 7) ------------------------------------------------------------

def test_name_matching_no_sequence(tmp_path, tiny_model, image):
    path = save_nifti(tmp_path / "scan.nii.gz", image, AFFINE)
    result, out = invoke(tmp_path, tiny_model, path)
    assert_refused(result, out, 7, "scan.nii.gz", "--flair", "--t1", "--t1gd", "--t2")


def test_name_matching_two_sequences(tmp_path, tiny_model, image):
    path = save_nifti(tmp_path / "x_t1_t2.nii.gz", image, AFFINE)
    result, out = invoke(tmp_path, tiny_model, path)
    assert_refused(result, out, 7, "x_t1_t2.nii.gz", "several sequences", "--t1", "--t2")


def test_two_files_for_one_sequence(tmp_path, tiny_model, flair, image):
    other = save_nifti(tmp_path / "other_flair.nii.gz", image, AFFINE)
    result, out = invoke(tmp_path, tiny_model, flair, other)
    assert_refused(result, out, 7, "case-t2f.nii.gz", "other_flair.nii.gz", "two inputs for flair")


def test_explicit_and_positional_for_one_sequence(tmp_path, tiny_model, flair, image):
    other = save_nifti(tmp_path / "other.nii.gz", image, AFFINE)
    result, out = invoke(tmp_path, tiny_model, "--flair", other, flair)
    assert_refused(result, out, 7, "case-t2f.nii.gz", "other.nii.gz", "two inputs for flair")


def test_required_sequence_missing(tmp_path, flair):
    model = make_tiny_model(tmp_path / "needs-t1gd", required=("t1gd",))
    result, out = invoke(tmp_path, model, flair)
    assert_refused(result, out, 7, "t1gd", "--t1gd")


# --- model errors (exit 5) ---------------------------------------------------------------

def test_weights_checksum_mismatch(tmp_path, tiny_model, flair):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    result, out = invoke(tmp_path, model, flair)
    assert_refused(result, out, 5, "weights.safetensors", "checksum")


def test_unknown_model_name(tmp_path, flair):
    result, out = invoke(tmp_path, "no-such-model-xyz", flair)
    assert_refused(result, out, 5, "no-such-model-xyz", "no model")


# --- configuration errors (exit 6) -------------------------------------------------------

def test_output_folder_that_cannot_be_made_is_refused_before_inference(tmp_path, tiny_model, flair, monkeypatch):
    import tumorseg.pipeline

    monkeypatch.setattr(tumorseg.pipeline.Segmenter, "segment_inputs", lambda *a: pytest.fail("inference ran"))
    blocker = tmp_path / "afile"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["predict", "--model", str(tiny_model), "-o", str(blocker / "sub"), "-q",
                                       str(flair)])
    assert result.exit_code == 6, result.output
    assert "is a file, not a folder" in result.output and str(blocker) in result.output


def test_unknown_key_in_pipeline_file(tmp_path, tiny_model, flair):
    pipeline = tmp_path / "mine.toml"
    pipeline.write_text("[inference]\noverlapp = 0.25\n")
    result, out = invoke(tmp_path, tiny_model, "--pipeline", pipeline, flair)
    assert_refused(result, out, 6, "mine.toml", "overlapp", "did you mean 'overlap'")


@pytest.mark.parametrize("value", ["1.5", "1.0", "-0.1"])
def test_overlap_out_of_range(tmp_path, tiny_model, flair, value):
    result, out = invoke(tmp_path, tiny_model, "--overlap", value, flair)
    assert_refused(result, out, 6, "overlap", value)


# --- accepted edge cases -----------------------------------------------------------------

def test_4d_file_with_singleton_fourth_axis_is_3d(tmp_path, tiny_model, image):
    affine = np.array([[0.9, 0, 0, -20.0], [0, 1.1, 0, -22.0], [0, 0, 1.0, -18.0], [0, 0, 0, 1]])
    path = save_nifti(tmp_path / "one-t2f.nii.gz", image[..., None], affine)
    assert nib.load(str(path)).shape == SHAPE + (1,)
    result, out = invoke(tmp_path, tiny_model, path)
    assert result.exit_code == 0, result.output
    seg = nib.load(str(out / "segmentation.nii.gz"))
    assert seg.shape == SHAPE
    assert int(seg.header["dim"][0]) == 3
    np.testing.assert_allclose(seg.affine, nib.load(str(path)).affine, atol=1e-5)
    assert (out / "report.json").is_file()
