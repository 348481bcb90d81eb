"""Choosing the DICOM series for each MR sequence, by rules kept as data.

A series is first screened out when it is not a candidate at all (rules in
:class:`SelectionRules`): a modality other than MR, an ImageType value that marks a localizer,
a reformat, a projection, a phase or diffusion/perfusion map or a mosaic, ImageType DERIVED
(reformats, subtractions, maps), or a SeriesDescription/ProtocolName that names a localizer,
diffusion, perfusion or another non-anatomical series.

The remaining series are classified by the first :class:`SequenceRule` that matches the text
``SeriesDescription | ProtocolName`` (case-insensitive regular expressions): by default FLAIR,
then T2 (not FLAIR, not T2*), then T1 with a contrast marker (``t1gd``), then T1 without one
(``t1``). A contrast marker is a contrast pattern in the text (+C, POST, GD, CE, contrast, ...),
or a non-empty ContrastBolusAgent unless the text says the series is pre-contrast (PRE, native).

A series named explicitly (by SeriesInstanceUID or SeriesNumber) is taken as is. Two candidates
for one wanted sequence is a :class:`~tumorseg.errors.SequenceError` that lists them by
SeriesNumber and description; patient data is never logged.

The default rules are :data:`DEFAULT_RULES`; :meth:`SelectionRules.from_mapping` builds rules
from plain data (e.g. a pipeline file's table).
"""
from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from ..errors import ConfigError, SequenceError
from ..sequences import SEQUENCES
from .series import SeriesInfo

log = logging.getLogger(__name__)

S = TypeVar("S", bound=SeriesInfo)

# Token boundaries: "_" and digits separate words in protocol names (t1_mprage, 3D_T1), so the
# patterns use explicit look-arounds instead of \b.
# Philips prefixes SmartExam protocols with "s" (sT1W_3D_TFE).
_START = r"(?:(?<![a-z0-9])|(?<=(?<![a-z0-9])s))"
_T1 = (_START + r"t1(?![0-9])|mp-?rage|(?<![a-z])f?spgr|(?<![a-z])bravo|tfl3d|(?<![a-z])vibe|3d_?t1(?![0-9])")
_T2 = _START + r"t2(?![0-9*])"
# Siemens SPACE FLAIR is "t2_spc_da-fl" (dark fluid). A TIRM (inversion recovery) named with
# stir or fat suppression is a STIR, not a FLAIR.
_FLAIR = (r"flair|(?<![a-z0-9])t2[ _-]?f(?![a-z])|dark[ _-]?fluid|(?<![a-z])da[ _-]?fl(?![a-z])|"
          r"(?<![a-z])tirm(?!.*(?<![a-z])(stir|fs|fat[ _-]?sat)(?![a-z]))")


@dataclass(frozen=True)
class SequenceRule:
    """One sequence's rule: some ``include`` pattern and no ``exclude`` pattern must match.

    ``contrast``: True needs a contrast marker, False needs its absence, None ignores contrast.
    """

    sequence: str
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    contrast: bool | None = None


