"""`evtrace diff`: a known 20 % device regression is found, noise is not, and CI can gate on it."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import evtrace
from evtrace.cli import main
from evtrace.export.diff import holm, mann_whitney

from .simdevice import FakeClock, SimBackend

#: device ns per region name; the test slows "forward" by 20 %, the rest get a few % of noise
KERNELS = {"forward": 400_000, "backward": 800_000, "optimizer.step": 100_000, "data": 50_000, "loss": 20_000}


def simulate(path: Path, seed: int, slow: str | None = None, n: int = 200) -> None:
    rng = random.Random(seed)
    clk = FakeClock(seed=seed)
    sim = SimBackend(clk)
    with evtrace.record(path, backend=sim, clock=clk, quiet=True):
        for _ in range(n):
            for name, ns in KERNELS.items():
                with evtrace.region(name):
                    sim.launch(ns * (1.2 if name == slow else 1.0) * (1 + 0.03 * rng.gauss(0, 1)))
                    clk.advance(rng.randrange(2000))  # host noise, well inside the kernel
                clk.advance(2 * ns)  # the stream drains: each region's device span is its kernel


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("diff")
    simulate(d / "before.json.gz", seed=1)
    simulate(d / "after.json.gz", seed=2, slow="forward")
    return str(d / "before.json.gz"), str(d / "after.json.gz")


def row(out: str, name: str) -> str:
    """The text table's row of ``name``."""
    (line,) = [ln for ln in out.splitlines() if ln.split()[:1] == [name]]
    return line


def test_the_regression_and_no_other(traces: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", *traces]) == 0
    out = capsys.readouterr().out
    assert "slower" in row(out, "forward") and re.search(r"\+(19|20|21)%", row(out, "forward"))
    for name in KERNELS.keys() - {"forward"}:
        assert not re.search(r"slower|faster", row(out, name)), row(out, name)
    names = [ln.split()[0] for ln in out.splitlines() if ln.split()[:1] and ln.split()[0] in KERNELS]
    assert names[0] == "forward"  # sorted by the change in device busy time
    assert "device busy: the union of the name's device spans" in out


def test_fail_above_gates(traces: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", *traces, "--fail-above", "10"]) == 1
    err = capsys.readouterr().err
    assert "forward" in err and len(err.splitlines()) == 1
    assert main(["diff", *traces, "--fail-above", "30"]) == 0
    assert main(["diff", traces[1], traces[0], "--fail-above", "10"]) == 0  # faster is no regression


def test_markdown_is_a_gfm_table(traces: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", *traces, "--markdown"]) == 0
    out = capsys.readouterr().out
    table = [ln for ln in out.splitlines() if ln.startswith("|")]
    cells = [re.split(r"(?<!\\)\|", ln)[1:-1] for ln in table]
    assert len(table) == 2 + len(KERNELS)
    assert all(ln.endswith("|") for ln in table) and len({len(c) for c in cells}) == 1
    assert all(re.fullmatch(r"\s*:?-+:?\s*", c) for c in cells[1])  # the delimiter row
    assert cells[0][0].strip() == "region"
    fwd = next(c for c in cells if c[0].strip() == "forward")
    assert "**slower" in fwd[-1]
    assert "1 of 5 regions significantly slower: forward" in out


def test_markdown_escapes_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for p in ("a.json", "b.json"):
        with (
            evtrace.record(tmp_path / p, device=False, clock=FakeClock(), quiet=True),
            evtrace.region("a|b *c*"),
        ):
            pass
    assert main(["diff", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert r"| a\|b \*c\* |" in out
    assert "too few" in out  # one sample per side: not tested


def test_ranks_one_by_one_or_pooled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for when, slow in (("before", None), ("after", "forward")):
        for rank in (0, 1):
            monkeypatch.setenv("RANK", str(rank))
            simulate(
                tmp_path / f"{when}.json.gz",
                seed=10 * rank + (when == "after"),
                slow=slow if rank == 1 else None,
                n=60,
            )
        parts = [str(tmp_path / f"{when}-rank{rank}.json.gz") for rank in (0, 1)]  # each rank its own file
        assert main(["merge", *parts, "-o", str(tmp_path / f"{when}.json.gz")]) == 0
    both = [str(tmp_path / "before.json.gz"), str(tmp_path / "after.json.gz")]
    capsys.readouterr()
    assert main(["diff", *both, "--rank", "0"]) == 0
    out = capsys.readouterr().out
    assert "(rank 0)" in out and not any("slower" in row(out, name) for name in KERNELS)
    assert main(["diff", *both, "--rank", "1"]) == 0
    out = capsys.readouterr().out
    assert "(rank 1)" in out and "slower" in row(out, "forward")
    assert main(["diff", *both]) == 0
    out = capsys.readouterr().out
    assert "(2 ranks pooled)" in out and row(out, "forward").split()[1] == "120"
    assert main(["diff", *both, "--rank", "5"]) == 2
    assert capsys.readouterr().err == "evtrace: error: BEFORE: no rank 5 in it (it holds ranks 0, 1)\n"


def _bad_inputs(tmp: Path, good: str) -> dict[str, tuple[list[str], str]]:
    (tmp / "bad.json").write_text("not json")
    (tmp / "bad_other.json").write_text('{"traceEvents": []}')
    with (
        evtrace.record(tmp / "other.json", device=False, clock=FakeClock(), quiet=True),
        evtrace.region("something else"),
    ):
        pass
    return {
        "missing": ([str(tmp / "nope.json"), good], "cannot read"),
        "not json": ([good, str(tmp / "bad.json")], "not valid trace JSON"),
        "not evtrace": ([str(tmp / "bad_other.json"), good], "not an evtrace trace"),
        "nothing common": ([good, str(tmp / "other.json")], "no region name in common"),
        "bad flag": ([good, good, "--fail-above", "x"], "invalid float value"),
    }


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, traces: tuple[str, str]) -> None:
    for case, (args, says) in _bad_inputs(tmp_path, traces[0]).items():
        p = subprocess.run(
            [sys.executable, "-m", "evtrace", "diff", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert p.returncode == 2, (case, p.stderr)
        assert p.stdout == "" and len(p.stderr.splitlines()) == 1, (case, p.stderr)
        assert p.stderr.startswith("evtrace: error:") and says in p.stderr, (case, p.stderr)


def test_mann_whitney_and_holm() -> None:
    # textbook: complete separation of 3 against 3; U = 9, z = 1.746 with continuity: p = 0.0809
    p, direction = mann_whitney(np.array([1, 2, 3]), np.array([4, 5, 6]))
    assert p == pytest.approx(0.0809, abs=1e-4) and direction == 1
    assert mann_whitney(np.array([5, 5, 5]), np.array([5, 5])) == (1.0, 0)  # all tied
    assert holm([0.01, float("nan"), 0.04, 0.03]) == pytest.approx(
        [0.03, float("nan"), 0.06, 0.06], nan_ok=True
    )
