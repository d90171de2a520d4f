"""What a saved trace holds: lanes, nesting, flows, overlap lanes, metadata; and a golden file."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch  # noqa: F401  (the metadata names the torch the program uses)

import evtrace
from evtrace.export import View
from evtrace.export.render import Timeline
from evtrace.export.report import Report
from evtrace.export.summary import Summary
from evtrace.files import read_json as load_json
from evtrace.formats.chrome import trace_bytes as dumps
from evtrace.lanes import DEVICE_PID, sublanes

from .checker import problems
from .simdevice import FakeClock, SimBackend

GOLDEN = Path(__file__).parent / "golden" / "sim_session.json"


def sim_session(path: Path, seed: int = 0) -> tuple[evtrace.Session, dict[str, Any]]:
    """A small fake-clock session: two threads' worth of nesting, two streams, a kernel each."""
    clk = FakeClock(seed=seed)
    sim = SimBackend(clk, drift_ppm=20.0)
    with evtrace.record(path, backend=sim, clock=clk, quiet=True) as r:
        for i in range(3):
            with evtrace.region("step", i=i):
                with evtrace.region("forward"):
                    sim.launch(40_000)
                sim.stream = 7
                with evtrace.region("copy"):
                    sim.launch(10_000)
                sim.stream = 0
                clk.advance(20_000)
    assert r.session is not None
    return r.session, load_json(path)


def lanes(doc: dict[str, Any]) -> dict[tuple[int, int], str]:
    return {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in doc["traceEvents"]
        if e["ph"] == "M" and e["name"] == "thread_name"
    }


def procs(doc: dict[str, Any]) -> dict[int, tuple[str, int]]:
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    sort = {
        e["pid"]: e["args"]["sort_index"] for e in doc["traceEvents"] if e["name"] == "process_sort_index"
    }
    return {p: (names[p], sort[p]) for p in names}


def xs(doc: dict[str, Any], cat: str) -> list[dict[str, Any]]:
    return [e for e in doc["traceEvents"] if e["ph"] == "X" and e["cat"] == cat]


def test_host_and_device_lanes_flows_and_args(tmp_path: Path) -> None:
    s, doc = sim_session(tmp_path / "t.json")
    assert problems(doc) == []
    p = procs(doc)
    assert p[os.getpid()] == ("host", 0)
    assert p[DEVICE_PID] == ("GPU 0 · Sim GPU 0", 1)
    assert sorted(lanes(doc).values()) == ["MainThread", "stream 0 (default)", "stream 7"]
    host, dev = xs(doc, "region"), xs(doc, "device")
    assert len(host) == len(dev) == 9
    # every host span flows to its device span, which starts strictly later
    by_id = {e["bind_id"]: e for e in dev}
    for h in host:
        d = by_id[h["bind_id"]]
        assert h["flow_out"] is True and d["flow_in"] is True
        assert d["ts"] > h["ts"] and d["name"] == h["name"]
        assert set(h["args"]) >= {"host_dur_us", "device_dur_us", "launch_delay_us"}
        assert h["args"]["launch_delay_us"] == pytest.approx(d["ts"] - h["ts"], abs=1e-3)
    copies = [e for e in dev if e["name"] == "copy"]
    assert {lanes(doc)[(e["pid"], e["tid"])] for e in copies} == {"stream 7"}
    assert [e["args"]["i"] for e in host if e["name"] == "step"] == [0, 1, 2]


def test_nested_regions_nest_on_the_device_too(tmp_path: Path) -> None:
    _, doc = sim_session(tmp_path / "t.json")
    dev = xs(doc, "device")
    steps = [e for e in dev if e["name"] == "step"]
    fwd = [e for e in dev if e["name"] == "forward"]
    for st, fw in zip(steps, fwd):
        assert st["tid"] == fw["tid"]
        assert st["ts"] <= fw["ts"] and fw["ts"] + fw["dur"] <= st["ts"] + st["dur"]


