"""Notebook magics: ``%load_ext evtrace``, then

    %%evtrace [-o PATH] [--hooks] [--depth N]    record the cell
    %evtrace_view PATH                           the same display for a saved trace

Each shows the summary table (HTML in Jupyter, text in a terminal: one MIME bundle, the
frontend picks), the SVG timeline, the saved path, and a link that opens the trace in
ui.perfetto.dev. The file is served from the kernel on 127.0.0.1:9001, as ``evtrace view`` serves
it, for ``SERVE_TIMEOUT_S``: one background server holds every cell's file, each under a name of
its own and with its own deadline, and stops once none is left.

IPython is imported here only; ``import evtrace`` never imports it. Owns the magics and the
notebook display of a session (summary as HTML, the SVG timeline, the serving link).
"""

from __future__ import annotations

import html
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from . import defaults, serve
from .analysis import COLUMNS, cells, rows
from .api import record
from .export.render import Timeline
from .files import TraceError
from .paths import default_path, output_problem
from .session import Session

SERVE_TIMEOUT_S = 600.0  # each cell's link is served this long, then answers 404
#: how soon after the last link's deadline the server lets the port go: as often as serve.serve polls
POLL_S = 0.1


class _Shelf:
    """One server in the kernel, on one port: each cell's file under a name of its own, until its
    own deadline. It stops, freeing the port, once every deadline has passed.

    A file is read when it is fetched, not held in the kernel's memory (a trace can be gigabytes);
    one rewritten since its cell ran (the same path traced again) answers 404, not the later trace."""

    def __init__(self, port: int) -> None:
        self._lock = threading.Lock()
        # name -> (file, its (mtime ns, size) when added, monotonic deadline)
        self._files: dict[str, tuple[Path, tuple[int, int], float]] = {}
        self._open = True
        self._httpd = serve.Server(("127.0.0.1", port), serve.handler(self._lookup))  # OSError: taken
        self._httpd.timeout = POLL_S
        self.port = int(self._httpd.server_address[1])  # the one chosen, for port 0
        self._thread = threading.Thread(target=self._run, name="evtrace view", daemon=True)

    def add(self, path: Path, ttl_s: float) -> str | None:
        """The name ``path`` is served under, or None once this server has stopped: ``TOKEN/FILE``,
        the file's own name last; the token random, so neither a file of the same name nor a
        restarted kernel's server answers an earlier link with another file."""
        with self._lock:
            if not self._open:
                return None
            name = f"{secrets.token_hex(4)}/{path.name}"
            while name in self._files:
                name = f"{secrets.token_hex(4)}/{path.name}"
            self._files[name] = (path, _version(path), time.monotonic() + ttl_s)
            if not self._thread.is_alive():
                self._thread.start()
            return name

    def _lookup(self, name: str) -> bytes | None:
        with self._lock:
            got = self._files.get(name)
        if got is None or time.monotonic() >= got[2]:
            return None
        try:
            data = got[0].read_bytes()
            return data if _version(got[0]) == got[1] else None
        except OSError:  # removed since: the link answers 404
            return None

    def _run(self) -> None:
        while True:
            with self._lock:  # closed under the lock: a cell that finds it closed can bind the port
                now = time.monotonic()
                self._files = {k: v for k, v in self._files.items() if v[2] > now}
                if not self._files:
                    self._open = False
                    self._httpd.server_close()
                    return
            self._httpd.handle_request()  # one request, or none within POLL_S


def _version(path: Path) -> tuple[int, int]:
    """What tells the file a cell wrote from a later one at its path; (0, 0) when it is gone."""
    try:
        st = path.stat()
    except OSError:
        return 0, 0
    return st.st_mtime_ns, st.st_size


_lock = threading.Lock()
_shelves: dict[int, _Shelf] = {}  # by the port asked for (0: any free one)


def serve_link(path: Path, ttl_s: float | None = None) -> tuple[str | None, str]:
    """Serve ``path`` from the kernel for ``ttl_s`` seconds (default ``SERVE_TIMEOUT_S``), beside
    the files of earlier cells: (the ui.perfetto.dev URL or None, a note to show)."""
    ttl = SERVE_TIMEOUT_S if ttl_s is None else ttl_s
    try:
        port = serve.port_from_env()
    except ValueError as e:
        return None, str(e)
    with _lock:
        shelf = _shelves.get(port)
        name = None if shelf is None else shelf.add(path.resolve(), ttl)
        if shelf is None or name is None:  # none yet, or it stopped: start one
            try:
                shelf = _shelves[port] = _Shelf(port)
            except OSError:
                return (
                    None,
                    f"127.0.0.1:{port} is in use (another evtrace view?); "
                    f"when it is free, run: evtrace view {path}",
                )
            name = shelf.add(path.resolve(), ttl)
            assert name is not None  # a new server is open
    until = time.strftime("%H:%M", time.localtime(time.time() + ttl))  # minutes cut: never later
    span = f"{ttl / 60:g} min" if ttl >= 60 else f"{ttl:g} s"
    note = (
        f"served from 127.0.0.1:{shelf.port} for {span} (until {until}); "
        f"from a remote kernel, forward the port (ssh -L {shelf.port}:127.0.0.1:{shelf.port})"
    )
    if shelf.port != serve.PORT:
        note += f"; ui.perfetto.dev only fetches from port {serve.PORT}"
    return serve.url_for(name, shelf.port), note


