"""`evtrace summary`: the text table per region name, and ranks side by side.

The table itself (rows, units by magnitude, host waits) is ``analysis.summary_text``, which
``Session.summary`` also returns; this module gives it the views' shape and adds the
side-by-side table of several ranks or traces, and for the ranks of one run the collectives
matched across them (who made everyone wait, ``collectives``). ``--format csv`` and ``json`` give the same
rows to scripts: durations as integers of ns, every column always present (empty or null where
nothing was measured, e.g. the device columns of a host-only trace), names as recorded.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any, ClassVar

from ..analysis import (
    COLUMNS,
    SORT_KEYS,
    NameStats,
    aligned,
    device_busy_ns,
    fmt_ns,
    plural,
    rows,
    selected,
    summary_text,
)
from ..collectives import stragglers, stragglers_text
from ..session import Session, rank_labels

__all__ = [
    "COLUMNS",
    "FIELDS",
    "FORMATS",
    "SORT_KEYS",
    "Summary",
    "collectives",
    "fmt_ns",
    "plural",
    "ranks",
    "rows",
    "summary",
]

FORMATS = ("text", "csv", "json")

#: the columns of ``--format csv`` and the keys of ``--format json``: durations in ns
FIELDS = (
    "trace",
    "region",
    "count",
    "host_p50_ns",
    "host_p95_ns",
    "device_p50_ns",
    "device_p95_ns",
    "launch_to_start_p50_ns",
    "device_busy_ns",
)


def _record(trace: str, r: NameStats) -> dict[str, Any]:
    def ns(x: float) -> int | None:  # a percentile between two stamps: the half ns is noise
        return round(x) if x == x else None

    durations = (r.host_p50, r.host_p95, r.device_p50, r.device_p95, r.launch_p50)
    busy = r.device_busy if r.has_device else None
    return dict(zip(FIELDS, (trace, r.name, r.n, *map(ns, durations), busy)))


class Summary:
    """One row per region name; ``skip`` drops the first N of each name (warm-up), ``filter``
    keeps names that a regular expression finds in, ``sort`` orders by ``SORT_KEYS``, ``top``
    keeps the first N. ``format``: "text" (the table), "csv" or "json" (``FIELDS``). A bad
    value is a ValueError whose message starts with the parameter's name (the CLI's option)."""

    suffix: ClassVar[str] = ".txt"

    def __init__(
        self,
        skip: int = 0,
        top: int | None = None,
        sort: str | None = None,
        filter: str | None = None,
        format: str = "text",
    ) -> None:
        if skip < 0:
            raise ValueError("skip must be 0 or more")
        if top is not None and top < 1:
            raise ValueError("top must be 1 or more")
        if sort is not None and sort not in SORT_KEYS:
            raise ValueError(f"sort {sort!r} is not one of: {', '.join(SORT_KEYS)}")
        if format not in FORMATS:
            raise ValueError(f"format {format!r} is not one of: {', '.join(FORMATS)}")
        try:
            re.compile(filter or "")
        except re.error as e:
            raise ValueError(f"filter {filter!r} is not a regular expression: {e}") from None
        self.skip, self.top, self.sort, self.match, self.format = skip, top, sort, filter, format

    def render(self, s: Session) -> str:
        if self.format == "text":
            return summary_text(s, self.skip, self.top, self.sort, self.match)
        return self.dump([("", s)])

    def records(self, s: Session, trace: str = "") -> list[dict[str, Any]]:
        """The rows as ``FIELDS``' dicts; ``trace`` names the trace they come from."""
        chosen, _ = selected(s, self.skip, self.top, self.sort, self.match)
        return [_record(trace, r) for r in chosen]

    def dump(self, traces: list[tuple[str, Session]]) -> str:
        """The rows of several traces, one after another, as csv or json."""
        recs = [rec for name, s in traces for rec in self.records(s, name)]
        if self.format == "json":
            return json.dumps(recs, ensure_ascii=False, indent=1) + "\n"
        out = io.StringIO()
        w = csv.DictWriter(out, FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(recs)
        return out.getvalue()


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
        busy = device_busy_ns(r)
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


def collectives(ranks: list[Session]) -> str | None:
    """The collectives of one run's ranks (on one clock: a merged trace's ``ranks``) matched
    across them, and who made everyone wait; None where no collective was matched."""
    return stragglers_text(stragglers(ranks, rank_labels(ranks)))
