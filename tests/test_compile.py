"""Regions inside torch.compile'd code never crash (CPU, dynamo with the eager backend)."""

from __future__ import annotations

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
