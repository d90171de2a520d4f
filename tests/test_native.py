"""The native path on a CPU machine: the core's own CUDA calls and its GIL-free resolver thread.

With a CUDA runtime it can load (``Backend.native_runtime()``), the core records, queries and
times events itself and resolves on a pthread of its own, without the GIL. Without a GPU that
path runs against ``tests/fakecudart.c``: a tiny shared library with CUDA's signatures, built
here once per module, whose events are stamped on CLOCK_MONOTONIC (``perf_counter_ns``'s clock),
so that the aligned device spans can be checked against the host spans around them. The Python
side of ``CudaBackend`` (event creation and destruction) and the core use the same library.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import evtrace
from evtrace import device as dev
from evtrace import recorder as _rec
from evtrace.recorder import Recorder

from .test_cuda_backend import FakeStream, fake_torch

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="the fake CUDA runtime is a Linux shared library"
)

SOURCE = Path(__file__).with_name("fakecudart.c")
#: how far an aligned device stamp may sit from where the host clock says it was made: the fake
#: stamps on the host's own clock, so what is left is the alignment's error (well under 1 µs
#: here) with room for a loaded machine
TOL_NS = 20_000


class FakeRuntime:
    """The compiled fake and its controls (see tests/fakecudart.c)."""

    COUNTERS = (
        "created",
        "destroyed",
        "records",
        "refused",
        "queries",
        "not_ready",
        "elapsed_calls",
        "foreign_queries",
        "foreign_elapsed",
        "foreign_records",
        "in_query",
        "streams",
    )

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lib = ctypes.PyDLL(str(path))  # keeps the GIL: a counter read never lets a thread in
        for name in self.COUNTERS:
            getattr(self.lib, f"fake_{name}").restype = ctypes.c_longlong
        self.lib.fake_set_latency_ns.argtypes = [ctypes.c_longlong]
        self.lib.fake_set_query_delay_ns.argtypes = [ctypes.c_longlong]
        self.lib.fake_refuse_stream.argtypes = [ctypes.c_void_p]
        self.lib.fake_peek_error.restype = ctypes.c_int
        self.lib.fake_fail_queries.argtypes = [ctypes.c_int]

    def count(self, name: str) -> int:
        """A counter: calls made so far (``foreign_*``: by a thread other than the test's)."""
        return int(getattr(self.lib, f"fake_{name}")())

    def reset(self) -> None:
        self.lib.fake_reset()

    def latency(self, ns: int) -> None:
        self.lib.fake_set_latency_ns(ns)

    def query_delay(self, ns: int) -> None:
        self.lib.fake_set_query_delay_ns(ns)

    def refuse(self, stream: int) -> None:
        assert self.lib.fake_refuse_stream(stream) == 1

    def fail_queries(self, code: int) -> None:
        self.lib.fake_fail_queries(code)

    def peek_error(self) -> int:
        return int(self.lib.fake_peek_error())

    def synchronize(self) -> None:
        self.lib.fake_synchronize()


@dataclass
class Native:
    fake: FakeRuntime
    torch: Any
    backend: dev.CudaBackend


@pytest.fixture(scope="module")
def fake_runtime(tmp_path_factory: pytest.TempPathFactory) -> FakeRuntime:
    cc = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        pytest.skip("no C compiler (cc, gcc or clang) to build the fake CUDA runtime")
    out = tmp_path_factory.mktemp("fakecudart") / "libfakecudart.so"
    built = subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(SOURCE)], capture_output=True, text=True
    )
    assert built.returncode == 0, f"building the fake CUDA runtime failed:\n{built.stderr}"
    return FakeRuntime(out)


@pytest.fixture
def native(fake_runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch) -> Native:
    """A CudaBackend on a stand-in torch whose CUDA runtime is the fake, loaded by path."""
    fake = fake_runtime
    fake.reset()  # this (the test's) thread is then the one whose calls are not "foreign"
    torch = fake_torch([0.0])
    torch.cuda.synchronize = lambda device=None: fake.synchronize()
    monkeypatch.setitem(sys.modules, "torch", torch)
    path = str(fake.path)
    monkeypatch.setattr(
        dev._Cudart, "load", classmethod(lambda cls, v: dev._Cudart(ctypes.PyDLL(path), path))
    )
    backend = dev.CudaBackend()
    assert backend.native_runtime() == path
    return Native(fake, torch, backend)


