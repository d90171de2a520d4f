"""One clock across ranks (issue #25): offsets measured through the job's store, and no hang."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

import evtrace
from evtrace import hostclock, merge
from evtrace.metadata import CLOCK_PAIR, RANK_CLOCK, RankClock

from .perfetto import ERRORS, Query

ROOT = Path(__file__).resolve().parents[1]
OFFSETS_S = (0, 37, 1000, 250_000)  # each rank's time namespace: CLOCK_MONOTONIC moved this much
TIMEOUT_S = 1.5  # the job's hostclock.TIMEOUT_S: short, so that the early rank's wait is quick

JOB = """
import json, os, sys, time
import torch, torch.distributed as dist
import evtrace, evtrace.hostclock
evtrace.hostclock.TIMEOUT_S = float(os.environ["JOB_TIMEOUT_S"])
dist.init_process_group("gloo")
rank = dist.get_rank()
stamps = []  # CLOCK_REALTIME around each region's start: time namespaces do not move it
x = torch.ones(4)
for i in range(20):
    dist.all_reduce(x)
    w0 = time.time_ns()
    with evtrace.region("stamp"):
        pass
    stamps.append((w0, time.time_ns()))
    time.sleep(0.005)
with open(f"stamps{rank}.json", "w") as f:
    json.dump(stamps, f)
if rank == 3:
    sys.exit(0)  # ends early, without destroy_process_group: its end exchange finds nobody
