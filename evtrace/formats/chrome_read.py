"""Reading back a Chrome JSON trace evtrace wrote, in bulk: no Python object per event.

evtrace's writer lays each X and C event out in a fixed key order from numpy columns (see
``session._slices`` and ``session._counters``), one after another, each led by a comma. This reader
inflates the file in blocks, splits each block at the ``,{"ph":"`` that starts an event, and checks
and parses the events of that layout with numpy: each field lies between two commas, its literal is
compared eight bytes at a time, and its number is parsed eight digits at a time (SWAR). A region's
user args are parsed with orjson, one call a region that has some.

Correctness never rests on the fast path. Each piece of text between two event starts is either
checked completely against the layout (every byte: the literals, the numbers, the name as a JSON
string, the args as a JSON object) or parsed by orjson (a run of such pieces at once: the M events,
profiler lanes, anything edited by hand), so the events read are those orjson reads. Anything the
fast path does not expect (a damaged file, a region id twice, an unknown lane, another shape of
document) reads the file again the way evtrace always did (``_read_slow``), which gives the same
Session or the same TraceError.
"""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson

from .. import metadata
from ..files import Progress
from ..lanes import HOST_PID_BASE, PIDS_PER_INPUT, PROFILER_PID
from ..session import REGION_DTYPE, Session, Thread
from .chrome import OWN_ARGS, READ, combined, header, rank_meta, us_ns
from .chrome import read_slow as _read_slow

__all__ = ["read"]

# The scanner in C (evtrace/_scan.c) checks and parses the layout in one pass over the text; the
# numpy path below does the same in bulk, slower, where a build lacks it (the same Session either
# way: tests/test_read_fast.py reads through both).
_Scan = Callable[[bytes, int, int], tuple[bytes, bytes, bytes, bytes, bytes]]
_scan: _Scan | None
try:
    from .._scan import scan as _native_scan

    _scan = _native_scan
except ImportError:  # pragma: no cover  (a build without the extension)
    _scan = None

#: inflated text parsed at once: 16 MB of host events is ~130k, whose columns and temporaries fit
#: in a few tens of MB; larger blocks measured no faster (fewer numpy calls, more cache misses)
BLOCK = 16 << 20
NAME_COMMAS = 4  # names with more commas than this are read by orjson
IN_PIECE = 1 << 20  # compressed bytes inflated at a time (trace text inflates ~20x: ~20 MB)
HEADER = b'{"traceEvents":['
TAIL = b'],"displayTimeUnit":'  # what the writer puts after the last event
PAD = 32  # zero bytes around a block, so that 8-byte reads near its ends stay inside
AHEAD = 2  # inflated pieces waiting for the parser: memory bounded, and the inflater never idle

_U64 = np.dtype("<u8")
_ZEROS = np.uint64(0x3030303030303030)  # "00000000"
_HIGH = np.uint64(0xF0F0F0F0F0F0F0F0)
_SIXES = np.uint64(0x0606060606060606)
# n digits right-aligned in 8 bytes: keep the top n bytes (_KEEP[n]), fill the rest with "0"
_KEEP = np.array([0] + [(~0 << (8 * (8 - n))) & (2**64 - 1) for n in range(1, 9)], np.uint64)
_FILL = np.array([0x3030303030303030 & ~int(k) for k in _KEEP], np.uint64)
_ALL = np.uint64(2**64 - 1)
_SCANNED = ((0, "region"), (2, "pid"), (3, "tid"), (4, "ts"), (5, "dur"))  # the scanner's row, kept
_OWN = frozenset(OWN_ARGS)


_Fields = dict[str, np.ndarray]


class _Fallback(Exception):
    """The fast path met something it does not expect: read the file the general way."""


def read(path: Path) -> Session:
    """Rebuild a Session from a trace evtrace wrote (a merged one: with its ``ranks``)."""
    try:
        return _Reader(path).read()
    except _Fallback:
        return _read_slow(path)


# ---- the text, in blocks ----


def _inflated(path: Path) -> Iterator[bytes]:
    """The file's text in pieces, inflated where gzipped. Anything but one complete gzip member
    (or plain text) is left to the general path, whose messages say what is wrong."""
    try:
        f = open(path, "rb")  # noqa: SIM115  # closed below, generator-style
    except OSError:
        raise _Fallback from None
    with f:
        head = f.read(2)
        if head != b"\x1f\x8b":
            yield head
            while piece := f.read(BLOCK):
                yield piece
            return
        z = zlib.decompressobj(31)
        data = head + f.read(IN_PIECE)
        try:
            while data:
                out = z.decompress(data)
                if out:
                    yield out
                if z.eof:
                    break
                data = f.read(IN_PIECE)
        except zlib.error:
            raise _Fallback from None
        if not z.eof or z.unused_data or f.read(1):  # truncated, or several members
            raise _Fallback


