"""Each input that once lied its way through (issue 28), refused by name before any inference,
with its exit code, one line, no output and nothing of the patient in the log."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import make_tiny_model
from mutants import (CANARY, check_contract, nifti_bytes, phantom_nifti, run_cli, set_raw,
                     small_real_series, with_header, write_nifti_bytes)


@pytest.fixture(scope="module")
def coarse_model(tmp_path_factory) -> Path:
    """A random-weight model on a 4 mm grid: fast on any field of view."""
    return make_tiny_model(tmp_path_factory.mktemp("coarse-model"), spacing=(4.0, 4.0, 4.0))


@pytest.fixture
def scan(tmp_path) -> Path:
    return phantom_nifti(tmp_path / "case-t2f.nii.gz")


def predict(model: Path, out: Path, *inputs, extra=()):
    result, log_text = run_cli("predict", *map(str, inputs), "--model", str(model), "-o", str(out), "-q",
                               "--brain-extraction", "off", *extra)
    return result, log_text


def refused(result, log_text, out: Path, code: int, *needles: str) -> None:
    assert check_contract(result, log_text, out) == f"exit {code}", result.output
    for needle in needles:
        assert needle.lower() in result.output.lower(), result.output


# --- NIfTI: data that is not what the file holds ---------------------------------------------

def test_gzip_stream_with_flipped_bytes_is_refused_not_segmented(tmp_path, scan, coarse_model):
    """Flipped bytes in the deflate stream decode to other voxels or fail the CRC: both refused
    (once: exit 0 on changed voxels in 30 of 48 mutants)."""
    data = scan.read_bytes()
    rng = np.random.default_rng(28)
    for n in range(12):
        damaged = bytearray(data)
        at = int(rng.integers(200, len(data) - 8))
        damaged[at] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"flip{n}-t2f.nii.gz"
        path.write_bytes(bytes(damaged))
        out = tmp_path / f"out{n}"
        result, log_text = predict(coarse_model, out, path)
        refused(result, log_text, out, 3, "corrupt")


def test_gzip_trailer_with_a_wrong_crc_is_refused(tmp_path, scan, coarse_model):
    data = bytearray(scan.read_bytes())
    data[-8] ^= 0xFF  # the CRC-32 of the uncompressed data
    path = tmp_path / "crc-t2f.nii.gz"
    path.write_bytes(bytes(data))
    result, log_text = predict(coarse_model, tmp_path / "out", path)
    refused(result, log_text, tmp_path / "out", 3, "integrity")


# --- NIfTI: geometry that is not a geometry --------------------------------------------------

@pytest.mark.parametrize("fields, needle", [
    ({"pixdim": [1, np.nan, 1, 1, 0, 0, 0, 0]}, "pixdim"),
    ({"quatern_b": np.nan}, "quatern_b"),
    ({"qoffset_y": np.inf}, "qoffset_y"),
    ({"srow_x": [np.nan, 0, 0, -20]}, "srow_x"),
    ({"srow_y": [0, np.inf, 0, -22]}, "srow_y"),
])
def test_nan_or_inf_in_header_geometry_is_refused(tmp_path, scan, coarse_model, fields, needle):
    """NaN beside a valid sform once passed the qform/sform agreement check (NaN compares
    false) and was written into the label map's qform."""
    path = with_header(scan, tmp_path / "nan-t2f.nii.gz", **fields)
    result, log_text = predict(coarse_model, tmp_path / "out", path)
    refused(result, log_text, tmp_path / "out", 4, needle, "NaN or infinite")


