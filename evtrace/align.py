"""Device time onto the host clock, from one-way delays. Pure numpy.

Every device stamp is a constraint: the GPU cannot stamp an event before the host submitted it,
so its host time is at or after the host clock read just before the record call. That holds
for the anchors (an event recorded on an idle side stream, bracketed by host stamps ``lo`` and
``hi``) and for every region mark (its boundary's host time, read before its record).

The mapping is the tightest one those constraints allow, the minimum-delay idea behind NTP's
clock filters and convex-hull synchronisation: the least-delayed stamps touch it and any stamp
that was delayed (an anchor taken while copies were in flight, a mark queued behind a kernel)
lies below it and does not pull it. Drift comes from the whole run, under a prior (real clocks
drift 0.7-23 ppm against perf_counter) that only a short run feels: its few stamps, whose
delays differ by more than the drift moves them, cannot pin the drift, which stays near 0
there. A local correction, the upper envelope of the stamps within ``WINDOW_S`` of each knot,
follows the drift's slow wander and bridges stretches where every stamp was late. The envelope
sits one minimum delay before the stamps; adding the shortest record call seen (``latency_ns``)
places a prompt stamp where the end of its record call was, which matched CUPTI's kernel times
within 1 µs before.

Each mark's device time comes from a short ``elapsed_time`` against the latest anchor, and
anchors are chained by short steps, so float32 milliseconds stay sub-µs over hours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .metadata import ALIGNMENT, DeviceAlignment

Clock = Callable[[], int]  # host clock in integer ns (time.perf_counter_ns by default)

#: stamps are first reduced to the least-delayed one per bin of this much device time
BIN_MS = 25.0
#: the drift is searched within this much (ppm, i.e. ns per device ms off 1e6). GPU clocks
#: measured against perf_counter drift 0.7 to 22.7 ppm (H100, H200: benchmarks/results/HISTORY.md); 200 is
#: eight times the most seen, and no more than a short run's noise reaches: two stamps 25 ms
#: apart whose delays differ by 5 µs make a line 200 ppm off (the old bound, 1000 ppm, was
#: reached, and put the ends of a 30 ms run 25 µs off)
DRIFT_MAX_PPM = 200.0
#: the drift's prior: normal, this wide (ppm), about the largest drift measured
DRIFT_PPM = 25.0
#: the prior's weight against the stamps: a bin's least-delayed stamp is taken to be late by
#: about this much (the scale of an exponential). H200 stamps up to 4.8 µs after the record
#: call when idle, more under load. Only runs of a few bins feel it (``_run_slope``)
DELAY_NS = 5000.0
#: the local envelope is re-fitted at knots this far apart ...
KNOT_MS = 500.0
#: ... from the stamps within this much device time on either side
WINDOW_S = 10.0
#: the local envelope may tilt at most this much from the run's drift (ns per ms, i.e. ppm)
TILT = 2.0
#: the slack is reported over windows of this much device time
SLACK_WINDOW_MS = 1000.0
#: an anchor stamped this much later than the map allows counts as late. Anchors are probes of
#: the stamping delay: an event on an idle stream is stamped late while other traffic (pinned
#: host<->device copies above all) is in flight, and so are the region marks around it.
LATE_NS = 2000.0


#: stamps are read this many at a time, in device-time order, so that each per-stamp temporary
#: is 2 MB whatever the run's length: an 8 h run with a mark every 5 ms has 5.8M stamps, and
#: holding them all at once (sorted, shifted, binned) took 2 GB above the inputs
STAMP_BLOCK = 1 << 18
#: the envelope's search holds at most this many knot × window cells at once (8 MB a float64
#: matrix): a window holds up to 801 bins (20 s of 25 ms), and an 8 h run has 57,600 knots, 46M
#: cells in all (369 MB a float64 matrix)
CELLS = 1 << 20
#: the envelope's search stops once the highest line at its point is within this much of the two
#: lines it crossed (a lower bound of the minimum): far below a ns, the trace's unit. The golden
#: -section search it replaced (60 steps over all lines) reached the same minimum to 4e-9 ns
#: on the 1 h benchmark, and the search took at most 7 steps there
EXACT_NS = 1e-3


@dataclass(frozen=True)
class Alignment:
    """A piecewise-linear map from device ms (since the device origin) to host ns."""

    dev_ms: np.ndarray  # float64, increasing knots
    host_ns: np.ndarray  # float64, host ns at each knot
    slope: float  # host ns per device ms over the whole run (1e6 when the clocks agree)
    anchors: int  # anchors used
    anchors_late: int  # anchors stamped more than LATE_NS after the map: taken under load
    stamps: int  # region marks used as constraints
    latency_ns: float  # shortest record call seen: the envelope's offset to a prompt stamp
    slack_us: tuple[float, float]  # p99 and max over 1 s windows of how much earlier the data allow
    anchor_delay_us: tuple[float, float, float]  # p50, p99, max: how late anchors were stamped
    origin_ms: float  # device ms of the first stamp: window i of the slack starts i s after it
    window_slack_us: np.ndarray  # the slack of each SLACK_WINDOW_MS window; NaN where no stamp

    @property
    def drift_ppm(self) -> float:
        """How much faster the device clock runs than the host clock, in ppm."""
        return (1e6 / self.slope - 1.0) * 1e6

    def to_host(self, dev_ms: np.ndarray) -> np.ndarray:
        """Host ns (float64) for device ms; linear with the run's drift beyond the first and last knot."""
        x = np.asarray(dev_ms, dtype=np.float64)
        out: np.ndarray = np.interp(x, self.dev_ms, self.host_ns)
        lo, hi = x < self.dev_ms[0], x > self.dev_ms[-1]
        out[lo] = self.host_ns[0] + (x[lo] - self.dev_ms[0]) * self.slope
        out[hi] = self.host_ns[-1] + (x[hi] - self.dev_ms[-1]) * self.slope
        return out


