"""The device seam: what the recorder needs from a GPU, and the CUDA implementation.

The recorder only ever calls these methods. Tests drive the same recorder through a
deterministic simulated backend (``tests/simdevice.py``); the CUDA backend is proven on a card.

Hot path (called per region boundary): the three calls of :meth:`Backend.hot_path`, which the
recorder binds once per session, so that a backend can hand over C functions with no Python
frame around them. Off the hot path (resolver thread, session start/stop): everything else.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from . import private

Event = Any  # an opaque, reusable event handle owned by a backend


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str


class HotPath(NamedTuple):
    """A backend's calls per region boundary. They must be cheap and must not block."""

    #: the current device (asked only with several devices)
    get_device: Callable[[], int]
    #: the current stream's handle on a device
    raw_stream: Callable[[int], int]
    #: record an event on a stream: 0, or an error code (the event was not recorded)
    record: Callable[[Event, int], int]


class Backend(Protocol):
    """What a device must offer. No method may block the host except ``synchronize``."""

    @property
    def devices(self) -> Sequence[DeviceInfo]: ...
    def hot_path(self) -> HotPath: ...  # bound once per session
    def native_runtime(self) -> str | None: ...  # the CUDA runtime's soname, for the native core
    def learn_stream(self, device: int, stream: int) -> None: ...  # first sight, while current
    def record_failed(self, code: int) -> None: ...
    def new_event(self, device: int) -> Event: ...
    def query(self, event: Event) -> bool: ...
    def elapsed_ms(self, start: Event, end: Event) -> float: ...
    def synchronize(self, device: int) -> None: ...
    def side_stream(self, device: int) -> int: ...
    def stream_label(self, device: int, stream: int) -> str: ...
    def guard_captures(self, began: Callable[[], None], ended: Callable[[], None]) -> Callable[[], None]: ...
    def close(self) -> None: ...


class _Cudart:
    """The few CUDA runtime calls evtrace needs, straight through ctypes.

    ``PyDLL`` keeps the GIL held during each (short, non-blocking) call: releasing it, as
    ``CDLL`` and torch's own bindings do, lets a busy background thread take it and stall the
    caller for up to the switch interval.
    """

    NOT_READY = 600  # cudaErrorNotReady

    def __init__(self, lib: ctypes.PyDLL, soname: str) -> None:
        vp = ctypes.c_void_p
        self.lib = lib
        self.soname = soname
        self.create = lib.cudaEventCreateWithFlags
        self.create.argtypes, self.create.restype = [ctypes.POINTER(vp), ctypes.c_uint], ctypes.c_int
        self.record = lib.cudaEventRecord
        self.record.argtypes, self.record.restype = [vp, vp], ctypes.c_int
        self.query = lib.cudaEventQuery
        self.query.argtypes, self.query.restype = [vp], ctypes.c_int
        self.elapsed = lib.cudaEventElapsedTime
        self.elapsed.argtypes, self.elapsed.restype = [ctypes.POINTER(ctypes.c_float), vp, vp], ctypes.c_int
        self.destroy = lib.cudaEventDestroy
        self.destroy.argtypes, self.destroy.restype = [vp], ctypes.c_int
        self.last_error = lib.cudaGetLastError
        self.last_error.restype = ctypes.c_int
        self.stream_create = lib.cudaStreamCreateWithFlags
        self.stream_create.argtypes = [ctypes.POINTER(vp), ctypes.c_uint]
        self.stream_create.restype = ctypes.c_int
        self.stream_destroy = lib.cudaStreamDestroy
        self.stream_destroy.argtypes, self.stream_destroy.restype = [vp], ctypes.c_int

    @classmethod
    def load(cls, cuda_version: str | None) -> _Cudart | None:
        """The runtime torch already loaded (found by soname), or None."""
        if not cuda_version:
            return None
        name = f"libcudart.so.{cuda_version.split('.')[0]}"
        try:
            return cls(ctypes.PyDLL(name), name)
        except (OSError, AttributeError):
            return None


