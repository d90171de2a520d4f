"""Reading a trace back in bulk (``evtrace.formats.chrome_read``): the same Session as every event
parsed by orjson (the general path), for every kind of session; the same errors for damaged files;
events edited by hand read through orjson; and no Python object per event."""

from __future__ import annotations

import gzip
import re
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import evtrace
from evtrace import Session, TraceError, files
from evtrace.device import DeviceInfo
from evtrace.formats import chrome_read
from evtrace.formats.chrome import read_slow as _read_slow
from evtrace.formats.chrome_read import _Reader
from evtrace.merge import merge
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
    put("version.json", text.replace('"evtrace.format":2', '"evtrace.format":99').encode())
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


# ---- the C scanner (evtrace/_scan.c), and the numpy path a build without it takes ----


@pytest.fixture(autouse=True, params=["scanner", "numpy"])
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here reads through the C scanner, and again through the numpy path (but those
    marked SCANNER, which call the scanner itself)."""
    if request.param == "numpy":
        monkeypatch.setattr(chrome_read, "_scan", None)
    elif chrome_read._scan is None:
        pytest.fail("evtrace._scan is not built: setup.py build_ext --inplace")
    return str(request.param)


SCANNER = pytest.mark.parametrize("read_path", ["scanner"])
HOST = (
    b'{"ph":"X","cat":"region","name":%s,"pid":%s,"tid":%s,"ts":%s,"dur":%s,'
    b'"args":{%s"region":%s,"host_dur_us":%s}}'
)
DEVICE_ARGS = b',"device_dur_us":1.000,"launch_delay_us":-2.500}}'


def scanned(*events: bytes) -> dict[str, np.ndarray]:
    """The scanner's columns for a block holding ``events`` (as the reader hands it one)."""
    from evtrace._scan import scan

    pad = bytes(chrome_read.PAD)
    data = pad + b"[" + b",".join(events) + b"]" + pad
    pieces, host, dev, pids, names = (
        np.frombuffer(x, np.int64) for x in scan(data, len(pad), len(data) - len(pad) - 1)
    )
    spans = names.reshape(-1, 2)
    return {
        "kind": pieces.reshape(-1, 2)[:, 1],
        "host": host.reshape(-1, 9),
        "device": dev.reshape(-1, 9),
        "pids": pids,
        "names": np.array([data[s : s + n] for s, n in spans.tolist()], object),
        "data": np.frombuffer(data, np.uint8),
    }


def host_event(
    name: bytes = b'"n"', ts: bytes = b"1.000", dur: bytes = b"2.000", pid: bytes = b"7", args: bytes = b""
) -> bytes:
    return HOST % (name, pid, b"3", ts, dur, args, b"5", dur)


@SCANNER
def test_scanner_reads_times_of_every_digit_count_exactly() -> None:
    """µs with three decimals, 1 to 15 digits before the point, either sign: integer ns, with no
    float rounding (15 digits is 999999999999999.999 µs, near 32 years: a float would round it)."""
    rng = np.random.default_rng(7)
    texts, want = [], []
    for n in range(1, 16):
        for whole in {10 ** (n - 1) if n > 1 else 0, 10**n - 1, int(rng.integers(10 ** (n - 1), 10**n))}:
            for sign in (1, -1):
                frac = 999 if whole == 10**n - 1 else int(rng.integers(0, 1000))
                texts.append(b"%s%d.%03d" % (b"-" if sign < 0 else b"", whole, frac))
                want.append(sign * (whole * 1000 + frac))
    got = scanned(*(host_event(ts=t, dur=t, pid=t.split(b".")[0]) for t in texts))
    assert (got["kind"] == 1).all()
    h = got["host"]
    assert h[:, 4].tolist() == want and h[:, 5].tolist() == want
    assert h[:, 2].tolist() == [int(t.split(b".")[0]) for t in texts]  # pid: an int of as many digits
    assert max(want) == 999_999_999_999_999_999


@SCANNER
@pytest.mark.parametrize(
    "ts",
    [
        b"1234567890123456.000",
        b"01.000",
        b"-01.000",
        b"1.5",
        b"1.50",
        b"1.5000",
        b"1",
        b"1e3",
        b"+1.000",
        b".500",
        b"1.",
        b"--1.000",
        b"1.00a",
        b" 1.000",
        b"1 .000",
        b"-",
        b"-.000",
        b"0x1.000",
        b"1.000 ",
    ],
)
def test_scanner_leaves_numbers_off_the_writers_form_to_orjson(ts: bytes) -> None:
    got = scanned(host_event(), host_event(ts=ts), host_event(dur=ts))
    assert got["kind"].tolist() == [1, 0, 0]
    assert len(got["host"]) == 1


@SCANNER
@pytest.mark.parametrize(
    "pid", [b"01", b"-01", b"1.000", b"1234567890123456", b"", b"-", b"+1", b"1e3", b"1 "]
)
def test_scanner_leaves_ints_off_the_writers_form_to_orjson(pid: bytes) -> None:
    got = scanned(host_event(pid=b"-123456789012345"), host_event(pid=pid))
    assert got["kind"].tolist() == [1, 0] and got["host"][0, 2] == -123456789012345


