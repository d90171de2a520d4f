"""``record``: the public face of a session. Its options (:class:`Options`) and its lifecycle:
start the recorder, stop it, and a record() entered inside another as a view of that session.
What follows the stop (the write, the line, the report...) is ``output.py``'s."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import defaults
from . import recorder as _rec
from .align import Clock
from .device import Backend, cuda_backend
from .finish import Finishing, Terminated, die_by, settle, signum_of, take_ending
from .journal import remove as remove_journal
from .output import Output
from .provenance import redacted_argv
from .session import COUNTS, Session

F = TypeVar("F", bound=Callable[..., Any])
_said_no_cuda = False
#: the record() whose session is recording in this process: a record() entered meanwhile is a
#: view of it (sessions do not nest in the recorder)
_active: record | None = None
#: an option only the recording session uses: a view is told it is ignored
_OUTER = {"outer_only": True}


@dataclasses.dataclass(frozen=True)
class Options:
    """``record()``'s options but its path and its profiler. No defaults here: they are
    ``record``'s signature, and mypy checks that ``record`` passes every field."""

    device: bool | None = dataclasses.field(metadata=_OUTER)
    anchor_interval: float = dataclasses.field(metadata=_OUTER)
    pool_size: int = dataclasses.field(metadata=_OUTER)
    quiet: bool
    open: bool
    max_regions: int | None = dataclasses.field(metadata=_OUTER)
    redact_argv: bool
    hooks: bool = dataclasses.field(metadata=_OUTER)
    depth: int | None = dataclasses.field(metadata=_OUTER)
    include: str | None = dataclasses.field(metadata=_OUTER)
    exclude: str | None = dataclasses.field(metadata=_OUTER)
    nvtx: bool = dataclasses.field(metadata=_OUTER)
    report: bool
    journal: bool = dataclasses.field(metadata=_OUTER)
    backend: Backend | None = dataclasses.field(metadata=_OUTER)
    clock: Clock = dataclasses.field(metadata=_OUTER)


#: the options only the recording session uses, in signature order
_OUTER_ONLY = tuple(f.name for f in dataclasses.fields(Options) if f.metadata.get("outer_only"))