def _table_html(s: Session) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = []
    for row in rows(s):
        name, *rest = cells(row)
        tds = "".join(f"<td>{html.escape(c)}</td>" for c in rest)
        body.append(f"<tr><td style='text-align:left'>{html.escape(name)}</td>{tds}</tr>")
    return (
        f"<table class='evtrace-summary'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def show(s: Session, path: Path, failed: str | None = None) -> None:
    """Display a session: summary, timeline, path, and a link to ui.perfetto.dev."""
    url, note = serve_link(path)
    text = s.summary()
    head = html.escape(text.splitlines()[0]) if text else ""
    saved = f"saved {path}" + (f" ({failed})" if failed else "")
    link = (
        f"<a href='{html.escape(url)}' target='_blank' rel='noopener' "
        "style='display:inline-block;padding:4px 10px;border:1px solid #4e79a7;"
        "border-radius:4px;text-decoration:none'>Open in ui.perfetto.dev</a> "
        f"<small>{html.escape(note)}</small>"
        if url
        else f"<small>{html.escape(note)}</small>"
    )
    display(
        {
            "text/plain": "\n".join([text, saved, f"open: {url}  ({note})" if url else note]),
            "text/html": (
                f"<div class='evtrace'><p>{head}</p>{_table_html(s)}"
                f"<p>{html.escape(saved)}</p><p>{link}</p></div>"
            ),
        },
        raw=True,
    )
    if len(s) == 0:
        return  # no timeline to draw; the table says "(no regions)"
    try:
        svg = Timeline().render(s)
    except ValueError as e:  # nothing to draw: the table and the link still stand
        display({"text/plain": f"(no timeline: {e})"}, raw=True)
        return
    display({"image/svg+xml": svg, "text/plain": "(timeline: shown as SVG in Jupyter)"}, raw=True)


@magics_class
class EvtraceMagics(Magics):
    @magic_arguments()
    @argument("-o", "--output", help="trace path (.json.gz or .json); default evtrace-<time>.json.gz")
    @argument(
        "--hooks",
        action="store_true",
        help="also trace modules, backward, optimizer, data and waits, as python -m evtrace does",
    )
    @argument(
        "--depth",
        type=int,
        default=defaults.HOOK_DEPTH,
        help=f"with --hooks: trace modules down to depth N (default {defaults.HOOK_DEPTH})",
    )
    @cell_magic
    def evtrace(self, line: str, cell: str) -> None:
        """Record the cell with evtrace; show its summary, timeline, path and a Perfetto link."""
        args = parse_argstring(self.evtrace, line)
        path = Path(args.output).expanduser() if args.output else default_path()
        problem = output_problem(path)
        if problem:
            raise UsageError(problem)
        if args.depth < 0:
            raise UsageError("--depth must be 0 or more")
        assert self.shell is not None  # set once the magics are registered
        with record(path, quiet=True, hooks=args.hooks, depth=args.depth) as rec:
            result = self.shell.run_cell(cell)  # IPython semantics: magics, the last value shown
        if rec.session is None or not path.exists():
            raise UsageError(f"evtrace: could not write {path}")  # record() said why on stderr
        err = result.error_in_exec or result.error_before_exec
        show(
            rec.session, path, f"the cell raised {type(err).__name__}; the trace ends there" if err else None
        )

    @line_magic
    def evtrace_view(self, line: str) -> None:
        """%evtrace_view PATH: summary, timeline and a Perfetto link for a saved trace."""
        text = line.strip().strip("'\"")
        if not text:
            raise UsageError("usage: %evtrace_view PATH")
        path = Path(text).expanduser()
        try:
            s = Session.load(path)
        except TraceError as e:
            raise UsageError(str(e)) from None
        show(s, path)


def load_ipython_extension(ip: Any) -> None:
    ip.register_magics(EvtraceMagics)
