"""Inputs that lie, for tests/test_lying_inputs.py and tests/test_fuzz.py: small real-derived
inputs, ways to damage them, and the contract every run must keep (docs/reliability.md).

The contract: exit 0 with a label map on the input's grid, or a named exit code 2-8 with a
one-line message; never exit 1, never a traceback, never a hang, never an output after a
failure, never the planted canary in the log.
"""
from __future__ import annotations

import gzip
import logging
import signal
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from click.testing import CliRunner
from pydicom.dataelem import RawDataElement
from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag

from conftest import brain_phantom, save_nifti, shared_data

CANARY = "CANARYNAME"
#: Longest a single run may take before it counts as a hang, seconds.
HANG_SECONDS = 120


def phantom_nifti(path: Path, shape=(40, 40, 40)) -> Path:
    """A skull-stripped-looking phantom (zero background) with qform and sform set."""
    affine = np.diag([1.2, 1.0, 1.1, 1.0])
    affine[:3, 3] = [-20.0, -22.0, -18.0]
    return save_nifti(path, brain_phantom(shape), affine)


def nifti_bytes(path: Path) -> bytes:
    """The uncompressed bytes of a .nii or .nii.gz file."""
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def write_nifti_bytes(path: Path, raw: bytes) -> Path:
    """``raw`` (an uncompressed NIfTI file) written as .nii.gz or .nii by ``path``'s name."""
    path.write_bytes(gzip.compress(raw, compresslevel=1) if path.name.endswith(".gz") else raw)
    return path


def with_header(source: Path, target: Path, **fields) -> Path:
    """A copy of ``source`` with NIfTI header fields set to raw values (no consistency kept)."""
    raw = bytearray(nifti_bytes(source))
    header = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw[:348])), check=False)
    for name, value in fields.items():
        header[name] = value
    raw[:348] = header.binaryblock
    return write_nifti_bytes(target, bytes(raw))


def small_real_series(target: Path, position: str = "HFS", canary: bool = True) -> Path:
    """A real MR series (decubitus-t1, one volunteer) made small: every 4th pixel of every 3rd
    slice, PixelSpacing and slice positions kept true to the pixels, patient name a canary."""
    target.mkdir(parents=True)
    files = sorted(shared_data("dicom", "decubitus-t1", position).glob("*.dcm"))[::3]
    for path in files:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array[::4, ::4].copy()
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelSpacing = [float(v) * 4 for v in ds.PixelSpacing]
        ds.PixelData = pixels.tobytes()
        if canary:
            ds.PatientName, ds.PatientID = CANARY, CANARY + "-ID"
        ds.save_as(target / path.name, enforce_file_format=True)
    return target


def set_raw(ds, keyword: str, raw: bytes, vr: str | None = None) -> None:
    """Put ``raw`` bytes as the value of ``keyword``, past pydicom's own conversions."""
    tag = Tag(tag_for_keyword(keyword))
    vr = vr or pydicom.datadict.dictionary_VR(tag)
    if len(raw) % 2:
        raw += b" "
    ds._dict[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)


@contextmanager
def deadline(seconds: int = HANG_SECONDS):
    """Fail with TimeoutError when the block runs longer than ``seconds`` (a hang)."""
    def expired(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class LogCollector(logging.Handler):
    """Every log record's final text, as a user's terminal would show it (after tumorseg's
    redaction filter, which the CLI installs on the root logger's handlers)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def run_cli(*args: str):
    """``tumorseg ARGS`` in this process (exceptions caught as the CLI catches them), with the
    log it wrote; a run past :data:`HANG_SECONDS` raises TimeoutError."""
    from tumorseg.cli import main

    collector = LogCollector()
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        with deadline():
            result = CliRunner().invoke(main, list(args))
    finally:
        root.removeHandler(collector)
    return result, "\n".join(collector.lines)


def check_contract(result, log_text: str, out: Path, reference_grid: tuple | None = None) -> str:
    """Assert the contract (module docstring) for one run; returns its outcome ("ok" or "exit N")."""
    text = result.output
    assert result.exit_code != 1, f"internal error: {text}"
    assert "Traceback" not in text and "Traceback" not in log_text, text
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert CANARY not in text and CANARY not in log_text, "the planted canary reached the log"
    if result.exit_code == 0:
        labels = nib.load(str(out / "segmentation.nii.gz"))
        data = np.asarray(labels.dataobj)
        assert np.isfinite(labels.affine).all()
        if int(labels.header["qform_code"]):  # a qform with code 0 is unused, whatever it holds
            assert np.isfinite(labels.header.get_qform()).all()
        if reference_grid is not None:
            shape, affine = reference_grid
            assert data.shape == tuple(shape)
            np.testing.assert_allclose(labels.affine, affine, atol=1e-4)
        return "ok"
    assert 2 <= result.exit_code <= 8, text
    start = text.find("rror:")  # "error:" from tumorseg, "Error:" from click's usage errors
    assert start > 0 and text[start:].rstrip("\n").count("\n") == 0, f"not one line: {text!r}"
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not written, f"output left after a failure: {written}"
    return f"exit {result.exit_code}"
