"""Markdown escaping shared by `evtrace report` and `evtrace diff --markdown`.

Owns :func:`escape` and :func:`code`: any string a user controls (region, thread and GPU names,
args, argv, paths) becomes one line of text that renders as itself, in a table cell or a paragraph.
"""

from __future__ import annotations

import re

__all__ = ["code", "escape"]

# ASCII punctuation that can start markup in a GFM table cell or paragraph: code spans, emphasis,
# links and images, raw HTML, cell borders, strikethrough, entities (`&lt;`) and GitHub's `$` math
_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&$])")
# control characters that `str.split` leaves in place (NUL, ESC, DEL, C1 ...): shown as `\xNN`
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape(text: object) -> str:
    """``str(text)`` as one line of markdown that renders as the text it holds: runs of whitespace
    (newlines included) become one space, control characters their ``\\xNN`` spelling, and every
    character that could act as markup is backslash-escaped."""
    line = " ".join(str(text).split())
    line = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", line)
    return _SPECIAL.sub(r"\\\1", line)


def code(text: object) -> str:
    """``str(text)`` as an inline code span outside a table: shown verbatim, markup and all, since a
    code span interprets nothing but its own fence; one line, control characters as ``\\xNN``. The
    fence is one backtick longer than any run of them in the text, so none can close it early."""
    line = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", " ".join(str(text).split()))
    fence = "`" * (max(map(len, re.findall("`+", line)), default=0) + 1)
    pad = " " if line.startswith("`") or line.endswith("`") else ""
    return f"{fence}{pad}{line}{pad}{fence}"