def test_complex_voxels_and_values_beyond_float32_are_refused_by_what_they_are(tmp_path, scan, coarse_model):
    """Complex voxels were read as their real part (a signed image no scanner shows), and finite
    float64 values beyond float32's range were called NaN or infinite."""
    import SimpleITK as sitk

    image = nib.load(str(scan))
    magnitude = np.asarray(image.dataobj, dtype=np.float64) + 100
    phase = np.linspace(0, np.pi, magnitude.size).reshape(magnitude.shape)
    complex_path = tmp_path / "complex-t2f.nii.gz"
    nib.save(nib.Nifti1Image((magnitude * np.exp(1j * phase)).astype(np.complex64), image.affine), str(complex_path))
    result, log_text = predict(coarse_model, tmp_path / "out-complex", complex_path)
    refused(result, log_text, tmp_path / "out-complex", 3, "complex-valued", "magnitude")
    rgb_path = tmp_path / "rgb-t2f.nii.gz"  # was refused as 'truncated or corrupt image data (... VoidDType)'
    rgb = np.zeros(magnitude.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, image.affine), str(rgb_path))
    result, log_text = predict(coarse_model, tmp_path / "out-rgb", rgb_path)
    refused(result, log_text, tmp_path / "out-rgb", 3, "rgb-t2f.nii.gz", "colour (RGB)")
    huge = tmp_path / "huge-t2f.nii.gz"
    nib.save(nib.Nifti1Image(magnitude * 1e300, image.affine), str(huge))
    itk = sitk.GetImageFromArray(np.transpose(magnitude * 1e300))
    sitk.WriteImage(itk, str(tmp_path / "huge-t2f.mha"))
    for path in (huge, tmp_path / "huge-t2f.mha"):
        result, log_text = predict(coarse_model, tmp_path / f"out-{path.suffix}", path)
        refused(result, log_text, tmp_path / f"out-{path.suffix}", 3, "32-bit floating-point range")


def test_quaternion_longer_than_one_is_refused_not_an_internal_error(tmp_path, scan, coarse_model):
    """quatern_d > 1: nibabel's 'w2 should be positive' once escaped as exit 1."""
    path = with_header(scan, tmp_path / "quat-t2f.nii.gz", quatern_d=1.5)
    result, log_text = predict(coarse_model, tmp_path / "out", path)
    refused(result, log_text, tmp_path / "out", 4, "quaternion")


@pytest.mark.parametrize("srow_x, needle", [([1e30, 0, 0, 0], "spacing"), ([1.2, 0, 0, 1e30], "origin"),
                                            ([1e-9, 0, 0, 0], "spacing")])
def test_absurd_sform_is_refused_not_an_internal_error(tmp_path, scan, coarse_model, srow_x, needle):
    """An sform with 1e30 once raised OrientationError in geometry (exit 1)."""
    path = with_header(scan, tmp_path / "big-t2f.nii.gz", srow_x=srow_x, qform_code=0)
    result, log_text = predict(coarse_model, tmp_path / "out", path)
    refused(result, log_text, tmp_path / "out", 4, needle)


@pytest.mark.parametrize("units, needle", [(3, "micron"), (1, "meter")])
def test_spatial_units_other_than_mm_are_refused(tmp_path, scan, coarse_model, units, needle):
    """0.5 mm voxels stored in micrometres were read as 500 mm ones and planned a model grid of
    4e4 voxels a side (an internal error, naming no file); stored in metres, as a constant image."""
    path = with_header(scan, tmp_path / "units-t2f.nii.gz", xyzt_units=units)
    result, log_text = predict(coarse_model, tmp_path / "out", path)
    refused(result, log_text, tmp_path / "out", 4, "units-t2f.nii.gz", needle, "millimetres")


def test_voxels_no_mr_scan_has_are_refused_before_the_model_grid_is_allocated(tmp_path, scan, coarse_model):
    path = with_header(scan, tmp_path / "vast-t2f.nii.gz", srow_x=[300.0, 0, 0, 0], srow_y=[0, 300.0, 0, 0],
                       srow_z=[0, 0, 300.0, 0], qform_code=0)
    result, log_text = predict(coarse_model, tmp_path / "out", path)
    refused(result, log_text, tmp_path / "out", 4, "not an MR scan's", "units")