@SCANNER
def test_scanner_reads_every_layout_the_writer_writes() -> None:
    plain = host_event(b'"step"')
    args = host_event(b'"say \\"hi\\", then, go"', args=b'"s":"}},\\"region\\":1,","l":[1,{"k":2}],')
    with_dev = HOST.replace(b',"args"', b',"bind_id":9,"flow_out":true,"args"').replace(b"}}", DEVICE_ARGS)
    with_dev %= (b'"a\\\\"', b"7", b"3", b"-0.001", b"0.000", b"", b"6", b"0.000")
    device = with_dev.replace(b'"cat":"region"', b'"cat":"device"').replace(b"flow_out", b"flow_in")
    flight = b'{"ph":"C","name":"regions in flight","pid":101,"tid":1,"ts":5.000,"args":{"regions":2}}'
    lead = b'{"ph":"C","name":"host lead","pid":102,"tid":1,"ts":-5.000,"args":{"us":12.345}}'
    meta = b'{"ph":"M","name":"thread_name","pid":7,"tid":3,"args":{"name":"main"}}'
    got = scanned(meta, plain, args, with_dev, device, flight, lead, plain)
    assert got["kind"].tolist() == [0, 1, 1, 1, 2, 3, 3, 1]
    h, d = got["host"], got["device"]
    assert got["names"].tolist() == [b'"step"', b'"say \\"hi\\", then, go"', b'"a\\\\"']
    assert h[:, 1].tolist() == [0, 1, 2, 0]  # each name's index, the same for the same text
    assert h[:, 6].tolist() == [1, 2, 3, 7] and d[:, 6].tolist() == [4]  # their pieces
    assert h[:, 0].tolist() == [5, 5, 6, 5] and d[:, 0].tolist() == [6]
    assert (h[2, 4], h[2, 5], d[0, 4]) == (-1, 0, -1)
    assert d[0, 1] == 2  # a device slice's name: in the same table
    a = got["data"]
    s, e = h[1, 7:9]
    assert a[s:e].tobytes() == b'"s":"}},\\"region\\":1,","l":[1,{"k":2}]'  # up to the comma before "region"
    assert (h[[0, 2, 3], 7] == -1).all() and d[0, 7] == -1
    assert got["pids"].tolist() == [101, 102]


@SCANNER
@pytest.mark.parametrize(
    "edit",
    [
        lambda e: e[:-1],  # "}" missing
        lambda e: e + b" ",  # a byte after "}}"
        lambda e: e.replace(b'"name":"n"', b'"name":"n'),  # a name with no end
        lambda e: e.replace(b'"name":"n"', b'"name":n'),  # not a string
        lambda e: e.replace(b'"pid"', b'"pid" '),
        lambda e: e.replace(b'"region":5', b'"region":5,'),
        lambda e: e.replace(b'{"region"', b'{,"region"'),  # empty user args
        lambda e: e.replace(b'"cat":"region"', b'"cat":"regions"'),
        lambda e: e.replace(b',"args"', b',"bind_id":1,"flow_out":true,"args"'),  # no device args
    ],
)
def test_scanner_leaves_damaged_events_to_orjson(edit: Any) -> None:
    got = scanned(host_event(), edit(host_event()), host_event())
    assert got["kind"].tolist() == [1, 0, 1]


def test_random_damage_reads_as_the_general_path_reads(tmp_path: Path) -> None:
    """Bytes changed, dropped or added anywhere in a trace: the fast read gives what the general
    path gives (the same Session, or the same TraceError), whichever part read each event."""
    rng = np.random.default_rng(11)
    s = odd_session()
    s.regions = s.regions[:200]
    s.args = {k: v for k, v in s.args.items() if k < 200}
    text = s.save(tmp_path / "odd.json").read_bytes()
    body = text.index(b'{"ph":"X"')  # damage among the X and C events (the M events: orjson's anyway)
    alphabet = np.frombuffer(b'0123456789.,-:"{}[]\\ XCMa', np.uint8)
    path = tmp_path / "bad_damaged.json"  # (conftest checks the traces, but these)
    for trial in range(150):
        t = bytearray(text)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(body, len(t) - 200))
            what = int(rng.integers(0, 3))
            if what == 0:
                t[at] = int(rng.choice(alphabet))
            elif what == 1:
                del t[at]
            else:
                t.insert(at, int(rng.choice(alphabet)))
        path.write_bytes(bytes(t))
        try:
            want: Session | str = _read_slow(path)
        except TraceError as e:
            want = str(e)
        try:
            got: Session | str = chrome_read.read(path)
        except TraceError as e:
            got = str(e)
        if isinstance(want, Session) and isinstance(got, Session):
            assert differences(got, want) == [] and got == want, trial
        else:
            assert got == want, trial


def test_users_args_read_together_are_each_what_it_reads_alone(tmp_path: Path) -> None:
    """Many regions' args are read by one orjson call: texts that only parse when joined (a quote
    that the next text closes, a text that closes its object and opens another) are caught, and
    read alone as before."""
    texts = [
        b'"i":1,"f":0.5,"s":"q\\"uo,te","l":[1,{"k":"X"}],"n":null',
        b'"a":"',
        b'"',
        b'"b":1},{"c":2',
        b'"region":"mine","ok":true',  # evtrace's own key: dropped
        b'"f":1e5,"g":1.0',  # not as orjson writes it: read alone, the same
        b'"d":1,"d":2',
        b'"big":123456789012345678901234567890',
        b"",
        b'"x":1',
    ]
    data = b"".join(texts)
    ends = np.cumsum([len(t) for t in texts]).tolist()
    starts = [0, *ends[:-1]]
    r = _Reader(tmp_path / "none.json")
    want = [r._user(data, s, e) for s, e in zip(starts, ends)]
    assert r._users(data, starts, ends) == want
    assert want[1:4] == [None, None, None] and want[4] == {"ok": True} and want[-1] == {"x": 1}
    good = [0, 4, 5, 6, 9]  # the ones that parse: read together in one call, then checked
    assert r._users(data, [starts[i] for i in good], [ends[i] for i in good]) == [want[i] for i in good]
