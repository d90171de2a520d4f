"""``record``: start a session, run, resolve, write the trace, print one line."""

from __future__ import annotations

import atexit
import functools
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from . import defaults
from . import recorder as _rec
from .clock import Clock, alignment_warnings
from .device import Backend, cuda_backend
from .finish import Finishing, Terminated, die_by, on_sigterm
from .meta import redacted_argv
from .session import Session

F = TypeVar("F", bound=Callable[..., Any])
_said_no_cuda = False


def default_path() -> Path:
    return rank_path(Path(time.strftime("evtrace-%Y%m%d-%H%M%S.json.gz")))


def rank_path(path: Path) -> Path:
    """Under torchrun each rank writes its own file: ``name-rank3.json.gz``."""
    from .meta import rank

    rw = rank()
    if rw is None:
        return path
    name = path.name
    stem, suffix = (
        (name[: -len(".json.gz")], ".json.gz") if name.endswith(".json.gz") else (path.stem, path.suffix)
    )
    return path.with_name(f"{stem}-rank{rw[0]}{suffix}")


def _can_create_in(directory: Path) -> bool:
    """Really try (permissions alone miss read-only mounts, and root passes every access check)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def output_problem(path: Path, suffixes: tuple[str, ...] | None = (".json", ".gz")) -> str | None:
    """Why ``path`` cannot be written (a trace by default: ``.json`` or ``.json.gz``), or None."""
    if path.is_dir():
        return f"output path {path} is a directory"
    if suffixes is not None and path.suffix not in suffixes:
        return f"output path {path} must end in .json or .json.gz"
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
    (default ``evtrace-YYYYmmdd-HHMMSS.json.gz``; ``.json`` for plain JSON) and prints where.
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
    exported and merged into ours, on our clock, once both have stopped; see ``export.kineto``), and,
    for tests and other devices, ``backend`` and ``clock``.

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
            backend=backend,
            clock=clock,
        )
        self.quiet, self.open, self.report, self.redact_argv = quiet, open, report, redact_argv
        self._hooks: Any = None
        self._old_sigterm: Any = None
        self.session = None
        self.path = None
        self._recorder: _rec.Recorder | None = None
        self._profiler = profiler

    def __enter__(self) -> record:
        self.path = rank_path(self._path) if self._path else default_path()
        problem = output_problem(self.path)
        if problem:
            raise ValueError(f"evtrace: {problem}")
        # first: importing torch for the backend or the hooks takes seconds, a SIGTERM then included
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        ):
            self._old_sigterm = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            self._start()
        except BaseException:  # a signal or an error while starting: leave nothing half started
            if self._hooks is not None:
                self._hooks.remove()
                self._hooks = None
            if self._recorder is not None:
                self._recorder.stop()
                self._recorder = None
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None
            raise
        atexit.register(self._at_exit)
        return self

    def _at_exit(self) -> None:
        """The interpreter is exiting with this session still open (entered, never exited): write
        it, rather than lose what it recorded."""
        if self._recorder is not None:
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
        if o["hooks"]:
            from .autohooks import Hooks

            self._hooks = Hooks(o["depth"], o["include"], o["exclude"])

    def __exit__(self, exc_type: Any = None, exc: Any = None, tb: Any = None) -> None:
        assert self._recorder is not None and self.path is not None
        atexit.unregister(self._at_exit)
        with Finishing(self.path) as fin:  # from here on a signal waits until the trace is written
            if self._hooks is not None:  # first: nothing evtrace does from here on is traced
                self._hooks.remove()
                self._hooks = None
            if self._old_sigterm is not None:
                fin.restore(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None
            self.session = self._recorder.stop()
            self._recorder = None
            try:
                self.session.save(self.path)
                fin.written = True
            except OSError as e:  # the session is still in memory: .session.save(elsewhere)
                print(f"evtrace: could not write {self.path}: {e.strerror or e}", file=sys.stderr)
                return
            finally:
                if exc_type is Terminated:
                    if fin.written and not self.quiet:
                        print(describe(self.session, self.path), file=sys.stderr)
                    die_by(signal.SIGTERM)
            if self._profiler is not None:
                self._with_profiler(self._profiler)
            if not self.quiet:
                sys.stdout.flush()  # keep the script's own output first
                print(describe(self.session, self.path), file=sys.stderr)
            if self.report:
                self._write_report()
        if self.open:
            from .view import serve

            try:
                serve(self.path)
            except OSError as e:
                print(
                    f"evtrace: could not serve {self.path} on 127.0.0.1:9001: {e.strerror or e}",
                    file=sys.stderr,
                )

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
        stem = self.path.name.removesuffix(".gz").removesuffix(".json")
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


def describe(s: Session, path: Path) -> str:
    """The one line printed after a session: where, how much, how to open it."""
    extra = ""
    lost = int(s.meta.get("dropped_device_spans", 0)) + int(s.meta.get("split_device_spans", 0))
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
    return (
        f"evtrace: wrote {path} ({len(s)} regions, {s.device_spans} device spans{extra}); "
        f"open it in https://ui.perfetto.dev or run: evtrace summary {path}{said}"
    )