@pytest.mark.parametrize("suffix, header, needle", [
    (".nrrd", "", "no space"),
    (".nrrd", "spacings: 1.2 1 1.1\n", "no space"),
    (".nrrd", "space: scanner-xyz\nspace directions: (1.2,0,0) (0,1,0) (0,0,1.1)\nspace origin: (0,0,0)\n", "scanner-xyz"),
    (".nrrd", "space: left-posterior-superior\nspace directions: (1.2,0,0) (0,1,0) (0,0,1.1)\n", "no space origin"),
    (".mha", "", "ElementSpacing, TransformMatrix, Offset"),
])
def test_nrrd_and_metaimage_headers_without_a_place_in_the_patient_are_refused(tmp_path, scan, coarse_model,
                                                                            suffix, header, needle):
    """ITK fills in unit spacing, an identity direction and a zero origin, which were written into
    the label map as scanner coordinates (qform and sform codes 1)."""
    voxels = np.asarray(nib.load(str(scan)).dataobj, dtype=np.float32)
    path = tmp_path / f"bare-t2f{suffix}"
    size = " ".join(str(n) for n in voxels.shape)
    if suffix == ".nrrd":
        text = f"NRRD0004\ntype: float\ndimension: 3\nsizes: {size}\n{header}endian: little\nencoding: raw\n\n"
    else:
        text = f"ObjectType = Image\nNDims = 3\nDimSize = {size}\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    path.write_bytes(text.encode() + voxels.tobytes(order="F"))
    result, log_text = predict(coarse_model, tmp_path / "out", path)
    refused(result, log_text, tmp_path / "out", 4, path.name, needle)


def test_singular_affine_message_is_one_line(tmp_path, scan, coarse_model):
    """The 4x4 matrix once printed over five lines."""
    path = with_header(scan, tmp_path / "flat-t2f.nii.gz", srow_x=[0, 1.0, 0, 0], srow_y=[0, 1.0, 0, 0],
                       qform_code=0)
    result, log_text = predict(coarse_model, tmp_path / "out", path)
    refused(result, log_text, tmp_path / "out", 4, "singular")


# --- NIfTI: memory out of proportion to the file ---------------------------------------------

