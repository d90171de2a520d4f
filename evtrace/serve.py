"""`evtrace view`: open a trace in ui.perfetto.dev, the way Perfetto's own deep link expects.

The file is served from 127.0.0.1:9001 (the only origin the UI's content-security policy lets
it fetch from), with CORS for https://ui.perfetto.dev and no caching. Only that one file is
served; every other path is a 404. HEAD and OPTIONS (CORS and private-network preflights) are
answered too. The server stops once the file has been sent. The notebook's links (notebook.py)
are served by the same request handling (``handler``), several files at once.

A trace too big for the UI (``formats.too_big_for_ui``), or any with ``--window``, is served as a
window of it: its regions within the window, written as .pftrace to a temporary file.
"""

from __future__ import annotations

import dataclasses
import http.server
import os
import socketserver
import sys
import threading
import webbrowser
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import numpy as np

from . import defaults, formats
from .session import Session

UI = "https://ui.perfetto.dev"
PORT = defaults.VIEW_PORT  # the UI's CSP allows http://127.0.0.1:9001 and nothing else
PORT_ENV = "EVTRACE_VIEW_PORT"  # another port (0: any free one) for tests and your own tools
#: a connection that sends no request within this long is dropped; the UI asks at once
REQUEST_TIMEOUT_S = 5.0


def port_from_env() -> int:
    """The port to serve from: $EVTRACE_VIEW_PORT, else 9001. ValueError if it is not a number."""
    text = os.environ.get(PORT_ENV, "").strip()
    if not text:
        return PORT
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{PORT_ENV}={text!r} is not a port") from None


def url_for(name: str, port: int = PORT) -> str:
    return f"{UI}/#!/?url=http://127.0.0.1:{port}/{quote(name)}"


class Server(socketserver.TCPServer):
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client gone mid-answer (the tab closed) is no error of ours: no traceback in the
        terminal or in whichever notebook cell runs; anything else is reported as usual."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def handler(
    lookup: Callable[[str], bytes | None], fetched: Callable[[], None] = lambda: None
) -> type[http.server.BaseHTTPRequestHandler]:
    """The request handling ``serve`` and the notebook's server share: GET ``/NAME`` answers
    ``lookup(NAME)`` (the decoded path; None: a 404), then calls ``fetched``; HEAD (a probe, not the
    download) and OPTIONS (a CORS / private-network preflight) are answered; anything else is a 404.
    Every answer allows the UI's origin and no caching."""

    class Handler(http.server.BaseHTTPRequestHandler):
        # a client that connects and sends nothing (a browser's preconnect) must not hold the one
        # request the server handles at a time: it is dropped after this many seconds
        timeout = REQUEST_TIMEOUT_S

        def _headers(self, code: int, length: int) -> None:
            self.send_response(code)
            self.send_header("Access-Control-Allow-Origin", UI)
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Content-Type", "application/octet-stream" if code == 200 else "text/plain")
            self.send_header("Content-Length", str(length))
            self.end_headers()

        def _data(self) -> bytes | None:
            path = unquote(urlsplit(self.path).path)
            return lookup(path[1:]) if path.startswith("/") else None

        def do_GET(self) -> None:  # noqa: N802
            data = self._data()
            if data is None:
                self._headers(404, 0)
                return
            self._headers(200, len(data))
            self.wfile.write(data)
            fetched()

        def do_HEAD(self) -> None:  # noqa: N802  (a probe, not the download: keep serving)
            data = self._data()
            self._headers(404 if data is None else 200, 0 if data is None else len(data))

        def do_OPTIONS(self) -> None:  # noqa: N802  (a CORS / private-network preflight)
            self.send_response(204)
            self.send_header("Access-Control-Allow-Origin", UI)
            self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
            self.send_header(
                "Access-Control-Allow-Headers", self.headers.get("Access-Control-Request-Headers") or "*"
            )
            self.send_header("Access-Control-Allow-Private-Network", "true")
            self.send_header("Access-Control-Max-Age", "600")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:  # noqa: N802
            self._headers(404, 0)

        def log_message(self, *a: object) -> None:  # quiet
            pass

    return Handler


#: ``record(open=True)`` / ``run --open`` wait this long for the UI to fetch the file (no browser, a
#: headless machine): then they say so and the program ends
OPEN_TIMEOUT_S = 300.0


