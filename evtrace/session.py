"""A finished recording: plain data, no device handles; and its file, the trace.

Owns the data model (``REGION_DTYPE``, :class:`Thread`, :class:`Stream`, :class:`Session` with its
typed metadata from ``evtrace.metadata``), combining sessions (:meth:`Session.combine`, what
merge builds on), and persistence: :meth:`Session.save` writes Chrome trace-event JSON as
Perfetto imports it (``shared/TRACE_FORMAT.md``, via orjson) and :meth:`Session.load` reads it
back, equal to what was saved. The trace file *is* the save format: Perfetto shows its events and
flat metadata, and the ``evtrace.*`` metadata entries hold what loading needs. Anything that is
not such a trace raises :class:`~evtrace.files.TraceError`.

Lanes: the host process (real pid) with one lane per thread, then one process per GPU
(pid 10_000_000 + index) with one lane per stream. Every lane gets all four M events.
Spans that would cross on a lane move to an extra "(overlap)" lane, and spans DEPTH_LIMIT or more
deep to "(depth 512+)", "(depth 1024+)", ... lanes after theirs, so nothing is dropped on import.
Times are integer ns since the session origin, written as µs with three decimals.
A merged session (``Session.ranks``) is written rank after rank, each under its own pids.

Imports: device (DeviceInfo), metadata, files, analysis; never the views in ``export/``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson

from . import metadata
from .analysis import outermost, summary_text
from .device import DeviceInfo
from .files import TraceError, read_json, write_bytes
from .metadata import json_value, text

__all__ = [
    "REGION_DTYPE",
    "Session",
    "Stream",
    "Thread",
    "TraceError",
    "rank_labels",
    "trace_bytes",
    "trace_chunks",
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
        """Write a Chrome/Perfetto trace; gzip when the path ends in ``.gz``. Atomic: a killed
        writer never leaves a half file under ``path``."""
        return write_bytes(trace_chunks(self), Path(path))

    @classmethod
    def load(cls, path: str | Path) -> Session:
        """Read a trace written by evtrace. Raises ``TraceError`` on anything else."""
        from .formats.chrome_read import read as read_fast  # it imports this module

        return read_fast(Path(path))

    @classmethod
    def combine(cls, ranks: list[Session], meta: dict[str, Any]) -> Session:
        """One Session holding every rank's regions (threads, devices and streams one after
        another), with ``ranks`` kept. Its metadata: ``meta``, the counts summed, every GPU, the
        longest duration, and the first rank's versions and command. The ranks must already be
        on one clock (``export.merge`` shifts them)."""
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


# ---- the trace file: writing ----

FORMAT = 1
DEVICE_PID = 10_000_000  # above Linux's pid_max, so never a real process
OVERLAP_TID = 0x7F000000  # first tid of the extra lanes: for crossing spans, and for deep ones
#: Perfetto's importer keeps depths 0..511 on a lane and drops deeper slices (stat
#: slice_max_depth_exceeded; v58.2, a recursion 513 deep loses one slice). Deeper ones go to extra
#: lanes of DEPTH_LIMIT levels each, "(depth 512+)", "(depth 1024+)", ..., after their lane.
DEPTH_LIMIT = 512
OWN_ARGS = ("region", "host_dur_us", "device_dur_us", "launch_delay_us")
HOST_PID_BASE = 1_000_000  # merged traces: input i's host is pid HOST_PID_BASE + i * PIDS_PER_INPUT,
PIDS_PER_INPUT = 1_000  # its GPU d the next pid + d (never a real pid of another host)
PROFILER_PID = 20_000_000  # torch.profiler lanes merged in: this pid and up (above the others)


def nesting(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """For spans on one lane, the sub-lane (0 = the lane itself) on which each one nests, and its
    depth there as Perfetto's importer counts it (0: outermost); None for the depths when every
    span is shallower than DEPTH_LIMIT, found without counting (a loop's flat lane).

    Intervals are closed-open: touching spans are siblings. A span that would cross one
    already open goes to the first sub-lane where it nests. Depth follows the importer (checked
    against its ``slice.depth`` on random nestings, v58.2): at one instant the longer span is the
    parent, and a span of no length is the parent of the next one of no length at its instant.
    """
    out = np.zeros(len(start), dtype=np.int32)
    if len(start) < 2:
        return out, None
    # in order and flat (a loop's lane): nothing crosses, and only spans of no length nest (each
    # in the one before at its instant), never DEPTH_LIMIT deep where fewer than that many
    if np.all(start[1:] >= end[:-1]) and (
        np.all(end > start)
        or (
            np.all(end >= start)
            and (len(start) <= DEPTH_LIMIT or np.count_nonzero(end == start) < DEPTH_LIMIT)
        )
    ):
        return out, None
    depth = np.zeros(len(start), dtype=np.int32)
    if np.all((start[1:] > start[:-1]) | ((start[1:] == start[:-1]) & (end[1:] <= end[:-1]))):
        order, s, e = np.arange(len(start)), start, end  # already by start, the longer first
    else:
        order = np.lexsort((-end, start))
        s, e = start[order], end[order]
    d = _nested(s, e)
    if d is not None:  # nothing crosses
        depth[order] = d
        return out, depth
    stacks: list[list[int]] = []
    lane_of = np.zeros(len(start), dtype=np.int32)
    for k, (st, en) in enumerate(zip(s.tolist(), e.tolist())):
        for lane, stack in enumerate(stacks):
            while stack and stack[-1] <= st:
                stack.pop()
            if not stack or en <= stack[-1]:
                stack.append(en)
                lane_of[k] = lane
                break
        else:
            stacks.append([en])
            lane_of[k] = len(stacks) - 1
    out[order] = lane_of
    for lane in range(len(stacks)):
        mine = np.flatnonzero(lane_of == lane)
        d = _nested(s[mine], e[mine])
        assert d is not None  # a sub-lane's spans nest: the stack put them there so
        depth[order[mine]] = d
    return out, depth


def sublanes(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """For spans on one lane, the sub-lane (0 = the lane itself) on which each one nests."""
    return nesting(start, end)[0]


def _nested(s: np.ndarray, e: np.ndarray) -> np.ndarray | None:
    """Each span's depth where spans sorted by start, the longer first, nest without crossing
    (touching spans are siblings); None where some cross. Without a stack: as parentheses (ends
    before starts at one instant, the inner end first), each span's end must come at the depth its
    start opened, and the depth is the spans started before it less those ended by its start."""
    pos = e > s
    ps, pe = (s, e) if pos.all() else (s[pos], e[pos])  # a span of no length crosses nothing
    ends = len(pe) - 1 - np.argsort(pe[::-1], kind="stable")  # by end, the later start first
    end_at = pe[ends]
    opened = np.arange(len(ps)) - np.searchsorted(end_at, ps, side="right")  # depth at each start
    closing = np.searchsorted(ps, end_at, side="left") - np.arange(1, len(ps) + 1)
    if not np.array_equal(opened[ends], closing):
        return None
    if pos.all():
        return opened.astype(np.int32)
    depth = np.zeros(len(s), np.int32)
    depth[pos] = opened
    # a span of no length at t: inside the spans open at t, and below the others of no length
    # at t before it (Perfetto keeps one open for the next at its instant)
    t = s[~pos]
    first = np.r_[True, t[1:] != t[:-1]]
    k = np.arange(len(t))
    run = k - np.maximum.accumulate(np.where(first, k, 0))
    depth[~pos] = np.searchsorted(ps, t, side="right") - np.searchsorted(end_at, t, side="right") + run
    return depth


def _lane_meta(pid: int, tid: int, pname: str, psort: int, tname: str, tsort: int) -> list[dict[str, Any]]:
    return [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": tid, "args": {"name": pname}},
        {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": psort}},
        {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": tname}},
        {"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tsort}},
    ]


_Extra = dict[int, list[tuple[int, str]]]  # a lane's tid -> its extra lanes: (tid, name suffix)


class _Lanes:
    """Where each region's host and device slice goes: on its thread's or stream's lane, or on an
    extra lane after it, where it would cross a span there or lie DEPTH_LIMIT or more deep.
    Any writer lays its slices out so (the lanes are not JSON's)."""

    def __init__(self, s: Session, dev_pid: int = DEVICE_PID) -> None:
        r = s.regions
        self.overlap: list[list[int]] = []  # [extra tid, original tid], for the reader (any extra lane)
        self._next = OVERLAP_TID
        tids = np.array([t.tid for t in s.threads] or [0], dtype=np.int64)
        self.host_tid, self.host_extra = self._split(r["thread"], tids, r["host_start"], r["host_end"])
        self.has_dev = r["device"] >= 0
        rows = np.flatnonzero(self.has_dev)
        self.dev_pid = self.dev_tid = np.zeros(len(r), np.int64)  # the host only: never read
        self.dev_extra: _Extra = {}
        if len(rows):
            self.dev_pid = dev_pid + r["device"].astype(np.int64)
            self.dev_tid = np.zeros(len(r), np.int64)
            self.dev_tid[rows], self.dev_extra = self._split(
                r["stream"][rows], 1 + np.arange(len(s.streams)), r["dev_start"][rows], r["dev_end"][rows]
            )

    def _split(
        self, lane_ids: np.ndarray, tid_of: np.ndarray, start: np.ndarray, end: np.ndarray
    ) -> tuple[np.ndarray, _Extra]:
        """Each span's tid: its lane's (``tid_of[lane id]``), or an extra lane's where it would
        cross or lie too deep; and per lane's tid, its extra lanes in order: (tid, name suffix)."""
        # one lane (one thread, or one stream): one tid, as a view, and nothing gathered
        one = len(lane_ids) > 0 and bool((lane_ids == lane_ids[0]).all())
        tid = np.broadcast_to(tid_of[lane_ids[0]], len(lane_ids)) if one else tid_of[lane_ids]
        extras: _Extra = {}
        for lane in [int(lane_ids[0])] if one else np.flatnonzero(np.bincount(lane_ids)).tolist():
            rows: slice | np.ndarray = slice(None) if one else np.flatnonzero(lane_ids == lane)
            sub, depth = nesting(start[rows], end[rows])
            key, bands = sub, 1
            if depth is not None and depth.max() >= DEPTH_LIMIT:
                band = depth // DEPTH_LIMIT  # the band's lane holds its depths from 0 again
                bands = int(band.max()) + 1
                key = sub.astype(np.int64) * bands + band
            for kb in np.unique(key[key > 0]).tolist():  # the overlap sub-lane, then its bands
                k, b = divmod(kb, bands)
                tid = tid if tid.flags.writeable else tid.copy()
                orig = int(tid_of[lane])
                suffix = ("" if k == 0 else " (overlap)" if k == 1 else f" (overlap {k})") + (
                    f" (depth {b * DEPTH_LIMIT}+)" if b else ""
                )
                extras.setdefault(orig, []).append((self._next, suffix))
                self.overlap.append([self._next, orig])
                moved = np.flatnonzero(key == kb)
                tid[moved if isinstance(rows, slice) else rows[moved]] = self._next
                self._next += 1
        return tid, extras


class _Place(NamedTuple):
    """Where one session's events go: its pids, process-name prefix, sort base, first flow id."""

    host_pid: int
    dev_pid: int  # GPU d is dev_pid + d
    prefix: str
    sort: int
    flow: int


def _place(s: Session) -> _Place:
    rank = s.meta.get("rank")
    return _Place(s.pid, DEVICE_PID, f"rank {rank} · " if isinstance(rank, int) else "", 0, 0)


def _meta_events(s: Session, lanes: _Lanes, place: _Place) -> list[dict[str, Any]]:
    """All four M events for every lane: host first, then GPU 0, 1, ...; extra lanes after theirs."""
    events: list[dict[str, Any]] = []

    def lane(pid: int, tid: int, pname: str, psort: int, tname: str, tsort: int, found: _Extra) -> None:
        events.extend(_lane_meta(pid, tid, pname, psort, tname, tsort))
        for k, (extra, suffix) in enumerate(found.get(tid, []), 1):
            events.extend(_lane_meta(pid, extra, pname, psort, tname + suffix, tsort + k))

    prefix, hpid = text(place.prefix), place.host_pid
    for i, t in enumerate(s.threads):
        lane(hpid, t.tid, prefix + "host", place.sort, text(t.name), i * 100, lanes.host_extra)
    order = sorted(range(len(s.streams)), key=lambda j: (not s.streams[j].label.endswith("(default)"), j))
    for rank, j in enumerate(order):
        st = s.streams[j]
        pid, pname = place.dev_pid + st.device, text(f"{prefix}GPU {st.device} · {s.devices[st.device].name}")
        lane(pid, j + 1, pname, place.sort + 1 + st.device, text(st.label), rank * 100, lanes.dev_extra)
    return events


# ---- the X and C events: many at once ----
# One % format per event cost ~1.3 µs a region, most of it float formatting. Instead, a block of
# events is laid out in a byte matrix, one row per event: each literal and each field a run of
# columns, a field as wide as its longest text and NUL-padded where a row's is shorter; then the
# NULs are dropped in one pass (bytes.translate). NUL never occurs in JSON text (orjson escapes
# control characters). About 0.2 µs a region, a third of it that pass.

BLOCK_BYTES = 2 << 20  # a block's matrix: fits the caches, and is a piece for the gzip workers

_Part = bytes | np.ndarray  # a literal, or text in columns: one row per event
_Spans = Sequence[tuple[int, int]]  # [i, j) ranges of parts


def _digits(out: np.ndarray, a: np.ndarray, pad: bool) -> None:
    """The decimal digits of ``a`` (non-negative) into the rows of ``out``, one row per place,
    the ones last; with ``pad``, NUL in the places before a number's first digit (else zeros)."""
    a = a.astype(np.uint32) if a.max() < 2**32 else a  # u32 divides ~3x faster
    for j in range(len(out) - 1, -1, -1):
        q = a // 10
        np.subtract(a, q * 10, out=out[j], casting="unsafe")
        out[j] += ord("0")
        if pad and j < len(out) - 1:
            out[j] *= a > 0
        a = q


def _number(v: np.ndarray, decimals: bool) -> np.ndarray:
    """Integers as ``%d`` writes them, or (``decimals``) integer ns as µs with three decimals,
    exactly: what ``%.3f`` of ns / 1000 wrote, up to 52 days (where floats start to round).
    Built one contiguous row per digit place, then transposed."""
    a = np.abs(v)
    whole = a // 1000 if decimals else a
    sign = int(bool((v < 0).any()))
    out = np.empty((sign + len(str(int(whole.max()))) + 4 * decimals, len(v)), np.uint8)
    if sign:
        out[0] = np.where(v < 0, ord("-"), 0)
    if decimals:
        _digits(out[sign:-4], whole, True)
        out[-4] = ord(".")
        _digits(out[-3:], a - whole * 1000, False)
    else:
        _digits(out[sign:], a, True)
    return out.T


def _int(v: np.ndarray) -> _Part:
    """Integers as ``%d`` writes them; a literal when every row has the same."""
    return b"%d" % v[0] if v.min() == v.max() else _number(v, False)


def _us(ns: np.ndarray) -> np.ndarray:
    """Integer ns as µs with three decimals."""
    return _number(ns, True)


def _table(texts: list[bytes]) -> np.ndarray:
    """Texts as the rows of a matrix, NUL-padded."""
    w = max(map(len, texts), default=0)
    return np.frombuffer(b"".join(t.ljust(w, b"\0") for t in texts), np.uint8).reshape(len(texts), w)


def _pick(texts: list[bytes], table: np.ndarray, index: np.ndarray) -> _Part:
    """``texts[index]``, with ``table`` their ``_table``; a literal when every row has the same."""
    if index.min() == index.max():
        return texts[int(index[0])]
    picked: np.ndarray = table[index]
    return picked


class _Matrix:
    """Blocks of rows, one after another, in one reused matrix. Its literal columns are written
    when the layout changes; a field keeps the widest width it has had (its padding is dropped
    anyway), so that the layout seldom changes."""

    def __init__(self) -> None:
        self._shape: tuple[int, tuple[bytes | None, ...]] = (0, ())  # rows, literals in place
        self._widths: tuple[int, ...] = ()
        self._blanked = False  # literals blanked on some rows: to be written again
        self._buf = bytearray()
        self._m = np.empty((0, 0), np.uint8)

    def text(
        self, n: int, parts: list[_Part], blank: np.ndarray | None = None, spans: _Spans = ()
    ) -> bytearray:
        """The ``n`` rows, each its parts side by side, each led by a comma; on the ``blank`` rows
        (a mask) without the parts ``parts[i:j]`` for each ``(i, j)`` of ``spans``."""
        shape = (n, tuple(p if isinstance(p, bytes) else None for p in parts))
        widths = tuple(len(p) if isinstance(p, bytes) else p.shape[1] for p in parts)
        if shape == self._shape:
            widths = tuple(map(max, widths, self._widths))
        starts = list(itertools.accumulate(widths, initial=1))  # after the comma
        literals = self._blanked
        if (shape, widths) != (self._shape, self._widths):
            self._shape, self._widths, literals = shape, widths, True
            self._buf = bytearray(n * starts[-1])
            self._m = np.frombuffer(self._buf, np.uint8).reshape(n, -1)
            self._m[:, 0] = ord(",")
        for p, at, end in zip(parts, starts, starts[1:]):
            if not isinstance(p, bytes):
                self._m[:, at : at + p.shape[1]] = p
                self._m[:, at + p.shape[1] : end] = 0
            elif literals:
                self._m[:, at:end] = np.frombuffer(p, np.uint8)
        self._blanked = blank is not None and bool(blank.any())
        for i, j in spans if self._blanked else ():
            self._m[blank, starts[i] : starts[j]] = 0
        return self._buf.translate(None, b"\0")


def _blocks(n: int, row: int, extra: np.ndarray | None = None) -> Iterator[tuple[int, int]]:
    """Ranges of rows whose matrix stays within BLOCK_BYTES: ``row`` bytes a row, plus the widest
    of ``extra`` (args) in the range (a long arg makes a short block, not a huge one)."""
    most = max(1, BLOCK_BYTES // row)
    if extra is None:
        yield from ((lo, min(n, lo + most)) for lo in range(0, n, most))
        return
    lo = 0
    while lo < n:
        w = np.maximum.accumulate(extra[lo : lo + most]) + row
        over = np.flatnonzero(w * np.arange(1, len(w) + 1) > BLOCK_BYTES)
        hi = lo + (max(1, int(over[0])) if len(over) else len(w))
        yield lo, hi
        lo = hi


def _slices(s: Session, lanes: _Lanes, place: _Place) -> Iterator[bytearray]:
    """The X events, as JSON text in blocks, from the integer-ns columns.

    Each region is one row: its host slice, then its device slice where it has one (blanked on
    the rows without). Names and user args go through orjson once each.
    """
    r = s.regions
    names = [orjson.dumps(text(n)) for n in s.names] or [b""]
    name_table = _table(names)
    user = {
        i: orjson.dumps({text(str(k)): json_value(v) for k, v in a.items()})[1:-1] + b","
        for i, a in s.args.items()
        if a
    }
    with_args = np.zeros(len(r), dtype=bool)
    with_args[list(user)] = True
    twice = 2 if lanes.has_dev.any() else 1  # a device row has the name and args twice
    row = (200 + name_table.shape[1]) * twice  # about the bytes of a row, without args
    extra = None
    if user:
        extra = np.bincount(list(user), [len(u) * twice for u in user.values()], len(r)).astype(np.int64)
    matrix = _Matrix()
    pid, flow = place.host_pid, place.flow + 1  # flow ids: unique in the whole file, never 0
    for lo, hi in _blocks(len(r), row, extra):
        c, n = r[lo:hi], hi - lo
        index = _int(np.arange(lo, hi))
        name = _pick(names, name_table, c["name"])
        u: _Part = b""
        if with_args[lo:hi].any():
            at = np.zeros(n, np.int64)
            args = np.flatnonzero(with_args[lo:hi])
            at[args] = np.arange(1, len(args) + 1)
            u = _table([b""] + [user[lo + j] for j in args.tolist()])[at]
        hd = _us(c["host_end"] - c["host_start"])
        host: list[_Part] = [b'{"ph":"X","cat":"region","name":', name, b',"pid":%d,"tid":' % pid]
        host += [_int(lanes.host_tid[lo:hi]), b',"ts":', _us(c["host_start"]), b',"dur":', hd]
        host_args: list[_Part] = [b',"args":{', u, b'"region":', index, b',"host_dur_us":', hd]
        dev = lanes.has_dev[lo:hi]
        if not dev.any():
            yield matrix.text(n, [*host, *host_args, b"}}"])
            continue
        d0, d1, h0 = (np.where(dev, c[f], 0) for f in ("dev_start", "dev_end", "host_start"))
        bind = _int(np.arange(lo + flow, hi + flow))
        dd = _us(d1 - d0)
        flow_out: list[_Part] = [b',"bind_id":', bind, b',"flow_out":true']  # parts of a device row
        dev_args: list[_Part] = [b',"device_dur_us":', dd, b',"launch_delay_us":', _us(d0 - h0)]
        device: list[_Part] = [b'}},{"ph":"X","cat":"device","name":', name, b',"pid":']
        device += [_int(np.where(dev, lanes.dev_pid[lo:hi], 0)), b',"tid":']
        device += [_int(np.where(dev, lanes.dev_tid[lo:hi], 0)), b',"ts":', _us(d0), b',"dur":', dd]
        device += [b',"bind_id":', bind, b',"flow_in":true', *host_args, *dev_args]
        parts: list[_Part] = [*host, *flow_out, *host_args, *dev_args, *device, b"}}"]
        rest = len(host) + len(flow_out) + len(host_args)  # dev_args and device from there
        spans = [(len(host), len(host) + len(flow_out)), (rest, len(parts) - 1)]
        yield matrix.text(n, parts, ~dev, spans)  # the device parts blanked on rows without


def _counters(s: Session, place: _Place) -> Iterator[bytearray]:
    """Per GPU: outermost regions launched but not finished on the device (how far the host runs
    ahead, as a queue depth), and each one's host lead (device start - host launch)."""
    matrix = _Matrix()
    for d in np.unique(s.regions["device"][s.regions["device"] >= 0]).tolist():
        g = s.regions[s.regions["device"] == d]
        g = g[outermost(g)]  # outermost among the regions with a span on this GPU
        pid = place.dev_pid + d
        t = np.r_[g["host_start"], g["dev_end"]]
        step = np.r_[np.ones(len(g), np.int64), -np.ones(len(g), np.int64)]
        o = np.lexsort((step, t))  # at one instant the finish counts first
        t, depth = t[o], np.cumsum(step[o])
        last = np.r_[t[1:] != t[:-1], True]  # one value per instant: the last
        t, depth = t[last], depth[last]
        head = b'{"ph":"C","name":"%s","pid":%d,"tid":1,"ts":'
        for lo, hi in _blocks(len(t), 100):
            parts: list[_Part] = [_us(t[lo:hi]), b',"args":{"regions":', _int(depth[lo:hi]), b"}}"]
            yield matrix.text(hi - lo, [head % (b"regions in flight", pid), *parts])
        for lo, hi in _blocks(len(g), 100):
            h0, d0 = g["host_start"][lo:hi], g["dev_start"][lo:hi]
            parts = [_us(h0), b',"args":{"us":', _us(d0 - h0), b"}}"]
            yield matrix.text(hi - lo, [head % (b"host lead", pid), *parts])


def _own(s: Session, lanes: _Lanes) -> dict[str, Any]:
    """What the reader needs to rebuild ``s`` from its events."""
    return {
        "pid": s.pid,
        "wall_origin_ns": s.wall_origin_ns,
        "overlap_lanes": lanes.overlap,
        "streams": [[st.device, text(st.label)] for st in s.streams],
        "devices": [[d.index, text(d.name)] for d in s.devices],
        "names": [text(n) for n in s.names],
        "meta": metadata.to_json(s.meta),  # the nested original, for load; Perfetto shows the flat keys
    }


def _events(s: Session, lanes: _Lanes, place: _Place, comma: bool) -> Iterator[bytes | bytearray]:
    """One session's events as comma-separated JSON text in chunks; ``comma``: one before the first."""
    head = orjson.dumps(_meta_events(s, lanes, place))[1:-1]
    if head:
        yield b"," + head if comma else head
        comma = True
    for piece in itertools.chain(_slices(s, lanes, place), _counters(s, place)):
        if not comma:  # each event there comes after a comma
            del piece[:1]  # (from the front of a bytearray: no copy)
            comma = True
        yield piece


def _chunks(s: Session) -> Iterator[bytes | bytearray]:
    """The whole document, streamed: M events, X events, then the metadata."""
    if s.ranks:
        yield from _merged_chunks(s)
        return
    lanes = _Lanes(s)
    meta = metadata.flat(s.meta)
    meta.update({"evtrace.format": FORMAT, **{f"evtrace.{k}": v for k, v in _own(s, lanes).items()}})
    yield b'{"traceEvents":['
    sep = b""
    for chunk in _events(s, lanes, _place(s), False):
        yield chunk
        sep = b","
    yield from _profiler_events(s, sep)
    tail = {"displayTimeUnit": "ms", "baseTimeNanoseconds": s.wall_origin_ns, "metadata": meta}
    yield b"]," + orjson.dumps(tail, default=lambda o: text(repr(o)))[1:]


def _merged_chunks(s: Session) -> Iterator[bytes | bytearray]:
    """A merged session: each rank under its own pids (a pid is always one process, and two
    hosts can share pids); its metadata under "<label>." where Perfetto shows it."""
    meta = {k: v for k, v in metadata.flat(s.meta).items() if k == "evtrace" or k.startswith("merge.")}
    ranks: list[dict[str, Any]] = []
    yield b'{"traceEvents":['
    sep, flow = b"", 0
    for i, (label, r) in enumerate(zip(rank_labels(s.ranks), s.ranks)):
        base = HOST_PID_BASE + i * PIDS_PER_INPUT
        lanes = _Lanes(r, base + 1)
        for chunk in _events(r, lanes, _Place(base, base + 1, label + " · ", i * 100, flow), sep == b","):
            yield chunk
            sep = b","
        flow += len(r)
        ranks.append({"label": label, "pid_base": base, **_own(r, lanes)})
        meta.update({f"{label}.{k}": v for k, v in metadata.flat(r.meta).items()})
    yield from _profiler_events(s, sep)
    meta.update({k: v for k, v in metadata.flat(s.meta).items() if k.startswith("profiler.")})
    meta.update({"evtrace.format": FORMAT, "evtrace.ranks": ranks, "evtrace.meta": metadata.to_json(s.meta)})
    tail = {"displayTimeUnit": "ms", "baseTimeNanoseconds": s.wall_origin_ns, "metadata": meta}
    yield b"]," + orjson.dumps(tail, default=lambda o: text(repr(o)))[1:]


def _profiler_events(s: Session, sep: bytes) -> Iterator[bytes]:
    if s.profiler:
        yield sep + orjson.dumps(s.profiler)[1:-1]


def trace_chunks(s: Session) -> Iterator[bytes | bytearray]:
    """The trace document of ``s`` as JSON text in chunks, streamed: M events, X events, then the
    metadata. What :meth:`Session.save` writes; the Chrome view's output."""
    return _chunks(s)


def trace_bytes(s: Session) -> bytes:
    """The whole trace document of ``s`` (uncompressed JSON)."""
    return b"".join(_chunks(s))


# ---- the trace file: reading ----


def read(path: Path) -> Session:
    """Rebuild a Session from a trace evtrace wrote (a merged one: with its ``ranks``)."""
    doc = read_json(path)
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    if (
        not isinstance(meta, dict)
        or not isinstance(doc.get("traceEvents"), list)
        or "evtrace.format" not in meta
    ):
        if isinstance(meta, dict) and "evtrace.merged" in meta:
            raise TraceError(
                f"{path} was merged by an older evtrace, which kept too little to read it back; "
                "merge its inputs again"
            )
        raise TraceError(f"{path} is not an evtrace trace (no evtrace metadata)")
    if meta["evtrace.format"] != FORMAT:
        raise TraceError(
            f"{path} was written by evtrace {meta.get('evtrace', '(unknown version)')}, "
            "which this evtrace cannot read; upgrade evtrace"
        )
    try:
        events = [ev for ev in doc["traceEvents"] if int(ev.get("pid", 0)) < PROFILER_PID]
        s = (_rebuild_merged if "evtrace.ranks" in meta else _rebuild)(events, meta)
        if len(events) < len(doc["traceEvents"]):
            s.profiler = [ev for ev in doc["traceEvents"] if int(ev.get("pid", 0)) >= PROFILER_PID]
        return s
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise TraceError(
            f"{path} is an evtrace trace with damaged events ({type(e).__name__}: {e})"
        ) from None


def _rebuild_merged(events: list[Any], meta: dict[str, Any]) -> Session:
    """Each rank from the events under its pids and the metadata under its label, then combined."""
    infos = meta["evtrace.ranks"]
    index = {int(info["pid_base"]): k for k, info in enumerate(infos)}
    per_rank: list[list[Any]] = [[] for _ in infos]
    for ev in events:
        base = int(ev["pid"]) - (int(ev["pid"]) - HOST_PID_BASE) % PIDS_PER_INPUT
        per_rank[index[base]].append(ev)
    ranks = []
    for info, evs in zip(infos, per_rank):
        label = str(info["label"]) + "."
        own = {f"evtrace.{k}": v for k, v in info.items() if k not in ("label", "pid_base")}
        rank_meta = {k[len(label) :]: v for k, v in meta.items() if k.startswith(label)}
        s = _rebuild(evs, {**rank_meta, **own, "evtrace.pid": info["pid_base"]})
        s.pid = int(info["pid"])
        ranks.append(s)
    merged = Session.combine(
        ranks, {k: v for k, v in meta.items() if k == "evtrace" or k.startswith("merge.")}
    )
    if isinstance(meta.get("evtrace.meta"), dict):
        merged.meta = metadata.from_json(meta["evtrace.meta"])
    return merged


def _rebuild(events: list[Any], meta: dict[str, Any]) -> Session:
    pid = int(meta["evtrace.pid"])
    parent = {int(a): int(b) for a, b in meta.get("evtrace.overlap_lanes", [])}
    streams = [Stream(int(d), str(label)) for d, label in meta.get("evtrace.streams", [])]
    devices = [DeviceInfo(int(i), str(n)) for i, n in meta.get("evtrace.devices", [])]
    threads: list[Thread] = []
    thread_ix: dict[int, int] = {}
    hosts: dict[int, dict[str, Any]] = {}
    devs: dict[int, dict[str, Any]] = {}
    for ev in events:
        ph = ev.get("ph")
        if ph == "M" and ev.get("name") == "thread_name" and ev.get("pid") == pid and ev["tid"] not in parent:
            thread_ix[ev["tid"]] = len(threads)
            threads.append(Thread(int(ev["tid"]), str(ev["args"]["name"])))
        elif ph == "X" and ev.get("cat") == "region":
            hosts[int(ev["args"]["region"])] = ev
        elif ph == "X" and ev.get("cat") == "device":
            devs[int(ev["args"]["region"])] = ev
    n = len(hosts)
    if sorted(hosts) != list(range(n)):
        raise ValueError("region ids are not 0..n-1")
    regions = np.zeros(n, REGION_DTYPE)
    names: dict[str, int] = {str(name): k for k, name in enumerate(meta.get("evtrace.names", []))}
    args: dict[int, dict[str, Any]] = {}

    def ns(us: Any) -> int:
        return int(round(float(us) * 1000))

    for i in range(n):
        h = hosts[i]
        row = regions[i]
        row["name"] = names.setdefault(h["name"], len(names))
        row["thread"] = thread_ix[parent.get(h["tid"], h["tid"])]
        row["host_start"] = ns(h["ts"])
        row["host_end"] = ns(h["ts"]) + ns(h["dur"])
        user = {k: v for k, v in h["args"].items() if k not in OWN_ARGS}
        if user:
            args[i] = user
        d = devs.get(i)
        if d is None:
            row["device"], row["stream"] = -1, -1
        else:
            tid = parent.get(d["tid"], d["tid"])
            row["stream"] = tid - 1
            row["device"] = streams[tid - 1].device
            row["dev_start"] = ns(d["ts"])
            row["dev_end"] = ns(d["ts"]) + ns(d["dur"])
    if isinstance(meta.get("evtrace.meta"), dict):
        typed = metadata.from_json(meta["evtrace.meta"])
    else:  # written before evtrace kept the nested metadata: the flat keys Perfetto shows
        typed = metadata.from_flat({k: v for k, v in meta.items() if not k.startswith("evtrace.")})
    return Session(
        regions=regions,
        names=list(names),
        threads=threads,
        devices=devices,
        streams=streams,
        args=args,
        meta=typed,
        pid=pid,
        wall_origin_ns=int(meta.get("evtrace.wall_origin_ns", 0)),
    )
