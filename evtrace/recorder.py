"""The live session around the native core: start, storage, stop. ``stop()`` returns a Session.

The hot path, the event pool and the resolver are C (``evtrace/_core/``): per region boundary
a host stamp, at most one pooled event recorded on the current stream, and a raw record
appended. Events are resolved with queries by the resolver, never with a synchronize: a device
synchronize stalls the host until the device drains, which destroys the very overlap being
measured. With the native CUDA runtime the resolver runs on a thread of its own without the
GIL; with any other backend (the simulated device, torch's events) a Python thread drives it.
This module keeps the session's lifecycle, the finished rows (numpy chunks, a ring under
``max_regions``) and what the CLI and views need; ``evtrace.build`` makes the Session.

The seam other modules use (regions, instrument, autohooks, api, benchmarks); nothing else here
is theirs to touch:

- ``current``: the recording :class:`Recorder`, or None. Read it; only this module writes it.
- ``name_key(name)`` interns a region name (off the hot path); ``name_of(key)`` gives it back.
- ``Recorder.enter(key, args) -> token`` and ``Recorder.exit(token)``: a region on the host
  lane and, with a device, the current stream. ``enter_host``/``exit_host``: host lane only.
  ``enter_cross``/``exit_cross``: for a span that may end on another thread than it began
  (backward spans); the same calls, except that NVTX ranges are then start/end, not push/pop.
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson

from . import _core, defaults, metadata, private
from . import align as _align
from . import hostclock as _hostclock
from . import journal as _journal
from .build import session
from .device import Backend, DeviceInfo
from .provenance import environment
from .session import REGION_DTYPE, Session, Thread

# while recording, device times are float64 ms since the device's first anchor
LIVE_DTYPE = np.dtype(
    [(n, np.float64 if n.startswith("dev_") else REGION_DTYPE[n]) for n in REGION_DTYPE.names or ()]
)


def _check_row_layout(dtype: np.dtype[Any]) -> None:
    """ImportError unless the core's C ``Row`` is ``dtype`` field by field (name, offset, size, kind):
    the core's rows are read as this dtype, so a field moved on one side would misread them all."""
    size, fields = _core.row_layout()
    named: Mapping[str, Any] = dtype.fields or {}
    ours = [(n, named[n][1], named[n][0].itemsize, named[n][0].kind) for n in dtype.names or ()]
    if size != dtype.itemsize or [tuple(f) for f in fields] != ours:
        raise ImportError(
            f"evtrace's core has rows of {size} bytes {fields}; the recorder reads {dtype.itemsize} {ours}"
        )


_check_row_layout(LIVE_DTYPE)

#: the recorder regions report to; None when no session is active. Public, read-only outside
#: this module (a module attribute, not a function: it is read once per region)
current: Recorder | None = None
#: region names, interned once per process: the hot path stores only their int keys
_NAMES: list[str] = []
_NAME_KEYS: dict[str, int] = {}
_names_lock = threading.Lock()


#: the recording journal's note taker for names interned while it runs (under _names_lock)
_noting: Callable[[bytes], None] | None = None


def name_key(name: str) -> int:
    """The int key of a region name (interned on first use, never on the hot path)."""
    k = _NAME_KEYS.get(name)
    if k is None:
        with _names_lock:
            k = _NAME_KEYS.get(name)
            if k is None:
                k = len(_NAMES)
                _NAMES.append(name)  # before the key: the core reads the name by key
                _NAME_KEYS[name] = k
                if _noting is not None:
                    _noting(_journal.note("name", [k, name]))
    return k


def core_parts() -> dict[str, Any]:
    """The name table's parts for ``_core.bind`` (regions.py binds the core once, at import):
    Region interns its name through them."""
    return {"name_keys": _NAME_KEYS, "name_key": name_key}


def name_of(key: int) -> str:
    """The region name interned as ``key``."""
    return _NAMES[key]


#: finished regions are packed into numpy chunks of at least this many (a long run keeps few chunks)
_CHUNK = 16384
_starting = threading.Lock()
#: CUDA graph captures (torch's CUDAGraph.capture_begin/end, patched while recording): a capture
#: begins only between the resolver's CUDA calls, and none are made until it ends
capture_began: Callable[[], None] = _core.capture_began
capture_ended: Callable[[], None] = _core.capture_ended


