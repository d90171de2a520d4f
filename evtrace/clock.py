"""Device time onto the host clock: anchors in, a drift-corrected mapping out. Pure numpy.

An anchor is an event recorded on an idle side stream, bracketed by host stamps ``lo``/``hi``.
Its device time ``dev_ms`` comes from chaining ``elapsed_time`` between neighbouring anchors
(each step short, so float32 milliseconds stay sub-µs). Its host time is the end of the
bracket: the record is only submitted at the end of the call, and the GPU stamps it after
that. (Against CUPTI on an H100, the bracket midpoint put device times 2.0-2.3 µs early.)
Of a burst of tries the tightest bracket is kept; anchors with wide brackets (the host was
preempted) are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

Clock = Callable[[], int]  # host clock in integer ns (time.perf_counter_ns by default)

#: anchors whose bracket is wider than this multiple of the median bracket are not used
WIDE_BRACKET = 3.0
#: neighbours on each side used to smooth an anchor (local linear fit)
WINDOW = 3


@dataclass(frozen=True)
class Alignment:
    """A piecewise-linear map from device ms (since the device origin) to host ns."""

    dev_ms: np.ndarray  # float64, increasing
    host_ns: np.ndarray  # float64, smoothed anchor host times
    slope: float  # host ns per device ms, global fit (1e6 when the clocks agree)
    anchors: int  # anchors used
    rejected: int  # anchors dropped for a wide bracket
    residual_us: tuple[float, float]  # held-out anchors: median |error|, max |error|

    @property
    def drift_ppm(self) -> float:
        """How much faster the device clock runs than the host clock, in ppm."""
        return (1e6 / self.slope - 1.0) * 1e6

    def to_host(self, dev_ms: np.ndarray) -> np.ndarray:
        """Host ns (float64) for device ms; linear beyond the first and last anchor."""
        x = np.asarray(dev_ms, dtype=np.float64)
        out = np.interp(x, self.dev_ms, self.host_ns)
        lo, hi = x < self.dev_ms[0], x > self.dev_ms[-1]
        out[lo] = self.host_ns[0] + (x[lo] - self.dev_ms[0]) * self.slope
        out[hi] = self.host_ns[-1] + (x[hi] - self.dev_ms[-1]) * self.slope
        return out


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares y = a + b x, centred for precision; slope 1e6 (ns per ms) if degenerate."""
    if len(x) < 2 or np.ptp(x) <= 0:
        return float(np.mean(y) - 1e6 * np.mean(x)), 1e6
    xm, ym = x.mean(), y.mean()
    b = float(np.dot(x - xm, y - ym) / np.dot(x - xm, x - xm))
    return float(ym - b * xm), b


def fit(lo_ns: np.ndarray, hi_ns: np.ndarray, dev_ms: np.ndarray) -> Alignment:
    """Fit the device→host map from anchor brackets ``[lo, hi]`` and their device times."""
    lo = np.asarray(lo_ns, dtype=np.float64)
    hi = np.asarray(hi_ns, dtype=np.float64)
    x = np.asarray(dev_ms, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("alignment needs at least one anchor")
    width = hi - lo
    keep = width <= WIDE_BRACKET * max(float(np.median(width)), 1.0)
    order = np.argsort(x[keep], kind="stable")
    x, y = x[keep][order], hi[keep][order]
    _, slope = _line(x, y)
    n = len(x)
    smooth = np.empty(n)
    held = []
    for k in range(n):
        i, j = max(0, k - WINDOW), min(n, k + WINDOW + 1)
        a, b = _line(x[i:j], y[i:j]) if j - i >= 2 else (y[k] - slope * x[k], slope)
        smooth[k] = a + b * x[k]
        if 0 < k < n - 1:  # predict anchor k from its neighbours alone
            nx, ny = np.r_[x[i:k], x[k + 1 : j]], np.r_[y[i:k], y[k + 1 : j]]
            a, b = _line(nx, ny)
            held.append(abs(a + b * x[k] - y[k]) / 1e3)
    residual = (float(np.median(held)), float(np.max(held))) if held else (0.0, 0.0)
    return Alignment(x, smooth, slope, n, int((~keep).sum()), residual)