def recording_natively() -> bool:
    rec = _rec.current
    return rec is not None and rec.native


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``cond`` (sleeping, so without the GIL) until it holds; False on timeout."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def busy(ns: int) -> None:
    """Spin for ``ns``: longer than any share window, so that the next boundary makes its own record."""
    end = time.perf_counter_ns() + ns
    while time.perf_counter_ns() < end:
        pass


def test_a_runtime_found_by_path_makes_the_session_native(native: Native) -> None:
    assert Recorder(native.backend).native is True
    # a clock of the session's own: the core cannot read it without the GIL, so Python resolves
    assert Recorder(native.backend, clock=lambda: time.perf_counter_ns()).native is False


def test_the_anchors_stream_is_made_through_the_runtime_and_destroyed(native: Native, tmp_path: Path) -> None:
    before = native.fake.count("streams")
    backend = dev.CudaBackend()
    assert native.fake.count("streams") == before + 1  # made by the runtime: torch never hands it out
    with evtrace.record(tmp_path / "s.json", backend=backend, quiet=True) as r:
        with evtrace.region("a"):
            busy(50_000)
    assert r.session is not None and r.session.device_spans == 1
    assert native.fake.count("streams") == before


STEPS = 600
#: the regions of one step, in the order they begin
STEP = ["step", "forward", "layer", "layer", "log", "optimizer", "zero_grad", "apply"]
DEVICE_COLS = [0, 1, 2, 3, 5, 7]
HOST_COLS = [4, 6]


def test_thousands_of_nested_regions_all_get_their_device_spans(native: Native, tmp_path: Path) -> None:
    """Nested regions, some with args, some host-only, through ``with`` and a decorator: every
    device region gets a device span where the fake stamped it, the device lane nests as the
    host lane does, the args are kept, and the trace loads back equal. The resolver thread made
    the queries."""
    fake = native.fake

    @evtrace.region("apply", lr=0.5)
    def apply() -> None:
        pass

    path = tmp_path / "native.json"
    with evtrace.record(path, backend=native.backend, quiet=True) as r:
        assert recording_natively()
        for step in range(STEPS):
            if step == STEPS // 2:  # the resolver thread resolves while the session goes on
                assert wait_for(lambda: fake.count("foreign_elapsed") > 0), "the resolver never ran"
            with evtrace.region("step", step=step):
                with evtrace.region("forward"):
                    with evtrace.region("layer"):
                        pass
                    with evtrace.region("layer", layer=1):
                        pass
                with evtrace.region("log", host_only=True, step=step, note="x"):
                    pass
                with evtrace.region("optimizer"):
                    with evtrace.region("zero_grad", host_only=True):
                        pass
                    apply()
    s = r.session
    assert s is not None

    assert fake.count("foreign_queries") > 0 and fake.count("foreign_elapsed") > 0
    assert fake.count("refused") == 0
    assert fake.count("destroyed") == fake.count("created") > 0  # every event given back
    m = s.meta
    assert (m["regions"], m["device_spans"]) == (8 * STEPS, 6 * STEPS)
    lost = ("dropped_device_spans", "split_device_spans", "clamped_device_spans", "unfinished_regions")
    assert {k: m[k] for k in lost} == dict.fromkeys(lost, 0)
    assert "resolver_errors" not in m

    reg = s.regions
    assert [s.names[k] for k in reg["name"]] == STEP * STEPS
    rows = reg.reshape(STEPS, len(STEP))  # in the order they began: one row per step
    assert (rows["device"][:, DEVICE_COLS] == 0).all() and (rows["device"][:, HOST_COLS] == -1).all()
    expected_args: dict[int, dict[str, Any]] = {}
    for step in range(STEPS):
        base = step * len(STEP)
        expected_args[base] = {"step": step}
        expected_args[base + 3] = {"layer": 1}
        expected_args[base + 4] = {"step": step, "note": "x"}
        expected_args[base + 7] = {"lr": 0.5}
    assert s.args == expected_args

    # each device span where the fake stamped it: after the host read before its record call,
    # before the next host read on the thread (the record returned first), up to the alignment
    d = reg[reg["device"] >= 0]
    reads = np.sort(np.r_[reg["host_start"], reg["host_end"], m["duration_ns"]])

    def next_read(t: np.ndarray) -> np.ndarray:
        nxt: np.ndarray = reads[np.searchsorted(reads, t, side="right")]
        return nxt

    assert (d["dev_start"] > d["host_start"]).all()
    assert (d["dev_start"] <= next_read(d["host_start"]) + TOL_NS).all()
    assert (d["dev_end"] >= d["host_end"] - TOL_NS).all()
    assert (d["dev_end"] <= next_read(d["host_end"]) + TOL_NS).all()

    # the device lane nests as the host lane does, and what ran one after another still does
    d0, d1 = rows["dev_start"], rows["dev_end"]
    for child, parent in [(1, 0), (2, 1), (3, 1), (5, 0), (7, 5)]:
        assert (d0[:, parent] <= d0[:, child]).all() and (d1[:, child] <= d1[:, parent]).all()
    for first, then in [(2, 3), (1, 5)]:
        assert (d1[:, first] <= d0[:, then]).all()
    assert (d1[:-1, 0] <= d0[1:, 0]).all()

    assert evtrace.load(path) == s


