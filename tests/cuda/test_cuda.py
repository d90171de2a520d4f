"""The real CUDA path, on a card. Orderings and invariants, not numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evtrace
from evtrace.files import read_json as load_json

from ..checker import problems

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[2]


def spin(ms: float) -> None:
    """A kernel that keeps the current stream busy for about ``ms``."""
    torch.cuda._sleep(int(ms * 2e6))  # ~2 GHz SM clock


@pytest.fixture
def no_sync(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every synchronize the program makes while the fixture is active."""
    calls: list[str] = []
    for owner, name in (
        (torch.cuda, "synchronize"),
        (torch.cuda.Event, "synchronize"),
        (torch.cuda.Stream, "synchronize"),
    ):
        orig = getattr(owner, name)

        def wrapped(*a, _orig=orig, _n=name, **k):
            calls.append(_n)
            return _orig(*a, **k)

        monkeypatch.setattr(owner, name, wrapped)
    return calls


def test_spans_order_nest_and_never_precede_their_launch(tmp_path: Path, no_sync: list[str]) -> None:
    torch.cuda.synchronize()
    no_sync.clear()
    with evtrace.record(tmp_path / "t.json.gz", quiet=True) as r:
        for _i in range(20):
            with evtrace.region("outer"):
                spin(0.2)
                with evtrace.region("inner"):
                    spin(0.3)
                spin(0.1)
        assert no_sync == []  # nothing on the region path synchronizes
    s = r.session
    assert s is not None and s.device_spans == 40 == len(s)
    reg = s.regions
    assert (reg["dev_start"] > reg["host_start"]).all()
    assert (reg["dev_end"] >= reg["dev_start"]).all()
    outer = reg[reg["name"] == s.names.index("outer")]
    inner = reg[reg["name"] == s.names.index("inner")]
    # nested on the host, nested on the device
    assert (inner["dev_start"] >= outer["dev_start"]).all() and (inner["dev_end"] <= outer["dev_end"]).all()
    # one stream: spans never go backwards
    o = np.argsort(outer["host_start"])
    assert (np.diff(outer["dev_start"][o]) > 0).all()
    assert (outer["dev_start"][o][1:] >= outer["dev_end"][o][:-1]).all()
    # the kernels take ~0.6 ms each step; the host only launched them
    assert np.median(outer["dev_end"] - outer["dev_start"]) > 500_000
    assert s.meta["gpus"] == [torch.cuda.get_device_name(0)]
    print("alignment", s.meta["alignment"])
    assert problems(load_json(tmp_path / "t.json.gz")) == []


def test_sequential_children_tile_the_container_on_the_device(tmp_path: Path) -> None:
    """In an nn.Sequential one event serves each boundary: every child starts where the one
    before ended (or at its own launch, if the device was idle), and the container ends with
    its last child. Alternating long and tiny kernels, so both cases occur."""
    spin_ms = [0.3, 0.0, 0.2, 0.0]

    class Spin(torch.nn.Module):
        def __init__(self, ms: float) -> None:
            super().__init__()
            self.ms = ms

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.ms:
                spin(self.ms)
            return x + 1

    seq = torch.nn.Sequential(*(Spin(ms) for ms in spin_ms))
    x = torch.zeros(1, device="cuda")
    with evtrace.instrument(seq), evtrace.record(tmp_path / "s.json.gz", quiet=True) as r:
        for _ in range(10):
            seq(x)
    s = r.session
    assert s is not None and s.device_spans == 50 == len(s)
    reg = s.regions
    named = {"Sequential": "Sequential", **{c: f"Sequential.{c}" for c in "0123"}}  # the children by index
    by = {n: reg[reg["name"] == s.names.index(full)] for n, full in named.items()}
    for a, b in (("0", "1"), ("1", "2"), ("2", "3")):
        prev, cur = by[a], by[b]
        assert (cur["dev_start"] == np.maximum(prev["dev_end"], cur["host_start"] + 1)).all()
    assert (by["3"]["dev_end"] == by["Sequential"]["dev_end"]).all()
    # the tiny kernel, not the spin before it (once warm: the first call's host is slow, and the
    # device span covers the stream waiting for it)
    assert (by["1"]["dev_end"] - by["1"]["dev_start"] < 100_000)[1:].all()


