"""Views of a finished Session, one per file, each with the same shape (as pyinstrument's
renderers): constructed with its options, it declares the file ``suffix`` it writes and whether
its output is ``binary``, and ``render(session)`` returns the text or bytes.

    summary.Summary      the text table per region name (.txt)
    report.Report        one screen of GitHub markdown (.md)
    render.Timeline      a static SVG timeline (.svg)
    diff.DiffText        two sessions compared (.txt; DiffMarkdown: .md)
    merge.merge          several sessions onto one clock: a Session, not a view

The trace itself is no view: its formats own their files (``evtrace.formats``). The CLI picks a
view by its subcommand, or by an output path's suffix (:func:`suffix_of`).
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from ..session import Session


class View(Protocol):
    """What every single-session view has."""

    suffix: ClassVar[str]  # the file suffix it writes, e.g. ".md"
    binary: ClassVar[bool]  # render() returns bytes (True) or str

    def render(self, s: Session) -> str | bytes: ...


def suffix_of(name: str) -> str:
    """ ".json.gz" for a gzipped trace, else the last suffix, lower case."""
    lower = name.lower()
    return (
        ".json.gz" if lower.endswith(".json.gz") else ("." + lower.rsplit(".", 1)[1] if "." in lower else "")
    )