def test_the_resolver_thread_runs_without_the_gil(native: Native, tmp_path: Path) -> None:
    """While this thread holds the GIL (a switch interval of 10 s: no other thread gets it),
    the core's resolver thread still queries and times every mark; a Python thread cannot run."""
    fake = native.fake
    n = 300
    ticks = [0]
    stop = threading.Event()

    def ticker() -> None:  # what a Python resolver would be: a thread that needs the GIL
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.0002)

    th = threading.Thread(target=ticker, daemon=True)
    old = sys.getswitchinterval()
    with evtrace.record(tmp_path / "gil.json", backend=native.backend, quiet=True) as r:
        assert recording_natively()
        fake.latency(20_000_000)  # marks are done 20 ms after their record: queried while not ready
        th.start()
        time.sleep(0.01)
        sys.setswitchinterval(10.0)
        try:
            t0, q0, e0 = ticks[0], fake.count("foreign_queries"), fake.count("foreign_elapsed")
            marks = fake.count("records") - fake.count("foreign_records")
            for _ in range(n):
                with evtrace.region("r"):
                    pass
            marks = fake.count("records") - fake.count("foreign_records") - marks
            spun = time.perf_counter()  # pure Python from here: the GIL stays here
            while fake.count("foreign_elapsed") - e0 < marks and time.perf_counter() < spun + 3.0:
                pass
            spun = time.perf_counter() - spun
            t1, q1, e1 = ticks[0], fake.count("foreign_queries"), fake.count("foreign_elapsed")
        finally:
            sys.setswitchinterval(old)
            stop.set()
            th.join()
    s = r.session
    assert s is not None
    assert e1 - e0 >= marks > 0, f"the resolver timed {e1 - e0} of {marks} marks in {spun:.2f} s"
    assert q1 > q0 and fake.count("not_ready") > 0
    # a turn the ticker had asked for before the switch interval went up, at most
    assert t1 - t0 <= 2, f"a Python thread ran {t1 - t0} times while the GIL was held"
    assert s.device_spans == n and s.meta["dropped_device_spans"] == 0


def test_refused_records_cost_device_spans_counted_and_the_error_is_cleared(
    native: Native, tmp_path: Path
) -> None:
    """A stream that refuses records (as a capturing stream does): its regions keep their host
    spans and args, lose their device spans, each counted once; the program never sees the
    error; the session still writes and loads back."""
    fake, torch = native.fake, native.torch
    n = 20
    path = tmp_path / "refused.json"
    with evtrace.record(path, backend=native.backend, quiet=True) as r:
        assert recording_natively()
        with evtrace.region("before"):
            pass
        default, refusing = torch.current[0], FakeStream(0)
        fake.refuse(refusing.cuda_stream)
        torch.current[0] = refusing
        for i in range(n):
            busy(20_000)  # far apart: every boundary makes a record of its own (no shared mark)
            with evtrace.region("refused", i=i):
                busy(20_000)
            assert fake.peek_error() == 0  # cleared: torch's next call would raise it otherwise
        torch.current[0] = default
        with evtrace.region("after"):
            pass
    s = r.session
    assert s is not None
    assert fake.count("refused") == 2 * n  # both ends of each refused region were tried
    names = [s.names[k] for k in s.regions["name"]]
    assert names == ["before", *["refused"] * n, "after"]
    assert s.regions["device"].tolist() == [0, *[-1] * n, 0]
    assert s.args == {1 + i: {"i": i} for i in range(n)}
    assert s.meta["dropped_device_spans"] == n, "one per region that lost its device span"
    assert "resolver_errors" not in s.meta
    assert evtrace.load(path) == s


