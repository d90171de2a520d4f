"""`evtrace diff BEFORE AFTER`: what got slower, per region name, and whether it is more than noise.

Per name and trace: the count, host and device p50/p95, and the device busy time (the length of
the union of that name's device spans, per device and rank, summed; nested or overlapping spans
of one name are counted once).

Each row is tested: a two-sided Mann–Whitney U test (normal approximation with tie and continuity
corrections) of the name's device durations before against after, or of its host durations when
either side has too few device spans. The p-values are Holm-corrected for the number of rows
tested, so that one noisy row among many is not called a change. A row is "slower" or "faster"
when its corrected p is below ``alpha`` and the p50 of the durations it tested moved by
``min_change`` % or more: with thousands of samples the test finds shifts of a fraction of a
percent, and real timings drift that much between runs (clocks, heat, neighbours).
numpy and the standard library only: no scipy at run time.

Owns the comparison (:func:`compare` → :class:`Diff`) and its two views, :class:`DiffText` and
:class:`DiffMarkdown`: the exporters' shape, with two sessions in (``render(before, after)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..analysis import aligned, by_name, device_busy_ns, fmt_ns, plural
from ..session import Session
from .markdown import escape as _md

MIN_SAMPLES = 8  # below this on either side, the normal approximation is too coarse to test
BUSY = "device busy: the union of the name's device spans (per device and rank, summed)"


class DiffError(ValueError):
    """The two traces cannot be compared (no common names, a rank that is not there)."""


@dataclass(frozen=True)
class Side:
    """One region name in one trace."""

    host: np.ndarray  # host durations, ns
    dev: np.ndarray  # device durations, ns (regions with a device span only)
    busy: int  # ns

    @property
    def count(self) -> int:
        return len(self.host)

    def p(self, kind: str, q: float) -> float:
        x = self.dev if kind == "device" else self.host
        return float(np.percentile(x, q)) if len(x) else float("nan")


@dataclass(frozen=True)
class Change:
    """One region name, before and after: its test, and what the diff calls it."""

    name: str
    before: Side
    after: Side
    tested: str  # "device" or "host": which durations the test compared; "" when too few
    p: float  # Holm-corrected two-sided p; NaN when not tested
    direction: int  # +1: after tends longer, -1: shorter, 0: no difference in ranks
    alpha: float
    min_change: float  # %: a significant shift smaller than this is not called slower or faster

    @property
    def change(self) -> float:
        """The p50 change of the tested durations, in %; NaN when not tested."""
        if not self.tested:
            return float("nan")
        return pct(self.before.p(self.tested, 50), self.after.p(self.tested, 50))

    @property
    def verdict(self) -> str:
        if not self.tested:
            return "too few"
        if not self.p < self.alpha or self.direction == 0:
            return "n.s."
        c = self.change
        if self.direction > 0 and c >= self.min_change:
            return "slower"
        if self.direction < 0 and c <= -self.min_change:
            return "faster"
        return f"<{self.min_change:g}%"  # a real shift, but too small to call


@dataclass(frozen=True)
class Diff:
    rows: list[Change]  # by the change in device busy time, largest increase first; host-only rows last
    only_before: list[str]
    only_after: list[str]
    scope: tuple[str, str]  # what each side pooled: "1 recording", "2 ranks pooled", "rank 1"
    alpha: float
    min_change: float
    skip: int

    def regressions(self, above: float) -> list[Change]:
        """Significantly slower rows whose change exceeds ``above`` % (also below ``min_change``:
        a gate asked for explicitly wins)."""
        return [
            r for r in self.rows if r.tested and r.p < self.alpha and r.direction > 0 and r.change > above
        ]


def pct(before: float, after: float) -> float:
    return 100.0 * (after - before) / before if before > 0 else float("nan")


def mann_whitney(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Two-sided p of the Mann–Whitney U test of ``x`` against ``y``, and the direction (+1: ``y``
    tends larger). Normal approximation with the tie correction and a continuity correction."""
    n1, n2 = len(x), len(y)
    n = n1 + n2
    _, inv, counts = np.unique(np.concatenate([x, y]), return_inverse=True, return_counts=True)
    counts = counts.astype(np.float64)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2  # tied values share their mean rank
    u = float(mid_rank[inv[n1:]].sum()) - n2 * (n2 + 1) / 2  # pairs where y is the larger
    mu = n1 * n2 / 2
    var = n1 * n2 / 12 * ((n + 1) - float((counts**3 - counts).sum()) / (n * (n - 1)))
    if var <= 0:  # every value equal
        return 1.0, 0
    z = max(abs(u - mu) - 0.5, 0.0) / math.sqrt(var)
    return min(1.0, math.erfc(z / math.sqrt(2))), int(np.sign(u - mu))


