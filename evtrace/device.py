"""The device seam: what the recorder needs from a GPU, and the CUDA implementation.

The recorder only ever calls these methods. Tests drive the same recorder through a
deterministic simulated backend (``tests/simdevice.py``); the CUDA backend is proven on a card.

Hot path (called per region boundary): ``current`` and ``record``.
Off the hot path (resolver thread, session start/stop): everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

Event = Any  # an opaque, reusable event handle owned by a backend


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str


class Backend(Protocol):
    """What a device must offer. No method may block the host except ``synchronize``."""

    devices: list[DeviceInfo]
    #: () -> (device index, stream key). Hot path: must be cheap.
    current: Callable[[], tuple[int, int]]

    def new_event(self, device: int) -> Event: ...
    def record(self, event: Event, device: int, stream: int) -> None: ...
    def query(self, event: Event) -> bool: ...
    def elapsed_ms(self, start: Event, end: Event) -> float: ...
    def synchronize(self, device: int) -> None: ...
    def side_stream(self, device: int) -> int: ...
    def stream_label(self, device: int, stream: int) -> str: ...


class CudaBackend:
    """CUDA through torch, shaped by what the calls cost (measured on an H100):

    - ``torch.cuda.current_stream()`` builds a Python ``Stream`` (~10 µs); the raw handle from
      ``torch._C._cuda_getCurrentRawStream`` costs ~0.2 µs, so streams are cached by handle.
    - ``Event.record()`` without a stream pays that lookup again; the base-class
      ``record(event, stream)`` is ~3 µs.
    - A new ``torch.cuda.Event`` creates its CUDA event on first record (+4 µs), so
      ``new_event`` records once on the side stream before the event is handed out.
    - ``_cuda_getDevice`` costs ~0.4 µs: skipped when only one device is visible.
    """

    def __init__(self) -> None:
        import torch

        self._torch = torch
        torch.cuda.init()
        n = torch.cuda.device_count()
        self.devices = [DeviceInfo(i, torch.cuda.get_device_name(i)) for i in range(n)]
        self._raw_stream = torch._C._cuda_getCurrentRawStream
        self._get_device = torch._C._cuda_getDevice
        self._base_record = torch._C._CudaEventBase.record
        self._streams: dict[int, Any] = {}  # raw handle -> torch Stream
        self._labels: dict[tuple[int, int], str] = {}
        self._side = {i: torch.cuda.Stream(device=i) for i in range(n)}
        for i, s in self._side.items():
            self._remember(i, s, "evtrace anchors")
        self.current = self._current_single if n == 1 else self._current_multi

    def _current_single(self) -> tuple[int, int]:
        return 0, self._raw_stream(0)

    def _current_multi(self) -> tuple[int, int]:
        d = self._get_device()
        return d, self._raw_stream(d)

    def _remember(self, device: int, stream: Any, label: str | None = None) -> None:
        key = stream.cuda_stream
        self._streams[key] = stream
        if label is None:
            label = "default stream" if key == 0 else f"stream {stream.stream_id}"
        self._labels[(device, key)] = label

    def _stream(self, device: int, key: int) -> Any:
        s = self._streams.get(key)
        if s is None:  # first sight of this stream: pay for the Python object once
            s = self._torch.cuda.current_stream(device)
            if s.cuda_stream != key:
                s = self._torch.cuda.ExternalStream(key, device=device)
            self._remember(device, s)
        return s

    def new_event(self, device: int) -> Event:
        ev = self._torch.cuda.Event(enable_timing=True)
        self._base_record(ev, self._side[device])  # create the CUDA event now, not on the hot path
        return ev

    def record(self, event: Event, device: int, stream: int) -> None:
        s = self._streams.get(stream)
        if s is None:
            s = self._stream(device, stream)
        self._base_record(event, s)

    def query(self, event: Event) -> bool:
        return bool(event.query())

    def elapsed_ms(self, start: Event, end: Event) -> float:
        return float(start.elapsed_time(end))  # signed; float32 inside CUDA

    def synchronize(self, device: int) -> None:
        self._torch.cuda.synchronize(device)

    def side_stream(self, device: int) -> int:
        return int(self._side[device].cuda_stream)

    def stream_label(self, device: int, stream: int) -> str:
        return self._labels.get((device, stream), f"stream {stream:#x}")


def cuda_backend() -> CudaBackend | None:
    """The CUDA backend, or None when torch has no usable CUDA device."""
    try:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return None
    except Exception:  # a broken torch install is "no CUDA", not a crash
        return None
    return CudaBackend()