class _Stamps:
    """The constraints, anchors then region marks, each in device-time order, read by blocks of
    ``STAMP_BLOCK`` as (device ms, host ns) float64 relative to the first stamp (the earliest;
    an anchor on a tie), as the fit once shifted all of them at once."""

    def __init__(self, ax: np.ndarray, ay: np.ndarray, mx: np.ndarray, my: np.ndarray) -> None:
        if len(ax) > 1 and not (ax[1:] >= ax[:-1]).all():
            order = np.argsort(ax, kind="stable")
            ax, ay = ax[order], ay[order]
        self.ax, self.ay = ax, ay
        self.marks = 0
        ordered, last = True, -np.inf
        for i in range(0, len(mx), STAMP_BLOCK):
            x = mx[i : i + STAMP_BLOCK]
            x = x[np.isfinite(x)]
            self.marks += len(x)
            if len(x):
                ordered = ordered and x[0] >= last and bool((x[1:] >= x[:-1]).all())
                last = x[-1]
        if not ordered:  # callers with marks out of order pay for one sort (build.py's are in order)
            ok = np.flatnonzero(np.isfinite(mx))
            ok = ok[np.argsort(mx[ok], kind="stable")]
            mx, my = mx[ok], my[ok]
        self.mx, self.my = mx, my
        first = next((b for b in self._marks() if len(b[0])), None)
        last_mark = next((b for b in self._marks(reverse=True) if len(b[0])), None)
        self.x0, self.y0 = float(ax[0]), float(ay[0])
        if first is not None and first[0][0] < self.x0:
            self.x0, self.y0 = float(first[0][0]), float(first[1][0])
        end = float(ax[-1]) if last_mark is None else max(float(ax[-1]), float(last_mark[0][-1]))
        self.span = end - self.x0  # the last stamp's device ms, relative

    def _marks(self, reverse: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        starts = range(0, len(self.mx), STAMP_BLOCK)
        for i in reversed(starts) if reverse else starts:
            x = self.mx[i : i + STAMP_BLOCK]
            ok = np.isfinite(x)
            yield x[ok], self.my[i : i + STAMP_BLOCK][ok].astype(np.float64)

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray, bool]]:
        """(device ms, host ns, whether these are anchors), each block in device-time order."""
        for i in range(0, len(self.ax), STAMP_BLOCK):
            yield self.ax[i : i + STAMP_BLOCK] - self.x0, self.ay[i : i + STAMP_BLOCK] - self.y0, True
        for x, y in self._marks():
            if len(x):
                yield x - self.x0, y - self.y0, False


