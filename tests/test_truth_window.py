"""Issue 23's judging of device ends against the physically possible window, with no GPU: the
window itself, its statistics, the goals, the per-phase split of the alignment's figures, and the
report (``benchmarks/truth.py``, ``benchmarks/p4_load.py``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evtrace import align
from evtrace.recorder import Recorder, name_key

from .simdevice import FakeClock, SimBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import p4_load  # type: ignore[import-not-found]  # noqa: E402  # benchmarks/, put on sys.path above
import truth  # type: ignore[import-not-found]  # noqa: E402

US = 1000


def test_the_window_runs_from_the_flag_to_the_ack_plus_the_stream_moving_on() -> None:
    t_set = np.full(6, 10_000 * US)
    t_ack = t_set + 3 * US
    move_on = np.array([4, 4, 4, 4, 4, 15]) * US
    # just inside both ends; 0.5 us before; 2 us after; 11 us after (inside when move_on is 15)
    dev = t_set + np.array([-1, 3 + 4 + 1, -1.5, 3 + 4 + 3, 0, 3 + 11]) * US
    out = truth.outside_window(t_set, t_ack, move_on, dev.astype(np.int64))
    assert out.tolist() == [0, 0, -500, 2 * US, 0, 0]


def test_window_stats_give_the_share_inside_and_how_far_the_misses_lie() -> None:
    outside = np.r_[np.zeros(990, dtype=np.int64), [-2 * US] * 4, [5 * US] * 6]
    w = truth.window_stats(outside)
    assert (w["n"], w["share_inside"], w["n_early"], w["n_late"]) == (1000, 0.99, 4, 6)
    assert w["outside_us"]["p50"] == 5.0 and w["outside_us"]["max"] == 5.0
    empty = truth.window_stats(np.zeros(0, dtype=np.int64))
    assert empty["n"] == 0 and empty["share_inside"] is None


def fake_session(dev_end: np.ndarray, device: np.ndarray | None = None):
    """What ``analyse`` reads of a Session: truth rows in the order they began, the origin."""
    rows = np.zeros(len(dev_end), dtype=[("name", "i4"), ("device", "i4"), ("dev_end", "i8")])
    rows["dev_end"] = dev_end
    rows["device"] = 0 if device is None else device

    class S:
        regions = rows
        names = ["truth"]
        meta = {"origin_perf_ns": 0}

    return S()


def samples(n: int, seed: int = 0):
    """``n`` samples of two phases in turn: round trips of 3 us (a tenth 20 us, not judged),
    the stream moving on 4 us after the kernel's end; device ends 2 us after the flag."""
    rng = np.random.default_rng(seed)
    tags = np.arange(n) % 2
    sets = 10**12 + np.cumsum(rng.integers(100, 1000, n)) * US
    rtt = np.where((np.arange(n) // 2) % 10 == 9, 20 * US, 3 * US)
    gts = np.zeros((n, 3), dtype=np.int64)
    gts[:, 1] = 5 * 10**17 + sets  # the GPU's own clock: any offset
    gts[:, 0] = gts[:, 1] - 1 * US  # the flag seen
    gts[:, 2] = gts[:, 1] + 4 * US
    return tags, sets, sets + rtt, gts, sets + 2 * US


def test_analyse_judges_each_phase_against_the_window() -> None:
    tags, sets, acks, gts, dev = samples(4000)
    late = (tags == 1) & (np.arange(4000) % 50 == 1)  # 40 of phase b's 2000: 12 us late
    dev = np.where(late, acks + 4 * US + 13 * US, dev)
    res = truth.analyse(fake_session(dev), ("idle", "b"), tags, sets, acks, gts)
    a, b = res["phases"]["idle"]["window"], res["phases"]["b"]["window"]
    assert (a["n"], a["share_inside"]) == (1800, 1.0)  # a tenth of the round trips are 20 us
    n_late = int((late & (acks - sets <= truth.RTT_OK_NS)).sum())
    assert (b["n"], b["n_late"], b["n_early"]) == (1800, n_late, 0)
    assert b["share_inside"] == round(1 - n_late / 1800, 6) and b["outside_us"]["p50"] == 12.0
    assert a["move_on_us"]["p50"] == 4.0
    assert truth.goals(res) == [f"b: {b['share_inside']:.2%} of device ends inside the window, under 99%"]


def test_samples_without_the_gpu_clock_are_not_judged() -> None:
    tags, sets, acks, gts, dev = samples(400)
    gts[::4] = 0  # the stamps never came
    res = truth.analyse(fake_session(dev), ("idle", "b"), tags, sets, acks, gts)
    w = res["phases"]["idle"]["window"]
    assert w["n"] == 80 and w["n_no_gpu_clock"] == 100 and w["share_inside"] == 1.0
    no_gts = truth.analyse(fake_session(dev), ("idle", "b"), tags, sets, acks, None)
    assert no_gts["phases"]["idle"]["window"]["n"] == 0


def good_result() -> dict[str, Any]:
    w = {"n": 5000, "share_inside": 0.999, "n_early": 0, "n_late": 5, "outside_us": {}, "move_on_us": {}}
    return {
        "phases": {ph: {"window": dict(w), "abs_err_minus_L_us": {"p95": 0.7}} for ph in ("idle", "copies")},
        "meta": {},
    }


def test_goals_name_each_one_missed() -> None:
    assert truth.goals(good_result()) == []
    r = good_result()
    r["phases"]["copies"]["window"]["share_inside"] = 0.98
    r["phases"]["idle"]["window"]["n"] = 50
    r["phases"]["idle"]["abs_err_minus_L_us"]["p95"] = 1.2
    assert truth.goals(r) == [
        "idle: 50 samples judged against the window, fewer than 100",
        "copies: 98.00% of device ends inside the window, under 99%",
        "idle: |err - L| p95 1.2 us, over 1.0 us",
    ]


def test_the_report_prints_the_share_per_phase_and_the_verdict() -> None:
    r = good_result()
    r["phases"]["copies"]["alignment"] = {"0": {"stamp_delay_us_p50": 9.5, "stamp_delay_us_p99": 22.0}}
    r["meta"]["alignment"] = {"0": {"stamp_delay_us_p99": 20.4, "slack_us_p99": 1.7, "anchors": 10}}
    text = "\n".join(p4_load.window_table(r))
    assert "99.900%" in text and "22.00" in text and "stamp_delay_us p50 - p99 20.40" in text
    lines, missed = p4_load.verdict([r])
    assert missed == [] and lines[-1] == "GOALS MET"
    r["phases"]["copies"]["window"]["share_inside"] = 0.5
    lines, missed = p4_load.verdict([r])
    assert lines[-1].startswith("GOALS MISSED: run 1, copies: 50.00%")


def test_phase_of_places_host_times_in_turns() -> None:
    turns = np.array([[0, 100, 200], [1, 200, 300], [0, 305, 400]])
    got = truth.phase_of(turns, np.array([50, 100, 199, 200, 302, 399, 400]))
    assert got.tolist() == [-1, 0, 0, 1, -1, 0, -1]


def anchors_with_late_stretches(n: int = 120, late_us: float = 12.0):
    """One anchor every 100 ms; in every other second the GPU stamps them ``late_us`` late."""
    host = 5e12 + np.arange(n) * 1e8
    ms = (host - host[0]) * (1 + 10e-6) / 1e6
    late = (np.arange(n) // 10) % 2 == 1
    ms = ms + np.where(late, late_us * 1e3, 0.0) * (1 + 10e-6) / 1e6
    return host - 2000, host, ms, late


def test_the_alignment_split_by_phase_is_the_metadata_figure_for_one_phase() -> None:
    lo, hi, ms, late = anchors_with_late_stretches()
    with truth.captured_fits() as caps:
        f = align.fit(lo, hi, ms)  # what build.session calls, one per GPU
    assert align.fit is not caps and len(caps) == 1 and caps[0]["fit"] is f
    whole = np.array([[0, int(lo[0]), int(hi[-1]) + 1]])
    (one,) = truth.alignment_by_phase(caps[0], whole, 1)
    assert one["anchors"] == len(lo)
    assert one["stamp_delay_us_p50"] == pytest.approx(f.anchor_delay_us[0], abs=1e-3)
    assert one["stamp_delay_us_p99"] == pytest.approx(f.anchor_delay_us[1], abs=1e-3)
    assert one["slack_us_p99"] == pytest.approx(f.slack_us[0], abs=1e-3)
    # seconds of late stamps as phase 1, the prompt ones as phase 0
    sec = 10**9
    turns = np.array(
        [[k % 2, int(lo[0]) - 1000 + k * sec, int(lo[0]) - 1000 + (k + 1) * sec] for k in range(12)]
    )
    prompt, slow = truth.alignment_by_phase(caps[0], turns, 2)
    assert prompt["anchors"] == slow["anchors"] == 60
    assert prompt["stamp_delay_us_p99"] < 0.1 and slow["stamp_delay_us_p50"] == pytest.approx(12.0, abs=0.1)


def test_captured_fits_see_the_sessions_own_fit() -> None:
    """Through a real recorder (simulated device, stamping 15 us late in every third second): the
    split, over one phase, gives back the session's metadata, so the per-phase figures are the
    ones the trace reports; split by seconds, the late ones stand out."""
    clk = FakeClock(step=500)
    sim = SimBackend(clk, drift_ppm=7.0)
    t0 = clk.now
    sim.late = lambda stream, now: 15_000.0 if (now - t0) // 10**9 % 3 == 2 else 0.0
    rec = Recorder(sim, clk, anchor_interval_s=0.1, background=False)
    with truth.captured_fits() as caps:
        rec.start()
        for _ in range(600):
            tok = rec.enter(name_key("step"), None)
            sim.launch(200_000)
            rec.exit(tok)
            clk.advance(10_000_000)
            rec.poll()
        t1 = clk.now
        s = rec.stop()
    assert len(caps) == 1
    meta = s.meta["alignment"]["0"]
    (one,) = truth.alignment_by_phase(caps[0], np.array([[0, 0, 2**62]]), 1)
    assert one["anchors"] == meta.anchors
    for k in ("stamp_delay_us_p50", "stamp_delay_us_p99", "slack_us_p99"):
        assert one[k] == pytest.approx(meta[k], abs=2e-3), k
    assert meta.stamp_delay_us_p99 > 10
    sec = 10**9
    turns = np.array(
        [[int(k % 3 == 2), t0 + k * sec, t0 + (k + 1) * sec] for k in range((t1 - t0) // sec + 1)]
    )
    prompt, slow = truth.alignment_by_phase(caps[0], turns, 2)
    assert prompt["anchors"] + slow["anchors"] == meta.anchors
    assert prompt["stamp_delay_us_p99"] < 1 and slow["stamp_delay_us_p50"] == pytest.approx(15.0, abs=1.0)
