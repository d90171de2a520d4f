"""A real device-side assert inside a region, in a child process (the error is sticky): the trace
is written with every host span, the fault named, and the script's own error shown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evtrace

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, time, torch, evtrace
with evtrace.record(sys.argv[1]):
    x = torch.zeros(4, device="cuda")
    for i in range(10):
        with evtrace.region("step", i=i):
            y = x * 2
        torch.cuda.synchronize()
    time.sleep(0.1)  # the resolver (every 10 ms) stamps what is done
    with evtrace.region("bad index"):
        x[torch.tensor([10], device="cuda")] = 1.0  # out of range: a device-side assert
    torch.cuda.synchronize()  # the assert surfaces here, as the user's own error
"""


def test_a_device_side_assert_leaves_the_trace_and_the_scripts_error(tmp_path: Path) -> None:
    path = tmp_path / "fault.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert p.returncode == 1
    assert "device-side assert" in p.stderr  # the script's own error, unchanged
    assert f"wrote {path}" in p.stderr and "the device faulted" in p.stderr
    s = evtrace.load(path)
    names = [s.names[k] for k in s.regions["name"]]
    assert names.count("step") == 10 and names.count("bad index") == 1  # every host span
    steps = s.regions[[n == "step" for n in names]]
    assert (steps["device"] == 0).all()  # resolved before the fault
    assert "device-side assert" in s.meta["device_fault"] or "CUDA error" in s.meta["device_fault"]
