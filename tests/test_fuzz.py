"""Seeded mutation fuzzing of the three readers a user's files reach: NIfTI (``predict``), DICOM
series (``predict``) and ``rtstruct`` (a mask and its series).

Every mutant of a real-derived input must keep the contract of tests/mutants.py: exit 0 with a
label map (or RTSTRUCT) on the input's grid, or exit 2-8 with one line; never 1, no traceback, no
hang, no output after a failure, no planted name in the log. Failures are collected and reported
together with the seed that rebuilds the mutant.

    pytest tests/test_fuzz.py -s -n 0                     # the CI size: ~330 mutants
    TUMORSEG_FUZZ_SCALE=10 TUMORSEG_FUZZ_REPORT=fuzz.json pytest tests/test_fuzz.py -s -n 0

``TUMORSEG_FUZZ_SCALE`` multiplies the number of mutants; ``TUMORSEG_FUZZ_REPORT`` writes the counts
(per category and operator: success, refusals by exit code, the longest run) and each mutant's seed,
operator and outcome as JSON, so that two runs (two commits) can be compared mutant by mutant.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import make_tiny_model, save_nifti
from mutants import CANARY, check_contract, nifti_bytes, phantom_nifti, run_cli, set_raw, small_real_series

SCALE = float(os.environ.get("TUMORSEG_FUZZ_SCALE", "1"))
COUNTS = {"nifti": 150, "dicom": 120, "rtstruct": 60}
REPORT: dict[str, dict] = {}


def _count(category: str) -> int:
    return max(1, int(COUNTS[category] * SCALE))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random model (labels somewhere, for NIfTI) and one that finds nothing (an empty RTSTRUCT
    is quick to write), both on a 4 mm grid."""
    root = tmp_path_factory.mktemp("fuzz-models")
    return (make_tiny_model(root / "random", spacing=(4.0, 4.0, 4.0)),
            make_tiny_model(root / "empty", spacing=(4.0, 4.0, 4.0), background_bias=100.0))


def teardown_module(module) -> None:
    if not REPORT:
        return
    for category, entry in REPORT.items():
        print(f"\nfuzz {category}: {entry['mutants']} mutants, {json.dumps(entry['outcomes'])}, "
              f"longest {entry['longest_s']} s")
    target = os.environ.get("TUMORSEG_FUZZ_REPORT")
    if target:
        Path(target).write_text(json.dumps(REPORT, indent=2) + "\n")


def _fuzz(category: str, make_mutant, run, tmp_path: Path) -> None:
    """Build and run ``_count(category)`` mutants; assert the contract for all, reporting every
    failure with its seed and operator."""
    outcomes: Counter = Counter()
    by_operator: dict[str, Counter] = defaultdict(Counter)
    failures, longest, each = [], 0.0, []
    for seed in range(_count(category)):
        rng = random.Random(f"{category}-{seed}")
        work = tmp_path / f"m{seed}"
        work.mkdir()
        operator, target = make_mutant(rng, work)
        out = work / "out"
        start = time.perf_counter()
        try:
            outcome = run(target, out)
        except AssertionError as e:
            failures.append(f"seed {seed} ({operator}): {str(e).splitlines()[0][:300]}")
            outcome = "contract broken"
        longest = max(longest, time.perf_counter() - start)
        outcomes[outcome] += 1
        by_operator[operator][outcome] += 1
        each.append({"seed": seed, "operator": operator, "outcome": outcome})
        shutil.rmtree(work, ignore_errors=True)
    REPORT[category] = {"mutants": sum(outcomes.values()), "outcomes": dict(sorted(outcomes.items())),
                        "by_operator": {k: dict(v) for k, v in sorted(by_operator.items())},
                        "longest_s": round(longest, 2), "each": each}
    assert not failures, f"{len(failures)} mutants broke the contract:\n" + "\n".join(failures)
    assert outcomes["ok"] > 0 and len(outcomes) > 2, f"the mutants test too little: {dict(outcomes)}"


# --- NIfTI -----------------------------------------------------------------------------------

_HEADER = nib.nifti1.header_dtype
_FLOAT_POOL = [0.0, -1.0, 1.0, 0.5, 1e-30, 1e30, -1e30, float("nan"), float("inf"), -float("inf"), 3.4e38]
_INT_POOL = [0, -1, 1, 2, 3, 4, 5, 7, 8, 16, 32, 64, 255, 256, 511, 1024, 4096, 32767, -32768, 1000]
_HEADER_FIELDS = ["sizeof_hdr", "dim", "pixdim", "datatype", "bitpix", "vox_offset", "scl_slope", "scl_inter",
                  "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                  "qoffset_z", "srow_x", "srow_y", "srow_z", "dim_info", "slice_code", "xyzt_units",
                  "intent_code", "magic", "slice_start", "slice_end"]


