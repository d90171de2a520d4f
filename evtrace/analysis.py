"""Analysis of a session's regions that several views share: outermost and innermost regions,
busy time, idle gaps on the device, host waits, and the per-name summary rows.

Works on anything with ``regions`` (``session.REGION_DTYPE``), ``names`` and ``meta``, so that the session's
own trace writer (its counters) and the views above it use one implementation. numpy only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
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


class NameStats(NamedTuple):
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


def cells(row: NameStats) -> list[str]:
    """A NameStats as the text cells of a table under COLUMNS."""
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


def by_name(r: np.ndarray, names: int, skip: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Each name's regions: its index, and its rows by host start (ties in the order held), the
    first ``skip`` dropped (warm-up). One stable sort by name for all of them, instead of a pass
    over every region per name (2M regions: 0.05 s, where 1000 names took a pass each)."""
    order = np.argsort(r["name"], kind="stable")
    bounds = np.searchsorted(r["name"][order], np.arange(names + 1)).tolist()
    for ix in range(names):
        at = order[bounds[ix] : bounds[ix + 1]]
        start = r["host_start"][at]
        if len(at) > 1 and bool((start[1:] < start[:-1]).any()):  # most are in order already
            at = at[np.argsort(start, kind="stable")]
        yield ix, r[at[skip:]]


def rows(s: Regions, skip: int = 0) -> list[NameStats]:
    """One NameStats per name, the first ``skip`` of each name dropped (warm-up); by device busy time,
    then host time, then name."""
    r = s.regions
    out = []
    nan = float("nan")

    def pct(x: np.ndarray, q: float) -> float:
        return float(np.percentile(x, q)) if len(x) else nan

    for ix, g in by_name(r, len(s.names), skip):
        if len(g) == 0:
            continue
        name = s.names[ix]
        host = g["host_end"] - g["host_start"]
        dv = g[g["device"] >= 0]
        dev = dv["dev_end"] - dv["dev_start"]
        lead = dv["dev_start"] - dv["host_start"]
        row = NameStats(
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


#: the names of the regions evtrace's hooks make while the host waits (``autohooks``): WAIT and
#: what the host waits in (``wait synchronize train.py:12``), and DATA_WAIT for a DataLoader's batch
WAIT = "wait "
DATA_WAIT = "data wait"


def is_wait(name: str) -> bool:
    """A region where the host waits (for data, or on the device): never a step."""
    return name == DATA_WAIT or name.startswith(WAIT)


def host_waits(s: Regions) -> tuple[int, int]:
    """How many WAIT regions (the host blocked on the device), and their total host ns."""
    w = s.regions[np.isin(s.regions["name"], [i for i, n in enumerate(s.names) if n.startswith(WAIT)])]
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


#: ``--sort`` keys: what each orders the rows by, largest first (name: alphabetical)
SORT_KEYS: dict[str, Callable[[NameStats], tuple[Any, ...]]] = {
    "busy": lambda t: (-t.device_busy, t.name),
    "count": lambda t: (-t.n, t.name),
    "host": lambda t: (-_or0(t.host_p50), t.name),
    "device": lambda t: (-_or0(t.device_p50), t.name),
    "total": lambda t: (-t.n * _or0(t.host_p50), t.name),
    "name": lambda t: (t.name,),
}

#: the longest name a text table shows whole (a module path or an f-string name can run to
#: hundreds of characters, which would push every number off an 80- or 120-column terminal)
NAME_WIDTH = 60


def _or0(x: float) -> float:
    return x if x == x else 0.0


def selected(
    s: Regions, skip: int = 0, top: int | None = None, sort: str | None = None, match: str | None = None
) -> tuple[list[NameStats], int]:
    """The rows a summary shows: names matching the regular expression ``match`` (searched),
    ordered by ``SORT_KEYS[sort]`` (default: ``rows``' order), the first ``top``; and how many
    matched in all."""
    out = rows(s, skip)
    if match is not None:
        rx = re.compile(match)
        out = [r for r in out if rx.search(r.name)]
    if sort is not None:
        out.sort(key=SORT_KEYS[sort])
    return out[:top] if top is not None else out, len(out)


def shown(name: str, width: int = NAME_WIDTH) -> str:
    """A name as one line of a terminal table: control and other unprintable characters escaped
    (a newline or an escape sequence in a name would break the table or the terminal), cut to
    ``width`` characters with "…"."""
    if not name.isprintable():
        name = "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)
    return name if len(name) <= width else name[: width - 1] + "…"


def lost_device_spans(meta: dict[str, Any]) -> int:
    """Regions that kept only their host span (split over two GPUs included), from the metadata."""
    return int(meta.get("dropped_device_spans") or 0) + int(meta.get("split_device_spans") or 0)


def drops(meta: dict[str, Any]) -> str | None:
    """One line saying what the recording dropped or lost, or None when nothing was."""
    said = []
    if int(meta.get("dropped_regions") or 0):
        said.append(f"dropped {plural(int(meta['dropped_regions']), 'oldest region')} (max_regions)")
    lost = {str(k): int(v) for k, v in (meta.get("lost_device_spans") or {}).items() if int(v)}
    n = sum(lost.values()) or lost_device_spans(meta)
    if n:
        why = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(lost.items()))
        said.append(f"lost {plural(n, 'device span')}" + (f" ({why})" if why else ""))
    return "; ".join(said) + ": not in this table" if said else None


def summary_text(
    s: Regions, skip: int = 0, top: int | None = None, sort: str | None = None, match: str | None = None
) -> str:
    """The summary table: a head line (regions, device spans, time recorded), one row per name,
    the host's waits on the device, and what was dropped. ``skip`` drops the first N of each name
    (warm-up); ``top``, ``sort`` and ``match`` as ``selected``. A trace without device spans
    shows no device columns."""
    r = s.regions
    n_dev = int((r["device"] >= 0).sum())
    width = len(COLUMNS) if n_dev else 4  # region, count, host p50, host p95
    chosen, matched = selected(s, skip, top, sort, match)
    table = [list(COLUMNS[:width]), *([shown(c[0]), *c[1:width]] for c in map(cells, chosen))]
    lines = aligned(table)
    head = f"{plural(len(r), 'region')}, {plural(n_dev, 'device span')}"
    dur = s.meta.get("duration_ns")
    if isinstance(dur, (int, float)):
        head += f", {fmt_ns(dur)} recorded"
    if skip:
        head += f"; first {skip} of each name skipped"
    if match is not None:
        head += f"; names matching {shown(match)}"
    if len(table) == 1:
        lines.append("(no regions)" if match is None else "(no region name matches)")
    if matched > len(chosen):
        lines.append(f"({matched - len(chosen)} more not shown)")
    n_waits, waited = host_waits(s)
    if n_waits:
        lines.append(f"host waits on the device: {plural(n_waits, 'wait')}, {fmt_ns(waited)} in all")
    dropped = drops(s.meta)
    if dropped:
        lines.append(dropped)
    return head + "\n" + "\n".join(lines)
