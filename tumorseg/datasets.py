"""Labelled data sets: the cases of a Decathlon-layout data set or of a folder of case folders.

Shared by ``tumorseg train``, ``tumorseg validate`` and the cross-validation benchmark; it reads
only the file names and ``dataset.json`` (no torch), so scoring does not load the training stack.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, InputError, SequenceError
from .labels import LabelScheme, get_scheme
from .sequences import (DECATHLON_ORDER, SEQUENCES, StudyInputs, is_image_name, is_not_a_sequence, is_truth_file,
                        parse_sequence, sequence_from_filename, strip_image_suffix)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledCase:
    """One case with expert labels: its images, its label map and the label map's scheme."""
    case_id: str
    inputs: StudyInputs
    label_path: Path
    scheme: LabelScheme


def discover_cases(root: Path, label_scheme: str | None,
                   problems: list[tuple[str, str]] | None = None) -> list[LabelledCase]:
    """Cases of a Decathlon data set (``dataset.json``) or of a folder of case folders. A case
    folder with scans but several label files is left out; with ``problems`` its name and why are
    appended there (``validate`` reports it as a failed case rather than shrink n silently)."""
    root = Path(root)
    if (root / "dataset.json").is_file():
        return _decathlon_cases(root)
    if not root.is_dir():
        raise InputError("data set folder not found", root)
    if label_scheme is None:
        raise ConfigError(
            f"{root} has no dataset.json, so its label scheme is unknown; "
            "name it with --label-scheme (msd, brats2015, brats2021, brats2023)"
        )
    cases = [c for c in (_folder_case(d, get_scheme(label_scheme), problems) for d in sorted(root.iterdir())
                         if d.is_dir()) if c]
    if not cases and not problems:
        raise InputError("no case folders with images and a label file", root)
    return cases


def _decathlon_cases(root: Path) -> list[LabelledCase]:
    path = root / "dataset.json"
    try:
        spec = json.loads(path.read_text())
        modality = spec.get("modality") or spec.get("channel_names") or {}
        order = tuple(parse_sequence(modality[k]) for k in sorted(modality, key=int))
        labels = spec.get("labels", {})
        label_values = sorted(int(k) for k in labels)
        entries = [(root / entry["image"], root / entry["label"]) for entry in spec.get("training", [])]
    except (ValueError, KeyError, TypeError, AttributeError, SequenceError) as e:
        # nnU-Net v2's dataset.json (labels by name, one file per channel) lands here too.
        raise ConfigError(f"is not a Medical Segmentation Decathlon dataset.json (4D images, labels and "
                          f"modalities keyed by number, training entries with image and label): "
                          f"{type(e).__name__}: {e}", path) from None
    if order != DECATHLON_ORDER:
        raise ConfigError(f"modalities {order} are not in Decathlon order {DECATHLON_ORDER}", path)
    # A Decathlon data set declares its labels: they must be Task01's (the MSD scheme).
    msd = get_scheme("msd")
    if label_values != [0] + [l.value for l in msd.labels]:
        raise ConfigError(f"labels {labels} are not the Decathlon Task01 labels 0-3", path)
    # Values 1-3 exist in several schemes (BraTS 2023: 1 NCR, 2 ED, 3 ET): names that say another
    # tissue than Task01's (1 edema, 2 non-enhancing tumour, 3 enhancing tumour) are refused, not
    # scored as Task01.
    for value, name in sorted((int(k), str(v)) for k, v in labels.items()):
        said = _label_class(name)
        if value and said is not None and said != _MSD_CLASS[value]:
            raise ConfigError(f"labels {labels}: label {value} is named {name!r} ({said}), but the Decathlon "
                              f"Task01 scheme has {_MSD_CLASS[value]} there; give the cases as a folder of "
                              "case folders with --truth-scheme to score another scheme", path)
    cases = [LabelledCase(strip_image_suffix(image.name), StudyInputs(decathlon_4d=image), label, msd)
             for image, label in entries]
    if not cases:
        raise InputError("dataset.json lists no training cases", path)
    return cases


_MSD_CLASS = {1: "edema", 2: "non-enhancing or necrotic tumour", 3: "enhancing tumour"}


def _label_class(name: str) -> str | None:
    """The tissue a dataset.json label name says (Task01 wording or BraTS abbreviations), or None."""
    text = re.sub(r"[^a-z]", "", name.lower())
    if text in ("ed", "edema", "oedema", "peritumoraledema", "snfh") or "edema" in text:
        return _MSD_CLASS[1]
    if text in ("ncr", "net", "ncrnet", "necrosis", "necrotic") or "nonenhanc" in text or "necro" in text:
        return _MSD_CLASS[2]
    if text in ("et", "enhancing", "enhancingtumor", "enhancingtumour") or "enhanc" in text:
        return _MSD_CLASS[3]
    return None


def _folder_case(folder: Path, scheme: LabelScheme,
                 problems: list[tuple[str, str]] | None = None) -> LabelledCase | None:
    files, labels = {}, []
    for path in sorted(folder.iterdir()):
        if not is_image_name(path.name):
            continue
        if is_truth_file(path):
            labels.append(path)
        elif is_not_a_sequence(path):
            continue  # brainmask and other masks beside the sequences
        elif (seq := sequence_from_filename(path)) is not None:
            if seq in files:
                raise SequenceError(f"two files for {seq}: {files[seq].name} and {path.name}", folder)
            files[seq] = path
    if files and len(labels) > 1 and problems is not None:
        problems.append((folder.name, f"{len(labels)} label files ({', '.join(p.name for p in labels)}): "
                                      "which one is the ground truth is not guessed; leave one in the case folder"))
    if not files or len(labels) != 1:
        log.warning("skipping %s: %d label files, sequences %s", folder.name, len(labels), sorted(files))
        return None
    inputs = StudyInputs(files=tuple((s, files[s]) for s in SEQUENCES if s in files))
    return LabelledCase(folder.name, inputs, labels[0], scheme)


#: Same patient: whole-tumour labels this alike on one grid (BraTS 2018's Brats18_2013_20_1 and
#: BraTS 2015's pat0006 agree to Dice 1.000).
SAME_PATIENT_DICE = 0.9


def patient_groups(cases: list[LabelledCase], threshold: float = SAME_PATIENT_DICE) -> list[list[int]]:
    """Indices into ``cases`` grouped by patient: cases whose whole-tumour labels agree (Dice >=
    ``threshold``) on the same grid are one patient, transitively. Order: the first case of each
    group in input order."""
    import itertools

    import numpy as np

    from .evaluate import read_label_file

    masks = []
    for case in cases:
        truth = read_label_file(case.label_path)
        masks.append((truth.labels.shape, truth.affine, case.scheme.region_mask(truth.labels, "WT")))
    parent = list(range(len(cases)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in itertools.combinations(range(len(cases)), 2):
        (shape_i, affine_i, wt_i), (shape_j, affine_j, wt_j) = masks[i], masks[j]
        if shape_i != shape_j or not np.allclose(affine_i, affine_j, atol=1e-3):
            continue
        total = int(wt_i.sum()) + int(wt_j.sum())
        if total and 2 * int(np.count_nonzero(wt_i & wt_j)) / total >= threshold:
            parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(cases)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())