def holm(p: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values; NaN (not tested) stays NaN and is not counted."""
    a = np.asarray(p, dtype=np.float64)
    out = np.full_like(a, np.nan)
    idx = np.flatnonzero(np.isfinite(a))
    idx = idx[np.argsort(a[idx], kind="stable")]
    m = len(idx)
    out[idx] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * a[idx]))
    return [float(v) for v in out]


def pick(s: Session, rank: int | None) -> tuple[list[Session], str]:
    """The recordings to pool from ``s``: every rank, or the one whose rank is ``rank``."""
    parts = s.ranks or [s]
    if rank is None:
        return parts, "1 recording" if len(parts) == 1 else f"{len(parts)} ranks pooled"
    got = [p for p in parts if p.meta.get("rank") == rank]
    if len(got) != 1:
        have = sorted({p.meta["rank"] for p in parts if isinstance(p.meta.get("rank"), int)})
        held = f"ranks {', '.join(map(str, have))}" if have else "no ranks"
        raise DiffError(
            f"no rank {rank} in it (it holds {held})" if not got else f"rank {rank} is in it {len(got)} times"
        )
    return got, f"rank {rank}"


def sides(parts: list[Session], skip: int = 0) -> dict[str, Side]:
    """Per region name: its durations and busy time over ``parts``, the first ``skip`` of each
    name in each part dropped (warm-up)."""
    acc: dict[str, tuple[list[np.ndarray], list[np.ndarray], int]] = {}
    for s in parts:
        r = s.regions
        for ix, g in by_name(r, len(s.names), skip):
            if len(g) == 0:
                continue
            name = s.names[ix]
            dv = g[g["device"] >= 0]
            busy = device_busy_ns(dv)
            hosts, devs, b = acc.setdefault(name, ([], [], 0))
            hosts.append(g["host_end"] - g["host_start"])
            devs.append(dv["dev_end"] - dv["dev_start"])
            acc[name] = (hosts, devs, b + busy)
    return {name: Side(np.concatenate(h), np.concatenate(d), b) for name, (h, d, b) in acc.items()}


def compare(
    before: Session,
    after: Session,
    *,
    rank: int | None = None,
    skip: int = 0,
    alpha: float = 0.05,
    min_change: float = 2.0,
) -> Diff:
    """The rows of names both traces hold. DiffError when they share none, or lack ``rank``."""
    parts, scope = [], []
    for which, s in (("BEFORE", before), ("AFTER", after)):
        try:
            p, sc = pick(s, rank)
        except DiffError as e:
            raise DiffError(f"{which}: {e}") from None
        parts.append(sides(p, skip))
        scope.append(sc)
    a, b = parts
    common = sorted(set(a) & set(b))
    if not common:
        raise DiffError(
            "the two traces have no region name in common"
            + (f" (after skipping {skip} of each)" if skip else "")
        )
    tests: list[tuple[str, float, int]] = []
    for name in common:
        x, y = a[name], b[name]
        kind = "device" if min(len(x.dev), len(y.dev)) >= MIN_SAMPLES else "host"
        xs, ys = (x.dev, y.dev) if kind == "device" else (x.host, y.host)
        if min(len(xs), len(ys)) < MIN_SAMPLES:
            tests.append(("", float("nan"), 0))
        else:
            tests.append((kind, *mann_whitney(xs, ys)))
    adjusted = holm([t[1] for t in tests])
    rows = [
        Change(n, a[n], b[n], kind, p, d, alpha, min_change)
        for n, (kind, _, d), p in zip(common, tests, adjusted)
    ]

    def order(r: Change) -> tuple[bool, int, str]:
        if len(r.before.dev) or len(r.after.dev):
            return False, -(r.after.busy - r.before.busy), r.name
        return True, -int(r.after.host.sum() - r.before.host.sum()), r.name  # host only: by total host time

    rows.sort(key=order)
    return Diff(
        rows, sorted(set(a) - set(b)), sorted(set(b) - set(a)), (scope[0], scope[1]), alpha, min_change, skip
    )


# ---- rendering ----

COLUMNS = (
    "region",
    "count",
    "host p50",
    "host p95",
    "device p50",
    "device p95",
    "device busy",
    "test",
    "p",
    "verdict",
)


def _change(before: float, after: float) -> str:
    c = pct(before, after)
    if c != c:
        return ""
    return f"{c:+.1f}%" if abs(c) < 10 else f"{c:+.0f}%"


def _cell(before: float, after: float) -> str:
    """ "406 → 485 µs +19%": the unit once when both share it."""
    if before != before and after != after:
        return "-"
    a, b = fmt_ns(before), fmt_ns(after)
    if a.split(" ")[-1] == b.split(" ")[-1] and " " in a:
        a = a.split(" ")[0]
    ch = _change(before, after)
    return f"{a} → {b} {ch}" if ch else f"{a} → {b}"


def _count(before: int, after: int) -> str:
    return str(before) if before == after else f"{before} → {after} {_change(before, after)}".rstrip()


def _p(p: float) -> str:
    if p != p:
        return "-"
    return "<0.0001" if p < 1e-4 else f"{p:.2g}"


def _cells(r: Change) -> list[str]:
    a, b = r.before, r.after
    has_dev = len(a.dev) or len(b.dev)
    busy = _cell(a.busy, b.busy) if has_dev else "-"
    return [
        r.name,
        _count(a.count, b.count),
        _cell(a.p("host", 50), b.p("host", 50)),
        _cell(a.p("host", 95), b.p("host", 95)),
        _cell(a.p("device", 50), b.p("device", 50)),
        _cell(a.p("device", 95), b.p("device", 95)),
        busy,
        r.tested or "-",
        _p(r.p),
        r.verdict
        + (
            f" {_change(r.before.p(r.tested, 50), r.after.p(r.tested, 50))}"
            if r.verdict in ("slower", "faster")
            else ""
        ),
    ]


def _notes(d: Diff) -> list[str]:
    notes = [
        BUSY + ".",
        (
            "test: Mann–Whitney U of the tested durations, Holm-corrected over "
            f"{plural(sum(1 for r in d.rows if r.tested), 'row')}; "
            f"slower/faster: p < {d.alpha:g} and a p50 change of {d.min_change:g}% or more; "
            f"<{d.min_change:g}%: significant but smaller; n.s.: not significant."
        ),
    ]
    if d.skip:
        notes.append(f"the first {d.skip} of each name skipped (warm-up).")
    for label, names in (("only in BEFORE", d.only_before), ("only in AFTER", d.only_after)):
        if names:
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            notes.append(f"{label}: {shown}")
    return notes


def text(d: Diff, before: str, after: str) -> str:
    """A table for the terminal."""
    head = f"before: {before} ({d.scope[0]})\nafter:  {after} ({d.scope[1]})"
    lines = aligned([COLUMNS, *(_cells(r) for r in d.rows)])
    return "\n".join([head, *lines, *_notes(d)]) + "\n"


def markdown(d: Diff, before: str, after: str) -> str:
    """GitHub-flavoured markdown, for a pull request."""
    slower = [r for r in d.rows if r.verdict == "slower"]
    summary = f"{len(slower)} of {plural(len(d.rows), 'region')} significantly slower" + (
        ": " + ", ".join(_md(r.name) for r in slower[:5]) if slower else ""
    )
    out = [
        f"**evtrace diff**: {_md(before)} ({d.scope[0]}) → {_md(after)} ({d.scope[1]})",
        "",
        summary,
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|:--|" + "--:|" * (len(COLUMNS) - 1),
    ]
    for r in d.rows:
        cells = [_md(c) for c in _cells(r)]
        if r.verdict == "slower":
            cells[-1] = f"**{cells[-1]}**"
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out += [f"- {_md(n)}" for n in _notes(d)]
    return "\n".join(out) + "\n"


class DiffText:
    """``compare(before, after, ...)`` as a table for the terminal; the labels name the inputs."""

    suffix: ClassVar[str] = ".txt"

    def __init__(
        self,
        before: str = "BEFORE",
        after: str = "AFTER",
        *,
        rank: int | None = None,
        skip: int = 0,
        alpha: float = 0.05,
        min_change: float = 2.0,
    ) -> None:
        self.labels = (before, after)
        self.rank, self.skip, self.alpha, self.min_change = rank, skip, alpha, min_change

    def compare(self, before: Session, after: Session) -> Diff:
        """The rows; DiffError when the sessions cannot be compared."""
        return compare(
            before, after, rank=self.rank, skip=self.skip, alpha=self.alpha, min_change=self.min_change
        )

    def format(self, d: Diff) -> str:
        return text(d, *self.labels)

    def render(self, before: Session, after: Session) -> str:
        return self.format(self.compare(before, after))


class DiffMarkdown(DiffText):
    """The same as GitHub-flavoured markdown, for a pull request."""

    suffix: ClassVar[str] = ".md"

    def format(self, d: Diff) -> str:
        return markdown(d, *self.labels)
