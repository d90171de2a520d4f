"""The journal: what a run that was killed, exited without cleanup or hangs leaves for
`evtrace recover`, and what recover makes of it."""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import evtrace
from evtrace import journal
from evtrace.session import Session

from .checker import problems
from .children import killed_after, sigint_default
from .perfetto import ERRORS, Query
from .simdevice import FakeClock, SimBackend
from .test_cuda_backend import FakeStream, backend  # noqa: F401  (backend: a fixture)

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
EVTRACE = [sys.executable, "-m", "evtrace"]


def recover(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EVTRACE, "recover", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120
    )


def ids_of(s: Session) -> set[int]:
    return {a["i"] for a in s.args.values() if "i" in a}


#: 1 ms regions with an int arg for `seconds`, then what `end` says: each region's index and
#: wall-clock end on stdout every 20 regions (time.time: a kill's moment is on the same clock)
LOOP = """
import os, sys, time, evtrace
seconds, end = float(sys.argv[1]), sys.argv[2]
t0, i = time.time(), 0
print("started", flush=True)
with evtrace.region("outer"):
    while time.time() - t0 < seconds:
        with evtrace.region("step", i=i):
            time.sleep(0.001)
        if i % 20 == 0:
            print(i, time.time(), flush=True)
        i += 1
    if end == "exit":
        os._exit(3)
    if end == "segfault":
        import ctypes
        ctypes.string_at(0)
    if end == "hang":
        with evtrace.region("stuck"):
            print("stuck", flush=True)
            time.sleep(600)
"""


