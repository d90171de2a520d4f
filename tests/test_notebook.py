"""The notebook magics, in a real kernel: a headless notebook with a ``%%evtrace`` cell."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

import evtrace

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


@pytest.fixture(autouse=True)
def _kernel_imports_this_evtrace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel imports the evtrace under test, not whichever the venv has installed (a checkout
    beside this one, say): it inherits this process's environment."""
    here = str(Path(evtrace.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))


RECORD = """\
%%evtrace -o {path}
import evtrace
for i in range(20):
    with evtrace.region("step"):
        with evtrace.region("work"):
            sum(range(2000))
"""


def outputs(cell: Any, mime: str) -> list[str]:
    return [
        o["data"][mime]
        for o in cell.outputs
        if o.get("output_type") == "display_data" and mime in o.get("data", {})
    ]


def link(cell: Any) -> str:
    (html,) = outputs(cell, "text/html")
    m = re.search(r"href='(https://ui\.perfetto\.dev/[^']+)'", html)
    assert m, html
    return unescape(m.group(1))


def test_cell_magic_records_and_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVTRACE_VIEW_PORT", "0")  # any free port: tests run side by side
    path = tmp_path / "cell.json.gz"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext evtrace"),
        nbformat.v4.new_code_cell(RECORD.format(path=path)),
        nbformat.v4.new_code_cell(f"%evtrace_view {path}"),
    ]
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            client.execute_cell(cell, i)
            if i == 1:  # while the kernel lives: the link serves the saved file, once
                url = link(cell)
                served = re.search(r"url=(http://127\.0\.0\.1:\d+/.+)$", url)
                assert served and served.group(1).endswith("/cell.json.gz")
                assert urllib.request.urlopen(served.group(1), timeout=10).read() == path.read_bytes()
    for cell in nb.cells[1:]:
        (html,) = outputs(cell, "text/html")
        assert "<table" in html and ">step</td>" in html and ">work</td>" in html
        assert f"saved {path}" in html
        text = outputs(cell, "text/plain")[0]  # what a terminal IPython shows instead
        assert f"saved {path}" in text and "step" in text and "ui.perfetto.dev" in text
        (svg,) = outputs(cell, "image/svg+xml")
        assert svg.startswith("<svg")
    s = evtrace.load(path)
    assert {"step", "work"} <= set(s.names)
    assert (s.regions["name"] == s.names.index("work")).sum() == 20


SHORT = """\
%%evtrace -o {path}
import evtrace
with evtrace.region({name!r}):
    pass
"""


def served_url(cell: Any) -> str:
    m = re.search(r"url=(http://127\.0\.0\.1:\d+/.+)$", link(cell))
    assert m
    return m.group(1)