@dataclass(frozen=True)
class SelectionRules:
    """What makes a series a candidate, and for which sequence. All patterns are regexes,
    matched case-insensitively anywhere in ``SeriesDescription | ProtocolName``."""

    #: Tried in order; the first that matches classifies the series.
    rules: tuple[SequenceRule, ...]
    #: (reason, pattern): a description matching the pattern is skipped for that reason.
    skip_descriptions: tuple[tuple[str, str], ...]
    #: ImageType values (upper case) that mark a series that is not an anatomical image.
    skip_image_types: tuple[str, ...]
    #: Skip series whose ImageType starts with DERIVED (reformats, subtractions, maps).
    skip_derived: bool
    #: Modalities a candidate may have.
    modalities: tuple[str, ...]
    #: Patterns that mark contrast (T1 post-gadolinium).
    contrast_patterns: tuple[str, ...]
    #: Patterns that mark a series as pre-contrast (overrides ContrastBolusAgent).
    precontrast_patterns: tuple[str, ...]
    #: A non-empty ContrastBolusAgent marks contrast (T1 series only).
    contrast_agent_tag: bool = True

    def __post_init__(self) -> None:
        for rule in self.rules:
            if rule.sequence not in SEQUENCES:
                raise ConfigError(f"series rule for unknown sequence {rule.sequence!r}; "
                                  f"known: {', '.join(SEQUENCES)}")
            for pattern in rule.include + rule.exclude:
                _compile(pattern)
        for pattern in (self.contrast_patterns + self.precontrast_patterns
                        + tuple(p for _, p in self.skip_descriptions)):
            _compile(pattern)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: "SelectionRules | None" = None) -> "SelectionRules":
        """Rules from plain data (a pipeline file's table); keys left out keep ``base``'s value.

        ``rules`` is a list of tables ``{sequence, include, exclude, contrast}``;
        ``skip_descriptions`` a table reason -> pattern; the rest lists of strings or a bool.
        """
        base = DEFAULT_RULES if base is None else base
        known = {"rules", "skip_descriptions", "skip_image_types", "skip_derived", "modalities",
                 "contrast_patterns", "precontrast_patterns", "contrast_agent_tag"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown series-selection key(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(known))}")
        changes: dict[str, Any] = {}
        if "rules" in data:
            if not _is_list(data["rules"]):
                raise ConfigError("series-selection key rules must be a list of tables")
            rules = []
            for n, r in enumerate(data["rules"], start=1):
                if not isinstance(r, Mapping):
                    raise ConfigError(f"series-selection rule {n} is not a table")
                keys = ("sequence", "include", "exclude", "contrast")
                for key in sorted(map(str, set(r) - set(keys))):
                    close = difflib.get_close_matches(key, keys, n=1)
                    raise ConfigError(f"series-selection rule {n}: unknown key {key!r}"
                                      + (f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(keys)}"))
                if "sequence" not in r or "include" not in r:
                    raise ConfigError(f"series-selection rule {n} needs keys sequence and include")
                if r.get("contrast") is not None and not isinstance(r["contrast"], bool):
                    raise ConfigError(f"series-selection rule {n}: contrast must be true, false or left out")
                rules.append(SequenceRule(str(r["sequence"]), _strings(r["include"], f"rule {n} include"),
                                          _strings(r.get("exclude", ()), f"rule {n} exclude"), r.get("contrast")))
            changes["rules"] = tuple(rules)
        if "skip_descriptions" in data:
            table = data["skip_descriptions"]
            if not isinstance(table, Mapping):
                raise ConfigError("series-selection key skip_descriptions must be a table reason = pattern")
            changes["skip_descriptions"] = tuple((str(k), v) for k, v in
                                                 zip(table, _strings(list(table.values()), "skip_descriptions")))
        for key in ("skip_image_types", "modalities"):
            if key in data:
                changes[key] = tuple(v.strip().upper() for v in _strings(data[key], key))
        for key in ("contrast_patterns", "precontrast_patterns"):
            if key in data:
                changes[key] = _strings(data[key], key)
        for key in ("skip_derived", "contrast_agent_tag"):
            if key in data:
                if not isinstance(data[key], bool):
                    raise ConfigError(f"series-selection key {key} must be true or false")
                changes[key] = data[key]
        return replace(base, **changes)


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _strings(value: Any, what: str) -> tuple[str, ...]:
    """A list of strings; a lone string is refused (it would be read as its characters)."""
    if not _is_list(value) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"series-selection {what} must be a list of strings (patterns), e.g. [\"FLAIR\"]")
    return tuple(value)


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ConfigError(f"invalid series-selection pattern {pattern!r}: {e}") from None


