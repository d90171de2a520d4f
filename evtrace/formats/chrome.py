"""Chrome trace-event JSON (``.json``, ``.json.gz``) as Perfetto imports it: the writer, and the
reader of what it wrote (``shared/TRACE_FORMAT.md``).

The trace file *is* the save format: Perfetto shows its events and flat metadata, and the
``evtrace.*`` metadata entries hold what loading needs. Anything that is not such a trace raises
:class:`~evtrace.files.TraceError`. The lanes (which slice goes where) come from ``evtrace.lanes``,
shared with the Perfetto protobuf writer. Times are integer ns since the session origin, written as
µs with three decimals. Every lane gets all four M events.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson

from .. import metadata
from ..device import DeviceInfo
from ..files import TraceError, read_json, write_bytes
from ..lanes import (
    HOST_PID_BASE,
    PIDS_PER_INPUT,
    PROFILER_PID,
    Lanes,
    Place,
    in_flight,
    lane_list,
    lane_meta,
    place,
)
from ..metadata import json_value, text
from ..session import REGION_DTYPE, Session, Stream, Thread, rank_labels

#: the format written; READ, the formats read (1 named the alignment's slack ``bound_us_*``:
#: ``metadata.DeviceAlignment.from_mapping`` reads either name)
FORMAT = 2
READ = (1, 2)
OWN_ARGS = ("region", "host_dur_us", "device_dur_us", "launch_delay_us")


def save(s: Session, path: Path) -> Path:
    """Write ``s`` as JSON, gzipped when ``path`` ends in ``.gz``; atomic (``files.write_bytes``)."""
    return write_bytes(_chunks(s), path)


def _meta_events(s: Session, lanes: Lanes, where: Place) -> list[dict[str, Any]]:
    """All four M events for every lane: host first, then GPU 0, 1, ...; extra lanes after theirs."""
    return [ev for lane in lane_list(s, lanes, where) for ev in lane_meta(*lane)]


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


def _slices(s: Session, lanes: Lanes, where: Place) -> Iterator[bytearray]:
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
    pid, flow = where.host_pid, where.flow + 1  # flow ids: unique in the whole file, never 0
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


def _counters(s: Session, where: Place) -> Iterator[bytearray]:
    """Per GPU: outermost regions launched but not finished on the device (how far the host runs
    ahead, as a queue depth), and each one's host lead (device start - host launch)."""
    matrix = _Matrix()
    for d in np.unique(s.regions["device"][s.regions["device"] >= 0]).tolist():
        g, t, depth = in_flight(s, d)
        pid = where.dev_pid + d
        head = b'{"ph":"C","name":"%s","pid":%d,"tid":1,"ts":'
        for lo, hi in _blocks(len(t), 100):
            parts: list[_Part] = [_us(t[lo:hi]), b',"args":{"regions":', _int(depth[lo:hi]), b"}}"]
            yield matrix.text(hi - lo, [head % (b"regions in flight", pid), *parts])
        for lo, hi in _blocks(len(g), 100):
            h0, d0 = g["host_start"][lo:hi], g["dev_start"][lo:hi]
            parts = [_us(h0), b',"args":{"us":', _us(d0 - h0), b"}}"]
            yield matrix.text(hi - lo, [head % (b"host lead", pid), *parts])


def _own(s: Session, lanes: Lanes) -> dict[str, Any]:
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


def _events(s: Session, lanes: Lanes, where: Place, comma: bool) -> Iterator[bytes | bytearray]:
    """One session's events as comma-separated JSON text in chunks; ``comma``: one before the first."""
    head = orjson.dumps(_meta_events(s, lanes, where))[1:-1]
    if head:
        yield b"," + head if comma else head
        comma = True
    for piece in itertools.chain(_slices(s, lanes, where), _counters(s, where)):
        if not comma:  # each event there comes after a comma
            del piece[:1]  # (from the front of a bytearray: no copy)
            comma = True
        yield piece


