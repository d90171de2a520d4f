"""Reading a trace back in bulk (``evtrace.formats.chrome_read``): the same Session as every event
parsed by orjson (the general path), for every kind of session; the same errors for damaged files;
events edited by hand read through orjson; and no Python object per event."""

from __future__ import annotations

import gzip
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import evtrace
from evtrace import Session, TraceError, files
from evtrace.device import DeviceInfo
from evtrace.export.merge import merge
from evtrace.formats import chrome_read
from evtrace.formats.chrome import read_slow as _read_slow
from evtrace.formats.chrome_read import _Reader
from evtrace.session import REGION_DTYPE, Stream, Thread

from .simdevice import FakeClock, SimBackend
from .test_session import EXAMPLE, differences, host_only, two_devices

SUFFIXES = [".json", ".json.gz"]


def fast(path: Path) -> tuple[Session, _Reader]:
    """The Session read by the fast path alone (raises _Fallback rather than fall back)."""
    r = _Reader(path)
    return r.read(), r


def same_both_ways(path: Path, want: Session | None = None) -> Session:
    """The fast path's Session equals the general path's (and ``want``)."""
    s, _ = fast(path)
    slow = _read_slow(path)
    assert differences(s, slow) == [] and s == slow
    assert want is None or (differences(s, want) == [] and s == want)
    return s