def test_the_host_runs_ahead_of_the_device(tmp_path: Path) -> None:
    with evtrace.record(tmp_path / "ahead.json", quiet=True) as r:
        for _ in range(5):
            with evtrace.region("queued"):
                spin(20)
    s = r.session
    assert s is not None
    q = s.regions
    host = q["host_end"] - q["host_start"]
    dev = q["dev_end"] - q["dev_start"]
    assert (host < 2_000_000).all() and (dev > 10_000_000).all()
    # the launch→start delay grows as the queue deepens
    delay = q["dev_start"] - q["host_start"]
    assert (np.diff(delay) > 0).all()


def test_regions_on_two_streams_get_two_lanes(tmp_path: Path) -> None:
    side = torch.cuda.Stream()
    with evtrace.record(tmp_path / "two.json", quiet=True) as r:
        for _ in range(5):
            with evtrace.region("main"):
                spin(1)
            with torch.cuda.stream(side):
                with evtrace.region("side"):
                    spin(1)
    s = r.session
    assert s is not None and len(s.streams) == 2
    assert [st.label for st in s.streams][0] == "stream 0 (default)"
    main = s.regions[s.regions["name"] == s.names.index("main")]
    other = s.regions[s.regions["name"] == s.names.index("side")]
    assert set(main["stream"].tolist()) != set(other["stream"].tolist())
    # the two streams really ran side by side
    assert (other["dev_start"] < main["dev_end"]).any()
    assert problems(load_json(tmp_path / "two.json")) == []


def test_the_pool_recycles_events(tmp_path: Path) -> None:
    with evtrace.record(tmp_path / "many.json.gz", quiet=True, pool_size=64) as r:
        for _i in range(20_000):
            with evtrace.region("tiny"):
                pass
    s = r.session
    assert s is not None and s.device_spans + s.meta["dropped_device_spans"] == 20_000
    assert s.meta["dropped_device_spans"] == 0


def test_anchors_drift_and_slack_are_recorded(tmp_path: Path) -> None:
    import time

    with evtrace.record(tmp_path / "long.json", quiet=True, anchor_interval=0.2) as r:
        t_end = time.perf_counter() + 3
        while time.perf_counter() < t_end:
            with evtrace.region("step"):
                spin(5)
            time.sleep(0.005)
    a = r.session.meta["alignment"]["0"]  # type: ignore[union-attr]
    print("alignment over 3 s:", a)
    assert a["anchors"] >= 10
    assert abs(float(a["drift_ppm"])) < 200
    assert a["slack_us_p99"] < 5 and a["stamps"] > 100


def test_sample_two_models_on_the_gpu(tmp_path: Path) -> None:
    out = tmp_path / "two_models.json.gz"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "evtrace",
            "--no-hooks",
            "-o",
            str(out),
            str(ROOT / "samples" / "two_models.py"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    doc = load_json(out)
    assert problems(doc) == []
    s = evtrace.load(out)
    assert len(s) == 160 and s.device_spans == 120  # cpu_task is host-only
    reg = s.regions
    ix = {n: s.names.index(n) for n in s.names}
    # events mode: the host runs cpu_task while model1 still executes on the device
    steps = reg[reg["name"] == ix["step (events)"]]
    m1 = reg[reg["name"] == ix["model1"]]
    cpu = reg[reg["name"] == ix["cpu_task"]]
    assert len(steps) == 20
    m1_ev, cpu_ev = m1[-20:], cpu[-20:]  # the second half of the run: no synchronize
    assert (cpu_ev["host_start"] < m1_ev["dev_end"]).sum() >= 15
    m1_sync, cpu_sync = m1[:20], cpu[:20]  # with synchronize the host waits first
    assert (cpu_sync["host_start"] >= m1_sync["dev_end"] - 20_000).all()  # within alignment error
    print(s.summary(skip=5))


def test_backward_regions_land_on_an_autograd_thread_lane(tmp_path: Path) -> None:
    x = torch.randn(64, 64, device="cuda", requires_grad=True)

    def hook(g: torch.Tensor) -> torch.Tensor:
        with evtrace.region("in backward"):
            return g * 2

    with evtrace.record(tmp_path / "bw.json", quiet=True) as r:
        y = (x @ x).sum()
        y.register_hook(hook)
        y.backward()
        torch.cuda.synchronize()
    s = r.session
    assert s is not None
    (row,) = s.regions[s.regions["name"] == s.names.index("in backward")]
    assert s.threads[row["thread"]].name.startswith("autograd thread")
    assert problems(load_json(tmp_path / "bw.json")) == []


def test_graph_capture_is_not_broken_and_replays_are_timed(tmp_path: Path) -> None:
    static = torch.randn(256, 256, device="cuda")
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    with evtrace.record(tmp_path / "graph.json", quiet=True) as r:
        with evtrace.region("warmup"):
            out = static @ static
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            with evtrace.region("warmup on side"):
                out = static @ static
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(g):
            with evtrace.region("captured"):
                out = static @ static
                out = out.relu()
        for _ in range(3):
            with evtrace.region("replay"):
                g.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out, (static @ static).relu())
    s = r.session
    assert s is not None and s.meta["marks_skipped_in_graph_capture"] >= 1
    reg = s.regions
    assert (reg["device"][reg["name"] == s.names.index("captured")] == -1).all()
    replays = reg[reg["name"] == s.names.index("replay")]
    assert len(replays) == 3 and (replays["device"] == 0).all()
    assert problems(load_json(tmp_path / "graph.json")) == []