def _ahead(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """``pieces``, made on a thread a few ahead: inflating (zlib lets go of the GIL) runs on one
    core while the events are parsed on the other. Its errors come out here, in order."""
    q: queue.Queue[Any] = queue.Queue(maxsize=AHEAD)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def run() -> None:
        try:
            for piece in pieces:
                put(piece)
                if stop.is_set():
                    return
            put(end)
        except BaseException as e:  # noqa: BLE001  # handed to the reader, which raises it
            put(e)

    t = threading.Thread(target=run, name="evtrace-inflate", daemon=True)
    t.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # not joined: a Ctrl-C may come while it waits on a file (a FIFO) that never ends
        stop.set()  # it stops at its next piece, and as a daemon never holds up the exit


class _Text(NamedTuple):
    """A block of the events' text: ``data[lo]`` is the comma (or the array's ``[``) before its
    first event and ``data[hi]`` the one after its last (or the array's ``]``); ``data`` has at
    least PAD bytes beyond both. With the last block, the document's tail after the events."""

    data: bytes
    lo: int
    hi: int
    tail: Any


def _blocks(path: Path, progress: Progress) -> Iterator[_Text]:
    """The events' text in blocks of about BLOCK bytes, cut before an event's start; each copied
    once (joined from the inflated pieces)."""
    pad = bytes(PAD)
    pending = b""  # after the last cut: from a ',{"ph":"' on
    pieces: list[bytes] = []
    size = got = 0
    first = True
    for piece in _ahead(_inflated(path)):
        got += len(piece)
        progress.update(f"{got / 1e6:.0f} MB of JSON so far")
        pieces.append(piece)
        size += len(piece)
        if size < BLOCK:
            continue
        data = b"".join([pad, pending, *pieces, pad])
        pieces, size = [], 0
        lo = PAD
        if first:
            if data[PAD : PAD + len(HEADER)] != HEADER:
                raise _Fallback
            lo, first = PAD + len(HEADER) - 1, False
        hi = data.rfind(b',{"ph":"', lo + 1, len(data) - PAD)
        if hi < 0:  # no event starts in it: wait for more
            pending = data[PAD:-PAD]
            continue
        yield _Text(data, lo, hi, None)
        pending = data[hi:-PAD]
    data = b"".join([pad, pending, *pieces, pad])
    lo = PAD
    if first:
        if data[PAD : PAD + len(HEADER)] != HEADER:
            raise _Fallback
        lo = PAD + len(HEADER) - 1
    hi, tail = _split_tail(data, lo)
    if hi == lo + 1 and data[lo] == ord(","):  # "...},]": not JSON
        raise _Fallback
    yield _Text(data, lo, hi, tail)


def _split_tail(data: bytes, lo: int) -> tuple[int, Any]:
    """Where the events end, and the document's tail after them (parsed): at the last
    ``],"displayTimeUnit":`` that begins a valid end of the document (one later, inside the
    metadata, would leave it unbalanced)."""
    p = len(data) - PAD
    while (p := data.rfind(TAIL, lo, p)) >= 0:
        try:
            tail = orjson.loads(b"{" + data[p + 2 : len(data) - PAD])
        except orjson.JSONDecodeError:
            continue
        if not isinstance(tail, dict) or "traceEvents" in tail:
            break
        return p, tail
    raise _Fallback


# ---- numbers and literals, many at once ----


def _word(text: bytes) -> tuple[np.uint64, np.uint64]:
    """Up to 8 bytes as a little-endian word, and the mask of its bytes."""
    return np.uint64(int.from_bytes(text, "little")), np.uint64((1 << (8 * len(text))) - 1)


class _Block:
    """One block of events: its bytes (zero-padded), an 8-byte view at every offset, its commas."""

    def __init__(self, t: _Text) -> None:
        self.data, self.lo = t.data, t.lo
        self.a = np.frombuffer(t.data, np.uint8)
        self.w = np.ndarray((len(self.a) - 7,), _U64, self.a, 0, (1,))  # unaligned: any offset
        # the separator before the first event, every comma, and the end of the last event
        self.c = np.r_[t.lo, np.flatnonzero(self.a[t.lo + 1 : t.hi] == ord(",")) + (t.lo + 1), t.hi]

    def lit(self, pos: np.ndarray, text: bytes) -> np.ndarray:
        """Whether the bytes at each ``pos`` are ``text``."""
        ok: np.ndarray | None = None
        for k in range(0, len(text), 8):
            word, mask = _word(text[k : k + 8])
            x = self.w[pos + k]
            good = (x if mask == _ALL else x & mask) == word
            ok = good if ok is None else ok & good
        assert ok is not None
        return ok

    def digits(self, end: np.ndarray, n: np.ndarray, value: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The n (1..8) bytes before each ``end``: whether they are all digits, and their value."""
        return _swar((self.w[end - 8] & _KEEP[n]) | _FILL[n], value)

    def number(
        self, start: np.ndarray, end: np.ndarray, decimals: bool, value: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Whether each [start, end) is a JSON number as the writer writes them: ``%d`` (an int),
        or (``decimals``) µs with exactly three decimals; and its value (ints, or integer ns)."""
        neg = self.a[start] == ord("-")
        s = start + neg
        n = end - s - (4 if decimals else 0)  # digits before the point
        ok = (n >= 1) & (n <= 15)  # 15 digits: below 2**63 ns, more than any trace holds
        ok &= (self.a[s] != ord("0")) | (n == 1)  # JSON has no leading zeros
        n = np.where(ok, n, 1)
        if decimals:  # "WWWW.fff": its last 4 whole digits and the 3 decimals, as 7 digits
            x = self.w[end - 8]
            ok &= (x >> np.uint64(32)) & np.uint64(0xFF) == np.uint64(ord("."))
            x = ((x & np.uint64(0xFFFFFFFF)) << np.uint64(8)) | (x & np.uint64(0xFFFFFF0000000000))
            low = np.minimum(n, 4)
            good, v = _swar((x & _KEEP[low + 3]) | _FILL[low + 3], value)
            rest, unit, end = n - low, 10**7, end - 8
        else:
            low = np.minimum(n, 8)
            good, v = self.digits(end, low, value)
            rest, unit, end = n - low, 10**8, end - 8
        ok &= good
        while (rest > 0).any():
            more = np.minimum(rest, 8)
            good, hi = self.digits(end, np.maximum(more, 1), value)
            ok &= good | (more == 0)
            if value:
                v += np.where(more > 0, hi, 0) * unit
            rest, unit, end = rest - more, unit * 10**8, end - 8
        if value and neg.any():
            v = np.where(neg, -v, v)
        return ok, v


def _swar(x: np.ndarray, value: bool) -> tuple[np.ndarray, np.ndarray]:
    """Eight ASCII bytes a word (the first in the low byte): whether all are digits, and (with
    ``value``) the number they spell, three multiplications for eight digits."""
    ok = ((x & _HIGH) == _ZEROS) & (((x + _SIXES) & _HIGH) == _ZEROS)
    if not value:
        return ok, x
    x = x - _ZEROS
    x = (x * np.uint64(10) + (x >> np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    x = (x * np.uint64(100) + (x >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    x = (x * np.uint64(10000) + (x >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
    return ok, x.astype(np.int64)


# ---- the reader ----


class _Cols:
    """Columns gathered block by block (numpy arrays), joined at the end."""

    def __init__(self, *names: str) -> None:
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in names}

    def add(self, **cols: np.ndarray) -> None:
        for k, v in cols.items():
            self.parts[k].append(v)

    def get(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in self.parts.items()}


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.host = _Cols("region", "name", "pid", "tid", "ts", "dur")
        self.dev = _Cols("region", "pid", "tid", "ts", "dur")
        self.counter_pids: set[int] = set()
        self.args: list[tuple[int, int, dict[str, Any]]] = []  # (pid, region, user args)
        self.slow: list[Any] = []  # the events orjson read, in file order
        self.name_ids: dict[str, int] = {}  # a name as read -> its key in self.names
        self.names: list[str] = []

    def read(self) -> Session:
        progress = Progress(f"reading {self.path}")
        tail: Any = None
        for t in _blocks(self.path, progress):
            tail = t.tail
            if t.hi <= t.lo + 1:  # (none: an empty trace)
                continue
            if _scan is not None:
                self._scanned(t, _scan)
                continue
            try:
                self._block(_Block(t))
            except IndexError:  # a field's end read past the block: not the writer's layout
                raise _Fallback from None
        s = self._build(tail)
        progress.done(f"{len(s.regions)} regions")
        return s

    # -- one block, through the C scanner --

    def _scanned(self, t: _Text, scan: _Scan) -> None:
        """The block's events as the C scanner checked and parsed them; then the parts it leaves
        to orjson: the distinct names, the user args, and the pieces off the layout."""
        out = [np.frombuffer(x, np.int64) for x in scan(t.data, t.lo, t.hi)]
        pieces, host, dev = out[0].reshape(-1, 2), out[1].reshape(-1, 9), out[2].reshape(-1, 9)
        names = out[4].reshape(-1, 2)
        fast = pieces[:, 1] != 0
        keys = np.array([self._name_key(t.data[s : s + n]) for s, n in names.tolist()] or [0], np.int64)
        name = keys[host[:, 1]]
        ok = name >= 0  # a name that is not a JSON string: the event goes to orjson
        at = np.flatnonzero(ok & (host[:, 7] >= 0))
        rows = host[at]
        users = self._users(t.data, rows[:, 7].tolist(), rows[:, 8].tolist())
        for i, pid, region, user in zip(at.tolist(), rows[:, 2].tolist(), rows[:, 0].tolist(), users):
            if user is None:
                ok[i] = False
            elif user:
                self.args.append((pid, region, user))
        dok = keys[dev[:, 1]] >= 0  # (a device slice's name and user args: checked, not kept)
        at = np.flatnonzero(dok & (dev[:, 7] >= 0))
        users = self._users(t.data, dev[at, 7].tolist(), dev[at, 8].tolist())
        dok[at] = [user is not None for user in users]
        fast[host[~ok, 6]] = False
        fast[dev[~dok, 6]] = False
        for cols, rows, keep in ((self.host, host, ok), (self.dev, dev, dok)):
            rows = rows if keep.all() else rows[keep]  # (a copy of a column: twice as fast as a mask's)
            cols.add(**{k: rows[:, j].copy() for j, k in _SCANNED})
        self.host.add(name=name[ok])
        self.counter_pids.update(np.unique(out[3]).tolist())
        self._slow_runs(t.data, t.hi, pieces[:, 0], fast)

    # -- one block, through numpy --

    def _block(self, b: _Block) -> None:
        c = b.c
        word, mask = _word(b'{"ph":"')
        at = c[:-1][b.a[c[:-1] + 1] == ord("{")]
        seps = at[(b.w[at + 1] & mask) == word]  # the commas that lead an event
        if not len(seps) or seps[0] != b.lo:  # the block's first piece, whatever it holds
            seps = np.r_[b.lo, seps]
        js = np.searchsorted(c, seps)  # each event's leading comma, as an index into c
        je = np.r_[js[1:], len(c) - 1]  # and the next one's (the block's end, for the last)
        kind = b.a[seps + 8]
        cat = b.w[seps + 11]  # "cat":"r... or "cat":"d...
        fast = np.zeros(len(seps), bool)
        x = kind == ord("X")
        for sel, f in (
            (np.flatnonzero(x & (cat == _word(b'"cat":"r')[0]) & (je - js >= 9)), self._host),
            (np.flatnonzero(x & (cat == _word(b'"cat":"d')[0]) & (je - js >= 13)), self._device),
            (np.flatnonzero((kind == ord("C")) & (je - js == 6)), self._counter),
        ):
            if len(sel):
                fast[sel] = f(b, js[sel], je[sel])
        self._slow_runs(b.data, int(c[-1]), seps, fast)

    def _x(
        self, b: _Block, js: np.ndarray, je: np.ndarray, cat: bytes
    ) -> tuple[np.ndarray, np.ndarray, _Fields]:
        """The fields every X event has, from its start: ph, cat, name, pid, tid, ts, dur. And each
        event's ``js`` moved past the commas in its name (the fields after it are found from there)."""
        c = b.c
        prefix = b'{"ph":"X","cat":"' + cat + b'","name":'
        ok = b.lit(c[js] + 1, prefix)  # its commas are the event's first two
        named = b.lit(c[js + 3], b',"pid":')
        shift = np.zeros(len(js), np.int64)
        for k in range(1, NAME_COMMAS + 1):  # "a, b": the name holds commas, each one more field
            miss = np.flatnonzero(~named & (je - js - k >= 9))
            if not len(miss):
                break
            hit = miss[b.lit(c[js[miss] + 3 + k], b',"pid":')]
            shift[hit], named[hit] = k, True
        ok &= named
        jo = js + shift
        ends = [c[jo + k] for k in range(3, 8)]  # the commas after name, pid, tid, ts, dur
        out: _Fields = {}
        good, out["name"] = self._names(b, c[js] + 1 + len(prefix), ends[0])
        ok &= good
        keys = ((b',"pid":', False), (b',"tid":', False), (b',"ts":', True), (b',"dur":', True))
        for (key, decimals), s, e in zip(keys, ends, ends[1:]):
            ok &= b.lit(s, key)
            good, out[key[2:-2].decode()] = b.number(s + len(key), e, decimals)
            ok &= good
        return ok, jo, out

    def _args(
        self, b: _Block, js: np.ndarray, je: np.ndarray, first: int | np.ndarray, dev: bool | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, dict[str, Any]]]]:
        """The args, from the event's end: ``,"args":{`` (at the comma ``first`` after its start),
        its user args ``"k":v,...,`` if any, ``"region":N,"host_dur_us":D`` and, where ``dev``,
        ``,"device_dur_us":D,"launch_delay_us":D``; then ``}}``. Whether they are so, the region
        ids, and the events with user args (indices)."""
        c = b.c
        last_key = np.where(dev, 3, 1)  # the commas from the last to host_dur_us's

        def field(at: np.ndarray, key: bytes, last: bool) -> np.ndarray:
            s, e = c[at], c[at + 1]
            ok = b.lit(s, key)
            if last:  # the last field closes args and the event: "}}"
                e = e - 2
                ok &= b.w[e] & np.uint64(0xFFFF) == np.uint64(0x7D7D)
            good: np.ndarray = ok & b.number(s + len(key), e, True, value=False)[0]
            return good

        ok = np.ones(len(js), bool)
        if np.any(dev):
            d = np.broadcast_to(dev, len(js))
            e = je[d]
            ok[d] = (
                field(e - 3, b',"host_dur_us":', False)
                & field(e - 2, b',"device_dur_us":', False)
                & field(e - 1, b',"launch_delay_us":', True)
            )
        if not np.all(dev):
            d = ~np.broadcast_to(dev, len(js))
            ok[d] = field(je[d] - 1, b',"host_dur_us":', True)
        rf = je - last_key - 1  # the comma before "region"
        a = js + first  # the comma before "args"
        plain = rf == a  # no user args: ,"args":{"region":N
        region_at = c[rf] + np.where(plain, 9, 1)
        ok &= b.lit(c[a], b',"args":{') & (rf >= a) & b.lit(region_at, b'"region":')
        good, region = b.number(region_at + 9, c[rf + 1], False)
        ok &= good
        users = []
        for i in np.flatnonzero(ok & ~plain).tolist():  # after "args":{ to the comma before "region"
            parsed = self._user(b.data, int(c[a[i]]) + 9, int(c[rf[i]]))
            if parsed is None:
                ok[i] = False
            else:
                users.append((i, parsed))
        return ok, region, users

    def _host(self, b: _Block, js: np.ndarray, je: np.ndarray) -> np.ndarray:
        ok, js, f = self._x(b, js, je, b"region")
        c = b.c
        dev = b.lit(c[js + 7], b',"bind_')  # a slice with a device span: its flow, and device args
        if dev.any():
            d = js[dev]
            good = b.lit(c[d + 7], b',"bind_id":') & b.number(c[d + 7] + 11, c[d + 8], False, False)[0]
            ok[dev] &= good & b.lit(c[d + 8], b',"flow_out":true,') & (c[d + 9] - c[d + 8] == 16)
            ok &= ~dev | (je - js >= 13)
        good, region, user = self._args(b, js, je, np.where(dev, 9, 7), dev)
        ok &= good
        pid = f["pid"]
        self.args += [(int(pid[i]), int(region[i]), args) for i, args in user if ok[i] and args]
        self.host.add(region=region[ok], pid=pid[ok], **{k: f[k][ok] for k in ("name", "tid", "ts", "dur")})
        return ok

    def _device(self, b: _Block, js: np.ndarray, je: np.ndarray) -> np.ndarray:
        ok, js, f = self._x(b, js, je, b"device")
        c = b.c
        ok &= je - js >= 13
        ok &= b.lit(c[js + 7], b',"bind_id":') & b.number(c[js + 7] + 11, c[js + 8], False, False)[0]
        ok &= b.lit(c[js + 8], b',"flow_in":true,') & (c[js + 9] - c[js + 8] == 15)
        good, region, _ = self._args(b, js, je, 9, True)  # user args: checked, not kept (the host's)
        ok &= good
        self.dev.add(region=region[ok], **{k: f[k][ok] for k in ("pid", "tid", "ts", "dur")})
        return ok

    def _counter(self, b: _Block, js: np.ndarray, je: np.ndarray) -> np.ndarray:
        """A C event: checked, and only its pid kept (a merged trace's pids must all be known)."""
        c = b.c
        flight_at, lead_at = b'{"ph":"C","name":"regions in flight"', b'{"ph":"C","name":"host lead"'
        flight = b.lit(c[js] + 1, flight_at + b',"pid":') & (c[js + 2] - c[js] == 1 + len(flight_at))
        lead = b.lit(c[js] + 1, lead_at + b',"pid":') & (c[js + 2] - c[js] == 1 + len(lead_at))
        ok = flight | lead
        good, pid = b.number(c[js + 2] + 7, c[js + 3], False)
        ok &= good & b.lit(c[js + 3], b',"tid":') & b.lit(c[js + 4], b',"ts":')
        ok &= b.number(c[js + 3] + 7, c[js + 4], False, False)[0]
        ok &= b.number(c[js + 4] + 6, c[js + 5], True, False)[0]
        s, e = c[js + 5], c[js + 6] - 2
        ok &= b.w[e] & np.uint64(0xFFFF) == np.uint64(0x7D7D)  # }}
        regions = b.lit(s, b',"args":{"regions":') & b.number(s + 19, e, False, False)[0]
        us = b.lit(s, b',"args":{"us":') & b.number(s + 14, e, True, False)[0]
        ok &= np.where(flight, regions, us)
        self.counter_pids.update(np.unique(pid[ok]).tolist())
        out: np.ndarray = ok
        return out

    def _names(self, b: _Block, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each name (JSON string text in [start, end)) as a key into self.names, and whether it
        is a string. Names are hashed eight bytes at a time, the distinct ones read by orjson, and
        every name compared with its hash's first to be sure."""
        n = end - start
        ok = (n >= 2) & (n <= 4096) & (b.a[start] == ord('"'))
        n = np.where(ok, n, 2)
        words = (int(n.max()) + 7) // 8
        h = n.astype(np.uint64)
        for k in range(words):
            left = np.clip(n - 8 * k, 0, 8)
            at = np.minimum(start + 8 * k, len(b.w) - 1)  # (past a short name: masked to nothing)
            h = h * np.uint64(0x9E3779B97F4A7C15) + (b.w[at] & _KEEP8[left])
        uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
        rep = start[first][inverse]  # the first name with the same hash
        for k in range(words):
            left = np.clip(n - 8 * k, 0, 8)
            at, same = np.minimum(start + 8 * k, len(b.w) - 1), np.minimum(rep + 8 * k, len(b.w) - 1)
            ok &= (b.w[at] & _KEEP8[left]) == (b.w[same] & _KEEP8[left])
        keys = np.array(
            [self._name_key(b.data[start[i] : start[i] + n[i]]) for i in first.tolist()], np.int64
        )
        key = keys[inverse]
        return ok & (key >= 0), key

    def _name_key(self, text: bytes) -> int:
        """A name's key into self.names, from its JSON text; -1 where it is not a JSON string."""
        try:
            name = orjson.loads(text)
        except orjson.JSONDecodeError:
            return -1
        if not isinstance(name, str):
            return -1
        key = self.name_ids.setdefault(name, len(self.name_ids))
        if key == len(self.names):
            self.names.append(name)
        return key

    def _users(self, data: bytes, starts: list[int], ends: list[int]) -> list[dict[str, Any] | None]:
        """``_user`` of many regions' args (each ``[start, end)``), the same, faster: one orjson
        call over them all as one array, each object then written back by orjson and compared
        with its text (byte for byte: what the writer wrote, which read alone gives the same
        object); the others read alone. A read of 1M regions, each with args, took 2.3 s of CPU
        instead of 4.2 one call a region (the 2-core CPU, median of 3)."""
        texts = [data[s:e] for s, e in zip(starts, ends)]
        try:
            many = orjson.loads(b"[{" + b"},{".join(texts) + b"}]") if texts else []
        except orjson.JSONDecodeError:
            many = []
        if len(many) != len(texts):
            many = [None] * len(texts)
        out: list[dict[str, Any] | None] = []
        for text, args, s, e in zip(texts, many, starts, ends):
            if not (text and type(args) is dict and orjson.dumps(args)[1:-1] == text):
                out.append(self._user(data, s, e))
            elif _OWN.isdisjoint(args):
                out.append(args)
            else:
                out.append({k: v for k, v in args.items() if k not in _OWN})
        return out

    def _user(self, data: bytes, start: int, end: int) -> dict[str, Any] | None:
        """A region's user args (text ``"k":v,...`` in [start, end)), without evtrace's own keys
        (as a JSON reader keeps them: the last of a key); None where not a JSON object's."""
        try:
            args = orjson.loads(b"{" + data[start:end] + b"}") if end > start else None
        except orjson.JSONDecodeError:
            return None
        if not isinstance(args, dict):
            return None
        return {k: v for k, v in args.items() if k not in OWN_ARGS}

    def _slow_runs(self, data: bytes, hi: int, seps: np.ndarray, fast: np.ndarray) -> None:
        """The events not of the fast layout (``seps``: each one's leading comma, the last one's
        end at ``hi``), each run of adjacent ones read by orjson at once (so that pieces cut
        inside one event, where its args hold ``,{"ph":"``, come together)."""
        if fast.all():
            return
        ends = np.r_[seps[1:], hi]
        slow = ~fast
        edge = np.diff(np.r_[0, slow.astype(np.int8), 0])
        for i, j in zip(np.flatnonzero(edge == 1).tolist(), np.flatnonzero(edge == -1).tolist()):
            text = data[seps[i] + 1 : ends[j - 1]]
            if not text:  # an empty piece: ",," is not JSON
                raise _Fallback
            try:
                self.slow += orjson.loads(b"[" + text + b"]")
            except orjson.JSONDecodeError:
                raise _Fallback from None

    # -- the Session --

    def _build(self, tail: Any) -> Session:
        meta = tail.get("metadata") if isinstance(tail, dict) else None
        if (
            not isinstance(meta, dict)
            or meta.get("evtrace.format") not in READ
            or not isinstance(meta.get("evtrace.meta"), dict)
        ):
            raise _Fallback  # not evtrace's, or another version: the general path says so
        host, dev = self.host.get(), self.dev.get()
        profiler: list[Any] = []
        slow: list[dict[str, Any]] = []
        try:
            for ev in self.slow:
                (profiler if int(ev.get("pid", 0)) >= PROFILER_PID else slow).append(ev)
        except (AttributeError, TypeError, ValueError):
            raise _Fallback from None
        if any(len(c["pid"]) and c["pid"].max() >= PROFILER_PID for c in (host, dev)):
            raise _Fallback
        if any(p >= PROFILER_PID for p in self.counter_pids):
            raise _Fallback
        try:
            if "evtrace.ranks" in meta:
                s = self._merged(meta, host, dev, slow)
            else:
                s = self._one(meta, host, dev, self.args, slow)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError):
            raise _Fallback from None
        if profiler:
            s.profiler = profiler
        return s

    def _merged(
        self, meta: dict[str, Any], host: dict[str, np.ndarray], dev: dict[str, np.ndarray], slow: list[Any]
    ) -> Session:
        infos = meta["evtrace.ranks"]
        index = {int(info["pid_base"]): k for k, info in enumerate(infos)}

        def rank_of(pid: np.ndarray) -> np.ndarray:
            base = pid - (pid - HOST_PID_BASE) % PIDS_PER_INPUT
            bases = np.unique(base)
            if any(int(x) not in index for x in bases.tolist()):
                raise _Fallback
            table = np.array([index[int(x)] for x in bases.tolist()] or [0], np.int64)
            return table[np.searchsorted(bases, base)] if len(bases) else np.zeros(0, np.int64)

        for p in self.counter_pids:
            rank_of(np.array([p]))
        hr, dr = rank_of(host["pid"]), rank_of(dev["pid"])
        per_rank: list[list[Any]] = [[] for _ in infos]
        for ev in slow:
            p = int(ev["pid"])
            per_rank[index[p - (p - HOST_PID_BASE) % PIDS_PER_INPUT]].append(ev)
        arg_rank = rank_of(np.array([a[0] for a in self.args], np.int64))
        ranks = []
        for k, info in enumerate(infos):
            mine = [a for a, r in zip(self.args, arg_rank.tolist()) if r == k]
            s = self._one(
                rank_meta(info, meta),
                {c: v[hr == k] for c, v in host.items()},
                {c: v[dr == k] for c, v in dev.items()},
                mine,
                per_rank[k],
            )
            s.pid = int(info["pid"])
            ranks.append(s)
        return combined(ranks, meta)

    def _one(
        self,
        meta: dict[str, Any],
        host: dict[str, np.ndarray],
        dev: dict[str, np.ndarray],
        user_args: list[tuple[int, int, dict[str, Any]]],
        slow: list[Any],
    ) -> Session:
        """One recording's Session from its columns and its events orjson read, as ``_rebuild``."""
        pid, parent, streams, devices = header(meta)
        threads: list[Thread] = []
        thread_ix: dict[int, int] = {}
        host = dict(host)
        dev = dict(dev)
        args = {region: a for _, region, a in user_args}
        extra_h: list[tuple[int, int, int, int, int]] = []  # region, name key, tid, ts, dur
        extra_d: list[tuple[int, int, int, int]] = []  # region, tid, ts, dur
        for ev in slow:
            ph = ev.get("ph")
            if (
                ph == "M"
                and ev.get("name") == "thread_name"
                and ev.get("pid") == pid
                and ev["tid"] not in parent
            ):
                if type(ev["tid"]) is not int:
                    raise _Fallback
                thread_ix[ev["tid"]] = len(threads)
                threads.append(Thread(int(ev["tid"]), str(ev["args"]["name"])))
            elif ph == "X" and ev.get("cat") in ("region", "device"):
                region, tid = int(ev["args"]["region"]), ev["tid"]
                if type(tid) is not int:
                    raise _Fallback
                if ev["cat"] == "device":
                    extra_d.append((region, tid, us_ns(ev["ts"]), us_ns(ev["dur"])))
                    continue
                name = ev["name"]
                if type(name) is not str:
                    raise _Fallback
                key = self.name_ids.setdefault(name, len(self.name_ids))
                if key == len(self.names):
                    self.names.append(name)
                extra_h.append((region, key, tid, us_ns(ev["ts"]), us_ns(ev["dur"])))
                user = {k: v for k, v in ev["args"].items() if k not in OWN_ARGS}
                if user:
                    args[region] = user
                elif region in args:
                    del args[region]  # (a region read twice is left to the general path)
        if extra_h:
            cols = np.array(extra_h, np.int64).T
            for k, c in zip(("region", "name", "tid", "ts", "dur"), cols):
                host[k] = np.r_[host[k], c]
        if extra_d:
            cols = np.array(extra_d, np.int64).T
            for k, c in zip(("region", "tid", "ts", "dur"), cols):
                dev[k] = np.r_[dev[k], c]
        n = len(host["region"])
        hreg = host["region"]
        if n and (hreg.min() < 0 or hreg.max() >= n or np.bincount(hreg, minlength=n).max() > 1):
            raise _Fallback  # ids not 0..n-1, or one twice: the general path says or decides
        regions = np.zeros(n, REGION_DTYPE)
        by_region = np.empty(n, np.int64)
        by_region[hreg] = host["name"]
        names: dict[str, int] = {str(name): k for k, name in enumerate(meta.get("evtrace.names", []))}
        if n:
            keys, first = np.unique(by_region, return_index=True)
            ids = np.zeros(len(self.names), np.int64)
            for k in keys[np.argsort(first)].tolist():  # new names in the order of their first region
                ids[k] = names.setdefault(self.names[k], len(names))
            _fits(regions, "name", ids[by_region])
        thread_keys = np.array(sorted(thread_ix), np.int64)
        tids = _lanes(host["tid"], parent)
        at = np.searchsorted(thread_keys, tids)
        if n and (at.max() >= len(thread_keys) or not np.array_equal(thread_keys[at], tids)):
            raise _Fallback
        thread_of = np.array([thread_ix[t] for t in thread_keys.tolist()] or [0], np.int64)
        _fits(regions, "thread", _scatter(hreg, thread_of[at], n))
        ts, dur = _scatter(hreg, host["ts"], n), _scatter(hreg, host["dur"], n)
        regions["host_start"], regions["host_end"] = ts, ts + dur
        regions["device"], regions["stream"] = -1, -1
        dreg = dev["region"]
        inside = (dreg >= 0) & (dreg < n)
        if not inside.all():  # a device span of no region: never read
            dreg = dreg[inside]
            dev = {k: v[inside] for k, v in dev.items()}
        if len(dreg):
            if np.bincount(dreg, minlength=n).max() > 1:
                raise _Fallback
            stream = _lanes(dev["tid"], parent) - 1
            if stream.min() < -len(streams) or stream.max() >= len(streams):
                raise _Fallback
            device_of = np.array([st.device for st in streams], np.int64)
            rows = regions[dreg]
            _fits(rows, "stream", stream)
            _fits(rows, "device", device_of[stream])
            rows["dev_start"] = dev["ts"]
            rows["dev_end"] = dev["ts"] + dev["dur"]
            regions[dreg] = rows
        typed = metadata.from_json(meta["evtrace.meta"])
        if any(r < 0 or r >= n for r in args):
            raise _Fallback
        return Session(
            regions=regions,
            names=list(names),
            threads=threads,
            devices=devices,
            streams=streams,
            args={r: args[r] for r in sorted(args)},
            meta=typed,
            pid=pid,
            wall_origin_ns=int(meta.get("evtrace.wall_origin_ns", 0)),
        )


_KEEP8 = np.array([(1 << (8 * n)) - 1 for n in range(9)], np.uint64)  # the low n bytes of a word


def _lanes(tid: np.ndarray, parent: dict[int, int]) -> np.ndarray:
    """Each tid, an extra lane's replaced by the lane it belongs to."""
    out = tid.copy()
    for extra, orig in parent.items():
        out[tid == extra] = orig
    return out


def _scatter(at: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, np.int64)
    out[at] = values
    return out


def _fits(rows: np.ndarray, field: str, values: np.ndarray) -> None:
    """``rows[field] = values``, where every value fits the field's type (else the general path)."""
    info = np.iinfo(rows.dtype[field])
    if len(values) and (values.min() < info.min or values.max() > info.max):
        raise _Fallback
    rows[field] = values
