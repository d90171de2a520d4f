"""Deep nesting: Perfetto's importer drops every slice 512 or more deep on a lane
(``slice_max_depth_exceeded``), so the writer moves those to extra lanes after their lane, and
``render`` draws a bounded picture that says what it left out."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import evtrace
from evtrace import lanes, session
from evtrace.export.render import MAX_HEIGHT, MAX_ROWS, draw
from evtrace.files import read_json
from evtrace.lanes import DEPTH_LIMIT, DEVICE_PID, nesting

from .checker import problems
from .perfetto import ERRORS, Query
from .test_trace_writer import nested_spans, session_of


def recursion(path: Path, depth: int) -> evtrace.Session:
    """A recursive decorated function ``depth`` deep, in a host-only session."""

    @evtrace.region
    def down(k: int) -> None:
        if k > 1:
            down(k - 1)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * depth + 200))
    try:
        with evtrace.record(path, device=False, quiet=True) as r:
            down(depth)
    finally:
        sys.setrecursionlimit(limit)
    assert r.session is not None and len(r.session) == depth
    return r.session


def thread_lanes(doc: dict[str, Any]) -> dict[tuple[int, int], tuple[str, int]]:
    """(pid, tid) -> (thread name, sort index)"""
    ev = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e["name"] == "thread_name"}
    sort = {(e["pid"], e["tid"]): e["args"]["sort_index"] for e in ev if e["name"] == "thread_sort_index"}
    return {t: (names[t], sort[t]) for t in names}


@pytest.mark.parametrize("depth", [600, 3000])
def test_a_deep_recursion_keeps_every_slice(tmp_path: Path, depth: int, perfetto: Query) -> None:
    path = tmp_path / "deep.json.gz"
    s = recursion(path, depth)
    doc = read_json(path)
    assert problems(doc) == []
    # every slice imports, none past the importer's depth limit
    got = perfetto(path, f"{ERRORS} union all select 'slices', count(*) from slice")
    assert got == [["slices", str(depth)]]
    assert evtrace.load(path) == s
    # on the thread's lane, then "(depth 512+)", "(depth 1024+)", ... right after it
    lanes = thread_lanes(doc)
    main = next(tid for (_, tid), (name, _) in lanes.items() if name == "MainThread")
    bands = -(-depth // DEPTH_LIMIT)
    want = ["MainThread"] + [f"MainThread (depth {b * DEPTH_LIMIT}+)" for b in range(1, bands)]
    assert [lanes[t][0] for t in sorted(lanes, key=lambda t: lanes[t][1])] == want
    by_start = sorted((e for e in doc["traceEvents"] if e["ph"] == "X"), key=lambda e: e["ts"])
    assert [e["tid"] for e in by_start[:DEPTH_LIMIT]] == [main] * DEPTH_LIMIT
    assert lanes[(s.pid, by_start[DEPTH_LIMIT]["tid"])][0] == "MainThread (depth 512+)"
    assert perfetto(path, "select max(depth) from slice") == [[str(DEPTH_LIMIT - 1)]]


@pytest.mark.parametrize("depth", [600, 3000])
def test_render_of_a_deep_recursion_is_bounded_and_says_what_it_cut(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "deep.json"
    recursion(path, depth)
    svg = tmp_path / "deep.svg"
    p = subprocess.run(
        [sys.executable, "-m", "evtrace", "render", str(path), "-o", str(svg)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    cut = f"not drawn: {depth - MAX_ROWS} slices deeper than {MAX_ROWS} rows"
    assert f"({MAX_ROWS} slices on 1 lane," in p.stderr and cut in p.stderr
    root = ET.fromstring(svg.read_text())
    assert int(root.get("height", "0")) <= MAX_HEIGHT
    texts = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert cut in texts
    assert len(list(root.iter("{http://www.w3.org/2000/svg}rect"))) < MAX_ROWS + 10


@pytest.mark.parametrize("threads, n, rows", [(3, 40, MAX_ROWS), (8, 40, 22), (400, 5, 1)])
def test_render_caps_the_height_of_many_deep_lanes(threads: int, n: int, rows: int) -> None:
    """Many deep lanes: fewer rows each (8 lanes 40 deep and 2 empty stream lanes fit 22 rows
    in 4,000 px), down to one; then only the lanes that fit, and it says so."""
    host = [(t * 1000 + k, t * 1000 + 1000 - k) for t in range(threads) for k in range(n)]
    s = session_of(host, thread_of=[t for t in range(threads) for _ in range(n)])
    s.threads = [session.Thread(100 + t, f"t{t}") for t in range(threads)]
    d = draw(s, window=(0, threads * 1000))
    root = ET.fromstring(d.svg)
    assert int(root.get("height", "0")) <= MAX_HEIGHT
    assert d.rows == rows and not d.capped
    assert d.deeper + d.slices + d.lanes_cut_slices == threads * n
    assert d.lanes + d.lanes_cut == threads + 2  # and the two streams' lanes
    assert d.deeper == (threads * max(0, n - rows) if threads < 400 else d.lanes * (n - 1))  # the streams cut
    past = f"{d.lanes_cut} lanes ({d.lanes_cut_slices} slices) past 4000 px (choose with --lanes)"
    assert (past in str(d)) == (threads == 400) and (d.lanes_cut > 0) == (threads == 400)


def test_deep_host_and_device_lanes_keep_their_flows(tmp_path: Path, perfetto: Query) -> None:
    """Nesting 1,300 deep on a thread and on a stream, with overlaps among them: the device lanes
    split as the host ones do, and every launch-to-execution arrow imports."""
    host = [(10 * k, 100_000 - 10 * k) for k in range(1300)]
    host += [(50_000 + k, 120_000 - k) for k in range(600)]  # these cross the first: deep overlap lanes
    host += [(130_000, 140_000)]
    dev: list[tuple[int, int] | None] = [(h0 + 5, h1 + 5) for h0, h1 in host]
    s = session_of(host, dev, ["a", "b"], [k % 2 for k in range(len(host))])
    s.regions["device"], s.regions["stream"] = 0, 0  # one stream
    s.meta = {"evtrace": evtrace.__version__}
    path = s.save(tmp_path / "deep.json.gz")
    doc = read_json(path)
    assert problems(doc) == []
    assert evtrace.load(path) == s
    lanes = thread_lanes(doc)
    by_pid: dict[int, list[str]] = {}
    for t in sorted(lanes, key=lambda t: (t[0], lanes[t][1])):
        by_pid.setdefault(t[0], []).append(lanes[t][0])
    deep = ["", " (depth 512+)", " (depth 1024+)", " (overlap)", " (overlap) (depth 512+)"]
    assert by_pid == {
        s.pid: [f"main{x}" for x in deep] + ["other", "third"],
        DEVICE_PID: [f"stream 0 (default){x}" for x in deep],
        DEVICE_PID + 1: ["stream 0 (default)"],
    }
    got = perfetto(
        path,
        f"{ERRORS} union all select 'slices', count(*) from slice"
        " union all select 'flows', count(*) from flow",
    )
    assert got == [["slices", str(2 * len(host))], ["flows", str(len(host))]]


def test_the_checker_rejects_a_slice_past_depth_511() -> None:
    def doc(depth: int, zero: bool = False) -> dict[str, Any]:
        m = [
            {"ph": "M", "name": k, "pid": 1, "tid": 1, "args": {"name": "t", "sort_index": 0}}
            for k in ("process_name", "process_sort_index", "thread_name", "thread_sort_index")
        ]
        # nested, or (zero) all of no length at one instant, which nest as well
        xs = [
            {
                "ph": "X",
                "name": "r",
                "pid": 1,
                "tid": 1,
                "ts": 5 if zero else k,
                "dur": 0 if zero else 2 * (depth - k),
            }
            for k in range(depth)
        ]
        return {"traceEvents": m + xs, "metadata": {"evtrace": "0"}}

    assert problems(doc(512)) == [] and problems(doc(512, zero=True)) == []
    assert problems(doc(513)) == ["lane (1, 1): 'r' [512000, 514000) at depth 512, past 511"]
    assert (
        problems(doc(515, zero=True))[-1]
        == "lane (1, 1): 3 slices in all past depth 511, which Perfetto drops"
    )


def perfetto_depth(start: list[int], end: list[int]) -> list[int]:
    """Depth as Perfetto's importer gives it: by start, the longer first; touching spans are
    siblings, but a span of no length stays open for the next one at its instant."""
    out = [0] * len(start)
    stack: list[tuple[int, int]] = []
    for i in sorted(range(len(start)), key=lambda i: (start[i], -end[i])):
        while stack and (stack[-1][1] < start[i] or stack[-1][0] < stack[-1][1] == start[i]):
            stack.pop()
        out[i] = len(stack)
        stack.append((start[i], end[i]))
    return out


@settings(max_examples=200, deadline=None)
@given(st.randoms(), st.integers(1, 4), st.booleans())
def test_nesting_counts_depth_as_perfetto(random: Any, limit: int, shuffle: bool) -> None:
    """With a small limit, so that every path of ``nesting`` meets it: runs of spans of no length,
    nested spans in or out of order, and crossing ones (each sub-lane counted on its own)."""
    rng = np.random.default_rng(random.getrandbits(32))
    spans = nested_spans(rng, 0, 30, 5) + [
        (t, t) for t in rng.integers(0, 31, int(rng.integers(0, 8))).tolist()
    ]
    if rng.random() < 0.3:
        spans.append((int(rng.integers(0, 15)), int(rng.integers(15, 40))))  # may cross
    if shuffle:
        rng.shuffle(spans)
    else:
        spans.sort(key=lambda x: (x[0], -x[1]))
    start, end = np.array([a for a, _ in spans], np.int64), np.array([b for _, b in spans], np.int64)
    old = lanes.DEPTH_LIMIT
    lanes.DEPTH_LIMIT = limit
    try:
        sub, depth = nesting(start, end)
    finally:
        lanes.DEPTH_LIMIT = old
    for k in np.unique(sub).tolist():
        mine = np.flatnonzero(sub == k)
        want = perfetto_depth(start[mine].tolist(), end[mine].tolist())
        if depth is None:
            assert max(want, default=0) < limit
        else:
            assert depth[mine].tolist() == want


def test_perfetto_nests_as_the_lane_layer_counts(tmp_path: Path, perfetto: Query) -> None:
    """The importer's own depths, for nestings with ties and spans of no length: what ``nesting``
    and the checker assume."""
    rng = np.random.default_rng(5)
    events: list[dict[str, Any]] = []
    want: dict[tuple[int, int], int] = {}
    for tid in range(1, 101):
        spans = nested_spans(rng, 0, 12, 6) + [(t, t) for t in rng.integers(0, 13, 5).tolist()]
        rng.shuffle(spans)
        start, end = np.array([a for a, _ in spans], np.int64), np.array([b for _, b in spans], np.int64)
        old = lanes.DEPTH_LIMIT
        lanes.DEPTH_LIMIT = 1  # count every depth
        try:
            sub, depth = nesting(start, end)
        finally:
            lanes.DEPTH_LIMIT = old
        assert depth is not None and not sub.any()
        for i, (a, b) in enumerate(spans):
            events.append({"ph": "X", "name": str(i), "pid": 1, "tid": tid, "ts": a, "dur": b - a})
            want[(tid, i)] = int(depth[i])
    path = tmp_path / "bad-no-metadata.json"  # (not an evtrace trace: the checker skips it)
    path.write_bytes(orjson.dumps({"traceEvents": events}))
    rows = perfetto(
        path,
        "select thread.tid, s.name, s.depth from slice s"
        " join thread_track t on s.track_id = t.id join thread using(utid)",
    )
    assert {(int(t), int(name)): int(d) for t, name, d in rows} == want
