"""Perfetto's native format (``.pftrace``, ``.pftrace.gz``): TrackEvent protobuf, written and read
in bulk from the integer columns, with no protobuf package (the wire format is a few varints).

What Perfetto reads (``shared/TRACE_FORMAT.md`` has the same lanes for JSON):
- one track per lane of ``evtrace.lanes``: a thread track per host thread, a track per GPU stream
  under a process per GPU, extra lanes after theirs; names and order as the JSON's;
- a BEGIN and an END event per slice, names interned, timestamps incremental (a sequence clock in
  ns: 1-3 bytes a delta), so every event of the one sequence comes in time order; at one instant on
  a track: the ENDs, the inner first, then the BEGINs, the outer first, then spans of no length;
- launch->execution flows (``flow_ids_old``: a varint, 5 bytes instead of the 10 of ``flow_ids``);
- user args as debug annotations on the host slice; the counters as counter tracks per GPU;
- the metadata as debug annotations of one "evtrace" instant at the origin;
- a merged torch.profiler trace's lanes on a second sequence.

What ``load`` reads: the session itself, in "evtrace" fields of the Trace message *before* the
packets (Perfetto skips fields it does not know: checked on v58.2 with zero import stats): a JSON
header, then each column of ``REGION_DTYPE`` delta-coded and narrowed to the fewest bytes. The
reader reads those and stops at the first packet; it never parses an event.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .. import metadata
from ..device import DeviceInfo
from ..files import TraceError, write_bytes
from ..lanes import HOST_PID_BASE, PIDS_PER_INPUT, Lanes, Place, in_flight, lane_list, place
from ..metadata import text
from ..session import REGION_DTYPE, Session, Stream, Thread, rank_labels

#: the format written; READ, the formats read (1 named the alignment's slack ``bound_us_*``:
#: ``metadata.DeviceAlignment.from_mapping`` reads either name)
FORMAT = 2
READ = (1, 2)
#: the Trace message's field for evtrace's own data; Trace defines only field 1 (packet)
EVTRACE_FIELD = 2_026_126
SEQ = 1  # the sequence of evtrace's events
SEQ_PROFILER = 2  # torch.profiler's, with absolute timestamps
CLOCK = 64  # a sequence-scoped clock: incremental, in ns
BOOTTIME = 6
BLOCK = 1 << 16  # events encoded at once: a matrix of ~40 bytes each, a few MB


# ---- the wire format ----


def _v(n: int) -> bytes:
    """One varint (two's complement for a negative int64, as protobuf does)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _f(num: int, val: int) -> bytes:
    return _v(num << 3) + _v(val)


def _m(num: int, payload: bytes) -> bytes:
    return _v(num << 3 | 2) + _v(len(payload)) + payload


def _d(num: int, val: float) -> bytes:
    return _v(num << 3 | 1) + np.float64(val).tobytes()


def _varints(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Varints of many values at once: a (n, width) byte matrix and each one's length."""
    u = a.astype(np.uint64)
    width = max(1, (int(u.max(initial=0)).bit_length() + 6) // 7)
    m = np.empty((len(u), width), np.uint8)
    for j in range(width):
        m[:, j] = (u >> np.uint64(7 * j)) & np.uint64(0x7F)
    length = np.ones(len(u), np.int64)
    for j in range(1, width):
        length += u >= np.uint64(1 << (7 * j))
    if width > 1:
        m[:, :-1] |= np.uint8(0x80) * (np.arange(1, width) < length[:, None])
    return m, length


class _Rows:
    """Rows of bytes side by side, each part a literal, a varint column or a table of blobs; a
    part of length 0 on a row is absent there. ``bytes()`` joins them row after row in one pass
    (a boolean mask over the matrix)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []  # (n, w) bytes, (n,) lengths

    def lit(self, b: bytes, on: np.ndarray | None = None) -> None:
        m = np.broadcast_to(np.frombuffer(b, np.uint8), (self.n, len(b)))
        self.parts.append((m, np.full(self.n, len(b), np.int64) if on is None else on * len(b)))

    def var(self, a: np.ndarray, on: np.ndarray | None = None) -> np.ndarray:
        m, length = _varints(a)
        if on is not None:
            length = length * on
        self.parts.append((m, length))
        return length

    def blob(self, m: np.ndarray, length: np.ndarray) -> None:
        self.parts.append((m, length))

    def length(self) -> np.ndarray:
        return sum((p[1] for p in self.parts), np.zeros(self.n, np.int64))

    def bytes(self) -> bytes:
        parts = [p for p in self.parts if p[0].shape[1] and p[1].any()]  # absent on every row: none
        mat = np.concatenate([p[0] for p in parts], axis=1)
        column = np.concatenate([np.arange(p[0].shape[1]) for p in parts])
        part = np.repeat(np.arange(len(parts)), [p[0].shape[1] for p in parts])
        lengths = np.empty(
            (self.n, len(parts)), np.uint8 if max(p[0].shape[1] for p in parts) < 256 else np.int64
        )
        for k, p in enumerate(parts):
            lengths[:, k] = p[1]
        keep = column.astype(lengths.dtype) < lengths[:, part]  # narrow: the gather moves 1 byte a cell
        out: bytes = mat[keep].tobytes()
        return out


def _blobs(items: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    w = max(map(len, items), default=0)
    m = np.frombuffer(b"".join(b.ljust(w, b"\0") for b in items), np.uint8).reshape(len(items), w)
    return m, np.array([len(b) for b in items], np.int64)


# ---- debug annotations: user args and metadata ----


def _annotation(name: bytes, v: Any) -> bytes:
    """A DebugAnnotation: name (10), then bool 2, int 4, double 5, string 6, dict 11, array 12."""
    return name + _value(v)


def _value(v: Any) -> bytes:
    v = metadata.json_value(v)
    if isinstance(v, bool):
        return _f(2, int(v))
    if isinstance(v, int) and -(2**63) <= v < 2**63:
        return _f(4, v)
    if isinstance(v, float):
        return _d(5, v)
    if isinstance(v, dict):
        return b"".join(_m(11, _m(10, text(str(k)).encode()) + _value(x)) for k, x in v.items())
    if isinstance(v, list):
        return b"".join(_m(12, _value(x)) for x in v) if v else _m(6, b"[]")
    return _m(6, text(v if isinstance(v, str) else orjson.dumps(v).decode()).encode())


class _ArgNames:
    """Interned debug annotation names (InternedData field 3)."""

    def __init__(self) -> None:
        self.iids: dict[str, int] = {}

    def __call__(self, k: str) -> bytes:
        iid = self.iids.setdefault(text(str(k)), len(self.iids) + 1)
        return _f(1, iid)

    def interned(self) -> bytes:
        return b"".join(_m(3, _f(1, i) + _m(2, k.encode())) for k, i in self.iids.items())


class _Args:
    """Every region's args as TrackEvent debug_annotations (field 4), in one buffer: region
    ``k``'s are ``buf[off[k] : off[k] + size[k]]``. Encoded a key at a time over the regions of one
    shape (the same keys): an int column as varints at once, other values one by one."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.at = 0
        self.off: list[np.ndarray] = []
        self.size: list[np.ndarray] = []
        self.count = 0

    def add(self, s: Session, names: _ArgNames) -> np.ndarray:
        """The args of ``s``; returns each region's arg index (-1: none)."""
        index = np.full(len(s.regions), -1, np.int64)
        shapes: dict[tuple[str, ...], list[int]] = {}
        for i, a in s.args.items():
            if a:
                shapes.setdefault(tuple(a), []).append(i)
        for keys, rows in shapes.items():
            r = _Rows(len(rows))
            for k in keys:
                vals = [s.args[i][k] for i in rows]
                col = np.array(vals) if all(type(v) is int for v in vals[:64]) else None
                name = names(k)
                if col is not None and col.dtype.kind == "i":  # an int column (not bool, not huge)
                    m, length = _varints(col)
                    r.lit(b"\x22")  # field 4, length-delimited
                    r.var(len(name) + 1 + length)
                    r.lit(name + b"\x20")  # then int_value (4)
                    r.blob(m, length)
                else:
                    r.blob(*_blobs([_m(4, _annotation(name, v)) for v in vals]))
            length = r.length()
            self.pieces.append(r.bytes())
            self.off.append(self.at + np.r_[0, np.cumsum(length)[:-1]])
            self.size.append(length)
            self.at += int(length.sum())
            index[np.array(rows, np.int64)] = self.count + np.arange(len(rows))
            self.count += len(rows)
        return index

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The buffer, and each arg index's offset and size."""
        buf = np.frombuffer(b"".join(self.pieces) + b"\0", np.uint8)
        if not self.off:
            return buf, np.zeros(0, np.int64), np.zeros(0, np.int64)
        return buf, np.concatenate(self.off), np.concatenate(self.size)


# ---- writing ----

_BEGIN, _END, _INSTANT, _COUNTER = 1, 2, 3, 4


#: each event column as narrow as its values allow: 45 bytes an event, not 64 (28M events for 4M
#: device regions with their counters)
_EVENT_DTYPES = {
    "ts": np.int64,
    "tie": np.int64,
    "type": np.int8,
    "track": np.int32,
    "name": np.int32,
    "flow": np.int64,
    "arg": np.int32,
    "count": np.int64,
}


class _Events:
    """Every event of the one sequence as columns, put in time order at the end."""

    def __init__(self) -> None:
        self.cols: dict[str, list[np.ndarray]] = {
            k: [] for k in ("ts", "tie", "type", "track", "name", "flow", "arg", "count")
        }

    def add(
        self,
        ts: np.ndarray,
        tie: np.ndarray,
        type: int | np.ndarray,
        track: np.ndarray | int,
        name: np.ndarray | int = 0,
        flow: np.ndarray | int = 0,
        arg: np.ndarray | int = -1,
        count: np.ndarray | int = 0,
    ) -> None:
        n = len(ts)
        for k, v in (
            ("ts", ts),
            ("tie", tie),
            ("type", type),
            ("track", track),
            ("name", name),
            ("flow", flow),
            ("arg", arg),
            ("count", count),
        ):
            self.cols[k].append(np.broadcast_to(np.asarray(v, _EVENT_DTYPES[k]), n))

    def slices(
        self,
        start: np.ndarray,
        end: np.ndarray,
        track: np.ndarray,
        name: np.ndarray,
        flow: np.ndarray,
        arg: np.ndarray,
    ) -> None:
        """BEGIN and END events, with the keys that order them at one instant on a track: the
        ENDs (tie 0..; the shorter first), the BEGINs (the longer first), then spans of no length
        (their BEGIN, then their END). Spans identical in start and end keep the order in which
        they are added: BEGINs in region order, ENDs in reverse (added so), the first the parent."""
        dur = end - start
        zero = dur == 0
        big = np.int64(1) << np.int64(61)
        self.add(start, np.where(zero, 2 * big, big + (big - 1 - dur)), _BEGIN, track, name, flow, arg)
        rev = slice(None, None, -1)
        self.add(end[rev], np.where(zero, 3 * big, dur)[rev], _END, track[rev])

    def ordered(self) -> dict[str, np.ndarray]:
        """The columns in time order; each column is gathered, then its unsorted parts let go."""
        ts, tie = (np.concatenate(self.cols.pop(k) or [np.zeros(0, np.int64)]) for k in ("ts", "tie"))
        order = np.lexsort((tie, ts))
        del tie
        out = {"ts": ts[order]}
        del ts
        for k in list(self.cols):
            parts = self.cols.pop(k)
            out[k] = np.concatenate(parts)[order] if parts else np.zeros(0, _EVENT_DTYPES[k])
        return out


def _packets(ev: dict[str, np.ndarray], t0: int, args: _Args, doubles: np.ndarray) -> Iterator[bytes]:
    """The events as TracePackets, in blocks: timestamp (delta on the sequence clock), sequence
    id, and a TrackEvent of type, track, name, flow and args, or a counter value."""
    ts = ev["ts"]
    delta = np.diff(ts, prepend=np.int64(t0))
    buf, arg_off, arg_size = args.table()
    for lo in range(0, len(ts), BLOCK):
        hi = min(len(ts), lo + BLOCK)
        n = hi - lo
        t, track, name, flow = ev["type"][lo:hi], ev["track"][lo:hi], ev["name"][lo:hi], ev["flow"][lo:hi]
        arg, count = ev["arg"][lo:hi], ev["count"][lo:hi]
        body = _Rows(n)
        body.lit(b"\x48")
        body.var(t)
        body.lit(b"\x58")
        body.var(track)
        named = name > 0
        body.lit(b"\x50", named)
        body.var(name, named)
        out, end = flow > 0, flow < 0
        body.lit(b"\xa0\x02", out)  # flow_ids_old (36): the flow starts at the host slice
        body.var(np.abs(flow), out)
        body.lit(b"\xd0\x02", end)  # terminating_flow_ids_old (42): and ends at the device slice
        body.var(np.abs(flow), end)
        is_counter = t == _COUNTER
        dbl = is_counter & np.isin(track, doubles)
        ints = is_counter & ~dbl
        body.lit(b"\xf0\x01", ints)  # counter_value (30)
        body.var(np.where(ints, count, 0), ints)
        body.lit(b"\xe1\x02", dbl)  # double_counter_value (44): count holds the float's bits
        body.blob(count.view(np.uint8).reshape(n, 8), dbl * 8)
        has = arg >= 0
        if has.any():
            k = np.where(has, arg, 0)
            size = np.where(has, arg_size[k], 0)
            cols = np.arange(int(size.max()))
            body.blob(buf[np.minimum(arg_off[k][:, None] + cols, len(buf) - 1)], size)
        te_len = body.length()
        pkt = _Rows(n)
        pkt.lit(b"\x40")
        pkt.var(delta[lo:hi])
        pkt.lit(b"\x50" + _v(SEQ) + b"\x5a")
        pkt.var(te_len)
        head = _Rows(n)
        head.lit(b"\x0a")
        head.var(pkt.length() + te_len)
        both = _Rows(n)
        both.parts = head.parts + pkt.parts + body.parts
        yield both.bytes()


def _track(uuid: int, *fields: bytes) -> bytes:
    return _m(1, _m(60, _f(1, uuid) + b"".join(fields)))


def _session_events(
    s: Session,
    where: Place,
    ev: _Events,
    tracks: list[bytes],
    names: dict[str, int],
    argnames: _ArgNames,
    args: _Args,
    doubles: set[int],
    uuid0: int,
) -> int:
    """One session's tracks (into ``tracks``) and events (into ``ev``); returns the next free uuid."""
    lanes = Lanes(s, where.dev_pid)
    uuid = uuid0
    lane_uuid: dict[tuple[int, int], int] = {}
    proc_uuid: dict[int, int] = {}
    device_pids = {where.dev_pid + d.index for d in s.devices}
    for lane in lane_list(s, lanes, where):
        if lane.pid not in proc_uuid:
            proc_uuid[lane.pid] = uuid
            # child ordering 3 (explicit): the lanes in evtrace's order
            tracks.append(_track(uuid, _m(3, _f(1, lane.pid) + _m(6, lane.pname.encode())), _f(11, 3)))
            uuid += 1
        lane_uuid[(lane.pid, lane.tid)] = uuid
        rank = _f(12, lane.tsort)
        if lane.pid in device_pids:  # a stream: a named track under its GPU's process
            tracks.append(_track(uuid, _f(5, proc_uuid[lane.pid]), _m(2, lane.tname.encode()), rank))
        else:
            thread = _m(4, _f(1, lane.pid) + _f(2, lane.tid) + _m(5, lane.tname.encode()))
            tracks.append(_track(uuid, _f(5, proc_uuid[lane.pid]), thread, rank))
        uuid += 1
    r = s.regions
    if not len(r):
        return uuid
    name_iid = np.array([names.setdefault(text(n), len(names) + 1) for n in s.names] or [0], np.int64)[
        r["name"]
    ]
    keys = np.array(list(lane_uuid), np.int64).reshape(-1, 2)
    uuids = np.array(list(lane_uuid.values()), np.int64)

    def track_of(pid: np.ndarray, tid: np.ndarray) -> np.ndarray:
        # (pid, tid) -> uuid, through a sorted key (a lane is few, the events many)
        code = keys[:, 0] * (1 << 32) + keys[:, 1]
        order = np.argsort(code)
        at = np.searchsorted(code[order], pid.astype(np.int64) * (1 << 32) + tid)
        found: np.ndarray = uuids[order][at]
        return found

    host_track = track_of(np.full(len(r), where.host_pid), np.asarray(lanes.host_tid, np.int64))
    dev = np.flatnonzero(lanes.has_dev)
    flow_id = where.flow + 1 + np.arange(len(r), dtype=np.int64)
    arg = args.add(s, argnames)
    flow = np.zeros(len(r), np.int64)
    flow[dev] = flow_id[dev]
    ev.slices(r["host_start"], r["host_end"], host_track, name_iid, flow, arg)
    if len(dev):
        d = r[dev]
        dev_track = track_of(lanes.dev_pid[dev], lanes.dev_tid[dev])
        ev.slices(
            d["dev_start"], d["dev_end"], dev_track, name_iid[dev], -flow_id[dev], np.full(len(dev), -1)
        )
        for g in np.unique(d["device"]).tolist():
            uuid = _counters(s, g, where, ev, tracks, proc_uuid, doubles, uuid)
    return uuid


def _counters(
    s: Session,
    d: int,
    where: Place,
    ev: _Events,
    tracks: list[bytes],
    proc_uuid: dict[int, int],
    doubles: set[int],
    uuid: int,
) -> int:
    """As the JSON's: per GPU, outermost regions launched but not finished on the device, and each
    one's host lead (device start - host launch, µs); a sample only where the value changes."""
    g, t, depth = in_flight(s, d)
    lead_t, lead = g["host_start"], (g["dev_start"] - g["host_start"]) / 1000.0
    parent = proc_uuid[where.dev_pid + d]
    for name, ts, vals, dbl in (("regions in flight", t, depth, False), ("host lead", lead_t, lead, True)):
        changed = np.r_[True, vals[1:] != vals[:-1]] if len(vals) else np.zeros(0, bool)
        tracks.append(_track(uuid, _f(5, parent), _m(2, name.encode()), _m(8, b"")))
        if dbl:
            doubles.add(uuid)
        v = np.asarray(vals, np.float64 if dbl else np.int64)[changed]
        ev.add(ts[changed], np.zeros(int(changed.sum()), np.int64), _COUNTER, uuid, count=v.view(np.int64))
        uuid += 1
    return uuid


def _profiler_packets(events: list[dict[str, Any]], uuid: int, shift: int) -> list[bytes]:
    """A merged torch.profiler trace: its M events as tracks, its X events as slices with their
    args, on their own sequence with absolute timestamps (ns since the origin)."""
    procs: dict[int, tuple[str, int]] = {}
    threads: dict[tuple[int, int], tuple[str, int]] = {}
    for e in events:
        if e.get("ph") != "M":
            continue
        pid, tid, a = int(e.get("pid", 0)), int(e.get("tid", 0)), e.get("args") or {}
        p, t = procs.get(pid, ("", 0)), threads.get((pid, tid), ("", 0))
        if e["name"] == "process_name":
            procs[pid] = (str(a.get("name", "")), p[1])
        elif e["name"] == "process_sort_index":
            procs[pid] = (p[0], int(a.get("sort_index", 0)))
        elif e["name"] == "thread_name":
            threads[(pid, tid)] = (str(a.get("name", "")), t[1])
        elif e["name"] == "thread_sort_index":
            threads[(pid, tid)] = (t[0], int(a.get("sort_index", 0)))
    xs = [e for e in events if e.get("ph") == "X"]
    for e in xs:
        threads.setdefault((int(e["pid"]), int(e["tid"])), (str(e["tid"]), 0))
        procs.setdefault(int(e["pid"]), ("", 0))
    out: list[bytes] = []
    puuid: dict[int, int] = {}
    for pid, (pname, _) in sorted(procs.items(), key=lambda kv: (kv[1][1], kv[0])):
        puuid[pid] = uuid
        out.append(_track(uuid, _m(3, _f(1, pid) + _m(6, text(pname).encode())), _f(11, 3)))
        uuid += 1
    tuuid: dict[tuple[int, int], int] = {}
    for (pid, tid), (tname, sort) in threads.items():
        tuuid[(pid, tid)] = uuid
        out.append(_track(uuid, _f(5, puuid[pid]), _m(2, text(tname).encode()), _f(12, sort)))
        uuid += 1
    ev: list[tuple[int, int, int, bytes]] = []
    for k, e in enumerate(xs):
        t0 = round(float(e["ts"]) * 1000)
        t1 = t0 + round(float(e.get("dur", 0)) * 1000)
        track = _f(11, tuuid[(int(e["pid"]), int(e["tid"]))])
        a = b"".join(
            _m(4, _annotation(_m(10, text(str(key)).encode()), x)) for key, x in (e.get("args") or {}).items()
        )
        begin = _f(9, _BEGIN) + track + _m(23, text(str(e.get("name", ""))).encode()) + a
        big = 1 << 61
        ev.append((t0, 2 * big + 2 * k if t1 == t0 else big + (big - 1 - (t1 - t0)), 0, begin))
        ev.append((t1, 2 * big + 2 * k + 1 if t1 == t0 else t1 - t0, -k, _f(9, _END) + track))
    ev.sort(key=lambda x: x[:3])
    seq = _f(10, SEQ_PROFILER)
    out += [_m(1, _f(8, max(0, ts + shift)) + seq + _m(11, body)) for ts, _, _, body in ev]
    return out


def _own(s: Session) -> dict[str, Any]:
    """What ``load`` needs besides the columns."""
    return {
        "n": len(s.regions),
        "pid": s.pid,
        "wall_origin_ns": s.wall_origin_ns,
        "names": [text(n) for n in s.names],
        "threads": [[t.tid, text(t.name)] for t in s.threads],
        "streams": [[st.device, text(st.label)] for st in s.streams],
        "devices": [[d.index, text(d.name)] for d in s.devices],
        "args": s.args,
        "meta": metadata.to_json(s.meta),
    }


def _columns(r: np.ndarray) -> dict[str, np.ndarray]:
    """The region columns as differences (small numbers, which gzip packs well)."""
    hs, he, ds, de = (r[k].astype(np.int64) for k in ("host_start", "host_end", "dev_start", "dev_end"))
    return {
        "name": r["name"],
        "thread": r["thread"],
        "host_start": np.diff(hs, prepend=np.int64(0)),
        "host_dur": he - hs,
        "device": r["device"],
        "stream": r["stream"],
        "dev_after": ds - hs,
        "dev_dur": de - ds,
    }


def _narrow(a: np.ndarray) -> np.ndarray:
    for t in (np.int8, np.int16, np.int32):
        info = np.iinfo(t)
        if not len(a) or (a.min() >= info.min and a.max() <= info.max):
            return a.astype(t)
    return a.astype(np.int64)


def _evtrace_fields(s: Session, label: str) -> Iterator[bytes]:
    """One session for ``load``: a JSON header (with each column's dtype), then the columns."""
    cols = {k: _narrow(v) for k, v in _columns(s.regions).items()}
    head = {
        "format": FORMAT,
        "label": label,
        **_own(s),
        "columns": [[k, v.dtype.str] for k, v in cols.items()],
    }
    tag = _v(EVTRACE_FIELD << 3 | 2)
    data = orjson.dumps(head, default=lambda o: text(repr(o)), option=orjson.OPT_NON_STR_KEYS)
    yield tag + _v(len(data)) + data
    for v in cols.values():
        raw = v.astype(v.dtype.newbyteorder("<")).tobytes()
        yield tag + _v(len(raw)) + raw


def _chunks(s: Session) -> Iterator[bytes]:
    ranks = s.ranks or [s]
    top = {
        "format": FORMAT,
        "merged": bool(s.ranks),
        "ranks": len(ranks),
        "profiler": s.profiler,
        "meta": metadata.to_json(s.meta),
    }
    tag = _v(EVTRACE_FIELD << 3 | 2)
    data = orjson.dumps(top, default=lambda o: text(repr(o)))
    seq = _f(10, SEQ)
    clocks = _m(1, _f(1, BOOTTIME) + _f(2, 0)) + _m(1, _f(1, CLOCK) + _f(2, 0) + _f(3, 1))
    # first a packet (Perfetto tells a protobuf trace by its first byte): the sequence's clock
    # snapshot, with the incremental state cleared
    yield _m(1, _m(6, clocks) + seq + _f(13, 1))
    yield tag + _v(len(data)) + data
    labels = rank_labels(s.ranks) if s.ranks else [""]
    for label, r in zip(labels, ranks):
        yield from _evtrace_fields(r, label)
    # the sequence: its clock, interned names, tracks; then the events in time order
    ev = _Events()
    tracks: list[bytes] = []
    names: dict[str, int] = {}
    argnames = _ArgNames()
    args = _Args()
    doubles: set[int] = set()
    uuid, flow = 1, 0
    for i, (label, r) in enumerate(zip(labels, ranks)):
        if s.ranks:
            base = HOST_PID_BASE + i * PIDS_PER_INPUT
            where = Place(base, base + 1, label + " · ", i * 100, flow)
        else:
            where = place(r)
        uuid = _session_events(r, where, ev, tracks, names, argnames, args, doubles, uuid)
        flow += len(r)
    meta_uuid = uuid
    tracks.append(_track(meta_uuid, _m(2, b"evtrace metadata")))
    uuid += 1
    flat = metadata.flat(s.meta)
    if s.ranks:
        for label, r in zip(labels, ranks):
            flat.update({f"{label}.{k}": v for k, v in metadata.flat(r.meta).items()})
    meta_ann = b"".join(_m(4, _annotation(argnames(k), v)) for k, v in flat.items())
    ordered = ev.ordered()
    # the sequence clock counts from t0, the earliest time (the origin, or a span before it), as
    # BOOTTIME 0: times since the origin as the JSON's, shifted only where some lie before it
    t0 = min(int(ordered["ts"][0]) if len(ordered["ts"]) else 0, 0)
    meta_iid = len(names) + 1
    interned = b"".join(_m(2, _f(1, i) + _m(2, n.encode())) for n, i in names.items())
    interned += _m(2, _f(1, meta_iid) + _m(2, b"evtrace")) + argnames.interned()
    yield _m(1, seq + _f(13, 2) + _m(59, _f(58, CLOCK)) + _m(12, interned))
    yield b"".join(tracks)
    # the metadata: one instant at t0, the sequence's first event
    yield _m(1, _f(8, 0) + seq + _m(11, _f(9, _INSTANT) + _f(11, meta_uuid) + _f(10, meta_iid) + meta_ann))
    yield from _packets(ordered, t0, args, np.array(sorted(doubles), np.int64))
    if s.profiler:
        yield b"".join(_profiler_packets(s.profiler, uuid, -t0))


def save(s: Session, path: Path) -> Path:
    """Write ``s`` as TrackEvent protobuf, gzipped when ``path`` ends in ``.gz`` (Perfetto reads
    that as it is); atomic (``files.write_bytes``)."""
    return write_bytes(_chunks(s), path)


# ---- reading ----


def _fields(stream: Iterator[bytes]) -> Iterator[bytes]:
    """The evtrace fields near the head of a Trace message: after its first packet (or
    packets), up to the next one."""
    buf = bytearray()
    it = iter(stream)
    done = False

    def need(n: int) -> bool:
        nonlocal done
        while len(buf) < n and not done:
            try:
                buf.extend(next(it))
            except StopIteration:
                done = True
        return len(buf) >= n

    pos = 0
    seen = False
    while True:
        if not need(pos + 10) and pos >= len(buf):
            return
        tag, pos2 = _read_varint(buf, pos)
        if tag != EVTRACE_FIELD << 3 | 2 and (seen or tag != 0x0A):
            return
        length, pos3 = _read_varint(buf, pos2)
        if not need(pos3 + length):
            raise ValueError("the file ends inside evtrace's data")
        if tag != 0x0A:
            seen = True
            yield bytes(buf[pos3 : pos3 + length])
        del buf[: pos3 + length]
        pos = 0


def _read_varint(buf: bytearray, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("a truncated varint")
        b = buf[pos]
        n |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return n, pos
        shift += 7


def _raw(path: Path) -> Iterator[bytes]:
    """The file's bytes in pieces, inflated where it is gzipped (only as far as they are read)."""
    with open(path, "rb") as f:
        first = f.read(1 << 20)
        if first[:2] == b"\x1f\x8b":
            z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            piece = first
            while piece:
                yield z.decompress(piece)
                piece = f.read(1 << 22)
            return
        piece = first
        while piece:
            yield piece
            piece = f.read(1 << 22)


def _session(head: dict[str, Any], cols: list[bytes]) -> Session:
    n = int(head["n"])
    c = {k: np.frombuffer(raw, np.dtype(dt)).astype(np.int64) for (k, dt), raw in zip(head["columns"], cols)}
    if any(len(v) != n for v in c.values()):
        raise ValueError("a column's length is not the number of regions")
    r = np.zeros(n, REGION_DTYPE)
    hs = np.cumsum(c["host_start"])
    r["name"], r["thread"], r["device"], r["stream"] = c["name"], c["thread"], c["device"], c["stream"]
    r["host_start"], r["host_end"] = hs, hs + c["host_dur"]
    r["dev_start"] = hs + c["dev_after"]
    r["dev_end"] = r["dev_start"] + c["dev_dur"]
    return Session(
        regions=r,
        names=[str(x) for x in head["names"]],
        threads=[Thread(int(t), str(nm)) for t, nm in head["threads"]],
        devices=[DeviceInfo(int(i), str(nm)) for i, nm in head["devices"]],
        streams=[Stream(int(d), str(lb)) for d, lb in head["streams"]],
        args={int(i): a for i, a in head["args"].items()},
        meta=metadata.from_json(head["meta"]),
        pid=int(head["pid"]),
        wall_origin_ns=int(head["wall_origin_ns"]),
    )


def read(path: Path) -> Session:
    """Rebuild the Session of a ``.pftrace`` evtrace wrote, from its evtrace fields alone."""
    try:
        fields = _fields(_raw(path))
        first = next(fields, None)
        if first is None:
            raise TraceError(f"{path} is not an evtrace trace (no evtrace data before its first packet)")
        top = orjson.loads(first)
        if not isinstance(top, dict) or top.get("format") not in READ:
            raise TraceError(
                f"{path} was written by another evtrace, which this evtrace cannot read; upgrade evtrace"
            )
        ranks = []
        for _ in range(int(top["ranks"])):
            head = orjson.loads(next(fields))
            cols = [next(fields) for _ in head["columns"]]
            ranks.append(_session(head, cols))
    except OSError as e:
        raise TraceError(f"cannot read {path}: {e.strerror or e}") from None
    except (EOFError, zlib.error, gzip.BadGzipFile):
        raise TraceError(f"{path} is not a complete gzip file (truncated or corrupt)") from None
    except (ValueError, KeyError, TypeError, StopIteration, orjson.JSONDecodeError) as e:
        raise TraceError(
            f"{path} is an evtrace .pftrace with damaged data ({type(e).__name__}: {e})"
        ) from None
    if top["merged"]:
        s = Session.combine(ranks, {})
        s.meta = metadata.from_json(top["meta"])
    else:
        s = ranks[0]
    s.profiler = list(top.get("profiler") or [])
    return s
