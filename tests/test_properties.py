"""Property tests: whatever the names, args and times, the exporter writes valid, strict JSON
that reads back to the same session."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evtrace
from evtrace.device import DeviceInfo
from evtrace.files import read_json as load_json
from evtrace.session import REGION_DTYPE, Session, Stream, Thread

from .checker import problems

names = st.text(min_size=0, max_size=30)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda v: st.one_of(st.lists(v, max_size=3), st.dictionaries(st.text(max_size=5), v, max_size=3)),
    max_leaves=6,
)


def refuse(constant: str) -> None:
    raise AssertionError(f"{constant} in the trace")


@st.composite
def sessions(draw: st.DrawFn) -> Session:
    n = draw(st.integers(0, 25))
    name_list = draw(st.lists(names, min_size=1, max_size=5, unique=True))
    r = np.zeros(n, REGION_DTYPE)
    for i in range(n):
        h0 = draw(st.integers(0, 10**12))
        r[i]["name"] = draw(st.integers(0, len(name_list) - 1))
        r[i]["thread"] = draw(st.integers(0, 1))
        r[i]["host_start"], r[i]["host_end"] = h0, h0 + draw(st.integers(0, 10**9))
        if draw(st.booleans()):
            d0 = h0 + draw(st.integers(1, 10**9))
            r[i]["device"], r[i]["stream"] = 0, draw(st.integers(0, 1))
            r[i]["dev_start"], r[i]["dev_end"] = d0, d0 + draw(st.integers(0, 10**9))
        else:
            r[i]["device"], r[i]["stream"] = -1, -1
    args = {
        i: draw(st.dictionaries(st.text(max_size=8), values, max_size=3))
        for i in range(n)
        if draw(st.booleans())
    }
    return Session(
        regions=r,
        names=name_list,
        threads=[Thread(101, draw(names)), Thread(102, "t2")],
        devices=[DeviceInfo(0, draw(names))],
        streams=[Stream(0, "stream 0 (default)"), Stream(0, draw(names))],
        args={i: a for i, a in args.items() if a},
        meta={"evtrace": evtrace.__version__, "argv": draw(st.lists(names, max_size=3)), "x": draw(values)},
        pid=4242,
        wall_origin_ns=draw(st.integers(0, 2**62)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions())
def test_export_is_strict_json_and_reads_back(s: Session) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "p.json"
        s.save(p)
        raw = p.read_bytes()
        json.loads(raw, parse_constant=refuse)  # strict JSON: no NaN or Infinity anywhere
        orjson.loads(raw)
        assert problems(load_json(p)) == []
        back = evtrace.load(p)
    assert len(back) == len(s)
    for f in ("host_start", "host_end", "dev_start", "dev_end", "device", "stream", "thread"):
        got, want = back.regions[f], s.regions[f]
        if f.startswith("dev_"):
            got, want = got[s.regions["device"] >= 0], want[s.regions["device"] >= 0]
        assert np.array_equal(got, want), f
    assert [back.names[i] for i in back.regions["name"]] == [
        s.names[i].encode("utf-8", "replace").decode() for i in s.regions["name"]
    ]
    assert set(back.args) == set(s.args)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_the_reader_refuses_junk_with_a_trace_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "junk.json"
        p.write_bytes(data)
        try:
            evtrace.load(p)
        except evtrace.TraceError:
            pass
