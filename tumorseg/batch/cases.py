"""Finding the cases of a batch: a folder tree, a Decathlon data set, or a CSV manifest.

* A Decathlon data set (``dataset.json``, ``imagesTr/``, ``imagesTs/``), or one of its image
  folders: each 4D image is a case.
* A CSV manifest: one row per case, columns ``case_id`` (optional) and either ``image`` (a 4D
  file), one column per sequence (``flair``, ``t1``, ``t1gd``, ``t2`` or their aliases), or
  ``dicom`` (a study folder). Relative paths are relative to the CSV file.
* Any other folder tree: a folder holding image files (NIfTI, NRRD, MHA) is one case, named by
  its sequences' file names; the DICOM files under a tree are grouped by study, and each study is
  one case whose folder is the deepest one holding all its files.

Case ids come from folder and file names (never from DICOM tags) and are made safe for use as
folder names; with an ``id_key`` they are a keyed hash of that id instead, for input trees whose
folders carry patient names or numbers. A problem with one case (an unknown file name, say) surfaces when that case is
read, so discovery itself only fails when it finds nothing at all.
"""
from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_path, check_output_folder
from ..dicom.files import has_dicom_marker
from ..errors import InputError, TumorsegError
from ..inputs import CaseInputs, DicomInputs
from ..sequences import SEQUENCES, StudyInputs, assign_sequences, is_image_name, is_not_a_sequence, parse_sequence, strip_image_suffix
from ..stages.read import volume_count
from .layout import CASE_RECORD, LOCK_FILE, MANIFEST_JSON

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_ID_LENGTH = 80


@dataclass(frozen=True)
class BatchCase:
    case_id: str
    inputs: CaseInputs | None  # None when the case cannot be set up (see ``problem``)
    source: str  # where it came from, relative to the batch root (for the manifest)
    problem: TumorsegError | None = None  # why the case cannot run, found at discovery

    def roles(self) -> str:
        """Which input plays which part: the sequence of each file, the DICOM series named per
        sequence (hashed with the files, so that a manifest whose columns are corrected redoes the
        case)."""
        if self.inputs is None:
            return ""
        if isinstance(self.inputs, DicomInputs):
            return "dicom " + " ".join(f"{sequence}={series}" for sequence, series in self.inputs.explicit)
        if self.inputs.decathlon_4d is not None:
            return "decathlon-4d"
        return " ".join(f"{sequence}={path.name}" for sequence, path in self.inputs.files)

    def files(self, exclude: Path | None = None) -> list[Path]:
        """Every input file of the case (DICOM: every file under its folders, except in batch
        output folders, ``exclude`` or any other), sorted."""
        if self.inputs is None:
            return []
        if isinstance(self.inputs, DicomInputs):
            found = []
            for folder in self.inputs.folders:
                for here, dirs, names in os.walk(folder):
                    dirs[:] = [d for d in dirs if not _is_output(Path(here) / d, exclude)]
                    found.extend(p for p in (Path(here) / n for n in names) if p.is_file())
            return sorted(found)
        if self.inputs.decathlon_4d is not None:
            return [self.inputs.decathlon_4d]
        return [p for _, p in self.inputs.files]


def safe_case_id(text: str) -> str:
    """A folder name made of letters, digits, ``.``, ``_`` and ``-`` only (never ``.`` or ``..``)."""
    safe = _SAFE.sub("_", text).strip("._-")[:MAX_ID_LENGTH]
    return safe or "case"


