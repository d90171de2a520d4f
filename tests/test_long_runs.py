"""Long, threaded, oddly shaped runs: device times stay exact and no region vanishes uncounted."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import evtrace
from evtrace import _core
from evtrace.recorder import Recorder, name_key
from evtrace.regions import Region

from .simdevice import SIDE, FakeClock, SimBackend


class TruthLog(SimBackend):
    """The simulated device, logging the true host time of each record on a work stream."""

    def __init__(self, clock: FakeClock, **kw: Any) -> None:
        super().__init__(clock, **kw)
        self.work: list[float] = []

    def record(self, ev: Any, stream: int) -> int:
        rc = super().record(ev, stream)
        if rc == 0 and stream != SIDE:
            self.work.append(float(ev.truth_host))
        return rc


@pytest.mark.parametrize("hours, per_s, more", [(3, 2, 0), (3, 2, 3), (8, 1, 0), (8, 1, 2)])
def test_steps_inside_one_region_for_hours_stay_exact(hours: int, per_s: int, more: int) -> None:
    """The most common use: one region around the whole loop. A start mark used to be stamped
    only when its region ended, as one float32 elapsed against an anchor hours later (~1 ms
    of resolution after 3 h). Rounded late, the outer region started 0.4 ms late; rounded early
    (a few steps more), that stamp pulled the map, and every step moved by up to 0.5 ms."""
    clk = FakeClock(step=500)
    sim = TruthLog(clk, drift_ppm=17.0)
    rec = Recorder(sim, clk, background=False)
    rec.start()
    outer = rec.enter(name_key("train"), None)
    clk.advance(1_000_000)
    truth = []
    for _ in range(hours * 3600 * per_s + more):
        n = len(sim.work)
        tok = rec.enter(name_key("step"), None)
        sim.launch(1_000_000)
        rec.exit(tok)
        assert len(sim.work) == n + 2  # a start and an end mark of its own
        truth.append(sim.work[n : n + 2])
        clk.advance(1_000_000_000 // per_s - 1_010_000)
        rec.poll()
    clk.advance(1_000_000)
    rec.exit(outer)
    truth.append([sim.work[0], sim.work[-1]])  # the outer region's own marks
    s = rec.stop()
    rows = np.r_[np.flatnonzero(s.regions["name"] == s.names.index("step")), 0]
    assert s.names[s.regions["name"][0]] == "train"
    r = s.regions[rows]
    got = np.stack([r["dev_start"], r["dev_end"]], 1).astype(float) + rec.origin_ns
    err = np.abs(got - np.array(truth))
    assert err[:-1].max() < 1000, f"worst step {err[:-1].max():.0f} ns"  # within 1 µs
    assert err[-1].max() < 1000, f"the outer region {err[-1]} ns off"


def test_a_region_split_over_two_devices_keeps_its_host_span_and_is_counted() -> None:
    """Begun on GPU 0, ended on GPU 1 (both default streams, handle 0): the start mark used to
    be read on the wrong device before it was done, and the region vanished."""
    clk = FakeClock()
    sim = SimBackend(clk, ndev=2)
    rec = Recorder(sim, clk, background=False)
    rec.start()
    tok = rec.enter(name_key("split"), {"i": 1})
    sim.launch(50_000_000)  # device 0 is busy: the start mark on device 1's queue would not be done
    sim.device = 1
    rec.exit(tok)
    for _ in range(3):
        tok = rec.enter(name_key("after"), None)
        sim.launch(1_000)
        rec.exit(tok)
        rec.poll()
    s = rec.stop()
    names = [s.names[k] for k in s.regions["name"]]
    assert names.count("split") == 1 and names.count("after") == 3
    split = s.regions[names.index("split")]
    assert split["device"] == -1 and split["host_end"] > split["host_start"]
    assert s.args[names.index("split")] == {"i": 1}
    assert s.meta["split_device_spans"] == 1
    assert s.meta["lost_device_spans"] == {"split_over_devices": 1}
    assert s.device_spans == 3


def test_two_threads_on_one_stream_sharing_an_older_mark_lose_nothing() -> None:
    """Thread A's end shares its older start mark (as nn.Sequential's forced sharing does) while
    thread B's newer end mark on the same stream waits behind a kernel. "The newest mark is
    done, so all older are" used to read B's unfinished end mark, and B's region vanished."""
    clk = FakeClock()
    sim = SimBackend(clk)
    rec = Recorder(sim, clk, background=False, share_ns=10_000_000)
    rec.start()
    b_entered, a_entered, b_exited = threading.Event(), threading.Event(), threading.Event()

    def thread_b() -> None:
        b = rec.enter(name_key("B"), None)  # mark b1
        b_entered.set()
        a_entered.wait()
        sim.launch(100_000_000)  # a 100 ms kernel
        clk.advance(6_000_000)  # B's window (10 ms from b1) is past: its end is a mark of its own
        rec.exit(b)  # mark b2, behind the kernel
        b_exited.set()

    t = threading.Thread(target=thread_b)
    t.start()
    b_entered.wait()
    clk.advance(6_000_000)
    a = rec.enter(name_key("A"), None)  # mark a1, after b1
    a_entered.set()
    b_exited.wait()
    t.join()
    rec.exit(a)  # within A's window: its end shares a1, queued after B's region
    rec.poll()  # a1 is done, b2 is not
    clk.advance(200_000_000)
    rec.poll()
    s = rec.stop()
    names = [s.names[k] for k in s.regions["name"]]
    assert sorted(names) == ["A", "B"]
    assert s.device_spans == 2
    b = s.regions[names.index("B")]
    assert b["dev_end"] - b["dev_start"] >= 100_000_000


