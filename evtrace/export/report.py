"""`evtrace report`: one screen of GitHub markdown to paste into a bug report."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..clock import alignment_warnings, per_gpu
from ..session import Session
from .chrome import _flat, rank_labels
from .summary import busy_ns, fmt_ns, host_waits, plural, rows


def _cell(x: object) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body]
    return out


def _relative(arg: str) -> str:
    """Paths in the command shortened to the working directory (never the home directory)."""
    try:
        p = Path(arg)
        if p.is_absolute() and p.exists():
            return os.path.relpath(p)
    except (OSError, ValueError):
        pass
    return arg


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


def gaps(s: Session, top: int = 3) -> tuple[float, list[tuple[int, int, str]]]:
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
            cands = np.nonzero(cover >= 0.9 * best)[0]
            i = int(cands[np.argmin((host["host_end"] - host["host_start"])[cands])])
            doing = s.names[host["name"][i]]
        out.append((a, b, doing))
    return busy / span if span > 0 else float("nan"), out


def machine(s: Session) -> str:
    """One line: what the trace tells about the machine it was recorded on, from what it holds."""
    m = _flat(s.meta)
    held = []
    if m.get("host_id"):
        held.append(f"host id `{m['host_id']}` (a hash of the host name and boot)")
    if m.get("gpus"):
        held.append("the GPU names")
    versions = [name for key, name in (("python", "Python"), ("torch", "torch"), ("cuda", "CUDA"), ("driver", "the driver")) if m.get(key)]
    if versions:
        held.append("the versions of " + (", ".join(versions[:-1]) + " and " if len(versions) > 1 else "") + versions[-1])
    argv = m.get("argv")
    if argv:
        held.append(f"the command line as stored (`{_cell(' '.join(str(a) for a in argv))}`)")
    held.append("pids, thread names, and your region names and args")
    return "**This trace holds, about the machine:** " + ", ".join(held) + "; no environment variables."


def report(s: Session, trace: Path) -> str:
    m = _flat(s.meta)
    argv = m.get("argv") or []
    lines = [f"### evtrace report: `{trace.name}`", ""]
    env = [["evtrace", m.get("evtrace", "?")], ["python", m.get("python", "?")], ["torch", m.get("torch") or "-"], ["CUDA", m.get("cuda") or "-"], ["driver", m.get("driver") or "-"]]
    env += [["GPU", ", ".join(m.get("gpus") or []) or "none (host lanes only)"], ["command", "`" + " ".join(_relative(str(a)) for a in argv) + "`"]]
    lines += _table(["", ""], env) + [""]
    top = sorted(rows(s), key=lambda t: -t[7])[:8]
    if s.ranks:
        lines += [f"**Merged:** {plural(len(s.ranks), 'trace')} ({', '.join(rank_labels(s.ranks))}); {m.get('merge.method', '?')}.", ""]
    lines += [f"**Top regions by device time** ({plural(len(s), 'region')}, {plural(s.device_spans, 'device span')}, {fmt_ns(m.get('duration_ns', 0))} recorded)", ""]
    lines += _table(
        ["region", "count", "host p50", "host p95", "device p50", "device p95", "launch→start p50", "device busy"],
        [[n, str(c), fmt_ns(h50), fmt_ns(h95), fmt_ns(d50), fmt_ns(d95), fmt_ns(lead), fmt_ns(busy) if busy else "-"] for n, c, h50, h95, d50, d95, lead, busy in top],
    )
    lines.append("")
    frac, idle = gaps(s)
    if frac == frac:
        lines.append(f"**GPU:** busy {100 * frac:.0f}%, idle {100 * (1 - frac):.0f}% of the time between its first and last span (by the innermost regions).")
        if idle:
            lines.append("Longest idle gaps: " + "; ".join(f"{fmt_ns(b - a)} at {fmt_ns(a)} (host in `{_cell(doing)}`)" for a, b, doing in idle) + ".")
    else:
        lines.append("**GPU:** no device spans (no CUDA, or regions were host-only).")
    n_waits, waited = host_waits(s)
    lines.append(f"**Host waits on the device:** {n_waits}, {fmt_ns(waited)} in all." if n_waits else "**Host waits on the device:** none recorded.")
    gpus = per_gpu(m)
    if gpus:
        lines.append(
            "**Alignment:** "
            + "; ".join(
                f"GPU {d}: {g.get('anchors', 0):.0f} anchors ({g.get('anchors_late', 0):.0f} stamped late), drift {g.get('drift_ppm', 0):.3f} ppm, "
                f"bound {g.get('bound_us_p99', 0):.2f} µs (max {g.get('bound_us_max', 0):.2f}), events stamped late by up to {g.get('stamp_delay_us_p99', 0):.1f} µs (p99)"
                for d, g in sorted(gpus.items())
            )
            + ". The bound is how much earlier the stamps of each second would let the device lane sit."
        )
    lines += [f"> **Warning:** {w}." for w in alignment_warnings(m)]
    lost = {k: m.get(k, 0) for k in ("dropped_device_spans", "split_device_spans", "clamped_device_spans", "dropped_regions", "unfinished_regions")}
    lines.append("**Drops:** " + (", ".join(f"{v} {k.replace('_', ' ')}" for k, v in lost.items() if v) or "none") + ".")
    lines.append(machine(s))
    size = trace.stat().st_size if trace.exists() else 0
    lines += ["", f"The attached trace (`{trace.name}`, {size / 1024:.0f} KiB) opens offline in https://ui.perfetto.dev (drag it in), or with `evtrace view {trace.name}`."]
    return "\n".join(lines) + "\n"
