"""Where each slice of a trace goes, for every writer: lanes (pid, tid) per thread and per GPU
stream, their names and order, and extra lanes for spans that would cross or nest too deep.

Lanes: the host process (real pid) with one lane per thread, then one process per GPU
(pid 10_000_000 + index) with one lane per stream. Spans that would cross on a lane move to an
extra "(overlap)" lane, and spans DEPTH_LIMIT or more deep to "(depth 512+)", "(depth 1024+)", ...
lanes after theirs, so nothing is dropped on import (Chrome JSON and TrackEvent alike).
A merged session (``Session.ranks``) is laid out rank after rank, each under its own pids.
Also the per-GPU counters both writers put beside the stream lanes (``in_flight``).

Imports: session (the data model), analysis's ``outermost`` and metadata's ``text``; never a format.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from .analysis import outermost
from .metadata import text
from .session import Session

DEVICE_PID = 10_000_000  # above Linux's pid_max, so never a real process
OVERLAP_TID = 0x7F000000  # first tid of the extra lanes: for crossing spans, and for deep ones
#: Perfetto's importer keeps depths 0..511 on a lane and drops deeper slices (stat
#: slice_max_depth_exceeded; v58.2, a recursion 513 deep loses one slice). Deeper ones go to extra
#: lanes of DEPTH_LIMIT levels each, "(depth 512+)", "(depth 1024+)", ..., after their lane.
DEPTH_LIMIT = 512
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


_Extra = dict[int, list[tuple[int, str]]]  # a lane's tid -> its extra lanes: (tid, name suffix)


class Lanes:
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
                suffix = overlap_suffix(k) + (f" (depth {b * DEPTH_LIMIT}+)" if b else "")
                extras.setdefault(orig, []).append((self._next, suffix))
                self.overlap.append([self._next, orig])
                moved = np.flatnonzero(key == kb)
                tid[moved if isinstance(rows, slice) else rows[moved]] = self._next
                self._next += 1
        return tid, extras


class Place(NamedTuple):
    """Where one session's events go: its pids, process-name prefix, sort base, first flow id."""

    host_pid: int
    dev_pid: int  # GPU d is dev_pid + d
    prefix: str
    sort: int
    flow: int


def place(s: Session) -> Place:
    rank = s.meta.get("rank")
    return Place(s.pid, DEVICE_PID, f"rank {rank} · " if isinstance(rank, int) else "", 0, 0)


class Lane(NamedTuple):
    """One lane as a viewer shows it: its process and thread ids, names and sort indexes."""

    pid: int
    tid: int
    pname: str
    psort: int
    tname: str
    tsort: int


def lane_list(s: Session, lanes: Lanes, where: Place) -> Iterator[Lane]:
    """Every lane in order: host threads first, then GPU 0, 1, ... (the default stream first);
    each lane's extra lanes right after it."""

    def lane(
        pid: int, tid: int, pname: str, psort: int, tname: str, tsort: int, found: _Extra
    ) -> Iterator[Lane]:
        yield Lane(pid, tid, pname, psort, tname, tsort)
        for k, (extra, suffix) in enumerate(found.get(tid, []), 1):
            yield Lane(pid, extra, pname, psort, tname + suffix, tsort + k)

    prefix, hpid = text(where.prefix), where.host_pid
    for i, t in enumerate(s.threads):
        yield from lane(hpid, t.tid, prefix + "host", where.sort, text(t.name), i * 100, lanes.host_extra)
    order = sorted(range(len(s.streams)), key=lambda j: (not s.streams[j].label.endswith("(default)"), j))
    for rank, j in enumerate(order):
        st = s.streams[j]
        pid, pname = where.dev_pid + st.device, text(f"{prefix}GPU {st.device} · {s.devices[st.device].name}")
        yield from lane(
            pid, j + 1, pname, where.sort + 1 + st.device, text(st.label), rank * 100, lanes.dev_extra
        )


def overlap_suffix(k: int) -> str:
    """The name suffix of a lane's k-th extra lane for spans that would cross (0: the lane itself)."""
    return "" if k == 0 else " (overlap)" if k == 1 else f" (overlap {k})"


def lane_meta(pid: int, tid: int, pname: str, psort: int, tname: str, tsort: int) -> list[dict[str, Any]]:
    """The four M events that name and order one lane (TRACE_FORMAT.md: every lane gets all four)."""
    return [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": tid, "args": {"name": pname}},
        {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": psort}},
        {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": tname}},
        {"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tsort}},
    ]


def in_flight(s: Session, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPU ``d``'s counters, as both formats write them: its outermost regions (among those with a
    span on it), and the instants at which the number of them launched but not finished on the
    device changes, with that number (one value an instant, the last: a finish counts first)."""
    g = s.regions[s.regions["device"] == d]
    g = g[outermost(g)]
    t = np.r_[g["host_start"], g["dev_end"]]
    step = np.r_[np.ones(len(g), np.int64), -np.ones(len(g), np.int64)]
    o = np.lexsort((step, t))
    t, depth = t[o], np.cumsum(step[o])
    last = np.r_[t[1:] != t[:-1], True]
    return g, t[last], depth[last]
