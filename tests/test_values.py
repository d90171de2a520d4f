"""Region args: snapshot on entry, bounded, and never the reason a session is lost."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import evtrace
from evtrace.values import MAX_ITEMS, MAX_STR, value

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
BAD = """
import evtrace
class Bad:
    def __repr__(self):
        raise RuntimeError("no repr")
with evtrace.region("fine", step=1):
    pass
with evtrace.region("bad", o=Bad()):
    pass
"""


def args_of(s: evtrace.Session, name: str) -> list[dict[str, object]]:
    ix = s.names.index(name)
    return [s.args.get(i, {}) for i in (s.regions["name"] == ix).nonzero()[0].tolist()]


@pytest.mark.parametrize("under_cli", [True, False], ids=["python -m evtrace", "with record()"])
def test_an_arg_without_a_repr_is_a_marker_and_the_session_is_written(
    tmp_path: Path, under_cli: bool
) -> None:
    if under_cli:
        (tmp_path / "job.py").write_text(BAD)
        cmd = [sys.executable, "-m", "evtrace", "--no-cuda", "-o", "t.json", "job.py"]
    else:
        (tmp_path / "job.py").write_text(
            f"import evtrace\nwith evtrace.record('t.json', device=False):\n    exec({BAD!r})\n"
        )
        cmd = [sys.executable, "job.py"]
    p = subprocess.run(cmd, cwd=tmp_path, env=ENV, check=False, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    s = evtrace.load(tmp_path / "t.json")
    assert args_of(s, "bad") == [{"o": "<unrepresentable Bad: RuntimeError>"}]
    assert args_of(s, "fine") == [{"step": 1}]


def test_an_arg_is_kept_as_it_was_when_the_region_began(tmp_path: Path) -> None:
    xs = [1, 2]
    with (
        evtrace.record(tmp_path / "t.json", device=False, quiet=True),
        evtrace.region("r", xs=xs, nested={"a": xs}),
    ):
        xs.append(3)
        xs.append(4)
    assert args_of(evtrace.load(tmp_path / "t.json"), "r") == [{"xs": [1, 2], "nested": {"a": [1, 2]}}]


def test_a_tensor_arg_is_its_shape_dtype_and_device_and_is_not_kept_alive(tmp_path: Path) -> None:
    x = torch.zeros(1000, 1000)
    alive = weakref.ref(x)
    with evtrace.record(tmp_path / "t.json", device=False, quiet=True):
        with evtrace.region("r", x=x):
            pass
        del x
        gc.collect()
        assert alive() is None  # while still recording: the session holds no reference
    assert args_of(evtrace.load(tmp_path / "t.json"), "r") == [{"x": "Tensor[1000, 1000] float32 cpu"}]


def test_a_huge_string_and_a_long_list_are_capped_and_the_cut_marked(tmp_path: Path) -> None:
    with evtrace.record(tmp_path / "t.json", device=False, quiet=True):
        with evtrace.region("r", text="x" * 10_000_000, xs=list(range(100_000))):
            pass
    (a,) = args_of(evtrace.load(tmp_path / "t.json"), "r")
    assert a["text"] == "x" * (MAX_STR - 1) + "…"
    assert a["xs"] == list(range(MAX_ITEMS)) + [f"… {100_000 - MAX_ITEMS} more"]
    assert (tmp_path / "t.json").stat().st_size < 100_000


def test_the_decorator_snapshots_its_args_on_each_call(tmp_path: Path) -> None:
    seen = [0]

    @evtrace.region("f", seen=seen)
    def f() -> None:
        seen.append(len(seen))

    with evtrace.record(tmp_path / "t.json", device=False, quiet=True):
        f()
        f()
    assert args_of(evtrace.load(tmp_path / "t.json"), "f") == [{"seen": [0]}, {"seen": [0, 1]}]


def test_values_are_plain_and_bounded() -> None:
    deep: list[object] = []
    deep.append(deep)
    assert value(3) == 3 and value(None) is None and value(1.5) == 1.5 and value(True) is True
    assert value(10**100) == str(10**100) and value(10**300) == str(10**300)[:199] + "…"
    assert value(10**5000) == "<int of 16610 bits>"
    assert value((1, "a")) == [1, "a"]
    assert value({1: (2,)}) == {"1": [2]}
    assert value(deep) == [[[["list[1] …"]]]]  # MAX_DEPTH levels kept
    assert value(object()).startswith("<object object at")
    import numpy as np

    assert value(np.float32(0.5)) == 0.5 and value(np.zeros((2, 3))) == "ndarray[2, 3] float64"
