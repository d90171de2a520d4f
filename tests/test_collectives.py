"""Collectives under the hooks (gloo, CPU): one region per user call with its args, the ops'
results unchanged, every patch undone; and who made everyone wait, across four ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

import evtrace
from evtrace.collectives import OPS, stragglers
from evtrace.session import Session, rank_labels

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without torch.distributed")
ENV = {
    **os.environ,
    "CUDA_VISIBLE_DEVICES": "",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": str(Path(evtrace.__file__).parents[1]),  # this checkout's evtrace, not an installed one
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A gloo group of this process alone: every op runs, with torch's own sequence numbers."""
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def calls(s: Session) -> list[tuple[str, dict[str, object]]]:
    """The regions in the order they began: name and args."""
    order = np.argsort(s.regions["host_start"], kind="stable")
    return [(s.names[s.regions["name"][i]], s.args.get(int(i), {})) for i in order]


@pytest.mark.filterwarnings("ignore:.*all_gather_into_tensor. is deprecated:FutureWarning")  # torch 2.13
def test_each_call_is_one_region_with_its_args_and_results_unchanged(
    world_of_one: None, tmp_path: Path
) -> None:
    x = torch.arange(4.0)
    out = torch.empty(4)
    with evtrace.record(tmp_path / "t.json.gz", hooks=True, quiet=True) as r:
        pg: Any = c10d._get_default_group()  # torch's sequence counter is private, with no stub
        seq0 = pg._get_sequence_number_for_group()
        assert dist.all_reduce(x, op=dist.ReduceOp.MAX) is None
        dist.all_gather_into_tensor(out, x)  # which calls dist.all_gather_single: one region
        dist.broadcast(x, src=0)
        dist.barrier()
        work = dist.all_reduce(x, async_op=True)
        time.sleep(0.02)  # before the wait: the async region lasts until it
        assert isinstance(work, dist.Work) and work.wait() is True
    assert x.tolist() == out.tolist() == [0.0, 1.0, 2.0, 3.0]
    s = r.session
    assert s is not None
    got = calls(s)
    assert [n for n, _ in got] == [
        "dist.all_reduce",
        "dist.all_gather_into_tensor",
        "dist.broadcast",
        "dist.barrier",
        "dist.all_reduce",
    ]
    assert got[0][1] == {
        "bytes": 16,
        "dtype": "float32",
        "op": "MAX",
        "group": "0",
        "group_size": 1,
        "seq": seq0,
        "async_op": False,
    }
    assert [a["seq"] for _, a in got] == list(range(seq0, seq0 + 5))  # torch's counter, one per op
    assert got[2][1]["peer"] == 0 and "op" not in got[3][1] and "bytes" not in got[3][1]
    assert got[4][1]["async_op"] is True
    last = int(np.argmax(s.regions["host_start"]))
    assert s.regions["host_end"][last] - s.regions["host_start"][last] >= 20e6
    assert not s.meta.get("unfinished_regions")


def test_every_patch_is_undone_and_an_unwaited_work_leaves_its_region_unfinished(
    world_of_one: None, tmp_path: Path
) -> None:
    before = {(m.__name__, op): getattr(m, op) for m in (dist, c10d) for op in OPS}
    wait = c10d.Work.__dict__["wait"]
    x = torch.ones(2)
    with evtrace.record(tmp_path / "t.json.gz", hooks=True, quiet=True) as r:
        assert dist.all_reduce is not before[("torch.distributed", "all_reduce")]
        assert c10d.Work.__dict__["wait"] is not wait
        dist.all_reduce(x, async_op=True)  # its work dropped at once, never waited on
    assert {(m.__name__, op): getattr(m, op) for m in (dist, c10d) for op in OPS} == before
    assert c10d.Work.__dict__["wait"] is wait
    s = r.session
    assert s is not None and [n for n, _ in calls(s)] == ["dist.all_reduce"]
    assert s.meta["unfinished_regions"] == 1
    dist.all_reduce(x)  # no session: nothing recorded, nothing fails
    assert x.tolist() == [1.0, 1.0]


def test_a_backend_without_torchs_sequence_numbers_gets_evtraces(
    world_of_one: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(pg: object) -> int:
        raise RuntimeError("ProcessGroup custom does not yet support sequence numbers.")  # torch's words

    monkeypatch.setattr(dist.ProcessGroup, "_get_sequence_number_for_group", unsupported)
    x = torch.ones(2)
    with evtrace.record(tmp_path / "t.json.gz", hooks=True, quiet=True) as r:
        for _ in range(3):
            dist.all_reduce(x)
    assert r.session is not None
    assert [(a["seq"], a["seq_by"]) for _, a in calls(r.session)] == [
        (0, "evtrace"),
        (1, "evtrace"),
        (2, "evtrace"),
    ]


JOB = """
import time
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
for i in range(16):
    if rank == 2 and i % 4 == 3:
        time.sleep(0.05)
    x = torch.full((1000,), float(rank + 1))
    dist.all_reduce(x)
    assert x.tolist() == [world * (world + 1) / 2] * 1000, x[:4]
out = torch.empty(world)
dist.all_gather_into_tensor(out, torch.tensor([float(rank)]))
assert out.tolist() == [float(r) for r in range(world)], out
dist.destroy_process_group()
"""


def test_four_ranks_the_one_that_sleeps_is_named_as_making_the_others_wait(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text(JOB)
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4"]
    run += ["--master-port", str(free_port()), "-m", "evtrace", "-o", "t.json.gz", "job.py"]
    p = subprocess.run(run, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]  # the job's own checks of the results included

    def cli(*args: str) -> str:
        q = subprocess.run(
            [sys.executable, "-m", "evtrace", *args], cwd=tmp_path, env=ENV, capture_output=True, text=True
        )
        assert q.returncode == 0, q.stderr
        return q.stdout

    files = [f"t-rank{r}.json.gz" for r in range(4)]
    cli("merge", *files, "-o", "all.json.gz")
    s = evtrace.load(tmp_path / "all.json.gz")
    st = stragglers(s.ranks, rank_labels(s.ranks))
    ar = st.collectives[0]
    assert ar.name == "dist.all_reduce" and ar.instances == 16  # every call matched on all 4 ranks
    assert ar.straggler == "rank 2" and ar.straggler_last >= 4
    assert 45e6 <= ar.skew_p95 <= 80e6 and ar.skew_p50 < 25e6  # a sleep of 50 ms every 4th call
    assert st.stragglers[0].rank == "rank 2" and st.stragglers[0].wait >= 3 * 4 * 45e6
    text = cli("summary", "all.json.gz")
    matched = text.split("\ncollectives across 4 ranks")[1]
    row = next(line for line in matched.splitlines() if line.startswith("dist.all_reduce "))
    assert row.split()[1] == "16" and "rank 2" in row
    assert text.split("\nstragglers\n")[1].splitlines()[2].startswith("rank 2 ")
    # the rank files given together say the same
    assert cli("summary", *files).split("\nstragglers\n")[1].splitlines()[2].startswith("rank 2 ")
    report = cli("report", "all.json.gz")
    assert "**Who made everyone wait:** rank 2, last at " in report
    assert "Rank 2 arrived last at " in report