def test_a_thread_leaving_a_region_it_entered_before_the_start_closes_nothing_of_others(
    tmp_path: Path,
) -> None:
    """A shared Region object: thread B entered it before the session started, thread A inside
    the session. B's exit used to close A's span (50 ms recorded as 0.1 ms)."""
    r = evtrace.region("shared")
    b_in, a_in, b_out = threading.Event(), threading.Event(), threading.Event()

    def thread_b() -> None:
        with r:
            b_in.set()
            a_in.wait()
        b_out.set()

    t = threading.Thread(target=thread_b)
    t.start()
    b_in.wait()
    with evtrace.record(tmp_path / "t.json", device=False, quiet=True) as rec:
        with r:
            a_in.set()
            b_out.wait()
            time.sleep(0.05)
    t.join()
    s = rec.session
    assert s is not None
    shared = s.regions[s.regions["name"] == s.names.index("shared")]
    assert len(shared) == 1
    assert shared["host_end"][0] - shared["host_start"][0] >= 50_000_000


def test_args_are_copied_on_entry_and_region_args_is_read_only(tmp_path: Path) -> None:
    r = evtrace.region("fixed", i=0)
    with pytest.raises(TypeError):
        r.args["i"] = 5  # type: ignore[index]
    given: dict[str, Any] = {"i": 0, "seen": [0]}
    mine = Region("given", given)
    path = tmp_path / "a.json"
    with evtrace.record(path, device=False, quiet=True):
        for i in range(3):
            given["i"] = i  # the caller's dict: the region took its own copy
            given["seen"].append(i)  # a list inside it: copied at each entry
            with mine:
                pass
            with r:
                pass
    s = evtrace.load(path)
    got = [s.args[j] for j in range(len(s)) if s.names[s.regions["name"][j]] == "given"]
    assert got == [{"i": 0, "seen": [0, 0]}, {"i": 0, "seen": [0, 0, 1]}, {"i": 0, "seen": [0, 0, 1, 2]}]
    fixed = [s.args[j] for j in range(len(s)) if s.names[s.regions["name"][j]] == "fixed"]
    assert fixed == [{"i": 0}] * 3


@pytest.mark.parametrize(
    "value",
    [
        1,
        -(2**63),
        2**64 - 1,
        1.5,
        1e300,
        -0.0,
        True,
        None,
        "plain",
        'quote " back \\ slash',
        "tab\tline\nbell\x07 nul\x00",
        "ünïcødé ✓ 🎉",
        "x" * 1000,
        "x" * 1001,
        "\ud800 lone",
        float("nan"),
        float("inf"),
        -float("inf"),
        [1, (2, 3)],
        {"a": {"b": 1}},
    ],
)
def test_every_arg_value_round_trips_through_the_encoding(value: Any, tmp_path: Path) -> None:
    """The core encodes plain values itself (JSON text); the rest go through values.encode.
    Both must give what values.snapshot promises, and the saved trace must load back."""
    from evtrace.values import snapshot
    from evtrace.values import value as converted

    path = tmp_path / "v.json"
    with evtrace.record(path, device=False, quiet=True) as rec:
        with evtrace.region("r", v=value):
            pass
    assert rec.session is not None
    got = rec.session.args[0]["v"]
    want = snapshot({"v": value})["v"] if not isinstance(value, (list, tuple, dict)) else converted(value)
    if isinstance(want, str) and "\ud800" in want:
        want = want.encode("utf-8", "backslashreplace").decode()
    assert got == want
    assert evtrace.load(path).args[0]["v"] == got


class FailingSim(SimBackend):
    """A device whose calls on the hot path fail as a CUDA error would: learning a new stream,
    creating events as the pool grows, or recording."""

    def __init__(self, clock: FakeClock, fail: str) -> None:
        super().__init__(clock)
        self.fail = fail

    def learn_stream(self, device: int, stream: int) -> None:
        if self.fail == "learn_stream" and stream == 7:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        super().learn_stream(device, stream)

    def new_event(self, device: int) -> Any:
        if (
            self.fail == "new_event"
            and self.created >= 4
            or self.fail == "new_event_midway"
            and self.created >= 6
        ):
            raise RuntimeError("CUDA error: out of memory")
        return super().new_event(device)

    def record(self, ev: Any, stream: int) -> int:
        if self.fail == "record" and stream == 7:
            raise RuntimeError("CUDA error: invalid resource handle")
        return super().record(ev, stream)


