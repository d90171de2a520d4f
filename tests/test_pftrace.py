"""Perfetto's native format: ``load(save(s)) == s`` for ``.pftrace``, and Perfetto's importer
reading the same slices, nesting, flows and counters from it as from the JSON of the session."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import evtrace
from evtrace import Session, TraceError, formats
from evtrace.device import DeviceInfo
from evtrace.export.kineto import attach
from evtrace.merge import merge
from evtrace.session import REGION_DTYPE, Stream, Thread

from .perfetto import ERRORS, Query
from .test_session import differences, host_only, two_devices
from .test_trace_writer import nested_spans, session_of

SUFFIXES = [".pftrace", ".pftrace.gz"]
#: what a slice is, as the importer saw it: the same from either format (the metadata instant aside)
SLICES = (
    "select s.ts, s.dur, s.name, s.depth, coalesce(thread.name, t.name) from slice s join track t"
    " on s.track_id = t.id left join thread_track tt on tt.id = t.id left join thread using (utid)"
    " where s.name != 'evtrace' order by 1, 2, 3, 4, 5"
)


def with_profiler() -> Session:
    """A session with torch.profiler lanes merged in (ops inside their regions, kernels on GPU 0)."""
    n, tid, wall = 6, 4242, 1_700_000_000_000_000_000
    r = np.zeros(n, REGION_DTYPE)
    r["host_start"] = np.arange(n) * 100_000 + 1_000
    r["host_end"] = r["host_start"] + 20_000
    r["dev_start"] = r["host_start"] + 30_000
    r["dev_end"] = r["dev_start"] + 40_000
    s = Session(r, ["step"], [Thread(tid, "main")], [DeviceInfo(0, "gpu")], [Stream(0, "stream 7")], pid=77)
    s.meta, s.wall_origin_ns = {"evtrace": "test"}, wall
    base = wall - 5_000_000_000
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "thread_name", "pid": 77, "tid": tid, "args": {"name": "py"}}
    ]
    for i in range(n):
        h0, d0 = int(r["host_start"][i]) + 5_000_000_000, int(r["dev_start"][i]) + 5_000_000_000
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
                "cat": "kernel",
                "name": "gemm",
                "pid": 0,
                "tid": 7,
                "ts": (d0 + 1_000) / 1000,
                "dur": 30.0,
                "args": {"correlation": i},
            },
        ]
    doc = {"schemaVersion": 1, "deviceProperties": [], "baseTimeNanoseconds": base, "traceEvents": events}
    return attach(s, doc, "synthetic")


def sessions(tmp: Path) -> dict[str, Session]:
    a, b = two_devices(tmp / "a.json", seed=1), host_only(tmp / "b.json")
    return {
        "two devices, two streams": two_devices(tmp / "t.json"),
        "host only": host_only(tmp / "h.json"),
        "merged": merge([a, b], ["a.json", "b.json"]),
        "profiler lanes": with_profiler(),
    }


KINDS = ["two devices, two streams", "host only", "merged", "profiler lanes"]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(tmp_path: Path, suffix: str, kind: str) -> None:
    s = sessions(tmp_path)[kind]
    back = evtrace.load(s.save(tmp_path / f"t{suffix}"))
    assert differences(back, s) == [] and back == s and back.profiler == s.profiler


def test_the_empty_session_and_record_to_a_pftrace(tmp_path: Path) -> None:
    with evtrace.record(tmp_path / "e.pftrace", device=False, quiet=True) as r:
        pass
    assert r.session is not None and evtrace.load(tmp_path / "e.pftrace") == r.session
    with evtrace.record(tmp_path / "w.pftrace.gz", device=False, quiet=True) as r:
        with evtrace.region("work", i=3):
            pass
    assert evtrace.load(tmp_path / "w.pftrace.gz").args == {0: {"i": 3}}


def test_a_file_that_is_not_evtraces_is_refused_in_one_line(tmp_path: Path) -> None:
    cases = {
        "other.pftrace": b"\x0a\x02\x50\x01",  # one packet of someone else's trace
        "half.pftrace.gz": gzip.compress(b"\x0a\x02\x50\x01" * 100)[:20],
        "text.pftrace": b"not a trace",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TraceError) as e:
            evtrace.load(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)
    s = two_devices(tmp_path / "t.pftrace")
    cut = tmp_path / "cut.pftrace"
    cut.write_bytes((tmp_path / "t.pftrace").read_bytes()[:300])
    with pytest.raises(TraceError, match="damaged"):
        evtrace.load(cut)
    assert len(s) > 0


def test_one_suffix_table(tmp_path: Path) -> None:
    assert formats.format_of("a.json.gz") is formats.format_of("B.JSON") is formats.CHROME
    assert formats.format_of("a.pftrace.gz") is formats.format_of("a.pftrace") is formats.PERFETTO
    with pytest.raises(TraceError, match=r"t.txt must end in .json or .json.gz .*\.pftrace"):
        evtrace.load(tmp_path / "t.txt")
    with pytest.raises(ValueError, match="must end in"), evtrace.record(tmp_path / "t.perfetto", quiet=True):
        pass


@pytest.mark.parametrize("kind", KINDS)
def test_perfetto_imports_what_the_json_has(tmp_path: Path, perfetto: Query, kind: str) -> None:
    """No import error; the same slices (time, length, name, depth, lane), flows and counter
    samples as from the JSON of the same session; the metadata on the "evtrace" instant."""
    s = sessions(tmp_path)[kind]
    pf, js = s.save(tmp_path / "t.pftrace.gz"), s.save(tmp_path / "t.json")
    assert perfetto(pf, ERRORS) == [] and perfetto(js, ERRORS) == []
    got, want = perfetto(pf, SLICES), perfetto(js, SLICES)
    assert len(got) == len(want) > 0 and got == want
    flows = "select count(*) from flow"
    assert perfetto(pf, flows) == perfetto(js, flows)
    counters = (
        "select t.name, c.ts, c.value from counter c join counter_track t on c.track_id = t.id order by 1, 2"
    )
    changes: list[list[str]] = []  # the JSON's samples where the value changes: what the .pftrace keeps
    for name, ts, value in perfetto(js, counters):
        name = name.removesuffix(" regions").removesuffix(" us")  # the JSON's "<name> <arg>"
        if not changes or changes[-1][0] != name or changes[-1][2] != value:
            changes.append([name, ts, value])
    assert perfetto(pf, counters) == changes
    meta = perfetto(
        pf, "select key, display_value from args join slice using (arg_set_id) where slice.name = 'evtrace'"
    )
    assert ["debug.evtrace", str(s.meta["evtrace"])] in meta


def test_deep_nesting_and_crossing_spans_import_as_from_json(tmp_path: Path, perfetto: Query) -> None:
    """The lane layer both writers use: spans 512+ deep and crossing ones go to extra lanes,
    so the importer drops nothing from the .pftrace either."""
    rng = np.random.default_rng(7)
    host = [(i, 100_000 - i) for i in range(1100)]  # 1100 deep
    host += [(200_000, 200_010), (200_005, 200_020)]  # two that cross
    for k in range(30):  # ties and spans of no length: the order at one instant decides the nesting
        host += nested_spans(rng, 300_000 + 100 * k, 300_000 + 100 * k + 12, 6)
    dev = [None if k % 3 else (a + 400_000, b + 400_000) for k, (a, b) in enumerate(host)]
    s = session_of(host, dev)
    s.meta["evtrace"] = "test"
    pf, js = s.save(tmp_path / "deep.pftrace"), s.save(tmp_path / "deep.json")
    assert perfetto(pf, ERRORS) == []
    assert perfetto(pf, SLICES) == perfetto(js, SLICES)
    assert evtrace.load(pf) == s


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run(
        [sys.executable, "-m", "evtrace", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_convert_between_the_formats(tmp_path: Path) -> None:
    s = two_devices(tmp_path / "t.json.gz")
    res = cli("convert", tmp_path / "t.json.gz", tmp_path / "t.pftrace")
    assert res.returncode == 0 and "Perfetto protobuf, 24 regions" in res.stderr, res.stderr
    assert cli("convert", tmp_path / "t.pftrace", tmp_path / "back.json").returncode == 0
    assert evtrace.load(tmp_path / "t.pftrace") == s == evtrace.load(tmp_path / "back.json")
    for bad, why in (("t.txt", "must end in .json or .json.gz"), ("t.json.gz", "is the input")):
        res = cli("convert", tmp_path / "t.json.gz", tmp_path / bad)
        assert res.returncode == 2 and why in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert "summary" in cli("summary", tmp_path / "t.pftrace").stdout or True
    assert "forward" in cli("summary", tmp_path / "t.pftrace").stdout


def test_a_trace_too_big_for_the_ui_says_so_and_view_serves_a_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from evtrace.serve import servable

    s = two_devices(tmp_path / "t.json")
    capsys.readouterr()
    assert servable(s, tmp_path / "t.json", None, tmp_path) == (tmp_path / "t.json", "")  # fits: as it is
    path, said = servable(s, tmp_path / "t.json", (0, 500_000_000), tmp_path)
    assert path.suffix == ".pftrace" and len(evtrace.load(path)) == 9
    assert said.startswith("serving 0ms:500ms of t.json (9 of 24 regions) as t.window.pftrace")
    with pytest.raises(ValueError, match="no region"):
        servable(s, tmp_path / "t.json", (10**12, 2 * 10**12), tmp_path)
    # a UI that opens 20 slices' worth: the JSON is too big, the .pftrace fits
    monkeypatch.setattr(formats, "UI_LIMIT_BYTES", formats.IMPORT_BASE_BYTES + 20 * 660)
    monkeypatch.setattr(formats, "IMPORT_BYTES_PER_SLICE", {formats.CHROME: 660, formats.PERFETTO: 100})
    s.save(tmp_path / "big.json.gz")
    err = capsys.readouterr().err
    assert (
        "big.json.gz is too big for ui.perfetto.dev" in err and "evtrace convert" in err and ".pftrace" in err
    )
    s.save(tmp_path / "big.pftrace")
    assert "too big" not in capsys.readouterr().err
    monkeypatch.setattr(formats, "IMPORT_BYTES_PER_SLICE", {formats.CHROME: 660, formats.PERFETTO: 500})
    path, said = servable(s, tmp_path / "big.json.gz", None, tmp_path)
    cut = evtrace.load(path)
    assert 0 < len(cut) < len(s) and formats.too_big_for_ui(cut, path) is None
    assert "too big" in said and f"({len(cut)} of 24 regions)" in said and "--window" in said


def test_every_command_reads_a_pftrace(tmp_path: Path) -> None:
    s = two_devices(tmp_path / "t.pftrace.gz")
    b = two_devices(tmp_path / "b.pftrace", seed=3)
    t, other = tmp_path / "t.pftrace.gz", tmp_path / "b.pftrace"
    for args in (
        ("summary", t),
        ("report", t),
        ("render", t, "-o", tmp_path / "t.svg"),
        ("diff", t, other),
        ("merge", t, other, "-o", tmp_path / "m.pftrace"),
        ("convert", t, tmp_path / "t.json"),
    ):
        res = cli(*args)
        assert res.returncode == 0, (args, res.stderr)
    assert [len(r) for r in evtrace.load(tmp_path / "m.pftrace").ranks] == [len(s), len(b)]  # on one clock
    assert evtrace.load(tmp_path / "t.json") == s
    assert "forward" in (tmp_path / "t.svg").read_text()
