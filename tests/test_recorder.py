"""The recorder through the device seam: lazy resolution, pooling, threads, no sync."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import evtrace
from evtrace import recorder
from evtrace.recorder import Recorder, name_key

from .simdevice import SIDE, FakeClock, SimBackend


def started(clk: FakeClock | None = None, **kw: Any) -> tuple[FakeClock, SimBackend, Recorder]:
    """A recorder on a simulated device, started, resolving only when polled."""
    clk = clk or FakeClock()
    sim = SimBackend(clk)
    rec = Recorder(sim, clk, background=False, **kw)
    rec.start()
    return clk, sim, rec


def region_around_kernel(rec: Recorder, sim: SimBackend, ns: float, name: str = "r") -> None:
    tok = rec.enter(name_key(name), None)
    sim.launch(ns)
    rec.exit(tok)


def test_no_synchronize_on_the_region_path() -> None:
    _, sim, rec = started()
    for _ in range(1000):
        region_around_kernel(rec, sim, 10_000)
        if _ % 100 == 0:
            rec.poll()
    assert sim.syncs == 0
    rec.stop()
    assert sim.syncs == 1


def test_events_are_recycled_not_created_per_region() -> None:
    clk, sim, rec = started(pool_size=64)
    for i in range(10_000):
        tok = rec.enter(name_key("r"), None)
        rec.exit(tok)
        if i % 10 == 0:
            clk.advance(1_000_000)
            rec.poll()
    s = rec.stop()
    assert sim.created == 64  # the pre-created pool was enough
    assert s.device_spans == 10_000


def test_a_dry_pool_drops_device_spans_counts_them_and_never_syncs(tmp_path: Path) -> None:
    _, sim, rec = started(pool_size=16, max_events=32)
    sim.launch(10**12)  # the device is 1000 s behind: nothing resolves
    for _ in range(100):
        tok = rec.enter(name_key("r"), None)
        sim.launch(1000)
        rec.exit(tok)
        rec.poll()
    assert sim.syncs == 0
    s = rec.stop()
    assert len(s) == 100
    assert s.meta["dropped_device_spans"] > 0
    assert s.device_spans + s.meta["dropped_device_spans"] >= 100 - 16
    assert s.device_spans < 100
    s.save(tmp_path / "dry.json")


def test_anchors_go_on_the_idle_side_stream_and_are_periodic() -> None:
    clk = FakeClock()
    sim = SimBackend(clk)
    sim.launch(50_000_000)  # the main stream is busy for 50 ms
    rec = Recorder(sim, clk, anchor_interval_s=0.01, background=False)
    rec.start()
    for _ in range(10):
        clk.advance(5_000_000)
        rec.poll()
    s = rec.stop()
    assert s.meta["alignment"]["0"]["anchors"] >= 5
    # the side stream ignores the busy main stream: anchors resolve at once
    assert sim.busy.get((0, SIDE)) is None


def test_background_resolver_with_real_threads(tmp_path: Path) -> None:
    """8 host threads × 4 streams, a real resolver thread: every span on its own lane."""
    clk = FakeClock(step=100)
    clk.owner = None  # every thread's reads advance time
    sim = SimBackend(clk)
    lock = threading.Lock()

    def work(k: int) -> None:
        for i in range(200):
            with lock:  # the sim is not thread-safe; the recorder must be
                sim.stream = (k + i) % 4
                tok = rec.enter(name_key(f"t{k}"), None)
                sim.launch(1000)
                rec.exit(tok)

    rec = Recorder(sim, clk, poll_s=0.001)
    rec.start()
    ts = [threading.Thread(target=work, args=(k,), name=f"worker-{k}") for k in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    s = rec.stop()
    assert len(s) == 1600 and s.device_spans == 1600
    names = {t.name for t in s.threads}
    assert names == {f"worker-{k}" for k in range(8)}
    for k in range(8):
        rows = s.regions[s.regions["name"] == s.names.index(f"t{k}")]
        assert len(set(rows["thread"].tolist())) == 1  # one host lane per thread
        assert s.threads[rows["thread"][0]].name == f"worker-{k}"
    assert len(s.streams) == 4
    s.save(tmp_path / "threads.json.gz")


def test_no_cuda_records_host_lanes_only(tmp_path: Path, capsys) -> None:
    with evtrace.record(tmp_path / "host.json", device=False) as r:
        with evtrace.region("a"):
            with evtrace.region("b"):
                pass
    s = r.session
    assert s is not None and len(s) == 2 and s.device_spans == 0 and s.devices == []
    assert np.all(s.regions["device"] == -1)


def test_host_only_regions_get_no_device_span(tmp_path: Path) -> None:
    clk = FakeClock()
    sim = SimBackend(clk)
    with evtrace.record(tmp_path / "mixed.json", backend=sim, clock=clk, quiet=True) as r:
        with evtrace.region("gpu"):
            sim.launch(10_000)
        with evtrace.region("cpu", host_only=True):
            clk.advance(5000)
    s = r.session
    assert s is not None and len(s) == 2 and s.device_spans == 1
    assert s.regions["device"][s.names.index("cpu")] == -1


def test_adjacent_boundaries_share_one_event_and_stay_exact(tmp_path: Path) -> None:
    """Siblings back to back share the boundary event; a launch in between prevents it."""
    _, sim, rec = started(FakeClock(step=200))
    n0 = sim.records
    tok_p = rec.enter(name_key("parent"), None)
    for _ in range(10):
        tok = rec.enter(name_key("leaf"), None)
        sim.launch(30_000)
        rec.exit(tok)
    rec.exit(tok_p)
    shared_records = sim.records - n0
    tok = rec.enter(name_key("after"), None)
    rec.exit(tok)
    sim.launch(50_000)  # a kernel between two regions: no sharing across it
    tok = rec.enter(name_key("gap"), None)
    sim.launch(10_000)
    rec.exit(tok)
    s = rec.stop()
    # parent enter (the first leaf enters on it), 10 leaf exits; each later leaf and the parent's
    # exit share
    assert shared_records == 11
    r = s.regions
    leaf = r[r["name"] == s.names.index("leaf")]
    assert (np.diff(leaf["dev_start"]) > 0).all()
    assert (leaf["dev_start"][1:] == leaf["dev_end"][:-1]).all()  # one shared boundary
    # back to back on a busy stream each leaf is its kernel; the first also holds its launch
    assert np.allclose((leaf["dev_end"] - leaf["dev_start"])[1:], 30_000, atol=100)
    assert leaf["dev_end"][0] - leaf["dev_start"][0] == pytest.approx(35_000, abs=1000)
    parent = r[r["name"] == s.names.index("parent")][0]
    assert parent["dev_start"] <= leaf["dev_start"][0] and parent["dev_end"] == leaf["dev_end"][-1]
    gap = r[r["name"] == s.names.index("gap")][0]
    assert gap["dev_end"] - gap["dev_start"] == pytest.approx(
        10_000, abs=100
    )  # the 50 µs kernel is not in it


def test_refused_records_are_counted_and_cleared(tmp_path: Path) -> None:
    """A device that refuses event records (e.g. a stream under graph capture) costs device
    spans, never a crash, and every refusal's error is cleared for the program."""
    clk = FakeClock()
    sim = SimBackend(clk)
    with evtrace.record(tmp_path / "refused.json", backend=sim, clock=clk, quiet=True) as r:
        with evtrace.region("fine"):
            sim.launch(1000)
        sim.refuse = True
        for _ in range(3):
            with evtrace.region("captured"):
                sim.launch(1000)
        sim.refuse = False
    s = r.session
    assert s is not None and len(s) == 4 and s.device_spans == 1
    assert s.meta["dropped_device_spans"] == 3
    assert len(sim.failures) >= 3


