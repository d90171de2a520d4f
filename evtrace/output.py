"""What follows a session's stop, for one ``record()``: the trace written (a default name claimed
exclusively; the temp directory when the disk refuses), its journal closed, the closing line, the
report beside it, torch.profiler's trace merged in, the page served. The signals held meanwhile are
``finish.py``'s; where the trace goes is ``paths.py``'s."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from . import formats
from .align import alignment_warnings
from .analysis import lost_device_spans, plural
from .finish import Finishing
from .journal import recover_hint
from .paths import claim, default_path, default_stem, output_problem, rank_path, rescue_path
from .provenance import redacted_argv
from .recorder import Recorder
from .session import Session


class Output:
    """Where one ``record()`` writes, and what it does with its session once that has stopped.

    ``session``, ``path`` and ``written_where_asked`` are what ``record`` shows its user."""

    def __init__(self, *, quiet: bool, open: bool, report: bool, redact_argv: bool) -> None:
        self.quiet, self.open, self.report, self.redact_argv = quiet, open, report, redact_argv
        self.session: Session | None = None
        self.path: Path | None = None
        #: where it is written, fixed by aim(): a script may change directory before the end (Hydra)
        self.target = Path()
        self._stem: str | None = None  # a default name's: claimed exclusively at the end
        #: False once the trace could not be written at ``path`` as asked (it may be in the temp directory)
        self.written_where_asked = True

    def aim(self, path: Path | None) -> None:
        """Fix where the trace goes (a default name if None; a rank's own under torchrun);
        ValueError, saying why, if it cannot be written there."""
        if path is None:
            self.path = default_path()
        elif default_stem(path.absolute()) is not None:  # the CLI's default: ranked already
            self.path = path
        else:
            self.path = rank_path(path)
        self.target = self.path.absolute()
        self._stem = default_stem(self.target)
        problem = output_problem(self.path)
        if problem:
            raise ValueError(f"evtrace: {problem}")

    def finish(self, s: Session, rec: Recorder, fin: Finishing, *, ending: bool, profiler: Any) -> None:
        """A stopped session's trace written (``fin.written`` says whether), ``rec``'s journal closed;
        once written, the profiler's trace merged, the line printed, the report written (the last
        two not when the process is ``ending`` by a signal, which is owed at once)."""
        self.session = s
        fin.written = self._write(s)
        self._close_journal(rec, fin.written)
        if not fin.written:
            return
        assert self.path is not None
        if profiler is not None and not ending:
            self._with_profiler(profiler)
        if not self.quiet:
            sys.stdout.flush()  # keep the script's own output first
            print(describe(self.session, self.path), file=sys.stderr)
        if self.report and not ending:
            self._write_report()

    def finish_view(self, s: Session) -> None:
        """The file of a ``record()`` that was a view of an enclosing session: ``s``, its share."""
        self.session = s
        if self.redact_argv:
            s.meta["argv"] = redacted_argv(s.meta["argv"], only_name=True)
        if self._write(s) and not self.quiet:
            assert self.path is not None
            print(describe(s, self.path), file=sys.stderr)

    def serve(self) -> None:
        """With ``open``: the written trace to ui.perfetto.dev, until it has been fetched."""
        if not self.open or self.path is None:
            return
        from .serve import OPEN_TIMEOUT_S, serve

        try:
            serve(self.path, timeout=OPEN_TIMEOUT_S)
        except OSError as e:
            print(
                f"evtrace: could not serve {self.path} on 127.0.0.1:9001: {e.strerror or e}", file=sys.stderr
            )

    def _write(self, s: Session) -> bool:
        """Save ``s`` where aim() said (a default name: the first free one), and name it so from the
        current directory too; False, having said why, if it could not."""
        assert self.path is not None
        target = self.target
        try:
            if self._stem is not None:
                target = claim(self._stem, target)
            s.save(target)
        except OSError as e:  # a full disk, a quota: the temp directory may still have room
            if target != self.target:
                target.unlink(missing_ok=True)
            self.written_where_asked = False
            why = f"evtrace: could not write {self.path}: {e.strerror or e}"
            try:
                rescue = rescue_path(target)
                s.save(rescue)
            except OSError as e2:  # the session is still in memory: .session.save(elsewhere)
                print(f"{why}; nor in the temp directory: {e2.strerror or e2}", file=sys.stderr)
                return False
            print(f"{why}; wrote {rescue} instead", file=sys.stderr)
            self.path = rescue
            return True
        if Path(os.path.abspath(self.path)) != target:  # moved on, or the script left its directory
            self.path = target if self.path.absolute() != self.target else self.path.with_name(target.name)
        return True

    def _close_journal(self, rec: Recorder, written: bool) -> None:
        """The trace is written: its journal goes. Not written anywhere: the journal stays, named."""
        folder = rec.journal
        err = rec.close_journal(self.path.absolute() if written and self.path else None)
        if folder is None:
            return
        if err is not None and not self.quiet:
            print(f"evtrace: the journal {folder} stopped early: {err}", file=sys.stderr)
        if not written:
            print(f"evtrace: the recording is kept in {folder}: {recover_hint(folder)}", file=sys.stderr)

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
                f"evtrace: merged torch.profiler's trace into {self.path} "
                f"({plural(fit['events_placed'], 'event')}; "
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


def describe(s: Session, path: Path) -> str:
    """The one line printed after a session: where, how much, how to open it."""
    extra = ""
    lost = lost_device_spans(s.meta)
    if lost:
        extra += f", {plural(lost, 'device span')} lost"
    dropped, unfinished = int(s.meta.get("dropped_regions", 0)), int(s.meta.get("unfinished_regions", 0))
    if dropped:
        extra += f", {plural(dropped, 'oldest region')} dropped (max_regions)"
    if unfinished:
        extra += f", {unfinished} unfinished"
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
