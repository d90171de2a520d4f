"""`evtrace render`: a static SVG timeline, standard library only, for a bug report.

Host lanes above, device lanes below, one time axis with labelled ticks; slices labelled where
they fit; arrows from a few launches to their execution. By default the window is one
representative step: the median instance of the most frequent outermost region.
"""

from __future__ import annotations

import re
from xml.sax.saxutils import escape

import numpy as np

from ..session import Session
from .chrome import outermost
from .summary import fmt_ns

WIDTH, LABEL_W, LANE_H, TOP = 1200, 190, 22, 28
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]
MAX_SLICES = 4000


def default_window(s: Session) -> tuple[int, int]:
    r = s.regions
    if len(r) == 0:
        return 0, 1
    top = r[outermost(r)]
    names, counts = np.unique(top["name"], return_counts=True)
    g = top[top["name"] == names[np.argmax(counts)]]
    g = g[np.argsort(g["host_end"] - g["host_start"], kind="stable")]
    one = g[len(g) // 2]
    end = max(int(one["host_end"]), int(one["dev_end"]) if one["device"] >= 0 else 0)
    pad = max((end - int(one["host_start"])) // 20, 1000)
    return int(one["host_start"]) - pad, end + pad


def _ticks(t0: int, t1: int) -> list[int]:
    span = max(t1 - t0, 1)
    step = 10 ** int(np.floor(np.log10(span / 6)))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= 8:
            step *= m
            break
    first = -(-t0 // step) * step
    return list(range(first, t1 + 1, step))


def render(s: Session, window: tuple[int, int] | None = None, lanes: str | None = None) -> str:
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

    host_lane = keep([f"host · {t.name}" for t in s.threads])
    dev_lane = keep([f"GPU {st.device} · {st.label}" for st in s.streams])
    visible = np.nonzero((r["host_end"] >= t0) & (r["host_start"] <= t1) | ((r["device"] >= 0) & (r["dev_end"] >= t0) & (r["dev_start"] <= t1)))[0][:MAX_SLICES]
    # every visible slice: (lane, start, end, region); nested slices get a row each within a lane
    slices: list[tuple[int, int, int, int]] = []
    for i in visible.tolist():
        row = r[i]
        th = int(row["thread"])
        if th in host_lane and row["host_end"] >= t0 and row["host_start"] <= t1:
            slices.append((host_lane[th], int(row["host_start"]), int(row["host_end"]), i))
        if row["device"] >= 0 and int(row["stream"]) in dev_lane and row["dev_end"] >= t0 and row["dev_start"] <= t1:
            slices.append((dev_lane[int(row["stream"])], int(row["dev_start"]), int(row["dev_end"]), i))
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
    lane_y = np.r_[0, np.cumsum(rows_in)] * LANE_H + TOP
    plot_w = WIDTH - LABEL_W - 10
    x = lambda t: LABEL_W + (min(max(t, t0), t1) - t0) * plot_w / (t1 - t0)  # noqa: E731
    height = int(lane_y[-1]) + 30
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">',
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>',
        '<defs><marker id="arrow" viewBox="0 0 6 6" refX="6" refY="3" markerWidth="6" markerHeight="6" orient="auto"><path d="M0,0 L6,3 L0,6 z" fill="#555"/></marker></defs>',
    ]
    for k, name in enumerate(lane_names):
        y, h = lane_y[k], rows_in[k] * LANE_H
        fill = "#f4f4f4" if k % 2 == 0 else "#ffffff"
        out.append(f'<rect x="0" y="{y}" width="{WIDTH}" height="{h}" fill="{fill}"/>')
        out.append(f'<text x="6" y="{y + 15}" fill="#333">{escape(name[:30])}</text>')
    for tick in _ticks(t0, t1):
        xx = x(tick)
        out.append(f'<line x1="{xx:.1f}" y1="{TOP - 4}" x2="{xx:.1f}" y2="{height - 26}" stroke="#ddd"/>')
        out.append(f'<text x="{xx:.1f}" y="{TOP - 8}" text-anchor="middle" fill="#555">{escape(fmt_ns(tick))}</text>')
    where: dict[tuple[int, int], tuple[int, float, float]] = {}  # (region, host or device) -> lane, x, y
    for (lane, a, b, i), d in zip(slices, depth):
        name = s.names[int(r["name"][i])]
        color = PALETTE[int(r["name"][i]) % len(PALETTE)]
        y = lane_y[lane] + d * LANE_H + 3
        xa, xb = x(a), x(b)
        w = max(xb - xa, 1.0)
        out.append(f'<rect x="{xa:.1f}" y="{y}" width="{w:.1f}" height="{LANE_H - 6}" fill="{color}" fill-opacity="0.9" stroke="#222" stroke-width="0.3"><title>{escape(f"{name}: {fmt_ns(b - a)}")}</title></rect>')
        if w > 40:
            out.append(f'<text x="{xa + 3:.1f}" y="{y + 12}" fill="#fff">{escape(name[: max(int((w - 6) // 6.5), 1)])}</text>')
        where[(i, 0 if lane in host_lane.values() else 1)] = (lane, xa, y)
    arrows = 0
    for (i, kind), (lane, xa, y) in where.items():
        if kind == 0 and (i, 1) in where and arrows < 12:
            _, xd, yd = where[(i, 1)]
            out.append(f'<line x1="{xa:.1f}" y1="{y + LANE_H - 6}" x2="{xd:.1f}" y2="{yd}" stroke="#555" stroke-width="0.8" marker-end="url(#arrow)"/>')
            arrows += 1
    out.append(f'<text x="{LABEL_W}" y="{height - 8}" fill="#555">window {escape(fmt_ns(t0))} – {escape(fmt_ns(t1))} ({escape(fmt_ns(t1 - t0))}); host lanes above, device lanes below; arrows: launch → execution</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