DEFAULT_RULES = SelectionRules(
    rules=(
        # T1-weighted FLAIR (GE "T1 FLAIR") is a T1, not a FLAIR.
        SequenceRule("flair", include=(_FLAIR,), exclude=(r"(?<![a-z0-9])t1(?![0-9])",)),
        SequenceRule("t2", include=(_T2, r"t2w", r"(?<![a-z])tse(?![a-z]).*(?<![a-z0-9])t2"),
                     exclude=(r"t2\*", r"t2[ _-]?star", r"(?<![a-z])(swi|swan)(?![a-z])", r"hemo", r"medic",
                              r"(?<![a-z])gre(?![a-z])", r"(?<![a-z])me2d", r"fiesta", r"(?<![a-z])ciss",
                              r"(?<![a-z])(tirm|stir|ffe|merge)(?![a-z])")),
        SequenceRule("t1gd", include=(_T1, _START + r"t1(c|ce|gd|post)(?![a-z])"), contrast=True),
        SequenceRule("t1", include=(_T1, _START + r"t1(n|w)(?![a-z])"), contrast=False),
    ),
    skip_descriptions=(
        ("localizer", r"locali[sz]er|scout|survey|(?<![a-z])loc(?![a-z])|aahead|aascout|"
                      r"3[ -]?plane|tri-?pilot|(?<![a-z])pilot"),
        ("diffusion", r"(?<![a-z])dwi|diffusion|(?<![a-z])diff(?![a-z])|ep2d_diff|(?<![a-z])dti|"
                      r"(?<![a-z])adc(?![a-z])|trace|tensor|(?<![a-z])resolve|(?<![a-z])fa(?![a-z0-9])|colfa"),
        ("perfusion", r"perf|(?<![a-z])(dsc|dce|asl|pcasl|pasl|rcbv|rcbf|cbv|cbf|mtt|ttp|tmax)(?![a-z])"),
        ("functional, angiographic, susceptibility or spectroscopic series",
         r"(?<![a-z])(bold|fmri|mra|tof|swi|swan|svs|csi|mip)(?![a-z])|angio|spectro|phase"),
        ("quantitative map, subtraction, dynamic or reformatted series",
         r"(?<![a-z])(maps?|mapping|relaxometry|sub|dyn|dynamic)(?![a-z])|subtract|reformat|"
         r"(?<![a-z])mpr[ _-]?(tra|cor|ax|axial|coronal|transversal)(?![a-z])"),
    ),
    skip_image_types=("LOCALIZER", "MPR", "MIP", "PROJECTION IMAGE", "REFORMATTED", "CPR",
                      "CSA MPR", "CSAPARALLEL", "ADC", "TRACEW", "FA", "DIFFUSION", "PERFUSION",
                      "SUBTRACTION", "SUBTRACT", "SUB", "MOSAIC", "P", "PHASE", "R", "REAL", "IMAGINARY"),
    skip_derived=True,
    modalities=("MR",),
    contrast_patterns=(
        r"\+ ?c(?![a-z])", r"(?<![a-z])c ?\+", r"(?<![a-z])post(?![a-z]|[ _-]?(op|fossa))",
        r"post[ _-]?(gd|gad|gado|contrast|km)", r"(?<![a-z])w ?/ ?c(?![a-z])", r"(?<![a-z])gd(?![a-z])",
        r"gado", r"(?<![a-z])gad(?![a-z])", r"(?<![a-z])ce(?![a-z])", r"contrast", r"kontrast",
        r"(?<![a-z0-9])t1c(?![a-z])", r"t1ce", r"t1gd", r"(?<![a-z])km(?![a-z])",
    ),
    # Phrases first: each match is blanked out before the contrast patterns are tried, so that
    # "no contrast" or "pre Gd" is not also read as contrast.
    precontrast_patterns=(r"(?<![a-z])(no|non|without|w/o|wo|pre|prae|prä|before|ohne|vor|v\.)[ _-]?"
                          r"(contrast|kontrast|gd|gad|gado|km)",
                          r"(?<![a-z])(pre|prae|prä)(?![a-z])", r"precontrast", r"native?", r"(?<![a-z0-9])t1n(?![a-z])",
                          r"(?<![a-z])nc(?![a-z])"),
)


def series_text(series: SeriesInfo) -> str:
    """The text the patterns are matched against: ``SeriesDescription | ProtocolName``."""
    return f"{series.series_description} | {series.protocol_name}"