def serve(
    path: Path, port: int | None = None, open_browser: bool = True, timeout: float | None = None
) -> bool:
    """Serve ``path`` once on loopback and point a browser at it. True once the file was sent.

    ``port``: None for $EVTRACE_VIEW_PORT or 9001; 0 for any free port."""
    if port is None:
        port = port_from_env()
    data = path.read_bytes()
    name = path.name
    sent = threading.Event()

    with Server(
        ("127.0.0.1", port), handler(lambda asked: data if asked == name else None, sent.set)
    ) as httpd:
        port = int(httpd.server_address[1])  # the one chosen, for port 0
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        try:
            url = url_for(name, port)
            if port != PORT:
                print(
                    f"evtrace: note: ui.perfetto.dev only fetches from 127.0.0.1:{PORT}; "
                    f"from port {port}, download the file there yourself",
                    file=sys.stderr,
                )
            if open_browser and webbrowser.open(url):  # some browsers return only once they are closed
                print(f"evtrace: opened {url}", file=sys.stderr)
            elif not sent.is_set():
                print(url)
                sys.stdout.flush()
            if not sent.is_set():
                limit = f"for up to {timeout / 60:g} min" if timeout else "until then"
                print(
                    f"evtrace: serving {name} on 127.0.0.1:{port} until ui.perfetto.dev fetches it "
                    f"({limit}; Ctrl-C stops)",
                    file=sys.stderr,
                )
            if sent.wait(timeout):
                return True
            print(
                f"evtrace: nothing fetched {name}; stopped serving (open the file in the UI yourself)",
                file=sys.stderr,
            )
            return False
        finally:
            httpd.shutdown()


def window_of(s: Session, start: int, end: int) -> Session:
    """The regions of ``s`` that lie within [start, end] (ns since its origin), times unchanged;
    a merged session's ranks each so. For viewing: the metadata says what the window is."""
    if s.ranks:
        cut = Session.combine([window_of(r, start, end) for r in s.ranks], {})
        cut.meta = {**s.meta, "window_ns": [start, end]}
        return cut
    r = s.regions
    keep = np.flatnonzero((r["host_start"] >= start) & (r["host_end"] <= end))
    index = {int(i): k for k, i in enumerate(keep.tolist())}
    return dataclasses.replace(
        s,
        regions=r[keep],
        args={index[i]: a for i, a in s.args.items() if i in index},
        meta={**s.meta, "window_ns": [start, end]},
        profiler=[],
        ranks=[],
    )


def first_window(s: Session, fits: int) -> tuple[int, int]:
    """From the origin, the longest window whose regions number no more than ``fits``."""
    r = s.regions
    ends = np.sort(r["host_end"])
    starts = np.sort(r["host_start"])
    start = int(starts[0]) if len(starts) else 0
    end = int(ends[min(fits, len(ends)) - 1]) if len(ends) else 0
    return start, max(end, start + 1)


def servable(s: Session, path: Path, window: tuple[int, int] | None, tmp: Path) -> tuple[Path, str]:
    """What to serve for ``s`` (read from ``path``) and what to say of it: the file itself where
    the UI can open it; else (or for a ``window``) the window, as .pftrace (the leaner import) in
    ``tmp``. ValueError where the window holds no region."""
    big = formats.too_big_for_ui(s, path)
    if window is None and big is None:
        return path, ""
    said = ""
    if window is None:
        # the most regions whose slices import within the UI's limit as .pftrace
        per = formats.import_bytes(s, formats.PERFETTO) - formats.IMPORT_BASE_BYTES
        room = formats.UI_LIMIT_BYTES - formats.IMPORT_BASE_BYTES
        window = first_window(s, max(1, int(len(s) * room / max(per, 1) * 0.9)))
        said = f"{big}; "
    cut = window_of(s, *window)
    if not len(cut):
        raise ValueError(f"no region lies within --window {_ms(window[0])}:{_ms(window[1])}")
    out = tmp / (formats.split_suffix(path.name)[0] + ".window.pftrace")
    formats.save(cut, out)
    said += (
        f"serving {_ms(window[0])}:{_ms(window[1])} of {path.name} ({len(cut):,} of {len(s):,} regions) "
        f"as {out.name}; pick another with --window START:END"
    )
    return out, said


def _ms(ns: int) -> str:
    return f"{ns / 1e6:g}ms"
