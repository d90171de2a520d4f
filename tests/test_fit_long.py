"""The fit of long runs (issue #23): the same map as the fit it replaced (``tests/fit_reference.py``),
in time linear in the run and memory that does not grow with it."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from evtrace import align

from .fit_reference import old_fit, synthetic


def same_map(new: align.Alignment, old: object) -> None:
    from .fit_reference import OldFit

    assert isinstance(old, OldFit)
    assert np.array_equal(new.dev_ms, old.dev_ms)
    assert np.abs(new.host_ns - old.host_ns).max() < 1.0  # ns
    assert new.slope == old.slope
    assert new.anchors_late == old.anchors_late
    assert new.slack_us == pytest.approx(old.slack_us, abs=1e-6)
    assert new.anchor_delay_us == pytest.approx(old.anchor_delay_us, abs=1e-6)


@pytest.mark.parametrize("blocks", ["default", "tiny"])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_few_minutes_give_the_old_map(blocks: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four minutes of stamps with drift, delays, queued marks and a late stretch: the same knots,
    host times within 1 ns, the same drift, bound and stamp delays, whether the stamps are read
    in blocks of 2^18 or of 997 (bins and windows then straddle blocks) and the knots 3 at a time."""
    if blocks == "tiny":
        monkeypatch.setattr(align, "STAMP_BLOCK", 997)
        monkeypatch.setattr(align, "CELLS", 3 * 801)
    d = synthetic(4 / 60, seed)
    args = (d["lo"], d["hi"], d["ms"], d["first"], d["stamps"])
    same_map(align.fit(*args), old_fit(*args))


def test_marks_out_of_order_or_missing_give_the_old_map() -> None:
    """Other callers may pass marks in any order, some without a device time (NaN)."""
    d = synthetic(2 / 60, 3)
    rng = np.random.default_rng(3)
    order = rng.permutation(len(d["stamps"]))
    ms, first = d["stamps"][order].copy(), d["first"][order]
    ms[rng.random(len(ms)) < 0.01] = np.nan
    args = (d["lo"], d["hi"], d["ms"], first, ms)
    same_map(align.fit(*args), old_fit(*args))


def test_a_long_run_fits_in_bounded_memory() -> None:
    """An hour of stamps (720k marks, 36k anchors): the old fit held every stamp, sorted and
    shifted, and a knots × window matrix (272 MB above its 12 MB of inputs); the blocks hold 55 MB."""
    d = synthetic(1.0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        align.fit(d["lo"], d["hi"], d["ms"], d["first"], d["stamps"])
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 100e6


def test_no_stamp_for_longer_than_the_window_keeps_the_map_finite() -> None:
    """Anchors 30 s apart, no marks: knots with no stamp within WINDOW_S had an envelope of -inf,
    and the map there was -inf; the map is now the line between the stamps around them."""
    host = 1e12 + np.arange(4) * 30e9
    ms = (host - host[0]) * (1 + 10e-6) / 1e6
    fit = align.fit(host - 2000, host, ms)
    probe = np.linspace(ms[0], ms[-1], 301)
    truth = np.interp(probe, ms, host)
    assert np.isfinite(fit.host_ns).all()
    assert np.abs(fit.to_host(probe) - truth).max() < 1.0  # ns