def test_eight_threads_four_streams(tmp_path: Path) -> None:
    import threading

    streams = [torch.cuda.Stream() for _ in range(4)]
    x = torch.randn(128, 128, device="cuda")

    def work(k: int) -> None:
        for i in range(50):
            st = streams[(k + i) % 4]
            with torch.cuda.stream(st):
                with evtrace.region(f"t{k}"):
                    x @ x

    with evtrace.record(tmp_path / "mt.json.gz", quiet=True) as r:
        ts = [threading.Thread(target=work, args=(k,), name=f"w{k}") for k in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    s = r.session
    assert s is not None and len(s) == 400
    assert s.device_spans + s.meta["dropped_device_spans"] == 400
    assert len({st.label for st in s.streams}) == 4
    for k in range(8):
        rows = s.regions[s.regions["name"] == s.names.index(f"t{k}")]
        assert {s.threads[i].name for i in rows["thread"].tolist()} == {f"w{k}"}
    assert problems(load_json(tmp_path / "mt.json.gz")) == []


def test_a_dry_pool_drops_spans_and_never_syncs(tmp_path: Path, no_sync: list[str]) -> None:
    from evtrace.device import CudaBackend
    from evtrace.recorder import Recorder

    rec = Recorder(CudaBackend(), pool_size=16, max_events=48)
    rec.start()
    no_sync.clear()
    spin(300)  # the device is far behind: nothing resolves for a while
    for _ in range(200):
        with evtrace.region("queued"):
            spin(0.01)
    assert no_sync == []
    s = rec.stop()
    assert len(s) == 200 and s.meta["dropped_device_spans"] > 0
    s.save(tmp_path / "dry.json")


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo: "cannot trace time.perf_counter_ns"
def test_regions_inside_torch_compile(tmp_path: Path) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        with evtrace.region("inside compiled"):
            y = x.sin()
        return y * 2

    cf = torch.compile(f, backend="aot_eager")
    x = torch.randn(64, device="cuda")
    with evtrace.record(tmp_path / "compiled.json", quiet=True) as r:
        for _ in range(3):
            out = cf(x)
    assert torch.allclose(out, x.sin() * 2)
    s = r.session
    assert s is not None and s.names == ["inside compiled"] and len(s) == 3


PROC = """
import sys, torch, evtrace
x = torch.randn(512, 512, device="cuda")
side = torch.cuda.Stream()
for i in range(30):
    with evtrace.region("work"):
        x = (x @ x).tanh()
    if sys.argv[1] == "2":
        with torch.cuda.stream(side):
            with evtrace.region("side work"):
                (x @ x).relu()
torch.cuda.synchronize()
"""


def test_two_processes_on_one_gpu_then_merge(tmp_path: Path) -> None:
    (tmp_path / "proc.py").write_text(PROC)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "evtrace", "--no-hooks", "-o", f"p{k}.json.gz", "proc.py", str(k + 1)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for k in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    out = subprocess.run(
        [sys.executable, "-m", "evtrace", "merge", "p0.json.gz", "p1.json.gz", "-o", "all.json.gz"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    doc = load_json(tmp_path / "all.json.gz")
    assert problems(doc) == []
    names = sorted({e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"})
    assert names == [
        f"trace {k} · {n}" for k in (0, 1) for n in (f"GPU 0 · {torch.cuda.get_device_name(0)}", "host")
    ]
    lanes = {(e["pid"], e["args"]["name"]) for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert sum(1 for _, n in lanes if n.startswith("stream")) == 3  # 1 stream in one, 2 in the other
    assert sum(1 for e in doc["traceEvents"] if e.get("cat") == "region") == 90