def launch(tmp_path: Path, code: str, *args: str, options: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """``evtrace run`` (host lanes, no hooks) of a script, writing t.json.gz, left running."""
    (tmp_path / "job.py").write_text(code)
    return subprocess.Popen(
        [*EVTRACE, "--no-cuda", "--no-hooks", *options, "-o", "t.json.gz", "job.py", *args],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_default,
    )


def run_job(tmp_path: Path, code: str, *options: str) -> Path:
    """The same, run to its end (successful); the journal it left."""
    p = launch(tmp_path, code, options=options)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return tmp_path / "t.json.gz.journal"


def start(tmp_path: Path, seconds: float, end: str) -> subprocess.Popen[str]:
    return launch(tmp_path, LOOP, str(seconds), end)


def test_sigkill_leaves_a_journal_that_recovers_every_region_finished_before_it(
    tmp_path: Path,
    maybe_perfetto: Query | None,
) -> None:
    done, killed = killed_after(start(tmp_path, 60, ""), 6)
    r = recover(tmp_path, "t.json.gz.journal")
    assert r.returncode == 0, r.stderr
    assert "wrote t.json.gz" in r.stderr and "unfinished" in r.stderr
    s = evtrace.load(tmp_path / "t.json.gz")
    due = max(i for i, t in done if t <= killed - 1.2)  # finished at least 1.2 s before the kill
    assert set(range(due + 1)) <= ids_of(s)
    assert len(s) > 1000 and problems(evtrace.files.read_json(tmp_path / "t.json.gz")) == []
    outer = [k for k in range(len(s)) if s.names[s.regions["name"][k]] == "outer"]
    assert len(outer) == 1 and s.args[outer[0]] == {"unfinished": True}
    if maybe_perfetto is not None:  # Perfetto's own importer, where it is present
        assert maybe_perfetto(tmp_path / "t.json.gz", ERRORS) == []
        assert maybe_perfetto(tmp_path / "t.json.gz", "select count(*) from slice") == [[str(len(s))]]


def test_a_hung_process_is_recovered_while_it_runs_and_left_running(tmp_path: Path) -> None:
    p = launch(
        tmp_path,
        "import time, evtrace\n"
        "for i in range(2000):\n"
        "    with evtrace.region('step', i=i):\n"
        "        pass\n"
        "with evtrace.region('stuck'):\n"
        "    print('stuck', flush=True)\n"
        "    time.sleep(600)\n",
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == "stuck\n"
        time.sleep(1.2)  # two flushes at least
        r = recover(tmp_path, "t.json.gz", "-o", "snapshot.json.gz")  # the trace's path finds it
        assert r.returncode == 0, r.stderr
        assert f"process {p.pid} still records: this is a snapshot" in r.stderr
        assert p.poll() is None  # left running
        s = evtrace.load(tmp_path / "snapshot.json.gz")
        assert ids_of(s) == set(range(2000))
        stuck = [k for k in range(len(s)) if s.names[s.regions["name"][k]] == "stuck"]
        assert len(stuck) == 1 and s.args[stuck[0]] == {"unfinished": True}
        assert s.meta["unfinished_regions"] == 1
    finally:
        p.kill()
        p.communicate()


@pytest.mark.parametrize("end", ["exit", "segfault"])
def test_os_exit_or_a_segfault_under_evtrace_run_leaves_a_recoverable_journal(
    tmp_path: Path, end: str
) -> None:
    p = start(tmp_path, 2.5, end)
    out, err = p.communicate(timeout=120)
    ended = time.time()
    assert p.returncode == (3 if end == "exit" else -signal.SIGSEGV), err
    assert not (tmp_path / "t.json.gz").exists()
    r = recover(tmp_path, "t.json.gz.journal", "-o", "r.json.gz")
    assert r.returncode == 0, r.stderr
    done = [(int(i), float(t)) for i, t in (line.split() for line in out.splitlines()[1:])]
    due = max(i for i, t in done if t <= ended - 1.2)
    assert set(range(due + 1)) <= ids_of(evtrace.load(tmp_path / "r.json.gz"))


def _kept_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal stays after a normal end (marked finished), to compare with the trace."""
    monkeypatch.setattr(journal, "remove", lambda folder: None)


def test_a_normal_end_removes_the_journal(tmp_path: Path) -> None:
    with evtrace.record(tmp_path / "t.json", device=False, quiet=True):
        with evtrace.region("r"):
            assert (tmp_path / "t.json.journal" / "catalog").exists()
    assert sorted(q.name for q in tmp_path.iterdir()) == ["t.json"]


def same_session(got: Session, want: Session) -> None:
    np.testing.assert_array_equal(got.regions, want.regions)
    assert (got.names, got.threads, got.devices, got.streams, got.args) == (
        want.names,
        want.threads,
        want.devices,
        want.streams,
        want.args,
    )
    assert got.meta["alignment"] == want.meta["alignment"]


def test_the_journal_rebuilds_the_session_a_normal_stop_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a simulated device (its resolver in Python, a Python clock): the same regions, their
    device spans aligned to the same ns."""
    _kept_journal(monkeypatch)
    clk = FakeClock()
    sim = SimBackend(clk)
    with evtrace.record(tmp_path / "t.json", backend=sim, clock=clk, quiet=True) as rec:
        for i in range(300):
            with evtrace.region("step", i=i):
                sim.launch(20_000)
                with evtrace.region("inner", note="é\n"):
                    sim.launch(5_000)
            clk.advance(100_000)
            if i % 100 == 0:
                time.sleep(0.6)  # a flush or two meanwhile
    assert rec.session is not None and rec.session.device_spans == 600
    j = journal.read(tmp_path / "t.json.journal")
    assert j.finished == {"trace": str(tmp_path / "t.json")} and j.flushes >= 3
    same_session(journal.recover_session(j), rec.session)


def test_the_journal_of_a_native_resolver_rebuilds_the_same_session(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    backend: Any,  # noqa: F811
) -> None:
    """Through the CUDA backend on a stand-in runtime: the resolver on its native thread, two streams."""
    _kept_journal(monkeypatch)
    torch = backend.fake_torch
    with evtrace.record(tmp_path / "t.json", backend=backend, quiet=True) as rec:
        for i in range(200):
            torch.current[0] = FakeStream(0) if i == 100 else torch.current[0]
            with evtrace.region("step", i=i):
                pass
            if i % 50 == 0:
                time.sleep(0.6)
    assert rec.session is not None and rec.session.device_spans == 200
    assert len(rec.session.streams) == 2
    same_session(journal.recover_session(journal.read(tmp_path / "t.json.journal")), rec.session)


def test_a_finished_journal_says_where_its_trace_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _kept_journal(monkeypatch)
    with evtrace.record(tmp_path / "t.json", device=False, quiet=True):
        pass
    r = recover(tmp_path, "t.json.journal")
    assert r.returncode == 1
    assert r.stderr == (
        f"evtrace: t.json.journal is the journal of a session that finished normally: "
        f"its trace is {tmp_path / 't.json'}\n"
    )


def _killed_journal(tmp_path: Path, regions: int = 500) -> Path:
    """A journal left by a process that ended without a word (os._exit), after a few flushes."""
    return run_job(
        tmp_path,
        "import os, time, evtrace\n"
        f"for i in range({regions}):\n"
        "    with evtrace.region('step', i=i):\n"
        "        pass\n"
        "    if i % 100 == 99:\n"
        "        time.sleep(0.6)\n"
        "os._exit(0)\n",
    )


def test_a_torn_tail_recovers_every_complete_record_and_says_how_many_bytes_were_skipped(
    tmp_path: Path,
) -> None:
    folder = _killed_journal(tmp_path)
    seg = sorted(folder.glob("rows-*"))[-1]
    whole = journal.read(folder)
    data = seg.read_bytes()
    seg.write_bytes(data[:-7])  # the last flush cut short, as a kill mid-write would
    r = recover(tmp_path, str(folder), "-o", "r.json")
    assert r.returncode == 0, r.stderr
    torn = journal.read(folder)
    assert torn.flushes == whole.flushes - 1
    skipped = [line for line in r.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "bytes of torn or damaged records" in skipped[0]
    assert 0 < len(evtrace.load(tmp_path / "r.json")) <= 500


def test_a_damaged_record_is_skipped_and_the_records_after_it_stand(tmp_path: Path) -> None:
    folder = _killed_journal(tmp_path)
    seg = sorted(folder.glob("rows-*"))[0]
    whole = journal.read(folder)
    assert whole.flushes >= 3
    records, _ = journal._records(seg.read_bytes())
    first = 10 + len(records[0][1])
    data = bytearray(seg.read_bytes())
    data[first + 20] ^= 0xFF  # inside the second record's payload: its CRC fails
    seg.write_bytes(bytes(data))
    damaged = journal.read(folder)
    assert damaged.flushes == whole.flushes - 1 and damaged.skipped > 0
    got, want = ids_of(journal.recover_session(damaged)), ids_of(journal.recover_session(whole))
    assert got < want and max(got) == max(want)  # the later records stand


def test_a_journal_of_another_format_version_is_one_line(tmp_path: Path) -> None:
    folder = _killed_journal(tmp_path, regions=10)
    cat = folder / "catalog"
    data = cat.read_bytes()
    records, _ = journal._records(data)
    header = records[0][1].replace(b'"version":1', b'"version":9')  # a header of format 9, CRC and all
    rest = data[10 + len(records[0][1]) :]
    cat.write_bytes(struct.pack("<BBII", 0xE7, 1, len(header), zlib.crc32(header)) + header + rest)
    r = recover(tmp_path, str(folder))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "journal of format 9" in r.stderr and "reads format 1" in r.stderr


@pytest.mark.parametrize("what", ["missing", "not a journal"])
def test_what_is_not_a_journal_is_one_line(tmp_path: Path, what: str) -> None:
    if what == "not a journal":
        (tmp_path / "j").mkdir()
        (tmp_path / "j" / "catalog").write_bytes(b"hello")
    r = recover(tmp_path, "j")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not an evtrace journal" in r.stderr


def test_the_ring_bounds_the_journal_and_counts_what_it_dropped(tmp_path: Path) -> None:
    run_job(
        tmp_path,
        "import os, time, evtrace\n"
        "for i in range(40000):\n"
        "    with evtrace.region('step', i=i):\n"
        "        pass\n"
        "    if i % 4000 == 3999:\n"
        "        time.sleep(0.55)\n"
        "os._exit(0)\n",
        "--max-regions",
        "8000",
    )
    segments = list((tmp_path / "t.json.gz.journal").glob("rows-*"))
    s = journal.recover_session(journal.read(tmp_path / "t.json.gz.journal"))
    ids = ids_of(s)
    assert 8000 <= len(ids) < 40000 and max(ids) == 39999 and ids == set(range(min(ids), 40000))
    assert s.meta["dropped_regions"] == min(ids) and len(segments) < 20


def test_a_failed_write_leaves_the_journal_and_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    save = Session.save

    def failing(self: Session, path: Any, *a: Any, **k: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Session, "save", failing)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    with evtrace.record(tmp_path / "t.json", device=False) as rec:
        for i in range(50):
            with evtrace.region("step", i=i):
                pass
    err = capsys.readouterr().err
    folder = tmp_path / "t.json.journal"
    assert not rec.written_where_asked
    assert f"the recording is kept in {folder}: evtrace recover {folder}" in err
    monkeypatch.setattr(Session, "save", save)
    assert ids_of(journal.recover_session(journal.read(folder))) == set(range(50))


def test_without_a_journal_nothing_is_written_beside_the_trace(tmp_path: Path) -> None:
    with evtrace.record(tmp_path / "t.json", device=False, quiet=True, journal=False):
        with evtrace.region("r"):
            assert not (tmp_path / "t.json.journal").exists()


def test_an_older_journal_beside_the_trace_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "t.json.journal").mkdir()
    (tmp_path / "t.json.journal" / "catalog").write_bytes(b"a crashed run's")
    with evtrace.record(tmp_path / "t.json", device=False, quiet=True):
        with evtrace.region("r"):
            assert (tmp_path / "t.json.journal-2" / "catalog").exists()
    assert (tmp_path / "t.json.journal" / "catalog").read_bytes() == b"a crashed run's"


def test_what_the_rank_clocks_know_is_kept_for_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clock pair (is this one host?) from the header, a start's rank offset from its note."""
    from evtrace import metadata

    _kept_journal(monkeypatch)
    clock = metadata.RankClock(
        "store", "abc", 1, 2, 5, 37, 12.5, 32, 0, 0, 0.0, 0, 0.0, 40.0, 3.0, "end: ..."
    )
    with evtrace.record(tmp_path / "t.json", device=False, quiet=True) as rec:
        assert rec._recorder is not None and rec._recorder._ranks.on_start is not None
        rec._recorder._ranks.on_start({metadata.RANK_CLOCK: clock})
        time.sleep(0.6)
    s = journal.recover_session(journal.read(tmp_path / "t.json.journal"))
    assert s.meta[metadata.RANK_CLOCK] == clock
    assert metadata.CLOCK_PAIR in s.meta


def test_a_journal_that_cannot_be_written_says_so_once_and_loses_nothing(tmp_path: Path) -> None:
    """Writes past a file-size limit fail (EFBIG), as a full disk's would: the journal stops, says so
    once, and every region still reaches the trace."""
    (tmp_path / "job.py").write_text(
        "import resource, signal, time, evtrace\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))\n"
        "with evtrace.record('t.json.gz', device=False):\n"
        "    for i in range(600):\n"
        "        with evtrace.region('step', i=i, text='x' * 200):\n"
        "            pass\n"
        "        if i % 100 == 99:\n"
        "            time.sleep(0.55)\n"
    )
    p = subprocess.run(
        [sys.executable, "job.py"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    said = [line for line in p.stderr.splitlines() if "could not be written" in line]
    assert len(said) == 1 and "File too large" in said[0] and "it stops here" in said[0]
    assert ids_of(evtrace.load(tmp_path / "t.json.gz")) == set(range(600))
    assert not (tmp_path / "t.json.gz.journal").exists()


def test_the_journals_thread_takes_no_signal(tmp_path: Path) -> None:
    """A signal sent to the process must reach a thread that acts on it: delivered to the writer
    thread, it would leave a main thread asleep in a region unwoken (Ctrl-C ignored for minutes)."""

    def blocked(comm: str) -> int:
        for task in Path("/proc/self/task").iterdir():
            if (task / "comm").read_text().strip() == comm:
                status = (task / "status").read_text()
                return int(next(x for x in status.splitlines() if x.startswith("SigBlk:")).split()[1], 16)
        raise AssertionError(f"no thread {comm}")

    with evtrace.record(tmp_path / "t.json", device=False, quiet=True):
        mask = blocked("evtrace-journal")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        assert mask >> (sig - 1) & 1, sig