def test_graph_capture_gets_host_spans_and_no_cuda_call(tmp_path: Path, capsys) -> None:
    """While a graph is captured nothing is recorded and the resolver makes no CUDA call (in
    torch's global capture mode either would break the capture); said once."""
    clk, sim, rec = started()
    assert sim.capture is not None
    began, ended = sim.capture
    tok = rec.enter(name_key("before"), None)
    sim.launch(1000)
    rec.exit(tok)
    began()
    records, queries = sim.records, sim.queries
    for _ in range(3):
        tok = rec.enter(name_key("captured"), None)
        sim.launch(1000)
        rec.exit(tok)
        clk.advance(2_000_000_000)  # long enough for an anchor to be due
        rec.poll()
    assert (sim.records, sim.queries) == (records, queries)
    ended()
    tok = rec.enter(name_key("after"), None)
    sim.launch(1000)
    rec.exit(tok)
    s = rec.stop()
    assert sim.capture is None  # the patch is undone
    assert s.meta["marks_skipped_in_graph_capture"] >= 3
    cap = s.regions[s.regions["name"] == s.names.index("captured")]
    assert len(cap) == 3 and (cap["device"] == -1).all()
    assert s.device_spans == 2
    assert capsys.readouterr().err.count("CUDA graph capture") == 1
    s.save(tmp_path / "graph.json")


