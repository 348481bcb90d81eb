"""Coverage-guided fuzzing of the NIfTI and DICOM readers with atheris (libFuzzer for Python).

    pip install atheris
    python benchmarks/fuzz_atheris.py nifti --seconds 600 --findings fuzz-findings/
    python benchmarks/fuzz_atheris.py dicom --shared ../shared/data --seconds 600 --findings fuzz-findings/

``nifti``: each input is one file's bytes, read with ``read_volume`` as ``.nii`` (and, when it
starts with gzip's magic, as ``.nii.gz``). ``dicom``: each input replaces one file of a small real
series (decubitus-t1 HFS, every 3rd slice) and the folder is read with ``read_series``. A finding
is any exception that is not a :class:`~tumorseg.errors.TumorsegError` (a named refusal), or a
run past libFuzzer's time or memory limits: libFuzzer writes the input under ``--findings`` and
stops. The seed corpus is written there too (``corpus-*``), so a rerun continues from it. The
seeded mutation tests (tests/test_fuzz.py) are what CI runs; this is the longer search, and its
findings go into docs/reliability.md.
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports():
    import nibabel  # noqa: F401
    import pydicom  # noqa: F401

    from tumorseg.dicom import files, find, frames, stack, volume  # noqa: F401
    from tumorseg.stages import read

from tumorseg import logredact
from tumorseg.errors import TumorsegError


def nifti_seeds(corpus: Path) -> None:
    import nibabel as nib

    rng = np.random.default_rng(0)
    array = np.where(rng.random((12, 10, 8)) > 0.3, rng.normal(100, 10, (12, 10, 8)), 0).astype(np.float32)
    image = nib.Nifti1Image(array, np.diag([1.2, 1.0, 1.1, 1.0]))
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=1)
    raw = image.to_bytes()
    (corpus / "seed.nii").write_bytes(raw)
    (corpus / "seed.nii.gz").write_bytes(gzip.compress(raw))


def nifti_target(work: Path):
    def target(data: bytes) -> None:
        suffix = ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
        path = work / f"input{suffix}"
        path.write_bytes(data)
        try:
            read.read_volume(path)
        except TumorsegError:
            pass
    return target


def dicom_series(shared: Path, work: Path) -> tuple[Path, Path]:
    """A small real series in ``work/series`` (every 3rd slice of decubitus HFS, every 4th pixel)
    and the file that each input replaces."""
    series = work / "series"
    series.mkdir()
    for path in sorted((shared / "dicom" / "decubitus-t1" / "HFS").glob("*.dcm"))[::3]:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array[::4, ::4].copy()
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelSpacing = [float(v) * 4 for v in ds.PixelSpacing]
        ds.PixelData = pixels.tobytes()
        ds.save_as(series / path.name, enforce_file_format=True)
    return series, sorted(series.glob("*.dcm"))[len(list(series.glob("*.dcm"))) // 2]


def dicom_target(series: Path, victim: Path):
    original = victim.read_bytes()

    def target(data: bytes) -> None:
        victim.write_bytes(data)
        try:
            volume.read_series(series)
        except TumorsegError:
            pass
        finally:
            victim.write_bytes(original)
    return target, original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reader", choices=["nifti", "dicom"])
    parser.add_argument("--seconds", type=int, default=300)
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings"))
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    args, libfuzzer_args = parser.parse_known_args()
    logredact.install()  # as the CLI runs: pydicom's value-quoting warnings off
    args.findings.mkdir(parents=True, exist_ok=True)
    corpus = args.findings / f"corpus-{args.reader}"
    corpus.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tumorseg-fuzz-"))
    try:
        if args.reader == "nifti":
            nifti_seeds(corpus)
            target = nifti_target(work)
        else:
            series, victim = dicom_series(args.shared, work)
            target, original = dicom_target(series, victim)
            (corpus / "seed.dcm").write_bytes(original)
        flags = [sys.argv[0], str(corpus), f"-max_total_time={args.seconds}", "-rss_limit_mb=4096",
                 "-timeout=60", f"-artifact_prefix={args.findings}/{args.reader}-", "-print_final_stats=1",
                 "-max_len=2000000", *libfuzzer_args]
        atheris.Setup(flags, target)
        atheris.Fuzz()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
