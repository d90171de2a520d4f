"""A finished recording: plain data, no device handles. Save, load and summarise it anywhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .device import DeviceInfo

#: one row per region. Times are integer ns since the session origin, all on the host clock.
#: device < 0: no device span (no CUDA, or the span was lost; see the metadata counts).
REGION_DTYPE = np.dtype(
    [
        ("name", np.int32),  # index into Session.names
        ("thread", np.int32),  # index into Session.threads
        ("host_start", np.int64),
        ("host_end", np.int64),
        ("device", np.int16),
        ("stream", np.int32),  # index into Session.streams
        ("dev_start", np.int64),
        ("dev_end", np.int64),
    ]
)


@dataclass(frozen=True)
class Thread:
    tid: int  # native thread id
    name: str


@dataclass(frozen=True)
class Stream:
    device: int
    label: str


@dataclass
class Session:
    """Regions with host and device spans on one clock, plus metadata."""

    regions: np.ndarray  # REGION_DTYPE
    names: list[str]
    threads: list[Thread]
    devices: list[DeviceInfo]
    streams: list[Stream]
    args: dict[int, dict[str, Any]] = field(default_factory=dict)  # region index -> user args
    meta: dict[str, Any] = field(default_factory=dict)
    pid: int = 0
    wall_origin_ns: int = 0  # time.time_ns() at the origin: lines traces of one run up
    #: a merged trace (``evtrace merge``): one Session per input, on this one's clock; the
    #: fields above then hold all of them together. Empty for a single recording.
    ranks: list[Session] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def device_spans(self) -> int:
        return int((self.regions["device"] >= 0).sum())

    def save(self, path: str | Path) -> Path:
        """Write a Chrome/Perfetto trace; gzip when the path ends in ``.gz``."""
        from .export import chrome

        return chrome.write(self, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> Session:
        """Read a trace written by evtrace. Raises ``TraceError`` on anything else."""
        from .export import chrome

        return chrome.read(Path(path))

    def summary(self, skip: int = 0) -> str:
        """A table per region name; ``skip`` drops the first N of each name (warm-up)."""
        from .export.summary import summary

        return summary(self, skip=skip)
