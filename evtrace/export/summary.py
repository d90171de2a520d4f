"""`evtrace summary`: one row per region name, units chosen by magnitude."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..session import Session

COLUMNS = ("region", "count", "host p50", "host p95", "device p50", "device p95", "launch→start p50", "device busy")


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
    """"1 region", "2 regions"."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def busy_ns(start: np.ndarray, end: np.ndarray) -> int:
    """Length of the union of [start, end) intervals."""
    if len(start) == 0:
        return 0
    o = np.argsort(start, kind="stable")
    s, e = start[o], np.maximum.accumulate(end[o])
    gaps = np.maximum(s[1:] - e[:-1], 0)
    return int(e[-1] - s[0] - gaps.sum())


def rows(s: Session, skip: int = 0) -> list[tuple[str, int, float, float, float, float, float, int]]:
    """Per name: count, host p50/p95, device p50/p95, launch→start p50 (ns), device busy (ns)."""
    r = s.regions
    out = []
    nan = float("nan")
    for ix, name in enumerate(s.names):
        g = r[r["name"] == ix]
        g = g[np.argsort(g["host_start"], kind="stable")][skip:]
        if len(g) == 0:
            continue
        host = g["host_end"] - g["host_start"]
        dv = g[g["device"] >= 0]
        dev = dv["dev_end"] - dv["dev_start"]
        lead = dv["dev_start"] - dv["host_start"]
        pct = lambda x, q: float(np.percentile(x, q)) if len(x) else nan  # noqa: E731
        busy = sum(busy_ns(dv["dev_start"][dv["device"] == d], dv["dev_end"][dv["device"] == d]) for d in np.unique(dv["device"]))
        out.append((name, len(g), pct(host, 50), pct(host, 95), pct(dev, 50), pct(dev, 95), pct(lead, 50), busy))
    out.sort(key=lambda t: (-t[7], -t[1] * t[2] if t[2] == t[2] else 0, t[0]))
    return out


def summary(s: Session, skip: int = 0) -> str:
    table = [COLUMNS]
    for name, n, hp50, hp95, dp50, dp95, lead, busy in rows(s, skip):
        has_dev = dp50 == dp50
        table.append((name, str(n), fmt_ns(hp50), fmt_ns(hp95), fmt_ns(dp50), fmt_ns(dp95), fmt_ns(lead), fmt_ns(busy) if has_dev else "-"))
    lines = _aligned(table)
    dur = s.meta.get("duration_ns")
    head = f"{plural(len(s), 'region')}, {plural(s.device_spans, 'device span')}"
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


def host_waits(s: Session) -> tuple[int, int]:
    """How many "wait ..." regions (the host blocked on the device), and their total host ns."""
    w = s.regions[np.isin(s.regions["name"], [i for i, n in enumerate(s.names) if n.startswith("wait ")])]
    return len(w), int((w["host_end"] - w["host_start"]).sum())


def _aligned(table: Sequence[Sequence[str]]) -> list[str]:
    """A text table: the first column left-aligned, the others right, a rule under the head."""
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    lines = ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def ranks(sessions: list[Session], labels: list[str]) -> str:
    """Ranks (or processes) side by side: a straggler shows as less device busy time, or more."""
    head = ("trace", "rank", "regions", "host time", "device busy", "device busy %")
    table = [head]
    for label, s in zip(labels, sessions):
        r = s.regions
        dur = s.meta.get("duration_ns") or int(r["host_end"].max(initial=0))
        busy = sum(busy_ns(r["dev_start"][r["device"] == d], r["dev_end"][r["device"] == d]) for d in np.unique(r["device"][r["device"] >= 0]))
        rank = s.meta.get("rank")
        table.append((label, str(rank) if rank is not None else "-", str(len(s)), fmt_ns(dur), fmt_ns(busy) if busy else "-", f"{100 * busy / dur:.0f}%" if busy and dur else "-"))
    return "\n".join(_aligned(table))
