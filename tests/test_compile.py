"""Regions inside torch.compile'd code never crash (CPU, dynamo with the eager backend)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evtrace


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo: "cannot trace time.perf_counter_ns"
def test_regions_and_instrumented_modules_inside_torch_compile(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())

    def f(x: torch.Tensor) -> torch.Tensor:
        with evtrace.region("inside"):
            y = model(x)
        return y.sum()

    cf = torch.compile(f, backend="eager")
    x = torch.randn(2, 4)
    with evtrace.instrument(model), evtrace.record(tmp_path / "c.json", device=False, quiet=True) as r:
        for _ in range(3):
            got = cf(x)
    assert torch.allclose(got, model(x).sum())
    s = r.session
    assert s is not None
    assert s.names.count("inside") == 1 and len(s.regions[s.regions["name"] == s.names.index("inside")]) == 3


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cli_hooks_with_a_compiled_model(tmp_path: Path) -> None:
    """The compiled model is one span, forward and backward (dynamo is not split); its inside is
    skipped, never broken."""
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    cm = torch.compile(m, backend="eager")
    x = torch.randn(4, 8)
    ref = m(x)
    with evtrace.record(tmp_path / "h.json", device=False, quiet=True, hooks=True) as r:
        for _ in range(3):
            y = cm(x)
            y.sum().backward()
    assert torch.allclose(y, ref)
    s = r.session
    assert s is not None and set(s.names) == {"OptimizedModule", "OptimizedModule (backward)", "backward"}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch 2.11: reset() imports a deprecated jit API
def test_an_instrumented_model_compiles_to_one_graph(tmp_path: Path) -> None:
    """Dynamo traces through the instrumented modules' forwards (C) as through plain ones: one
    graph, no breaks, and nothing recorded of the compiled call."""
    if not hasattr(torch.compiler, "substitute_in_graph"):
        pytest.skip("torch before 2.5 splits the graph at each instrumented module")
    torch._dynamo.reset()  # an earlier test's compiled code would serve this call
    torch._dynamo.utils.counters.clear()
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: object) -> object:
        graphs.append(gm)
        return gm.forward

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    with evtrace.instrument(model), evtrace.record(tmp_path / "g.json", device=False, quiet=True) as r:
        cm = torch.compile(model, backend=backend)
        got = cm(x)
        eager = model(x)
    assert len(graphs) == 1
    assert torch.allclose(got, eager)
    s = r.session
    assert s is not None
    assert not torch._dynamo.utils.counters["graph_break"]
    # the eager call alone: the model and its three modules
    assert sorted(s.names[k] for k in s.regions["name"]) == [
        "Sequential",
        "Sequential.0",
        "Sequential.1",
        "Sequential.2",
    ]


LATE = """
import sys, torch, evtrace
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))
x = torch.randn(3, 4)
graphs = []
def backend(gm, example_inputs):
    graphs.append(gm)
    return gm.forward
with evtrace.instrument(model), evtrace.record("g.json", device=False, quiet=True):
    print("dynamo imported by instrument():", "torch._dynamo" in sys.modules)
    fn = model if sys.argv[1] == "model" else (lambda x: model(x).sum() * 2)
    cm = torch.compile(fn, backend=backend)
    cm(x)
    cm(x)
import torch._dynamo.utils
print("graphs", len(graphs), "breaks", len(torch._dynamo.utils.counters["graph_break"]))
"""


@pytest.mark.parametrize("what", ["model", "function"])
def test_dynamo_imported_after_instrument_still_sees_one_graph(tmp_path: Path, what: str) -> None:
    """instrument() does not import dynamo (a second of start-up); torch.compile, later, does, and
    the C forwards' twins are registered before dynamo traces: a compiled model, or a compiled
    function that calls it, is still one graph with no breaks."""
    if not hasattr(torch.compiler, "substitute_in_graph"):
        pytest.skip("torch before 2.5 splits the graph at each instrumented module")
    (tmp_path / "late.py").write_text(LATE)
    p = subprocess.run(
        [sys.executable, "-W", "ignore", "late.py", what],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["dynamo imported by instrument(): False", "graphs 1 breaks 0"]