def _mutate_header_field(rng: random.Random, raw: bytearray) -> str:
    header = np.frombuffer(bytes(raw[:348]), dtype=_HEADER).copy()
    field = rng.choice(_HEADER_FIELDS)
    base = _HEADER[field].base
    if field == "magic":
        header[field] = rng.choice([b"n+2\0", b"ni1\0", b"\0\0\0\0", b"xyz\0"])
        name = f"header {field}"
    else:
        value = rng.choice(_FLOAT_POOL if base.kind == "f" else _INT_POOL)
        with np.errstate(all="ignore"):  # integers wrap, as a damaged file's would
            cast = np.array(value, dtype=np.float64 if base.kind == "f" else np.int64).astype(base)
        if _HEADER[field].shape:
            index = rng.randrange(_HEADER[field].shape[0])
            header[field][0][index] = cast
            name = f"header {field}[{index}]"
        else:
            header[field] = cast
            name = f"header {field}"
    raw[:348] = header.tobytes()
    return name


def _nifti_mutant(base: Path):
    def make(rng: random.Random, work: Path) -> tuple[str, Path]:
        compressed = base.read_bytes()
        raw = bytearray(nifti_bytes(base))
        operator = rng.choice(["gzip bit flips", "gzip truncated", "gzip trailing bytes", "header field",
                               "header field", "header field", "two header fields", "raw bytes flipped",
                               "uncompressed truncated", "voxels NaN"])
        suffix = ".nii" if operator == "uncompressed truncated" else ".nii.gz"
        target = work / f"case-t2f{suffix}"
        if operator == "gzip bit flips":
            data = bytearray(compressed)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            target.write_bytes(bytes(data))
            return operator, target
        if operator == "gzip truncated":
            target.write_bytes(compressed[: rng.randrange(len(compressed))])
            return operator, target
        if operator == "gzip trailing bytes":
            target.write_bytes(compressed + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
            return operator, target
        if operator == "header field":
            operator = _mutate_header_field(rng, raw)
        elif operator == "two header fields":
            _mutate_header_field(rng, raw)
            _mutate_header_field(rng, raw)
        elif operator == "raw bytes flipped":
            for _ in range(rng.randint(1, 8)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        elif operator == "uncompressed truncated":
            raw = raw[: rng.randrange(len(raw))]
        elif operator == "voxels NaN":
            values = np.frombuffer(bytes(raw[352:]), dtype=np.float32).copy()
            values[rng.randrange(values.size)] = rng.choice([np.nan, np.inf])
            raw[352:] = values.tobytes()
        data = bytes(raw)
        target.write_bytes(data if suffix == ".nii" else gzip.compress(data, compresslevel=1))
        return operator, target
    return make


def test_fuzz_nifti_reader(tmp_path, models):
    random_model, _ = models
    base = tmp_path / "base-t2f.nii.gz"
    save_nifti(base, nib.load(str(phantom_nifti(tmp_path / "p.nii.gz"))).get_fdata(dtype=np.float32),
               nib.load(str(tmp_path / "p.nii.gz")).affine)

    def run(target: Path, out: Path) -> str:
        result, log_text = run_cli("predict", str(target), "--model", str(random_model), "-o", str(out), "-q",
                                   "--brain-extraction", "off", "--no-tta")
        grid = None
        if result.exit_code == 0:
            image = nib.load(str(target))
            grid = (image.shape[:3], image.affine)
        return check_contract(result, log_text, out, grid)

    _fuzz("nifti", _nifti_mutant(base), run, tmp_path)


# --- DICOM -----------------------------------------------------------------------------------

_DICOM_KEYWORDS = ["PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "Rows", "Columns",
                   "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
                   "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "SliceThickness",
                   "SOPInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "StudyInstanceUID", "SOPClassUID",
                   "Modality", "NumberOfFrames", "SeriesDescription", "ImageType", "EchoTime", "SeriesNumber",
                   "InstanceNumber", "HighBit", "PatientName"]
_RAW_POOL = [b"", b"abc", b"1\\2", b"nan\\nan\\nan", b"inf", b"1e30\\0\\0", b"-1", b"0", b"1.2.3\\4.5",
             b"1\\0\\0\\0\\1\\0\\0", b"\x00\x00", b"\xff\xff", b"\x00\x01\x00\x00", CANARY.encode(),
             b"1.2.840.10008.5.1.4.1.1.481.3", b"MONOCHROME1", b"RGB", b"12", b"-0.0\\1e-9"]


def _dicom_mutant(base: Path):
    def make(rng: random.Random, work: Path) -> tuple[str, Path]:
        folder = work / "series"
        shutil.copytree(base, folder)
        files = sorted(folder.glob("*.dcm"))
        victim = rng.choice(files)
        operator = rng.choice(["element value", "element value", "element value", "element deleted",
                               "header bytes flipped", "pixel bytes flipped", "file truncated", "file removed",
                               "file copied", "UID of another file", "canary in a text element",
                               "transfer syntax"])
        if operator in ("element value", "element deleted", "UID of another file", "canary in a text element",
                        "transfer syntax"):
            ds = pydicom.dcmread(victim)
            keyword = rng.choice(_DICOM_KEYWORDS)
            if operator == "element value":
                set_raw(ds, keyword, rng.choice(_RAW_POOL))
                operator = f"element value {keyword}"
            elif operator == "element deleted":
                if keyword in ds:
                    del ds[keyword]
                operator = f"element deleted {keyword}"
            elif operator == "UID of another file":
                other = pydicom.dcmread(rng.choice(files), stop_before_pixels=True)
                ds.SOPInstanceUID = other.SOPInstanceUID
            elif operator == "canary in a text element":
                keyword = rng.choice(["SeriesDescription", "ProtocolName", "StudyDescription", "InstitutionName",
                                      "ReferringPhysicianName", "ImageComments", "FrameOfReferenceUID"])
                set_raw(ds, keyword, CANARY.encode())
                operator = f"canary in {keyword}"
            else:
                uid = rng.choice([pydicom.uid.DeflatedExplicitVRLittleEndian, pydicom.uid.JPEGBaseline8Bit,
                                  pydicom.uid.ImplicitVRLittleEndian, "1.2.3.4.5"])
                ds.file_meta.TransferSyntaxUID = uid
                operator = f"transfer syntax {uid.name if hasattr(uid, 'name') else uid}"
                raw = victim.read_bytes()
                body = raw[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength):]
                from io import BytesIO

                from pydicom.filewriter import write_file_meta_info

                meta = BytesIO()
                write_file_meta_info(meta, ds.file_meta, enforce_standard=False)
                victim.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + body)
                return operator, folder
            ds.save_as(victim)
        elif operator in ("header bytes flipped", "pixel bytes flipped"):
            data = bytearray(victim.read_bytes())
            low, high = (132, min(len(data), 2500)) if operator == "header bytes flipped" else (len(data) - 8192, len(data))
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(low, high)] = rng.randrange(256)
            victim.write_bytes(bytes(data))
        elif operator == "file truncated":
            data = victim.read_bytes()
            victim.write_bytes(data[: rng.randrange(len(data))])
        elif operator == "file removed":
            victim.unlink()
        elif operator == "file copied":
            shutil.copy(victim, folder / "copy.dcm")
        return operator, folder
    return make


