"""CudaBackend's own logic on a CPU machine, against a stand-in torch and CUDA runtime.

The real thing runs in tests/cuda on a card; this catches what can break without one:
construction, stream naming, both event paths, error codes and their clearing.
"""

from __future__ import annotations

import ctypes
import itertools
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import evtrace
from evtrace import device as dev


class FakeStream:
    ids = itertools.count(3)

    def __init__(self, device: int = 0, handle: int | None = None) -> None:
        self.device = device
        self.stream_id = next(self.ids) if handle != 0 else 0
        self.cuda_stream = handle if handle is not None else 0x1000 + self.stream_id


class FakeEvent:
    def __init__(self, enable_timing: bool = False) -> None:
        self.t: float | None = None

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: FakeEvent) -> float:
        return (other.t or 0.0) - (self.t or 0.0)


def fake_torch(clock: list[float]) -> types.ModuleType:
    t = types.ModuleType("torch")
    current = {0: FakeStream(0, 0)}

    def record(ev: FakeEvent, stream: FakeStream) -> None:
        clock[0] += 0.001
        ev.t = clock[0]

    class _Dev:
        def __init__(self, i: int) -> None:
            pass

        def __enter__(self) -> None:
            pass

        def __exit__(self, *a: object) -> None:
            pass

    class CUDAGraph:
        def capture_begin(self) -> None:
            pass

        def capture_end(self) -> None:
            pass

    cuda: Any = types.SimpleNamespace(
        CUDAGraph=CUDAGraph,
        init=lambda: None,
        is_available=lambda: True,
        device_count=lambda: 1,
        get_device_name=lambda i: "Fake GPU",
        Stream=lambda device=0: FakeStream(device),
        ExternalStream=lambda h, device=0: FakeStream(device, h),
        current_stream=lambda device=0: current[device],
        Event=FakeEvent,
        synchronize=lambda d=None: None,
        device=_Dev,
    )
    t.cuda = cuda  # type: ignore[attr-defined]  # a fake torch module
    t.version = types.SimpleNamespace(cuda="13.0")  # type: ignore[attr-defined]
    t._C = types.SimpleNamespace(  # type: ignore[attr-defined]
        _cuda_getCurrentRawStream=lambda d: current[d].cuda_stream,
        _cuda_getDevice=lambda: 0,
        _CudaEventBase=types.SimpleNamespace(record=record),
    )
    t.current = current  # type: ignore[attr-defined]
    return t


class FakeCudart:
    """ctypes-shaped stand-ins: 0 is success, 600 is not ready."""

    NOT_READY = 600
    soname = None  # not a library the core can load: it calls these through Python

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.stamps: dict[int, float] = {}
        self.handles = itertools.count(0x5000)
        self.errors_cleared = 0
        self.refuse: set[int] = set()  # streams that refuse records
        self.pending: set[int] = set()
        self.streams: set[int] = set()  # made through the runtime, not yet destroyed

    def create(self, ref: Any, flags: int) -> int:
        ref._obj.value = next(self.handles)
        return 0

    def record(self, ev: int, stream: int) -> int:
        if stream in self.refuse:
            return 900
        self.clock[0] += 0.001
        self.stamps[ev] = self.clock[0]
        return 0

    def query(self, ev: int) -> int:
        return self.NOT_READY if ev in self.pending else 0

    def elapsed(self, out: Any, a: int, b: int) -> int:
        out.contents.value = self.stamps[b] - self.stamps[a]
        return 0

    def destroy(self, ev: int) -> int:
        return 0

    def stream_create(self, ref: Any, flags: int) -> int:
        assert flags == 1  # cudaStreamNonBlocking: never synchronises with the default stream
        ref._obj.value = next(self.handles)
        self.streams.add(ref._obj.value)
        return 0

    def stream_destroy(self, s: int) -> int:
        self.streams.remove(s)
        return 0

    def last_error(self) -> int:
        self.errors_cleared += 1
        return 0


@pytest.fixture(params=["raw", "torch events"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    clock = [0.0]
    torch = fake_torch(clock)
    monkeypatch.setitem(sys.modules, "torch", torch)
    rt = FakeCudart(clock)
    monkeypatch.setattr(
        dev._Cudart, "load", classmethod(lambda cls, v: rt if request.param == "raw" else None)
    )
    b = dev.CudaBackend()
    b.fake_torch, b.fake_rt = torch, rt  # type: ignore[attr-defined]  # the fakes, for the tests
    return b


def test_construction_and_a_session_through_the_backend(backend: Any, tmp_path: Path) -> None:
    torch, rt = backend.fake_torch, backend.fake_rt
    assert backend.raw_events == (backend._rt is rt)
    with evtrace.record(tmp_path / "fake.json", backend=backend, quiet=True) as r:
        with evtrace.region("a"):
            pass
        side = FakeStream(0)
        torch.current[0] = side
        with evtrace.region("b"):
            pass
        torch.current[0] = FakeStream(0, 0)
    s = r.session
    assert s is not None and s.device_spans == 2
    assert [st.label for st in s.streams] == ["stream 0 (default)", f"stream {side.stream_id}"]
    assert s.devices[0].name == "Fake GPU"


def test_raw_errors_are_cleared_and_not_ready_is_false(backend: Any) -> None:
    rt = backend.fake_rt
    if not backend.raw_events:
        pytest.skip("raw runtime only")
    ev = backend.new_event(0)
    record = backend.hot_path().record
    assert record(ev, 0) == 0 and backend.query(ev) is True
    rt.pending.add(ev)
    before = rt.errors_cleared
    assert backend.query(ev) is False and rt.errors_cleared == before + 1
    rt.refuse.add(0x77)
    code = record(ev, 0x77)
    assert code == 900
    backend.record_failed(code)
    assert rt.errors_cleared == before + 2


def test_the_anchor_stream_is_private_and_destroyed_at_the_end(backend: Any, tmp_path: Path) -> None:
    """torch.cuda.Stream() hands out streams round-robin from a pool of 32: an anchor stream from
    there could be given to user code, and its anchors would queue behind the user's work."""
    torch, rt = backend.fake_torch, backend.fake_rt
    if not backend.raw_events:
        pytest.skip("raw runtime only")
    side = backend.side_stream(0)
    assert rt.streams == {side}  # made through the runtime: torch never hands it out
    users = {torch.cuda.Stream(device=0).cuda_stream for _ in range(64)}
    assert side not in users
    with evtrace.record(tmp_path / "a.json", backend=backend, quiet=True) as r:
        with evtrace.region("a"):
            pass
    assert r.session is not None and r.session.device_spans == 1
    assert rt.streams == set()


def test_no_cuda_means_no_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    t = types.ModuleType("torch")
    t.cuda = types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", t)
    assert dev.cuda_backend() is None


def test_cudart_binds_the_calls_it_needs() -> None:
    class Lib:
        def __getattr__(self, name: str) -> Any:
            f = types.SimpleNamespace(argtypes=None, restype=None)
            setattr(self, name, f)
            return f

    rt = dev._Cudart(Lib(), "libcudart.so.13")  # type: ignore[arg-type]
    assert rt.record.argtypes == [ctypes.c_void_p, ctypes.c_void_p] and rt.record.restype is ctypes.c_int
    assert dev._Cudart.load(None) is None
