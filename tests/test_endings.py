"""A valid trace after any ending: exit codes, signals, open regions, killed writers, long runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import evtrace
from evtrace import recorder
from evtrace.formats import chrome

from .children import started

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
SLEEPER = """
import sys, time, evtrace
def work():
    with evtrace.region("before"):
        pass
    with evtrace.region("interrupted"):
        print("ready", flush=True)
        time.sleep(60)
"""


def start(tmp_path: Path, under_cli: bool) -> subprocess.Popen[str]:
    script = tmp_path / "job.py"
    if under_cli:
        script.write_text(SLEEPER + "work()\n")
        cmd = [sys.executable, "-m", "evtrace", "-o", "t.json", "job.py"]
    else:
        script.write_text(SLEEPER + "with evtrace.record('t.json'):\n    work()\n")
        cmd = [sys.executable, "job.py"]
    return started(cmd, tmp_path, ENV)


@pytest.mark.parametrize("under_cli", [True, False], ids=["python -m evtrace", "with record()"])
@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
def test_a_signal_writes_the_trace_and_keeps_the_signal_exit_status(
    tmp_path: Path, under_cli: bool, sig: int
) -> None:
    with start(tmp_path, under_cli) as p:
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    assert p.returncode == -sig, err  # died by that signal: 130 / 143 from a shell
    assert "evtrace: wrote t.json (2 regions" in err
    s = evtrace.load(tmp_path / "t.json")
    assert s.names == ["before", "interrupted"]


def test_a_region_still_open_at_the_end_is_closed_and_marked(tmp_path: Path) -> None:
    inside, release = threading.Event(), threading.Event()

    def worker() -> None:
        with evtrace.region("still running"):
            inside.set()
            release.wait(10)

    with evtrace.record(tmp_path / "open.json", device=False, quiet=True) as r:
        t = threading.Thread(target=worker, name="worker")
        t.start()
        inside.wait(10)
        with evtrace.region("done"):
            pass
    release.set()
    t.join()
    s = r.session
    assert s is not None and len(s) == 2 and s.meta["unfinished_regions"] == 1
    ix = s.names.index("still running")
    (i,) = (s.regions["name"] == ix).nonzero()[0]
    assert s.args[int(i)] == {"unfinished": True}
    assert s.regions["host_end"][i] == s.meta["duration_ns"]  # closed at the end
    back = evtrace.load(tmp_path / "open.json")
    assert back.args == s.args


def test_a_session_never_exited_is_written_when_the_program_ends(tmp_path: Path) -> None:
    """``record().__enter__()`` with no exit (a notebook-style start): the program's end writes it."""
    script = tmp_path / "job.py"
    script.write_text(
        "import evtrace\n"
        "evtrace.record('t.json').__enter__()\n"
        "for i in range(3):\n"
        "    with evtrace.region('step', i=i):\n"
        "        pass\n"
    )
    p = subprocess.run([sys.executable, "job.py"], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "session still open: writing it" in p.stderr
    s = evtrace.load(tmp_path / "t.json")
    assert s.names == ["step"] and len(s.regions) == 3


def test_a_killed_writer_leaves_no_half_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "keep.json.gz"
    with evtrace.record(out, device=False, quiet=True) as r:
        with evtrace.region("first"):
            pass
    before = out.read_bytes()

    def broken(*a: object) -> object:
        yield bytearray(b",{")  # what _slices yields: text in bytes, each row led by a comma
        raise KeyboardInterrupt  # the writer dies half way

    monkeypatch.setattr(chrome, "_slices", broken)
    with pytest.raises(KeyboardInterrupt):
        r.session.save(out)  # type: ignore[union-attr]
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json.gz"]


def test_max_regions_keeps_the_newest_and_counts_the_rest(tmp_path: Path) -> None:
    rec = recorder.Recorder(None, max_regions=1000, background=False)
    rec.start()
    k, k_args = recorder.name_key("r"), recorder.name_key("with args")
    for i in range(10):
        for _ in range(500):
            rec.exit(rec.enter(k, None))
        rec.exit(rec.enter(k_args, {"i": i}))
        rec.poll()
    s = rec.stop()
    assert 1000 <= len(s) <= 1000 + 501
    assert s.meta["dropped_regions"] == 5010 - len(s)
    kept = sorted(a["i"] for a in s.args.values())
    assert kept == list(range(10 - len(kept), 10))  # the newest args survive, re-indexed
    for i, _a in s.args.items():
        assert s.names[s.regions["name"][i]] == "with args"
    s.save(tmp_path / "ring.json")


def test_redact_argv(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text("import evtrace\nwith evtrace.region('r'):\n    pass\n")
    p = subprocess.run(
        [sys.executable, "-m", "evtrace", "--redact-argv", "-o", "t.json", "job.py", "--token", "s3cret"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    raw = (tmp_path / "t.json").read_text()
    assert "s3cret" not in raw and str(tmp_path) not in raw
    assert evtrace.load(tmp_path / "t.json").meta["argv"] == ["job.py", "<redacted>"]


def test_secret_option_values_are_redacted_by_default(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text("import evtrace\nwith evtrace.region('r'):\n    pass\n")
    args = ["job.py", "--api-key", "k3y", "--token=t0ken", "db.password=hunter2", "--lr", "3"]
    p = subprocess.run(
        [sys.executable, "-m", "evtrace", "--no-hooks", "-o", "t.json", *args],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    raw = (tmp_path / "t.json").read_text()
    assert "k3y" not in raw and "t0ken" not in raw and "hunter2" not in raw
    assert evtrace.load(tmp_path / "t.json").meta["argv"] == [
        "job.py",
        "--api-key",
        "<redacted>",
        "--token=<redacted>",
        "db.password=<redacted>",
        "--lr",
        "3",
    ]


def test_redact_keeps_only_the_script_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "secret-project" / "train.py"), "--token", "s3cret"])
    with evtrace.record(tmp_path / "a.json", device=False, quiet=True):
        pass
    with evtrace.record(tmp_path / "b.json", device=False, quiet=True, redact_argv=True):
        pass
    assert evtrace.load(tmp_path / "a.json").meta["argv"] == [
        str(tmp_path / "secret-project" / "train.py"),
        "--token",
        "<redacted>",
    ]
    assert evtrace.load(tmp_path / "b.json").meta["argv"] == ["train.py", "<redacted>"]
    (tmp_path / "job.py").write_text("pass\n")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "evtrace",
            "--redact",
            "--no-hooks",
            "-o",
            "c.json",
            str(tmp_path / "job.py"),
            "x",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert evtrace.load(tmp_path / "c.json").meta["argv"] == ["job.py", "<redacted>"]


ARRIVES_AT_THE_END = """
import signal
import evtrace
import evtrace.finish as f
{open}
with evtrace.region("work"):
    pass
enter = f.Finishing.__enter__
def once(self):  # the signal lands as the write's own signal handling is being put in place
    f.Finishing.__enter__ = enter
    raise {signal}
f.Finishing.__enter__ = once
"""


@pytest.mark.parametrize("under_cli", [True, False], ids=["python -m evtrace", "with record()"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_as_the_script_ends_still_writes_the_trace(
    tmp_path: Path, under_cli: bool, sig: int
) -> None:
    """Signals right after the script's last statement, before the write held them, lost the
    trace (15 of 30 SIGTERMs on a loaded machine) or printed a traceback."""
    raised = "KeyboardInterrupt" if sig == signal.SIGINT else "f.Terminated(signal.SIGTERM)"
    script = ARRIVES_AT_THE_END.format(
        open="" if under_cli else "rec = evtrace.record('t.json').__enter__()", signal=raised
    )
    if not under_cli:
        script += "rec.__exit__()\n"
    (tmp_path / "job.py").write_text(script)
    cmd = (
        [sys.executable, "-m", "evtrace", "--no-hooks", "-o", "t.json", "job.py"]
        if under_cli
        else [
            sys.executable,
            "job.py",
        ]
    )
    p = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode in (-sig, 128 + sig), p.stderr  # ended by that signal
    assert "evtrace: wrote t.json" in p.stderr
    assert evtrace.load(tmp_path / "t.json").names == ["work"]
