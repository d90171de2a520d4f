"""`evtrace report`: one screen of GitHub markdown to paste into a bug report.

Owns the :class:`Report` view (versions, top regions by device time, GPU busy and idle gaps,
host waits, who made everyone wait at collectives (a merged trace), alignment, drops, what the
trace tells about the machine). It reads the Session
only: the trace file's name and size are given to it, never looked up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from ..align import alignment_warnings, per_gpu, stamp_delay
from ..analysis import COLUMNS, fmt_ns, gaps, host_waits, plural, rows
from ..collectives import stragglers, stragglers_markdown
from ..session import Session, rank_labels
from .markdown import code, escape

__all__ = ["Report", "machine", "report"]


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(escape(c) for c in row) + " |" for row in body]
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


def machine(s: Session) -> str:
    """One line: what the trace tells about the machine it was recorded on, from what it holds."""
    m = s.meta
    held = []
    if m.get("host_id"):
        held.append(f"host id {code(m['host_id'])} (a hash of the host name and boot)")
    if m.get("gpus"):
        held.append("the GPU names")
    versions = [
        name
        for key, name in (
            ("python", "Python"),
            ("torch", "torch"),
            ("cuda", "CUDA"),
            ("driver", "the driver"),
        )
        if m.get(key)
    ]
    if versions:
        held.append(
            "the versions of "
            + (", ".join(versions[:-1]) + " and " if len(versions) > 1 else "")
            + versions[-1]
        )
    argv = m.get("argv")
    if argv:
        held.append(f"the command line as stored ({code(' '.join(str(a) for a in argv))})")
    held.append("pids, thread names, and your region names and args")
    return "**This trace holds, about the machine:** " + ", ".join(held) + "; no environment variables."


class Report:
    """The report of a session saved as ``trace_name`` (``trace_size`` bytes, when known)."""

    suffix: ClassVar[str] = ".md"

    def __init__(self, trace_name: str = "trace.json.gz", trace_size: int | None = None) -> None:
        self.trace_name = trace_name
        self.trace_size = trace_size

    def render(self, s: Session) -> str:
        name, m = self.trace_name, s.meta
        argv = m.get("argv") or []
        lines = [f"### evtrace report: {code(name)}", ""]
        env = [
            ["evtrace", m.get("evtrace", "?")],
            ["python", m.get("python", "?")],
            ["torch", m.get("torch") or "-"],
            ["CUDA", m.get("cuda") or "-"],
            ["driver", m.get("driver") or "-"],
            ["GPU", ", ".join(m.get("gpus") or []) or "none (host lanes only)"],
            ["command", " ".join(_relative(str(a)) for a in argv)],
        ]
        lines += _table(["", ""], env) + [""]
        top = sorted(rows(s), key=lambda t: -t.device_busy)[:8]
        if s.ranks:
            merged = f"{plural(len(s.ranks), 'trace')} ({', '.join(rank_labels(s.ranks))})"
            lines += [f"**Merged:** {merged}; {escape(m.get('merge.method', '?'))}.", ""]
        counts = f"{plural(len(s), 'region')}, {plural(s.device_spans, 'device span')}"
        lines += [
            f"**Top regions by device time** ({counts}, {fmt_ns(m.get('duration_ns', 0))} recorded)",
            "",
        ]
        body = [
            [t.name, str(t.n), *map(fmt_ns, t[2:7]), fmt_ns(t.device_busy) if t.device_busy else "-"]
            for t in top
        ]
        lines += _table(list(COLUMNS), body)
        lines.append("")
        frac, idle = gaps(s)
        if frac == frac:
            lines.append(
                f"**GPU:** busy {100 * frac:.0f}%, idle {100 * (1 - frac):.0f}% "
                "of the time between its first and "
                "last span (by the innermost regions)."
            )
            if idle:
                said = (
                    f"{fmt_ns(g.end - g.start)} at {fmt_ns(g.start)} (host in {code(g.host_doing)})"
                    for g in idle
                )
                lines.append("Longest idle gaps: " + "; ".join(said) + ".")
        else:
            lines.append("**GPU:** no device spans (no CUDA, or regions were host-only).")
        n_waits, waited = host_waits(s)
        waits = f"{plural(n_waits, 'wait')}, {fmt_ns(waited)} in all" if n_waits else "none recorded"
        lines.append(f"**Host waits on the device:** {waits}.")
        if s.ranks:
            lines += stragglers_markdown(stragglers(s.ranks, rank_labels(s.ranks)), code)
        gpus = per_gpu(m)
        if gpus:
            lines.append(
                "**Alignment:** "
                + "; ".join(
                    f"GPU {escape(d)}: {plural(g.anchors, 'anchor')} ({g.anchors_late} stamped late), "
                    f"drift {g.drift_ppm:.3f} ppm, "
                    f"slack {g.slack_us_p99:.2f} µs (max {g.slack_us_max:.2f}), "
                    f"{stamp_delay(g)}"
                    for d, g in sorted(gpus.items())
                )
                + ". The slack is how much earlier the stamps of each second would let the device lane sit;"
                " the stamping delay, how much later than the least-delayed stamps the GPU stamped anchors."
            )
        lines += [f"> **Warning:** {escape(w)}." for w in alignment_warnings(m)]
        keys = (
            "dropped_device_spans",
            "split_device_spans",
            "clamped_device_spans",
            "dropped_regions",
            "unfinished_regions",
        )
        lost = {k: m.get(k, 0) for k in keys}
        lines.append(
            "**Drops:** "
            + (", ".join(f"{escape(v)} {k.replace('_', ' ')}" for k, v in lost.items() if v) or "none")
            + "."
        )
        lines.append(machine(s))
        size = f", {self.trace_size / 1024:.0f} KiB" if self.trace_size is not None else ""
        lines += [
            "",
            f"The attached trace ({code(name)}{size}) opens offline in https://ui.perfetto.dev (drag it in), "
            f"or with {code(f'evtrace view {name}')}.",
        ]
        return "\n".join(lines) + "\n"


def report(s: Session, trace: Path) -> str:
    """The report of ``s`` saved at ``trace``: the file's size is read here, outside the view."""
    size = trace.stat().st_size if trace.exists() else 0
    return Report(trace.name, size).render(s)
