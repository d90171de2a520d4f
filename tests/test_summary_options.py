"""``evtrace summary``'s options and its table's edges, as a user meets them (issue 27): --top,
--sort, --filter and --format for scripts; no device columns without device spans; drops said;
long and control-character names kept to one cell; every subcommand's --help with an example."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evtrace
from evtrace import cli
from evtrace.export.summary import FIELDS, Summary

from .simdevice import FakeClock, SimBackend

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # PYTHONPATH passed on: this checkout runs
NASTY = "a\nb\x1b[31mred"  # a newline and a terminal escape sequence
LONG = "encoder." * 20  # 160 characters


def summary(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evtrace", "summary", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )


@pytest.fixture
def host_trace(tmp_path: Path) -> Path:
    """Host only: 3 "step" of 2 ms, 1 "loss" of 5 ms, 2 of a long name, 1 of a nasty one."""
    clk = FakeClock()
    with evtrace.record(tmp_path / "h.json", device=False, clock=clk, quiet=True):
        for name, n, ns in (
            ("step", 3, 2_000_000),
            ("loss", 1, 5_000_000),
            (LONG, 2, 1000),
            (NASTY, 1, 1000),
        ):
            for _ in range(n):
                with evtrace.region(name, host_only=True):
                    clk.advance(ns)
    return tmp_path / "h.json"


def table(out: str) -> list[str]:
    """The rows' names of a text summary (under the head line, the column heads and the rule)."""
    return [line.split()[0] for line in out.splitlines()[3:] if line and not line.startswith("(")]


def test_top_sort_and_filter_choose_the_rows(host_trace: Path) -> None:
    by_name = summary(host_trace, "--sort", "name", "--top", "2", cwd=host_trace.parent)
    assert by_name.returncode == 0, by_name.stderr
    assert table(by_name.stdout)[:2] == ["a\\nb\\x1b[31mred", LONG[:59] + "…"]
    assert "(2 more not shown)" in by_name.stdout
    assert table(summary(host_trace, "--sort", "count", cwd=host_trace.parent).stdout)[0] == "step"
    assert table(summary(host_trace, "--sort", "host", cwd=host_trace.parent).stdout)[0] == "loss"
    only = summary(host_trace, "--filter", "^st|oss$", cwd=host_trace.parent)
    assert sorted(table(only.stdout)) == ["loss", "step"]
    assert "names matching ^st|oss$" in only.stdout.splitlines()[0]
    assert "--sort KEY" in summary("--help", cwd=host_trace.parent).stdout


def test_csv_and_json_give_the_rows_in_ns(host_trace: Path) -> None:
    got = summary(host_trace, "--format", "csv", "--sort", "name", cwd=host_trace.parent)
    assert got.returncode == 0, got.stderr
    rows = list(csv.DictReader(io.StringIO(got.stdout)))
    assert tuple(rows[0]) == FIELDS
    assert [r["region"] for r in rows] == sorted([NASTY, LONG, "loss", "step"])  # names as recorded
    step = next(r for r in rows if r["region"] == "step")
    assert step["count"] == "3" and step["trace"] == str(host_trace)
    assert 2_000_000 <= int(step["host_p50_ns"]) < 2_010_000  # the fake clock's 2 ms, in ns
    assert step["device_p50_ns"] == step["device_busy_ns"] == ""  # host only: not measured
    js = json.loads(summary(host_trace, "--format", "json", "--filter", "step", cwd=host_trace.parent).stdout)
    assert js == [
        {k: (int(v) if k.endswith("ns") or k == "count" else v) if v else None for k, v in step.items()}
    ]


@pytest.mark.parametrize(
    "args",
    [["--top", "-1"], ["--filter", "("], ["--sort", "fastest"], ["--format", "xml"]],
    ids=["negative top", "bad regex", "unknown sort", "unknown format"],
)
def test_bad_values_are_one_line_and_exit_2(host_trace: Path, args: list[str]) -> None:
    got = summary(host_trace, *args, cwd=host_trace.parent)
    assert got.returncode == 2 and got.stdout == ""
    assert got.stderr.startswith(f"evtrace: error: {args[0]}") and got.stderr.count("\n") == 1


def test_device_columns_only_with_device_spans(host_trace: Path, tmp_path: Path) -> None:
    host = summary(host_trace, cwd=tmp_path).stdout.splitlines()
    assert host[1].split() == ["region", "count", "host", "p50", "host", "p95"]
    assert not any(line.endswith("-") for line in host[3:7])  # no empty device cells
    clk = FakeClock()
    sim = SimBackend(clk)
    with evtrace.record(tmp_path / "d.json", backend=sim, clock=clk, quiet=True):
        with evtrace.region("forward"):
            sim.launch(40_000)
    dev = summary(tmp_path / "d.json", cwd=tmp_path).stdout.splitlines()
    assert "device p50" in dev[1] and "device busy" in dev[1]


def test_drops_are_said_under_the_table(host_trace: Path) -> None:
    s = evtrace.load(host_trace)
    assert "dropped" not in Summary().render(s) and "lost" not in Summary().render(s)
    lost = dict(timeout=2, split_over_devices=1)
    meta = dict(
        s.meta, dropped_regions=5, lost_device_spans=lost, dropped_device_spans=2, split_device_spans=1
    )
    last = Summary().render(dataclasses.replace(s, meta=meta)).splitlines()[-1]
    assert last == (
        "dropped 5 oldest regions (max_regions); lost 3 device spans (1 split over devices, 2 timeout): "
        "not in this table"
    )


def test_names_stay_in_one_cell(host_trace: Path) -> None:
    out = summary(host_trace, cwd=host_trace.parent).stdout
    assert "\x1b" not in out and len(out.splitlines()) == 3 + 4  # head, column heads, rule, 4 names
    assert "a\\nb\\x1b[31mred" in out
    width = len(out.splitlines()[2])
    assert all(len(line) <= width for line in out.splitlines()[1:])
    assert LONG[:59] + "…" in out and LONG not in out


def test_every_subcommand_describes_its_positionals_and_shows_an_example() -> None:
    parser, _ = cli._parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(cli.COMMANDS)
    for name, p in sub.choices.items():
        for a in p._actions:
            if not a.option_strings:
                assert a.help, f"evtrace {name}: positional {a.dest} has no help"
        assert p.epilog and f"evtrace {name} " in p.epilog, f"evtrace {name} has no example"
        assert p.formatter_class is argparse.RawDescriptionHelpFormatter  # the example as written
        assert p.epilog.splitlines()[-1].strip() in p.format_help()
