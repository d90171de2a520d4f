"""Device→host mapping: the simulated device has a known offset and drift; alignment recovers them."""

from __future__ import annotations

import numpy as np
import pytest

import evtrace
from evtrace import clock
from evtrace.recorder import Recorder, name_key

from .simdevice import FakeClock, SimBackend


def anchors(n: int, drift_ppm: float, jitter_ns: float = 0.0, seed: int = 1):
    rng = np.random.default_rng(seed)
    host = 5e12 + np.arange(n) * 1e9  # one anchor a second
    dev_ms = (host - host[0]) * (1 + drift_ppm * 1e-6) / 1e6
    end = host + rng.normal(0, jitter_ns, n)  # the GPU stamps at the end of the host call
    return end - 2000, end, dev_ms, host


@pytest.mark.parametrize("drift", [-25.0, 0.0, 18.0, 25.0])
def test_fit_recovers_drift(drift: float) -> None:
    lo, hi, ms, host = anchors(60, drift)
    fit = clock.fit(lo, hi, ms)
    assert fit.drift_ppm == pytest.approx(drift, abs=0.01)
    probe = (ms[:-1] + ms[1:]) / 2  # halfway between anchors
    truth = (host[:-1] + host[1:]) / 2
    assert np.abs(fit.to_host(probe) - truth).max() < 1.0  # ns


def test_extrapolates_with_the_fitted_drift() -> None:
    lo, hi, ms, host = anchors(10, 20.0)
    fit = clock.fit(lo, hi, ms)
    later = ms[-1] + 5000.0  # 5 s after the last anchor
    assert fit.to_host(np.array([later]))[0] == pytest.approx(host[-1] + 5e9 / (1 + 20e-6), abs=2.0)


def test_one_anchor_drifts_two_anchors_do_not() -> None:
    """The reason for periodic anchors: a single anchor is ~400 µs off after 20 s at 20 ppm."""
    lo, hi, ms, host = anchors(21, 20.0)
    single = clock.fit(lo[:1], hi[:1], ms[:1])
    assert abs(single.to_host(ms[-1:])[0] - host[-1]) > 300_000
    both = clock.fit(lo[[0, -1]], hi[[0, -1]], ms[[0, -1]])
    assert abs(both.to_host(ms[-1:])[0] - host[-1]) < 1.0


def test_wide_brackets_are_rejected_and_residual_reported() -> None:
    lo, hi, ms, host = anchors(30, 20.0, jitter_ns=200)
    hi[7] += 500_000  # the host was preempted during this anchor
    lo[7] -= 0
    fit = clock.fit(lo, hi, ms)
    assert fit.rejected == 1 and fit.anchors == 29
    med, worst = fit.residual_us
    assert 0 < med < 0.5 and worst < 2.0


def test_no_anchor_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one anchor"):
        clock.fit(np.array([]), np.array([]), np.array([]))


def run_sim(seconds: int, drift_ppm: float, offset_ns: int = 987_654_321, anchor_s: float = 1.0):
    """A long simulated session: a region with a kernel every 100 ms, polled like the resolver."""
    clk = FakeClock(step=500)
    sim = SimBackend(clk, drift_ppm=drift_ppm, offset_ns=offset_ns)
    rec = Recorder(sim, clk, anchor_interval_s=anchor_s, background=False)
    rec.start()
    truth = []
    for i in range(seconds * 10):
        n0 = len(sim.stamps)
        tok = rec.enter(name_key("step"), None)
        sim.launch(2_000_000)
        rec.exit(tok)
        truth.append((sim.stamps[n0].truth_host, sim.stamps[-1].truth_host))
        clk.advance(100_000_000)
        rec.poll()
    s = rec.stop()
    got = np.stack([s.regions["dev_start"], s.regions["dev_end"]], 1).astype(float) + rec.origin_ns
    return s, got - np.array(truth), sim


def test_session_recovers_offset_and_drift_over_a_minute() -> None:
    s, err, sim = run_sim(60, drift_ppm=22.0)
    a = s.meta["alignment"]["0"]
    assert float(a["drift_ppm"]) == pytest.approx(22.0, abs=0.05)
    assert a["anchors"] >= 60
    assert np.abs(err).max() < 100
    assert sim.syncs == 1  # once, at stop


def test_long_anchor_gaps_are_still_exact_despite_float32() -> None:
    """elapsed_time is float32 ms: only ever taken against a nearby anchor, so no 61 µs steps."""
    s, err, _ = run_sim(120, drift_ppm=-18.0, anchor_s=1.0)
    assert np.abs(err).max() < 100


def test_device_spans_never_start_before_their_launch(tmp_path) -> None:
    """Stamps before the host call are impossible on hardware; as a model error they are
    clamped to just after the launch, counted and reported."""
    clk = FakeClock()
    sim = SimBackend(clk)
    sim.skew = -50_000
    with evtrace.record(tmp_path / "early.json", backend=sim, clock=clk, quiet=True) as r:
        for _ in range(3):
            with evtrace.region("early"):
                pass
    s = r.session
    assert s is not None
    assert s.meta["clamped_device_spans"] == 3
    assert (s.regions["dev_start"] > s.regions["host_start"]).all()