def _peak_rss_mib(path: Path) -> tuple[float, str]:
    """Peak memory (MiB) of a fresh Python reading ``path``, and the refusal it printed."""
    code = ("import sys\nfrom pathlib import Path\nfrom tumorseg.errors import TumorsegError\n"
            "from tumorseg.stages.read import read_volume\n"
            "try:\n    read_volume(Path(sys.argv[1]))\n    print('read')\n"
            "except TumorsegError as e:\n    print(type(e).__name__, e)\n"
            # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (Linux keeps it across exec)
            "print(int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    message, peak = done.stdout.strip().rsplit("\n", 1)
    return float(peak), message


def _zeros_nifti(path: Path, shape, declared_dtype=np.uint8, data_bytes: int | None = None) -> Path:
    """A gzipped NIfTI whose header declares ``shape`` and holds ``data_bytes`` of zeros (all by
    default), compressed as a stream so the test never holds the whole file."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(declared_dtype)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    total = int(np.prod(shape)) * np.dtype(declared_dtype).itemsize if data_bytes is None else data_bytes
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header.binaryblock + b"\0" * 4)
        chunk = b"\0" * (1 << 24)
        while total > 0:
            f.write(chunk[:total])
            total -= len(chunk)
    return path


@pytest.mark.parametrize("shape, dtype, data_bytes", [
    ((1000, 1000, 1000), np.uint8, None),  # once 6.1 GiB before it was refused as constant
    ((640, 640, 640), np.uint8, None),  # once past 2 minutes at 4.6 GiB
    ((1020, 1020, 1020), np.float32, 2**20),  # once 4.4 GiB before "truncated"
])
def test_bomb_is_refused_within_1_gib(tmp_path, shape, dtype, data_bytes):
    path = _zeros_nifti(tmp_path / "bomb.nii.gz", shape, dtype, data_bytes)
    assert path.stat().st_size < 8 * 2**20  # a few MB that declare hundreds
    peak, message = _peak_rss_mib(path)
    assert message.startswith("InputError") and "limit" in message
    assert peak < 1024, f"peak {peak:.0f} MiB"
    print(f"{shape} {np.dtype(dtype).name}: {path.stat().st_size / 2**20:.1f} MB file, peak {peak:.0f} MiB")


def test_declared_size_the_data_cannot_fill_is_refused_before_allocating(tmp_path):
    """A header claiming 400^3 float32 (256 MiB) over 1 MiB of data: refused as truncated
    without allocating the declared array (once 4.4 GiB for 1020^3)."""
    path = _zeros_nifti(tmp_path / "claims.nii.gz", (400, 400, 400), np.float32, data_bytes=2**20)
    peak, message = _peak_rss_mib(path)
    assert message.startswith("InputError") and "truncated" in message
    baseline, _ = _peak_rss_mib(phantom_nifti(tmp_path / "small.nii.gz"))
    assert peak - baseline < 64, f"{peak:.0f} MiB against {baseline:.0f} MiB for a small file"
    print(f"400^3 float32 declared over 1 MiB: peak {peak:.0f} MiB, {baseline:.0f} MiB for a 40^3 file")


def test_voxel_and_decompressed_limits_are_configurable(tmp_path, monkeypatch):
    from tumorseg.errors import ConfigError, InputError
    from tumorseg.stages.read import read_volume

    path = phantom_nifti(tmp_path / "p.nii.gz")
    monkeypatch.setenv("TUMORSEG_MAX_VOXELS", "1000")
    with pytest.raises(InputError, match="TUMORSEG_MAX_VOXELS"):
        read_volume(path)
    monkeypatch.setenv("TUMORSEG_MAX_VOXELS", "lots")
    with pytest.raises(ConfigError, match="positive whole number"):
        read_volume(path)
    monkeypatch.delenv("TUMORSEG_MAX_VOXELS")
    raw = nifti_bytes(path) + b"\0" * (3 * 2**20)  # trailing bytes past the voxels
    write_nifti_bytes(tmp_path / "long.nii.gz", raw)
    monkeypatch.setenv("TUMORSEG_MAX_DECOMPRESSED_MB", "2")
    with pytest.raises(InputError, match="more than 2 MiB"):
        read_volume(tmp_path / "long.nii.gz")
    monkeypatch.delenv("TUMORSEG_MAX_DECOMPRESSED_MB")
    assert read_volume(tmp_path / "long.nii.gz").array.shape == (40, 40, 40)


# --- Output folders that cannot be written ---------------------------------------------------

@pytest.mark.parametrize("where", ["dangling", "/proc/tumorseg-out", "/sys/tumorseg-out"])
def test_unwritable_output_folder_is_refused_before_inference(tmp_path, scan, coarse_model, where):
    """os.access passes for root under /proc and /sys; a dangling symlink passed as missing."""
    if where == "dangling":
        out = tmp_path / "dangling"
        os.symlink(tmp_path / "nowhere", out)
    else:
        out = Path(where)
    result, log_text = predict(coarse_model, out, scan)
    assert result.exit_code == 6, result.output
    assert "cannot write the output folder" in result.output
    assert result.output.strip().count("\n") == 0
    assert not (tmp_path / "nowhere").exists()


def test_output_check_leaves_no_folder_behind(tmp_path, scan, coarse_model):
    out = tmp_path / "a" / "b" / "out"
    bad = tmp_path / "bad-t2f.nii.gz"
    bad.write_bytes(scan.read_bytes()[:500])
    result, log_text = predict(coarse_model, out, bad)
    assert result.exit_code == 3
    assert not (tmp_path / "a").exists()


# --- DICOM: headers that lie -----------------------------------------------------------------

@pytest.fixture
def series(tmp_path) -> Path:
    return small_real_series(tmp_path / "series")


def _edit(folder: Path, index: int, change) -> Path:
    path = sorted(folder.glob("*.dcm"))[index]
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)
    return path


def test_small_real_series_segments(tmp_path, series, coarse_model):
    """The base of the DICOM cases below is itself fine."""
    result, log_text = predict(coarse_model, tmp_path / "out", series)
    assert check_contract(result, log_text, tmp_path / "out") == "ok"


def test_slice_with_another_slices_uid_is_refused_not_dropped(tmp_path, series, coarse_model):
    """Once dropped as 'another copy' and read with one slice fewer, exit 0."""
    other = pydicom.dcmread(sorted(series.glob("*.dcm"))[3], stop_before_pixels=True).SOPInstanceUID
    _edit(series, 4, lambda ds: setattr(ds, "SOPInstanceUID", other))
    result, log_text = predict(coarse_model, tmp_path / "out", series)
    refused(result, log_text, tmp_path / "out", 3, "same SOP Instance UID but hold different images")


def test_a_true_copy_of_a_slice_is_still_read_once(tmp_path, series, coarse_model):
    first = sorted(series.glob("*.dcm"))[2]
    shutil.copy(first, series / "copy-of-a-slice.dcm")
    result, log_text = predict(coarse_model, tmp_path / "out", series)
    assert check_contract(result, log_text, tmp_path / "out") == "ok"


@pytest.mark.parametrize("keyword, raw, code, needle", [
    ("PixelSpacing", b"abc\\1", 3, "PixelSpacing does not hold numbers"),
    ("PixelSpacing", b"1\\1\\1", 4, "PixelSpacing holds 3 values, not 2"),
    ("ImageOrientationPatient", b"1\\0\\0\\0\\x\\0", 3, "ImageOrientationPatient does not hold numbers"),
    ("ImageOrientationPatient", b"1\\0\\0\\0\\1", 4, "ImageOrientationPatient holds 5 values"),
    ("ImagePositionPatient", b"10\\20", 4, "ImagePositionPatient holds 2 values, not 3"),
    ("ImagePositionPatient", b"10\\nan\\3", 4, "ImagePositionPatient holds NaN"),
    ("PixelSpacing", b"inf\\1", 4, "PixelSpacing holds NaN, infinite"),
    ("ImagePositionPatient", b"1e30\\0\\0", 4, "absurdly large"),
    ("Rows", None, 3, "Rows is not a positive whole number"),
])
def test_numeric_tags_that_are_not_numbers_are_refused_by_name(tmp_path, series, coarse_model, keyword, raw, code,
                                                              needle):
    """Text or the wrong count once raised ValueError in dicom/series.py (exit 1); inf/nan gave
    'SVD did not converge' in geometry."""
    if raw is None:
        _edit(series, 5, lambda ds: set_raw(ds, keyword, b"\x00\x00", "US"))
    else:
        _edit(series, 5, lambda ds: set_raw(ds, keyword, raw))
    result, log_text = predict(coarse_model, tmp_path / "out", series)
    refused(result, log_text, tmp_path / "out", code, needle)


def test_deflate_transfer_syntax_on_undeflated_data_is_refused(tmp_path, series, coarse_model):
    """Once zlib.error, an internal error (exit 1)."""
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info

    path = sorted(series.glob("*.dcm"))[1]
    ds = pydicom.dcmread(path)
    raw = path.read_bytes()
    body = raw[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength):]  # the data set, undeflated
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    meta = BytesIO()
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + body)
    with pytest.raises(zlib.error):
        zlib.decompress(body, -zlib.MAX_WBITS)
    result, log_text = predict(coarse_model, tmp_path / "out", series)
    refused(result, log_text, tmp_path / "out", 3, "cannot be parsed", "decompressing")


def test_uid_with_a_backslash_is_refused_before_inference(tmp_path, series, coarse_model):
    """A SOPInstanceUID holding two values once failed in rtstruct, after inference (exit 1)."""
    _edit(series, 2, lambda ds: set_raw(ds, "SOPInstanceUID", b"1.2.3\\4.5.6"))
    result, log_text = predict(coarse_model, tmp_path / "out", series)
    refused(result, log_text, tmp_path / "out", 3, "SOPInstanceUID is not a valid DICOM UID")


def test_slice_with_a_damaged_sop_class_is_refused_by_name_not_skipped(tmp_path, series, coarse_model):
    """Flipped header bytes (fuzz seed dicom-113) left a slice whose SOP Class UID was no UID and
    whose Rows were unreadable: it was skipped as a non-image object, the series then refused for a
    missing slice that named its neighbours, and the damaged value was logged."""
    def damage(ds):
        set_raw(ds, "SOPClassUID", b"\xca" + CANARY.encode())
        del ds.Rows
    damaged = _edit(series, 4, damage)
    result, log_text = predict(coarse_model, tmp_path / "out", series)
    refused(result, log_text, tmp_path / "out", 3, "SOPClassUID is not a valid DICOM UID", damaged.name)


def test_a_damaged_object_in_a_series_of_its_own_does_not_refuse_the_folder(tmp_path, series, coarse_model):
    """As an odd SR or RTSTRUCT beside the images: whatever it was, it is no slice of theirs."""
    source = sorted(series.glob("*.dcm"))[0]
    ds = pydicom.dcmread(source)
    ds.SeriesInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    set_raw(ds, "SOPClassUID", b"\xca" + CANARY.encode())
    del ds.Rows
    ds.save_as(series / "odd-object.dcm")
    result, log_text = predict(coarse_model, tmp_path / "out", series)
    assert check_contract(result, log_text, tmp_path / "out") == "ok"


def test_name_planted_in_a_uid_stays_out_of_the_log(tmp_path, series, coarse_model):
    """pydicom's 'Invalid value for VR UI' once printed the planted name."""
    for path in sorted(series.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        set_raw(ds, "FrameOfReferenceUID", CANARY.encode())
        ds.save_as(path)
    result, log_text = predict(coarse_model, tmp_path / "out", series)
    refused(result, log_text, tmp_path / "out", 3, "FrameOfReferenceUID is not a valid DICOM UID")


@pytest.mark.parametrize("text", [
    f"can't parse '{CANARY}' as a date",  # an apostrophe before the quoted value
    f"bad value 'O'{CANARY}' here",  # an apostrophe inside it
    f'value "{CANARY}" of PN',
    f"value '{CANARY}",  # never closed
    f"Unknown encoding '{CANARY}' JOHN 1970' - using default encoding",  # a quote inside, before a space
    f"Unknown encoding 'SMITH' {CANARY} 1970' - using default encoding",
    f"Value b'{CANARY}' is not valid for VR PN",  # Python's bytes
    f"r'{CANARY}' u'{CANARY}'",
])
def test_quoted_values_leave_a_library_message_whole(text):
    from tumorseg.logredact import redact

    assert CANARY not in redact(text) and "'...'" in redact(text)


def test_a_dicom_library_error_in_a_refusal_keeps_values_out():
    """Refusals of DICOM input quote the library's first line, which may quote a header value."""
    from tumorseg.dicom.files import first_line

    line = first_line(ValueError(f"Invalid value for VR PN: '{CANARY}'\nmore"))
    assert line == "Invalid value for VR PN: '...'"


def test_the_verbose_cause_of_a_refusal_keeps_values_out(tmp_path, scan, coarse_model, caplog, monkeypatch):
    """--verbose logs the library error behind a refusal; a value it quotes stays out."""
    import tumorseg.pipeline
    from tumorseg.errors import InputError

    def refuse(*args):
        try:
            raise ValueError(f"can't parse '{CANARY}' as a date")
        except ValueError:
            raise InputError("a header value cannot be read", "x.dcm") from None

    monkeypatch.setattr(tumorseg.pipeline.Segmenter, "segment_inputs", refuse)
    caplog.set_level("DEBUG")
    result, log_text = run_cli("predict", str(scan), "--model", str(coarse_model), "-o", str(tmp_path / "out"), "-v")
    refused(result, log_text, tmp_path / "out", 3, "a header value cannot be read")
    assert "caused by ValueError: can't parse '...' as a date" in log_text and "test_lying_inputs.py" in log_text


def test_third_party_warnings_reach_the_log_without_values(caplog):
    import logging
    import warnings

    from tumorseg import logredact

    import io

    other = logging.StreamHandler(io.StringIO())  # a second handler: the record is redacted once, not twice
    logging.getLogger().addHandler(other)
    try:
        logredact.install()
        with caplog.at_level(logging.WARNING):
            warnings.warn(f"Invalid value for VR PN: '{CANARY}'. See the standard", UserWarning)
            logging.getLogger("pydicom").warning("Invalid value for VR UI: %r. More", CANARY)
    finally:
        logging.getLogger().removeHandler(other)
    for text in (caplog.text, other.stream.getvalue()):
        assert "Invalid value for VR PN" in text and "Invalid value for VR UI" in text
        assert CANARY not in text
