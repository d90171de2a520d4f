"""Analysis of a session's regions that several views share: outermost and innermost regions,
busy time, idle gaps on the device, host waits, and the per-name summary rows.

Works on anything with ``regions`` (``session.REGION_DTYPE``), ``names`` and ``meta``, so that the session's
own trace writer (its counters) and the views above it use one implementation. numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np


class Regions(Protocol):
    """What analysis reads of a Session."""

    @property
    def regions(self) -> np.ndarray: ...

    @property
    def names(self) -> list[str]: ...

    @property
    def meta(self) -> dict[str, Any]: ...


class Row(NamedTuple):
    """One region name's summary: durations in ns, NaN where nothing was measured."""

    name: str
    n: int  # regions of this name
    host_p50: float
    host_p95: float
    device_p50: float
    device_p95: float
    launch_p50: float  # launch → device start
    device_busy: int  # the union of the name's device spans, per device, summed

    @property
    def has_device(self) -> bool:
        return self.device_p50 == self.device_p50


#: the column heads of a table of Rows, in field order
COLUMNS = (
    "region",
    "count",
    "host p50",
    "host p95",
    "device p50",
    "device p95",
    "launch→start p50",
    "device busy",
)


def fmt_ns(ns: float) -> str:
    """812 ns, 12.3 µs, 4.56 ms, 1.23 s: three significant digits, unit by magnitude."""
    if ns != ns:  # NaN: nothing measured
        return "-"
    a = abs(ns)
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if a >= scale:
            v = ns / scale
            return f"{v:.3g} {unit}" if abs(v) < 1000 else f"{v:.0f} {unit}"
    return f"{ns:.0f} ns"