def text_of(path: Path) -> str:
    raw = path.read_bytes()
    return (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode()


def odd_session() -> Session:
    """Everything the columns can hold: negative and large times (days, to the ns), devices and
    streams, names with quotes, commas, escapes and non-ASCII, args of every JSON kind."""
    rng = np.random.default_rng(5)
    n = 3000
    r = np.zeros(n, REGION_DTYPE)
    r["name"] = rng.integers(0, 5, n)
    r["thread"] = rng.integers(0, 2, n)
    r["host_start"] = np.sort(rng.integers(-5_000, 9 * 86_400 * 10**9, n))
    r["host_end"] = r["host_start"] + rng.integers(0, 10**12, n)
    dev = rng.random(n) < 0.7
    r["device"] = np.where(dev, rng.integers(0, 2, n), -1)
    r["stream"] = np.where(dev, r["device"] * 2 + rng.integers(0, 2, n), -1)
    r["dev_start"] = np.where(dev, r["host_start"] + rng.integers(1, 10**6, n), 0)
    r["dev_end"] = np.where(dev, r["dev_start"] + rng.integers(0, 10**9, n), 0)
    names = ["step", 'say "hi", then go', "a\\b\tc", "ünï · 名前", "x" * 300]
    args = {
        int(i): {"i": int(i), "f": 0.5, "s": 'q"uo,te', "l": [1, {"k": "X"}], "n": None}
        for i in range(0, n, 7)
    }
    args[1] = {"region": "mine", "ok": True}  # a user key like evtrace's own is not read back
    return Session(
        regions=r,
        names=names,
        threads=[Thread(11, "MainThread"), Thread(12, "side")],
        devices=[DeviceInfo(0, "Sim GPU 0"), DeviceInfo(1, "Sim GPU 1")],
        streams=[
            Stream(0, "stream 0 (default)"),
            Stream(0, "stream 7"),
            Stream(1, "stream 0"),
            Stream(1, "s"),
        ],
        args=args,
        meta={"evtrace": evtrace.__version__, "regions": n},
        pid=11,
        wall_origin_ns=1_796_000_000_000_000_000,
    )


# ---- the same Session, through the fast path ----


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_every_session_kind_reads_back_equal_through_the_fast_path(tmp_path: Path, suffix: str) -> None:
    two, host = two_devices(tmp_path / "a.json"), host_only(tmp_path / "b.json")
    merged = merge([two, host, two_devices(tmp_path / "c.json", seed=3)], ["a", "b", "c"])
    odd = odd_session()
    odd.args.pop(1)  # (its "region" key is not read back: compared below)
    for k, s in enumerate([two, host, merged, odd]):
        path = s.save(tmp_path / f"s{k}{suffix}")
        back, reader = fast(path)
        assert differences(back, s) == [] and back == s
        assert all(ev.get("ph") == "M" for ev in reader.slow)  # every X and C event read in bulk
        assert back == _read_slow(path)


def test_a_user_arg_named_like_evtraces_own_is_dropped_as_before(tmp_path: Path) -> None:
    s = odd_session()
    back = same_both_ways(s.save(tmp_path / "odd.json"))
    assert back.args[1] == {"ok": True}


def test_blocks_cut_anywhere_read_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = odd_session()
    path = s.save(tmp_path / "odd.json.gz")
    for block, piece in ((4096, 512), (997, 61), (1 << 20, 1 << 20)):
        monkeypatch.setattr(chrome_read, "BLOCK", block)
        monkeypatch.setattr(chrome_read, "IN_PIECE", piece)
        back, _ = fast(path)
        s.args[1] = back.args[1]
        assert differences(back, s) == [] and back == s


def test_profiler_lanes_are_kept(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile

    out = tmp_path / "run.json.gz"
    with (
        profile(activities=[ProfilerActivity.CPU]) as prof,
        evtrace.record(out, device=False, quiet=True, profiler=prof),
    ):
        x = torch.randn(32, 32)
        for _ in range(3):
            with evtrace.region("mm"):
                x = x @ x / 32
    s = same_both_ways(out)
    assert s.profiler and s.profiler == _read_slow(out).profiler
    assert evtrace.load(s.save(tmp_path / "again.json")) == s


def test_the_example_in_docs_reads_the_same_both_ways() -> None:
    same_both_ways(EXAMPLE)


# ---- disturbed: events not of the writer's layout go through orjson ----


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_hand_edited_events_read_the_same_through_orjson(tmp_path: Path, suffix: str) -> None:
    s = two_devices(tmp_path / "two.json")
    text = text_of(s.save(tmp_path / "orig.json"))
    edits = [
        # keys reordered in a host slice
        (
            r'\{"ph":"X","cat":"region","name":"forward","pid":(\d+),',
            r'{"cat":"region","ph":"X","name":"forward","pid":\1,',
        ),
        # 12.500 written as 12.5, and spaces after a colon
        (r'"ts":(\d+)\.(\d)00,', r'"ts": \1.\2,'),
        # a name spelt with an escape
        (r'"name":"copy"', r'"name":"c\\u006fpy"'),
        # a counter with its keys reordered
        (
            r'\{"ph":"C","name":"host lead","pid":(\d+),"tid":1,',
            r'{"ph":"C","pid":\1,"name":"host lead","tid":1,',
        ),
    ]
    for pattern, repl in edits:
        text, count = re.subn(pattern, repl, text, count=3)
        assert count > 0, pattern
    path = tmp_path / f"edited{suffix}"
    path.write_bytes(gzip.compress(text.encode()) if suffix == ".gz" else text.encode())
    back, reader = fast(path)
    assert differences(back, s) == [] and back == s == _read_slow(path)
    assert sum(ev.get("ph") != "M" for ev in reader.slow) >= 9  # those went through orjson


def test_an_arg_holding_an_event_start_reads_the_same(tmp_path: Path) -> None:
    """``,{"ph":"`` inside a region's args cuts its event in two: the pieces are read together."""
    with evtrace.record(tmp_path / "t.json", device=False, quiet=True) as r:
        with evtrace.region("a", nested=[{"ph": "X", "cat": "region", "name": "fake", "pid": 1}]):
            pass
        with evtrace.region("b"):
            pass
    assert r.session is not None and r.path is not None
    same_both_ways(r.path, r.session)


# ---- damaged files: the same one-line TraceError ----


def damaged(tmp_path: Path) -> dict[str, Path]:
    s = two_devices(tmp_path / "two.json.gz")
    raw = (tmp_path / "two.json.gz").read_bytes()
    text = text_of(tmp_path / "two.json.gz")
    out = {}

    def put(name: str, data: bytes) -> None:
        out[name] = tmp_path / f"bad_{name}"  # (conftest checks the traces, but these)
        out[name].write_bytes(data)

    put("truncated.json.gz", raw[: len(raw) // 2])
    put("badcrc.json.gz", raw[:-8] + bytes(8))
    put("truncated.json", text[: len(text) // 2].encode())
    put("notjson.json", b"hello")
    put("other.json", b'{"traceEvents":[{"ph":"X","name":"k","pid":1,"tid":1,"ts":1,"dur":1}]}')
    put("version.json", text.replace('"evtrace.format":1', '"evtrace.format":99').encode())
    put("noregion.json", re.sub(r'"region":3,', "", text, count=1).encode())
    put(
        "badlane.json",
        re.sub(r'("cat":"region","name":"step","pid":\d+,"tid":)\d+', r"\g<1>424242", text, count=1).encode(),
    )
    put("twice.json", text.replace('"region":5,', '"region":4,').encode())
    put("garbage.json", text.replace('"dur":', '"dur":x', 1).encode())
    put("twomembers.json.gz", raw + raw)
    assert s.regions is not None
    return out


def test_damaged_files_give_the_same_trace_errors(tmp_path: Path) -> None:
    for name, path in damaged(tmp_path).items():
        with pytest.raises(TraceError) as slow:
            _read_slow(path)
        with pytest.raises(TraceError) as got:
            evtrace.load(path)
        assert str(got.value) == str(slow.value), name
        assert "\n" not in str(got.value)
    with pytest.raises(TraceError, match="cannot read"):
        evtrace.load(tmp_path / "missing.json")


# ---- in bulk: memory near the Session's, and a progress line ----


def big(path: Path, n: int) -> Session:
    clk = FakeClock()
    sim = SimBackend(clk)
    with evtrace.record(path, backend=sim, clock=clk, quiet=True) as r:
        for i in range(n // 2):
            with evtrace.region("step", i=i) if i % 100 == 0 else evtrace.region("step"):
                with evtrace.region("forward"):
                    sim.launch(10_000)
    assert r.session is not None
    return r.session


def test_memory_stays_near_the_sessions_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Python object per event: 200k device regions (70 MB of JSON) are read within a few
    times the Session's 9.2 MB (66 MB measured; every event a dict, as before: 2 GB). In blocks
    of 1 MB here, so that the text in flight (about 8 blocks) is small beside the columns."""
    s = big(tmp_path / "big.json.gz", 200_000)
    monkeypatch.setattr(chrome_read, "BLOCK", 1 << 20)
    monkeypatch.setattr(chrome_read, "IN_PIECE", 1 << 16)
    tracemalloc.start()
    try:
        back = evtrace.load(tmp_path / "big.json.gz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert back == s
    assert peak < 10 * s.regions.nbytes, peak / 1e6


def test_a_long_read_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "h.json.gz"
    host_only(path)
    monkeypatch.setattr(files, "PROGRESS_AFTER_S", 0.0)  # as if each block took over a second
    evtrace.load(path)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"evtrace: reading {path} (") and err[0].endswith("MB of JSON so far) ...")
    assert re.fullmatch(rf"evtrace: reading {re.escape(str(path))}: done, 7 regions in [\d.]+ s", err[-1])
    monkeypatch.setattr(files, "PROGRESS_AFTER_S", 60.0)
    evtrace.load(path)
    assert capsys.readouterr().err == ""
