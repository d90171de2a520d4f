"""What the command line hands on and how it stops: every argument after ``-m module`` or the
script is the target's, ``--`` ends evtrace's options, and Ctrl-C is one line, not a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evtrace

from .children import sigint_default, started

CLI = [sys.executable, "-m", "evtrace"]
ENV = {
    **os.environ,
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONPATH": str(Path(evtrace.__file__).parents[1]),  # this checkout's evtrace, not an installed one
}
SHOW_ARGV = "import json, sys\nprint(json.dumps(sys.argv[1:]))\n"


def run(*args: str | Path, cwd: Path, env: dict[str, str] = ENV) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture
def pkg(tmp_path: Path) -> dict[str, str]:
    """``pkg.show``, a module that prints its arguments, importable through PYTHONPATH (not the cwd)."""
    lib = tmp_path / "lib" / "pkg"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "show.py").write_text(SHOW_ARGV)
    (tmp_path / "work").mkdir()
    return {**ENV, "PYTHONPATH": os.pathsep.join([ENV["PYTHONPATH"], str(tmp_path / "lib")])}


@pytest.mark.parametrize(
    "module_args",
    [
        ["--lr", "0.1"],
        ["-o", "x.json"],  # the module's -o; evtrace's output keeps its default name
        ["--help"],  # the module's help, not evtrace's
        ["--nproc-per-node", "2", "train.py", "--no-cuda"],  # as torch.distributed.run is given
        ["-m", "other", "--", "-x"],
    ],
)
def test_every_argument_after_the_module_is_the_module_s(
    tmp_path: Path, pkg: dict[str, str], module_args: list[str]
) -> None:
    work = tmp_path / "work"
    p = run("--no-hooks", "-m", "pkg.show", *module_args, cwd=work, env=pkg)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == module_args
    assert not (work / "x.json").exists()
    assert len(list(work.glob("evtrace-*.json.gz"))) == 1


@pytest.mark.parametrize("sep", [[], ["--"]], ids=["script", "-- script"])
@pytest.mark.parametrize(
    "script_args", [["--lr", "0.1"], ["-o", "x.json"], ["--help"], ["-m", "pkg.show"], ["--", "-x"]]
)
def test_every_argument_after_the_script_is_the_script_s(
    tmp_path: Path, sep: list[str], script_args: list[str]
) -> None:
    (tmp_path / "show.py").write_text(SHOW_ARGV)
    p = run("run", "--no-hooks", "-o", "t.json", *sep, "show.py", *script_args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == script_args
    assert not (tmp_path / "x.json").exists()
    assert (tmp_path / "t.json").exists()


def test_a_double_dash_ends_evtrace_s_options(tmp_path: Path, pkg: dict[str, str]) -> None:
    work = tmp_path / "work"
    (work / "show.py").write_text(SHOW_ARGV)
    for args in (["run", "--", "show.py", "a"], ["--no-hooks", "--", "show.py", "a"]):
        p = run(*args, cwd=work)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout) == ["a"]
    p = run("run", "--", "-m", cwd=work)  # after --, a script's name, even one that looks like an option
    assert p.returncode == 2 and p.stderr == "evtrace: error: no such script: -m\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["-m"], "argument -m: expected one argument"),
        (["--max-regions"], "argument --max-regions: expected one argument"),
        (["run", "--"], "no script given"),
        (["--bogus", "-m", "pkg.show"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_before_the_target_is_one_line_and_exit_2(
    tmp_path: Path, pkg: dict[str, str], args: list[str], message: str
) -> None:
    p = run(*args, cwd=tmp_path / "work", env=pkg)
    assert p.returncode == 2
    assert len(p.stderr.splitlines()) == 1 and message in p.stderr, p.stderr
    assert p.stdout == ""


def test_evtrace_s_own_options_still_parse_before_the_target(tmp_path: Path, pkg: dict[str, str]) -> None:
    """Options with values, as ``-o X``, ``-oX``, ``--output=X`` and an abbreviation (``--out X``)."""
    work = tmp_path / "work"
    for i, out in enumerate((["-o", "a.json"], ["-ob.json"], ["--output=c.json"], ["--out", "d.json"])):
        p = run(*out, "--depth", "1", "--no-hooks", "-m", "pkg.show", str(i), cwd=work, env=pkg)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout) == [str(i)]
    assert sorted(f.name for f in work.iterdir()) == ["a.json", "b.json", "c.json", "d.json"]


READERS = {
    "summary": ["summary", "fifo.json"],
    "report": ["report", "fifo.json"],
    "render": ["render", "fifo.json", "-o", "t.svg"],
    "diff": ["diff", "fifo.json", "fifo.json"],
    "merge": ["merge", "fifo.json", "-o", "m.json"],
    "view": ["view", "fifo.json", "--no-browser"],
}


@pytest.mark.parametrize("command", list(READERS))
def test_ctrl_c_in_a_reading_command_is_one_line_and_130(tmp_path: Path, command: str) -> None:
    """The trace is a FIFO: the command is certainly reading it (the FIFO has a reader) when the
    signal comes, however long its imports took."""
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with subprocess.Popen(
        [*CLI, *READERS[command]],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_default,
    ) as p:
        deadline = time.monotonic() + 120
        while True:  # opening for writing without blocking fails (ENXIO) until the reader opens it
            try:
                w = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert p.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
        try:
            os.write(w, b'{"traceEvents": [')  # part of a trace: the reader waits for the rest
            time.sleep(0.1)
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=60)
        finally:
            os.close(w)
    assert p.returncode == 130, err
    assert err == "evtrace: interrupted\n"
    assert out == ""
    assert sorted(f.name for f in tmp_path.iterdir()) == ["fifo.json"]  # nothing written


def test_ctrl_c_while_starting_is_one_line(tmp_path: Path) -> None:
    """A Ctrl-C while torch imports (here a slow stand-in: the cwd comes first under python -m)
    ends evtrace as the signal would, with one line and no traceback of the import."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "import time\nprint('ready', flush=True)\ntime.sleep(60)\n"
    )
    (tmp_path / "job.py").write_text("print('ran')\n")
    with started([*CLI, "-o", "t.json", "job.py"], tmp_path, ENV) as p:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGINT  # 130 from a shell
    assert err == "evtrace: stopped before the script began; no trace written\n"
    assert "ran" not in out and not (tmp_path / "t.json").exists()


def test_ctrl_c_while_finding_the_module_is_one_line(tmp_path: Path, pkg: dict[str, str]) -> None:
    """``-m pkg.mod`` imports ``pkg`` to find the module (torch.distributed.run imports torch)."""
    lib = tmp_path / "lib" / "pkg"
    (lib / "__init__.py").write_text("import time\nprint('ready', flush=True)\ntime.sleep(60)\n")
    with started([*CLI, "-o", "t.json", "-m", "pkg.show"], tmp_path / "work", pkg) as p:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGINT  # 130 from a shell
    assert err == "evtrace: stopped before the script began; no trace written\n"
    assert not (tmp_path / "work" / "t.json").exists()
