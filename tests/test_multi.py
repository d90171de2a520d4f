"""Several GPUs in one process, several ranks in one timeline."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

import evtrace
from evtrace import merge
from evtrace.files import read_json as load_json
from evtrace.formats.chrome import trace_bytes as dumps

from .checker import problems
from .simdevice import FakeClock, SimBackend


def test_two_gpus_in_one_process_get_their_own_anchors_and_lanes(tmp_path: Path) -> None:
    clk = FakeClock()
    sim = SimBackend(clk, ndev=2, drift_ppm=20.0)
    with evtrace.record(tmp_path / "2gpu.json", backend=sim, clock=clk, quiet=True) as r:
        for i in range(6):
            sim.device = i % 2
            with evtrace.region(f"on gpu {i % 2}"):
                sim.launch(50_000)
            clk.advance(300_000_000)
    s = r.session
    assert s is not None and s.device_spans == 6
    assert set(s.meta["alignment"]) == {"0", "1"}
    for d in (0, 1):
        rows = s.regions[s.regions["name"] == s.names.index(f"on gpu {d}")]
        assert (rows["device"] == d).all()
    doc = load_json(tmp_path / "2gpu.json")
    assert problems(doc) == []
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert names == {"host", "GPU 0 · Sim GPU 0", "GPU 1 · Sim GPU 1"}


def ranked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: int, seed: int, n: int) -> Path:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    clk = FakeClock(seed=seed)
    sim = SimBackend(clk)
    with evtrace.record(tmp_path / "t.json", backend=sim, clock=clk, quiet=True) as r:
        for _ in range(n):
            with evtrace.region("step"):
                sim.launch(10_000)
    assert r.path == tmp_path / f"t-rank{rank}.json"
    return r.path


def test_merge_on_one_host_is_exact_and_keeps_ranks_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p1 = ranked(tmp_path, monkeypatch, 1, seed=5, n=3)  # listed first, sorted by rank anyway
    p0 = ranked(tmp_path, monkeypatch, 0, seed=4, n=4)
    s0, s1 = evtrace.load(p0), evtrace.load(p1)
    doc = orjson.loads(dumps(merge.merge([evtrace.load(p1), evtrace.load(p0)])))
    assert problems(doc) == []
    assert doc["metadata"]["merge.method"].startswith("one host")
    procs = sorted((e["args"]["name"], e["pid"]) for e in doc["traceEvents"] if e["name"] == "process_name")
    assert [n for n, _ in procs] == [
        "rank 0 · GPU 0 · Sim GPU 0",
        "rank 0 · host",
        "rank 1 · GPU 0 · Sim GPU 0",
        "rank 1 · host",
    ]
    assert len({pid for _, pid in procs}) == 4
    sort = {
        e["pid"]: e["args"]["sort_index"] for e in doc["traceEvents"] if e["name"] == "process_sort_index"
    }
    by_name = {n: sort[pid] for n, pid in procs}
    assert by_name["rank 0 · host"] < by_name["rank 0 · GPU 0 · Sim GPU 0"] < by_name["rank 1 · host"]
    regions = [e for e in doc["traceEvents"] if e.get("cat") == "region"]
    assert len(regions) == len(s0) + len(s1) == 7
    # exact: each rank's regions keep their perf_counter times, relative to the earliest origin
    o0, o1 = s0.meta["origin_perf_ns"], s1.meta["origin_perf_ns"]
    base = min(o0, o1)
    r1 = sorted(round(e["ts"] * 1000) for e in regions if e["pid"] == procs[3][1])
    assert r1 == sorted((s1.regions["host_start"] + o1 - base).tolist())
    out = tmp_path / "all.json.gz"
    p = subprocess.run(
        [sys.executable, "-m", "evtrace", "merge", str(p0), str(p1), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "merged 2 traces (7 regions, 2 ranks)" in p.stderr
    assert "warning" not in p.stderr
    (tmp_path / "b").mkdir()
    p0b = ranked(tmp_path / "b", monkeypatch, 0, seed=6, n=1)
    again = subprocess.run(  # the same file twice, and a second rank 0 from another run
        [sys.executable, "-m", "evtrace", "merge", str(p0), str(p1), str(p1), str(p0b), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert f"warning: {p1} is given twice; merged once" in again.stderr
    assert "warning: 2 traces are rank 0: two runs mixed?" in again.stderr
    assert "merged 3 traces" in again.stderr


def test_merge_across_hosts_says_how_uncertain_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p0 = ranked(tmp_path, monkeypatch, 0, seed=4, n=2)
    p1 = ranked(tmp_path, monkeypatch, 1, seed=5, n=2)
    doc = load_json(p1)
    doc["metadata"]["evtrace.meta"]["host_id"] = (
        "another-host"  # what load reads; Perfetto shows the flat keys
    )
    p1.write_bytes(orjson.dumps(doc))
    merged = orjson.loads(dumps(merge.merge([evtrace.load(p0), evtrace.load(p1)])))
    assert (
        "wall-clock" in merged["metadata"]["merge.method"]
        and "uncertain" in merged["metadata"]["merge.method"]
    )
    assert problems(merged) == []


def test_merge_refuses_what_is_not_a_trace(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    p = subprocess.run(
        [sys.executable, "-m", "evtrace", "merge", str(bad), "-o", str(tmp_path / "m.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        p.returncode == 2 and "not an evtrace trace" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    )


JOB = """
import os
import torch
import torch.distributed as dist
import evtrace