class _BinTop:
    """The point with the largest ``v`` in each bin ``width`` wide, over blocks of points that come
    in device-time order: on a tie, the earlier point (the anchor, at one device time)."""

    def __init__(self, span: float, width: float) -> None:
        self.width = width
        n = int(np.floor(span / width)) + 1
        self.x, self.v = np.full(n, np.nan), np.full(n, -np.inf)

    def add(self, x: np.ndarray, v: np.ndarray) -> None:
        b = np.floor(x / self.width).astype(np.int64)
        starts = np.r_[0, np.flatnonzero(b[1:] != b[:-1]) + 1]
        top = np.maximum.reduceat(v, starts)
        hit = np.flatnonzero(v == np.repeat(top, np.diff(np.r_[starts, len(x)])))
        seg = np.searchsorted(starts, hit, side="right")
        hx = x[hit[np.r_[True, seg[1:] != seg[:-1]]]]
        bins = b[starts]
        was_v, was_x = self.v[bins], self.x[bins]
        take = (top > was_v) | ((top == was_v) & (hx < was_x))
        self.v[bins[take]], self.x[bins[take]] = top[take], hx[take]

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        used = self.v > -np.inf
        return self.x[used], self.v[used]


def _golden(
    values: Callable[[np.ndarray], np.ndarray], lo: np.ndarray, hi: np.ndarray, iters: int = 60
) -> np.ndarray:
    """Minimise convex functions of one variable (vectorised) by golden-section search, with one
    new point a step."""
    g = (np.sqrt(5.0) - 1) / 2
    a, b = lo.astype(np.float64).copy(), hi.astype(np.float64).copy()
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = values(c), values(d)
    for _ in range(iters):
        left = fc <= fd  # the minimum lies in [a, d]
        b = np.where(left, d, b)
        a = np.where(left, a, c)
        c2, d2 = b - g * (b - a), a + g * (b - a)
        c, d = np.where(left, c2, d), np.where(left, c, d2)
        new = values(np.where(left, c2, d2))
        fc, fd = np.where(left, new, fd), np.where(left, fc, new)
    return (a + b) / 2


