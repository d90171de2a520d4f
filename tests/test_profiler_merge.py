"""A torch.profiler (Kineto) trace on evtrace's timeline: ``record(profiler=)`` and ``evtrace merge``."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import evtrace
import evtrace.formats.chrome
from evtrace.device import DeviceInfo
from evtrace.export.kineto import attach, is_kineto
from evtrace.session import REGION_DTYPE, Session, Stream, Thread
from tests.checker import problems
from tests.perfetto import ERRORS, Query

torch = pytest.importorskip("torch")
from torch.profiler import ProfilerActivity, profile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def work() -> None:
    x = torch.randn(64, 64)
    for _ in range(5):
        with evtrace.region("mm"):
            y = x @ x
        with evtrace.region("add"):
            x = (y + 1) / 100


def doc_of(path: Path) -> Any:
    return json.loads(gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes())


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evtrace", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


def check_ops_inside(path: Path) -> dict[str, Any]:
    """Every aten op lies inside the evtrace region that ran it, within 5 µs; returns the fit."""
    doc = doc_of(path)
    assert problems(doc) == []
    s = evtrace.load(path)
    assert s.profiler and evtrace.load(path) == s
    fit = s.meta["profiler"]["0"]
    assert fit["host_ops_on_evtrace_threads"] > 0 and fit["events_placed"] > 0
    assert fit["host_ops_crossing_regions"] == 0
    assert abs(fit["host_correction_ns"]) < 1_000_000  # the wall clock was close already
    spans = {
        name: [(int(r["host_start"]), int(r["host_end"])) for r in s.regions[s.regions["name"] == k]]
        for k, name in enumerate(s.names)
    }
    want = {"aten::matmul": "mm", "aten::mm": "mm", "aten::add": "add", "aten::div": "add"}
    seen = 0
    for ev in s.profiler:
        if ev["ph"] == "X" and ev["name"] in want:
            a, b = round(ev["ts"] * 1000), round((ev["ts"] + ev["dur"]) * 1000)
            assert any(lo - 5000 <= a and b <= hi + 5000 for lo, hi in spans[want[ev["name"]]]), ev
            seen += 1
    assert seen >= 10
    return fit


def test_record_with_profiler_merges_on_exit(tmp_path: Path) -> None:
    out = tmp_path / "run.json.gz"
    with (
        profile(activities=[ProfilerActivity.CPU]) as prof,
        evtrace.record(out, device=False, quiet=True, profiler=prof),
    ):
        work()
    fit = check_ops_inside(out)
    assert fit["kernels"] == 0 and fit["device_drift"] == "no kernels placed"
    for cmd in (
        ["summary", out],
        ["report", out, "-o", tmp_path / "r.md"],
        ["render", out, "-o", tmp_path / "r.svg"],
    ):
        r = cli(*cmd)
        assert r.returncode == 0, r.stderr


def test_record_with_a_profiler_stopped_first(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    prof = profile(activities=[ProfilerActivity.CPU])
    with evtrace.record(out, device=False, quiet=True, profiler=prof), prof:
        work()
    check_ops_inside(out)


def test_cli_merges_a_kineto_trace_and_refuses_other_json(
    tmp_path: Path, maybe_perfetto: Query | None
) -> None:
    run, kineto, both = (
        tmp_path / "a.json.gz",
        tmp_path / "kineto.trace",
        tmp_path / "both.json.gz",
    )  # .trace: the fixture checks *.json as ours
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with evtrace.record(run, device=False, quiet=True):
            work()
    prof.export_chrome_trace(str(kineto))
    assert is_kineto(doc_of(kineto)) and not is_kineto(doc_of(run))
    r = cli("merge", run, kineto, "-o", both)
    assert r.returncode == 0, r.stderr
    assert "profiler events placed" in r.stderr and "warning" not in r.stderr
    other = tmp_path / "other.json.gz"  # another run: the profile's ops are in none of its regions
    with evtrace.record(other, device=False, quiet=True):
        with evtrace.region("elsewhere"):
            pass
    r = cli("merge", other, kineto, "-o", tmp_path / "mixed.json.gz")
    assert r.returncode == 0 and "is it a profile of another run?" in r.stderr, r.stderr
    # another process: its thread ids are not the profile's, so no op could even be tried for containment
    code = "import evtrace, sys\nwith evtrace.record(sys.argv[1], device=False, quiet=True):\n    pass"
    elsewhere = tmp_path / "elsewhere.json.gz"
    subprocess.run([sys.executable, "-c", code, str(elsewhere)], check=True, timeout=120)
    r = cli("merge", elsewhere, kineto, "-o", tmp_path / "mixed2.json.gz")
    assert r.returncode == 0, r.stderr
    assert "CPU ops ran in the traced process: is it a profile of another run?" in r.stderr, r.stderr
    check_ops_inside(both)
    for cmd in (["summary", both], ["render", both, "-o", tmp_path / "b.svg"]):
        assert cli(*cmd).returncode == 0
    # merging the merged file again keeps the profiler lanes, still clean
    again = tmp_path / "again.json.gz"
    assert cli("merge", both, "-o", again).returncode == 0
    assert problems(doc_of(again)) == [] and len(evtrace.load(again).profiler) == len(
        evtrace.load(both).profiler
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"traceEvents": [{"ph": "X", "name": "x", "ts": 1, "dur": 1, "pid": 1, "tid": 1}]}')
    r = cli("merge", run, bad, "-o", tmp_path / "x.json.gz")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nor a torch.profiler" in r.stderr
    assert cli("merge", kineto, "-o", tmp_path / "y.json.gz").returncode == 2
    if maybe_perfetto is not None:
        assert maybe_perfetto(both, ERRORS) == []


def test_device_offset_fit_and_flows() -> None:
    """Kernels 37 µs off on Kineto's clock come back inside their regions' device spans."""
    n, tid = 50, 4242
    r = np.zeros(n, REGION_DTYPE)
    r["host_start"] = np.arange(n) * 100_000 + 1_000
    r["host_end"] = r["host_start"] + 20_000
    r["device"], r["stream"] = 0, 0
    r["dev_start"] = r["host_start"] + 30_000
    r["dev_end"] = r["dev_start"] + 40_000
    wall = 1_700_000_000_000_000_000
    s = Session(
        r,
        ["step"],
        [Thread(tid, "main")],
        [DeviceInfo(0, "gpu")],
        [Stream(0, "stream 7")],
        pid=77,
        meta={"evtrace": "test"},
        wall_origin_ns=wall,
    )
    base = wall - 5_000_000_000  # Kineto's ts are relative to its own base
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "thread_name", "pid": 77, "tid": tid, "args": {"name": "py"}}
    ]
    for i in range(n):
        h0 = int(r["host_start"][i]) + 5_000_000_000
        d0 = int(r["dev_start"][i]) + 5_000_000_000 - 37_000  # the kernel clock 37 µs early
        events += [
            {
                "ph": "X",
                "cat": "cpu_op",
                "name": "aten::mm",
                "pid": 77,
                "tid": tid,
                "ts": (h0 + 2_000) / 1000,
                "dur": 10.0,
            },
            {
                "ph": "X",
                "cat": "cuda_runtime",
                "name": "cudaLaunchKernel",
                "pid": 77,
                "tid": tid,
                "ts": (h0 + 3_000) / 1000,
                "dur": 5.0,
                "args": {"correlation": i},
            },
            {"ph": "s", "cat": "ac2g", "id": i, "pid": 77, "tid": tid, "ts": (h0 + 3_000) / 1000},
            {
                "ph": "X",
                "cat": "kernel",
                "name": "gemm",
                "pid": 0,
                "tid": 7,
                "ts": (d0 + 1_000 + 500 * (i % 3)) / 1000,
                "dur": 30.0,
                "args": {"correlation": i},
            },
            {"ph": "f", "cat": "ac2g", "id": i, "pid": 0, "tid": 7, "ts": (d0 + 1_000) / 1000, "bp": "e"},
        ]
    doc = {"schemaVersion": 1, "deviceProperties": [], "baseTimeNanoseconds": base, "traceEvents": events}
    assert is_kineto(doc)
    out = attach(s, doc, "synthetic")
    fit = out.meta["profiler"]["0"]
    assert fit["kernels_placed"] == n and fit["kernels_inside"] == n and fit["kernels_inside_share"] == 1.0
    assert 36_000 <= fit["device_correction_ns"] <= 45_000 and abs(fit["host_correction_ns"]) < 9_000
    assert fit["flows"] == n and fit["flows_dropped"] == 0
    trace = json.loads(evtrace.formats.chrome.trace_bytes(out))
    assert problems(trace) == []
    kernels = [e for e in out.profiler if e.get("cat") == "kernel"]
    assert all(e["pid"] == 20_000_100 and e["tid"] == 7 and e["flow_in"] is True for e in kernels)
