"""A signal while a long trace is being written: the write is finished, or aborted cleanly."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

import evtrace

from .children import sigint_default

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
N = 2_000_000
WORK = f"""
import evtrace
from evtrace import recorder
def work():  # {N} host-only regions, straight to the recorder: a long write, a short record
    rec = recorder.current
    k = recorder.name_key("r")
    enter, exit = rec.enter_host, rec.exit_host
    for _ in range({N}):
        exit(enter(k, None))
"""


def start(tmp_path: Path, under_cli: bool) -> tuple[subprocess.Popen[str], Path]:
    script = tmp_path / "job.py"
    if under_cli:
        script.write_text(WORK + "work()\n")
        cmd = [sys.executable, "-m", "evtrace", "--no-cuda", "--no-hooks", "-o", "t.json.gz", "job.py"]
    else:
        script.write_text(WORK + "with evtrace.record('t.json.gz', device=False):\n    work()\n")
        cmd = [sys.executable, "job.py"]
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        p = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=f,
            text=True,
            preexec_fn=sigint_default,
        )
    return p, err


def wait_for(what: str, found: object, p: subprocess.Popen[str], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not found():  # type: ignore[operator]
        assert p.poll() is None, f"ended ({p.returncode}) before {what}"
        assert time.monotonic() < end, f"no {what} after {timeout} s"
        time.sleep(0.002)


def writing(tmp_path: Path, p: subprocess.Popen[str]) -> None:
    """Wait until the trace's temp file holds some bytes: writing has begun, far from done."""
    tmp = tmp_path / f".t.json.gz.{p.pid}.tmp"

    def begun() -> bool:
        try:
            return tmp.stat().st_size > 0
        except FileNotFoundError:
            return False

    wait_for("temp file", begun, p)


def leftovers(tmp_path: Path) -> list[str]:
    return [q.name for q in tmp_path.iterdir() if q.name.endswith(".tmp")]


@pytest.fixture
def big_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Not under tmp_path: the strict checker of every trace there would take a minute on these."""
    return tmp_path_factory.mktemp("big")


@pytest.mark.parametrize("under_cli", [True, False], ids=["python -m evtrace", "with record()"])
@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
def test_a_signal_while_writing_finishes_the_trace_then_ends_by_it(
    big_dir: Path, under_cli: bool, sig: int
) -> None:
    tmp_path = big_dir
    p, err = start(tmp_path, under_cli)
    writing(tmp_path, p)
    p.send_signal(sig)
    p.wait(timeout=120)
    text = err.read_text()
    assert p.returncode == -sig, text  # 130 / 143 from a shell
    assert "finishing t.json.gz first" in text
    assert f"evtrace: wrote t.json.gz ({N} regions" in text
    assert "Traceback" not in text or (
        sig == signal.SIGINT and not under_cli
    )  # the script's own KeyboardInterrupt
    assert leftovers(tmp_path) == []
    if under_cli and sig == signal.SIGINT:  # once: loading 2M regions takes seconds
        assert len(evtrace.load(tmp_path / "t.json.gz")) == N
    else:
        events = orjson.loads(gzip.decompress((tmp_path / "t.json.gz").read_bytes()))["traceEvents"]
        assert sum(e.get("name") == "r" for e in events) == N


@pytest.mark.parametrize("under_cli", [True, False], ids=["python -m evtrace", "with record()"])
def test_a_second_signal_aborts_the_write_and_says_so(big_dir: Path, under_cli: bool) -> None:
    tmp_path = big_dir
    p, err = start(tmp_path, under_cli)
    writing(tmp_path, p)
    p.send_signal(signal.SIGTERM)
    wait_for("the first signal's line", lambda: "finishing" in err.read_text(), p)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=120)
    text = err.read_text()
    assert p.returncode == -signal.SIGTERM, text  # the first signal's
    assert "evtrace: SIGINT: stopped; t.json.gz was not written" in text
    folder = tmp_path / "t.json.gz.journal"  # the recording is not lost: named, with the way back
    assert f"; the recording is kept in {folder}: evtrace recover {folder}" in text
    assert (folder / "catalog").exists()
    assert "Traceback" not in text
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "t.json.gz").exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_has_sigterm_s_default_action(tmp_path: Path) -> None:
    """A worker forked while recording (a DataLoader or Pool worker) records nothing: SIGTERM ends
    it at once, as without evtrace, instead of unwinding it (a Pool worker unwound while it held
    its queue's lock left the pool's other workers, and the pool's terminate(), waiting for ever)."""
    with evtrace.record(tmp_path / "f.json", device=False, quiet=True):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the parent's is evtrace's
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, b"1" if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else b"0")
            os._exit(0)
        os.close(w)
        got = os.read(r, 1)
        os.close(r)
        os.waitpid(pid, 0)
    assert got == b"1"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_sigterm_sent_right_after_the_fork_ends_the_child(tmp_path: Path) -> None:
    """Pool.terminate() may SIGTERM a worker while it still runs its fork hooks. Reaching evtrace's
    handler there, or dropped once the hooks had reset it, the signal left the worker alive, and
    the pool's join waited for ever (test_workers[fork] hung on a loaded machine)."""
    survived = 0
    with evtrace.record(tmp_path / "f.json", device=False, quiet=True):
        for _ in range(20):
            pid = os.fork()
            if pid == 0:
                time.sleep(5)
                os._exit(0)
            os.kill(pid, signal.SIGTERM)  # at once: the child is still in its fork hooks
            _, status = os.waitpid(pid, 0)
            survived += not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM)
    assert survived == 0