class record:
    """Record a session: ``with evtrace.record(): ...`` or ``@evtrace.record()``.

    On exit it resolves the outstanding device events (one synchronize), writes the trace
    (default ``evtrace-YYYYmmdd-HHMMSS.json.gz``, ``-1``, ``-2``... when taken; ``.json`` for plain
    JSON) and prints where. A relative path is relative to where the session started; only the
    process that started it writes (a forked child's copy does not). Inside another session it
    is a view of that one: its file, of the regions within its span, is written when that ends.
    The finished :class:`Session` is then ``.session``.

    Options: ``device`` (None: CUDA when available; False: host lanes only), ``anchor_interval``
    (seconds between clock anchors), ``pool_size`` (pre-created events per GPU), ``quiet``
    (no line printed), ``open`` (serve the trace to ui.perfetto.dev once written),
    ``max_regions`` (keep at most this many, dropping the oldest, counted; None: no limit),
    ``redact_argv`` (keep only the script's name of the command line; by default the command
    line is kept as given, with the values of options named like a key, token, secret, password
    or auth replaced by ``<redacted>``), ``hooks`` (trace an
    unmodified program: modules down to ``depth``, filtered by the ``include``/``exclude``
    regexes, backward, optimizer, data waits and host waits; see ``evtrace.autohooks.Hooks``),
    ``nvtx`` (also emit NVTX ranges), ``report`` (also write ``<name>.md`` and ``<name>.svg``
    beside the trace), ``profiler`` (a ``torch.profiler.profile`` of the same run: its trace is
    exported and merged into ours, on our clock, once both have stopped; see ``export.kineto``),
    ``journal`` (keep the recording on disk as it runs, in ``<path>.journal``, removed once the
    trace is written: a killed or crashed run leaves it for ``evtrace recover``; see
    ``evtrace.journal``), and, for tests and other devices, ``backend`` and ``clock``.

    SIGTERM while recording (main thread, default handler) writes the trace first, then ends
    the process as SIGTERM would. Ctrl-C raises KeyboardInterrupt as usual, through ``__exit__``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        device: bool | None = None,
        anchor_interval: float = defaults.ANCHOR_INTERVAL_S,
        pool_size: int = 1024,
        quiet: bool = False,
        open: bool = False,
        max_regions: int | None = defaults.MAX_REGIONS,
        redact_argv: bool = False,
        hooks: bool = False,
        depth: int | None = defaults.HOOK_DEPTH,
        include: str | None = None,
        exclude: str | None = None,
        nvtx: bool = False,
        report: bool = False,
        profiler: Any = None,
        journal: bool = True,
        backend: Backend | None = None,
        clock: Clock = time.perf_counter_ns,
    ) -> None:

        self._path = Path(path) if path is not None else None
        self._options = Options(
            device=device,
            anchor_interval=anchor_interval,
            pool_size=pool_size,
            quiet=quiet,
            open=open,
            max_regions=max_regions,
            redact_argv=redact_argv,
            hooks=hooks,
            depth=depth,
            include=include,
            exclude=exclude,
            nvtx=nvtx,
            report=report,
            journal=journal,
            backend=backend,
            clock=clock,
        )
        self._profiler = profiler
        self._out = Output(quiet=quiet, open=open, report=report, redact_argv=redact_argv)
        self._hooks: Any = None
        self._old_ending: dict[int, Any] = {}  # handlers replaced for SIGTERM and SIGHUP
        self._recorder: _rec.Recorder | None = None
        self._pid = 0
        self._outer: record | None = None  # the session this one is a view of
        self._span = (0, 0)  # a view's span, on the outer recorder's clock
        self._origin = 0  # a view's: the outer recorder's origin
        self._views: list[record] = []  # views exited inside this session

    @property
    def session(self) -> Session | None:
        """The finished :class:`Session`, once written (None before)."""
        return self._out.session

    @property
    def path(self) -> Path | None:
        """Where the trace is written (fixed on entry; the temp directory's file if it had to be)."""
        return self._out.path

    @property
    def written_where_asked(self) -> bool:
        """False once the trace could not be written at ``path`` as asked (it may be in the temp
        directory)."""
        return self._out.written_where_asked

    def __enter__(self) -> record:
        global _active
        self._pid = os.getpid()  # only this process writes: a forked child's copy never does
        self._out.aim(self._path)
        if recorder_current() is not None and _active is not None and _active._pid == self._pid:
            self._view_of(_active)
            return self
        # first: importing torch for the backend or the hooks takes seconds, a SIGTERM then included
        if threading.current_thread() is threading.main_thread():
            settle()  # a handler a session ended on another thread could not put back
        self._old_ending = take_ending()
        try:
            self._start()
        except BaseException:  # a signal or an error while starting: leave nothing half started
            if self._hooks is not None:
                self._hooks.remove()
                self._hooks = None
            if self._recorder is not None:
                self._recorder.stop()
                folder = self._recorder.journal
                self._recorder.close_journal(None)
                if folder is not None:  # nothing of the user's ran yet: nothing to recover
                    remove_journal(folder)
                self._recorder = None
            for s, h in self._old_ending.items():
                signal.signal(s, h)
            self._old_ending = {}
            raise
        _active = self
        atexit.register(self._at_exit)
        return self

    def _view_of(self, outer: record) -> None:
        """Inside another record() (or ``evtrace run``): this one is a view of that session, written
        from its regions within this span once that session has stopped and resolved them."""
        assert outer._recorder is not None
        self._outer = outer
        self._span = (outer._recorder.clock(), 0)
        self._origin = outer._recorder.origin_ns
        if self._out.target == outer._out.target:  # the same file (a decorated function called recursively)
            self._outer = None  # is that session's: nothing of its own to write
            return
        ignored = [k for k in _OUTER_ONLY if getattr(self._options, k) != getattr(outer._options, k)]
        if self._profiler is not None:
            ignored.append("profiler")
        if ignored and not self._options.quiet:
            print(
                f"evtrace: inside another session, which records with its own options: "
                f"{', '.join(ignored)} ignored",
                file=sys.stderr,
            )

    def _at_exit(self) -> None:
        """The interpreter is exiting with this session still open (entered, never exited): write
        it, rather than lose what it recorded."""
        if self._recorder is not None and os.getpid() == self._pid:
            print("evtrace: the program is ending with a session still open: writing it", file=sys.stderr)
            self.__exit__()

    def _start(self) -> None:
        global _said_no_cuda
        o = self._options
        backend = o.backend
        if backend is None and o.device is not False:
            backend = cuda_backend()
            if backend is None and not _said_no_cuda and not o.quiet:
                _said_no_cuda = True
                print("evtrace: no CUDA device; recording host lanes only", file=sys.stderr)
        self._recorder = _rec.Recorder(
            backend,
            o.clock,
            anchor_interval_s=o.anchor_interval,
            pool_size=o.pool_size,
            max_regions=o.max_regions,
            nvtx=o.nvtx and backend is not None,
        )
        self._recorder.start()
        self._recorder.argv = redacted_argv(self._recorder.argv, only_name=o.redact_argv)
        try:  # on disk as it runs: a kill, os._exit or a crash leaves `evtrace recover` something
            if o.journal:
                self._recorder.start_journal(self._out.target)
        except OSError as e:
            if not o.quiet:
                print(
                    f"evtrace: no journal beside {self.path} ({e.strerror or e}): "
                    "a crash would lose this recording",
                    file=sys.stderr,
                )
        if o.hooks:
            from .autohooks import Hooks

            self._hooks = Hooks(o.depth, o.include, o.exclude)

    def __exit__(self, exc_type: Any = None, exc: Any = None, tb: Any = None) -> None:
        try:
            self._exit(exc_type, exc, tb)
        except (KeyboardInterrupt, Terminated) as e:
            if exc_type is not None or self._recorder is None or os.getpid() != self._pid:
                raise  # the signal held while writing, raised again once written; or not ours
            # it came as the script ended, before the write's own signal handling was in place:
            # write now, then end by it
            self._exit(type(e), e, e.__traceback__)
            raise

    def _exit(self, exc_type: Any, exc: Any, tb: Any) -> None:
        global _active
        if os.getpid() != self._pid:  # a forked child's copy: its parent writes the trace
            return
        if self._recorder is None:  # a view of another session (or one of its own file)
            self._end_view()
            return
        assert self.path is not None
        atexit.unregister(self._at_exit)
        with Finishing(self.path) as fin:  # from here on a signal waits until the trace is written
            if self._hooks is not None:  # first: nothing evtrace does from here on is traced
                self._hooks.remove()
                self._hooks = None
            for s, h in self._old_ending.items():
                fin.restore(s, h)  # on another thread: later, by the main one
            self._old_ending = {}
            origin = self._recorder.origin_ns
            if _active is self:
                _active = None
            rec = self._recorder
            fin.journal = rec.journal
            session = rec.stop()
            self._recorder = None
            ending = exc_type is Terminated
            self._out.finish(session, rec, fin, ending=ending, profiler=self._profiler)
            self._write_views(origin, self._views)  # their files, whether this one was written or not
            self._views = []
            if ending:
                die_by(signum_of(exc) if isinstance(exc, BaseException) else signal.SIGTERM)
            if not fin.written:
                return
        self._out.serve()

    def _end_view(self) -> None:
        """A view's end: its file is written once the enclosing session has stopped (now, if it has)."""
        outer, self._outer = self._outer, None
        if outer is None:
            return
        if outer._recorder is not None:
            self._span = (self._span[0], outer._recorder.clock())
            outer._views.append(self)
            if not self._options.quiet:
                print(f"evtrace: {self.path} is written when the enclosing session ends", file=sys.stderr)
        elif outer.session is not None:  # that session ended first: written now, up to its end
            end = self._origin + int(outer.session.meta.get("duration_ns", 0))
            self._span = (self._span[0], end)
            outer._write_views(self._origin, [self])
        else:
            print(
                f"evtrace: {self.path} was not written: its enclosing session wrote nothing",
                file=sys.stderr,
            )

    def _write_views(self, origin: int, views: list[record]) -> None:
        """The files of record()s entered inside this session (``origin``: its clock's origin)."""
        assert self.session is not None
        for v in views:
            v._out.finish_view(_within(self.session, v._span[0] - origin, v._span[1] - origin))

    def __call__(self, fn: F) -> F:
        path, options = self._path, self._options

        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            with record(path, **vars(options)):
                return fn(*a, **k)

        return wrapper  # type: ignore[return-value]


def recorder_current() -> _rec.Recorder | None:
    return _rec.current


#: counts of the enclosing session as a whole, which a view's span does not share
_SESSION_WIDE = (*COUNTS, "lost_device_spans", "device_fault")


def _within(s: Session, start: int, end: int) -> Session:
    """The regions of ``s`` that lie within [start, end] (ns since its origin), on a clock that
    starts at ``start``."""
    r = s.regions
    keep = np.flatnonzero((r["host_start"] >= start) & (r["host_end"] <= end))
    regions = r[keep]
    for f in ("host_start", "host_end"):
        regions[f] -= start
    used = sorted(set(regions["name"].tolist()))
    regions["name"] = np.searchsorted(np.array(used, dtype=np.int64), regions["name"])
    dev = regions["device"] >= 0
    for f in ("dev_start", "dev_end"):
        regions[f][dev] -= start
    index = {int(i): k for k, i in enumerate(keep.tolist())}
    args = {index[i]: a for i, a in s.args.items() if i in index}
    meta = {k: v for k, v in s.meta.items() if k not in _SESSION_WIDE}
    meta.update(
        regions=len(regions),
        device_spans=int(dev.sum()),
        duration_ns=end - start,
        origin_perf_ns=int(meta.get("origin_perf_ns", 0)) + start,
        unfinished_regions=sum(1 for a in args.values() if a.get("unfinished")),
    )
    return dataclasses.replace(
        s,
        regions=regions,
        names=[s.names[k] for k in used],
        args=args,
        meta=meta,
        wall_origin_ns=s.wall_origin_ns + start,
        profiler=[],
    )
