"""Third-party log lines and warnings without header values.

pydicom, nibabel, highdicom and SimpleITK word their warnings for developers, often with the
offending value quoted ("Invalid value for VR UI: 'DOE^JOHN'"): a patient name planted in any
attribute would reach the log. Every record that is not tumorseg's own keeps its first clause
with quoted text removed, on one line, and warnings (``warnings.warn``) are routed into the log
the same way (docs/cli.md, privacy).
"""
from __future__ import annotations

import logging
import re

# A quote opens where no letter or digit precedes it (or a Python prefix: b'...', r'...') and
# closes where none follows, so that an apostrophe ("can't") opens nothing. A value runs to the
# *last* closing quote of its kind: a value may hold quotes itself ('O'BRIEN^PAT', 'SMITH' JOHN'),
# and text lost between two values is better than a value left in. An unclosed one runs to the end.
_OPEN = re.compile(r"(?<![A-Za-z0-9])(?:[bBrRuU]{1,2})?(['\"`])")
_CLOSE = {q: re.compile(re.escape(q) + r"(?![A-Za-z0-9])") for q in "'\"`"}
_WARNING_LINE = re.compile(r"^.*?:\d+: (\w+): (.*)$")


def redact(text: str) -> str:
    """The first clause of a library's message, quoted values removed, on one line."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    match = _WARNING_LINE.match(first)  # "file.py:12: UserWarning: message"
    if match:
        first = f"{match.group(1)}: {match.group(2)}"
        category, _, rest = first.partition(": ")
        return f"{category}: {_first_clause(rest)}"
    return _first_clause(first)


def without_quoted(text: str) -> str:
    """``text`` with every quoted value (and the rest of it after a quote left open) as '...'."""
    parts, position = [], 0
    while (opening := _OPEN.search(text, position)) is not None:
        closings = list(_CLOSE[opening.group(1)].finditer(text, opening.end()))
        parts.append(text[position:opening.start()] + "'...'")
        if not closings:
            return "".join(parts)
        position = closings[-1].end()
    return "".join(parts) + text[position:]


def _first_clause(text: str) -> str:
    text = without_quoted(text)
    head, sep, _ = text.partition(": ")
    return head + (": ..." if sep else "")


class ThirdPartyRedaction(logging.Filter):
    """Rewrites records from loggers outside ``tumorseg`` with :func:`redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "tumorseg" or record.name.startswith("tumorseg.") or getattr(record, "redacted", False):
            return True  # each handler runs its filters on the same record: redact it once
        record.msg = f"[{record.name}] {redact(record.getMessage())}"
        record.redacted = True
        record.args = ()
        record.exc_info = record.exc_text = None
        return True


def install() -> None:
    """Route warnings into logging and redact third-party records on every handler there is
    (the root's and those libraries attach to their own loggers); idempotent."""
    import pydicom

    # tumorseg validates the values it uses (UIDs, numbers) with its own named errors; pydicom's
    # own validation would only add warnings that quote the values.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.captureWarnings(False)  # again from the start: something may have replaced showwarning since
    logging.captureWarnings(True)
    import nibabel  # noqa: F401  (its logger brings a handler of its own: filter that one too)

    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if not any(isinstance(f, ThirdPartyRedaction) for f in handler.filters):
                handler.addFilter(ThirdPartyRedaction())