def _chunks(s: Session) -> Iterator[bytes | bytearray]:
    """The whole document, streamed: M events, X events, then the metadata."""
    if s.ranks:
        yield from _merged_chunks(s)
        return
    lanes = Lanes(s)
    meta = metadata.flat(s.meta)
    meta.update({"evtrace.format": FORMAT, **{f"evtrace.{k}": v for k, v in _own(s, lanes).items()}})
    yield b'{"traceEvents":['
    sep = b""
    for chunk in _events(s, lanes, place(s), False):
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
        lanes = Lanes(r, base + 1)
        for chunk in _events(r, lanes, Place(base, base + 1, label + " · ", i * 100, flow), sep == b","):
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


def trace_bytes(s: Session) -> bytes:
    """The whole trace document of ``s`` (uncompressed JSON)."""
    return b"".join(_chunks(s))


# ---- the trace file: reading ----


def read_slow(path: Path) -> Session:
    """Rebuild a Session from a trace evtrace wrote (a merged one: with its ``ranks``)."""
    doc = read_json(path)
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    if (
        not isinstance(meta, dict)
        or not isinstance(doc.get("traceEvents"), list)
        or "evtrace.format" not in meta
    ):
        if isinstance(meta, dict) and "evtrace" in meta:  # evtrace's version, but no format yet
            raise TraceError(f"{path} was written by a pre-release evtrace, which this evtrace cannot read")
        raise TraceError(f"{path} is not an evtrace trace (no evtrace metadata)")
    if meta["evtrace.format"] not in READ:
        raise TraceError(
            f"{path} was written by evtrace {meta.get('evtrace', '(unknown version)')}, "
            "which this evtrace cannot read; upgrade evtrace"
        )
    if not isinstance(meta.get("evtrace.meta"), dict):
        raise TraceError(f"{path} was written by a pre-release evtrace, which this evtrace cannot read")
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
        s = _rebuild(evs, rank_meta(info, meta))
        s.pid = int(info["pid"])
        ranks.append(s)
    return combined(ranks, meta)


def rank_meta(info: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """A merged trace's metadata for one rank (``info``: its entry in ``evtrace.ranks``), as a
    single recording's trace has it: the keys under its label, and its own ``evtrace.*``."""
    label = str(info["label"]) + "."
    own = {f"evtrace.{k}": v for k, v in info.items() if k not in ("label", "pid_base")}
    mine = {k[len(label) :]: v for k, v in meta.items() if k.startswith(label)}
    return {**mine, **own, "evtrace.pid": info["pid_base"]}


def combined(ranks: list[Session], meta: dict[str, Any]) -> Session:
    """A merged trace's ranks as one Session again, with the merge's own metadata (both readers
    refuse a trace without ``evtrace.meta``)."""
    merged = Session.combine(ranks, {})
    merged.meta = metadata.from_json(meta["evtrace.meta"])
    return merged


def us_ns(us: Any) -> int:
    """A trace's µs (a JSON number) as integer ns."""
    return int(round(float(us) * 1000))


class Header(NamedTuple):
    """What a recording's metadata says of its lanes, as both readers need it."""

    pid: int  # its host lanes' pid
    parent: dict[int, int]  # an extra (overlap or depth) lane's tid -> its thread's tid
    streams: list[Stream]
    devices: list[DeviceInfo]


def header(meta: dict[str, Any]) -> Header:
    return Header(
        int(meta["evtrace.pid"]),
        {int(a): int(b) for a, b in meta.get("evtrace.overlap_lanes", [])},
        [Stream(int(d), str(label)) for d, label in meta.get("evtrace.streams", [])],
        [DeviceInfo(int(i), str(n)) for i, n in meta.get("evtrace.devices", [])],
    )


def _rebuild(events: list[Any], meta: dict[str, Any]) -> Session:
    pid, parent, streams, devices = header(meta)
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

    for i in range(n):
        h = hosts[i]
        row = regions[i]
        row["name"] = names.setdefault(h["name"], len(names))
        row["thread"] = thread_ix[parent.get(h["tid"], h["tid"])]
        row["host_start"] = us_ns(h["ts"])
        row["host_end"] = us_ns(h["ts"]) + us_ns(h["dur"])
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
            row["dev_start"] = us_ns(d["ts"])
            row["dev_end"] = us_ns(d["ts"]) + us_ns(d["dur"])
    typed = metadata.from_json(meta["evtrace.meta"])
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
