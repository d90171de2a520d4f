"""Notebook magics: ``%load_ext evtrace``, then

    %%evtrace [-o PATH] [--hooks] [--depth N]    record the cell
    %evtrace_view PATH                           the same display for a saved trace

Each shows the summary table (HTML in Jupyter, text in a terminal: one MIME bundle, the
frontend picks), the SVG timeline, the saved path, and a link that opens the trace in
ui.perfetto.dev. The file is served from the kernel, once, as ``evtrace view`` serves it, by a
background thread that stops after one fetch or ``SERVE_TIMEOUT_S``.

IPython is imported here only; ``import evtrace`` never imports it. Owns the magics and the
notebook display of a session (summary as HTML, the SVG timeline, the serving link).
"""

from __future__ import annotations

import html
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

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

SERVE_TIMEOUT_S = 600.0  # a link left unclicked stops serving after this

_lock = threading.Lock()
_serving: tuple[threading.Thread, str] | None = None  # the server thread and the URL of its file


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as serve.py's server binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _quiet_serve(path: Path, port: int) -> None:
    try:
        serve.serve(path, port, open_browser=False, timeout=SERVE_TIMEOUT_S)
    except OSError:  # the port was taken between the check and the bind: the link just fails
        pass


def serve_once(path: Path) -> tuple[str | None, str]:
    """Serve ``path`` once in the background: (the ui.perfetto.dev URL or None, a note to show).

    One file is served at a time: a server still waiting from an earlier cell is released by
    fetching its file (``serve.serve`` stops after one fetch), since the UI only fetches from 9001."""
    global _serving
    try:
        port = serve.port_from_env()
    except ValueError as e:
        return None, str(e)
    with _lock:
        if _serving is not None and _serving[0].is_alive():
            try:
                urllib.request.urlopen(_serving[1], timeout=5).read()
            except OSError:
                pass
            _serving[0].join(timeout=5)
        if port != 0 and not _port_free(port):
            return (
                None,
                f"127.0.0.1:{port} is in use (another evtrace view?); "
                f"when it is free, run: evtrace view {path}",
            )
        if port == 0:  # any free port: find it first, for the link
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
        url = serve.url_for(path.name, port)
        t = threading.Thread(target=_quiet_serve, args=(path, port), name="evtrace view", daemon=True)
        t.start()
        _serving = (t, f"http://127.0.0.1:{port}/{quote(path.name)}")
    note = (
        f"served once from 127.0.0.1:{port} for {SERVE_TIMEOUT_S / 60:.0f} min; "
        f"from a remote kernel, forward the port (ssh -L {port}:127.0.0.1:{port})"
    )
    if port != serve.PORT:
        note += f"; ui.perfetto.dev only fetches from port {serve.PORT}"
    return url, note


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
    url, note = serve_once(path)
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
