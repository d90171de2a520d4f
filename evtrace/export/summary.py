"""`evtrace summary`: the text table per region name, and ranks side by side.

The table itself (rows, units by magnitude, host waits) is ``analysis.summary_text``, which
``Session.summary`` also returns; this module gives it the views' shape and adds the
side-by-side table of several ranks or traces.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..analysis import COLUMNS, aligned, busy_ns, fmt_ns, plural, rows, summary_text
from ..session import Session

__all__ = ["COLUMNS", "Summary", "fmt_ns", "plural", "ranks", "rows", "summary"]


class Summary:
    """One row per region name; ``skip`` drops the first N of each name (warm-up)."""

    suffix: ClassVar[str] = ".txt"
    binary: ClassVar[bool] = False

    def __init__(self, skip: int = 0) -> None:
        self.skip = skip

    def render(self, s: Session) -> str:
        return summary_text(s, self.skip)


def summary(s: Session, skip: int = 0) -> str:
    """``Summary(skip).render(s)``."""
    return Summary(skip).render(s)


def ranks(sessions: list[Session], labels: list[str]) -> str:
    """Ranks (or processes) side by side: a straggler shows as less device busy time, or more."""
    head = ("trace", "rank", "regions", "host time", "device busy", "device busy %")
    table = [head]
    for label, s in zip(labels, sessions):
        r = s.regions
        dur = s.meta.get("duration_ns") or int(r["host_end"].max(initial=0))
        devices = np.unique(r["device"][r["device"] >= 0])
        busy = sum(busy_ns(r["dev_start"][r["device"] == d], r["dev_end"][r["device"] == d]) for d in devices)
        rank = s.meta.get("rank")
        share = f"{100 * busy / dur:.0f}%" if busy and dur else "-"
        table.append(
            (
                label,
                str(rank) if rank is not None else "-",
                str(len(s)),
                fmt_ns(dur),
                fmt_ns(busy) if busy else "-",
                share,
            )
        )
    return "\n".join(aligned(table))
