"""The trace writer's speed-ups keep its bytes: events formatted many at once are the bytes one
``%`` format per event wrote, and the gzip pieces compressed on worker threads make one gzip file."""

from __future__ import annotations

import gzip
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evtrace
from evtrace import files, lanes
from evtrace.device import DeviceInfo
from evtrace.files import crc32_combine, gzip_stream
from evtrace.formats import chrome
from evtrace.formats.chrome import trace_bytes
from evtrace.session import REGION_DTYPE, Session, Stream, Thread

from .checker import problems
from .perfetto import ERRORS, Query

# the writer before the speed-up, one % format per event: what the bytes must stay
_SLICE = '{"ph":"X","cat":"%s","name":%%s,"pid":%%d,"tid":%%d,"ts":%%.3f,"dur":%%.3f,'
_HOST = _SLICE % "region" + '"args":{%s"region":%d,"host_dur_us":%.3f}}'
_HOST_FLOW = _SLICE % "region" + '"bind_id":%d,"flow_out":true,"args":{%s}}'
_DEV = _SLICE % "device" + '"bind_id":%d,"flow_in":true,"args":{%s}}'
_DEV_ARGS = '%s"region":%d,"host_dur_us":%.3f,"device_dur_us":%.3f,"launch_delay_us":%.3f'


def one_by_one(s: Session, doc: dict[str, Any]) -> bytes:
    """The X events as the old writer formatted them, on the lanes the new one chose."""
    host = {e["args"]["region"]: e for e in doc["traceEvents"] if e.get("cat") == "region"}
    dev = {e["args"]["region"]: e for e in doc["traceEvents"] if e.get("cat") == "device"}
    out = []
    for i, row in enumerate(s.regions.tolist()):
        name_ix, _, h0, h1, device, _, d0, d1 = row
        name = orjson.dumps(s.names[name_ix]).decode()
        u = orjson.dumps(s.args[i]).decode()[1:-1] + "," if i in s.args else ""
        tid = host[i]["tid"]
        if device >= 0:
            a = _DEV_ARGS % (u, i, (h1 - h0) / 1000, (d1 - d0) / 1000, (d0 - h0) / 1000)
            out.append(_HOST_FLOW % (name, s.pid, tid, h0 / 1000, (h1 - h0) / 1000, i + 1, a))
            d = dev[i]
            out.append(_DEV % (name, d["pid"], d["tid"], d0 / 1000, (d1 - d0) / 1000, i + 1, a))
        else:
            out.append(_HOST % (name, s.pid, tid, h0 / 1000, (h1 - h0) / 1000, u, i, (h1 - h0) / 1000))
    return ",".join(out).encode()


def assert_formatted_as_before(s: Session) -> None:
    raw = trace_bytes(s)
    doc = orjson.loads(raw)
    want = one_by_one(s, doc)
    at = raw.find(b'{"ph":"X"')
    assert raw[at : at + len(want)] == want
    assert raw[at + len(want) : at + len(want) + 1] in (b",", b"]")


def session_of(
    host: list[tuple[int, int]],
    dev: list[tuple[int, int] | None] | None = None,
    names: list[str] | None = None,
    name_of: list[int] | None = None,
    thread_of: list[int] | None = None,
    args: dict[int, dict[str, Any]] | None = None,
) -> Session:
    n = len(host)
    r = np.zeros(n, REGION_DTYPE)
    r["host_start"], r["host_end"] = np.array(host, np.int64).reshape(n, 2).T
    r["name"] = name_of or [0] * n
    r["thread"] = thread_of or [0] * n
    r["device"], r["stream"] = -1, -1
    for i, d in enumerate(dev or []):
        if d is not None:
            r[i]["device"], r[i]["stream"] = i % 2, i % 2
            r[i]["dev_start"], r[i]["dev_end"] = d
    return Session(
        regions=r,
        names=names or ["step"],
        threads=[Thread(7, "main"), Thread(1_234_567, "other"), Thread(42, "third")],
        devices=[DeviceInfo(0, "g0"), DeviceInfo(1, "g1")],
        streams=[Stream(0, "stream 0 (default)"), Stream(1, "stream 0 (default)")],
        args=args or {},
        pid=4242,
    )