def test_metadata_has_provenance_and_alignment_but_no_environment(tmp_path: Path) -> None:
    _, doc = sim_session(tmp_path / "t.json")
    m = doc["metadata"]
    for k in (
        "evtrace",
        "python",
        "torch",
        "argv",
        "gpus",
        "alignment.0.anchors",
        "alignment.0.drift_ppm",
        "alignment.0.slack_us_p99",
        "regions",
        "device_spans",
    ):
        assert k in m, k
    assert isinstance(doc["baseTimeNanoseconds"], int)
    text = orjson.dumps(doc).decode()
    for var in ("PATH", "HOME"):
        if os.environ.get(var):
            assert os.environ[var] not in text


def test_gzip_by_suffix_and_round_trip(tmp_path: Path) -> None:
    s, _ = sim_session(tmp_path / "t.json.gz")
    raw = (tmp_path / "t.json.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b" and gzip.decompress(raw)[:2] == b'{"'
    back = evtrace.load(tmp_path / "t.json.gz")
    assert back.names == s.names and len(back) == len(s)
    for f in ("host_start", "host_end", "dev_start", "dev_end", "device", "stream", "thread", "name"):
        assert np.array_equal(back.regions[f], s.regions[f]), f
    assert back.summary() == s.summary()
    assert back.args == s.args


def test_crossing_spans_move_to_an_overlap_lane(tmp_path: Path) -> None:
    clk = FakeClock()
    with evtrace.record(tmp_path / "o.json", device=False, clock=clk, quiet=True):
        a = evtrace.region("a")
        b = evtrace.region("b")
        a.__enter__()
        b.__enter__()
        a.__exit__(None, None, None)  # a ends inside b: they cross
        b.__exit__(None, None, None)
    doc = load_json(tmp_path / "o.json")
    assert problems(doc) == []
    names = lanes(doc)
    assert sorted(names.values()) == ["MainThread", "MainThread (overlap)"]
    assert len(xs(doc, "region")) == 2  # nothing dropped
    back = evtrace.load(tmp_path / "o.json")
    assert back.regions["thread"].tolist() == [0, 0]


def test_sublanes() -> None:
    s = np.array([0, 10, 20, 5, 30])
    e = np.array([100, 50, 30, 15, 40])
    # by start: 0-100 holds 5-15; 10-50 crosses 5-15 and moves; 20-30, 30-40 (touching: siblings) stay
    assert sublanes(s, e).tolist() == [0, 1, 0, 0, 0]
    assert sublanes(np.array([0, 5]), np.array([5, 10])).tolist() == [0, 0]


def test_hostile_names_and_args_still_make_valid_json(tmp_path: Path) -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    weird = 'q"uo\nte \\ ünï 🚀 \ud800'
    with evtrace.record(tmp_path / "h.json", device=False, quiet=True):
        with evtrace.region(
            weird,
            nan=float("nan"),
            inf=float("inf"),
            big=2**80,
            obj=Opaque(),
            nested={"k": [1, float("nan")]},
        ):
            pass
    raw = (tmp_path / "h.json").read_bytes()
    assert b"NaN" not in raw and b"Infinity" not in raw
    doc = load_json(tmp_path / "h.json")
    (h,) = xs(doc, "region")
    assert h["name"].startswith('q"uo\nte \\ ünï 🚀')
    assert h["args"]["big"] == repr(2**80) and h["args"]["obj"] == "<opaque>"
    assert h["args"]["nan"] == "nan" and h["args"]["inf"] == "inf"  # JSON has neither: kept as words


def normalised(doc: dict[str, Any]) -> dict[str, Any]:
    """Golden comparison: the pid, versions and argv vary from machine to machine."""
    pid = doc["metadata"]["evtrace.pid"]
    for e in doc["traceEvents"]:
        if e["pid"] == pid:
            e["pid"] = 1
        if e["ph"] == "M" and e["name"] == "thread_name" and e["pid"] == 1:
            e["tid"] = 1
        elif e["pid"] == 1:
            e["tid"] = 1
    keep = {
        k: v
        for k, v in doc["metadata"].items()
        if k.startswith(
            (
                "alignment",
                "regions",
                "device_spans",
                "dropped",
                "split",
                "clamped",
                "duration",
                "evtrace.streams",
                "evtrace.devices",
                "evtrace.overlap",
                "gpus",
            )
        )
    }
    return {"traceEvents": doc["traceEvents"], "metadata": keep}


def test_golden(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Regenerate deliberately with EVTRACE_ACCEPT=1 pytest tests/test_export.py::test_golden."""
    _, doc = sim_session(tmp_path / "g.json")
    got = normalised(doc)
    if os.environ.get("EVTRACE_ACCEPT"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(orjson.dumps(got, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    assert got == orjson.loads(GOLDEN.read_bytes())


@pytest.mark.parametrize("device", [True, False])
def test_regions_without_args_are_written_as_with_args(tmp_path: Path, device: bool) -> None:
    """A chunk of regions without args is formatted in one call: the same events as the
    region-by-region path that args take (forced here by giving one region an arg)."""
    clk = FakeClock()
    sim = SimBackend(clk)
    with evtrace.record(
        tmp_path / "a.json", backend=sim if device else None, clock=clk, device=device, quiet=True
    ) as r:
        for _ in range(3):
            with evtrace.region("step"):
                sim.launch(10_000)
    s = r.session
    assert s is not None and s.device_spans == (3 if device else 0)
    fast = orjson.loads(dumps(s))["traceEvents"]
    s.args[0] = {"x": 1}
    slow = orjson.loads(dumps(s))["traceEvents"]
    for e in slow:
        e.get("args", {}).pop("x", None)
    assert fast == slow


def test_counters_show_how_far_the_host_runs_ahead(tmp_path: Path) -> None:
    clk = FakeClock()
    sim = SimBackend(clk)
    with evtrace.record(tmp_path / "c.json", backend=sim, clock=clk, quiet=True):
        for _ in range(4):  # each step queues 1 ms of work; the host needs a few µs
            with evtrace.region("step"):
                with evtrace.region("inner"):
                    sim.launch(1_000_000)
    doc = load_json(tmp_path / "c.json")
    assert problems(doc) == []
    depth = [
        e["args"]["regions"]
        for e in doc["traceEvents"]
        if e["ph"] == "C" and e["name"] == "regions in flight"
    ]
    assert max(depth) == 4 and depth[-1] == 0  # only outermost regions count: never 8
    assert depth[:4] == [1, 2, 3, 4]
    lead = [e["args"]["us"] for e in doc["traceEvents"] if e["ph"] == "C" and e["name"] == "host lead"]
    assert len(lead) == 4 and lead == sorted(lead) and lead[-1] > 2000  # the queue deepens
    assert all(e["pid"] == DEVICE_PID for e in doc["traceEvents"] if e["ph"] == "C")


def test_a_region_exited_on_another_thread(tmp_path: Path) -> None:
    import threading

    with evtrace.record(tmp_path / "x.json", device=False, quiet=True) as r:
        reg = evtrace.region("handoff")
        reg.__enter__()
        with evtrace.region("main work"):
            pass
        t = threading.Thread(target=lambda: reg.__exit__(None, None, None), name="closer")
        t.start()
        t.join()
        with evtrace.region("after"):
            pass
    s = r.session
    assert s is not None and len(s) == 3
    # the span stays on the lane of the thread that entered it
    assert {s.threads[i].name for i in s.regions["thread"].tolist()} == {"MainThread"}
    assert problems(load_json(tmp_path / "x.json")) == []


def test_two_threads_launching_onto_one_stream(tmp_path: Path) -> None:
    """Interleaved launches make device spans cross on the stream: the crossing ones move to an
    overlap lane, and nothing is dropped."""
    clk = FakeClock()
    sim = SimBackend(clk)
    rec = evtrace.recorder.Recorder(sim, clk, background=False)
    rec.start()
    k = evtrace.recorder.name_key
    import threading

    a_tok: list[Any] = []

    def thread_b() -> None:  # enters while A's region is open, exits after A's
        tb = rec.enter(k("B"), None)
        sim.launch(20_000)
        a_tok.append(tb)

    ta = rec.enter(k("A"), None)
    sim.launch(10_000)
    t = threading.Thread(target=thread_b, name="second")
    t.start()
    t.join()
    sim.launch(10_000)
    rec.exit(ta)
    sim.launch(5_000)
    done = threading.Thread(target=lambda: rec.exit(a_tok[0]), name="second-exit")
    done.start()
    done.join()
    s = rec.stop()
    s.save(tmp_path / "two.json")
    doc = load_json(tmp_path / "two.json")
    assert problems(doc) == []
    assert len(xs(doc, "device")) == 2
    assert "stream 0 (default) (overlap)" in lanes(doc).values()


def test_summary_counts_host_waits(tmp_path: Path) -> None:
    clk = FakeClock()
    with evtrace.record(tmp_path / "w.json", device=False, clock=clk, quiet=True) as r:
        for _ in range(3):
            with evtrace.region("wait .item() train.py:9", host_only=True):
                clk.advance(2_000_000)
    assert r.session is not None
    assert r.session.summary().splitlines()[-1] == "host waits on the device: 3 waits, 6 ms in all"


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, GeneratorExit, OSError])
def test_an_interrupted_write_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, error: type[BaseException]
) -> None:
    from evtrace.files import write_bytes

    out = tmp_path / "bad_old.json.gz"  # not a trace: the strict checker skips "bad*"
    write_bytes(b'{"old": 1}', out)
    before = out.read_bytes()

    def chunks():
        yield b'{"traceEvents":['
        raise error()

    with pytest.raises(error):
        write_bytes(chunks(), out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bad_old.json.gz"]  # no .bad_old.json.gz.<pid>.tmp


def test_a_long_write_says_so_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from evtrace import files

    monkeypatch.setattr(files, "PROGRESS_AFTER_S", 0.0)  # as if each chunk took over a second
    s, _ = sim_session(tmp_path / "t.json")
    capsys.readouterr()
    s.save(tmp_path / "u.json.gz")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"evtrace: writing {tmp_path / 'u.json.gz'} (") and err[0].endswith("...")
    assert err[1].startswith(f"evtrace: writing {tmp_path / 'u.json.gz'}: done, ") and err[1].endswith(" s")
    assert len(err) == 2
    quick = tmp_path / "v.json"
    monkeypatch.setattr(files, "PROGRESS_AFTER_S", 60.0)
    s.save(quick)
    assert capsys.readouterr().err == ""  # a quick write prints nothing


def test_a_long_write_updates_its_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import types

    from evtrace import files

    now = iter(range(0, 10_000, 11))  # each read of the clock 11 s later: a slow disk
    monkeypatch.setattr(files, "time", types.SimpleNamespace(monotonic=lambda: float(next(now))))
    files.write_bytes((b"x" * 2_000_000 for _ in range(3)), tmp_path / "slow.bin")
    err = capsys.readouterr().err.splitlines()  # not a terminal: a line every 10 s
    assert [line.split("(")[1].split(" MB")[0] for line in err[:-1]] == ["2", "4", "6"]
    assert err[-1].startswith(f"evtrace: writing {tmp_path / 'slow.bin'}: done")


VIEWS = [Summary(), Report(), Timeline()]


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: f"{type(v).__name__}{v.suffix}")
def test_every_view_renders_a_session_and_the_empty_one(tmp_path: Path, view: View) -> None:
    """One shape for every view: its suffix and its text; an empty session gives
    output or, where there is nothing to show, a clear ValueError (the CLI's one-line exit 2)."""
    s, _ = sim_session(tmp_path / "v.json")
    out = view.render(s)
    assert isinstance(out, str) and len(out) > 0
    assert view.suffix.startswith(".")
    with evtrace.record(tmp_path / "empty.json", device=False, quiet=True) as r:
        pass
    assert r.session is not None
    try:
        empty = view.render(r.session)
    except ValueError as e:
        assert "nothing" in str(e)
    else:
        assert isinstance(empty, str)