def skip_reason(series: SeriesInfo, rules: SelectionRules = DEFAULT_RULES,
                text: str | None = None) -> str | None:
    """Why ``series`` is not a candidate for any sequence, or None when it is one (``text``: the
    text the description patterns are matched against, by default :func:`series_text`)."""
    if series.modality.upper() not in rules.modalities:
        return f"modality {series.modality or '(none)'}, not {'/'.join(rules.modalities)}"
    types = set(series.image_type)
    marked = [t for t in rules.skip_image_types if t in types]
    if marked:
        return f"ImageType {'/'.join(series.image_type)} marks it {marked[0]}"
    if rules.skip_derived and series.image_type[:1] == ("DERIVED",):
        return f"a derived image (ImageType {'/'.join(series.image_type)})"
    text = series_text(series) if text is None else text
    for reason, pattern in rules.skip_descriptions:
        m = _compile(pattern).search(text)
        if m:
            return f"{reason} (description matches {m.group(0)!r})"
    return None


def classify_series(series: SeriesInfo, rules: SelectionRules = DEFAULT_RULES) -> tuple[str | None, str]:
    """The sequence ``series`` is a candidate for (or None), and why, in words for the log.
    A series whose description and protocol name each name a sequence, not the same one, is
    no candidate: which of the two is right cannot be told."""
    description, protocol = series.series_description.strip(), series.protocol_name.strip()
    if not (description and protocol and description.lower() != protocol.lower()):
        text = series_text(series)
        reason = skip_reason(series, rules, text)
        if reason is not None:
            return None, f"skipped: {reason}"
        return _classify_text(series, text, rules)
    # GE's ProtocolName is the exam's protocol ("BRAIN W WO CONTRAST", "BRAIN TUMOR PERFUSION"),
    # the same for every series: its words must not skip or re-read a series its description names.
    said = []
    for text in (description, protocol):
        reason = skip_reason(series, rules, text)
        said.append((None, f"skipped: {reason}") if reason is not None else _classify_text(series, text, rules))
    (d_seq, d_why), (p_seq, p_why) = said
    if d_seq is not None and p_seq is not None and d_seq != p_seq:
        return None, f"skipped: its description says {d_seq}, its protocol name {p_seq}"
    if d_seq is not None:
        return d_seq, d_why
    if d_why.startswith("skipped:"):
        return None, d_why
    return p_seq, p_why


def _classify_text(series: SeriesInfo, text: str, rules: SelectionRules) -> tuple[str | None, str]:
    contrast, contrast_why = _contrast(series, text, rules)
    if contrast is None:
        return None, f"skipped: {contrast_why}"
    for rule in rules.rules:
        m = next((m for p in rule.include if (m := _compile(p).search(text))), None)
        if m is None or any(_compile(p).search(text) for p in rule.exclude):
            continue
        if rule.contrast is not None and rule.contrast != contrast:
            continue
        why = f"description matches {m.group(0)!r}"
        if rule.contrast is not None:
            why += f", {contrast_why}"
        return rule.sequence, why
    return None, "not recognised as any sequence by the description rules"


def _contrast(series: SeriesInfo, text: str, rules: SelectionRules) -> tuple[bool | None, str]:
    """Whether the text marks contrast; None when it has both a pre-contrast and a contrast marker
    (``T1 pre | t1_post_gd``): such a T1 is neither candidate."""
    pre = None
    for p in rules.precontrast_patterns:
        if m := _compile(p).search(text):
            pre = pre or m
            text = _compile(p).sub(lambda found: " " * len(found.group(0)), text)
    post = next((m for p in rules.contrast_patterns if (m := _compile(p).search(text))), None)
    if pre is not None and post is not None:
        return None, f"both a pre-contrast marker {pre.group(0)!r} and a contrast marker {post.group(0)!r}"
    if post is not None:
        return True, f"contrast marker {post.group(0)!r}"
    if pre is not None:
        return False, f"pre-contrast marker {pre.group(0)!r}"
    if rules.contrast_agent_tag and series.contrast_agent and not _NO_AGENT.fullmatch(series.contrast_agent.strip()):
        return True, "ContrastBolusAgent is set"
    return False, "no contrast marker"


#: ContrastBolusAgent values that mean no agent was given.
_NO_AGENT = re.compile(r"none|no|n|0|nil|n/?a|-+|no contrast|without contrast|keine?|kein km|nein", re.IGNORECASE)


