"""``record``: start a session, run, resolve, write the trace, print one line."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import defaults, formats
from . import recorder as _rec
from .analysis import lost_device_spans, plural
from .clock import Clock, alignment_warnings
from .device import Backend, cuda_backend
from .finish import Finishing, Terminated, die_by, settle, signum_of, take_ending
from .journal import recover_hint
from .journal import remove as remove_journal
from .meta import redacted_argv
from .session import COUNTS, Session

F = TypeVar("F", bound=Callable[..., Any])
_said_no_cuda = False
#: the record() whose session is recording in this process: a record() entered meanwhile is a
#: view of it (sessions do not nest in the recorder)
_active: record | None = None
#: the names default_path() gave (absolute), with their stem: such a name is written
#: exclusively, never over an existing file (runs in the same second, or in two processes)
_defaults: dict[Path, str] = {}


def default_path() -> Path:
    """``evtrace-YYYYmmdd-HHMMSS.json.gz`` in the working directory, or with ``-1``, ``-2``...
    when that is taken (``-rank<R>`` last under torchrun). Checked again when it is written."""
    stem = time.strftime("evtrace-%Y%m%d-%H%M%S")
    n = 0
    while _numbered(stem, n).exists():
        n += 1
    path = _numbered(stem, n)
    _defaults[path.absolute()] = stem
    return path


def _rescue_path(target: Path) -> Path:
    """A new file in the temp directory for a trace that could not be written at ``target``."""
    suffix = "".join(target.suffixes[-2:]) if target.name.endswith(".gz") else target.suffix
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    directory, n = Path(tempfile.gettempdir()), 0
    while True:
        path = directory / f"{stem}-{os.getpid()}{f'-{n}' if n else ''}{suffix}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            n += 1


def _numbered(stem: str, n: int) -> Path:
    return rank_path(Path(f"{stem}-{n}.json.gz" if n else f"{stem}.json.gz"))


def _claim(stem: str, first: Path) -> Path:
    """Create the first free default name in ``first``'s directory, exclusively (O_EXCL: two processes
    never get the same one); the write then replaces this empty file."""
    directory, n = first.parent, 0
    while True:
        path = directory / _numbered(stem, n).name
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            n += 1


def rank_path(path: Path) -> Path:
    """Under torchrun each rank writes its own file: ``name-rank3.json.gz``."""
    from .meta import rank

    rw = rank()
    if rw is None:
        return path
    stem, suffix = formats.split_suffix(path.name)
    return path.with_name(f"{stem}-rank{rw[0]}{suffix}")


def _can_create_in(directory: Path) -> bool:
    """Really try (permissions alone miss read-only mounts, and root passes every access check)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def output_problem(path: Path, trace: bool = True) -> str | None:
    """Why ``path`` cannot be written (a trace by default: a suffix of ``formats.TABLE``), or None."""
    if path.is_dir():
        return f"output path {path} is a directory"
    if trace and formats.suffix_problem(path):
        return f"output path {formats.suffix_problem(path)}"
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f"output directory {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK) or not _can_create_in(parent):
        return f"output directory {parent} is not writable"
    if path.exists() and not os.access(path, os.W_OK):
        return f"output file {path} is not writable"
    return None


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

    session: Session | None
    path: Path | None

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
        self._opts: dict[str, Any] = dict(
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
        self.quiet, self.open, self.report, self.redact_argv = quiet, open, report, redact_argv
        self._hooks: Any = None
        self._old_ending: dict[int, Any] = {}  # handlers replaced for SIGTERM and SIGHUP
        self.session = None
        self.path = None
        self._recorder: _rec.Recorder | None = None
        self._profiler = profiler
        self._pid = 0
        self._target = Path()
        self._stem: str | None = None
        self._outer: record | None = None  # the session this one is a view of
        self._span = (0, 0)  # a view's span, on the outer recorder's clock
        self._origin = 0  # a view's: the outer recorder's origin
        #: False once the trace could not be written at ``path`` as asked (it may be in the temp directory)
        self.written_where_asked = True
        self._views: list[record] = []  # views exited inside this session

    def __enter__(self) -> record:
        global _active
        self._pid = os.getpid()  # only this process writes: a forked child's copy never does
        if self._path is None:
            self.path = default_path()
        elif self._path.absolute() in _defaults:  # the CLI's default: ranked already
            self.path = self._path
        else:
            self.path = rank_path(self._path)
        # where it is written, fixed now: a script may change directory before the end (Hydra)
        self._target = self.path.absolute()
        self._stem = _defaults.get(self._target)
        problem = output_problem(self.path)
        if problem:
            raise ValueError(f"evtrace: {problem}")
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
        if self._target == outer._target:  # the same file (a decorated function called recursively)
            self._outer = None  # is that session's: nothing of its own to write
            return
        ignored = [k for k in _OUTER_ONLY if self._opts[k] != outer._opts[k]]
        if self._profiler is not None:
            ignored.append("profiler")
        if ignored and not self.quiet:
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
        o = self._opts
        backend: Backend | None = o["backend"]
        if backend is None and o["device"] is not False:
            backend = cuda_backend()
            if backend is None and not _said_no_cuda and not self.quiet:
                _said_no_cuda = True
                print("evtrace: no CUDA device; recording host lanes only", file=sys.stderr)
        self._recorder = _rec.Recorder(
            backend,
            o["clock"],
            anchor_interval_s=o["anchor_interval"],
            pool_size=o["pool_size"],
            max_regions=o["max_regions"],
            nvtx=o["nvtx"] and backend is not None,
        )
        self._recorder.start()
        self._recorder.argv = redacted_argv(self._recorder.argv, only_name=self.redact_argv)
        try:  # on disk as it runs: a kill, os._exit or a crash leaves `evtrace recover` something
            if o["journal"]:
                self._recorder.start_journal(self._target)
        except OSError as e:
            if not self.quiet:
                print(
                    f"evtrace: no journal beside {self.path} ({e.strerror or e}): "
                    "a crash would lose this recording",
                    file=sys.stderr,
                )
        if o["hooks"]:
            from .autohooks import Hooks

            self._hooks = Hooks(o["depth"], o["include"], o["exclude"])

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
            outer, self._outer = self._outer, None
            if outer is None:
                return
            if outer._recorder is not None:
                self._span = (self._span[0], outer._recorder.clock())
                outer._views.append(self)
                if not self.quiet:
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
            return
        assert self._recorder is not None and self.path is not None
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
            self.session = rec.stop()
            self._recorder = None
            fin.written = self._write(self.session)
            self._close_journal(rec, fin.written)
            if fin.written:
                ending = exc_type is Terminated
                if self._profiler is not None and not ending:
                    self._with_profiler(self._profiler)
                if not self.quiet:
                    sys.stdout.flush()  # keep the script's own output first
                    print(describe(self.session, self.path), file=sys.stderr)
                if self.report and not ending:
                    self._write_report()
            self._write_views(origin, self._views)  # their files, whether this one was written or not
            self._views = []
            if exc_type is Terminated:
                die_by(signum_of(exc) if isinstance(exc, BaseException) else signal.SIGTERM)
            if not fin.written:
                return
        if self.open:
            from .view import OPEN_TIMEOUT_S, serve

            try:
                serve(self.path, timeout=OPEN_TIMEOUT_S)
            except OSError as e:
                print(
                    f"evtrace: could not serve {self.path} on 127.0.0.1:9001: {e.strerror or e}",
                    file=sys.stderr,
                )

    def _close_journal(self, rec: _rec.Recorder, written: bool) -> None:
        """The trace is written: its journal goes. Not written anywhere: the journal stays, named."""
        folder = rec.journal
        err = rec.close_journal(self.path.absolute() if written and self.path else None)
        if folder is None:
            return
        if err is not None and not self.quiet:
            print(f"evtrace: the journal {folder} stopped early: {err}", file=sys.stderr)
        if not written:
            print(f"evtrace: the recording is kept in {folder}: {recover_hint(folder)}", file=sys.stderr)

    def _write_views(self, origin: int, views: list[record]) -> None:
        """The files of record()s entered inside this session (``origin``: its clock's origin)."""
        assert self.session is not None
        for v in views:
            v.session = _within(self.session, v._span[0] - origin, v._span[1] - origin)
            if v.redact_argv:
                v.session.meta["argv"] = redacted_argv(v.session.meta["argv"], only_name=True)
            if v._write(v.session) and not v.quiet:
                assert v.path is not None
                print(describe(v.session, v.path), file=sys.stderr)

    def _write(self, s: Session) -> bool:
        """Save ``s`` where this session said it would (a default name: the first free one), and
        name it so from the current directory too; False, having said why, if it could not."""
        assert self.path is not None
        target = self._target
        try:
            if self._stem is not None:
                target = _claim(self._stem, target)
            s.save(target)
        except OSError as e:  # a full disk, a quota: the temp directory may still have room
            if target != self._target:
                target.unlink(missing_ok=True)
            self.written_where_asked = False
            why = f"evtrace: could not write {self.path}: {e.strerror or e}"
            try:
                rescue = _rescue_path(target)
                s.save(rescue)
            except OSError as e2:  # the session is still in memory: .session.save(elsewhere)
                print(f"{why}; nor in the temp directory: {e2.strerror or e2}", file=sys.stderr)
                return False
            print(f"{why}; wrote {rescue} instead", file=sys.stderr)
            self.path = rescue
            return True
        if Path(os.path.abspath(self.path)) != target:  # moved on, or the script left its directory
            self.path = target if self.path.absolute() != self._target else self.path.with_name(target.name)
        return True

    def _with_profiler(self, prof: Any) -> None:
        """Merge torch.profiler's trace into the written one: now if it has stopped, else right
        after it stops (``with profile() as prof, record(profiler=prof)`` exits us first)."""
        if getattr(getattr(prof, "profiler", None), "kineto_results", None) is not None:
            self._merge_profiler(prof)
            return
        stop = prof.stop

        def stop_then_merge() -> None:
            del prof.stop  # the profiler's own method again
            stop()
            self._merge_profiler(prof)

        prof.stop = stop_then_merge

    def _merge_profiler(self, prof: Any) -> None:
        import tempfile

        from .export.kineto import attach
        from .files import read_json

        assert self.session is not None and self.path is not None
        with tempfile.TemporaryDirectory(prefix="evtrace-") as tmp:
            kineto = Path(tmp) / "torch_profiler.json"
            try:
                prof.export_chrome_trace(str(kineto))
                self.session = attach(self.session, read_json(kineto), "torch.profiler")
                self.session.save(self.path)
            except Exception as e:  # the evtrace trace is written already: keep it, say why
                print(f"evtrace: could not merge the torch.profiler trace: {e}", file=sys.stderr)
                return
        if not self.quiet:
            fit = self.session.meta["profiler"][str(len(self.session.meta["profiler"]) - 1)]
            print(
                f"evtrace: merged torch.profiler's trace into {self.path} ({fit['events_placed']} events; "
                f"{fit['kernels_inside']}/{fit['kernels_placed']} kernels inside their region's span)",
                file=sys.stderr,
            )

    def _write_report(self) -> None:
        """The markdown report and the SVG timeline, beside the trace."""
        from .export.render import render
        from .export.report import report

        assert self.session is not None and self.path is not None
        stem = formats.split_suffix(self.path.name)[0]
        md, svg = self.path.with_name(stem + ".md"), self.path.with_name(stem + ".svg")
        try:
            md.write_text(report(self.session, self.path), encoding="utf-8")
            svg.write_text(render(self.session), encoding="utf-8")
        except (OSError, ValueError) as e:
            print(f"evtrace: could not write the report: {e}", file=sys.stderr)
            return
        if not self.quiet:
            print(f"evtrace: wrote {md} and {svg}", file=sys.stderr)

    def __call__(self, fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            with record(self._path, **self._opts):
                return fn(*a, **k)

        return wrapper  # type: ignore[return-value]


def recorder_current() -> _rec.Recorder | None:
    return _rec.current


#: the options only the recording session uses: a view is told they are ignored
_OUTER_ONLY = (
    "device",
    "anchor_interval",
    "pool_size",
    "max_regions",
    "hooks",
    "depth",
    "include",
    "exclude",
    "nvtx",
    "journal",
    "backend",
    "clock",
)

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


def describe(s: Session, path: Path) -> str:
    """The one line printed after a session: where, how much, how to open it."""
    extra = ""
    lost = lost_device_spans(s.meta)
    if lost:
        extra += f", {lost} device spans lost"
    for key, what in (
        ("dropped_regions", "oldest regions dropped (max_regions)"),
        ("unfinished_regions", "unfinished"),
    ):
        if int(s.meta.get(key, 0)):
            extra += f", {s.meta[key]} {what}"
    clamped = int(s.meta.get("clamped_device_spans", 0))
    if clamped:
        extra += f", {clamped} clamped to their launch"
    said = "".join(f"\nevtrace: warning: {w}" for w in alignment_warnings(s.meta))
    if s.meta.get("device_fault"):
        said += (
            f"\nevtrace: the device faulted ({s.meta['device_fault']}): every region kept its host span; "
            "device spans resolved before the fault are kept, later ones are counted as lost"
        )
    counts = f"{plural(len(s), 'region')}, {plural(s.device_spans, 'device span')}"
    return (
        f"evtrace: wrote {path} ({counts}{extra}); "
        f"open it in https://ui.perfetto.dev or run: evtrace summary {shlex.quote(str(path))}{said}"
    )
