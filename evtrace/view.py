"""`evtrace view`: open a trace in ui.perfetto.dev, the way Perfetto's own deep link expects.

The file is served from 127.0.0.1:9001 (the only origin the UI's content-security policy lets
it fetch from), with CORS for https://ui.perfetto.dev and no caching. Only that one file is
served; every other path is a 404. The server stops once the file has been sent.
"""

from __future__ import annotations

import http.server
import socketserver
import sys
import threading
import webbrowser
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

UI = "https://ui.perfetto.dev"
PORT = 9001  # the UI's CSP allows http://127.0.0.1:9001 and nothing else


def url_for(name: str, port: int = PORT) -> str:
    return f"{UI}/#!/?url=http://127.0.0.1:{port}/{quote(name)}"


class _Server(socketserver.TCPServer):
    allow_reuse_address = True


def serve(path: Path, port: int = PORT, open_browser: bool = True, timeout: float | None = None) -> bool:
    """Serve ``path`` once on loopback and point a browser at it. True once the file was sent."""
    data = path.read_bytes()
    name = path.name
    sent = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _headers(self, code: int, length: int) -> None:
            self.send_response(code)
            self.send_header("Access-Control-Allow-Origin", UI)
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Content-Type", "application/octet-stream" if code == 200 else "text/plain")
            self.send_header("Content-Length", str(length))
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            if unquote(urlsplit(self.path).path) != "/" + name:
                self._headers(404, 0)
                return
            self._headers(200, len(data))
            self.wfile.write(data)
            sent.set()

        def do_POST(self) -> None:  # noqa: N802
            self._headers(404, 0)

        def log_message(self, *a: object) -> None:  # quiet
            pass

    with _Server(("127.0.0.1", port), Handler) as httpd:
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        url = url_for(name, port)
        if port != PORT:
            print(f"evtrace: note: ui.perfetto.dev only fetches from 127.0.0.1:{PORT}; with --port {port}, download the file there yourself", file=sys.stderr)
        if open_browser and webbrowser.open(url):  # some browsers return only once they are closed
            print(f"evtrace: opened {url}", file=sys.stderr)
        elif not sent.is_set():
            print(url)
            sys.stdout.flush()
        done = sent.wait(timeout)
        httpd.shutdown()
    return done
