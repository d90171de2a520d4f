"""A device fault at the end of a run (an illegal memory access, a device-side assert): every
later CUDA call fails. The run someone most wants to debug must still leave its trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import evtrace

from .simdevice import FakeClock, SimBackend

FAULT = "CUDA error: an illegal memory access was encountered"


class FaultingSim(SimBackend):
    """The simulated device, until ``fault``: then every call fails, as after a sticky CUDA error."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.fault = False

    def _check(self) -> None:
        if self.fault:
            raise RuntimeError(FAULT)

    def record(self, ev: Any, stream: int) -> int:
        self._check()
        return super().record(ev, stream)

    def query(self, ev: Any) -> bool:
        self._check()
        return super().query(ev)

    def elapsed_ms(self, a: Any, b: Any) -> float:
        self._check()
        return super().elapsed_ms(a, b)

    def synchronize(self, device: int) -> None:
        self._check()
        super().synchronize(device)

    def close(self) -> None:
        self._check()
        super().close()


def test_a_device_fault_leaves_the_trace_and_the_users_error(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    clk = FakeClock()
    sim = FaultingSim(clk)
    path = tmp_path / "fault.json"
    rec = evtrace.record(path, backend=sim, clock=clk, anchor_interval=1.0)
    with pytest.raises(IndexError, match="the user's own error"):
        with rec:
            for i in range(20):
                with evtrace.region("step", i=i):
                    sim.launch(1_000_000)
                clk.advance(50_000_000)
                if i == 9:
                    assert evtrace.recorder.current is not None
                    evtrace.recorder.current.poll()  # the first ten are resolved before the fault
            with evtrace.region("faulting"):
                sim.launch(10**9)  # queued behind: never resolved
                sim.fault = True
            raise IndexError("the user's own error")  # e.g. what the device-side assert raised
    s = evtrace.load(path)
    names = [s.names[k] for k in s.regions["name"]]
    assert names.count("step") == 20 and names.count("faulting") == 1  # every host span
    steps = s.regions[[n == "step" for n in names]]
    assert (steps["device"][:10] == 0).all()  # resolved before the fault: kept
    assert s.meta["device_fault"] == f"RuntimeError: {FAULT}"
    assert s.device_spans + sum(s.meta["lost_device_spans"].values()) == 21
    err = capfd.readouterr().err
    assert f"wrote {path}" in err and "the device faulted (RuntimeError: CUDA error" in err
