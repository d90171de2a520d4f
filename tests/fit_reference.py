"""A frozen copy of ``align.fit`` as it was before issue #23 (commit 1acef2f): the reference that
the streaming fit must reproduce. It holds every stamp and a knots × window matrix at once, so
it is only run on short data (tests) or to time the old cost (``benchmarks/fit_long.py --before``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from evtrace.align import (
    BIN_MS,
    DELAY_NS,
    DRIFT_MAX_PPM,
    DRIFT_PPM,
    KNOT_MS,
    LATE_NS,
    SLACK_WINDOW_MS,
    TILT,
    WINDOW_S,
)

ANCHOR_S = 0.1
MARK_MS = 5.0


def synthetic(hours: float, seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays ``build.py`` hands ``align.fit`` for a run of ``hours``: lo, hi, ms, first, stamps.

    An anchor every 0.1 s (a 2 µs record call, stamped 0-1 µs after it), a region mark every 5 ms
    (stamped after its call, exponentially delayed with a 1 µs scale, a third of them queued
    behind a kernel by up to 3 ms), a drift of 21 ppm that wanders by 20 µs over half an hour,
    and three 3 s stretches per hour in which every stamp is 10-20 µs late. The marks are the
    distinct device stamps in order, with the host time of their boundary."""
    rng = np.random.default_rng(seed)
    span_ns = hours * 3600e9
    t0 = 4.2e12
    lo = t0 + np.arange(0, span_ns, ANCHOR_S * 1e9) + rng.uniform(0, 50_000, int(np.ceil(span_ns / 1e8)))
    lo = np.rint(lo).astype(np.int64)
    hi = lo + 2000 + rng.integers(0, 300, len(lo))
    first = t0 + np.arange(20_000, span_ns, MARK_MS * 1e6) + rng.uniform(0, 100_000, int(span_ns / 5e6))
    first = np.rint(first).astype(np.int64)
    a_true = hi + rng.uniform(0, 1000, len(hi))  # host ns at which each stamp was made
    m_true = first + 2000 + rng.exponential(1000, len(first))
    queued = rng.random(len(first)) < 1 / 3
    m_true[queued] += rng.uniform(0, 3e6, queued.sum())
    for start in rng.uniform(0, span_ns - 3e9, max(1, int(round(3 * hours)))):  # late stretches
        for t in (a_true, m_true):
            inside = (t >= t0 + start) & (t < t0 + start + 3e9)
            t[inside] += rng.uniform(10_000, 20_000, inside.sum())

    def dev_ms(t: np.ndarray) -> np.ndarray:
        s = t - t0
        out: np.ndarray = (s * (1 + 21e-6) + 20_000 * np.sin(2 * np.pi * s / 1.8e12)) / 1e6
        return out

    stamps = dev_ms(m_true)
    order = np.argsort(stamps, kind="stable")
    return {"lo": lo, "hi": hi, "ms": dev_ms(a_true), "first": first[order], "stamps": stamps[order]}


class OldFit(NamedTuple):
    dev_ms: np.ndarray
    host_ns: np.ndarray
    slope: float
    anchors_late: int
    slack_us: tuple[float, float]
    anchor_delay_us: tuple[float, float, float]
    latency_ns: float


def _segments(x: np.ndarray, width: float) -> np.ndarray:
    b = np.floor((x - x[0]) / width).astype(np.int64)
    starts: np.ndarray = np.r_[0, np.flatnonzero(b[1:] != b[:-1]) + 1]
    return starts


