"""Command line: a thin shell over the library.

    evtrace [run] [-o PATH] script.py [args...]
    evtrace [run] [-o PATH] -m module [args...]
    evtrace summary TRACE... [--skip N] [--top N] [--sort KEY] [--filter REGEX] [--format FMT]
    evtrace report | render | merge | view | diff ...

Owns argument parsing, reading and writing the files (the library's views take and return
Sessions, text and bytes), one-line errors (exit 2), and running the user's script faithfully.
Each subcommand is one handler in ``HANDLERS``.
"""

from __future__ import annotations

import argparse
import builtins
import importlib.machinery
import importlib.util
import io
import os
import re
import runpy
import signal
import sys
import traceback
import types
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from . import __version__, defaults, formats
from .analysis import plural
from .api import record
from .export import View
from .export.diff import DiffError, DiffMarkdown, DiffText
from .export.kineto import doubts, is_kineto
from .export.render import NothingToDraw, Timeline
from .export.report import Report
from .export.summary import Summary, collectives, ranks
from .files import TraceError, read_json, write_bytes
from .finish import Terminated, die_by, signum_of, take_ending
from .merge import merge
from .paths import default_path, output_problem
from .session import Session, rank_labels
from .startup import WARNING_FILTERS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(2, f"evtrace: error: {message}\n")