def discover(root: Path, exclude: Path | None = None, id_key: bytes | None = None) -> list[BatchCase]:
    """The cases under ``root`` (a folder or a CSV manifest), with unique safe ids, in a stable order.

    ``exclude`` (the batch's output folder) and any folder holding a batch's outputs are never
    searched, so an output folder inside the input tree does not turn into cases. With ``id_key``
    each id is replaced by ``case-`` and 12 hex digits of HMAC-SHA256(id_key, id): no part of a
    folder or file name reaches an output name, and without the key nobody can test guessed
    names (or record numbers) against an id."""
    root = Path(root)
    if not root.exists():
        raise InputError("batch input not found", root)
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise InputError("a batch input must be a folder or a CSV manifest (.csv)", root)
        cases = _csv_cases(root)
    elif (root / "dataset.json").is_file() or (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        cases = _decathlon_cases(root)
    elif root.name in ("imagesTr", "imagesTs"):
        cases = _decathlon_cases(root.parent, only=root.name)
    else:
        cases = _tree_cases(root, exclude)
    if not cases:
        raise InputError("no cases found (folders of NIfTI/NRRD/MHA sequences, DICOM studies, "
                         "a Decathlon data set or a CSV manifest)", root)
    cases = _unique_ids(cases)
    if id_key is not None:
        cases = _unique_ids([BatchCase(hashed_case_id(c.case_id, id_key), c.inputs, c.source, c.problem)
                             for c in cases])
    return cases


def hashed_case_id(case_id: str, key: bytes) -> str:
    return "case-" + hmac.new(key, case_id.encode(), hashlib.sha256).hexdigest()[:12]


ID_KEY_FILE = "case-id.key"


def case_id_key(output: Path) -> bytes:
    """The secret key of ``output``'s hashed case ids, made on first use and kept there, so a rerun
    into the same folder gives the same ids (a lost key only makes the next run start afresh)."""
    path = Path(output) / ID_KEY_FILE
    if not path.is_file():
        check_output_folder(output)  # a named error (exit 6) rather than mkdir's
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, private=True) as tmp:
            tmp.write_text(secrets.token_hex(32) + "\n")
    try:
        return bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise InputError("not a case id key (64 hex digits); restore it or delete it to start afresh", path) from None


def unique_case_ids(ids: list[str]) -> list[str]:
    """The ids with repeats numbered (``-2``, ``-3``), compared case-insensitively since some file
    systems ignore case; a number never produces an id that is already taken."""
    taken = {i.lower() for i in ids}
    used: set[str] = set()
    out = []
    for case_id in ids:
        candidate, n = case_id, 1
        while candidate.lower() in used or (n > 1 and candidate.lower() in taken):
            n += 1
            candidate = f"{case_id}-{n}"
        used.add(candidate.lower())
        out.append(candidate)
    return out


def _unique_ids(cases: list[BatchCase]) -> list[BatchCase]:
    ids = unique_case_ids([c.case_id for c in cases])
    return [c if c.case_id == i else BatchCase(i, c.inputs, c.source, c.problem) for c, i in zip(cases, ids)]


def _decathlon_cases(root: Path, only: str | None = None) -> list[BatchCase]:
    cases = []
    for split in ("imagesTr", "imagesTs"):
        folder = root / split
        if (only and split != only) or not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and is_image_name(path.name):
                cases.append(BatchCase(safe_case_id(strip_image_suffix(path.name)), StudyInputs(decathlon_4d=path),
                                       str(path.relative_to(root))))
    return cases


def _tree_cases(root: Path, exclude: Path | None = None) -> list[BatchCase]:
    image_cases: list[BatchCase] = []
    dicom_folders: list[Path] = []
    seen: set[str] = set()
    # followlinks: a case folder linked in from elsewhere is a case (os.walk skips linked folders
    # silently); each real folder is walked once, so a link to an ancestor is no loop.
    for folder, dirs, files in os.walk(root, followlinks=True):
        here = Path(folder)
        real = os.path.realpath(here)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _is_output(here / d, exclude))
        if any(is_image_name(f) for f in files):
            rel = here.relative_to(root)
            case_id = safe_case_id(root.name if str(rel) == "." else str(rel).replace(os.sep, "_"))
            image_cases.append(_image_case(case_id, here, str(rel)))
            dirs[:] = []  # a case folder's subfolders belong to it
        elif any(has_dicom_marker(here / f) for f in sorted(files)[:20] if f.upper() != "DICOMDIR"):
            dicom_folders.append(here)
    return image_cases + _dicom_cases(root, dicom_folders)


def _is_output(folder: Path, exclude: Path | None) -> bool:
    if exclude is not None and folder.resolve() == exclude.resolve():
        return True
    return (folder / CASE_RECORD).is_file() or (folder / LOCK_FILE).exists() or _is_batch_manifest(folder / MANIFEST_JSON)