def _bin_max(x: np.ndarray, y: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    starts = _segments(x, width)
    top = np.maximum.reduceat(y, starts)
    counts = np.diff(np.r_[starts, len(x)])
    hit = np.flatnonzero(y == np.repeat(top, counts))
    first = np.r_[
        True,
        np.searchsorted(starts, hit[1:], side="right") != np.searchsorted(starts, hit[:-1], side="right"),
    ]
    return x[hit[first]], y[hit[first]]


def _min_max(
    values: Callable[[np.ndarray], np.ndarray], lo: np.ndarray, hi: np.ndarray, iters: int = 60
) -> np.ndarray:
    g = (np.sqrt(5.0) - 1) / 2
    a, b = lo.astype(np.float64).copy(), hi.astype(np.float64).copy()
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = values(c), values(d)
    for _ in range(iters):
        left = fc <= fd
        b = np.where(left, d, b)
        a = np.where(left, a, c)
        c2, d2 = b - g * (b - a), a + g * (b - a)
        c, d = np.where(left, c2, d), np.where(left, c, d2)
        fc, fd = np.where(left, values(c), fd), np.where(left, fc, values(d))
    return (a + b) / 2


def _run_slope(bx: np.ndarray, by: np.ndarray) -> float:
    if np.ptp(bx) <= 0:
        return 1e6
    mid = float(bx.mean())
    k = DELAY_NS / (2 * len(bx) * DRIFT_PPM**2)
    r = DRIFT_MAX_PPM

    def cost(s: np.ndarray) -> np.ndarray:
        top: np.ndarray = np.max(by[None, :] - s[:, None] * (bx[None, :] - mid), axis=1)
        return top + k * (s - 1e6) ** 2

    return float(_min_max(cost, np.array([1e6 - r]), np.array([1e6 + r]))[0])


def _to_host(knots: np.ndarray, host: np.ndarray, slope: float, dev_ms: np.ndarray) -> np.ndarray:
    x = np.asarray(dev_ms, dtype=np.float64)
    out: np.ndarray = np.interp(x, knots, host)
    lo, hi = x < knots[0], x > knots[-1]
    out[lo] = host[0] + (x[lo] - knots[0]) * slope
    out[hi] = host[-1] + (x[hi] - knots[-1]) * slope
    return out


def old_fit(
    lo_ns: np.ndarray,
    hi_ns: np.ndarray,
    dev_ms: np.ndarray,
    mark_host_ns: np.ndarray | None = None,
    mark_ms: np.ndarray | None = None,
    latency_ns: float | None = None,
) -> OldFit:
    lo = np.asarray(lo_ns, dtype=np.float64)
    ax = np.asarray(dev_ms, dtype=np.float64)
    if latency_ns is None:
        latency_ns = float(np.min(np.asarray(hi_ns, dtype=np.float64) - lo))
    mx = np.empty(0) if mark_ms is None else np.asarray(mark_ms, dtype=np.float64)
    my = np.empty(0) if mark_host_ns is None else np.asarray(mark_host_ns, dtype=np.float64)
    ok = np.isfinite(mx)
    x, y = np.r_[ax, mx[ok]], np.r_[lo, my[ok]]
    order = np.argsort(x, kind="stable")
    x0, y0 = float(x[order[0]]), float(y[order[0]])
    x, y = x[order] - x0, y[order] - y0
    is_anchor = order < len(ax)

    bx, by = _bin_max(x, y - 1e6 * x, BIN_MS)
    by = by + 1e6 * bx
    mid = float(bx.mean())
    slope = _run_slope(bx, by)
    r = y - slope * (x - mid)
    base = float(r.max())

    bx, br = _bin_max(x, r - base, BIN_MS)
    knots = np.arange(bx.min(), bx.max() + KNOT_MS, KNOT_MS) if np.ptp(bx) > 0 else bx[:1]
    w = WINDOW_S * 1e3
    lo_i = np.searchsorted(bx, knots - w)
    hi_i = np.searchsorted(bx, knots + w, side="right")
    width = int((hi_i - lo_i).max())
    idx = lo_i[:, None] + np.arange(width)[None, :]
    valid = idx < hi_i[:, None]
    idx = np.minimum(idx, len(bx) - 1)
    px, pr = bx[idx], np.where(valid, br[idx], -np.inf)
    dx = knots[:, None] - px

    def envelope(s: np.ndarray) -> np.ndarray:
        top: np.ndarray = np.max(pr + s[:, None] * dx, axis=1)
        return top

    both = (valid & (dx > 0)).any(axis=1) & (valid & (dx < 0)).any(axis=1)
    limit = np.where(both, TILT, 0.0)
    tilt = _min_max(envelope, -limit, limit)
    local = envelope(tilt)
    host = y0 + base + slope * (knots - mid) + local + latency_ns

    gap = _to_host(knots + x0, host, slope, x + x0) - latency_ns - (y + y0)
    per = np.maximum(np.minimum.reduceat(gap, _segments(x, SLACK_WINDOW_MS)), 0.0) / 1e3
    delay = np.maximum(gap[is_anchor], 0.0) / 1e3
    late = int((delay > LATE_NS / 1e3).sum())
    bound = (float(np.percentile(per, 99)), float(per.max()))
    delays = (float(np.median(delay)), float(np.percentile(delay, 99)), float(delay.max()))
    return OldFit(knots + x0, host, slope, late, bound, delays, float(latency_ns))