EDGES = [0, 1, 9, 10, 999, 1000, 1001, 9999, 10_000, 123_456_789, 10**12 + 7, 4 * 10**15 - 1]


@pytest.mark.parametrize("block_bytes", [1 << 10, 1 << 13, chrome.BLOCK_BYTES])
def test_edge_values_in_blocks_of_changing_layout(block_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every digit count of times, durations, region ids, tids and names; negative times (the
    old writer wrote them as such); tiny blocks, so fields widen and narrow from block to block."""
    monkeypatch.setattr(chrome, "BLOCK_BYTES", block_bytes)
    host = [(t, t + d) for t in EDGES for d in EDGES[:8]]
    host += [(-1, 5), (-999, -1), (-1000, 0), (-1500, 2_000), (-(10**9), 10**9)]
    n = len(host)
    dev = [
        None if i % 3 == 0 else (h0 + 1 + i * 997, h0 + 1 + i * 997 + EDGES[i % 12])
        for i, (h0, _) in enumerate(host)
    ]
    names = ["a", 'q"uote\\', "ünïcode ✓", "x" * 300]
    args = {i: {"i": i, "s": "v" * (i % 40)} for i in range(0, n, 7)}
    s = session_of(host, dev, names, [i % 4 for i in range(n)], [i % 3 for i in range(n)], args)
    assert_formatted_as_before(s)
    # all host-only, all with a device slice, one long arg among many rows
    assert_formatted_as_before(session_of(host))
    assert_formatted_as_before(session_of(host, [(h0 + 5, h1 + 5) for h0, h1 in host]))
    assert_formatted_as_before(session_of(host, args={3: {"long": "y" * 5000}}))


@st.composite
def sessions(draw: st.DrawFn) -> Session:
    n = draw(st.integers(1, 200))
    times = st.one_of(st.integers(0, 10**15), st.sampled_from(EDGES))
    host = [(h0, h0 + draw(times)) for h0 in sorted(draw(st.lists(times, min_size=n, max_size=n)))]
    dev = [(h0 + 1 + draw(times), h0 + 1 + draw(times)) if draw(st.booleans()) else None for h0, _ in host]
    dev = [None if d is None else (d[0], max(d)) for d in dev]
    names = draw(st.lists(st.text(max_size=12), min_size=1, max_size=4, unique=True))
    values = st.integers(-(2**63), 2**63 - 1) | st.text(max_size=9)
    args = {
        i: draw(st.dictionaries(st.text(max_size=6), values, min_size=1, max_size=2))
        for i in range(n)
        if draw(st.integers(0, 9)) == 0
    }
    name_of = [draw(st.integers(0, len(names) - 1)) for _ in range(n)]
    thread_of = [draw(st.integers(0, 2)) for _ in range(n)]
    return session_of(host, dev, names, name_of, thread_of, args)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions(), st.sampled_from([1 << 9, 1 << 12, 1 << 21]))
def test_events_are_the_bytes_one_format_per_event_wrote(s: Session, block_bytes: int) -> None:
    old = chrome.BLOCK_BYTES
    chrome.BLOCK_BYTES = block_bytes
    try:
        assert_formatted_as_before(s)
    finally:
        chrome.BLOCK_BYTES = old


def stack_sublanes(start: list[int], end: list[int]) -> list[int]:
    """sublanes as it always worked, span by span with a stack per sub-lane."""
    stacks: list[list[int]] = []
    out = [0] * len(start)
    for i in sorted(range(len(start)), key=lambda i: (start[i], -end[i])):
        for lane, stack in enumerate(stacks):
            while stack and stack[-1] <= start[i]:
                stack.pop()
            if not stack or end[i] <= stack[-1]:
                stack.append(end[i])
                out[i] = lane
                break
        else:
            stacks.append([end[i]])
            out[i] = len(stacks) - 1
    return out


def nested_spans(rng: np.random.Generator, lo: int, hi: int, depth: int) -> list[tuple[int, int]]:
    """Spans that nest (or touch) and never cross, as with-blocks on one thread make them."""
    out: list[tuple[int, int]] = []
    t = lo
    while t < hi and depth and rng.random() < 0.8:
        a = int(rng.integers(t, hi + 1))
        b = int(rng.integers(a, hi + 1))
        out += [(a, b)] * int(rng.integers(1, 3)) + nested_spans(rng, a, b, depth - 1)
        t = b
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(-2, 12)), min_size=0, max_size=30), st.randoms())
def test_sublanes_as_span_by_span(spans: list[tuple[int, int]], random: Any) -> None:
    """The vectorised shortcuts (in order and flat; nested without crossing) give the lanes the
    stack gives, for any spans, and for spans that nest, in any order."""
    rng = np.random.default_rng(random.getrandbits(32))
    pairs = [(a, a + d) for a, d in spans]  # some of no length, some ending before they start
    nested = nested_spans(rng, 0, 40, 4)
    rng.shuffle(nested)
    in_order = sorted(pairs, key=lambda x: (x[0], -x[1])), sorted(nested, key=lambda x: (x[0], -x[1]))
    for case in (pairs, nested, *in_order):
        start, end = [a for a, _ in case], [b for _, b in case]
        got = lanes.sublanes(np.array(start, np.int64), np.array(end, np.int64)).tolist()
        assert got == stack_sublanes(start, end), case


def test_crc32_combine() -> None:
    rng = np.random.default_rng(1)
    for size_a, size_b in [(0, 0), (1, 0), (0, 1), (5, 3), (1 << 20, 12345), (7, (1 << 21) + 1)]:
        a, b = rng.bytes(size_a), rng.bytes(size_b)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@pytest.mark.parametrize("piece", [1, 1000, files.PIECE])
def test_gzip_pieces_make_one_gzip_file(piece: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "PIECE", piece)
    rng = np.random.default_rng(2)
    chunks = [rng.bytes(int(k)) + b"abc" * int(k) for k in rng.integers(0, 5000, 300)]
    text = b"".join(chunks)
    z = b"".join(gzip_stream(chunks))
    assert gzip.decompress(z) == text
    assert zlib.decompress(z, wbits=31) == text  # one member: zlib alone reads it, CRC and length checked
    assert z[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, no time
    assert b"".join(gzip_stream(chunks)) == z  # the same text, the same file
    assert gzip.decompress(b"".join(gzip_stream([]))) == b""


def test_gzip_workers_stop_with_a_failed_write(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "PIECE", 10)

    def chunks():
        for _ in range(50):
            yield b"x" * 100
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        for _ in gzip_stream(chunks()):
            pass
    assert not [t for t in threading.enumerate() if t.name.startswith("evtrace-gzip")]


def test_a_big_trace_imports_into_perfetto_without_errors(tmp_path: Path, perfetto: Query) -> None:
    """Many gzip pieces, host and device lanes, overlap lanes, args: Perfetto's own importer reads
    every slice and flow with no import error (where trace_processor is present)."""
    n = 20_000
    rng = np.random.default_rng(3)
    h0 = np.cumsum(rng.integers(1, 50_000, n))
    h1 = h0 + rng.integers(0, 120_000, n)  # some cross their neighbours: overlap lanes
    dev = [
        (a + 2_000, a + 2_000 + int(d)) if i % 2 else None
        for i, (a, d) in enumerate(zip(h0.tolist(), rng.integers(0, 9_000, n)))
    ]
    s = session_of(
        list(zip(h0.tolist(), h1.tolist())),
        dev,
        ["a", "b"],
        [i % 2 for i in range(n)],
        [i % 3 for i in range(n)],
        {5: {"k": 1}},
    )
    s.meta = {"evtrace": evtrace.__version__}
    path = s.save(tmp_path / "big.json.gz")
    assert evtrace.load(path) == s
    doc = orjson.loads(gzip.decompress(path.read_bytes()))
    assert problems(doc) == []
    rows = perfetto(
        path,
        f"select 'error', * from ({ERRORS}) union all select 'slices', '', count(*) from slice "
        "union all select 'flows', '', count(*) from flow",
    )
    xs = sum(1 for e in doc["traceEvents"] if e["ph"] == "X")
    flows = sum(1 for e in doc["traceEvents"] if e.get("flow_in"))
    assert rows == [["slices", "", str(xs)], ["flows", "", str(flows)]]