dist.init_process_group("gloo")
rank = dist.get_rank()
x = torch.ones(1000) * (rank + 1)
for step in range(5):
    with evtrace.region("step"):
        with evtrace.region("compute"):
            y = (x @ x.unsqueeze(1)).sum() if rank == 0 else x.sum()
        with evtrace.region("all_reduce"):
            dist.all_reduce(x)
dist.destroy_process_group()
print("rank", rank, "done", float(x[0]))
"""


def test_torchrun_gloo_two_ranks_then_merge(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text(JOB)
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(evtrace.__file__).parents[1]),  # this checkout's evtrace, not an installed one
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29517",
        "-m",
        "evtrace",
        "-o",
        "t.json.gz",
        "job.py",
    ]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [tmp_path / f"t-rank{r}.json.gz" for r in (0, 1)]
    sessions = [evtrace.load(f) for f in ranks]
    # 15 regions of the job's own, and 5 dist.all_reduce of the hooks
    assert [s.meta["rank"] for s in sessions] == [0, 1] and all(len(s) == 20 for s in sessions)
    m = subprocess.run(
        [sys.executable, "-m", "evtrace", "merge", *map(str, ranks), "-o", "all.json.gz"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert m.returncode == 0, m.stderr
    doc = load_json(tmp_path / "all.json.gz")
    assert problems(doc) == []
    assert doc["metadata"]["merge.method"].startswith("one host")
    hosts = [e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"]
    assert hosts == ["rank 0 · host", "rank 1 · host"]
    # one clock: each rank's all_reduce of a step overlaps the other's (they wait for each other)
    ar: dict[int, list[tuple[float, float]]] = {}
    for e in doc["traceEvents"]:
        if e.get("name") == "all_reduce":
            ar.setdefault(e["pid"], []).append((e["ts"], e["ts"] + e["dur"]))
    a, b = ar.values()
    assert all(x0 < y1 and y0 < x1 for (x0, x1), (y0, y1) in zip(sorted(a), sorted(b)))
    summ = subprocess.run(
        [sys.executable, "-m", "evtrace", "summary", *map(str, ranks)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert summ.returncode == 0, summ.stderr
    out = summ.stdout.splitlines()
    table = out[next(i for i, line in enumerate(out) if line.startswith("trace ")) :][:4]
    assert table[0].split() == [
        "trace",
        "rank",
        "regions",
        "host",
        "time",
        "device",
        "busy",
        "device",
        "busy",
        "%",
    ]
    assert [row.split()[:3] for row in table[2:]] == [
        ["t-rank0.json.gz", "0", "20"],
        ["t-rank1.json.gz", "1", "20"],
    ]
    assert np.all([len(s.names) == 4 for s in sessions])


def evtrace_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "evtrace", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_merged_trace_loads_as_a_session_with_its_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p0 = ranked(tmp_path, monkeypatch, 0, seed=4, n=4)
    p1 = ranked(tmp_path, monkeypatch, 1, seed=5, n=3)
    s0, s1 = evtrace.load(p0), evtrace.load(p1)
    out = tmp_path / "all.json.gz"
    p = evtrace_cli("merge", p1, p0, "-o", out, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    m = evtrace.load(out)
    assert [r.meta["rank"] for r in m.ranks] == [0, 1] and [len(r) for r in m.ranks] == [4, 3]
    assert len(m) == 7 and m.device_spans == 7 and m.names == ["step"]
    assert [len(r.devices) for r in m.ranks] == [1, 1] and len(m.devices) == 2
    base = min(s0.meta["origin_perf_ns"], s1.meta["origin_perf_ns"])
    for r, s in zip(m.ranks, (s0, s1)):  # each rank on the merged clock, otherwise as recorded
        shift = s.meta["origin_perf_ns"] - base
        assert r.regions["host_start"].tolist() == (s.regions["host_start"] + shift).tolist()
        assert r.regions["dev_end"].tolist() == (s.regions["dev_end"] + shift).tolist()
        assert r.pid == s.pid and r.meta["host_id"] == s.meta["host_id"] and r.meta["shift_ns"] == shift
    # written again, it is the same file; merged again with a third trace, every rank is kept
    assert gzip.decompress(out.read_bytes()) == dumps(m)
    monkeypatch.setenv("RANK", "2")
    clk = FakeClock(seed=6)
    with evtrace.record(tmp_path / "r2.json", backend=SimBackend(clk), clock=clk, quiet=True):
        with evtrace.region("step"):
            pass
    again = tmp_path / "again.json"
    p = evtrace_cli("merge", out, tmp_path / "r2-rank2.json", "-o", again, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "merged 2 traces (8 regions, 3 ranks)" in p.stderr
    a = evtrace.load(again)
    assert [r.meta["rank"] for r in a.ranks] == [0, 1, 2]
    for i in (0, 1):  # the ranks merged before keep their distance exactly
        assert (a.ranks[i].regions["host_start"] - a.ranks[0].regions["host_start"][0]).tolist() == (
            m.ranks[i].regions["host_start"] - m.ranks[0].regions["host_start"][0]
        ).tolist()


def test_every_command_reads_what_run_and_merge_write(tmp_path: Path) -> None:
    job = tmp_path / "job.py"
    job.write_text(
        "import evtrace\nfor i in range(3):\n    with evtrace.region('step'):\n"
        "        with evtrace.region('inner'):\n            pass\n"
    )
    for name in ("a.json.gz", "b.json"):
        p = evtrace_cli("run", "-o", name, job, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
    p = evtrace_cli("merge", "a.json.gz", "b.json", "-o", "ab.json.gz", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "merged 2 traces (12 regions, 2 ranks)" in p.stderr
    p = evtrace_cli("merge", "ab.json.gz", "a.json.gz", "-o", "aba.json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    for trace in ("a.json.gz", "b.json", "ab.json.gz", "aba.json"):
        summ = evtrace_cli("summary", trace, cwd=tmp_path)
        assert summ.returncode == 0 and summ.stderr == "", (trace, summ.stderr)
        assert summ.stdout.splitlines()[0].startswith(
            {"a.json.gz": "6 ", "b.json": "6 ", "ab.json.gz": "12 ", "aba.json": "18 "}[trace]
        )
        rep = evtrace_cli("report", trace, cwd=tmp_path)
        assert rep.returncode == 0 and rep.stdout.startswith(f"### evtrace report: `{trace}`"), (
            trace,
            rep.stderr,
        )
        svg = tmp_path / f"{trace}.svg"
        ren = evtrace_cli("render", trace, "-o", svg, cwd=tmp_path)
        assert ren.returncode == 0 and svg.exists(), (trace, ren.stderr)
        mer = evtrace_cli("merge", trace, "-o", f"m-{trace}", cwd=tmp_path)
        assert mer.returncode == 0, (trace, mer.stderr)
    merged = evtrace_cli("summary", "aba.json", cwd=tmp_path).stdout.splitlines()
    assert merged[-5].split()[:3] == ["trace", "rank", "regions"]  # its ranks side by side
    assert [row.split()[:4] for row in merged[-3:]] == [
        ["trace", "0", "-", "6"],
        ["trace", "1", "-", "6"],
        ["trace", "2", "-", "6"],
    ]


def test_no_message_cites_an_internal_format_number(tmp_path: Path) -> None:
    (tmp_path / "bad_other.json").write_text(orjson.dumps({"traceEvents": [], "metadata": {"x": 1}}).decode())
    (tmp_path / "bad_newer.json").write_text(
        orjson.dumps({"traceEvents": [], "metadata": {"evtrace": "9.0", "evtrace.format": 99}}).decode()
    )
    for name, says in (
        ("bad_other.json", "is not an evtrace trace"),
        ("bad_newer.json", "written by evtrace 9.0"),
    ):
        for cmd in ("summary", "report", "merge"):
            args = [cmd, name] + (["-o", "m.json"] if cmd == "merge" else [])
            p = evtrace_cli(*args, cwd=tmp_path)
            assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, (
                cmd,
                p.stderr,
            )
            assert "format" not in p.stderr, p.stderr
