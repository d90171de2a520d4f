"""The live recorder: the hot path, lazy event resolution, anchors. ``stop()`` returns a Session.

Hot path (``enter``/``exit``, once per region boundary): a host stamp, at most one pooled
event recorded on the current stream, and one tuple appended. Nothing else: no dicts, no
formatting, no ``elapsed_time`` and never a ``synchronize``. A device synchronize costs single
to double-digit µs *and* stalls the host until the device drains, which destroys the very
overlap being measured; events are instead resolved with ``query()`` by a background thread
and recycled into the pool. The only synchronize is the one in ``stop()``.

The seam other modules use (regions, instrument, autohooks, api, benchmarks); nothing else here
is theirs to touch:

- ``current``: the recording :class:`Recorder`, or None. Read it; only this module writes it.
  A plain module attribute, not a function: ``Region.__enter__`` reads it per region, and a
  call would cost as much again as the read.
- ``name_key(name)`` interns a region name (off the hot path); ``name_of(key)`` gives it back.
- ``Recorder.enter(key, args) -> token`` and ``Recorder.exit(token)``: a region on the host
  lane and, with a device, the current stream. ``enter_host``/``exit_host``: host lane only.
  ``enter_cross``/``exit_cross``: for a span that may end on another thread than it began
  (backward spans); the same calls, except that NVTX ranges are then start/end, not push/pop.
- ``Recorder.nothing_launched()``: for a caller that knows nothing is launched between two
  boundaries on its thread (``nn.Sequential``'s loop), so that they share one event.
- Options: ``nvtx=True`` emits every region as an NVTX range too; ``share_ns`` fixes the
  window in which boundaries share an event (0: never share; None: measured at start).
- Diagnostics, off the hot path, for benchmarks: ``anchor_now()``, ``anchors(device)``,
  ``raw_regions()``, ``poll()`` with ``background=False``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from . import clock as _clock
from . import defaults
from .device import Backend, Event
from .session import REGION_DTYPE, Session, Stream, Thread

# while recording, device times are float64 ms since the device's first anchor
_LIVE_DTYPE = np.dtype(
    [(n, np.float64 if n.startswith("dev_") else REGION_DTYPE[n]) for n in REGION_DTYPE.names or ()]
)

#: the recorder regions report to; None when no session is active. Public, read-only outside
#: this module (a module attribute, not a function: it is read once per region)
current: Recorder | None = None
#: region names, interned once per process: the hot path stores only their int keys
_NAMES: list[str] = []
_NAME_KEYS: dict[str, int] = {}
_names_lock = threading.Lock()


def name_key(name: str) -> int:
    """The int key of a region name (interned on first use, never on the hot path)."""
    k = _NAME_KEYS.get(name)
    if k is None:
        with _names_lock:
            k = _NAME_KEYS.get(name)
            if k is None:
                k = _NAME_KEYS[name] = len(_NAMES)
                _NAMES.append(name)
    return k


def name_of(key: int) -> str:
    """The region name interned as ``key``."""
    return _NAMES[key]


_NEVER = -(1 << 62)
#: a last_t that the next boundary is always within (see Recorder.nothing_launched)
_ALWAYS = 1 << 62
#: finished regions are packed into numpy chunks of at least this many (a long run keeps few chunks)
_CHUNK = 16384
#: CUDA graph captures in progress (torch's CUDAGraph.capture_begin/end, patched while recording)
_capturing = 0
#: held by the resolver while it calls CUDA; a capture begins only once it is free
_cuda_calls = threading.Lock()
_starting = threading.Lock()


def capture_began() -> None:
    global _capturing
    with _cuda_calls:
        _capturing += 1


def capture_ended() -> None:
    global _capturing
    with _cuda_calls:
        _capturing = max(0, _capturing - 1)


class _ThreadState:
    """Per thread: its lane, and its last mark, which the next boundary may share.

    Two boundaries on one stream (the end of one region and the start of the next, the ends of
    a child and its parent, a parent's start and its first child's) with less host time
    between them than one event record takes (the tightest of the first anchor's tries) cannot
    have had a kernel launched between them: one event serves both. ``last_t`` is the host
    time up to which nothing is known to have been launched since ``last_m``.
    """

    __slots__ = ("ix", "open", "last_m", "last_d", "last_s", "last_t")

    def __init__(self, ix: int) -> None:
        self.ix = ix
        self.open: list[tuple[Any, ...]] = []  # regions entered on this thread, not yet exited
        self.last_m: list[Any] | None = None
        self.last_d = self.last_s = -1
        self.last_t = _NEVER

    def share_next(self) -> None:
        """Nothing has been launched on this thread since its last boundary, nor will be before
        its next: the next boundary shares the last one's mark."""
        self.last_t = _ALWAYS


class Recorder:
    """One recording session. Not reusable: start it, run, stop it once."""

    def __init__(
        self,
        backend: Backend | None,
        clock: _clock.Clock = time.perf_counter_ns,
        *,
        anchor_interval_s: float = defaults.ANCHOR_INTERVAL_S,
        poll_s: float = 0.01,
        pool_size: int = 1024,
        max_events: int = 1 << 16,
        max_regions: int | None = defaults.MAX_REGIONS,
        anchor_tries: int = 5,
        share_ns: int | None = None,
        background: bool = True,
        nvtx: bool = False,
    ) -> None:
        self.backend = backend
        self.clock = clock
        self.anchor_interval_ns = int(anchor_interval_s * 1e9)
        self.poll_s = poll_s
        self.pool_size = pool_size
        self.max_events = max_events
        self.max_regions = max_regions
        self._chunk = (
            min(_CHUNK, max(1, max_regions // 8)) if max_regions else _CHUNK
        )  # the ring drops by chunks
        self.anchor_tries = anchor_tries
        self.background = background
        ndev = len(backend.devices) if backend else 0
        # shared with the hot path (list.append / pop / len / slicing are atomic under the GIL)
        self._done: list[tuple[Any, ...]] = []  # finished regions with device marks or args
        self._host: list[int] = []  # finished host-only regions, flat: key, thread, start, end
        self._pools: list[list[Event]] = [[] for _ in range(ndev)]
        self._tls = threading.local()  # .t: this thread's _ThreadState
        self._thread_info: list[Thread] = []
        self._states: list[_ThreadState] = []  # by thread index: each thread's open regions
        self._lock = threading.Lock()  # thread registry and pool growth only, never per region
        # resolver-owned
        self._created = [0] * ndev
        self._waiting: dict[tuple[int, int], deque[tuple[Any, ...]]] = {}
        self._ref: list[tuple[Event, float] | None] = [None] * ndev
        self._anchor_pending: list[deque[tuple[int, int, Event]]] = [deque() for _ in range(ndev)]
        self._anchors: list[list[tuple[int, int, float]]] = [[] for _ in range(ndev)]
        self._last_anchor = 0
        self._finished: list[tuple[Any, ...]] = []
        self._chunks: deque[np.ndarray] = deque()
        # resolved by the fast path, as columns: name, thread, host start/end, device, stream, device ms
        self._cols: tuple[list[Any], ...] = tuple([] for _ in range(8))
        self._streams: dict[tuple[int, int], int] = {}
        self._args: dict[int, dict[str, Any]] = {}
        self._count = 0
        self._kept = 0
        self.dropped_device = 0  # regions that lost their device span: the event pool was dry
        self.split_device = 0  # regions whose two events ended up on different devices
        self.failed_records = 0  # event records the device refused
        self.unfinished = 0  # regions still open when the session stopped
        self.captured = 0  # marks skipped inside CUDA graph captures
        self.dropped_regions = 0  # oldest regions dropped to keep memory under max_regions
        self._first_index = 0  # global index of the oldest region kept
        self.resolver_errors: list[str] = []
        self._stop_flag = threading.Event()
        self._thread: threading.Thread | None = None
        self.origin_ns = 0
        self.wall_origin_ns = 0
        self.argv: list[str] = []
        self.share_ns = -1 if share_ns is None else share_ns  # measured in start() unless given
        # the region calls (see the module docstring), bound once
        self.enter_host: Callable[[int, Any], Any] = self._enter_host
        self.exit_host: Callable[[Any], None] = self._exit_host
        self.enter: Callable[[int, Any], Any] = self._enter_host
        self.exit: Callable[[Any], None] = self._exit_host
        if backend is not None:
            self._get_device, self._raw_stream, self._record = backend.hot_path()
            self._multi = len(backend.devices) > 1
            self._seen: set[int] = {backend.side_stream(d) for d in range(len(backend.devices))}
            self.enter, self.exit = self._enter_device, self._exit_device
        self.enter_cross: Callable[[int, Any], Any] = self.enter
        self.exit_cross: Callable[[Any], None] = self.exit
        if nvtx:
            from . import nvtx as _nvtx

            self.enter_cross, self.exit_cross = _nvtx.ranges(self.enter, self.exit, _NAMES)
            self.enter, self.exit = _nvtx.push_pop(self.enter, self.exit, _NAMES)
            self.enter_host, self.exit_host = _nvtx.push_pop(self.enter_host, self.exit_host, _NAMES)

    # ---- hot path -------------------------------------------------------------------------
    def _new_thread(self) -> _ThreadState:
        # thread-local, not get_ident(): idents are reused once a thread ends
        with self._lock:
            t = self._tls.t = _ThreadState(len(self._thread_info))
            self._states.append(t)
            self._thread_info.append(Thread(threading.get_native_id(), _thread_name()))
        return t

    def _enter_host(self, name: int, args: Any) -> tuple[Any, ...]:
        try:
            t = self._tls.t
        except AttributeError:
            t = self._new_thread()
        tok = (name, args, t.ix, self.clock())
        t.open.append(tok)
        return tok

    def _closed(self, tok: tuple[Any, ...]) -> None:
        """Forget an open region that is not the innermost of its thread (the exits inline the
        common case: popping the innermost)."""
        o = self._states[tok[2]].open
        if tok in o:
            o.remove(tok)

    def _exit_host(self, tok: tuple[Any, ...]) -> None:
        o = self._states[tok[2]].open
        if o and o[-1] is tok:
            o.pop()
        else:
            self._closed(tok)
        if tok[1] is None:  # one C call appends the whole row, so threads never interleave
            self._host += (tok[0], tok[2], tok[3], self.clock())
        else:
            self._done.append((tok, self.clock()))

    def _mark(self, d: int, s: int) -> list[Any] | None:
        """Record a pooled event on stream ``s``: a mark ``[event, device ms once resolved]``."""
        if _capturing:
            self._in_capture()
            return None
        if s not in self._seen:
            self._seen.add(s)
            self.backend.learn_stream(d, s)  # type: ignore[union-attr]
        pool = self._pools[d]
        ev = pool.pop() if pool else self._grow(d)
        if ev is None:
            return None
        rc = self._record(ev, s)
        if rc:  # refused: e.g. a stream being captured into a CUDA graph
            self.backend.record_failed(rc)  # type: ignore[union-attr]
            pool.append(ev)
            self.failed_records += 1
            return None
        return [ev, None]

    def _enter_device(self, name: int, args: Any) -> tuple[Any, ...]:
        h0 = self.clock()  # first: the gap to the last mark must be as short as it really was
        try:
            t = self._tls.t
        except AttributeError:
            t = self._new_thread()
        d = self._get_device() if self._multi else 0
        s = self._raw_stream(d)
        if h0 - t.last_t < self.share_ns and t.last_s == s and t.last_d == d:
            m = t.last_m  # nothing can have been launched since that mark: it serves again
            t.last_t = h0
        else:  # a new mark, which a child entered right away may share
            m = t.last_m = self._mark(d, s)
            t.last_d, t.last_s = d, s
            t.last_t = self.clock()
        tok = (name, args, t.ix, h0, d, s, m)
        t.open.append(tok)
        return tok

    def _exit_device(self, tok: tuple[Any, ...]) -> None:
        try:
            t = self._tls.t
        except AttributeError:  # exited on a thread that entered no region
            t = self._new_thread()
        d = self._get_device() if self._multi else 0
        s = self._raw_stream(d)
        h1 = self.clock()  # before the record: the device cannot stamp the mark earlier
        if h1 - t.last_t < self.share_ns and t.last_s == s and t.last_d == d:
            m = t.last_m
            t.last_t = h1
        else:
            m = t.last_m = self._mark(d, s)
            t.last_d, t.last_s = d, s
            t.last_t = self.clock()
        o = self._states[tok[2]].open
        if o and o[-1] is tok:
            o.pop()
        else:
            self._closed(tok)
        self._done.append((tok, h1, d, s, m))

    def nothing_launched(self) -> Callable[[], None]:
        """This thread's promise, as a function: call it to say that nothing has been launched on
        this thread since its last region boundary, nor will be before its next one. The next
        boundary then shares the last one's event (one record instead of two).

        For a caller that runs nothing else between two boundaries (``nn.Sequential``'s loop
        between its children's forwards). Fetch it once per loop; a call is one attribute store.
        """
        try:
            t: _ThreadState = self._tls.t
        except AttributeError:
            t = self._new_thread()
        return t.share_next

    def _in_capture(self) -> None:
        """Inside a CUDA graph capture no event is recorded: host spans only, said once."""
        self.captured += 1
        if self.captured == 1:
            print(
                "evtrace: regions inside a CUDA graph capture get host spans only; "
                "a region around replay() times the replay",
                file=sys.stderr,
            )

    def _grow(self, device: int) -> Event | None:
        """The pool is dry: add events up to ``max_events``, then drop device spans (counted)."""
        with self._lock:
            n = min(256, self.max_events - self._created[device])
            if n <= 0:
                self.dropped_device += 1
                return None
            self._created[device] += n
        evs = [self.backend.new_event(device) for _ in range(n)]  # type: ignore[union-attr]
        self._pools[device].extend(evs[1:])
        return evs[0]

    # ---- session lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        with _starting:  # two threads starting sessions at once: one of them is refused
            self._start()

    def _start(self) -> None:
        global current
        if current is not None:
            raise RuntimeError("an evtrace session is already recording; sessions do not nest")
        if self.backend is not None:
            for d in range(len(self.backend.devices)):
                self._created[d] = self.pool_size
                self._pools[d].extend(self.backend.new_event(d) for _ in range(self.pool_size))
        t0 = time.time_ns()
        self.origin_ns = self.clock()
        self.wall_origin_ns = (t0 + time.time_ns()) // 2
        self.argv = list(sys.argv)
        if self.backend is not None:
            self._anchor_all()
            if self.share_ns < 0:  # a launch takes at least as long as a record
                self.share_ns = min(p[-1][1] - p[-1][0] for p in self._anchor_pending)
            self._resolve_anchors()
            self._unguard = self.backend.guard_captures(capture_began, capture_ended)
        current = self
        if self.background:
            self._thread = threading.Thread(target=self._run, name="evtrace-resolver", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop_flag.wait(self.poll_s):
            try:
                self.poll()
            except Exception as e:  # never take the user's program down; report at the end
                if len(self.resolver_errors) < 10:
                    self.resolver_errors.append(f"{type(e).__name__}: {e}")

    def stop(self) -> Session:
        """Resolve everything (one synchronize per device, here only) and build the Session."""
        global current
        if current is self:
            current = None
        end_ns = self.clock()
        self._stop_flag.set()
        if self._thread is not None:
            self._thread.join()
        if self.backend is not None:
            self._unguard()
            self._anchor_all()
            for d in range(len(self.backend.devices)):
                self.backend.synchronize(d)
        self._close_open(end_ns)
        self.poll(final=True)
        session = self._session(end_ns)
        if self.backend is not None:
            # regions still open take no more events: their exits find an empty pool
            self.max_events = 0
            self._pools = [[] for _ in self._pools]
            self.backend.close()
        return session

    def _close_open(self, end_ns: int) -> None:
        """Regions still open at the end keep their host span, closed at the end, marked unfinished."""
        nan = float("nan")
        for st in self._states:
            for tok in list(st.open):
                args = {**(tok[1] or {}), "unfinished": True}
                row = (tok[0], args, tok[2], tok[3], max(end_ns, tok[3]))
                self._finished.append(row if self.backend is None else (*row, -1, 0, nan, nan))
                self.unfinished += 1
            st.open.clear()

    # ---- diagnostics (off the hot path: benchmarks, tests) ------------------------------------
    def anchor_now(self) -> None:
        """Take one anchor on each device now, as the resolver does every ``anchor_interval_s``
        (``poll()`` resolves it once the device has stamped it)."""
        self._anchor_all()

    def anchors(self, device: int) -> list[tuple[int, int, float]]:
        """A device's resolved anchors: host ns just before and just after each record, and the
        device time it was stamped at, in ms since the device's first anchor."""
        return list(self._anchors[device])

    def raw_regions(self) -> np.ndarray:
        """The regions kept so far (after ``stop()``: all of them), in the order they began,
        before alignment: host ns on the recorder's clock, device ms since the device's first
        anchor (NaN without a device span); names are ``name_key`` keys."""
        live = np.concatenate(self._chunks) if self._chunks else np.empty(0, _LIVE_DTYPE)
        return live[np.argsort(live["host_start"], kind="stable")]

    # ---- resolver (background thread, or poll() by hand) --------------------------------------
    def poll(self, final: bool = False) -> None:
        """One resolver step: take a due anchor, resolve finished events, compact storage."""
        n = len(self._host)
        if n >= 4 * self._chunk or (final and n):
            rows = np.array(self._host[:n], dtype=np.int64).reshape(-1, 4)
            del self._host[:n]  # only the copied prefix: rows appended meanwhile stay
            self._add_chunk(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3])
        n = len(self._done)
        batch = self._done[:n]
        del self._done[:n]
        if self.backend is None:  # host-only regions with args
            self._finished.extend((*tok, h1) for tok, h1 in batch)
        else:
            self._queue(batch)
            with _cuda_calls:  # a CUDA graph capture waits for this block, and holds the next
                if not _capturing:  # no CUDA call may run during a capture: it would break it
                    self._resolve_device()
        if final or len(self._finished) + len(self._cols[0]) >= self._chunk:
            self._compact()

    def _queue(self, batch: list[tuple[Any, ...]]) -> None:
        """Finished regions to the queue of their end mark's stream (host-only ones to storage).

        A record is ``(token, host end)`` for a host-only region, else ``(token, host end,
        device, stream, end mark)`` with the token ``(name, args, thread, host start, device,
        stream, start mark)``.
        """
        nan = float("nan")
        for rec in batch:
            tok = rec[0]
            if len(rec) == 2:  # host-only
                self._finished.append((*tok, rec[1], -1, 0, nan, nan))
            elif rec[4] is None and tok[6] is None:  # no event at either end
                self._finished.append((*tok[:4], rec[1], -1, 0, nan, nan))
            else:  # queued on the stream of its end mark (its start mark if the end has none)
                key = (rec[2], rec[3]) if rec[4] is not None else (tok[4], tok[5])
                q = self._waiting.get(key)
                if q is None:
                    q = self._waiting[key] = deque()
                q.append(rec)

    def _resolve_device(self) -> None:
        if self.clock() - self._last_anchor >= self.anchor_interval_ns:
            self._anchor_all()
        self._resolve_anchors()
        for key, q in self._waiting.items():
            d = key[0]
            if q and self._ref[d] is not None and self._done_mark(q[-1][4] or q[-1][0][6]):
                self._finish_all(key, q)  # stream order: the newest mark is done, so all are
            while q:  # what the fast path left: one at a time
                tok, h1, d1, s1, m1 = rec = q[0]
                m0 = tok[6]
                if not self._done_mark(m1 or m0):
                    break  # later marks on this stream are not done either
                if m0 is not None and m1 is not None and tok[5] != s1 and not self._done_mark(m0):
                    break  # begun on another stream, which has not got there yet
                if self._ref[tok[4]] is None or self._ref[d1] is None:
                    break  # that device's first anchor has not resolved yet
                q.popleft()
                self._finish_device(rec)

    def _finish_device(self, rec: tuple[Any, ...]) -> None:
        (name, args, ix, h0, d0, s0, m0), h1, d1, _s1, m1 = rec
        if m0 is not None:
            self._stamp(d0, m0)
        if m1 is not None:
            self._stamp(d1, m1)
        if m0 is not None and m1 is not None and d0 == d1:
            self._finished.append((name, args, ix, h0, h1, d0, s0, m0[1], m1[1]))
        else:  # one end had no event (pool dry or record refused), or two devices
            self.split_device += m0 is not None and m1 is not None
            self._finished.append((name, args, ix, h0, h1, -1, 0, float("nan"), float("nan")))

    def _finish_all(self, key: tuple[int, int], q: deque[tuple[Any, ...]]) -> None:
        """Resolve a stream's queue whose marks are all done, straight into storage columns.

        Stops at any unusual record (args, one end without an event, begun on another stream
        or device) and leaves it to the slow path. This loop is the resolver's cost per region.
        """
        d, s = key
        ref_ev, ref_ms = self._ref[d]  # type: ignore[misc]
        elapsed, pool = self.backend.elapsed_ms, self._pools[d]  # type: ignore[union-attr]
        names, threads, h0s, h1s, devs, streams, t0s, t1s = self._cols
        k = len(names)
        while q:
            tok, h1, _d1, s1, m1 = q[0]
            name, args, ix, h0, d0, s0, m0 = tok
            if m0 is None or m1 is None or args is not None or d0 != d or s0 != s:
                break
            q.popleft()
            if m0[1] is None:
                m0[1] = ref_ms + elapsed(ref_ev, m0[0])
                pool.append(m0[0])
                m0[0] = None
            if m1[1] is None:
                m1[1] = ref_ms + elapsed(ref_ev, m1[0])
                pool.append(m1[0])
                m1[0] = None
            names.append(name)
            threads.append(ix)
            h0s.append(h0)
            h1s.append(h1)
            t0s.append(m0[1])
            t1s.append(m1[1])
        k = len(names) - k
        if k:
            devs.extend([d] * k)
            streams.extend([self._streams.setdefault(key, len(self._streams))] * k)

    def _stamp(self, d: int, m: list[Any]) -> None:
        """Give a done mark its device ms, against the latest anchor (a short, float32-safe
        elapsed), and return its event to the pool. Once: a mark may be shared."""
        if m[1] is None:
            ref_ev, ref_ms = self._ref[d]  # type: ignore[misc]
            m[1] = ref_ms + self.backend.elapsed_ms(ref_ev, m[0])  # type: ignore[union-attr]
            self._pools[d].append(m[0])
            m[0] = None

    def _done_mark(self, m: list[Any]) -> bool:
        return m[1] is not None or self.backend.query(m[0])  # type: ignore[union-attr]

    def _anchor_all(self) -> None:
        """Anchor each device: the tightest of a few host-bracketed records on its idle side stream."""
        b = self.backend
        assert b is not None
        for d in range(len(b.devices)):
            side = b.side_stream(d)
            best: tuple[int, int, Event] | None = None
            for _ in range(self.anchor_tries):
                pool = self._pools[d]
                ev = pool.pop() if pool else b.new_event(d)
                lo = self.clock()
                self._record(ev, side)
                hi = self.clock()
                if best is None or hi - lo < best[1] - best[0]:
                    if best is not None:
                        self._pools[d].append(best[2])
                    best = (lo, hi, ev)
                else:
                    self._pools[d].append(ev)
            self._anchor_pending[d].append(best)  # type: ignore[arg-type]
        self._last_anchor = self.clock()

    def _resolve_anchors(self) -> None:
        """Chain completed anchors: each one's device time is the previous one's plus a short elapsed."""
        b = self.backend
        assert b is not None
        for d, pending in enumerate(self._anchor_pending):
            while pending and b.query(pending[0][2]):
                lo, hi, ev = pending.popleft()
                ref = self._ref[d]
                ms = 0.0 if ref is None else ref[1] + b.elapsed_ms(ref[0], ev)
                if ref is not None:
                    self._pools[d].append(ref[0])
                self._ref[d] = (ev, ms)
                self._anchors[d].append((lo, hi, ms))

    def _compact(self) -> None:
        """Move finished regions into packed numpy chunks (46 B per region)."""
        if self._cols[0]:
            fast, self._cols = self._cols, tuple([] for _ in range(8))
            self._add_chunk(*fast)
        rows = self._finished
        if not rows:
            return
        self._finished = []
        cols = list(zip(*rows))
        base = self._count
        if cols[1].count(None) != len(rows):
            for i, a in enumerate(cols[1]):
                if a:
                    self._args[base + i] = a
        if len(cols) > 5:
            dev = np.array(cols[5], dtype=np.int64)
            lane = np.array(cols[6], dtype=np.uint64) * 256 + (dev + 1).astype(np.uint64)  # handles < 2^48
            keys, inverse = np.unique(lane, return_inverse=True)
            pairs = [(k % 256 - 1, k // 256) for k in keys.tolist()]
            ix = np.array(
                [self._streams.setdefault(p, len(self._streams)) if p[0] >= 0 else -1 for p in pairs],
                dtype=np.int32,
            )
            self._add_chunk(
                cols[0], cols[2], cols[3], cols[4], dev, ix[inverse.reshape(-1)], cols[7], cols[8]
            )
        else:
            self._add_chunk(cols[0], cols[2], cols[3], cols[4])

    def _add_chunk(
        self,
        name: Any,
        thread: Any,
        h0: Any,
        h1: Any,
        dev: Any = -1,
        stream: Any = -1,
        t0: Any = np.nan,
        t1: Any = np.nan,
    ) -> None:
        chunk = np.empty(len(h0), dtype=_LIVE_DTYPE)
        chunk["name"], chunk["thread"], chunk["host_start"], chunk["host_end"] = name, thread, h0, h1
        chunk["device"], chunk["stream"], chunk["dev_start"], chunk["dev_end"] = dev, stream, t0, t1
        self._count += len(chunk)
        self._chunks.append(chunk)
        self._kept += len(chunk)
        while (
            self.max_regions
            and len(self._chunks) > 1
            and self._kept - len(self._chunks[0]) >= self.max_regions
        ):
            old = self._chunks.popleft()  # a ring of chunks: the oldest regions go first
            self._kept -= len(old)
            self._first_index += len(old)
            self.dropped_regions += len(old)
        if self.dropped_regions and self._args:
            for i in [i for i in self._args if i < self._first_index]:
                del self._args[i]

    def _session(self, end_ns: int) -> Session:
        from .meta import environment
        from .metadata import DeviceAlignment

        live = np.concatenate(self._chunks) if self._chunks else np.empty(0, _LIVE_DTYPE)
        order = np.argsort(live["host_start"], kind="stable")  # regions in the order they began
        live = live[order]
        new_index = np.empty_like(order)
        new_index[order] = np.arange(len(order))
        args = {int(new_index[i - self._first_index]): a for i, a in self._args.items()}
        o = self.origin_ns
        regions = np.zeros(len(live), REGION_DTYPE)
        keys, regions["name"] = np.unique(live["name"], return_inverse=True)  # global name keys -> 0..n-1
        for f in ("thread", "device", "stream"):
            regions[f] = live[f]
        regions["host_start"] = live["host_start"] - o
        regions["host_end"] = live["host_end"] - o
        devices = list(self.backend.devices) if self.backend else []
        align: dict[str, DeviceAlignment] = {}
        clamped = 0
        for d in range(len(devices)):
            rows = regions["device"] == d
            a = self._anchors[d]
            if not a:
                continue
            lo, hi, ms = (np.array(c) for c in zip(*a))
            h0, h1 = live["host_start"][rows], live["host_end"][rows]
            stamps, first, where = _first_boundaries(live["dev_start"][rows], live["dev_end"][rows], h0, h1)
            fit = _clock.fit(lo, hi, ms, first, stamps, latency_ns=max(self.share_ns, 0))
            t0 = fit.to_host(live["dev_start"][rows]) - o
            t1 = fit.to_host(live["dev_end"][rows]) - o
            s0, s1 = np.rint(t0).astype(np.int64), np.rint(t1).astype(np.int64)
            # A device span never starts at or before its host launch. A start mark shared with
            # an earlier boundary may be stamped before this region began, as early as the
            # boundary that recorded it: moved to just after the launch. Only a stamp placed
            # before its own record call breaks the map's constraints, and is counted.
            made = first[where[: len(h0)]] - o
            clamped_d = int((s0 < np.rint(made)).sum())
            h0 = regions["host_start"][rows]
            s0 = np.where(s0 <= h0, h0 + 1, s0)
            s1 = np.maximum(s1, s0)
            regions["dev_start"][rows] = s0
            regions["dev_end"][rows] = s1
            clamped += clamped_d
            align[str(d)] = DeviceAlignment(
                anchors=fit.anchors,
                anchors_late=fit.anchors_late,
                stamps=fit.stamps,
                drift_ppm=round(fit.drift_ppm, 3),
                latency_us=round(fit.latency_ns / 1e3, 3),
                bound_us_p99=round(fit.bound_us[0], 3),
                bound_us_max=round(fit.bound_us[1], 3),
                stamp_delay_us_p50=round(fit.anchor_delay_us[0], 3),
                stamp_delay_us_p99=round(fit.anchor_delay_us[1], 3),
                stamp_delay_us_max=round(fit.anchor_delay_us[2], 3),
                clamped_spans=clamped_d,
            )
        nodev = regions["device"] < 0
        streams = [Stream(d, self.backend.stream_label(d, s)) for (d, s) in self._streams]  # type: ignore[union-attr]
        meta: dict[str, Any] = environment(devices)
        meta.update(
            argv=self.argv,
            regions=int(len(regions)),
            device_spans=int((~nodev).sum()),
            dropped_device_spans=self.dropped_device + self.failed_records,
            split_device_spans=self.split_device,
            clamped_device_spans=clamped,
            unfinished_regions=self.unfinished,
            marks_skipped_in_graph_capture=self.captured,
            dropped_regions=self.dropped_regions,
            share_window_ns=max(self.share_ns, 0),
            alignment=align,
            duration_ns=end_ns - o,
            origin_perf_ns=o,
        )
        if self.resolver_errors:
            meta["resolver_errors"] = self.resolver_errors
        names = [_NAMES[k] for k in keys.tolist()]
        return Session(
            regions=regions,
            names=names,
            threads=list(self._thread_info),
            devices=devices,
            streams=streams,
            args=args,
            meta=meta,
            pid=os.getpid(),
            wall_origin_ns=self.wall_origin_ns,
        )


def _first_boundaries(
    start_ms: np.ndarray, end_ms: np.ndarray, h0: np.ndarray, h1: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each distinct device stamp with the host time of the earliest boundary that has it: where
    its mark was recorded (boundaries that share a mark share its stamp). Also, for each of
    the starts then the ends, the index of its stamp."""
    both = np.concatenate([start_ms, end_ms])
    stamps, where = np.unique(both, return_inverse=True)
    first = np.full(len(stamps), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, where, np.concatenate([h0, h1]))
    return stamps, first, where.reshape(-1)


def _thread_name() -> str:
    """The thread's Python name; threads torch started for backward are named as such."""
    th = threading.current_thread()
    torch = sys.modules.get("torch")
    if isinstance(th, threading._DummyThread) and torch is not None:  # started outside Python
        try:
            if torch._C._current_autograd_node() is not None:
                return f"autograd thread {threading.get_native_id()}"
        except (AttributeError, RuntimeError):
            pass
    return th.name


_FORK_LOCKS = (_starting, _names_lock, _cuda_calls)


def _before_fork() -> None:
    """Fork only between the resolver's CUDA calls and name interning: a lock held by another
    thread at the fork would stay held in the child for ever."""
    for lock in _FORK_LOCKS:
        lock.acquire()


def _after_fork_in_parent() -> None:
    for lock in reversed(_FORK_LOCKS):
        lock.release()


def _forget_in_child() -> None:
    """A forked child (e.g. a DataLoader worker) does not record into its parent's session."""
    global current
    current = None
    _after_fork_in_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_forget_in_child
    )
