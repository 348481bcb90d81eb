"""Label schemes (MSD, BraTS 2015/2021/2023), their evaluation regions, and conversion.

Each label is tied to the set of tissue classes it covers. A label converts to the target
scheme's label whose classes include all of its own; where none does (BraTS 2021's combined
"necrotic / non-enhancing core" into BraTS 2015's separate necrosis and non-enhancing labels),
conversion is refused rather than guessed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, InputError

# Tissue classes: necrosis, non-enhancing tumour, edema, enhancing tumour.
NCR, NET, ED, ET = "necrosis", "non_enhancing", "edema", "enhancing"
#: Evaluation regions (BraTS): whole tumour, tumour core, enhancing tumour.
REGIONS = ("WT", "TC", "ET")


@dataclass(frozen=True)
class Label:
    value: int
    name: str
    classes: frozenset[str]
    color: tuple[int, int, int]


@dataclass(frozen=True)
class LabelScheme:
    """A label scheme: label values, names, tissue classes and regions (WT, TC, ET)."""

    name: str
    title: str
    labels: tuple[Label, ...]

    @property
    def class_values(self) -> np.ndarray:
        """Label value of each network class index: 0 (background), then the labels in order."""
        return np.array([0] + [label.value for label in self.labels], dtype=np.uint8)

    @property
    def max_label(self) -> int:
        return max(label.value for label in self.labels)

    def label(self, key: int | str) -> Label:
        for label in self.labels:
            if label.value == key or label.name == key:
                return label
        raise ConfigError(
            f"label {key!r} is not in scheme {self.name!r} "
            f"(labels: {', '.join(f'{l.value}={l.name}' for l in self.labels)})"
        )

    @property
    def regions(self) -> dict[str, tuple[int, ...]]:
        """Evaluation regions: whole tumour, tumour core (all but edema), enhancing tumour."""
        return {
            "WT": tuple(l.value for l in self.labels),
            "TC": tuple(l.value for l in self.labels if l.classes - {ED}),
            "ET": tuple(l.value for l in self.labels if l.classes == {ET}),
        }

    def region_mask(self, labels: np.ndarray, region: str) -> np.ndarray:
        return np.isin(labels, self.regions[region])

    def validate_array(self, labels: np.ndarray, what: str = "label map", path: str | Path | None = None) -> None:
        """Refuse label values this scheme does not define: an input error of the file at ``path``
        (or of the label map ``what`` names), whether its data are wrong or another scheme was meant."""
        present = set(np.unique(labels).tolist()) - {0}
        unknown = present - {l.value for l in self.labels}
        if unknown:
            raise InputError(f"{what} holds values {sorted(unknown)} that label scheme {self.name!r} does not "
                             f"define (values {', '.join(str(l.value) for l in self.labels)}); is it another scheme?",
                             path)


_RED, _GREEN, _YELLOW, _BLUE = (255, 0, 0), (0, 200, 0), (255, 220, 0), (0, 100, 255)

SCHEMES: dict[str, LabelScheme] = {
    s.name: s
    for s in (
        LabelScheme(
            "msd",
            "Medical Segmentation Decathlon Task01_BrainTumour",
            (
                Label(1, "edema", frozenset({ED}), _GREEN),
                Label(2, "non_enhancing_tumour", frozenset({NCR, NET}), _RED),
                Label(3, "enhancing_tumour", frozenset({ET}), _YELLOW),
            ),
        ),
        LabelScheme(
            "brats2015",
            "BraTS 2015",
            (
                Label(1, "necrosis", frozenset({NCR}), _RED),
                Label(2, "edema", frozenset({ED}), _GREEN),
                Label(3, "non_enhancing_tumour", frozenset({NET}), _BLUE),
                Label(4, "enhancing_tumour", frozenset({ET}), _YELLOW),
            ),
        ),
        LabelScheme(
            "brats2021",
            "BraTS 2021",
            (
                Label(1, "necrotic_core", frozenset({NCR, NET}), _RED),
                Label(2, "edema", frozenset({ED}), _GREEN),
                Label(4, "enhancing_tumour", frozenset({ET}), _YELLOW),
            ),
        ),
        LabelScheme(
            "brats2023",
            "BraTS 2023",
            (
                Label(1, "necrotic_core", frozenset({NCR, NET}), _RED),
                Label(2, "edema", frozenset({ED}), _GREEN),
                Label(3, "enhancing_tumour", frozenset({ET}), _YELLOW),
            ),
        ),
    )
}


#: The schemes by name, as the command line offers them.
SCHEME_NAMES = tuple(SCHEMES)


def get_scheme(name: str) -> LabelScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ConfigError(
            f"unknown label scheme {name!r}; known schemes: {', '.join(SCHEMES)}"
        ) from None


def conversion_table(source: LabelScheme, target: LabelScheme) -> np.ndarray:
    """Lookup table ``lut[source_value] -> target_value`` (background stays 0)."""
    lut = np.zeros(source.max_label + 1, dtype=np.uint8)
    for label in source.labels:
        matches = [t for t in target.labels if label.classes <= t.classes]
        if not matches:
            raise ConfigError(
                f"cannot convert {source.name} label {label.value} ({label.name}) to "
                f"{target.name}: no {target.name} label covers it without guessing"
            )
        lut[label.value] = min(matches, key=lambda t: len(t.classes)).value
    return lut


def convert(labels: np.ndarray, source: LabelScheme, target: LabelScheme) -> np.ndarray:
    """Return a new array with ``labels`` mapped from ``source`` to ``target`` scheme."""
    source.validate_array(labels, f"{source.name} label map")
    return conversion_table(source, target)[labels.astype(np.intp)]