def plural(n: int, word: str) -> str:
    """ "1 region", "2 regions"."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def cells(row: Row) -> list[str]:
    """A Row as the text cells of a table under COLUMNS."""
    return [
        row.name,
        str(row.n),
        fmt_ns(row.host_p50),
        fmt_ns(row.host_p95),
        fmt_ns(row.device_p50),
        fmt_ns(row.device_p95),
        fmt_ns(row.launch_p50),
        fmt_ns(row.device_busy) if row.has_device else "-",
    ]


def aligned(table: Sequence[Sequence[str]]) -> list[str]:
    """A text table: the first column left-aligned, the others right, a rule under the head."""
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    lines = [
        "  ".join(
            [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        ).rstrip()
        for row in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def busy_ns(start: np.ndarray, end: np.ndarray) -> int:
    """Length of the union of [start, end) intervals."""
    if len(start) == 0:
        return 0
    o = np.argsort(start, kind="stable")
    s, e = start[o], np.maximum.accumulate(end[o])
    gaps = np.maximum(s[1:] - e[:-1], 0)
    return int(e[-1] - s[0] - gaps.sum())


def device_busy_ns(r: np.ndarray) -> int:
    """The union of the device spans of regions ``r``, per device, summed."""
    dv = r[r["device"] >= 0]
    return sum(
        busy_ns(dv["dev_start"][dv["device"] == d], dv["dev_end"][dv["device"] == d])
        for d in np.unique(dv["device"])
    )


def outermost(r: np.ndarray) -> np.ndarray:
    """Regions not contained in another of these regions on the same thread."""
    out = np.zeros(len(r), dtype=bool)
    for th in np.unique(r["thread"]):
        rows = np.nonzero(r["thread"] == th)[0]
        o = rows[np.lexsort((-r["host_end"][rows], r["host_start"][rows]))]
        end = r["host_end"][o]
        prev_max = np.maximum.accumulate(np.r_[np.iinfo(np.int64).min, end[:-1]])
        out[o] = end > prev_max
    return out


def innermost(r: np.ndarray) -> np.ndarray:
    """Device regions with no other device region inside them on their stream: the ones whose
    span is the stream doing their work (an outer region's span also covers idle gaps)."""
    out = np.zeros(len(r), dtype=bool)
    for st in np.unique(r["stream"]):
        rows = np.nonzero(r["stream"] == st)[0]
        o = rows[np.lexsort((-r["dev_end"][rows], r["dev_start"][rows]))]
        nxt = np.r_[r["dev_start"][o][1:], np.iinfo(np.int64).max]
        out[o] = nxt >= r["dev_end"][o]
    return out


def rows(s: Regions, skip: int = 0) -> list[Row]:
    """One Row per name, the first ``skip`` of each name dropped (warm-up); by device busy time,
    then host time, then name."""
    r = s.regions
    out = []
    nan = float("nan")

    def pct(x: np.ndarray, q: float) -> float:
        return float(np.percentile(x, q)) if len(x) else nan

    for ix, name in enumerate(s.names):
        g = r[r["name"] == ix]
        g = g[np.argsort(g["host_start"], kind="stable")][skip:]
        if len(g) == 0:
            continue
        host = g["host_end"] - g["host_start"]
        dv = g[g["device"] >= 0]
        dev = dv["dev_end"] - dv["dev_start"]
        lead = dv["dev_start"] - dv["host_start"]
        row = Row(
            name,
            len(g),
            pct(host, 50),
            pct(host, 95),
            pct(dev, 50),
            pct(dev, 95),
            pct(lead, 50),
            device_busy_ns(g),
        )
        out.append(row)
    out.sort(key=lambda t: (-t.device_busy, -t.n * t.host_p50 if t.host_p50 == t.host_p50 else 0, t.name))
    return out


def host_waits(s: Regions) -> tuple[int, int]:
    """How many "wait ..." regions (the host blocked on the device), and their total host ns."""
    w = s.regions[np.isin(s.regions["name"], [i for i, n in enumerate(s.names) if n.startswith("wait ")])]
    return len(w), int((w["host_end"] - w["host_start"]).sum())


class Gap(NamedTuple):
    """An idle stretch on the device, and the host region covering most of it."""

    start: int
    end: int
    host_doing: str


def gaps(s: Regions, top: int = 3) -> tuple[float, list[Gap]]:
    """GPU busy fraction (by innermost regions) over the device timeline, and the longest idle
    gaps with what the host was doing meanwhile (the host region covering most of the gap)."""
    r = s.regions[s.regions["device"] >= 0]
    if len(r) == 0:
        return float("nan"), []
    r = r[innermost(r)]
    o = np.argsort(r["dev_start"], kind="stable")
    st, en = r["dev_start"][o], np.maximum.accumulate(r["dev_end"][o])
    span = int(en[-1] - st[0])
    busy = busy_ns(st, en)
    g0, g1 = en[:-1], st[1:]
    keep = g1 > g0
    cand = sorted(zip((g1 - g0)[keep].tolist(), g0[keep].tolist(), g1[keep].tolist()), reverse=True)[:top]
    host = s.regions
    out = []
    for _, a, b in cand:
        cover = np.minimum(host["host_end"], b) - np.maximum(host["host_start"], a)
        best = cover.max(initial=0)
        if best <= 0:
            doing = "(no region)"
        else:  # of the regions covering (nearly) as much, the innermost: the shortest
            near = np.nonzero(cover >= 0.9 * best)[0]
            i = int(near[np.argmin((host["host_end"] - host["host_start"])[near])])
            doing = s.names[host["name"][i]]
        out.append(Gap(a, b, doing))
    return busy / span if span > 0 else float("nan"), out


def summary_text(s: Regions, skip: int = 0) -> str:
    """The summary table: a head line (regions, device spans, time recorded), one row per name,
    and the host's waits on the device. ``skip`` drops the first N of each name (warm-up)."""
    table = [list(COLUMNS), *(cells(row) for row in rows(s, skip))]
    lines = aligned(table)
    r = s.regions
    head = f"{plural(len(r), 'region')}, {plural(int((r['device'] >= 0).sum()), 'device span')}"
    dur = s.meta.get("duration_ns")
    if isinstance(dur, (int, float)):
        head += f", {fmt_ns(dur)} recorded"
    if skip:
        head += f"; first {skip} of each name skipped"
    if len(table) == 1:
        lines.append("(no regions)")
    n_waits, waited = host_waits(s)
    if n_waits:
        lines.append(f"host waits on the device: {n_waits}, {fmt_ns(waited)} in all")
    return head + "\n" + "\n".join(lines)