class UsageError(Exception):
    """Bad input found before anything ran: one line, exit 2."""


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command line's parser, and its ``run`` subcommand's."""
    p = _Parser(prog="evtrace", description="Host and device timelines on one clock, for ui.perfetto.dev.")
    p.add_argument("--version", action="version", version=f"evtrace {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    def command(name: str, example: str, **kw: Any) -> argparse.ArgumentParser:
        """A subcommand, its help ending with an example (kept as written, not reflowed)."""
        epilog = ("examples:" if "\n" in example else "example:") + "\n  " + example
        return sub.add_parser(name, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    run = command(
        "run",
        "evtrace run -o train.json.gz train.py --epochs 1   (or: evtrace train.py ...)",
        help="run a script or module under evtrace (the default command)",
    )
    run.add_argument(
        "-o",
        "--output",
        type=Path,
        help="trace path (.json.gz, .json, .pftrace or .pftrace.gz); default evtrace-<time>.json.gz",
    )
    run.add_argument("-m", dest="module", help="run a library module as a script, like python -m")
    run.add_argument("--no-cuda", action="store_true", help="record host lanes only")
    run.add_argument("--open", action="store_true", help="open the trace in ui.perfetto.dev when done")
    run.add_argument(
        "--max-regions",
        type=int,
        default=defaults.MAX_REGIONS,
        metavar="N",
        help="keep the newest N regions, drop (and count) older ones; 0: no limit",
    )
    run.add_argument(
        "--redact",
        "--redact-argv",
        dest="redact_argv",
        action="store_true",
        help="keep only the script's name of the command line in the trace "
        "(by default: as given, with secret-looking option values redacted)",
    )
    run.add_argument(
        "--no-hooks",
        action="store_true",
        help="trace only explicit evtrace regions: no modules, backward, optimizer, data or wait spans",
    )
    run.add_argument(
        "--depth",
        type=int,
        default=defaults.HOOK_DEPTH,
        metavar="N",
        help=f"trace modules down to depth N below each top-level module (default {defaults.HOOK_DEPTH})",
    )
    run.add_argument("--include", metavar="REGEX", help="trace only modules whose path matches")
    run.add_argument("--exclude", metavar="REGEX", help="do not trace modules whose path matches")
    run.add_argument(
        "--nvtx", action="store_true", help="also emit every region as an NVTX range, for Nsight Systems"
    )
    run.add_argument(
        "--no-journal",
        action="store_true",
        help="keep the recording in memory only, with no journal beside the trace for `evtrace recover` "
        "(a kill or crash then loses it)",
    )
    run.add_argument(
        "--report",
        action="store_true",
        help="also write a markdown report and an SVG timeline beside the trace",
    )
    run.add_argument(
        "target",
        nargs=argparse.REMAINDER,
        help="script.py [args...] (or the module's args with -m): every argument after the script "
        "or module is its own",
    )
    summ = command(
        "summary",
        "evtrace summary train.json.gz --skip 2 --sort host --top 10\n"
        "  evtrace summary train.json.gz --filter '^step' --format csv > steps.csv",
        help="print a table per region name; with several traces, ranks side by side",
    )
    summ.add_argument(
        "trace",
        type=Path,
        nargs="+",
        help="evtrace traces (.json.gz, .json, .pftrace, .pftrace.gz)",
    )
    summ.add_argument(
        "--skip", type=int, default=0, metavar="N", help="drop the first N of each name (warm-up)"
    )
    summ.add_argument("--top", type=int, metavar="N", help="show only the first N rows")
    summ.add_argument(
        "--sort",
        metavar="KEY",
        help="order rows by KEY, largest first: busy (device busy time, the default, then host "
        "total), count, host (host p50), device (device p50), total (count x host p50), "
        "or name (alphabetical)",
    )
    summ.add_argument(
        "--filter", metavar="REGEX", help="only region names that REGEX matches (searched, e.g. '^step|loss')"
    )
    summ.add_argument(
        "--format",
        default="text",
        metavar="FMT",
        help="text (the table, default), or for scripts csv (a header, one row per name) or json "
        "(a list of objects); both in ns, the device columns empty (null) where not measured",
    )
    rep = command(
        "report",
        "evtrace report train.json.gz -o report.md",
        help="one screen of GitHub markdown for a bug report",
    )
    rep.add_argument("trace", type=Path, help="the evtrace trace to describe")
    rep.add_argument("-o", "--output", type=Path, help="write here (.md) instead of standard output")
    ren = command(
        "render",
        "evtrace render train.json.gz -o step.svg --window 200ms:260ms --lanes 'GPU|MainThread'",
        help="a static SVG timeline (GitHub shows it inline)",
    )
    ren.add_argument("trace", type=Path, help="the evtrace trace to draw")
    ren.add_argument("-o", "--output", type=Path, required=True, help="the SVG file to write (.svg)")
    ren.add_argument(
        "--window",
        metavar="START:END",
        help="times since the start, e.g. 1.5:2.5 (ms) or 200us:3ms; default: one representative step",
    )
    ren.add_argument("--lanes", metavar="REGEX", help="only lanes whose name matches, e.g. 'GPU|MainThread'")
    merge = command(
        "merge",
        "evtrace merge rank0.json.gz rank1.json.gz -o all.json.gz",
        help="merge per-rank or per-process traces onto one clock; "
        "torch.profiler traces among them go under evtrace's lanes, on its clock",
    )
    merge.add_argument(
        "traces", type=Path, nargs="+", help="evtrace traces, and torch.profiler traces to place among them"
    )
    merge.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="merged trace (.json.gz, .json, .pftrace or .pftrace.gz)",
    )
    rec = command(
        "recover",
        "evtrace recover train.json.gz.journal   (or: evtrace recover train.json.gz -o snapshot.pftrace)",
        help="rebuild the trace of a run that was killed, crashed or hangs, from its journal",
    )
    rec.add_argument(
        "journal", type=Path, help="the journal folder beside the trace (TRACE.journal), or the trace's path"
    )
    rec.add_argument(
        "-o", "--output", type=Path, help="trace path (default: where the session would have written it)"
    )
    view = command(
        "view",
        "evtrace view train.json.gz   (over ssh: ssh -L 9001:127.0.0.1:9001 HOST first)",
        help="open a trace in ui.perfetto.dev (served once from 127.0.0.1:9001)",
    )
    view.add_argument("trace", type=Path, help="the trace to open (.json.gz, .json, .pftrace, .pftrace.gz)")
    view.add_argument(
        "--window",
        metavar="START:END",
        help="serve only the regions within this time since the start, e.g. 1.5:2.5 (ms) or 2s:3s "
        "(a trace too big for the UI gets the first window that fits)",
    )
    view.add_argument("--no-browser", action="store_true", help="print the URL instead of opening a browser")
    view.add_argument(
        "--port",
        type=int,
        help="the UI only fetches from port 9001 (the default, or $EVTRACE_VIEW_PORT); "
        "another port, 0 for any free one, is for your own tools",
    )
    conv = command(
        "convert",
        "evtrace convert train.json.gz train.pftrace",
        help="write a trace in another format, picked by suffix: .json(.gz) or .pftrace(.gz) "
        "(Perfetto's own, which the UI imports with about a third of the memory)",
    )
    conv.add_argument("trace", type=Path, help="the evtrace trace to read")
    conv.add_argument("output", type=Path, help="the trace to write")
    dif = command(
        "diff",
        "evtrace diff main.json.gz branch.json.gz --skip 2 --fail-above 5",
        help="what got slower between two traces, per region name, with a significance test",
    )
    dif.add_argument("before", type=Path, help="the baseline trace")
    dif.add_argument("after", type=Path, help="the trace to compare with it")
    dif.add_argument(
        "--markdown", action="store_true", help="a GitHub-flavoured markdown table, for a pull request"
    )
    dif.add_argument(
        "--fail-above",
        type=float,
        metavar="PCT",
        help="exit 1 when a region is significantly slower by more than PCT %%",
    )
    dif.add_argument(
        "--rank", type=int, metavar="N", help="compare rank N of merged traces (default: all ranks pooled)"
    )
    dif.add_argument(
        "--skip", type=int, default=0, metavar="N", help="drop the first N of each name (warm-up)"
    )
    dif.add_argument(
        "--min-change",
        type=float,
        default=2.0,
        metavar="PCT",
        help="the smallest p50 change called slower or faster (default 2)",
    )
    dif.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        help="significance level, Holm-corrected over the rows (default 0.05)",
    )
    return p, run


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in COMMANDS and args[0] not in ("-h", "--help", "--version"):
        args.insert(0, "run")
    parser, run = _parser()
    module: str | None = None
    target: list[str] = []
    if args[:1] == ["run"]:  # evtrace's options end where the target begins, as python's do
        own, module, target = _split_target(run, args[1:])
        args = ["run", *own]
    ns = parser.parse_args(args)
    if ns.command == "run":
        ns.module, ns.target = module, target
    handler = HANDLERS.get(ns.command)
    if handler is None:
        parser.print_usage(sys.stderr)
        return 2
    try:
        return handler(ns)
    except UsageError as e:
        print(f"evtrace: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `evtrace summary t.json.gz | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141  # as a tool killed by SIGPIPE
    except KeyboardInterrupt:  # Ctrl-C in a command that only reads (run ends by the signal itself)
        print("evtrace: interrupted", file=sys.stderr)
        return 130  # as a shell reports a tool ended by SIGINT


def _split_target(run: argparse.ArgumentParser, args: list[str]) -> tuple[list[str], str | None, list[str]]:
    """``run``'s arguments as (evtrace's own, the module, the target's): everything after
    ``-m MODULE``, after the script's path, or after ``--`` then the script's path, is the
    target's, even what looks like evtrace's options, as ``python`` hands them on. (argparse
    alone takes ``-o`` or ``--help`` wherever they appear, and ``--`` as the script.)"""
    options = {s: a.nargs != 0 for a in run._actions for s in a.option_strings}  # takes a value?
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return args[:i], None, args[i + 1 :]
        if arg.startswith("-m") and len(arg) > 2 and not arg.startswith("--"):  # -mpkg.mod, as python
            return args[:i], arg[2:], args[i + 1 :]
        if arg == "-m" and i + 1 < len(args):
            return args[:i], args[i + 1], args[i + 2 :]
        if not arg.startswith("-") or arg == "-":
            return args[:i], None, args[i:]
        known = [arg] if arg in options or arg[1] != "-" else [s for s in options if s.startswith(arg)]
        if arg != "-m" and len(known) == 1 and options.get(known[0]):  # (or a unique abbreviation)
            i += 1  # its value, whatever it looks like
        i += 1
    return args, None, []  # no target: argparse or the handler says what is missing


def _summary(ns: argparse.Namespace) -> int:
    try:
        view = Summary(skip=ns.skip, top=ns.top, sort=ns.sort, filter=ns.filter, format=ns.format)
    except ValueError as e:
        raise UsageError(f"--{e}") from None  # (its message starts with the option's name)
    sessions = [_load(p) for p in ns.trace]
    if ns.format != "text":  # the rows only, of every trace, for a script
        sys.stdout.write(view.dump([(str(p), s) for p, s in zip(ns.trace, sessions)]))
        return 0
    for p, session in zip(ns.trace, sessions):
        print(f"== {p}" if len(sessions) > 1 else "", end="\n" if len(sessions) > 1 else "")
        print(view.render(session))
        if session.ranks:  # a merged trace: its ranks side by side, and who made them wait
            print("\n" + ranks(session.ranks, rank_labels(session.ranks)))
            waits = collectives(session.ranks)
            if waits:
                print("\n" + waits)
    if len(sessions) > 1:
        print("\n" + ranks(sessions, [p.name for p in ns.trace]))
        got = [s.meta.get("rank") for s in sessions]
        if all(isinstance(r, int) and got.count(r) == 1 and not s.ranks for r, s in zip(got, sessions)):
            waits = collectives(merge(sessions).ranks)  # the ranks of one run: onto one clock first
            if waits:
                print("\n" + waits)
    return 0


_UNITS = {"ns": 1, "us": 1e3, "µs": 1e3, "ms": 1e6, "s": 1e9}


def _time(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+(?:e-?[0-9]+)?)\s*(ns|us|µs|ms|s)?\s*", text)
    if not m:
        raise UsageError(f"{text!r} is not a time (e.g. 1.5, 200us, 3ms)")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "ms"])


def _window(text: str | None) -> tuple[int, int] | None:
    """``--window START:END`` in ns, or None."""
    if not text:
        return None
    if ":" not in text:
        raise UsageError("--window takes START:END")
    a, b = text.split(":", 1)
    window = (_time(a), _time(b))
    if window[1] <= window[0]:
        raise UsageError("--window ends before it starts")
    return window


def _load(path: Path) -> Session:
    try:
        return Session.load(path)
    except TraceError as e:
        if "not an evtrace trace" in str(e) and formats.suffix_of(path) in (".json", ".json.gz"):
            if not is_kineto(read_json(path)):
                raise UsageError(str(e)) from None
            raise UsageError(
                f"{path} is a torch.profiler (Kineto) trace, not an evtrace one: "
                f"evtrace merge TRACE.json.gz {path} -o both.json.gz puts it beside an evtrace trace"
            ) from None
        raise UsageError(str(e)) from None


def _writable(
    path: Path | None, trace: bool = True, suffix: str | None = None, inputs: Sequence[Path] = ()
) -> None:
    """Refuse an output path that cannot be written (a trace's must end in a suffix of formats.TABLE,
    another output in ``suffix``), or that is one of the ``inputs``, also through a link."""
    if path is None:
        return
    problem = output_problem(path, trace)
    if problem:
        raise UsageError(problem)
    if suffix is not None and path.suffix.lower() != suffix:
        raise UsageError(f"output path {path} must end in {suffix} (what this command writes)")
    for src in inputs:
        try:
            same = os.path.samefile(path, src)
        except OSError:  # either does not exist (yet): nothing to overwrite
            same = False
        if same:
            raise UsageError(f"output path {path} is the input {src}; writing it would destroy the input")


def _save(s: Session, path: Path) -> None:
    """Write a trace (atomically, as ``Session.save`` does); a failure is one line."""
    try:
        s.save(path)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def _write_text(path: Path, text: str) -> None:
    """Write atomically, as traces are: an interrupted write never leaves half a file."""
    try:
        write_bytes(text.encode("utf-8"), path)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def _show(view: View, trace: Path, output: Path | None) -> bool:
    """``view`` of the trace written to ``output`` (its suffix checked before the trace is read), or
    onto stdout without one; True when it wrote the file."""
    _writable(output, trace=False, suffix=view.suffix, inputs=[trace])
    text = view.render(_load(trace))
    if output is None:
        sys.stdout.write(text)
        return False
    _write_text(output, text)
    return True


def _report(ns: argparse.Namespace) -> int:
    size = ns.trace.stat().st_size if ns.trace.is_file() else 0  # (_show says what is wrong with it)
    if _show(Report(ns.trace.name, size), ns.trace, ns.output):
        print(f"evtrace: wrote {ns.output}", file=sys.stderr)
    return 0


def _render(ns: argparse.Namespace) -> int:
    window = _window(ns.window)
    if ns.lanes:
        try:
            re.compile(ns.lanes)
        except re.error as e:
            raise UsageError(f"--lanes {ns.lanes!r} is not a regular expression: {e}") from None
    view = Timeline(window, ns.lanes, strict=True)
    try:
        _show(view, ns.trace, ns.output)
    except NothingToDraw as e:
        raise UsageError(str(e)) from None
    print(f"evtrace: wrote {ns.output} ({view.drawn})", file=sys.stderr)
    return 0


def _merge(ns: argparse.Namespace) -> int:
    _writable(ns.output, inputs=ns.traces)
    sessions: list[Session] = []
    profiles: list[tuple[dict[str, Any], str]] = []
    inputs: dict[Path, str] = {}  # each file once, in the order given
    for p in ns.traces:
        if p.resolve() in inputs:
            print(f"evtrace: warning: {p} is given twice; merged once", file=sys.stderr)
            continue
        inputs[p.resolve()] = str(p)
        try:
            sessions.append(Session.load(p))
            continue
        except TraceError as e:
            problem = str(e)
        try:
            doc = read_json(p)  # not evtrace's: perhaps a torch.profiler trace
        except TraceError as e:
            raise UsageError(str(e)) from None
        if not is_kineto(doc):
            if "not an evtrace trace" in problem:
                problem = f"{p} is not an evtrace trace, nor a torch.profiler (Kineto) trace"
            raise UsageError(problem)
        profiles.append((doc, str(p)))
    if not sessions:
        raise UsageError("merge needs at least one evtrace trace (torch.profiler traces go onto its clock)")
    ranks = [r.meta.get("rank") for r in sessions]
    for r in sorted({r for r in ranks if isinstance(r, int) and ranks.count(r) > 1}):
        print(f"evtrace: warning: {ranks.count(r)} traces are rank {r}: two runs mixed?", file=sys.stderr)
    s = merge(sessions, list(inputs.values()), profiles)
    _save(s, ns.output)
    print(
        f"evtrace: merged {plural(len(inputs), 'trace')} ({plural(len(s), 'region')}, "
        f"{plural(len(s.ranks), 'rank')}) into {ns.output}; {s.meta['merge.method']}",
        file=sys.stderr,
    )
    fits = s.meta.get("profiler")
    for fit in list(fits.values())[-len(profiles) :] if profiles and isinstance(fits, dict) else []:
        print(
            f"evtrace: {fit['source']}: {plural(fit['events_placed'], 'profiler event')} placed; host clock "
            f"{fit['host_correction_ns'] / 1000:+.3f} µs from the wall clock's; "
            f"{fit['host_ops_inside_regions']}/{fit['host_ops_on_evtrace_threads']} CPU ops inside evtrace "
            f"regions; {fit['kernels_inside']}/{fit['kernels_placed']} kernels inside their region's span",
            file=sys.stderr,
        )
        for doubt in doubts(fit):
            print(f"evtrace: warning: {doubt}", file=sys.stderr)
    return 0


def _recover(ns: argparse.Namespace) -> int:
    from . import journal

    path = ns.journal
    beside = path.with_name(path.name + journal.SUFFIX)
    if not path.is_dir() and path.name != "catalog" and beside.is_dir():  # the trace's path
        path = beside
    try:
        j = journal.read(path)
    except TraceError as e:
        raise UsageError(str(e)) from None
    if j.finished is not None:
        print(
            f"evtrace: {j.path} is the journal of a session that finished normally: "
            f"its trace is {j.finished.get('trace')}",
            file=sys.stderr,
        )
        return 1
    out = ns.output
    if out is None:  # where the session would have written it, named from here where it can be
        out = Path(str(j.header.get("path")))
        if out.is_relative_to(Path.cwd()):
            out = out.relative_to(Path.cwd())
    _writable(out)
    s = journal.recover_session(j)
    _save(s, out)
    unresolved = s.meta["recovered"]["unresolved_device_spans"]
    waiting = f", {unresolved} waiting for the device" if unresolved else ""
    print(
        f"evtrace: recovered {plural(len(s), 'region')} ({s.meta['unfinished_regions']} unfinished{waiting}) "
        f"from {j.path}, up to {s.meta['duration_ns'] / 1e9:.1f} s into the run; wrote {out}",
        file=sys.stderr,
    )
    if j.skipped:
        print(
            f"evtrace: skipped {plural(j.skipped, 'byte')} of torn or damaged records in {j.path}",
            file=sys.stderr,
        )
    if journal.owner_alive(j):
        print(
            f"evtrace: process {j.header.get('pid')} still records: this is a snapshot "
            "(recover again for more)",
            file=sys.stderr,
        )
    return 0


def _convert(ns: argparse.Namespace) -> int:
    _writable(ns.output, inputs=[ns.trace])
    s = _load(ns.trace)
    _save(s, ns.output)
    print(
        f"evtrace: wrote {ns.output} ({formats.format_of(ns.output).name}, {plural(len(s), 'region')}, "
        f"{ns.output.stat().st_size / 1e6:.1f} MB) from {ns.trace}",
        file=sys.stderr,
    )
    return 0


def _view(ns: argparse.Namespace) -> int:
    import tempfile

    from .serve import port_from_env, servable, serve

    window = _window(ns.window)
    s = _load(ns.trace)  # refuse a corrupt or truncated file before serving it
    try:
        port = port_from_env() if ns.port is None else ns.port
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not 0 <= port < 65536:
        raise UsageError(f"--port {port} is not a port")
    with tempfile.TemporaryDirectory(prefix="evtrace-view-") as tmp:
        try:
            path, said = servable(s, ns.trace, window, Path(tmp))
        except ValueError as e:
            raise UsageError(str(e)) from None
        if said:
            print(f"evtrace: {said}", file=sys.stderr)
        return _serve(serve, path, port, ns.no_browser)


def _serve(serve: Callable[..., bool], path: Path, port: int, no_browser: bool) -> int:
    try:
        serve(path, port, open_browser=not no_browser)
    except OSError as e:
        raise UsageError(f"cannot serve on 127.0.0.1:{port}: {e.strerror or e}") from None
    except KeyboardInterrupt:  # Ctrl-C while waiting for the browser: a normal way to stop
        print("evtrace: stopped serving", file=sys.stderr)
        return 130
    return 0


def _run(ns: argparse.Namespace) -> int:
    # first: the checks and torch's import below take seconds; a SIGTERM then is answered too
    old_ending = take_ending()
    try:
        try:
            target = _start(ns)
        except _NotRun as e:
            err = e.__cause__
            assert err is not None
            traceback.print_exception(type(err), err, None)
            return 1
        except (KeyboardInterrupt, Terminated) as e:  # in evtrace's or torch's imports: no traceback
            print("evtrace: stopped before the script began; no trace written", file=sys.stderr)
            die_by(signum_of(e))
            raise  # not reached
        return _execute(target)
    except (KeyboardInterrupt, Terminated) as e:  # the script's trace is written: end as the signal would
        if isinstance(e, KeyboardInterrupt) and _user_frames(e.__traceback__) is not None:
            traceback.print_exception(type(e), e, _user_frames(e.__traceback__))  # where the script was
        die_by(signum_of(e))
        raise  # not reached
    finally:
        for s, h in old_ending.items():
            signal.signal(s, h)


class _Target(NamedTuple):
    """A script or module about to run, its recording started and ``sys.argv`` its own."""

    rec: record
    module: str | None
    script: str
    code: types.CodeType | None  # the script's, compiled before the recording started
    saved_argv: list[str]
    saved_path0: str


class _NotRun(Exception):
    """The script does not compile: python would show its SyntaxError and exit 1, no trace."""


def _start(ns: argparse.Namespace) -> _Target:
    """Everything before the target's first line: the checks (UsageError), finding the module
    (which imports its packages) and starting the recording (which imports torch)."""
    out = ns.output or default_path()
    _writable(out)
    given = ""
    code = None
    saved_path0 = sys.path[0]
    if ns.module:
        sys.path[0] = os.getcwd()  # as python -m does, also when started as the evtrace script
        try:
            spec = importlib.util.find_spec(ns.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            raise UsageError(f"no module named {ns.module}")
    else:
        if not ns.target:
            raise UsageError("no script given: evtrace [run] [-o PATH] script.py [args...]")
        given, ns.target = ns.target[0], ns.target[1:]
        script = Path(given)
        if script.is_dir():
            raise UsageError(f"{script} is a directory, not a script")
        if not script.is_file():
            raise UsageError(f"no such script: {script}")
        try:
            code = _compile(given)
        except SyntaxError as e:  # before the session starts: no empty trace for a script that never ran
            raise _NotRun() from e

    if ns.max_regions < 0:
        raise UsageError("--max-regions must be 0 or more")
    if ns.depth < 0:
        raise UsageError("--depth must be 0 or more")
    for flag, rx in (("--include", ns.include), ("--exclude", ns.exclude)):
        try:
            re.compile(rx or "")
        except re.error as e:
            raise UsageError(f"{flag} {rx!r} is not a regular expression: {e}") from None
    saved_argv = sys.argv[:]
    rec = record(
        out,
        device=False if ns.no_cuda else None,
        open=ns.open,
        max_regions=ns.max_regions or None,
        redact_argv=ns.redact_argv,
        hooks=not ns.no_hooks,
        depth=ns.depth,
        include=ns.include,
        exclude=ns.exclude,
        nvtx=ns.nvtx,
        report=ns.report,
        journal=not ns.no_journal,
    )
    if ns.module:
        sys.argv = [ns.module, *ns.target]
    else:
        sys.argv = [given, *ns.target]  # as typed, as python gives it
        sys.path[0] = os.path.dirname(os.path.realpath(given))
    try:
        rec.__enter__()  # after the swap: the trace's argv is the target's
    except BaseException:
        sys.argv = saved_argv
        sys.path[0] = saved_path0
        raise
    return _Target(rec, ns.module, given, code, saved_argv, saved_path0)


def _execute(t: _Target) -> int:
    """Run the target as python would, write its trace, then show its exception if it had one."""
    code = 0
    failure: BaseException | None = None
    ending: BaseException | None = None
    try:
        try:
            _fresh_warnings()
            if t.module:
                runpy.run_module(t.module, run_name="__main__", alter_sys=True)
            else:
                assert t.code is not None  # a script's code, compiled before its session began
                _run_script(t.script, t.code)
        except SystemExit as e:
            code = _exit_code(e)
        except (KeyboardInterrupt, Terminated) as e:  # trace first, then end as the signal would
            ending = e
        except BaseException as e:  # the user's exception: shown after the trace is written
            failure, code = e, 1
        finally:
            sys.argv = t.saved_argv
            sys.path[0] = t.saved_path0
    except (KeyboardInterrupt, Terminated) as e:  # in the script's last instants, restoring argv
        ending = ending or e
    if ending is not None:
        t.rec.__exit__(type(ending), ending, ending.__traceback__)
        raise ending
    t.rec.__exit__(None, None, None)  # a signal in its first instants: written, then raised
    if not t.rec.written_where_asked and code == 0:
        code = 1  # the trace is not where it was asked for (the line above says where it is)
    if failure is not None:
        traceback.print_exception(type(failure), failure, _user_frames(failure.__traceback__))
    return code


def _fresh_warnings() -> None:
    """The warning filters the process started with: not those that evtrace's own imports
    (numpy, torch) added, which ``python script.py`` would not have at its start."""
    warnings.filters[:] = WARNING_FILTERS  # type: ignore[index]
    warnings._filters_mutated()  # type: ignore[attr-defined]  # drop the per-module caches


def _script_path(given: str) -> str:
    """The script's ``__file__``, as python gives it: the cwd joined, not normalised."""
    return given if os.path.isabs(given) else os.path.join(os.getcwd(), given)


