"""A session's life from start to file: forked children, default names, the thread that ends it,
the directory it was started in, sessions inside sessions (issue #24)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import evtrace
from evtrace import recorder

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # PYTHONPATH included: children import this checkout
FORKER = """
import os, time, evtrace
def work():
    for i in range(5):
        with evtrace.region("r"):
            pass
    parent = os.getpid()
    if os.fork() == 0:  # the child ends normally, once its parent has written the trace
        while os.getppid() == parent:
            time.sleep(0.01)
        return
    for i in range(1000):
        with evtrace.region("r"):
            pass
"""
ENDINGS = {
    "with record()": ("with evtrace.record('t.json', device=False):\n    work()\n", ["job.py"]),
    "record().__enter__()": ("evtrace.record('t.json', device=False).__enter__()\nwork()\n", ["job.py"]),
    "python -m evtrace": ("work()\n", ["-m", "evtrace", "--no-cuda", "-o", "t.json", "job.py"]),
}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_forked_child_never_writes_over_its_parent_s_trace(tmp_path: Path, ending: str) -> None:
    tail, args = ENDINGS[ending]
    (tmp_path / "job.py").write_text(FORKER + tail)
    p = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert len(evtrace.load(tmp_path / "t.json")) == 1005
    assert p.stderr.count("evtrace: wrote") == 1, p.stderr  # the child says nothing
    assert p.stderr.count("session still open") <= 1, p.stderr


def test_runs_in_the_same_second_keep_their_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    paths = []
    for i in range(5):
        with evtrace.record(device=False, quiet=True) as r:
            with evtrace.region("run", i=i):
                pass
        paths.append(r.path)
    assert len(set(paths)) == 5 and all(p is not None and not p.is_absolute() for p in paths)
    for i, p in enumerate(paths):
        assert re.fullmatch(r"evtrace-\d{8}-\d{6}(-\d+)?\.json\.gz", str(p))
        assert evtrace.load(tmp_path / str(p)).args == {0: {"i": i}}


def test_a_default_name_taken_meanwhile_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process took the name while this one recorded: this trace goes to the next name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with evtrace.record(device=False, quiet=True) as r:
        assert r.path is not None and str(r.path).endswith("-rank1.json.gz")
        taken = tmp_path / r.path
        taken.write_bytes(b"theirs")
        with evtrace.region("ours"):
            pass
    assert taken.read_bytes() == b"theirs"
    assert r.path is not None and r.path.name == taken.name.replace("-rank1", "-1-rank1")
    assert evtrace.load(tmp_path / r.path).names == ["ours"]
    taken.unlink()  # not a trace: the strict checker would read it


def test_a_session_ended_on_another_thread_is_written_and_the_next_one_works(tmp_path: Path) -> None:
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    r = evtrace.record(tmp_path / "a.json", device=False, quiet=True)
    r.__enter__()
    with evtrace.region("first"):
        pass
    failed: list[BaseException] = []

    def end() -> None:
        try:
            r.__exit__()
        except BaseException as e:
            failed.append(e)

    t = threading.Thread(target=end)
    t.start()
    t.join()
    assert failed == [] and recorder.current is None
    assert evtrace.load(tmp_path / "a.json").names == ["first"]
    with evtrace.record(tmp_path / "b.json", device=False, quiet=True):
        with evtrace.region("second"):
            pass
    assert evtrace.load(tmp_path / "b.json").names == ["second"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is back


def test_a_handler_left_by_a_session_ended_elsewhere_acts_as_the_one_it_replaced(tmp_path: Path) -> None:
    """Between that session's end and the next, SIGTERM ends the process as it would have."""
    (tmp_path / "job.py").write_text(
        "import os, signal, threading, evtrace\n"
        "r = evtrace.record('t.json', device=False, quiet=True)\n"
        "r.__enter__()\n"
        "t = threading.Thread(target=r.__exit__)\n"
        "t.start(); t.join()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('survived')\n"
    )
    p = subprocess.run([sys.executable, "job.py"], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert p.returncode == -signal.SIGTERM and "Traceback" not in p.stderr, p.stderr
    assert (tmp_path / "t.json").exists()


def test_a_relative_path_is_where_the_session_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    with evtrace.record("t.json", device=False) as r:
        with evtrace.region("r"):
            pass
        os.chdir(tmp_path / "outputs")  # as Hydra jobs do
    assert evtrace.load(tmp_path / "run" / "t.json").names == ["r"]
    assert not (tmp_path / "outputs" / "t.json").exists()
    assert r.path == tmp_path / "run" / "t.json"
    assert f"evtrace: wrote {tmp_path / 'run' / 't.json'} (1 region," in capsys.readouterr().err


def test_a_record_inside_another_writes_its_span_and_the_outer_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with evtrace.record(tmp_path / "outer.json", device=False, quiet=True) as outer:
        with evtrace.region("before"):
            pass
        with evtrace.record(tmp_path / "inner.json", hooks=True) as inner:
            with evtrace.region("inside", k=1):
                pass
        with evtrace.region("after"):
            pass
    assert recorder.current is None
    assert outer.session is not None and sorted(outer.session.names) == ["after", "before", "inside"]
    back = evtrace.load(tmp_path / "inner.json")
    assert back.names == ["inside"] and back.args == {0: {"k": 1}}
    assert inner.session is not None and len(inner.session) == 1
    assert 0 <= back.regions["host_start"][0] <= back.regions["host_end"][0] <= back.meta["duration_ns"]
    err = capsys.readouterr().err
    assert err.count("hooks ignored") == 1
    assert f"evtrace: wrote {tmp_path / 'inner.json'} (1 region," in err


def test_a_record_inside_evtrace_run(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text(
        "import evtrace\n"
        "with evtrace.region('setup'):\n    pass\n"
        "with evtrace.record('inner.json'):\n"
        "    for i in range(3):\n"
        "        with evtrace.region('step', i=i):\n            pass\n"
    )
    p = subprocess.run(
        [sys.executable, "-m", "evtrace", "--no-cuda", "-o", "outer.json", "job.py"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert len(evtrace.load(tmp_path / "outer.json").regions) >= 4
    inner = evtrace.load(tmp_path / "inner.json")
    assert inner.names == ["step"] and len(inner) == 3


def test_a_recursive_function_decorated_with_record_writes_one_whole_trace(tmp_path: Path) -> None:
    """Each call of a decorated function is a record() of the same file: the nested ones are that
    session, not views that would write over it with their part."""
    path = tmp_path / "rec.json"

    @evtrace.record(path, device=False, quiet=True)
    def f(n: int) -> None:
        with evtrace.region(f"work{n}"):
            pass
        if n:
            f(n - 1)

    f(2)
    assert sorted(evtrace.load(path).names) == ["work0", "work1", "work2"]


def test_a_view_still_open_when_its_session_ends_is_written_then(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outer = evtrace.record(tmp_path / "outer.json", device=False, quiet=True)
    inner = evtrace.record(tmp_path / "inner.json")
    outer.__enter__()
    inner.__enter__()
    with evtrace.region("inside"):
        pass
    outer.__exit__()
    inner.__exit__()
    assert evtrace.load(tmp_path / "inner.json").names == ["inside"]
    assert f"wrote {tmp_path / 'inner.json'}" in capsys.readouterr().err


def _full_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Saving to any file named full.json fails as a full disk does; the temp directory has room."""
    import errno
    import tempfile

    from evtrace.session import Session

    save = Session.save

    def failing(self: Session, path: Any, *a: Any, **k: Any) -> Any:
        if Path(path).name == "full.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, path, *a, **k)

    monkeypatch.setattr(Session, "save", failing)
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def test_a_full_disk_writes_the_trace_to_the_temp_directory_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp = _full_disk(monkeypatch, tmp_path)
    with evtrace.record(tmp_path / "full.json", device=False) as rec:
        for i in range(50):
            with evtrace.region("step", i=i):
                pass
    assert not rec.written_where_asked and rec.path is not None and rec.path.parent == tmp
    assert len(evtrace.load(rec.path)) == 50
    err = capsys.readouterr().err
    assert "could not write" in err and "No space left on device" in err
    assert f"wrote {rec.path} instead" in err


def test_under_evtrace_run_a_trace_not_written_where_asked_is_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from evtrace import cli

    tmp = _full_disk(monkeypatch, tmp_path)
    script = tmp_path / "job.py"
    script.write_text("import evtrace\nwith evtrace.region('r'):\n    pass\n")
    monkeypatch.chdir(tmp_path)
    code = cli.main(["--no-cuda", "--no-hooks", "-o", str(tmp_path / "full.json"), str(script)])
    assert code == 1  # the script succeeded; its trace is not where it was asked for
    rescued = list(tmp.glob("full-*.json"))
    assert len(rescued) == 1 and evtrace.load(rescued[0]).names == ["r"]
    assert "instead" in capsys.readouterr().err


def test_under_torchrun_the_default_name_has_its_rank_once(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text("import evtrace\n")
    env = {**ENV, "RANK": "0", "WORLD_SIZE": "2"}
    p = subprocess.run(
        [sys.executable, "-m", "evtrace", "--no-hooks", "job.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    written = [q.name for q in tmp_path.glob("evtrace-*.json.gz")]
    assert len(written) == 1 and written[0].endswith("-rank0.json.gz") and "rank0-rank0" not in written[0]
