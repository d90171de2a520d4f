"""A Session round-trips through its file: ``load(save(s)) == s``, metadata typed both ways."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import orjson
import pytest

import evtrace
from evtrace import Session, TraceError
from evtrace.align import alignment_warnings, per_gpu
from evtrace.files import read_json
from evtrace.formats import chrome
from evtrace.merge import merge
from evtrace.metadata import DeviceAlignment

from .simdevice import FakeClock, SimBackend

SUFFIXES = [".json", ".json.gz"]
EXAMPLE = Path(__file__).parent.parent / "docs" / "example-two_models-h100.json.gz"


def two_devices(path: Path, seed: int = 0) -> Session:
    """Two GPUs with two streams each, nested regions, user args, a second thread."""
    clk = FakeClock(seed=seed)
    sim = SimBackend(clk, ndev=2, drift_ppm=20.0)
    with evtrace.record(path, backend=sim, clock=clk, quiet=True) as r:
        for i in range(8):
            sim.device = i % 2
            with evtrace.region("step", i=i, tag=f"s{i}"):
                sim.stream = 0
                with evtrace.region("forward"):
                    sim.launch(40_000)
                sim.stream = 7
                with evtrace.region("copy", nbytes=1 << 20):
                    sim.launch(10_000)
                sim.stream = 0
            clk.advance(200_000_000)
    assert r.session is not None
    return r.session


def host_only(path: Path) -> Session:
    def work() -> None:
        with evtrace.region("worker", ok=True):
            pass

    with evtrace.record(path, device=False, quiet=True) as r:
        for i in range(3):
            with evtrace.region("outer", i=i):
                with evtrace.region("inner"):
                    pass
        t = threading.Thread(target=work, name="side")
        t.start()
        t.join()
    assert r.session is not None
    return r.session


def differences(a: Session, b: Session) -> list[str]:
    """Which fields differ, for a readable failure (``==`` says only whether)."""
    out = [
        f
        for f in ("names", "threads", "devices", "streams", "args", "meta", "pid", "wall_origin_ns")
        if getattr(a, f) != getattr(b, f)
    ]
    if a.regions.dtype != b.regions.dtype or not np.array_equal(a.regions, b.regions):
        out.append("regions")
    if len(a.ranks) != len(b.ranks) or any(x != y for x, y in zip(a.ranks, b.ranks)):
        out.append("ranks")
    return out


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_two_devices_two_streams_round_trip(tmp_path: Path, suffix: str) -> None:
    s = two_devices(tmp_path / f"two{suffix}")
    assert len(s.devices) == 2 and {st.device for st in s.streams} == {0, 1} and len(s.streams) == 4
    back = evtrace.load(s.save(tmp_path / f"again{suffix}"))
    assert differences(back, s) == [] and back == s
    assert evtrace.load(tmp_path / f"two{suffix}") == s  # as record() wrote it


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_host_only_round_trip(tmp_path: Path, suffix: str) -> None:
    s = host_only(tmp_path / f"h{suffix}")
    assert len(s.threads) == 2 and s.device_spans == 0
    back = evtrace.load(s.save(tmp_path / f"again{suffix}"))
    assert differences(back, s) == [] and back == s


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_merged_round_trip(tmp_path: Path, suffix: str) -> None:
    a, b = two_devices(tmp_path / "a.json", seed=1), host_only(tmp_path / "b.json")
    m = merge([a, b], ["a.json", "b.json"])
    assert len(m.ranks) == 2
    back = evtrace.load(m.save(tmp_path / f"m{suffix}"))
    assert differences(back, m) == [] and back == m
    again = merge([back, two_devices(tmp_path / "c.json", seed=2)])  # a merged input gives its ranks
    assert len(again.ranks) == 3
    assert evtrace.load(again.save(tmp_path / f"m2{suffix}")) == again


def test_the_alignment_metadata_is_typed_live_and_loaded(tmp_path: Path) -> None:
    s = two_devices(tmp_path / "t.json")
    live = s.meta["alignment"]
    assert set(live) == {"0", "1"} and all(isinstance(a, DeviceAlignment) for a in live.values())
    a = live["0"]
    assert isinstance(a.anchors, int) and isinstance(a.drift_ppm, float) and a["drift_ppm"] == a.drift_ppm
    back = evtrace.load(tmp_path / "t.json")
    assert back.meta["alignment"] == live and per_gpu(back.meta) == per_gpu(s.meta) == live
    assert alignment_warnings(back.meta) == alignment_warnings(s.meta)
    flat = read_json(tmp_path / "t.json")["metadata"]  # Perfetto still shows the flat keys
    assert flat["alignment.0.drift_ppm"] == f"{a.drift_ppm:.6g}" and "alignment" not in flat


def test_the_readmes_h100_example_loads_typed() -> None:
    s = evtrace.load(EXAMPLE)
    gpus = per_gpu(s.meta)
    assert gpus and all(isinstance(g, DeviceAlignment) for g in gpus.values())
    assert all(g.anchors > 0 and g.stamps > 0 and isinstance(g.drift_ppm, float) for g in gpus.values())
    assert not any(k.startswith("alignment.") for k in s.meta)
    assert len(s) > 0 and s.device_spans > 0


def test_a_pre_release_trace_says_it_cannot_be_read(tmp_path: Path) -> None:
    """Traces from before evtrace kept its metadata whole (only the flat keys Perfetto shows) are
    refused in one line, by both readers, not read with their metadata missing."""
    path = two_devices(tmp_path / "t.json").save(tmp_path / "t.json")
    doc = read_json(path)
    del doc["metadata"]["evtrace.meta"]
    old = tmp_path / "pre.json"
    old.write_bytes(orjson.dumps(doc))
    merged = tmp_path / "merged.json"  # merged by a pre-release evtrace: a version, no format
    merged.write_bytes(
        orjson.dumps({"traceEvents": [], "metadata": {"evtrace": "0.1.0", "evtrace.merged": 2}})
    )
    for read in (evtrace.load, chrome.read_slow):
        for path in (old, merged):
            with pytest.raises(
                TraceError, match=rf"{path.name} was written by a pre-release evtrace, which this"
            ):
                read(path)


def test_equality_compares_the_regions_as_arrays(tmp_path: Path) -> None:
    s = host_only(tmp_path / "h.json")
    other = evtrace.load(tmp_path / "h.json")
    other.regions = other.regions.copy()
    other.regions["host_end"][0] += 1
    assert other != s and differences(other, s) == ["regions"]
    assert s != "not a session"


def test_trace_error_is_public(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(orjson.dumps({"traceEvents": []}))
    with pytest.raises(TraceError, match="not an evtrace trace"):
        evtrace.load(bad)
    assert "TraceError" in evtrace.__all__


@pytest.mark.parametrize("name", ["format1.json", "format1.pftrace"])
def test_a_format_1_trace_loads_its_slack_under_the_new_names(tmp_path: Path, name: str) -> None:
    """Format 1 called the alignment's one-sided slack ``bound_us_*``; written by the evtrace of
    that format (tests/golden: 3509a23's JSON, e76e57d's .pftrace), such a trace loads with the
    figures under their new names, and is written again as format 2."""
    old = Path(__file__).parent / "golden" / name
    s = evtrace.load(old)
    g = per_gpu(s.meta)["0"]
    assert (g.slack_us_p99, g.slack_us_max) == (0.132, 0.136)
    assert g["bound_us_p99"] == g["slack_us_p99"] == 0.132  # the former key still answers
    assert len(s) == 6 and s.device_spans == 6 and not alignment_warnings(s.meta)
    if old.suffix == ".json":  # the general reader too, not only the bulk one
        assert chrome.read_slow(old) == s
    again = evtrace.load(s.save(tmp_path / ("new" + old.suffix)))
    assert again == s and per_gpu(again.meta)["0"] == g
    doc = read_json(s.save(tmp_path / "new.json"))
    assert doc["metadata"]["evtrace.format"] == 2
    assert doc["metadata"]["alignment.0.slack_us_p99"] == "0.132"
    assert not any("bound_us" in k for k in doc["metadata"])
