"""MR sequences: canonical names, file-name recognition, and mapping inputs to a model's channels.

Canonical names are ``flair``, ``t1``, ``t1gd`` and ``t2``; the Decathlon 4D layout stores them
as channels 0-3 in that order. A file name is recognised only when exactly one sequence's alias
appears among its tokens; anything else is refused, never guessed.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import SequenceError

log = logging.getLogger(__name__)

SEQUENCES: tuple[str, ...] = ("flair", "t1", "t1gd", "t2")
DESCRIPTIONS = {
    "flair": "T2-weighted FLAIR",
    "t1": "native T1-weighted",
    "t1gd": "T1-weighted after gadolinium contrast",
    "t2": "T2-weighted",
}
#: Order of the channels in a Medical Segmentation Decathlon Task01_BrainTumour 4D image.
DECATHLON_ORDER: tuple[str, ...] = ("flair", "t1", "t1gd", "t2")
#: Which sequence's grid the others go onto (and the outputs land on): the first present. T1 after
#: contrast is what radiotherapy planners contour on, and usually the finest 3D series.
REFERENCE_ORDER: tuple[str, ...] = ("t1gd", "flair", "t1", "t2")

# File-name tokens (lower case) for each sequence: BraTS 2023 (t2f, t1n, t1c, t2w), earlier
# BraTS (flair, t1, t1ce, t2) and common spellings.
ALIASES: dict[str, frozenset[str]] = {
    "flair": frozenset({"flair", "t2f", "t2flair", "fla", "tirm", "darkfluid"}),
    "t1": frozenset({"t1", "t1n", "t1w", "t1native"}),
    "t1gd": frozenset({"t1gd", "t1c", "t1ce", "t1post", "t1contrast", "t1wce"}),
    "t2": frozenset({"t2", "t2w"}),
}
#: Tokens that mark a T1 as contrast-enhanced (BIDS ``ce-`` entity values, common spellings;
#: ``pluscontrast`` is what "+C" and "C+" become).
CONTRAST_TOKENS = frozenset({"ce", "gd", "gad", "gado", "gadolinium", "contrast", "post", "postcontrast",
                             "postgad", "postgd", "pluscontrast", "enhanced", "km"})
#: Tokens that say a T1 had no contrast: with a contrast token too ("t1_no_contrast",
#: "t1_pre_gd"), the name is refused rather than read either way.
NO_CONTRAST_TOKENS = frozenset({"no", "non", "none", "wo", "without", "pre", "before", "precontrast",
                                "noncontrast", "nc", "native", "nativ", "ohne", "vor"})
#: "post" that is not contrast: post-operative, posterior fossa, after treatment or at follow-up.
NOT_CONTRAST_POST = frozenset({"op", "operative", "surgery", "surgical", "resection", "fossa", "rt", "radiotherapy",
                               "radiation", "treatment", "therapy", "tx", "chemo", "chemotherapy", "fu", "followup"})
#: Tokens of images that are not one of the four anatomical sequences, or are derived from one
#: (T2*, susceptibility, diffusion, maps, localizers, subtractions, perfusion, network outputs):
#: a name with one of these and a sequence's name is refused, never read as that sequence.
NOT_ANATOMICAL_TOKENS = frozenset({
    "star", "t2star", "swi", "swan", "gre", "merge", "stir", "adc", "dwi", "dti", "trace", "pd", "map", "maps", "mapping",
    "localizer", "localiser", "scout", "sub", "subtraction", "subtracted", "perfusion", "dsc", "dce", "asl",
    "mip", "prob", "probs", "probability", "probabilities", "probmap", "pred", "predicted", "prediction",
    "softmax", "heatmap", "uncertainty", "entropy", "pve", "gm", "wm", "csf", "fa", "md", "phase", "imag",
})
#: BIDS entities whose values are not about the image's contrast (``ses-post`` is a session). The
#: values of ``acq-`` and ``rec-`` (``acq-gd``) and ``part-`` (``part-phase``) are read as tokens.
_BIDS_OTHER_ENTITIES = re.compile(r"(?:^|_)(?:sub|ses|run|dir|echo|task|inv|mt|flip|chunk)-[a-z0-9]+")
#: The image formats tumorseg reads by file name: NIfTI through nibabel, the others through ITK.
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
#: File-name tokens of ground-truth label maps in case folders (BraTS ``*_seg``, ``OTMultiClass``).
TRUTH_FILE_TOKENS = frozenset({"seg", "label", "labels", "gt", "otmulticlass", "groundtruth",
                               "segmentation", "dseg"})
#: ... and of other masks and label maps that sit beside the sequences (``brainmask``, a lesion
#: outline, FSL's ``pveseg``, FreeSurfer's ``aseg``).
MASK_FILE_TOKENS = frozenset({"brainmask", "mask", "roi", "lesion", "lesions", "tumor", "tumour", "labelmap",
                              "segmented", "pveseg", "aseg"})


def _name_tokens(path: Path) -> set[str]:
    name = strip_image_suffix(path.name).lower()
    name = re.sub(r"t2\s*\*", " t2star ", name)  # T2*: the '*' would vanish in the split below
    name = re.sub(r"\+\s*c(?![a-z0-9])|(?<![a-z0-9])c\s*\+", " pluscontrast ", name)  # T1+C, T1 C+
    name = _BIDS_OTHER_ENTITIES.sub("_", name)
    tokens = {t for t in re.split(r"[^a-z0-9]+", name) if t}
    if {"dark", "fluid"} <= tokens or {"da", "fl"} <= tokens:  # Siemens SPACE FLAIR: t2_spc_da-fl
        tokens.add("darkfluid")
    return tokens


def is_truth_file(path: Path) -> bool:
    """True for a file named like a ground-truth label map (``*_seg``, ``*label*``, ``OTMultiClass``)."""
    return bool(_name_tokens(path) & TRUTH_FILE_TOKENS)


def is_not_a_sequence(path: Path) -> bool:
    """True for a label map or mask that sits beside the sequences of a case folder."""
    return bool(_name_tokens(path) & (TRUTH_FILE_TOKENS | MASK_FILE_TOKENS))


def is_image_name(name: str) -> bool:
    """True for a file name with a suffix of an image format tumorseg reads. Hidden files (macOS
    ``._scan.nii.gz`` resource forks, editors' temporary copies) are never scans."""
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def strip_image_suffix(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def sequence_from_filename(path: Path) -> str | None:
    """The sequence a file name names, or None when it names none.

    Raises SequenceError when the name matches several sequences. nnU-Net's ``_0000`` channel
    suffixes are deliberately not read: ``patient_0001.nii.gz`` would turn into a T1 by accident.
    """
    tokens = _name_tokens(path)
    found = [seq for seq in SEQUENCES if ALIASES[seq] & tokens]
    if not found:
        return None
    other = tokens & (NOT_ANATOMICAL_TOKENS | TRUTH_FILE_TOKENS | MASK_FILE_TOKENS)
    if other:
        raise SequenceError(
            f"the file name marks it as {', '.join(sorted(other))}, not a {found[0]} scan; give the scan "
            f"itself, or name the file with --{found[0]} if it is one", path)
    if found == ["flair", "t2"]:
        found = ["flair"]  # T2_FLAIR, t2-flair, T2 TIRM: FLAIR is a T2-weighted sequence
    if {"t1", "t1gd"} & set(found):
        contrast = tokens & CONTRAST_TOKENS
        if tokens & NOT_CONTRAST_POST:
            contrast -= {"post"}
        no_contrast = tokens & NO_CONTRAST_TOKENS
        if no_contrast and (contrast or "t1gd" in found) or ("c" in tokens and found == ["t1"] and not contrast):
            said = sorted(contrast | no_contrast | ({"c"} & tokens) | (ALIASES["t1gd"] & tokens))
            raise SequenceError(
                f"the file name does not say clearly whether this T1 had contrast ({', '.join(said)}); "
                "name it with --t1 or --t1gd", path)
        if "t1" in found and contrast:
            found = [s for s in found if s != "t1"] + (["t1gd"] if "t1gd" not in found else [])
            found = [s for s in SEQUENCES if s in found]  # T1w with ce-gadolinium (BIDS) is T1gd
    if len(found) > 1:
        raise SequenceError(
            f"the file name matches several sequences ({', '.join(found)}); "
            f"name it with {' or '.join('--' + s.replace('_', '-') for s in found)}",
            path,
        )
    return found[0] if found else None


def parse_sequence(name: str) -> str:
    key = name.strip().lower()
    for seq in SEQUENCES:
        if key == seq or key in ALIASES[seq]:
            return seq
    raise SequenceError(
        f"unknown sequence name {name!r}; known: {', '.join(SEQUENCES)} "
        f"(or aliases such as t2f, t1n, t1c, t1ce, t2w)"
    )


@dataclass(frozen=True)
class StudyInputs:
    """Which file holds which sequence: either one file per sequence or one 4D Decathlon file."""

    files: tuple[tuple[str, Path], ...] = ()
    decathlon_4d: Path | None = None

    @property
    def sequences(self) -> tuple[str, ...]:
        return DECATHLON_ORDER if self.decathlon_4d else tuple(s for s, _ in self.files)


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Files named directly, plus the image files directly inside any folder named, less the label
    maps and masks that sit beside the sequences (``*-seg``, ``brainmask``)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            images = sorted(
                p for p in path.iterdir()
                if p.is_file() and is_image_name(p.name)
            )
            if not images:
                raise SequenceError("folder holds no NIfTI, NRRD or MHA image", path)
            inside = [p for p in images if not is_not_a_sequence(p)]
            if len(inside) < len(images):
                log.info("left out %d label or mask file(s) of an input folder", len(images) - len(inside))
            if not inside:
                raise SequenceError("folder holds only label maps or masks, no scan", path)
            files.extend(inside)
        else:
            files.append(path)
    return files


def assign_sequences(
    positional: list[Path], explicit: dict[str, Path], is_multi_volume: Callable[[Path], bool]
) -> StudyInputs:
    """Map the user's inputs to sequences.

    ``explicit`` holds files given by option (``--flair`` ...); ``positional`` files are
    recognised by name, or as one 4D Decathlon file (``is_multi_volume``).
    """
    files = expand_inputs(positional)
    if len(files) == 1 and not explicit and is_multi_volume(files[0]):
        if other := _name_tokens(files[0]) & (NOT_ANATOMICAL_TOKENS | TRUTH_FILE_TOKENS | MASK_FILE_TOKENS):
            raise SequenceError(
                f"a file with several volumes is read as a Decathlon study (FLAIR, T1w, T1gd, T2w), but its name "
                f"marks it as {', '.join(sorted(other))}: give the study's scans", files[0])
        if (named := sequence_from_filename(files[0])) is not None:
            raise SequenceError(
                f"a file with several volumes is read as a Decathlon study (FLAIR, T1w, T1gd, T2w), but its "
                f"name says {named}: give its sequences as separate 3D files", files[0])
        return StudyInputs(decathlon_4d=files[0])
    assigned: dict[str, Path] = dict(explicit)
    unknown: list[Path] = []
    for path in files:
        if is_multi_volume(path):
            raise SequenceError(
                "a 4D multi-sequence file must be the only input (Decathlon layout)", path
            )
        seq = sequence_from_filename(path)
        if seq is None:
            unknown.append(path)
            continue
        if seq in assigned and assigned[seq] != path:
            raise SequenceError(
                f"two inputs for {seq}: {assigned[seq]} and {path}; "
                f"name the one to use with --{seq}"
            )
        assigned[seq] = path
    if unknown:
        names = ", ".join(str(p) for p in unknown)
        raise SequenceError(
            f"cannot tell which sequence {names} is from its name; give it with one of "
            f"--flair, --t1, --t1gd, --t2 (names tumorseg recognises: *-t2f/*flair*, "
            f"*-t1n/*t1*, *-t1c/*t1ce*/*t1gd*, *-t2w/*t2*)"
        )
    if not assigned:
        raise SequenceError("no input scan given")
    by_file: dict[Path, list[str]] = {}
    for seq, path in assigned.items():
        by_file.setdefault(Path(path).resolve(), []).append(seq)
    for path, seqs in by_file.items():
        if len(seqs) > 1:
            raise SequenceError(f"one file given as {' and '.join(sorted(seqs))}; each sequence needs its own scan",
                                path)
    return StudyInputs(files=tuple((s, assigned[s]) for s in SEQUENCES if s in assigned))


def reference_sequence(sequences: tuple[str, ...] | list[str], reference: str | None = None) -> str:
    """The sequence whose grid is the reference: ``reference`` if given, else by REFERENCE_ORDER."""
    if reference is not None:
        if reference not in sequences:
            raise SequenceError(f"reference sequence {reference!r} is not among the series read "
                                f"({', '.join(sequences)})")
        return reference
    for seq in REFERENCE_ORDER:
        if seq in sequences:
            return seq
    return sequences[0]
