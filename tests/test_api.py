"""The public surface: record and region in all their forms."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import re
import threading
from pathlib import Path

import pytest

import evtrace
from evtrace import recorder

from .simdevice import FakeClock, SimBackend


def test_the_version_and_the_typing_marker() -> None:  # the names themselves: tests/test_public_api.py
    assert re.fullmatch(r"\d+\.\d+\.\d+", evtrace.__version__)
    assert (Path(evtrace.__file__).parent / "py.typed").exists()


def test_region_is_a_no_op_without_a_session() -> None:
    assert recorder.current is None

    @evtrace.region
    def f(x: int) -> int:
        return x + 1

    with evtrace.region("idle"):
        assert f(1) == 2


def test_three_forms_of_region_and_nesting(tmp_path: Path) -> None:
    @evtrace.region
    def bare() -> str:
        return "bare"

    @evtrace.region("named", k=1)
    def named() -> str:
        return "named"

    @evtrace.region()
    async def coro() -> int:
        await asyncio.sleep(0)
        return 3

    with evtrace.record(tmp_path / "a.json", device=False, quiet=True) as r:
        with evtrace.region("outer"):
            assert bare() == "bare"
            assert named() == "named"
            assert asyncio.run(coro()) == 3
    s = r.session
    assert s is not None
    got = sorted(s.names)
    assert got == sorted(
        [
            "outer",
            "named",
            "test_three_forms_of_region_and_nesting.<locals>.bare",
            "test_three_forms_of_region_and_nesting.<locals>.coro",
        ]
    )
    outer = s.regions[s.regions["name"] == s.names.index("outer")][0]
    inner = s.regions[s.regions["name"] != s.names.index("outer")]
    assert (inner["host_start"] >= outer["host_start"]).all() and (
        inner["host_end"] <= outer["host_end"]
    ).all()
    assert s.args[int((s.regions["name"] == s.names.index("named")).nonzero()[0][0])] == {"k": 1}


def test_region_misuse_gives_a_hint() -> None:
    with pytest.raises(TypeError, match=r"takes a name \(str\) or a function"):
        evtrace.region(42)  # type: ignore[call-overload]


def test_record_as_decorator_and_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d.json.gz"

    @evtrace.record(out, device=False)
    def job() -> int:
        with evtrace.region("work"):
            return 5

    assert job() == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"evtrace: wrote {out} (1 region, 0 device spans)")
    assert "ui.perfetto.dev" in err[-1] and "evtrace summary" in err[-1]
    assert evtrace.load(out).names == ["work"]


def test_each_option_of_record_reaches_the_session_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """record()'s parameters are its options once: each but the path and the profiler is an
    Options field (mypy checks that record passes every field on), and a decorated function's
    session records with them."""
    from evtrace.api import Options

    given = set(inspect.signature(evtrace.record).parameters) - {"path", "profiler"}
    assert given == {f.name for f in dataclasses.fields(Options)}
    out = tmp_path / "o.json"

    clk = FakeClock(step=10**6)  # 1 ms a read: no real clock times an empty region so
    sim = SimBackend(clk)

    @evtrace.record(out, backend=sim, clock=clk, redact_argv=True, quiet=True)
    def job() -> None:
        for i in range(3):
            with evtrace.region("r", i=i):
                sim.launch(40_000)

    job()
    s = evtrace.load(out)
    assert len(s) == s.device_spans == 3  # on the backend given
    host = s.regions["host_end"] - s.regions["host_start"]
    assert (host >= 10**6).all()  # on the clock given, not the real one
    name, *rest = s.meta["argv"]
    assert "/" not in name and rest in ([], ["<redacted>"])  # the script's name only
    assert capsys.readouterr().err == ""  # quiet


def test_default_path_is_timestamped_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with evtrace.record(device=False, quiet=True) as r:
        pass
    assert r.path is not None and re.fullmatch(r"evtrace-\d{8}-\d{6}\.json\.gz", str(r.path))
    assert (tmp_path / r.path).exists()


def test_bad_output_path_is_refused_before_recording(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        with evtrace.record(tmp_path / "missing" / "t.json", device=False):
            pass
    with pytest.raises(ValueError, match="must end in .json"):
        with evtrace.record(tmp_path / "t.txt", device=False):
            pass


def test_trace_is_written_when_the_body_raises(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError):
        with evtrace.record(tmp_path / "e.json", device=False, quiet=True):
            with evtrace.region("boom"):
                _ = 1 / 0
    assert evtrace.load(tmp_path / "e.json").names == ["boom"]


def test_threads_get_their_own_named_lanes(tmp_path: Path) -> None:
    def work() -> None:
        with evtrace.region("in thread"):
            pass

    with evtrace.record(tmp_path / "t.json", device=False, quiet=True) as r:
        with evtrace.region("main"):
            t = threading.Thread(target=work, name="loader")
            t.start()
            t.join()
    s = r.session
    assert s is not None
    assert [t.name for t in s.threads] == ["MainThread", "loader"]
    assert len({t.tid for t in s.threads}) == 2


def test_the_closing_line_counts_in_words_and_quotes_a_path_with_spaces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "my run" / "t.json"
    out.parent.mkdir()
    with evtrace.record(out, device=False):
        with evtrace.region("one"):
            pass
    err = capsys.readouterr().err
    assert "(1 region, 0 device spans)" in err
    assert f"run: evtrace summary '{out}'" in err  # pasted into a shell, it names the file


def test_one_of_anything_is_said_in_the_singular(tmp_path: Path) -> None:
    """The closing line's drops, the SVG's footer and the diff's headline count as words do."""
    from evtrace.export.diff import DiffMarkdown
    from evtrace.export.render import Timeline
    from evtrace.output import describe

    with evtrace.record(tmp_path / "t.json", device=False, quiet=True) as r:
        with evtrace.region("one"):
            pass
    s = r.session
    assert s is not None
    s.meta.update(dropped_regions=1, device_spans=1, dropped_device_spans=1)
    line = describe(s, tmp_path / "t.json")
    assert "1 oldest region dropped" in line and "1 device span lost" in line
    assert str(Timeline().draw(s)).startswith("1 slice on 1 lane, ")
    assert "0 of 1 region significantly slower" in DiffMarkdown().render(s, s)