def _lowest_top(p: np.ndarray, q: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """For each row, the minimum over ``|s| <= limit`` of the convex ``max_j (p_j + s q_j)``, exactly
    (cutting planes: the highest lines at the bracket's ends, falling and rising, cross where the
    next point is taken; the highest line there replaces one of them, until it is one of them).
    A handful of passes over the lines, where a golden-section search made 120."""
    every = np.arange(len(p))
    buf = np.empty_like(p)

    def top(s: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pr, qr = (p, q) if len(rows) == len(p) else (p[rows], q[rows])
        v = np.multiply(qr, s[:, None], out=buf[: len(rows)])
        v += pr
        j = np.argmax(v, axis=1)
        at = np.arange(len(rows))
        return v[at, j], pr[at, j], qr[at, j]

    s_lo, s_hi = -limit.astype(np.float64), limit.astype(np.float64)
    f_lo, p_lo, q_lo = top(s_lo, every)
    f_hi, p_hi, q_hi = top(s_hi, every)
    # rising at the lower end or falling at the upper: the minimum is there
    out = np.where(q_lo >= 0, f_lo, np.where(q_hi <= 0, f_hi, np.nan))
    best = np.minimum(f_lo, f_hi)
    todo = np.flatnonzero(np.isnan(out))
    for _ in range(100):  # finite: each step adds a line of the upper envelope (7 at most seen)
        if not len(todo):
            break
        pl, ql, ph, qh = p_lo[todo], q_lo[todo], p_hi[todo], q_hi[todo]
        s = np.clip((pl - ph) / (qh - ql), s_lo[todo], s_hi[todo])
        f, pc, qc = top(s, todo)
        best[todo] = np.minimum(best[todo], f)
        done = (f - (pl + s * ql) <= EXACT_NS) | (qc == 0)
        out[todo[done]] = f[done]
        for side, (sb, pb, qb) in ((qc < 0, (s_lo, p_lo, q_lo)), (qc > 0, (s_hi, p_hi, q_hi))):
            move = ~done & side
            sb[todo[move]], pb[todo[move]], qb[todo[move]] = s[move], pc[move], qc[move]
        todo = todo[~done]
    out[todo] = best[todo]
    return out


def _run_slope(bx: np.ndarray, by: np.ndarray) -> float:
    """The run's slope (host ns per device ms) from the ``n`` bins' least-delayed stamps.

    Of the lines above every stamp, the one lowest at the stamps' mean device time ``mid`` is
    the most likely if delays are exponential with scale ``DELAY_NS``: the delays it implies
    sum to ``n`` times its height at ``mid`` (less the stamps' mean). With a normal prior of
    width ``DRIFT_PPM`` on the drift, the most probable line minimises that height plus
    ``DELAY_NS / (2 n DRIFT_PPM²)`` times the squared drift in ppm. A long run's stamps pin the
    drift and the prior does not move it; a short run's few stamps, whose delays differ by more
    than the drift moves them, leave it near 0, and their line then stays within their delays.
    """
    if np.ptp(bx) <= 0:
        return 1e6
    mid = float(bx.mean())
    k = DELAY_NS / (2 * len(bx) * DRIFT_PPM**2)
    r = DRIFT_MAX_PPM

    def cost(s: np.ndarray) -> np.ndarray:
        top: np.ndarray = np.max(by[None, :] - s[:, None] * (bx[None, :] - mid), axis=1)
        return top + k * (s - 1e6) ** 2

    return float(_golden(cost, np.array([1e6 - r]), np.array([1e6 + r]))[0])


def _envelope(bx: np.ndarray, br: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """At each knot, the lowest line within TILT of the drift above the stamps ``(bx, br)`` within
    WINDOW_S of it, by blocks of knots of at most CELLS knot × window cells."""
    w = WINDOW_S * 1e3
    lo_i = np.searchsorted(bx, knots - w)
    hi_i = np.searchsorted(bx, knots + w, side="right")
    # only tilt between stamps on both sides: beyond the last ones it would follow a late one down
    both = (bx[lo_i] < knots) & (bx[np.maximum(hi_i - 1, 0)] > knots)
    local = np.empty(len(knots))
    n = hi_i - lo_i
    width = int(n.max())
    rows = max(1, CELLS // width)
    pad = np.full(width, -np.inf)
    brs = np.lib.stride_tricks.sliding_window_view(np.r_[br, pad], width)
    bxs = np.lib.stride_tricks.sliding_window_view(np.r_[bx, pad], width)
    for k in range(0, len(knots), rows):
        at = slice(k, k + rows)
        w = int(n[at].max())
        outside = np.arange(w)[None, :] >= n[at, None]
        p = brs[lo_i[at], :w]
        p[outside] = -np.inf
        q = knots[at, None] - bxs[lo_i[at], :w]
        q[outside] = 0.0
        local[at] = _lowest_top(p, q, np.where(both[at], TILT, 0.0))
    return local


def fit(
    lo_ns: np.ndarray,
    hi_ns: np.ndarray,
    dev_ms: np.ndarray,
    mark_host_ns: np.ndarray | None = None,
    mark_ms: np.ndarray | None = None,
    latency_ns: float | None = None,
) -> Alignment:
    """Fit the device→host map from anchor brackets ``[lo, hi]`` with their device times, and
    region marks (the host time before each record, with its device time). ``latency_ns``
    defaults to the shortest anchor bracket (min ``hi - lo``), the shortest record call seen.

    Linear in the number of stamps, in memory bounded by the blocks (``STAMP_BLOCK``, ``CELLS``)
    and one value per 25 ms bin, when the marks come in device-time order (as ``build.py``
    gives them); marks out of order are sorted first."""
    lo = np.asarray(lo_ns, dtype=np.float64)
    ax = np.asarray(dev_ms, dtype=np.float64)
    if len(ax) == 0:
        raise ValueError("alignment needs at least one anchor")
    if latency_ns is None:
        latency_ns = float(np.min(np.asarray(hi_ns, dtype=np.float64) - lo))
    mx = np.empty(0) if mark_ms is None else np.asarray(mark_ms, dtype=np.float64)
    my = np.empty(0) if mark_host_ns is None else np.asarray(mark_host_ns)
    st = _Stamps(ax, lo, mx, my)

    # the run's drift: the line above every stamp that is lowest at the middle of the run
    bins = _BinTop(st.span, BIN_MS)
    for x, y, _ in st.blocks():
        bins.add(x, y - 1e6 * x)
    bx, by = bins.points()
    by = by + 1e6 * bx
    mid = float(bx.mean())
    slope = _run_slope(bx, by)
    base = max(float((y - slope * (x - mid)).max()) for x, y, _ in st.blocks())

    # the local envelope at knots: the lowest line within TILT of the drift above the stamps near it
    bins = _BinTop(st.span, BIN_MS)
    for x, y, _ in st.blocks():
        bins.add(x, (y - slope * (x - mid)) - base)
    bx, br = bins.points()  # br <= 0
    knots = np.arange(bx.min(), bx.max() + KNOT_MS, KNOT_MS) if np.ptp(bx) > 0 else bx[:1]
    w = WINDOW_S * 1e3  # no knot where no stamp lies within WINDOW_S (it was -inf): the map is straight there
    knots = knots[np.searchsorted(bx, knots + w, side="right") > np.searchsorted(bx, knots - w)]
    local = _envelope(bx, br, knots)
    host = st.y0 + base + slope * (knots - mid) + local + latency_ns
    x0 = st.x0
    fitted = Alignment(
        knots + x0,
        host,
        slope,
        len(ax),
        0,
        st.marks,
        float(latency_ns),
        (0.0, 0.0),
        (0.0, 0.0, 0.0),
        x0,
        bx[:0],
    )

    # what the data allow: in each second, how far the map lies above its tightest stamp
    least = np.full(int(np.floor(st.span / SLACK_WINDOW_MS)) + 1, np.inf)
    delays = []
    for x, y, anchor in st.blocks():
        gap = fitted.to_host(x + x0) - latency_ns - (y + st.y0)
        b = np.floor(x / SLACK_WINDOW_MS).astype(np.int64)
        starts = np.r_[0, np.flatnonzero(b[1:] != b[:-1]) + 1]
        least[b[starts]] = np.minimum(least[b[starts]], np.minimum.reduceat(gap, starts))
        if anchor:
            delays.append(np.maximum(gap, 0.0) / 1e3)
    windows = np.where(np.isfinite(least), np.maximum(least, 0.0) / 1e3, np.nan)
    per = windows[np.isfinite(least)]
    delay = np.concatenate(delays)
    late = int((delay > LATE_NS / 1e3).sum())
    slack = (float(np.percentile(per, 99)), float(per.max()))
    spread = (float(np.median(delay)), float(np.percentile(delay, 99)), float(delay.max()))
    return Alignment(
        fitted.dev_ms, host, slope, len(ax), late, st.marks, float(latency_ns), slack, spread, x0, windows
    )


#: above these, the end of a run and ``evtrace report`` warn in words: a device lane 5 µs off
#: misplaces short kernels by more than they last, and 0.5 % of spans clamped (moved after their
#: launch) is more than the runs with a good map show (none)
WARN_US = 5.0
WARN_CLAMPED = 0.005
#: the metadata keeps this many of the worst stretches of poor windows: enough to find them in a
#: trace, and a line of warning stays short
WORST_KEPT = 3


def poor_stretches(
    fit: Alignment, span_ms: np.ndarray, clamped: np.ndarray, origin_ns: float
) -> tuple[int, int, tuple[tuple[float, float, float, float], ...]]:
    """The 1 s windows (SLACK_WINDOW_MS of device time) whose slack is over WARN_US, or whose device
    spans (by their start ``span_ms``) are over WARN_CLAMPED ``clamped``: how many, how many runs of
    consecutive ones, and the WORST_KEPT worst runs in time order as (start, end) in s since
    ``origin_ns`` on the host clock, the largest slack there (µs) and the % of its spans clamped."""
    slack = np.nan_to_num(fit.window_slack_us, nan=0.0)
    n = len(slack)
    w = np.floor((np.asarray(span_ms, dtype=np.float64) - fit.origin_ms) / SLACK_WINDOW_MS)
    inside = np.isfinite(w) & (w >= 0) & (w < n)
    w = w[inside].astype(np.int64)
    spans = np.bincount(w, minlength=n)
    bad = np.bincount(w, weights=np.asarray(clamped, dtype=np.float64)[inside], minlength=n)
    poor = np.flatnonzero((slack > WARN_US) | (bad > WARN_CLAMPED * spans))
    if not len(poor):
        return 0, 0, ()
    starts = np.r_[0, np.flatnonzero(np.diff(poor) > 1) + 1]
    first, last = poor[starts], poor[np.r_[starts[1:], len(poor)] - 1]
    worst = np.maximum.reduceat(slack[poor], starts)
    pct = 100 * np.add.reduceat(bad[poor], starts) / np.maximum(np.add.reduceat(spans[poor], starts), 1)
    severity = np.maximum(worst / WARN_US, pct / (100 * WARN_CLAMPED))
    keep = np.sort(np.argsort(-severity, kind="stable")[:WORST_KEPT])
    edges = fit.origin_ms + SLACK_WINDOW_MS * np.stack([first[keep], last[keep] + 1], 1)
    sec = (fit.to_host(edges.ravel()).reshape(-1, 2) - origin_ns) / 1e9
    kept = tuple(
        (round(float(a), 3), round(float(b), 3), round(float(u), 3), round(float(c), 3))
        for (a, b), u, c in zip(sec, worst[keep], pct[keep])
    )
    return int(len(poor)), int(len(starts)), kept


def per_gpu(meta: dict[str, Any]) -> dict[str, DeviceAlignment]:
    """Each GPU's alignment figures, by device index (a string), from a session's typed metadata."""
    found = meta.get(ALIGNMENT)
    if not isinstance(found, dict):
        return {}
    return {str(d): a for d, a in found.items() if isinstance(a, DeviceAlignment)}


def _stretch(start: float, end: float, slack_us: float, clamped_pct: float) -> str:
    why = []
    if slack_us > WARN_US:
        why.append(f"every stamp late: the lane may sit up to {slack_us:.1f} µs off")
    if clamped_pct > 100 * WARN_CLAMPED:
        why.append(f"{clamped_pct:.1f}% of its spans clamped")
    return f"{start:.1f}-{end:.1f} s ({'; '.join(why)})"


def stamp_delay(g: DeviceAlignment) -> str:
    """The stamping delay the anchors saw, in words."""
    return f"events stamped {g.stamp_delay_us_p50:.1f} µs late (p50), {g.stamp_delay_us_p99:.1f} µs (p99)"


def alignment_warnings(meta: dict[str, Any]) -> list[str]:
    """What a user must know before trusting the device lanes, in words; empty when all is well."""
    out = []
    for d, g in sorted(per_gpu(meta).items()):
        if g.poor_windows:
            shown = "; ".join(_stretch(*w) for w in g.worst_stretches)
            more = g.poor_stretches - len(g.worst_stretches)
            out.append(
                f"GPU {d}: the device lane may be off in {g.poor_windows} s of the run, in "
                f"{g.poor_stretches} stretch{'es' if g.poor_stretches > 1 else ''}"
                + (f", the worst {len(g.worst_stretches)}" if more > 0 else "")
                + f": {shown}"
                + (f"; and {more} more" if more > 0 else "")
            )
        elif g.slack_us_p99 > WARN_US:  # a trace written before windows were kept
            out.append(
                f"GPU {d}: in some seconds every stamp was late, so the device lane there may sit up to "
                f"{g.slack_us_p99:.1f} µs off (slack_us_p99)"
            )
        if g.stamp_delay_us_p99 > WARN_US:
            out.append(
                f"GPU {d}: the GPU stamped events up to {g.stamp_delay_us_p99:.0f} µs late at times "
                f"({stamp_delay(g)}), as it does while other traffic such as host-device copies is in "
                "flight. It wrote those stamps late, and no map onto the host clock can move a stamp "
                f"earlier than the GPU wrote it: device ends may be up to {g.stamp_delay_us_p99:.0f} µs "
                "late while such traffic runs"
            )
    spans, clamped = int(meta.get("device_spans", 0) or 0), int(meta.get("clamped_device_spans", 0) or 0)
    if spans and clamped > WARN_CLAMPED * spans:
        out.append(
            f"{clamped} of {spans} device spans ({100 * clamped / spans:.1f}%) were placed before their "
            "launch and clamped: the alignment is off"
        )
    return out