def _is_batch_manifest(path: Path) -> bool:
    """A tumorseg batch's manifest.json, not another tool's file of that name in a case folder."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, unreadable, or not JSON
        return False
    return isinstance(document, dict) and "tumorseg_version" in document and "cases" in document


def _image_case(case_id: str, folder: Path, source: str) -> BatchCase:
    """A folder's image files: one 4D Decathlon file, or one file per sequence named by its name.

    A folder whose files cannot be mapped to sequences becomes a case with that problem, so it
    fails alone instead of stopping the discovery."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_name(p.name) and not is_not_a_sequence(p))
    try:
        inputs = assign_sequences(files, {}, lambda p: volume_count(p) > 1)
    except TumorsegError as e:
        return BatchCase(case_id, None, source, e)
    return BatchCase(case_id, inputs, source)


def _dicom_cases(root: Path, folders: list[Path]) -> list[BatchCase]:
    """Group folders holding DICOM files by study; a study's case folder is their common parent."""
    by_study: dict[str, list[Path]] = {}
    for folder in folders:
        by_study.setdefault(_study_key(folder), []).append(folder)
    cases = []
    groups = []
    for study, members in by_study.items():
        parent = Path(os.path.commonpath([str(m) for m in members]))
        groups.append((parent, members))
    for parent, members in sorted(groups, key=lambda g: (str(g[0]), str(g[1][0]))):
        # The series reader searches folders recursively: a member inside another is redundant.
        members = [m for m in members if not any(o != m and o in m.parents for o in members)]
        rel = parent.relative_to(root)
        name = root.name if str(rel) == "." else str(rel).replace(os.sep, "_")
        # Several studies under one folder: number them (ids never come from DICOM tags).
        cases.append(BatchCase(safe_case_id(name), DicomInputs(tuple(sorted(members))), str(rel)))
    return cases


def _study_key(folder: Path) -> str:
    """A hash of the StudyInstanceUID of the folder's first DICOM file (not shown anywhere)."""
    import pydicom

    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.upper() != "DICOMDIR" and has_dicom_marker(path):
            try:
                uid = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).get(
                    "StudyInstanceUID", "")
            except Exception:  # unreadable: the case fails with the reader's message later
                uid = ""
            return hashlib.sha256(str(uid or folder).encode()).hexdigest()
    return hashlib.sha256(str(folder).encode()).hexdigest()


_CSV_PATH_COLUMNS = ("image", "dicom")


def _csv_cases(manifest: Path) -> list[BatchCase]:
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"not a readable CSV manifest ({e})", manifest) from None
    if not rows:
        raise InputError("CSV manifest has no rows", manifest)
    columns = {c.strip().lower(): c for c in rows[0] if c}
    sequence_columns = {}
    for key, original in columns.items():
        if key in ("case_id", "id", "label", "labels", "truth") or key in _CSV_PATH_COLUMNS:
            continue
        try:
            sequence_columns[parse_sequence(key)] = original
        except Exception:
            raise InputError(f"unknown column {original!r}; expected case_id, image, dicom, or sequence "
                             "columns flair, t1, t1gd, t2", manifest) from None
    if not sequence_columns and not any(c in columns for c in _CSV_PATH_COLUMNS):
        raise InputError("CSV manifest needs an image, dicom or sequence (flair, t1, t1gd, t2) column", manifest)
    base = manifest.parent
    cases = []
    for n, row in enumerate(rows, start=2):  # line numbers as a spreadsheet shows them
        get = lambda key: (row.get(columns[key]) or "").strip() if key in columns else ""  # noqa: E731
        raw_id = get("case_id") or get("id")
        source = f"{manifest.name}:{n}"
        image, dicom = get("image"), get("dicom")
        files = {seq: (row.get(col) or "").strip() for seq, col in sequence_columns.items()}
        files = {seq: _resolve(base, p) for seq, p in files.items() if p}
        given = [bool(image), bool(dicom), bool(files)]
        first = image or dicom or next(iter(files.values()), "")
        case_id = safe_case_id(raw_id or strip_image_suffix(Path(str(first)).name) or f"row{n}")
        if sum(given) != 1:
            cases.append(BatchCase(case_id, None, source, InputError(
                f"line {n}: give exactly one of an image, a dicom folder, or sequence columns", manifest)))
        elif image:
            cases.append(BatchCase(case_id, StudyInputs(decathlon_4d=_resolve(base, image)), source))
        elif dicom:
            cases.append(BatchCase(case_id, DicomInputs((_resolve(base, dicom),)), source))
        else:
            cases.append(BatchCase(case_id, StudyInputs(files=tuple((s, files[s]) for s in SEQUENCES if s in files)),
                                   source))
    return cases


def _resolve(base: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path