#: what a forked child's exit status means
CHILD_FAILED = {
    3: "the child still saw its parent's session as the recording one",
    4: "the child's own session did not run natively",
    5: "the child's region recorded an event into its parent's session",
    6: "the child's own session was not its one region with a device span",
    7: "the child raised",
}


def child_process(fake: FakeRuntime, path: Path) -> int:
    """In a child forked mid-session: no session of its parent's, and a native one of its own
    works (its own resolver thread, the core's locks free). 0, or a key of CHILD_FAILED."""
    try:
        if _rec.current is not None:
            return 3
        records = fake.count("records")
        with evtrace.region("in child"):  # recorded nowhere: not even an event recorded for it
            pass
        if fake.count("records") != records:
            return 5
        fake.query_delay(0)
        fake.latency(0)
        with evtrace.record(path, backend=dev.CudaBackend(), quiet=True) as c:
            if not recording_natively():
                return 4
            with evtrace.region("child"):
                pass
        s = c.session
        return 0 if s is not None and s.names == ["child"] and s.device_spans == 1 else 6
    except BaseException:
        return 7


def wait_child(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung: a lock held at the fork?")
        time.sleep(0.005)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_the_resolver_queries_does_not_record_into_the_session(
    native: Native, tmp_path: Path
) -> None:
    """Forks while the resolver thread is inside a (slow) CUDA call and regions are open: each
    child records nothing of its parent's, runs a native session of its own and exits cleanly; the
    parent's session ends with every region and device span."""
    fake = native.fake
    forks, per = 3, 100
    path = tmp_path / "parent.json"
    with evtrace.record(path, backend=native.backend, quiet=True) as r:
        assert recording_natively()
        fake.latency(50_000_000)  # marks stay pending: every resolver pass queries
        fake.query_delay(5_000_000)  # and each query takes 5 ms
        for k in range(forks):
            with evtrace.region("around fork", k=k):
                for _ in range(per):
                    with evtrace.region("parent"):
                        pass
                assert wait_for(lambda: fake.count("in_query") > 0), "the resolver never queried"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork in a threaded process
                    pid = os.fork()
                if pid == 0:
                    os._exit(child_process(fake, tmp_path / f"child{k}.json"))
                status = wait_child(pid)
                assert os.WIFEXITED(status), f"the child ended by signal {os.WTERMSIG(status)}"
                assert os.WEXITSTATUS(status) == 0, CHILD_FAILED.get(os.WEXITSTATUS(status), status)
        fake.query_delay(0)
        for _ in range(per):
            with evtrace.region("parent"):
                pass
    s = r.session
    assert s is not None
    assert len(s) == s.device_spans == forks * (per + 1) + per
    assert sorted(set(s.names)) == ["around fork", "parent"]
    assert s.meta["dropped_device_spans"] == 0 and "resolver_errors" not in s.meta
    assert evtrace.load(path) == s
    for k in range(forks):
        child = evtrace.load(tmp_path / f"child{k}.json")
        assert child.names == ["child"] and child.device_spans == 1 and child.pid != s.pid


def test_a_cuda_error_in_the_resolver_is_reported_and_costs_no_region(native: Native, tmp_path: Path) -> None:
    """Queries that fail for good (a sticky CUDA error) from the middle of a session to its end:
    the trace says so, keeps every region's host span and counts the device spans it lost."""
    fake = native.fake
    path = tmp_path / "errors.json"
    with evtrace.record(path, backend=native.backend, quiet=True) as r:
        assert recording_natively()
        with evtrace.region("fine"):
            pass
        assert wait_for(lambda: fake.count("foreign_elapsed") > 0), "the resolver never ran"
        fake.fail_queries(700)  # cudaErrorIllegalAddress, sticky: every query from now on fails
        for _ in range(5):
            with evtrace.region("after the error"):
                pass
        tried = fake.count("foreign_queries")
        assert wait_for(lambda: fake.count("foreign_queries") > tried), "the resolver never met the error"
    s = r.session
    assert s is not None
    errors = s.meta.get("resolver_errors", [])
    assert errors and all("cudaEventQuery failed with CUDA error 700" in e for e in errors)
    assert [s.names[k] for k in s.regions["name"]] == ["fine", *["after the error"] * 5]
    assert s.regions["device"].tolist() == [0, *[-1] * 5]
    assert s.meta["dropped_device_spans"] == 5
    assert evtrace.load(path) == s
