"""A finished recording: plain data, no device handles, nothing about files.

Owns the data model (``REGION_DTYPE``, :class:`Thread`, :class:`Stream`, :class:`Session` with its
typed metadata from ``evtrace.metadata``) and combining sessions (:meth:`Session.combine`, what
merge builds on). :meth:`Session.save` and :meth:`Session.load` hand the file to the format its
suffix names (``evtrace.formats``: Chrome JSON, Perfetto protobuf).

Imports: device (DeviceInfo), metadata, analysis; the formats only inside save and load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .analysis import summary_text
from .device import DeviceInfo
from .files import TraceError

__all__ = [
    "REGION_DTYPE",
    "Session",
    "Stream",
    "Thread",
    "TraceError",
    "rank_labels",
]

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

#: metadata counts that add up over ranks when sessions are combined
COUNTS = (
    "dropped_device_spans",
    "split_device_spans",
    "clamped_device_spans",
    "dropped_regions",
    "unfinished_regions",
)


@dataclass(frozen=True)
class Thread:
    tid: int  # native thread id
    name: str


@dataclass(frozen=True)
class Stream:
    device: int
    label: str


@dataclass(eq=False)
class Session:
    """Regions with host and device spans on one clock, plus metadata.

    ``meta`` holds JSON values, except ``meta["alignment"]``: one :class:`~evtrace.metadata.DeviceAlignment`
    per device, keyed by its index as a string. Two sessions are equal when every field is
    (the regions compared as arrays): ``Session.load(s.save(p)) == s``.
    """

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
    #: a torch.profiler trace merged in (``export.kineto``): its lanes' M and X events as written,
    #: on this session's clock, under pids from PROFILER_PID up. Not regions: the views skip them.
    profiler: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.regions)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Session):
            return NotImplemented
        return (
            self.regions.dtype == other.regions.dtype
            and np.array_equal(self.regions, other.regions)
            and (self.names, self.threads, self.devices, self.streams)
            == (other.names, other.threads, other.devices, other.streams)
            and (self.args, self.meta, self.pid, self.wall_origin_ns)
            == (other.args, other.meta, other.pid, other.wall_origin_ns)
            and self.ranks == other.ranks
            and self.profiler == other.profiler
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass with eq is

    @property
    def device_spans(self) -> int:
        return int((self.regions["device"] >= 0).sum())

    def summary(self, skip: int = 0) -> str:
        """A table per region name; ``skip`` drops the first N of each name (warm-up)."""
        return summary_text(self, skip)

    def save(self, path: str | Path) -> Path:
        """Write the trace in the format the suffix names (``.json``, ``.json.gz``, ``.pftrace``,
        ``.pftrace.gz``). Atomic: a killed writer never leaves a half file under ``path``."""
        from . import formats

        return formats.save(self, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> Session:
        """Read a trace written by evtrace, in any of its formats. ``TraceError`` on anything else."""
        from . import formats

        return formats.load(Path(path))

    @classmethod
    def combine(cls, ranks: list[Session], meta: dict[str, Any]) -> Session:
        """One Session holding every rank's regions (threads, devices and streams one after
        another), with ``ranks`` kept. Its metadata: ``meta``, the counts summed, every GPU, the
        longest duration, and the first rank's versions and command. The ranks must already be
        on one clock (``evtrace.merge`` shifts them)."""
        names: dict[str, int] = {}
        parts: list[np.ndarray] = []
        args: dict[int, dict[str, Any]] = {}
        threads: list[Thread] = []
        devices: list[DeviceInfo] = []
        streams: list[Stream] = []
        first = ranks[0].meta if ranks else {}
        out_meta: dict[str, Any] = {
            k: first[k] for k in ("python", "torch", "cuda", "driver", "argv", "host_id") if k in first
        }
        out_meta.update(meta)
        for k in COUNTS:
            if any(k in s.meta for s in ranks):
                out_meta[k] = sum(int(s.meta.get(k, 0)) for s in ranks)
        lost: dict[str, int] = {}  # device spans lost, by reason
        for s in ranks:
            for why, n in (s.meta.get("lost_device_spans") or {}).items():
                lost[why] = lost.get(why, 0) + int(n)
        if lost:
            out_meta["lost_device_spans"] = lost
        out_meta["gpus"] = [g for s in ranks for g in (s.meta.get("gpus") or [])]
        ends = [int(s.meta.get("duration_ns", 0)) + int(s.meta.get("shift_ns", 0)) for s in ranks]
        out_meta["duration_ns"] = max(ends, default=0)
        offset = 0
        for s in ranks:
            r = s.regions.copy()
            name_map = np.array([names.setdefault(n, len(names)) for n in s.names] or [0], dtype=np.int32)
            r["name"] = name_map[r["name"]]
            r["thread"] += len(threads)
            dev = r["device"] >= 0
            r["stream"][dev] += len(streams)
            r["device"][dev] += len(devices)
            args.update({i + offset: a for i, a in s.args.items()})
            offset += len(r)
            parts.append(r)
            threads += s.threads
            streams += [dataclasses.replace(st, device=st.device + len(devices)) for st in s.streams]
            devices += [dataclasses.replace(d, index=len(devices) + k) for k, d in enumerate(s.devices)]
        regions = np.concatenate(parts) if parts else np.zeros(0, REGION_DTYPE)
        wall = min((s.wall_origin_ns for s in ranks), default=0)
        pid = ranks[0].pid if ranks else 0
        return cls(
            regions, list(names), threads, devices, streams, args, out_meta, pid, wall, ranks=list(ranks)
        )


def rank_labels(ranks: list[Session]) -> list[str]:
    """ "rank N" for each input that has a distinct rank, else "trace i"."""
    got = [r.meta.get("rank") for r in ranks]
    return [
        f"rank {k}" if isinstance(k, int) and got.count(k) == 1 else f"trace {i}" for i, k in enumerate(got)
    ]