def _matches(series: SeriesInfo, choice: str | int) -> bool:
    if isinstance(choice, int) or (isinstance(choice, str) and choice.strip().isdigit()):
        return series.series_number == int(choice)
    return series.series_uid == str(choice).strip()


def _listing(series: Sequence[SeriesInfo]) -> str:
    numbers = [s.series_number for s in series]
    unique = len(set(numbers)) == len(numbers) and None not in numbers
    return "; ".join(s.label + ("" if unique else f" (SeriesInstanceUID {s.series_uid})") for s in series)


def select_series(
    series_list: Sequence[S],
    rules: SelectionRules | None = None,
    explicit: Mapping[str, str | int] | None = None,
    sequences: Sequence[str] = SEQUENCES,
    ambiguous: dict[str, str] | None = None,
) -> dict[str, S]:
    """Choose one series per sequence; returns ``{sequence: series}`` in SEQUENCES order.

    ``series_list``: :class:`SeriesInfo` (from :func:`find_series`) or :class:`DicomSeries`.
    ``explicit``: sequence -> SeriesInstanceUID or SeriesNumber (an int or a string of digits),
    taken without applying the rules. ``sequences``: the sequences wanted; several candidates
    for a wanted sequence raise :class:`SequenceError`, for others they are only logged. A
    wanted sequence without a candidate is simply absent from the result (the caller decides
    whether the model can run without it). ``ambiguous``: when given, a wanted sequence with
    several candidates is recorded there (sequence -> the refusal's message) instead of raised, so
    that the caller can refuse only when it will read that sequence.
    """
    rules = DEFAULT_RULES if rules is None else rules
    explicit = dict(explicit or {})
    chosen: dict[str, S] = {}
    for seq, choice in explicit.items():
        if seq not in SEQUENCES:
            raise SequenceError(f"unknown sequence {seq!r} in the series choice; known: {', '.join(SEQUENCES)}")
        found = [s for s in series_list if _matches(s, choice)]
        if not found:
            raise SequenceError(
                f"no image series {choice!r} (SeriesNumber or SeriesInstanceUID) for {seq}; "
                f"series found: {_listing(series_list) or 'none'}"
            )
        if len(found) > 1:
            raise SequenceError(
                f"{choice} names {len(found)} series: {_listing(found)}; "
                f"name the one for {seq} by its SeriesInstanceUID"
            )
        twice = next((other for other, s in chosen.items() if s.series_uid == found[0].series_uid), None)
        if twice is not None:
            raise SequenceError(f"{found[0].label} is named for both {twice} and {seq}; one series is one sequence")
        chosen[seq] = found[0]
        log.info("DICOM: %s chosen as %s (named explicitly)", found[0].label, seq)
    taken = {s.series_uid for s in chosen.values()}
    candidates: dict[str, list[tuple[S, str]]] = {}
    for s in series_list:
        if s.series_uid in taken:
            continue
        seq, why = classify_series(s, rules)
        if seq is None:
            log.info("DICOM: %s not used: %s", s.label, why)
            continue
        candidates.setdefault(seq, []).append((s, why))
    for seq in SEQUENCES:
        found = candidates.get(seq, [])
        if seq in chosen or not found:
            for s, why in found:
                log.info("DICOM: %s looks like %s (%s) but %s was named explicitly", s.label, seq, why, seq)
            continue
        if len(found) > 1:
            listing = _listing([s for s, _ in found])
            if seq in sequences:
                message = (f"{len(found)} candidate series for {seq}: {listing}; name the one to use by "
                           f"its SeriesNumber or SeriesInstanceUID (--{seq} SERIES)")
                if ambiguous is None:
                    raise SequenceError(message)
                ambiguous[seq] = message
                continue
            log.info("DICOM: %d candidate series for %s, which is not wanted: %s", len(found), seq, listing)
            continue
        s, why = found[0]
        if seq not in sequences:
            log.info("DICOM: %s looks like %s (%s), which is not wanted", s.label, seq, why)
            continue
        chosen[seq] = s
        log.info("DICOM: %s chosen as %s (%s)", s.label, seq, why)
    return {seq: chosen[seq] for seq in SEQUENCES if seq in chosen}