@pytest.mark.parametrize("fail", ["learn_stream", "new_event", "new_event_midway", "record"])
def test_a_device_failure_on_the_hot_path_never_reaches_user_code(
    fail: str, capfd: pytest.CaptureFixture[str]
) -> None:
    clk = FakeClock()
    sim = FailingSim(clk, fail)
    rec = Recorder(sim, clk, background=False, pool_size=4)
    rec.start()
    if fail.startswith("new_event"):
        sim.launch(10**10)  # nothing resolves: the pool must grow (midway: two made, then a failure)
    for i in range(10):
        sim.stream = 7 if i >= 5 else 0
        tok = rec.enter(name_key("r"), {"i": i})  # must not raise
        sim.launch(1000)
        rec.exit(tok)
        rec.poll()
    s = rec.stop()
    assert len(s) == 10  # every region, with its host span
    assert sorted(a["i"] for a in s.args.values()) == list(range(10))
    lost = s.meta["lost_device_spans"]
    assert lost.get("device_call_failed", 0) >= 1
    assert s.device_spans + sum(lost.values()) == 10
    err = capfd.readouterr().err
    assert err.count("evtrace: a device call failed while recording") == 1  # said once
    assert "CUDA error" in err


def test_a_keyboard_interrupt_on_the_hot_path_still_propagates() -> None:
    class Interrupted(SimBackend):
        def learn_stream(self, device: int, stream: int) -> None:
            raise KeyboardInterrupt

    clk = FakeClock()
    sim = Interrupted(clk)
    rec = Recorder(sim, clk, background=False)
    rec.start()
    sim.stream = 3
    with pytest.raises(KeyboardInterrupt):
        rec.enter(name_key("r"), None)
    rec.stop()


def test_the_core_refuses_a_clock_that_is_not_perf_counter() -> None:
    _core.check_clock(time.perf_counter_ns)
    with pytest.raises(ImportError, match="perf_counter_ns"):
        _core.check_clock(lambda: time.perf_counter_ns() + 10**9)


def test_every_region_is_in_the_trace_or_counted_with_its_reason() -> None:
    """A dry pool, refused records and a device error: regions keep host spans, and the spans
    lost are counted by reason."""
    clk = FakeClock()
    sim = SimBackend(clk)
    rec = Recorder(sim, clk, background=False, pool_size=8, max_events=8)
    rec.start()
    sim.refuse = True  # as CUDA refuses a record on a capturing stream
    for _ in range(5):
        tok = rec.enter(name_key("refused"), None)
        rec.exit(tok)
    sim.refuse = False
    sim.launch(10**10)  # 10 s of work: nothing resolves, the pool runs dry
    for _ in range(20):
        tok = rec.enter(name_key("dry"), None)
        sim.launch(1000)
        rec.exit(tok)
    s = rec.stop()
    assert len(s) == 25
    lost = s.meta["lost_device_spans"]
    assert lost["record_refused"] == 5
    assert lost["event_pool_exhausted"] >= 10
    assert s.device_spans + sum(lost.values()) == 25


def test_the_ring_drops_chunks_with_their_args_without_stalling_the_thread() -> None:
    """Dropping a chunk used to scan every kept region's args on the user's thread (~18 ms a drop
    with a 1M ring). Now each chunk holds its own args, dropped with it: the worst region costs
    what a drain of one chunk does. (The figure for a 1M ring is in BENCHMARKS.md; the bound here
    is loose enough for a busy 2-core CI machine, and the old code missed it by far.)"""
    ring = 200_000
    rec = Recorder(None, max_regions=ring)
    rec.start()
    cost = np.zeros(3 * ring, np.int64)
    clock = time.perf_counter_ns
    for i in range(len(cost)):
        t = clock()
        with evtrace.region("step", step=i):
            pass
        cost[i] = clock() - t
    s = rec.stop()
    assert s.meta["dropped_regions"] >= ring
    kept = [a["step"] for a in s.args.values()]
    assert kept == list(range(len(cost) - len(s), len(cost)))  # the newest, each with its own args
    worst = np.sort(cost[ring:])[-3:] / 1e6  # while the ring drops
    assert worst[0] < 5.0, f"the worst regions took {worst} ms"


def test_lost_device_spans_add_up_over_merged_ranks(tmp_path: Path) -> None:
    from evtrace.merge import merge
    from evtrace.session import Session

    def one(refused: int) -> Session:
        clk = FakeClock()
        sim = SimBackend(clk)
        rec = Recorder(sim, clk, background=False)
        rec.start()
        sim.refuse = True
        for _ in range(refused):
            tok = rec.enter(name_key("r"), None)
            sim.launch(10_000)
            rec.exit(tok)
        return rec.stop()

    both = merge([one(2), one(3)])
    assert both.meta["lost_device_spans"] == {"record_refused": 5}
    assert both.meta["dropped_device_spans"] == 5
    path = tmp_path / "both.json"
    both.save(path)
    assert evtrace.load(path).meta["lost_device_spans"] == {"record_refused": 5}