time.sleep(2 * float(os.environ["JOB_TIMEOUT_S"]))
dist.destroy_process_group()
"""


def _unshare() -> list[str] | None:
    """The unshare prefix that makes a time namespace here, or None where none can be made."""
    if shutil.which("unshare") is None:
        return None
    for pre in (["unshare", "--time"], ["unshare", "--user", "--map-root-user", "--time"]):
        try:
            ok = subprocess.run([*pre, "--monotonic", "1", "true"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if ok.returncode == 0:
            return pre
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four gloo ranks, each under ``python -m evtrace`` in its own time namespace; rank 3 ends early."""
    pre = _unshare()
    if pre is None:
        pytest.skip("time namespaces are not allowed here")
    d = tmp_path_factory.mktemp("job")
    (d / "job.py").write_text(JOB)
    env = {
        **os.environ,
        "WORLD_SIZE": "4",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "JOB_TIMEOUT_S": str(TIMEOUT_S),
        "PYTHONPATH": str(ROOT),
    }
    procs = [
        subprocess.Popen(
            [*pre, "--monotonic", str(off), sys.executable, "-m", "evtrace", "-o", "run.json.gz", "job.py"],
            cwd=d,
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r, off in enumerate(OFFSETS_S)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    return d


def _merged(job: Path) -> tuple[evtrace.Session, str]:
    m = subprocess.run(
        [
            sys.executable,
            "-m",
            "evtrace",
            "merge",
            *(f"run-rank{r}.json.gz" for r in range(4)),
            "-o",
            "all.json.gz",
        ],
        cwd=job,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert m.returncode == 0, m.stderr
    return evtrace.load(job / "all.json.gz"), m.stderr


def test_ranks_in_separate_clocks_merge_within_20us(job: Path, maybe_perfetto: Query | None) -> None:
    s, said = _merged(job)
    assert "measured through the process group's store" in said
    # the test's own truth: each rank's region starts against CLOCK_REALTIME, the same on every rank
    truth = []
    for r, rank in enumerate(s.ranks):
        stamps = np.array(orjson.loads((job / f"stamps{r}.json").read_bytes()), dtype=np.float64)
        starts = rank.regions["host_start"][rank.regions["name"] == rank.names.index("stamp")]
        assert len(starts) == len(stamps) == 20
        truth.append(
            (float(np.median(starts - stamps.mean(axis=1))), float(np.median(np.ptp(stamps, axis=1))))
        )
    errors = [(c - truth[0][0]) / 1e3 for c, _ in truth]  # µs; rank 0 is the reference
    assert max(errors) - min(errors) <= 20.0, errors
    for r, (err, (_, stamp_ns)) in enumerate(zip(errors, truth)):
        c = s.ranks[r].meta[RANK_CLOCK]
        assert isinstance(c, RankClock) and c.rank == r and c.world_size == 4
        assert c.method == ("reference" if r == 0 else "store")
        assert c.reference == s.ranks[0].meta[RANK_CLOCK].reference != ""
        bound = max(c.start_bound_us, c.end_bound_us if c.end_samples else 0.0)
        # the stated bound covers the true error (as well as the stamps themselves can tell it)
        assert abs(err) <= bound + stamp_ns / 2e3, (r, err, c)
        if r:
            assert abs(c.start_offset_ns + OFFSETS_S[r] * 10**9) <= c.start_bound_us * 1e3
            assert s.meta["merge.ranks"][r].startswith(f"rank {r}: offset to rank 0 measured")
    if maybe_perfetto is not None:  # Perfetto's own importer, where it is present
        assert maybe_perfetto(job / "all.json.gz", ERRORS) == []
        assert maybe_perfetto(job / "all.json.gz", "select count(*) from slice") == [[str(len(s))]]


def test_no_hang_when_a_rank_ends_early(job: Path) -> None:
    """Rank 3 ended without destroy_process_group while the others went on: it waited for rank
    0's end exchange at most the timeout, said so, and wrote its trace; rank 0 did not wait for it."""
    clocks = [evtrace.load(job / f"run-rank{r}.json.gz").meta[RANK_CLOCK] for r in range(4)]
    early = clocks[3]
    assert early.start_samples > 0 and early.end_samples == 0
    assert "end: not measured: rank 0 did not start the exchange within 1.5 s" in early.note
    assert early.exchange_ms <= TIMEOUT_S * 1000 + 500
    assert clocks[0].end_samples == 3 and clocks[0].note == ""  # rank 3 said it was done
    assert clocks[0].exchange_ms < TIMEOUT_S * 1000
    assert all(c.end_samples for c in clocks[1:3])


# ---- the exchange itself, with threads on one store (fast) -----------------------------------


def _ranks(
    world: int, present: list[int], offsets_ns: Callable[[int], int]
) -> tuple[dict[int, Any], dict[int, float]]:
    """``hostclock.exchange`` on a fresh store by the ``present`` ranks of ``world``, each in a
    thread with its clock ``offsets_ns(rank)`` off: results and seconds taken, by rank."""
    dist: Any = __import__("torch.distributed").distributed  # its stores are not typed as exported
    TCPStore, PrefixStore = dist.TCPStore, dist.PrefixStore
    master = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    out: dict[int, Any] = {}
    took: dict[int, float] = {}

    def run(r: int) -> None:
        store = PrefixStore("default_pg", TCPStore("127.0.0.1", master.port, timeout=timedelta(seconds=30)))
        clock, prefix = (lambda: time.perf_counter_ns() + offsets_ns(r)), "evtrace/clock/1/start/"
        t = time.monotonic()
        if r == 0:
            out[r] = hostclock.serve(store, world, list(range(1, world)), clock, "tok", prefix)
        else:
            out[r] = hostclock.join(store, r, world, clock, prefix)
        took[r] = time.monotonic() - t

    threads = [threading.Thread(target=run, args=(r,)) for r in present]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, took


def test_a_rank_that_never_comes_costs_rank_0_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostclock, "TIMEOUT_S", 0.5)
    out, took = _ranks(3, [0, 1], lambda r: r * 37_000_000_000)
    results, missing, _ = out[0]
    assert missing == [2] and list(results) == [1]
    assert 0.5 <= took[0] <= 0.5 + hostclock.spread_s(3) + 1.0
    got = out[1]
    assert got == results[1] and got["samples"] == hostclock.SAMPLES
    assert abs(got["offset_ns"] + 37_000_000_000) <= got["bound_ns"]  # threads share the GIL: loose


def test_a_rank_whose_rank_0_never_comes_gives_up_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostclock, "TIMEOUT_S", 0.5)
    out, took = _ranks(2, [1], lambda r: 0)
    assert out[1] == {"samples": 0, "note": "rank 0 did not start the exchange within 0.5 s"}
    assert took[1] <= 1.5


# ---- without a process group: one host only where the clocks agree ----------------------------


def test_one_boot_in_two_time_namespaces_is_not_one_clock(tmp_path: Path) -> None:
    """Two processes of one boot whose (CLOCK_REALTIME - perf_counter) differ by 37 s (a time
    namespace) do not share perf_counter: merge uses the wall clock and says why."""
    paths = []
    for r in range(2):
        with evtrace.record(tmp_path / f"p{r}.json", device=False, quiet=True) as rec:
            with evtrace.region("x"):
                pass
        assert rec.path is not None
        paths.append(rec.path)
    a, b = (evtrace.load(p) for p in paths)
    assert isinstance(a.meta[CLOCK_PAIR], list)
    same = merge.merge([a, b])
    assert same.meta["merge.method"].startswith("one host") and "checked" in same.meta["merge.ranks"][1]
    shift = 37 * 10**9  # b as if its process had started in a namespace 37 s ahead
    b.meta["origin_perf_ns"] += shift
    b.meta[CLOCK_PAIR] = [b.meta[CLOCK_PAIR][0] + shift, b.meta[CLOCK_PAIR][1]]
    moved = merge.merge([a, b])
    assert (
        "another monotonic clock" in moved.meta["merge.ranks"][1]
        and "wall-clock" in moved.meta["merge.ranks"][1]
    )
    # by the wall clock, b's region lands where it was, not 37 s away
    ends = [int(r.regions["host_start"][0]) for r in moved.ranks]
    assert abs(ends[1] - ends[0]) < 5 * 10**9


def test_rank_clock_round_trips(tmp_path: Path) -> None:
    c = RankClock("store", "ab", 1, 4, 10, -5, 1.5, 32, 20, -6, 2.5, 32, -0.1, 9.0, 12.0, "")
    with evtrace.record(tmp_path / "t.json", device=False, quiet=True) as rec:
        pass
    assert rec.session is not None
    s = dataclasses.replace(rec.session, meta={**rec.session.meta, RANK_CLOCK: c})
    assert evtrace.load(s.save(tmp_path / "u.json")).meta[RANK_CLOCK] == c
