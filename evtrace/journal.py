"""The journal: a recording on disk while it runs, so that a run that ends badly keeps it.

While a session records to PATH, the core's writer thread (``evtrace/_core/journal.c``)
appends to the folder ``PATH.journal`` at least every ``FLUSH_S``: the rows finished since the
last flush, the anchors and streams the alignment needs, and a snapshot of the regions open on
each thread and of those waiting for the device. Names, thread names and stream labels come
from Python as notes, once each, before any row uses them. ``max_regions`` bounds it as it does
the ring: segments of rows go oldest first. Once the trace is written the journal gets a
"finished" record and is removed.

``recover`` reads it back, from a live process (read only: the writer never waits for a reader)
or a dead one, and builds the Session a normal stop would have built (``evtrace.build``): the
regions open at the last flush end there, marked unfinished; those still waiting for the device
keep their host spans, counted. A record a kill cut short, or a damaged one, is skipped and
counted in bytes; every complete record stands.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from . import _core, metadata
from .device import DeviceInfo
from .files import TraceError
from .session import Session, Thread

__all__ = [
    "FLUSH_S",
    "SUFFIX",
    "VERSION",
    "Journal",
    "claim",
    "note",
    "read",
    "recover_hint",
    "recover_session",
    "remove",
]

#: folder name: the trace's path plus this
SUFFIX = ".journal"
#: the journal's format; another is refused with one line
VERSION = 1
#: between flushes: a region finished this long before a kill is on disk
FLUSH_S = 0.5
#: regions in one segment of rows, at most (and at least a chunk's): the unit the ring drops
SEGMENT_ROWS = 1 << 18

_MAGIC = 0xE7
_HEADER, _NOTE, _ANCHORS, _STREAMS, _FINISHED, _FLUSH = 1, 2, 3, 4, 5, 6
_HEAD = struct.Struct("<BBII")
_ANCHOR = np.dtype([("lo", "<i8"), ("hi", "<i8"), ("ms", "<f8")])
#: why a region has no device span, in the core's order (``lost`` of a flush record)
_WHY = (
    "event_pool_exhausted",
    "record_refused",
    "graph_capture",
    "device_call_failed",
    "device_not_seen_at_start",
    "unreadable_event",
    "split_over_devices",
)
#: the regions finished on the host that the device had not reached at the last flush
UNRESOLVED = "unresolved_when_journaled"


def claim(trace: Path) -> Path:
    """A new, empty journal folder for the trace at ``trace``: ``trace.journal``, or ``-2``,
    ``-3``... while an older one (a crashed run's, not yet recovered) is there."""
    for n in range(1, 10_000):
        d = trace.with_name(trace.name + SUFFIX + (f"-{n}" if n > 1 else ""))
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise FileExistsError(f"{trace}{SUFFIX}: too many journals beside it")


def recover_hint(folder: Path) -> str:
    """The command that rebuilds a trace from a journal."""
    return f"evtrace recover {shlex.quote(str(folder))}"


def remove(folder: Path) -> None:
    """Remove a journal folder (its session's trace is written)."""
    shutil.rmtree(folder, ignore_errors=True)


def note(kind: str, value: Any) -> bytes:
    """A catalog note: ``{"name": [key, text]}``, ``{"thread": [tid, name]}`` or
    ``{"stream": [device, handle, label]}``."""
    return dumps({kind: value})


def dumps(value: Any) -> bytes:
    """JSON for the catalog: the standard library's, which keeps a name's lone surrogates (as
    ``\\udXXX`` escapes), where orjson refuses them; read back with ``json.loads``. Off the hot path."""
    return json.dumps(value, separators=(",", ":")).encode()


def _records(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """The complete records of one file, and the bytes skipped: a torn tail, or a damaged
    stretch (found again at the next record whose length and CRC hold)."""
    out: list[tuple[int, bytes]] = []
    skipped = 0
    at, n = 0, len(data)
    while at < n:
        if n - at >= _HEAD.size:
            magic, typ, size, crc = _HEAD.unpack_from(data, at)
            end = at + _HEAD.size + size
            if magic == _MAGIC and end <= n:
                payload = data[at + _HEAD.size : end]
                if zlib.crc32(payload) == crc:
                    out.append((typ, payload))
                    at = end
                    continue
        nxt = data.find(bytes([_MAGIC]), at + 1)
        nxt = n if nxt < 0 else nxt
        skipped += nxt - at
        at = nxt
    return out, skipped


def _varints(b: bytes, at: int, count: int) -> tuple[list[int], int]:
    out = []
    for _ in range(count):
        v = shift = 0
        while True:
            byte = b[at]
            at += 1
            v |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        out.append(v)
    return out, at


@dataclass
class _Rows:
    """Rows as the core's ``take()`` gives them: packed rows, and for those with args their
    index and the end of their JSON text in ``blob``."""

    rows: bytes
    at: bytes
    end: bytes
    blob: bytes


@dataclass
class Journal:
    """What a journal holds, read back."""

    path: Path
    header: dict[str, Any]
    names: dict[int, str] = field(default_factory=dict)
    threads: list[Thread] = field(default_factory=list)
    labels: dict[tuple[int, int], str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # metadata known while recording (rank clocks)
    streams: list[tuple[int, int]] = field(default_factory=list)
    anchors: dict[int, list[np.ndarray]] = field(default_factory=dict)
    rows: list[_Rows] = field(default_factory=list)
    open: _Rows | None = None
    pending: _Rows | None = None
    lost: dict[str, int] = field(default_factory=dict)
    captured: int = 0
    at_ns: int = 0  # the moment of the last flush, on the session's clock
    flushes: int = 0
    dropped: int = 0  # rows of segments the ring dropped
    skipped: int = 0  # bytes of torn or damaged records
    finished: dict[str, Any] | None = None


def read(path: Path) -> Journal:
    """Read a journal folder (or its catalog). Raises TraceError with one line on what is not one."""
    d = path.parent if path.name == "catalog" else path
    try:
        catalog = (d / "catalog").read_bytes()
    except FileNotFoundError:
        raise TraceError(f"{path} is not an evtrace journal (no {d / 'catalog'})") from None
    except OSError as e:
        raise TraceError(f"could not read {d / 'catalog'}: {e.strerror or e}") from None
    records, skipped = _records(catalog)
    if not records or records[0][0] != _HEADER:
        raise TraceError(f"{d} is not an evtrace journal (its catalog has no header)")
    try:
        header = json.loads(records[0][1])
    except ValueError:
        raise TraceError(f"{d} is not an evtrace journal (its header does not parse)") from None
    if not isinstance(header, dict) or header.get("format") != "evtrace-journal":
        raise TraceError(f"{d} is not an evtrace journal")
    if header.get("version") != VERSION:
        raise TraceError(
            f"{d} is an evtrace journal of format {header.get('version')} (evtrace "
            f"{header.get('evtrace', '?')}); this evtrace reads format {VERSION}: "
            "recover it with that version"
        )
    j = Journal(d, header, skipped=skipped)
    j.names = dict(enumerate(header.get("names", [])))
    j.threads = [Thread(int(t), str(n)) for t, n in header.get("threads", [])]
    for dev, s, label in header.get("labels", []):
        j.labels[(int(dev), int(s))] = str(label)
    j.meta = dict(header.get("meta", {}))
    for typ, payload in records[1:]:
        if typ == _NOTE:
            n = json.loads(payload)
            if "name" in n:
                j.names[int(n["name"][0])] = str(n["name"][1])
            elif "thread" in n:
                j.threads.append(Thread(int(n["thread"][0]), str(n["thread"][1])))
            elif "stream" in n:
                dev, s, label = n["stream"]
                j.labels[(int(dev), int(s))] = str(label)
            elif "meta" in n:
                j.meta.update(n["meta"])
        elif typ == _ANCHORS:
            (dev, count), at = _varints(payload, 0, 2)
            j.anchors.setdefault(dev, []).append(np.frombuffer(payload, _ANCHOR, count, at))
        elif typ == _STREAMS:
            (first, count), at = _varints(payload, 0, 2)
            pairs, _ = _varints(payload, at, 2 * count)
            del j.streams[first:]
            j.streams += list(zip(pairs[::2], pairs[1::2]))
        elif typ == _FINISHED:
            j.finished = json.loads(payload)
    segments = sorted(d.glob("rows-*"))
    for seg in segments:
        try:
            data = seg.read_bytes()
        except FileNotFoundError:  # the writer dropped it meanwhile (the ring): it is older
            continue
        recs, skipped = _records(data)
        j.skipped += skipped
        for typ, payload in recs:
            if typ != _FLUSH:
                continue
            try:
                flush, before, hrows, drows, opened, pending, lost, captured, at = _core.read_flush(payload)
            except ValueError:
                j.skipped += len(payload) + _HEAD.size
                continue
            if not j.flushes:
                j.dropped = int(before)
            j.rows += [_Rows(*hrows), _Rows(*drows)]
            j.open, j.pending = _Rows(*opened), _Rows(*pending)
            j.lost = {w: int(n) for w, n in zip(_WHY, lost) if n}
            j.captured, j.at_ns, j.flushes = int(captured), int(at), j.flushes + 1
    return j


class _Backend:
    """What building a Session asks of a backend, from the journal."""

    def __init__(self, j: Journal) -> None:
        self.devices = [DeviceInfo(int(i), str(n)) for i, n in j.header.get("devices", [])]
        self._labels = j.labels

    def stream_label(self, device: int, stream: int) -> str:
        return self._labels.get((device, stream)) or f"stream {stream:#x}"


class _Recovered:
    """A stopped recorder's face (what ``evtrace.build.session`` reads), from a journal."""

    def __init__(self, j: Journal) -> None:
        from .recorder import LIVE_DTYPE

        h = j.header
        self.backend = _Backend(j) if h.get("devices") else None
        self.origin_ns = int(h["origin_ns"])
        self.wall_origin_ns = int(h["wall_origin_ns"])
        self.argv = list(h.get("argv", []))
        self.share_ns = int(h.get("share_ns", 0))
        self.pid = int(h.get("pid", 0))
        self.dropped_regions = j.dropped
        self._env = dict(h.get("environment", {}))
        self._j = j
        parts: list[np.ndarray] = []
        self._args: dict[int, dict[str, Any]] = {}
        base = 0

        def add(r: _Rows, end: int | None = None, extra: dict[str, Any] | None = None) -> None:
            nonlocal base
            rows = np.frombuffer(r.rows, LIVE_DTYPE).copy()
            if end is not None:
                rows["host_end"] = np.maximum(rows["host_start"], end)
            at, ends = np.frombuffer(r.at, np.int64), np.frombuffer(r.end, np.int64)
            starts = np.r_[0, ends[:-1]].tolist()
            with_args = dict(zip(at.tolist(), zip(starts, ends.tolist())))
            for i in range(len(rows)) if extra else with_args:
                a, b = with_args.get(i, (0, 0))
                args = orjson.loads(r.blob[a:b]) if b > a else {}
                self._args[base + i] = {**args, **extra} if extra else args
            parts.append(rows)
            base += len(rows)

        for r in j.rows:
            add(r)
        self.unfinished = 0
        if j.open is not None:
            self.unfinished = len(j.open.rows) // LIVE_DTYPE.itemsize
            add(j.open, end=j.at_ns, extra={"unfinished": True})
        self._unresolved = 0
        if j.pending is not None:
            self._unresolved = len(j.pending.rows) // LIVE_DTYPE.itemsize
            add(j.pending)
        self._live = np.concatenate(parts) if parts else np.empty(0, LIVE_DTYPE)

    def counts(self) -> dict[str, Any]:
        lost = dict(self._j.lost)
        if self._unresolved:
            lost[UNRESOLVED] = self._unresolved
        return dict(lost=lost, captured=self._j.captured, resolver_errors=[])

    def finished(self) -> tuple[np.ndarray, dict[int, dict[str, Any]]]:
        return self._live, self._args

    def anchors(self, device: int) -> list[tuple[int, int, float]]:
        parts = self._j.anchors.get(device)
        if not parts:
            return []
        a = np.concatenate(parts)
        return list(zip(a["lo"].tolist(), a["hi"].tolist(), a["ms"].tolist()))

    def streams(self) -> list[tuple[int, int]]:
        return list(self._j.streams)

    def threads(self) -> list[Thread]:
        return list(self._j.threads)

    def name_of(self, key: int) -> str:
        return self._j.names.get(key, f"(name {key} lost)")

    def environment(self, devices: list[DeviceInfo]) -> dict[str, Any]:
        return dict(self._env)


def recover_session(j: Journal) -> Session:
    """The Session of a journal, aligned as a normal stop would have aligned it."""
    from .build import session

    rec = _Recovered(j)
    s = session(rec, j.at_ns)
    s.meta.update(metadata.from_json(j.meta))
    s.meta["recovered"] = {
        "journal": str(j.path),
        "flushes": j.flushes,
        "skipped_bytes": j.skipped,
        "unresolved_device_spans": rec._unresolved,
    }
    return s


def say(line: str) -> None:
    print(f"evtrace: {line}", file=sys.stderr)


def owner_alive(j: Journal) -> bool:
    """Whether the process that writes this journal still runs (on this host)."""
    pid = int(j.header.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
