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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .metadata import ALIGNMENT, DeviceAlignment

Clock = Callable[[], int]  # host clock in integer ns (time.perf_counter_ns by default)

#: stamps are first reduced to the least-delayed one per bin of this much device time
BIN_MS = 25.0
#: the drift is searched within this much (ppm, i.e. ns per device ms off 1e6). GPU clocks
#: measured against perf_counter drift 0.7 to 22.7 ppm (H100, H200: BENCHMARKS.md); 200 is
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
#: the bound is reported over windows of this much device time
BOUND_WINDOW_MS = 1000.0
#: an anchor stamped this much later than the map allows counts as late. Anchors are probes of
#: the stamping delay: an event on an idle stream is stamped late while other traffic (pinned
#: host<->device copies above all) is in flight, and so are the region marks around it.
LATE_NS = 2000.0


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
    bound_us: tuple[float, float]  # p99 and max over 1 s windows of how much earlier the data allow
    anchor_delay_us: tuple[float, float, float]  # p50, p99, max: how late anchors were stamped

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


def _segments(x: np.ndarray, width: float) -> np.ndarray:
    """Where each bin of sorted ``x`` (bins ``width`` wide) begins."""
    b = np.floor((x - x[0]) / width).astype(np.int64)
    starts: np.ndarray = np.r_[0, np.flatnonzero(b[1:] != b[:-1]) + 1]
    return starts


def _bin_max(x: np.ndarray, y: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """The point with the largest ``y`` in each bin of sorted ``x`` (bins ``width`` wide)."""
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
    """Minimise convex functions of one variable (vectorised) by golden-section search."""
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
        fc, fd = np.where(left, values(c), fd), np.where(left, fc, values(d))
    return (a + b) / 2


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

    return float(_min_max(cost, np.array([1e6 - r]), np.array([1e6 + r]))[0])


def fit(
    lo_ns: np.ndarray,
    hi_ns: np.ndarray,
    dev_ms: np.ndarray,
    mark_host_ns: np.ndarray | None = None,
    mark_ms: np.ndarray | None = None,
    latency_ns: float | None = None,
) -> Alignment:
    """Fit the device→host map from anchor brackets ``[lo, hi]`` with their device times, and
    region marks (the host time before each record, with its device time)."""
    lo = np.asarray(lo_ns, dtype=np.float64)
    ax = np.asarray(dev_ms, dtype=np.float64)
    if len(ax) == 0:
        raise ValueError("alignment needs at least one anchor")
    if latency_ns is None:
        latency_ns = float(np.min(np.asarray(hi_ns, dtype=np.float64) - lo))
    mx = np.empty(0) if mark_ms is None else np.asarray(mark_ms, dtype=np.float64)
    my = np.empty(0) if mark_host_ns is None else np.asarray(mark_host_ns, dtype=np.float64)
    ok = np.isfinite(mx)
    x, y = np.r_[ax, mx[ok]], np.r_[lo, my[ok]]
    order = np.argsort(x, kind="stable")  # two sorted runs, merged
    x0, y0 = float(x[order[0]]), float(y[order[0]])
    x, y = x[order] - x0, y[order] - y0  # small numbers: float64 keeps sub-ns steps over hours
    is_anchor = order < len(ax)

    # the run's drift: the line above every stamp that is lowest at the middle of the run
    bx, by = _bin_max(x, y - 1e6 * x, BIN_MS)
    by = by + 1e6 * bx
    mid = float(bx.mean())
    slope = _run_slope(bx, by)
    r = y - slope * (x - mid)
    base = float(r.max())

    # the local envelope at knots: the lowest line within TILT of the drift above the stamps near it
    bx, br = _bin_max(x, r - base, BIN_MS)  # br <= 0
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

    # only tilt between stamps on both sides: beyond the last ones it would follow a late one down
    both = (valid & (dx > 0)).any(axis=1) & (valid & (dx < 0)).any(axis=1)
    limit = np.where(both, TILT, 0.0)
    tilt = _min_max(envelope, -limit, limit)
    local = envelope(tilt)
    host = y0 + base + slope * (knots - mid) + local + latency_ns
    fitted = Alignment(
        knots + x0, host, slope, len(ax), 0, int(ok.sum()), float(latency_ns), (0.0, 0.0), (0.0, 0.0, 0.0)
    )

    # what the data allow: in each second, how far the map lies above its tightest stamp
    gap = fitted.to_host(x + x0) - latency_ns - (y + y0)
    per = np.maximum(np.minimum.reduceat(gap, _segments(x, BOUND_WINDOW_MS)), 0.0) / 1e3
    delay = np.maximum(gap[is_anchor], 0.0) / 1e3
    late = int((delay > LATE_NS / 1e3).sum())
    bound = (float(np.percentile(per, 99)), float(per.max()))
    delays = (float(np.median(delay)), float(np.percentile(delay, 99)), float(delay.max()))
    return Alignment(
        fitted.dev_ms, host, slope, len(ax), late, int(ok.sum()), float(latency_ns), bound, delays
    )


#: above these, the end of a run and ``evtrace report`` warn in words
WARN_US = 5.0
WARN_CLAMPED = 0.005


def per_gpu(meta: dict[str, Any]) -> dict[str, DeviceAlignment]:
    """Each GPU's alignment figures, by device index (a string), from a session's typed metadata."""
    found = meta.get(ALIGNMENT)
    if not isinstance(found, dict):
        return {}
    return {str(d): a for d, a in found.items() if isinstance(a, DeviceAlignment)}


def alignment_warnings(meta: dict[str, Any]) -> list[str]:
    """What a user must know before trusting the device lanes, in words; empty when all is well."""
    out = []
    for d, g in sorted(per_gpu(meta).items()):
        if g.bound_us_p99 > WARN_US:
            out.append(
                f"GPU {d}: in some seconds every stamp was late, so the device lane there may sit up to "
                f"{g.bound_us_p99:.1f} µs off (bound_us_p99)"
            )
        if g.stamp_delay_us_p99 > WARN_US:
            out.append(
                f"GPU {d}: the GPU stamped events up to {g.stamp_delay_us_p99:.0f} µs late at times "
                "(stamp_delay_us_p99), as it does while other traffic such as "
                "host-device copies is in flight; device ends then may be that much late"
            )
    spans, clamped = int(meta.get("device_spans", 0) or 0), int(meta.get("clamped_device_spans", 0) or 0)
    if spans and clamped > WARN_CLAMPED * spans:
        out.append(
            f"{clamped} of {spans} device spans ({100 * clamped / spans:.1f}%) were placed before their "
            "launch and clamped: the alignment is off"
        )
    return out