class Recorder:
    """One recording session. Not reusable: start it, run, stop it once."""

    def __init__(
        self,
        backend: Backend | None,
        clock: _align.Clock = time.perf_counter_ns,
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
        self.poll_s = poll_s
        self.pool_size = pool_size
        self.max_regions = max_regions
        self._chunk = (
            min(_CHUNK, max(1, max_regions // 8)) if max_regions else _CHUNK
        )  # the ring drops by chunks
        self.background = background
        self._thread_info: list[Thread] = []
        self._chunks: deque[_Chunk] = deque()
        self._kept = 0
        self.dropped_regions = 0  # oldest regions dropped to keep memory under max_regions
        self.unfinished = 0  # regions still open when the session stopped
        self.resolver_errors: list[str] = []
        self._stop_flag = threading.Event()
        self._thread: threading.Thread | None = None
        self._drain_lock = threading.Lock()
        self.origin_ns = 0
        self.wall_origin_ns = 0
        self.argv: list[str] = []
        self.pid = os.getpid()
        #: the journal's folder while one is written (``start_journal``)
        self.journal: Path | None = None
        self._labels: list[tuple[int, int, str]] = []  # streams learned: (device, handle, label)
        self._share = share_ns
        self._ranks = _hostclock.RankClocks(clock)  # clock offsets to rank 0, under torch.distributed
        opts: dict[str, Any] = dict(
            clock=None if clock is time.perf_counter_ns else clock,  # None: the core reads it itself
            on_thread=self._new_thread,
            on_full=self._drain,
            names=_NAMES,
            share_ns=0 if share_ns is None else share_ns,
            anchor_interval_ns=int(anchor_interval_s * 1e9),
            poll_ns=int(poll_s * 1e9),
            chunk=self._chunk,
            max_events=max_events,
            anchor_tries=anchor_tries,
        )
        if nvtx:
            from . import nvtx as _nvtx

            opts.update(_nvtx.calls())
        if backend is not None:
            hot = backend.hot_path()
            native = backend.native_runtime() if opts["clock"] is None else None
            opts.update(
                get_device=hot.get_device,
                raw_stream=hot.raw_stream,
                py_record=hot.record,
                py_query=backend.query,
                py_elapsed=backend.elapsed_ms,
                record_failed=backend.record_failed,
                learn_stream=self._learn_stream,
                new_event=backend.new_event,
                side=[backend.side_stream(d) for d in range(len(backend.devices))],
                cudart=native,
            )
        self._core = _core.Core(len(backend.devices) if backend else 0, **opts)
        #: the resolver runs natively, without the GIL (the CUDA runtime's own calls)
        self.native = bool(self._core.native)
        # the region calls (see the module docstring), bound once
        core = self._core
        self.enter: Callable[[int, Any], Any] = core.enter
        self.exit: Callable[[Any], None] = core.exit
        self.enter_host: Callable[[int, Any], Any] = core.enter_host
        self.exit_host: Callable[[Any], None] = core.exit
        self.enter_cross: Callable[[int, Any], Any] = core.enter_cross
        self.exit_cross: Callable[[Any], None] = core.exit

    @property
    def share_ns(self) -> int:
        """The window within which two boundaries share one event (measured at start)."""
        return int(self._core.share_ns)

    def _new_thread(self) -> None:
        """The core met a new thread: name its lane (the core numbers them in this order)."""
        t = Thread(threading.get_native_id(), _thread_name())
        self._thread_info.append(t)
        if self.journal is not None:
            self._core.journal_note(_journal.note("thread", [t.tid, t.name]))

    def _learn_stream(self, device: int, stream: int) -> None:
        """First sight of a stream: the backend labels it, and the journal keeps the label."""
        assert self.backend is not None
        self.backend.learn_stream(device, stream)
        label = (device, stream, self.backend.stream_label(device, stream))
        self._labels.append(label)
        if self.journal is not None:
            self._core.journal_note(_journal.note("stream", list(label)))

    def start_journal(self, trace: Path) -> Path:
        """Journal this session beside ``trace`` (``trace.journal``, see ``evtrace.journal``) until
        ``close_journal``. Raises OSError if the folder cannot be made or written."""
        global _noting
        folder = _journal.claim(trace)
        b = self.backend
        with _names_lock:  # every name is in the header or noted after it
            header = dict(
                format="evtrace-journal",
                version=_journal.VERSION,
                path=str(trace),
                pid=self.pid,
                origin_ns=self.origin_ns,
                wall_origin_ns=self.wall_origin_ns,
                argv=self.argv,
                share_ns=self.share_ns,
                max_regions=self.max_regions,
                devices=[[d.index, d.name] for d in b.devices] if b else [],
                environment=self.environment(list(b.devices) if b else []),
                names=list(_NAMES),
                threads=[[t.tid, t.name] for t in self._thread_info],
                labels=[list(x) for x in self._labels],
                meta=metadata.to_json(self._ranks.known()),
            )
            keep = self.max_regions or 0
            seg = min(_journal.SEGMENT_ROWS, keep // 8) if keep else _journal.SEGMENT_ROWS
            try:
                self._core.journal_open(
                    str(folder),
                    _journal.dumps(header),
                    int(_journal.FLUSH_S * 1e9),
                    max(self._chunk, seg),
                    keep,
                )
            except OSError:
                _journal.remove(folder)
                raise
            self.journal = folder
            _noting = self._core.journal_note
        self._ranks.on_start = lambda m: self._core.journal_note(_journal.note("meta", metadata.to_json(m)))
        return folder

    def close_journal(self, written: Path | None) -> str | None:
        """End the journal: ``written`` (the trace is there) marks it finished and removes it;
        None leaves it for ``evtrace recover``. Returns the error that stopped it, if one did."""
        global _noting
        folder, self.journal = self.journal, None
        if folder is None:
            return None
        with _names_lock:
            if _noting == self._core.journal_note:
                _noting = None
        err: str | None = self._core.journal_close(
            None if written is None else _journal.note("trace", str(written))
        )
        if written is not None:  # (a journal that stopped early is of no more use either)
            _journal.remove(folder)
        return err

    def name_of(self, key: int) -> str:
        return name_of(key)

    def environment(self, devices: list[DeviceInfo]) -> dict[str, Any]:
        return environment(devices)

    # ---- session lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        with _starting:  # two threads starting sessions at once: one of them is refused
            self._start()

    def _start(self) -> None:
        global current
        if current is not None:
            raise RuntimeError("an evtrace session is already recording; sessions do not nest")
        b = self.backend
        if b is not None:
            for d in range(len(b.devices)):
                self._core.fill(d, self.pool_size)
        t0 = time.time_ns()
        self.origin_ns = self.clock()
        self.wall_origin_ns = (t0 + time.time_ns()) // 2
        self.argv = list(sys.argv)
        if b is not None:
            self._core.anchor_now()
            if self._share is None:  # a launch takes at least as long as a record
                self._core.share_ns = min((b[1] - b[0] for b in self._core.last_brackets() if b), default=0)
            self._core.resolve_anchors()
            self._unguard = b.guard_captures(capture_began, capture_ended)
        self._core.activate(True)
        current = self
        self._ranks.start()
        if b is not None and self.background:
            if self.native:
                self._core.run()
            else:
                self._thread = threading.Thread(target=self._run, name="evtrace-resolver", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stop_flag.wait(self.poll_s):
            try:
                self._core.poll()
            except Exception as e:  # never take the user's program down; report at the end
                if len(self.resolver_errors) < 10:
                    self.resolver_errors.append(f"{type(e).__name__}: {e}")

    def stop(self) -> Session:
        """Resolve everything (one synchronize per device, here only) and build the Session."""
        global current
        if current is self:
            current = None
        self._core.activate(False)
        end_ns = self.clock()
        self._stop_flag.set()
        self._core.halt()
        self._core.journal_stop()  # its last flush comes once everything is resolved, below
        if self._thread is not None:
            self._thread.join()
        b = self.backend
        fault = None
        if b is not None:
            self._unguard()
            try:
                self._core.anchor_now()
                for d in range(len(b.devices)):
                    b.synchronize(d)
            except Exception as e:  # a device fault (an illegal access, a device-side assert) is sticky
                fault = f"{type(e).__name__}: {e}"
        self.unfinished = self._core.close_open(end_ns)
        try:
            self.poll()
        except Exception:  # after a fault every read fails: what was resolved before it is kept
            if fault is None:
                raise
        self._drain()
        if b is not None:
            self._core.flush()  # what is still unresolved keeps its host span, counted
        self._core.journal_flush()  # the journal as complete as the trace, until that is written
        self._drain()
        s = session(self, end_ns)
        s.meta.update(self._ranks.finish())
        if fault is not None:
            s.meta["device_fault"] = fault
        if b is not None:
            self._core.close()  # regions still open take no more events
            try:
                b.close()
            except Exception:  # events of a faulted device: the process's context is lost anyway
                if fault is None:
                    raise
        return s

    # ---- diagnostics (off the hot path: benchmarks, tests) ------------------------------------
    def anchor_now(self) -> None:
        """Take one anchor on each device now, as the resolver does every ``anchor_interval_s``
        (``poll()`` resolves it once the device has stamped it)."""
        self._core.anchor_now()

    def anchors(self, device: int) -> list[tuple[int, int, float]]:
        """A device's resolved anchors: host ns just before and just after each record, and the
        device time it was stamped at, in ms since the device's first anchor."""
        a: list[tuple[int, int, float]] = self._core.anchors(device)
        return a

    def streams(self) -> list[tuple[int, int]]:
        """(device, raw stream handle) of each stream index the rows use."""
        s: list[tuple[int, int]] = self._core.streams()
        return s

    def counts(self) -> dict[str, Any]:
        """What the core counted: regions without a device span by reason (the event pool dry, a
        record refused, a graph capture, a device call that failed, split over two devices, ...),
        marks skipped in captures, and the errors of the resolver and the hot path."""
        lost, captured, errors = self._core.counts()
        return dict(lost=lost, captured=captured, resolver_errors=[*self.resolver_errors, *errors])

    def raw_regions(self) -> np.ndarray:
        """The regions kept so far (after ``stop()``: all of them), in the order they began,
        before alignment: host ns on the recorder's clock, device ms since the device's first
        anchor (NaN without a device span); names are ``name_key`` keys."""
        self._drain()
        live = self.finished()[0]
        return live[np.argsort(live["host_start"], kind="stable")]

    def finished(self) -> tuple[np.ndarray, dict[int, dict[str, Any]]]:
        """The rows kept so far, in the order they were finished, and the args of those that have
        any, by row."""
        chunks = list(self._chunks)
        live = np.concatenate([c.rows for c in chunks]) if chunks else np.empty(0, LIVE_DTYPE)
        args: dict[int, dict[str, Any]] = {}
        base = 0
        for c in chunks:
            starts = np.r_[0, c.end[:-1]].tolist()
            for i, a, b in zip(c.at.tolist(), starts, c.end.tolist()):
                args[base + i] = orjson.loads(c.blob[a:b])
            base += len(c.rows)
        return live, args

    def threads(self) -> list[Thread]:
        """The threads that recorded, by the index rows give them."""
        return list(self._thread_info)

    # ---- finished rows ------------------------------------------------------------------------
    def poll(self, final: bool = False) -> None:
        """One resolver step: a due anchor, finished events resolved. ``final``: and every row
        finished so far into storage (else the hot path moves them once a chunk's worth is there)."""
        if self.backend is not None:
            self._core.poll()
        if final:
            self._drain()

    def _drain(self) -> None:
        """Move the core's finished rows into a packed chunk (46 B a region, and its args as JSON
        text): a chunk keeps its own args, so the ring drops both in constant time."""
        with self._drain_lock:
            raw, at, end, blob = self._core.take()
            if not raw:
                return
            chunk = _Chunk(
                np.frombuffer(raw, LIVE_DTYPE),
                np.frombuffer(at, np.int64),
                np.frombuffer(end, np.int64),
                blob,
            )
            self._chunks.append(chunk)
            self._kept += len(chunk.rows)
            while (
                self.max_regions
                and len(self._chunks) > 1
                and self._kept - len(self._chunks[0].rows) >= self.max_regions
            ):
                old = self._chunks.popleft()  # a ring of chunks: the oldest regions go first
                self._kept -= len(old.rows)
                self.dropped_regions += len(old.rows)


class _Chunk(NamedTuple):
    """Finished rows and their args: for each row with args (``at``, an index into ``rows``),
    the end of its JSON text in ``blob`` (it starts where the previous one ends)."""

    rows: np.ndarray
    at: np.ndarray
    end: np.ndarray
    blob: bytes


def _thread_name() -> str:
    """The thread's Python name; threads torch started for backward are named as such."""
    th = threading.current_thread()
    torch = sys.modules.get("torch")
    if isinstance(th, threading._DummyThread) and torch is not None:  # started outside Python
        if private.in_autograd(torch):
            return f"autograd thread {threading.get_native_id()}"
    return th.name


def _before_fork() -> None:
    """Fork only between session starts and name interning: a lock held by another thread at the
    fork would stay held in the child for ever. (The core's own locks start afresh there.)"""
    _starting.acquire()
    _names_lock.acquire()


def _after_fork_in_parent() -> None:
    _names_lock.release()
    _starting.release()


def _forget_in_child() -> None:
    """A forked child (e.g. a DataLoader worker) does not record into its parent's session."""
    global current
    current = None
    _core.after_fork_in_child()
    _after_fork_in_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_forget_in_child
    )
