"""The notebook magics, in a real kernel: a headless notebook with a ``%%evtrace`` cell."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from html import unescape
from pathlib import Path
from typing import Any

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
