"""`evtrace render`: a static SVG timeline, standard library only, for a bug report.

Host lanes above, device lanes below, one time axis with ticks labelled from the window's start;
slices labelled where they fit; arrows from a few launches to their execution. By default the
window is one representative step: the median instance of a repeating outermost region that
does device work (a wait, such as ``data wait``, is never a step). The picture's height is capped
(MAX_ROWS a lane, MAX_HEIGHT in all), and what the cap left out is counted and said.

Owns the :class:`Timeline` view (its window and lane filter are constructor options) and
``draw``, which also says what it drew and refuses an empty picture (:class:`NothingToDraw`).
"""

from __future__ import annotations

import re
from typing import ClassVar, NamedTuple
from xml.sax.saxutils import escape

import numpy as np

from ..analysis import fmt_ns, is_wait, outermost, plural
from ..session import Session, rank_labels

WIDTH, LABEL_W, LANE_H, TOP = 1200, 190, 22, 28
PALETTE = [
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
]
MAX_SLICES = 4000
# The picture's height: a recursion 3,000 deep drew 66,058 px, which no viewer scrolls through and
# where a row is 1/3,000 of the picture. An instrumented model's step nests ~10 deep (step > model
# > block > layer > attention > linear ...); 32 rows hold that three times over. 4,000 px is about
# three screens of the 1200 px wide picture as GitHub shows it (scaled to ~900 px wide).
MAX_ROWS = 32  # rows (nesting levels) drawn per lane; deeper slices are counted, not drawn
MAX_HEIGHT = 4000  # px: fewer rows per lane where many lanes would pass it, then fewer lanes
# characters XML 1.0 forbids or that show as nothing: written as Python escapes, e.g. "\x00"
_UNSHOWABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


class NothingToDraw(ValueError):
    """The window or the lanes chosen hold nothing: the SVG would be empty."""


class Drawn(NamedTuple):
    svg: str
    lanes: int
    slices: int
    window: tuple[int, int]
    capped: bool  # more slices than MAX_SLICES were in the window
    deeper: int = 0  # slices not drawn: deeper than their lane's rows (MAX_ROWS, or fewer by MAX_HEIGHT)
    rows: int = MAX_ROWS  # the rows a lane had at most
    lanes_cut: int = 0  # lanes not drawn, past MAX_HEIGHT
    lanes_cut_slices: int = 0  # the slices on them

    def __str__(self) -> str:
        a, b = _distinct([self.window[0], self.window[1]])
        cap = f", the first {MAX_SLICES} (narrow --window)" if self.capped else ""
        drawn = f"{plural(self.slices, 'slice')}{cap} on {plural(self.lanes, 'lane')}"
        return f"{drawn}, window {a} – {b}{self.cut()}"

    def cut(self) -> str:
        """What the height cap left out, as a clause; empty when nothing."""
        out = []
        if self.deeper:
            out.append(f"{plural(self.deeper, 'slice')} deeper than {plural(self.rows, 'row')}")
        if self.lanes_cut:
            n, k = self.lanes_cut, self.lanes_cut_slices
            out.append(
                f"{plural(n, 'lane')} ({plural(k, 'slice')}) past {MAX_HEIGHT} px (choose with --lanes)"
            )
        return f"; not drawn: {', '.join(out)}" if out else ""


def _xml(text: str) -> str:
    """Text for an SVG element: XML-escaped, control characters and lone surrogates spelled out."""
    return escape(
        _UNSHOWABLE.sub(
            lambda m: repr(m.group())[1:-1] if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text
        )
    )


def _distinct(values: list[int]) -> list[str]:
    """ns values in one unit (by the largest), with the fewest decimals that tell them apart."""
    big = max((abs(v) for v in values), default=0)
    unit, scale = next(
        ((u, sc) for u, sc in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)) if big >= sc), ("ns", 1.0)
    )
    out: list[str] = []
    for dec in range(0 if unit == "ns" else 10):
        out = [f"{v / scale:.{dec}f} {unit}" for v in values]
        if len(set(out)) == len(set(values)):
            break
    return out or [f"{v} ns" for v in values]