@pytest.fixture(scope="module")
def base_series(tmp_path_factory) -> Path:
    return small_real_series(tmp_path_factory.mktemp("fuzz-series") / "series")


def test_fuzz_dicom_reader(tmp_path, models, base_series):
    _, empty_model = models

    def run(target: Path, out: Path) -> str:
        result, log_text = run_cli("predict", str(target), "--model", str(empty_model), "-o", str(out), "-q",
                                   "--brain-extraction", "off", "--no-tta")
        grid = None
        if result.exit_code == 0:
            from tumorseg.dicom.volume import read_series

            volume, _ = read_series(target)
            grid = (volume.array.shape, volume.affine)
            assert (out / "rtstruct.dcm").exists()
        return check_contract(result, log_text, out, grid)

    _fuzz("dicom", _dicom_mutant(base_series), run, tmp_path)


# --- rtstruct --------------------------------------------------------------------------------

def test_fuzz_rtstruct(tmp_path, base_series):
    from tumorseg.dicom.volume import read_series

    volume, _ = read_series(base_series)
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    centre = tuple(s // 2 for s in labels.shape)
    labels[centre[0] - 4:centre[0] + 4, centre[1] - 4:centre[1] + 4, centre[2] - 2:centre[2] + 2] = 1
    labels[centre[0] - 2:centre[0] + 2, centre[1] - 2:centre[1] + 2, centre[2] - 1:centre[2] + 1] = 3
    mask = save_nifti(tmp_path / "mask.nii.gz", labels, volume.affine)
    mask_mutant, series_mutant = _nifti_mutant(mask), _dicom_mutant(base_series)

    def make(rng: random.Random, work: Path) -> tuple[str, Path]:
        if rng.random() < 0.6:
            operator, damaged = mask_mutant(rng, work)
            if operator == "voxels NaN":  # the mask is uint8: put values no scheme has instead
                operator = "labels outside the scheme"
                data = labels.copy()
                data[centre] = rng.choice([5, 9, 200])
                save_nifti(damaged, data, volume.affine)
            return f"mask: {operator}", work
        operator, _ = series_mutant(rng, work)
        shutil.copy(mask, work / "case-t2f.nii.gz")
        return f"series: {operator}", work

    def run(work: Path, out: Path) -> str:
        mask_path = next(work.glob("case-t2f.nii*"))
        series = work / "series" if (work / "series").exists() else base_series
        result, log_text = run_cli("rtstruct", "--mask", str(mask_path), "--series", str(series), "-o", str(out),
                                   "-q")
        outcome = check_contract_rtstruct(result, log_text, out)
        return outcome

    _fuzz("rtstruct", make, run, tmp_path)


def check_contract_rtstruct(result, log_text: str, out: Path) -> str:
    if result.exit_code == 0:
        ds = pydicom.dcmread(out / "rtstruct.dcm")
        assert ds.Modality == "RTSTRUCT" and "StructureSetROISequence" in ds
        assert CANARY not in result.output and CANARY not in log_text
        return "ok"
    return check_contract(result, log_text, out)