def test_a_launch_as_fast_as_a_record_is_never_shared_across() -> None:
    """The share window is one record's host time: a kernel launched faster than the old fixed
    window still gets its own boundary, so a region's span never collapses onto its start."""
    clk, sim, rec = started()
    assert 0 < rec.share_ns <= sim.record_ns + clk.step  # measured by the first anchor's tries
    for _ in range(20):
        tok = rec.enter(name_key("k"), None)
        sim.launch(500_000, host_ns=sim.record_ns)  # a kernel launched in one record's time
        rec.exit(tok)
        clk.advance(600_000)
    s = rec.stop()
    dur = s.regions["dev_end"] - s.regions["dev_start"]
    assert np.allclose(dur, 500_000, atol=3000)


def test_a_long_run_of_short_polls_packs_regions_into_few_chunks() -> None:
    """The resolver polls every 10 ms; storage must not become one small array per poll (a
    two-hour run would hold hundreds of thousands of them)."""
    clk, sim, rec = started()
    for i in range(40_000):
        region_around_kernel(rec, sim, 1000)
        h = rec.enter_host(name_key("h"), None)
        rec.exit_host(h)
        if i % 10 == 0:
            clk.advance(1_000_000)
            rec.poll()
    assert len(rec._chunks) <= 80_000 // 16384
    s = rec.stop()
    assert len(s) == 80_000 and s.device_spans == 40_000


def test_two_threads_starting_sessions_at_once_get_one_session() -> None:
    clk = FakeClock()
    clk.owner = None  # both threads read it
    recs = [Recorder(SimBackend(clk), clk, background=False) for _ in range(2)]
    errors: list[BaseException] = []
    go = threading.Barrier(2)

    def start(r: Recorder) -> None:
        go.wait()
        try:
            r.start()
        except RuntimeError as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(r,)) for r in recs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and "already recording" in str(errors[0])
    for r in recs:
        if recorder.current is r:
            r.stop()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_while_the_resolver_holds_its_lock_leaves_the_child_usable() -> None:
    """A lock held by another thread at fork() would stay held in the child for ever: with the
    resolver mid-pass at the fork, the child still records a session of its own, and the parent
    its own to the end."""
    clk = FakeClock()
    clk.owner = None  # the resolver thread reads it too
    sim = SimBackend(clk)
    armed, held, release = threading.Event(), threading.Event(), threading.Event()
    query = sim.query

    def slow_query(ev: Any) -> bool:  # the resolver's pass holds the core's device-call lock here
        if armed.is_set() and threading.current_thread().name == "evtrace-resolver":
            held.set()
            release.wait(5)
        return query(ev)

    sim.query = slow_query  # type: ignore[method-assign]
    rec = Recorder(sim, clk, poll_s=0.001)
    rec.start()
    armed.set()
    region_around_kernel(rec, sim, 1000)
    assert held.wait(5)
    threading.Timer(0.2, release.set).start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork in a threaded process
        pid = os.fork()
    if pid == 0:  # child: no session of its parent's, the locks free, a session of its own works
        ok = recorder.current is None and recorder._names_lock.acquire(timeout=2)
        recorder._names_lock.release()
        done = threading.Event()

        def child_session() -> None:
            c = FakeClock()
            r = Recorder(SimBackend(c), c, background=False)
            r.start()
            region_around_kernel(r, r.backend, 1000)  # type: ignore[arg-type]
            done.set() if r.stop().device_spans == 1 else None

        th = threading.Thread(target=child_session, daemon=True)
        th.start()
        th.join(5)
        os._exit(0 if ok and done.is_set() else 1)
    s = rec.stop()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert s.device_spans == 1


@pytest.mark.parametrize("device", [False, True])
def test_a_finished_session_is_freed(device: bool) -> None:
    """The core holds its recorder's callbacks and the recorder holds the core: the collector must
    see that cycle, or every session would keep its regions for the life of the process."""
    import gc
    import weakref

    clk = FakeClock()
    rec = Recorder(SimBackend(clk) if device else None, clk, background=False)
    rec.start()
    for i in range(100):
        with evtrace.region("x", i=i):
            pass
    assert len(rec.stop().regions) == 100
    ref = weakref.ref(rec)
    del rec
    gc.collect()
    assert ref() is None