def _device_work(r: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For regions ``rows``: whether a region with a device span starts within each one's host
    span on its thread (itself included), and the latest device end among those."""
    has = np.zeros(len(rows), dtype=bool)
    end = r["host_end"][rows].copy()
    dev = np.nonzero(r["device"] >= 0)[0]
    for th in np.unique(r["thread"][rows]).tolist():
        d = dev[r["thread"][dev] == th]
        d = d[np.argsort(r["host_start"][d], kind="stable")]
        starts, dend = r["host_start"][d], r["dev_end"][d]
        for k in np.nonzero(r["thread"][rows] == th)[0].tolist():
            i = rows[k]
            lo, hi = np.searchsorted(starts, [r["host_start"][i], r["host_end"][i]], side="left")
            if hi > lo:
                has[k] = True
                end[k] = max(int(end[k]), int(dend[lo:hi].max()))
    return has, end


def default_window(s: Session) -> tuple[int, int]:
    """One representative step: of the outermost regions that are not waits, the names that
    repeat and do device work (any that repeat, on a host-only trace), the one that spans the most
    time, its device work included; its median instance by that span, with a margin."""
    r = s.regions
    if len(r) == 0:
        return 0, 1
    names = np.array([is_wait(n) for n in s.names] or [False])
    work = np.nonzero(~names[r["name"]])[0]
    if len(work) == 0:
        return int(r["host_start"].min()), int(r["host_end"].max())
    top = work[outermost(r[work])]
    has_dev, end = _device_work(r, top)
    counts = np.bincount(r["name"][top], minlength=len(s.names))
    for pick in (
        has_dev & (counts[r["name"][top]] > 1),
        counts[r["name"][top]] > 1,
        has_dev,
        np.ones(len(top), bool),
    ):
        if pick.any():
            break
    cand, cend = top[pick], end[pick]
    dur = cend - r["host_start"][cand]  # its extent, device work included
    total = np.bincount(r["name"][cand], weights=dur, minlength=len(s.names))
    mine = r["name"][cand] == int(np.argmax(total))
    cand, cend, dur = cand[mine], cend[mine], dur[mine]
    k = np.argsort(dur, kind="stable")[len(cand) // 2]
    a, b = int(r["host_start"][cand[k]]), int(cend[k])
    pad = max((b - a) // 20, 1000)
    return a - pad, b + pad


def _ticks(t0: int, t1: int) -> list[int]:
    """Offsets from the window's start: 0 and then round steps, at most 8 more."""
    span = max(t1 - t0, 1)
    step = 10 ** int(np.floor(np.log10(span / 6))) if span >= 6 else 1
    for m in (1, 2, 5, 10):
        if span / (step * m) <= 8:
            step *= m
            break
    return list(range(0, span + 1, step))


def lanes_of(s: Session) -> tuple[list[str], list[str]]:
    """The host lanes (one per thread) and device lanes (one per stream), by rank when merged."""
    if not s.ranks:
        return [f"host · {t.name}" for t in s.threads], [f"GPU {st.device} · {st.label}" for st in s.streams]
    host: list[str] = []
    dev: list[str] = []
    for label, r in zip(rank_labels(s.ranks), s.ranks):
        h, d = lanes_of(r)
        host += [f"{label} · {n}" for n in h]
        dev += [f"{label} · {n}" for n in d]
    return host, dev


class Timeline:
    """The SVG timeline of ``window`` (ns since the start; default one representative step), on
    the lanes whose name matches the regular expression ``lanes`` (default all). ``strict``:
    NothingToDraw instead of an SVG that shows nothing."""

    suffix: ClassVar[str] = ".svg"

    def __init__(
        self, window: tuple[int, int] | None = None, lanes: str | None = None, strict: bool = False
    ) -> None:
        self.window, self.lanes, self.strict = window, lanes, strict
        self.drawn: Drawn | None = None  # what the last render() drew, for a line that says so

    def draw(self, s: Session) -> Drawn:
        """The SVG and what it shows."""
        return draw(s, self.window, self.lanes, self.strict)

    def render(self, s: Session) -> str:
        self.drawn = self.draw(s)
        return self.drawn.svg


def render(s: Session, window: tuple[int, int] | None = None, lanes: str | None = None) -> str:
    """The SVG, also when it shows nothing: ``Timeline(window, lanes).render(s)``."""
    return Timeline(window, lanes).render(s)


def draw(
    s: Session, window: tuple[int, int] | None = None, lanes: str | None = None, strict: bool = True
) -> Drawn:
    """The SVG and what it shows. ``strict``: NothingToDraw when no lane matches or the window is empty."""
    if strict and len(s) == 0:
        raise NothingToDraw("the trace holds no regions: nothing to draw")
    t0, t1 = window or default_window(s)
    if t1 <= t0:
        raise ValueError("the window ends before it starts")
    r = s.regions
    lane_rx = re.compile(lanes) if lanes else None
    # lanes: host threads, then (device, stream); each kept if it matches ``lanes``
    lane_names: list[str] = []

    def keep(names: list[str]) -> dict[int, int]:
        kept = {}
        for j, name in enumerate(names):
            if lane_rx is None or lane_rx.search(name):
                kept[j] = len(lane_names)
                lane_names.append(name)
        return kept

    host_names, dev_names = lanes_of(s)
    host_lane = keep(host_names)
    dev_lane = keep(dev_names)
    if strict and not lane_names:
        raise NothingToDraw(
            f"--lanes {lanes!r} matches no lane; the lanes are: {', '.join(host_names + dev_names)}"
        )
    visible = np.nonzero(
        (r["host_end"] >= t0) & (r["host_start"] <= t1)
        | ((r["device"] >= 0) & (r["dev_end"] >= t0) & (r["dev_start"] <= t1))
    )[0]
    capped = len(visible) > MAX_SLICES
    visible = visible[:MAX_SLICES]
    # every visible slice: (lane, start, end, region); nested slices get a row each within a lane
    slices: list[tuple[int, int, int, int]] = []
    for i in visible.tolist():
        row = r[i]
        th = int(row["thread"])
        if th in host_lane and row["host_end"] >= t0 and row["host_start"] <= t1:
            slices.append((host_lane[th], int(row["host_start"]), int(row["host_end"]), i))
        if (
            row["device"] >= 0
            and int(row["stream"]) in dev_lane
            and row["dev_end"] >= t0
            and row["dev_start"] <= t1
        ):
            slices.append((dev_lane[int(row["stream"])], int(row["dev_start"]), int(row["dev_end"]), i))
    if strict and not slices:
        end = int(max(r["host_end"].max(), r["dev_end"][r["device"] >= 0].max(initial=0)))
        wa, wb = _distinct([t0, t1])
        raise NothingToDraw(
            f"nothing was recorded on these lanes between {wa} and {wb} (the trace ends at {fmt_ns(end)})"
        )
    slices.sort(key=lambda t: (t[0], t[1], -t[2]))
    depth: list[int] = []
    rows_in = [1] * len(lane_names)
    stack: list[int] = []
    lane_now = -1
    for lane, a, b, _ in slices:
        if lane != lane_now:
            stack, lane_now = [], lane
        while stack and stack[-1] <= a:
            stack.pop()
        depth.append(len(stack))
        stack.append(b)
        rows_in[lane] = max(rows_in[lane], len(stack))
    # the height cap: at most MAX_ROWS rows a lane, fewer where the lanes would pass MAX_HEIGHT
    # (down to one row each), then only the lanes that fit
    fit = (MAX_HEIGHT - TOP - 30 - 16) // LANE_H  # below the lanes: the footer, and what was cut
    rows = MAX_ROWS
    while rows > 1 and sum(min(n, rows) for n in rows_in) > fit:
        rows -= 1
    rows_in = [min(n, rows) for n in rows_in]
    shown = len(lane_names)
    while sum(rows_in[:shown]) > fit:
        shown -= 1
    keep_slice = [lane < shown and d < rows for (lane, *_), d in zip(slices, depth)]
    deeper_in = [0] * len(lane_names)
    for (lane, *_), d in zip(slices, depth):
        deeper_in[lane] += d >= rows
    lanes_cut_slices = sum(1 for lane, *_ in slices if lane >= shown)
    deeper = sum(deeper_in[:shown])
    slices = [t for t, k in zip(slices, keep_slice) if k]
    depth = [d for d, k in zip(depth, keep_slice) if k]
    lanes_cut = len(lane_names) - shown
    lane_names, rows_in = lane_names[:shown], rows_in[:shown]
    lane_y = np.r_[0, np.cumsum(rows_in)] * LANE_H + TOP
    plot_w = WIDTH - LABEL_W - 10

    def x(t: float) -> float:
        return LABEL_W + (min(max(t, t0), t1) - t0) * plot_w / (t1 - t0)

    drawn = Drawn(
        "", len(lane_names), len(slices), (t0, t1), capped, deeper, rows, lanes_cut, lanes_cut_slices
    )
    cut = drawn.cut()[2:]  # a line of its own under the footer
    height = int(lane_y[-1]) + 30 + (16 if cut else 0)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">',
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>',
        '<defs><marker id="arrow" viewBox="0 0 6 6" refX="6" refY="3" markerWidth="6" markerHeight="6" '
        'orient="auto"><path d="M0,0 L6,3 L0,6 z" fill="#555"/></marker></defs>',
    ]
    for k, name in enumerate(lane_names):
        y, h = lane_y[k], rows_in[k] * LANE_H
        fill = "#f4f4f4" if k % 2 == 0 else "#ffffff"
        out.append(f'<rect x="0" y="{y}" width="{WIDTH}" height="{h}" fill="{fill}"/>')
        out.append(f'<text x="6" y="{y + 15}" fill="#333">{_xml(name[:30])}</text>')
        if deeper_in[k] and rows_in[k] > 1:  # (the footer says it for all lanes)
            out.append(
                f'<text x="6" y="{y + 29}" fill="#a00">+{deeper_in[k]} deeper than '
                f"{plural(rows_in[k], 'row')}, not drawn</text>"
            )
    ticks = _ticks(t0, t1)
    for tick, label in zip(ticks, _distinct(ticks)):
        xx = x(t0 + tick)
        out.append(f'<line x1="{xx:.1f}" y1="{TOP - 4}" x2="{xx:.1f}" y2="{lane_y[-1] + 4}" stroke="#ddd"/>')
        out.append(
            f'<text x="{xx:.1f}" y="{TOP - 8}" text-anchor="{"start" if tick == 0 else "middle"}" '
            f'fill="#555">{_xml(label)}</text>'
        )
    where: dict[tuple[int, int], tuple[int, float, float]] = {}  # (region, host or device) -> lane, x, y
    for (lane, a, b, i), d in zip(slices, depth):
        name = s.names[int(r["name"][i])]
        color = PALETTE[int(r["name"][i]) % len(PALETTE)]
        y = lane_y[lane] + d * LANE_H + 3
        xa, xb = x(a), x(b)
        w = max(xb - xa, 1.0)
        out.append(
            f'<rect x="{xa:.1f}" y="{y}" width="{w:.1f}" height="{LANE_H - 6}" fill="{color}" '
            f'fill-opacity="0.9" stroke="#222" stroke-width="0.3">'
            f"<title>{_xml(f'{name}: {fmt_ns(b - a)}')}</title></rect>"
        )
        if w > 40:
            out.append(
                f'<text x="{xa + 3:.1f}" y="{y + 12}" fill="#fff">'
                f"{_xml(name[: max(int((w - 6) // 6.5), 1)])}</text>"
            )
        where[(i, 0 if lane in host_lane.values() else 1)] = (lane, xa, y)
    arrows = 0
    for (i, kind), (_lane, xa, y) in where.items():
        if kind == 0 and (i, 1) in where and arrows < 12:
            _, xd, yd = where[(i, 1)]
            out.append(
                f'<line x1="{xa:.1f}" y1="{y + LANE_H - 6}" x2="{xd:.1f}" y2="{yd}" stroke="#555" '
                'stroke-width="0.8" marker-end="url(#arrow)"/>'
            )
            arrows += 1
    wa, wb = _distinct([t0, t1])
    out.append(
        f'<text x="{LABEL_W}" y="{height - 8}" fill="#555">window {_xml(wa)} – {_xml(wb)} since the start '
        f"({_xml(fmt_ns(t1 - t0))}; ticks from its start); host lanes above, device lanes below; "
        "arrows: launch → execution</text>"
    )
    if cut:
        out.append(f'<text x="{LABEL_W}" y="{lane_y[-1] + 18}" fill="#a00">{_xml(cut)}</text>')
    out.append("</svg>")
    return drawn._replace(svg="\n".join(out) + "\n")