class CudaBackend:
    """CUDA through torch for streams and devices, and raw runtime calls for events.

    Shaped by what the calls cost (measured on an H100 here):

    - ``torch.cuda.current_stream()`` builds a Python ``Stream`` (~10 µs); the raw handle from
      ``torch._C._cuda_getCurrentRawStream`` costs ~0.2 µs.
    - ``torch.cuda.Event.record(stream)`` costs ~3 µs and releases the GIL; a raw
      ``cudaEventRecord`` ~2.5 µs. A new torch Event creates its CUDA event only on first
      record (+4 µs); raw events are created up front, off the hot path.
    - ``_cuda_getDevice`` costs ~0.4 µs: skipped when only one device is visible.

    Without a loadable ``libcudart`` (a static build), torch's Event objects are used instead.
    """

    def __init__(self, raw: bool = True) -> None:
        import torch as torch_module

        torch: Any = torch_module  # parts of torch.cuda are untyped
        self._torch = torch
        torch.cuda.init()
        n = torch.cuda.device_count()
        self.devices = [DeviceInfo(i, torch.cuda.get_device_name(i)) for i in range(n)]
        self._raw_stream = private.raw_stream(torch)
        self._get_device = private.get_device(torch)
        self._labels: dict[Any, str] = {}  # raw stream handle -> lane name
        self._streams: dict[int, Any] = {}  # raw handle -> torch Stream (for torch events)
        self._rt = _Cudart.load(torch.version.cuda) if raw else None
        # The anchors' stream is private: one from torch's pool (torch.cuda.Stream() hands out 32
        # round-robin) could be handed to user code too, and the anchors would queue behind its work.
        self._side: dict[int, int] = {i: self._private_stream(i) for i in range(n)}
        for h in self._side.values():
            self._labels[h] = "evtrace anchors"
        self._created: list[int] = []
        self._out = ctypes.c_float()
        self._outp = ctypes.pointer(self._out)
        self._record: Callable[[Event, int], int]
        if self._rt is not None:
            self._record = self._rt.record  # the C function itself: no Python frame on the hot path
        else:
            self._base_record = private.event_record(torch)
            self._record = self._record_torch
        self.raw_events = self._rt is not None

    def hot_path(self) -> HotPath:
        """torch's C getters for the device and the raw stream, and the runtime's record."""
        return HotPath(self._get_device, self._raw_stream, self._record)

    def native_runtime(self) -> str | None:
        """The soname of the CUDA runtime whose events these are: the core then records, queries
        and reads them itself, and resolves without the GIL. None with torch's events."""
        return self._rt.soname if self._rt is not None else None

    def learn_stream(self, device: int, stream: int) -> None:
        """First sight of a stream (it is current right now): name it as torch numbers it."""
        st = self._torch.cuda.current_stream(device)
        label = f"stream {st.stream_id}" if st.cuda_stream == stream else f"stream {stream:#x}"
        self._labels[stream] = "stream 0 (default)" if stream == 0 else label
        if self._rt is None:
            self._streams[stream] = (
                st if st.cuda_stream == stream else self._torch.cuda.ExternalStream(stream, device=device)
            )

    def record_failed(self, code: int) -> None:
        """After a refused record: clear this thread's CUDA error, so that torch never sees it."""
        if self._rt is not None:
            self._rt.last_error()

    # ---- raw runtime events -------------------------------------------------------------------

    def new_event(self, device: int) -> Event:
        if self._rt is None:
            ev = self._torch.cuda.Event(enable_timing=True)
            self._base_record(ev, self._streams[self._side[device]])  # create it now, off the hot path
            return ev
        h = ctypes.c_void_p()
        with self._torch.cuda.device(device):
            rc = self._rt.create(ctypes.byref(h), 0)
        if rc != 0:
            self._rt.last_error()
            raise RuntimeError(f"cudaEventCreateWithFlags failed with CUDA error {rc}")
        self._created.append(int(h.value or 0))
        return int(h.value or 0)

    def query(self, event: Event) -> bool:
        if self._rt is None:
            return bool(event.query())
        rc = self._rt.query(event)
        if rc == 0:
            return True
        self._rt.last_error()
        if rc == _Cudart.NOT_READY:
            return False
        raise RuntimeError(f"cudaEventQuery failed with CUDA error {rc}")

    def elapsed_ms(self, start: Event, end: Event) -> float:
        if self._rt is None:
            return float(start.elapsed_time(end))  # signed; float32 inside CUDA
        rc = self._rt.elapsed(self._outp, start, end)  # resolver thread only: one output slot
        if rc != 0:
            self._rt.last_error()
            raise RuntimeError(f"cudaEventElapsedTime failed with CUDA error {rc}")
        return self._out.value

    # ---- torch events (fallback) -----------------------------------------------------------
    def _record_torch(self, event: Event, stream: int) -> int:
        self._base_record(event, self._streams[stream])
        return 0

    # ---- the rest -----------------------------------------------------------------------------
    def synchronize(self, device: int) -> None:
        self._torch.cuda.synchronize(device)

    def side_stream(self, device: int) -> int:
        return self._side[device]

    def _private_stream(self, device: int) -> int:
        """A non-blocking stream of evtrace's own, made through the runtime (torch never sees it).
        Without the runtime (torch's events), one from torch's pool: the best torch offers."""
        if self._rt is None:
            st = self._torch.cuda.Stream(device=device)
            self._streams[st.cuda_stream] = st
            return int(st.cuda_stream)
        h = ctypes.c_void_p()
        with self._torch.cuda.device(device):
            rc = self._rt.stream_create(ctypes.byref(h), 1)  # cudaStreamNonBlocking
        if rc != 0:
            self._rt.last_error()
            raise RuntimeError(f"cudaStreamCreateWithFlags failed with CUDA error {rc}")
        return int(h.value or 0)

    def stream_label(self, device: int, stream: int) -> str:
        return self._labels.get(stream) or f"stream {stream:#x}"

    def guard_captures(self, began: Callable[[], None], ended: Callable[[], None]) -> Callable[[], None]:
        """Call ``began``/``ended`` around every CUDA graph capture torch makes; returns the undo.

        During a capture (torch's default, global mode) an event query from any thread would
        invalidate it, and events recorded into it are never stamped.
        """
        graph = self._torch.cuda.CUDAGraph
        begin, end = graph.capture_begin, graph.capture_end

        def capture_begin(g: Any, *a: Any, **k: Any) -> Any:
            began()
            try:
                return begin(g, *a, **k)
            except BaseException:
                ended()
                raise

        def capture_end(g: Any, *a: Any, **k: Any) -> Any:
            try:
                return end(g, *a, **k)
            finally:
                ended()

        graph.capture_begin = capture_begin
        graph.capture_end = capture_end

        def undo() -> None:
            graph.capture_begin = begin
            graph.capture_end = end

        return undo

    def close(self) -> None:
        """Destroy the raw events this backend created (all resolved by now)."""
        if self._rt is not None:
            for h in self._created:
                self._rt.destroy(h)
            self._created.clear()
            for s in self._side.values():
                self._rt.stream_destroy(s)
            self._side.clear()


def cuda_backend() -> CudaBackend | None:
    """The CUDA backend, or None when torch has no usable CUDA device."""
    try:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return None
    except Exception:  # a broken torch install is "no CUDA", not a crash
        return None
    return CudaBackend()