def _compile(given: str) -> types.CodeType:
    """The script's code, compiled under its ``__file__`` (a SyntaxError as python shows it)."""
    path = _script_path(given)
    with io.open_code(path) as f:
        return compile(f.read(), path, "exec", dont_inherit=True)


def _run_script(given: str, code: types.CodeType) -> None:
    """Run a script as ``python script.py`` does: ``__main__`` with an absolute ``__file__``,
    no ``__spec__``. (runpy.run_path would set ``sys.argv[0]`` to the path it is given.)"""
    path = _script_path(given)
    main = types.ModuleType("__main__")
    main.__dict__.update(
        __file__=path,
        __cached__=None,
        __annotations__={},
        __loader__=importlib.machinery.SourceFileLoader("__main__", path),
        __builtins__=builtins,
    )
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)  # noqa: S102  # the user's script, as python runs it
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _user_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """Drop evtrace's and runpy's frames from the top of a traceback."""
    here = str(Path(__file__).parent)
    while tb is not None:
        f = tb.tb_frame.f_code.co_filename
        if not (f.startswith(here) or f == runpy.__file__ or f == "<frozen runpy>"):
            break
        tb = tb.tb_next
    return tb


def _diff(ns: argparse.Namespace) -> int:
    if ns.skip < 0:
        raise UsageError("--skip must be 0 or more")
    if not 0 < ns.alpha < 1:
        raise UsageError("--alpha must be between 0 and 1")
    if ns.min_change < 0 or (ns.fail_above is not None and ns.fail_above < 0):
        raise UsageError("--min-change and --fail-above must be 0 or more")
    before, after = _load(ns.before), _load(ns.after)
    kind = DiffMarkdown if ns.markdown else DiffText
    view = kind(
        str(ns.before), str(ns.after), rank=ns.rank, skip=ns.skip, alpha=ns.alpha, min_change=ns.min_change
    )
    try:
        d = view.compare(before, after)
    except DiffError as e:
        raise UsageError(str(e)) from None
    sys.stdout.write(view.format(d))
    bad = d.regressions(ns.fail_above) if ns.fail_above is not None else []
    if bad:  # one line on stderr, so that CI logs show why it failed
        print(
            f"evtrace: {plural(len(bad), 'region')} significantly slower by more than {ns.fail_above:g}%: "
            + ", ".join(f"{r.name} {r.change:+.0f}%" for r in bad),
            file=sys.stderr,
        )
        return 1
    return 0


#: subcommand -> handler; ``main`` dispatches through it
HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _run,
    "summary": _summary,
    "view": _view,
    "merge": _merge,
    "recover": _recover,
    "report": _report,
    "render": _render,
    "diff": _diff,
    "convert": _convert,
}
COMMANDS = tuple(HANDLERS)