def test_every_cells_link_keeps_serving_its_own_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A later cell's link neither kills nor shadows an earlier one's, though both files are t.json.gz."""
    monkeypatch.setenv("EVTRACE_VIEW_PORT", "0")
    first, second = tmp_path / "a" / "t.json.gz", tmp_path / "b" / "t.json.gz"
    first.parent.mkdir()
    second.parent.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext evtrace"),
        nbformat.v4.new_code_cell(SHORT.format(path=first, name="first")),
        nbformat.v4.new_code_cell(SHORT.format(path=second, name="second")),
    ]
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    with client.setup_kernel():
        before = time.time()
        for i, cell in enumerate(nb.cells):
            client.execute_cell(cell, i)
        after = time.time()
        urls = [served_url(cell) for cell in nb.cells[1:]]
        assert urls[0] != urls[1] and urls[0].endswith("/t.json.gz") and urls[1].endswith("/t.json.gz")
        assert first.read_bytes() != second.read_bytes()
        for url, path in zip(urls, (first, second)):
            assert urllib.request.urlopen(url, timeout=10).read() == path.read_bytes()
        # what the UI does when the tab is reloaded: the link still answers, within its time
        assert urllib.request.urlopen(urls[0], timeout=10).read() == first.read_bytes()
    promised = {time.strftime("%H:%M", time.localtime(t + 600)) for t in range(int(before), int(after) + 2)}
    for cell, url in zip(nb.cells[1:], urls):
        text = outputs(cell, "text/plain")[0]
        m = re.search(r"served from 127\.0\.0\.1:(\d+) for 10 min \(until (\d\d:\d\d)\)", text)
        assert m, text
        assert url.startswith(f"http://127.0.0.1:{m.group(1)}/") and m.group(2) in promised
        assert "once" not in text


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_a_link_past_its_deadline_answers_404_and_the_last_one_frees_the_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evtrace import notebook

    monkeypatch.setenv("EVTRACE_VIEW_PORT", "0")
    early, late = tmp_path / "early.bin", tmp_path / "late.bin"
    early.write_bytes(b"early")
    late.write_bytes(b"late")
    start = time.monotonic()
    (url_early, note), (url_late, _) = notebook.serve_link(early, 2.0), notebook.serve_link(late, 4.0)
    assert url_early and url_late and "for 2 s (until " in note
    early_at = unquote(url_early.split("url=", 1)[1])
    late_at = unquote(url_late.split("url=", 1)[1])
    assert urllib.request.urlopen(early_at, timeout=10).read() == b"early"
    time.sleep(max(0.0, start + 2.2 - time.monotonic()))
    assert status(early_at) == 404
    assert urllib.request.urlopen(late_at, timeout=10).read() == b"late"
    late.unlink()  # read when fetched, not held in memory: a file removed since answers 404
    assert status(late_at) == 404
    time.sleep(max(0.0, start + 4.2 - time.monotonic()))
    port = int(urlsplit(late_at).port or 0)
    for _ in range(50):  # none is left: the server stops within its poll
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.1)
    else:
        raise AssertionError(f"still listening on {port}")


def test_an_idle_connection_holds_no_link_and_a_rewritten_file_is_not_served_as_the_earlier_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A browser's preconnect (a connection that never asks) is dropped after the request timeout
    instead of holding the server; a link whose file a later cell wrote again answers 404."""
    from evtrace import notebook, serve

    monkeypatch.setenv("EVTRACE_VIEW_PORT", "0")
    monkeypatch.setattr(serve, "REQUEST_TIMEOUT_S", 0.5)
    path = tmp_path / "t.bin"
    path.write_bytes(b"first")
    url, _ = notebook.serve_link(path, 30.0)
    assert url
    at = unquote(url.split("url=", 1)[1])
    idle = socket.create_connection(("127.0.0.1", int(urlsplit(at).port or 0)))
    try:
        time.sleep(0.2)  # the server is now reading the idle connection's request line
        assert urllib.request.urlopen(at, timeout=10).read() == b"first"
    finally:
        idle.close()
    time.sleep(0.01)
    path.write_bytes(b"second, by a later cell")
    assert status(at) == 404
    again, _ = notebook.serve_link(path, 30.0)
    assert (
        again
        and urllib.request.urlopen(unquote(again.split("url=", 1)[1]), timeout=10).read() == path.read_bytes()
    )


def test_a_port_taken_by_something_else_is_said_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evtrace import notebook

    path = tmp_path / "t.bin"
    path.write_bytes(b"t")
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = int(other.getsockname()[1])
        monkeypatch.setenv("EVTRACE_VIEW_PORT", str(port))
        url, note = notebook.serve_link(path)
    assert url is None and note.startswith(f"127.0.0.1:{port} is in use") and "\n" not in note
    assert f"evtrace view {path}" in note


def test_bad_path_is_one_line(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext evtrace"),
        nbformat.v4.new_code_cell(f"%evtrace_view {tmp_path / 'nope.json'}"),
    ]
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True)
    client.execute()
    err = [o for o in nb.cells[1].outputs if o.get("output_type") in ("error", "stream")]
    text = "".join(o.get("text", "") or o.get("evalue", "") for o in err)
    assert "cannot read" in text and "Traceback" not in text


def test_import_evtrace_does_not_import_ipython() -> None:
    code = "import sys, evtrace; print('IPython' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )
