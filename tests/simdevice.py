"""A deterministic stand-in for the GPU and the host clock, for driving the real recorder.

The simulated device has its own clock, ``dev = (host - offset) * (1 + drift_ppm/1e6)``,
streams that execute queued kernels in order, and events that are stamped when their stream
reaches them. Tests check that the alignment recovers the host time of every device stamp.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from evtrace.device import DeviceInfo, HotPath

SIDE = 999  # the anchor stream of every simulated device


class FakeClock:
    """Host clock in ns: starts at a random time, advances ``step`` per read.

    Only reads from the thread that made it advance time, so that a background resolver
    polling on its own schedule cannot make a session's timestamps vary from run to run.
    """

    def __init__(self, step: int = 1000, seed: int = 0) -> None:
        self.now = random.Random(seed).randrange(10**12, 10**13)
        self.step = step
        self.owner: int | None = threading.get_ident()

    def __call__(self) -> int:
        t = self.now
        if self.owner is None or threading.get_ident() == self.owner:
            self.now += self.step
        return t

    def advance(self, ns: int) -> None:
        self.now += int(ns)


@dataclass
class SimEvent:
    stamp: float | None = None  # device ns; None until recorded
    truth_host: float | None = None  # host ns at which the device stamped it


class SimBackend:
    """A simulated device behind the recorder's ``Backend`` protocol (checked by mypy below)."""

    def __init__(
        self,
        clock: FakeClock,
        ndev: int = 1,
        offset_ns: int = 123_456_789,
        drift_ppm: float = 20.0,
        latency_ns: int = 0,
        record_ns: int = 2000,
    ) -> None:
        self.clock = clock
        self.record_ns = record_ns
        self.devices = [DeviceInfo(i, f"Sim GPU {i}") for i in range(ndev)]
        self.offset = offset_ns
        self.rate = 1 + drift_ppm * 1e-6
        self.latency = latency_ns
        self.skew = 0.0  # extra stamp delay on work streams only (negative: a model error)
        #: extra stamp delay in ns, by (stream, host ns): stamps made late by other traffic
        self.late: Callable[[int, int], float] | None = None
        self.busy: dict[tuple[int, int], float] = {}  # (device, stream) -> device ns when idle
        self.device = 0
        self.stream = 0
        self.created = 0
        self.records = 0
        self.syncs = 0
        self.stamps: list[SimEvent] = []  # every record, in order (ground truth)
        self.learned: list[tuple[int, int]] = []
        self.failures: list[int] = []
        self.refuse = False  # refuse records, as CUDA does on a capturing stream
        self.queries = 0
        self.capture: tuple[Callable[[], None], Callable[[], None]] | None = None
        self.closed = False

    # ---- the seam ----
    def hot_path(self) -> HotPath:
        return HotPath(self.get_device, self.raw_stream, self.record)

    def native_runtime(self) -> str | None:
        return None  # the core calls this backend's Python methods

    def get_device(self) -> int:
        return self.device

    def raw_stream(self, device: int) -> int:
        return self.stream

    def learn_stream(self, device: int, stream: int) -> None:
        self.learned.append((device, stream))

    def record_failed(self, code: int) -> None:
        self.failures.append(code)

    def dev_now(self) -> float:
        return (self.clock.now - self.offset) * self.rate

    def to_host(self, dev: float) -> float:
        return dev / self.rate + self.offset

    def new_event(self, device: int) -> SimEvent:
        self.created += 1
        return SimEvent()

    def record(self, ev: SimEvent, stream: int) -> int:
        if self.refuse:
            return 900  # like cudaErrorStreamCaptureUnsupported
        if self.clock.owner == threading.get_ident():
            self.clock.advance(self.record_ns)  # a record takes host time, as a real one does
        device = self.device
        self.records += 1
        start = self.dev_now() + self.latency
        if self.late is not None:
            start += self.late(stream, self.clock.now) * self.rate
        if stream != SIDE:
            start = max(start + self.skew, self.busy.get((device, stream), 0.0))
        ev.stamp = start
        ev.truth_host = self.to_host(start)
        self.stamps.append(SimEvent(start, ev.truth_host))
        return 0

    def query(self, ev: SimEvent) -> bool:
        assert ev.stamp is not None, "query of an event never recorded"
        self.queries += 1
        return self.dev_now() >= ev.stamp

    def elapsed_ms(self, a: SimEvent, b: SimEvent) -> float:
        assert a.stamp is not None and b.stamp is not None
        assert self.query(a) and self.query(b), "elapsed_time of an unfinished event"
        return float(np.float32((b.stamp - a.stamp) / 1e6))  # CUDA gives float32 ms

    def synchronize(self, device: int) -> None:
        self.syncs += 1
        last = max([v for (d, _), v in self.busy.items() if d == device] + [self.dev_now()])
        self.clock.now = max(self.clock.now, int(self.to_host(last)) + 1)

    def side_stream(self, device: int) -> int:
        return SIDE

    def stream_label(self, device: int, stream: int) -> str:
        return "stream 0 (default)" if stream == 0 else f"stream {stream}"

    def close(self) -> None:
        self.closed = True

    def guard_captures(self, began: Callable[[], None], ended: Callable[[], None]) -> Callable[[], None]:
        self.capture = (began, ended)
        return self._unguard

    def _unguard(self) -> None:
        self.capture = None

    # ---- test helpers ----
    def launch(self, ns: float, stream: int | None = None, host_ns: int = 5000) -> None:
        """Queue a kernel of ``ns`` device time on a stream (default: the current one).

        The launch itself takes ``host_ns`` of host time, as a real one does (5 µs or more).
        """
        self.clock.advance(host_ns)
        key = (self.device, self.stream if stream is None else stream)
        start = max(self.dev_now() + self.latency, self.busy.get(key, 0.0))
        self.busy[key] = start + ns


if TYPE_CHECKING:  # mypy checks that the simulated device satisfies the protocol, without casts
    from evtrace.device import Backend

    _check: Backend = SimBackend(FakeClock())
