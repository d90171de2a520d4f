"""`evtrace report` with hostile names: the markdown keeps its table shape and renders them as text."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import evtrace
from evtrace.export.markdown import code, escape
from evtrace.export.report import Report

from .simdevice import FakeClock, SimBackend

HOSTILE = [
    "a|b",
    "**x**",
    "<script>alert(1)</script>",
    "two\nlines",
    "[link](http://x)",
    "esc\x1b[31m red \x07",
    "_u_ ~~s~~ &lt; $m$ \\|",
]
IDLE = "`tick` | <b>"  # the host-only region the GPU waits on: named in a code span
SPECIAL = set("\\`*_[]<>|~&$")


def unescaped(cell_text: str) -> str:
    """What is left once every backslash escape is taken out."""
    return re.sub(r"\\.", "", cell_text)


def cells(row: str) -> list[str]:
    """A GFM table row's cells: split on the pipes no backslash escapes."""
    assert row.startswith("| ") and row.endswith(" |"), row
    return re.split(r"(?<!\\)\|", row[1:-1])


def tables(md: str) -> list[list[str]]:
    """Each table of the report: its consecutive lines that start with a pipe."""
    out: list[list[str]] = []
    prev = False
    for line in md.splitlines():
        if line.startswith("|"):
            if not prev:
                out.append([])
            out[-1].append(line)
        prev = line.startswith("|")
    return out


def assert_inert(md: str, n_regions: int) -> None:
    env, top = tables(md)
    assert len(top) == 2 + n_regions  # header, delimiter, one row per region: no name split a row
    for table in (env, top):
        width = len(cells(table[0]))
        for row in table[2:]:
            got = cells(row)
            assert len(got) == width, row
            for c in got:
                left = unescaped(c)
                assert not SPECIAL & set(left), (c, left)
                assert not re.search(r"[\x00-\x1f\x7f]", c), c
    for name in HOSTILE:
        assert escape(name) in md  # in the table, escaped
        for raw in ("<script>", "**x**", "[link](", "a|b", "\x1b", "\x07"):
            assert raw not in escape(name)
    assert f"(host in {code(IDLE)})" in md  # the idle gap names the host region in one whole code span


def hostile_trace(path: Path) -> evtrace.Session:
    clk = FakeClock(seed=3)
    sim = SimBackend(clk)
    with evtrace.record(path, backend=sim, clock=clk, quiet=True) as r:
        for _ in range(2):
            for name in HOSTILE:
                with evtrace.region(name, arg="x|y"):
                    sim.launch(1_000_000)
            with evtrace.region(IDLE, host_only=True):
                sim.synchronize(0)
                clk.advance(5_000_000)
    assert r.session is not None
    return r.session


def test_hostile_names_gpus_and_argv_stay_text(tmp_path: Path) -> None:
    s = hostile_trace(tmp_path / "t.json")
    s.meta["gpus"] = ["H100 | **fast** <img src=x>", "`gpu`\n1"]
    s.meta["argv"] = ["train.py", "--name=a|b", "**bold**", "`tick`", "line\nbreak", "[l](http://x)"]
    s.meta["host_id"] = "`abc` <b>"
    md = Report("w|`eird` *name*.json", 2048).render(s)
    assert_inert(md, len(HOSTILE) + 1)
    assert md.startswith(f"### evtrace report: {code('w|`eird` *name*.json')}\n")
    assert escape("--name=a|b **bold** `tick` line break [l](http://x)") in md  # the command cell
    assert escape("H100 | **fast** <img src=x>, `gpu` 1") in md
    assert f"host id {code('`abc` <b>')}" in md


def test_report_cli_escapes_a_recorded_command_line(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
            from tests.test_report_escaping import hostile_trace
            from pathlib import Path
            hostile_trace(Path("t.json"))
            """
        )
    )
    argv = ["a|b", "**x**", "<script>", "`t`", "nl\nx", "[l](http://x)"]
    subprocess.run([sys.executable, str(script), *argv], cwd=tmp_path, check=True, timeout=60)
    p = subprocess.run(
        [sys.executable, "-m", "evtrace", "report", "t.json", "-o", "r.md"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert_inert(md, len(HOSTILE) + 1)
    command = next(line for line in md.splitlines() if line.startswith("| command |"))
    assert command.endswith(" " + escape(" ".join(argv)) + " |")


def test_escape_and_code_spans() -> None:
    assert escape("a|b\n**c**\t<d>") == r"a\|b \*\*c\*\* \<d\>"
    assert escape("x\x1by\x00") == r"x\\x1by\\x00"  # control characters shown, never emitted
    assert code("plain") == "`plain`"
    assert code("a ` b") == "``a ` b``"  # a longer fence than any run inside
    assert code("`x`") == "`` `x` ``"  # padded: a fence never touches a backtick of the text
