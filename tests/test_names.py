"""Region names of modules: qualified by their top-level model, which gets a label of its own, so
that two models (of one class or not) never share a row in the summary, the report or a diff."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import evtrace
from evtrace.analysis import rows
from evtrace.session import Session

# a module region's name is its model's label, then its path in the model
QUALIFIED = re.compile(r"^[A-Za-z_]\w*(#\d+)?(\.\w+)*( \(backward\))?$")


def hooked(
    tmp_path: Path, step: Callable[[], object], include: str | None = None, exclude: str | None = None
) -> Session:
    """``step()`` three times under ``record(hooks=True)``, host only."""
    path = tmp_path / "h.json"
    with evtrace.record(path, device=False, quiet=True, hooks=True, include=include, exclude=exclude) as r:
        for _ in range(3):
            step()
    assert r.session is not None
    return r.session


def modules(s: Session) -> set[str]:
    return {n for n in s.names if n != "backward" and not n.startswith("optimizer")}


def spans(s: Session, name: str) -> np.ndarray:
    return s.regions[s.regions["name"] == s.names.index(name)]


def inside(inner: np.ndarray, outer: np.ndarray) -> bool:
    """Each of ``inner`` lies within the ``outer`` of the same step."""
    return len(inner) == len(outer) and bool(
        ((outer["host_start"] <= inner["host_start"]) & (inner["host_end"] <= outer["host_end"])).all()
    )


def test_two_models_of_one_class_get_rows_of_their_own(tmp_path: Path) -> None:
    enc = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    dec = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    x = torch.randn(2, 4, requires_grad=True)
    s = hooked(tmp_path, lambda: dec(enc(x)).sum().backward())
    fwd = ["Sequential", "Sequential.0", "Sequential.1", "Sequential#2", "Sequential#2.0", "Sequential#2.1"]
    assert modules(s) == {*fwd, *(f"{n} (backward)" for n in fwd)}
    # enc, called first, is "Sequential": its ReLU runs inside it, dec's Tanh inside dec
    assert inside(spans(s, "Sequential.1"), spans(s, "Sequential"))
    assert inside(spans(s, "Sequential#2.1"), spans(s, "Sequential#2"))
    assert {r.name: r.n for r in rows(s)}["Sequential.1"] == 3  # not 6: enc's ReLU alone


class Head(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(64, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_same_child_name_in_two_models_is_not_pooled(tmp_path: Path) -> None:
    """Two `.proj` of very different sizes: two rows, each of its own calls."""
    small, big = Head(4), Head(4096)
    x = torch.randn(256, 64)

    def step() -> None:
        small(x)
        big(x)

    s = hooked(tmp_path, step)
    assert modules(s) == {"Head", "Head.proj", "Head#2", "Head#2.proj"}
    by = {r.name: r for r in rows(s)}
    assert by["Head.proj"].n == by["Head#2.proj"].n == 3
    assert inside(spans(s, "Head#2.proj"), spans(s, "Head#2"))
    text = s.summary()
    assert re.search(r"^Head\.proj ", text, re.M) and re.search(r"^Head#2\.proj ", text, re.M)


def test_backward_names_say_which_model(tmp_path: Path) -> None:
    enc = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    dec = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    x = torch.randn(2, 4)
    s = hooked(tmp_path, lambda: dec(enc(x)).sum().backward())
    bw = {n for n in s.names if n.endswith(" (backward)")}
    assert {"Sequential.2 (backward)", "Sequential#2.2 (backward)"} <= bw
    assert all(QUALIFIED.match(n) and not n[0].isdigit() for n in bw), bw
    with evtrace.instrument(enc), evtrace.record(tmp_path / "i.json", device=False, quiet=True) as r:
        enc(x).sum().backward()
    assert r.session is not None
    assert {n for n in r.session.names if n.endswith(" (backward)")} == {
        "Sequential (backward)",
        "Sequential.0 (backward)",
        "Sequential.1 (backward)",
        "Sequential.2 (backward)",
    }


def test_include_and_exclude_see_the_qualified_path(tmp_path: Path) -> None:
    enc = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    dec = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    x = torch.randn(2, 4)
    s = hooked(tmp_path, lambda: dec(enc(x)), include=r"^Sequential#2\.")
    assert modules(s) == {"Sequential#2.0", "Sequential#2.1"}
    s = hooked(tmp_path, lambda: dec(enc(x)), exclude=r"^Sequential\.")  # enc's children only
    assert modules(s) == {"Sequential", "Sequential#2", "Sequential#2.0", "Sequential#2.1"}


def test_instrument_two_models_of_one_class(tmp_path: Path) -> None:
    a, b = Head(4), Head(8)
    x = torch.randn(2, 64)
    with evtrace.instrument(a), evtrace.instrument(b):
        with evtrace.record(tmp_path / "i.json", device=False, quiet=True) as r:
            a(x)
            b(x)
            b(x)
        assert r.session is not None
        counts = {row.name: row.n for row in rows(r.session)}
        assert counts == {"Head": 1, "Head.proj": 1, "Head#2": 2, "Head#2.proj": 2}
        with evtrace.instrument(a):  # instrumented already: the same label
            pass
        assert repr(a.proj.forward) == "<evtrace forward of Head.proj>"
    # one after the other in one session: still two names, and a model keeps its own
    with evtrace.record(tmp_path / "j.json", device=False, quiet=True) as r:
        for m in (a, b, a):
            with evtrace.instrument(m):
                m(x)
    assert r.session is not None
    assert {row.name: row.n for row in rows(r.session)} == {
        "Head": 2,
        "Head.proj": 2,
        "Head#2": 1,
        "Head#2.proj": 1,
    }
    # once removed and its session over, a label is free again: one model alone gets its class name
    lin = nn.Linear(2, 2)
    with evtrace.instrument(b) as ins, evtrace.instrument(lin, name="probe"):
        assert len(ins) == 2 and repr(b.proj.forward) == "<evtrace forward of Head.proj>"
        assert repr(lin.forward) == "<evtrace forward of probe>"


SCRIPT = """
import torch
import torch.nn as nn

torch.manual_seed(0)
dec = nn.Sequential(nn.Linear(4, 4), nn.Tanh())  # made first, called second: labels follow calls
enc = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
loss_fn = nn.MSELoss()
opt = torch.optim.SGD([*enc.parameters(), *dec.parameters()], lr=0.1)
x = torch.randn(8, 4)
for _ in range(3):
    opt.zero_grad()
    loss_fn(dec(enc(x)), x).backward()
    opt.step()
"""


def test_the_same_script_gets_the_same_names_every_run(tmp_path: Path) -> None:
    (tmp_path / "ed.py").write_text(SCRIPT)
    # this checkout's evtrace, not whichever one the interpreter has installed
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path(evtrace.__file__).parents[1])}
    firsts = []
    for run in range(2):
        out = f"run{run}.json"
        p = subprocess.run(
            [sys.executable, "-m", "evtrace", "-o", out, "ed.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr
        s = evtrace.load(tmp_path / out)
        reg = s.regions[np.argsort(s.regions["host_start"], kind="stable")]
        order = list(dict.fromkeys(s.names[k] for k in reg["name"]))  # names by first appearance
        firsts.append([n for n in order if n in modules(s)])
    assert firsts[0] == firsts[1]
    assert firsts[0][:7] == [
        "Sequential",  # enc
        "Sequential.0",
        "Sequential.1",
        "Sequential#2",  # dec
        "Sequential#2.0",
        "Sequential#2.1",
        "MSELoss",
    ]
