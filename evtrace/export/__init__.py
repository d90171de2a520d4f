"""Views of a finished Session, one per file, each with the same shape (as pyinstrument's
renderers): constructed with its options, it declares the file ``suffix`` it writes, and
``render(session)`` returns its text.

    summary.Summary      the text table per region name (.txt)
    report.Report        one screen of GitHub markdown (.md)
    render.Timeline      a static SVG timeline (.svg)
    diff.DiffText        two sessions compared (.txt; DiffMarkdown: .md): render(before, after)

The trace itself is no view: its formats own their files (``evtrace.formats``); nor is merging
sessions onto one clock (``evtrace.merge``), which makes a Session. The CLI picks a
view by its subcommand, refuses an output path without the view's suffix, and writes what
``render`` returns (``cli._show``).
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from ..session import Session


class View(Protocol):
    """What every single-session view has."""

    suffix: ClassVar[str]  # the file suffix it writes, e.g. ".md"

    def render(self, s: Session) -> str: ...
