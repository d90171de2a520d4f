"""``python -m evtrace script.py`` gives the script what ``python script.py`` gives, and ends as it would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import evtrace

from .children import started

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
SHOW = """
import sys, warnings
print(__name__, __file__, __spec__, __package__, __cached__,
      type(__loader__).__name__, __loader__.name, __loader__.path)
print(sorted(globals()), sys.modules["__main__"].__dict__ is globals())
print(sys.argv, sys.path[0])
print(warnings.filters)
raise SystemExit(3)
"""


def test_the_script_sees_what_plain_python_gives(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "show.py").write_text(SHOW)
    args = ["./sub/show.py", "a", "--b=c"]
    plain, under = (
        subprocess.run(cmd, cwd=tmp_path, env=ENV, check=False, capture_output=True, text=True, timeout=120)
        for cmd in ([sys.executable, *args], [sys.executable, "-m", "evtrace", "-o", "t.json", *args])
    )
    assert plain.returncode == 3 and plain.stderr == ""
    assert under.returncode == 3, under.stderr
    assert under.stdout == plain.stdout
    assert (
        f"__main__ {tmp_path}/./sub/show.py None None None SourceFileLoader" in under.stdout
    )  # absolute, as given


def test_sigterm_while_torch_imports_is_answered(tmp_path: Path) -> None:
    (tmp_path / "torch").mkdir()  # shadows torch under python -m (cwd first): an import that takes long
    (tmp_path / "torch" / "__init__.py").write_text(
        "import time\nprint('importing', flush=True)\ntime.sleep(60)\n"
    )
    (tmp_path / "job.py").write_text("print('ran')\n")
    with subprocess.Popen(
        [sys.executable, "-m", "evtrace", "-o", "t.json", "job.py"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as p:
        assert p.stdout is not None and p.stdout.readline().strip() == "importing"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM  # 143 from a shell
    assert err == "evtrace: stopped before the script began; no trace written\n"
    assert "ran" not in out and not (tmp_path / "t.json").exists()


def test_a_sigint_traceback_shows_only_the_script(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text(
        "import time, evtrace\ndef wait():\n    print('ready', flush=True)\n    time.sleep(60)\n"
        "with evtrace.region('r'):\n    wait()\n"
    )
    with started(
        [sys.executable, "-m", "evtrace", "--no-hooks", "-o", "t.json", "job.py"], tmp_path, ENV
    ) as p:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGINT, err  # 130 from a shell
    tb = err[err.index("Traceback") :]
    assert 'job.py", line 6, in <module>' in tb and "in wait" in tb
    assert "evtrace" not in tb and "runpy" not in tb
    assert tb.rstrip().endswith("KeyboardInterrupt")
    assert len(evtrace.load(tmp_path / "t.json")) == 1


def test_a_script_with_a_syntax_error_is_shown_as_python_shows_it_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("import evtrace\ndef (:\n")
    mine = subprocess.run(
        [sys.executable, "-m", "evtrace", "--no-hooks", "-o", "t.json", "bad.py"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    plain = subprocess.run(
        [sys.executable, "bad.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert mine.returncode == plain.returncode == 1
    assert mine.stderr == plain.stderr  # the SyntaxError, as python shows it
    assert not (tmp_path / "t.json").exists()  # no empty trace of a script that never ran
