"""Where a region's time goes on the GPU machine: hot path, each resolver step, the primitives.

    python benchmarks/diag_hotpath.py [marks]    # marks: only count the P2 forward's marks

A diagnostic, not a figure for BENCHMARKS.md: one loop per line, ns per iteration.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import evtrace
from evtrace import recorder
from evtrace.device import CudaBackend, HotPath

n = 20000
x = torch.zeros(1, device="cuda")
reg = evtrace.region("tiny")
pc = time.perf_counter_ns


def loop(label: str, body: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    t = pc()
    for _ in range(n):
        body()
    el = (pc() - t) / n
    torch.cuda.synchronize()
    print(f"{label:45s} {el:8.0f} ns/iter", flush=True)
    return el


def with_region() -> None:
    with reg:
        x.add_(1)


def resolver_step(rec: recorder.Recorder) -> None:
    """Time one poll over everything the loop left (the resolver was off)."""
    torch.cuda.synchronize()
    t = pc()
    rec.poll(final=True)
    print(f"   resolver per region: {(pc() - t) / n:.0f} ns", flush=True)


class Counting(CudaBackend):
    """A CUDA backend that counts its records: the marks taken (not for timing)."""

    records = 0

    def hot_path(self) -> HotPath:
        get_device, raw_stream, record = super().hot_path()

        def counted(ev: Any, stream: int) -> int:
            self.records += 1
            return record(ev, stream)

        return HotPath(get_device, raw_stream, counted)


def p2_marks() -> None:
    """How many marks the P2 model's forward takes (97 modules)."""
    layers: list[torch.nn.Module] = []
    for _ in range(48):
        layers += [torch.nn.Linear(256, 256), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers).cuda().eval()
    xin = torch.randn(8, 256, device="cuda")
    with torch.no_grad(), evtrace.instrument(model):
        be = Counting()
        rec = recorder.Recorder(be, pool_size=5000, background=False)
        rec.start()
        before = be.records
        for _ in range(20):
            model(xin)
        marks = be.records - before
        s = rec.stop()
        print(
            f"P2 forward: share window {rec.share_ns} ns, {len(s) / 20:.0f} regions,"
            f" {marks / 20:.1f} marks per forward",
            flush=True,
        )


p2_marks()
if sys.argv[1:] == ["marks"]:
    sys.exit()
for _rep in range(3):
    bare = loop("bare", lambda: x.add_(1))
    rec = recorder.Recorder(CudaBackend(), pool_size=n + 100, background=False)
    rec.start()
    loop("region, resolver off (hot path only)", with_region)
    print(f"   share window {rec.share_ns} ns", flush=True)
    resolver_step(rec)
    rec.stop()
    rec = recorder.Recorder(CudaBackend())
    rec.start()
    loop("region, resolver thread", with_region)
    rec.stop()
    be = CudaBackend()
    rec = recorder.Recorder(be, pool_size=n + 100, background=False)
    rec.start()
    e, xx = rec.enter, rec.exit
    k = recorder.name_key("p")
    loop("enter+exit only (no kernel)", lambda: xx(e(k, None)))
    rec.stop()
    be = CudaBackend()
    hot = be.hot_path()
    loop("raw_stream() only", lambda: hot.raw_stream(0))
    ev, ev2 = be.new_event(0), be.new_event(0)
    loop("record raw only", lambda: hot.record(ev, 0))
    hot.record(ev2, 0)
    torch.cuda.synchronize()
    loop("elapsed_ms only", lambda: be.elapsed_ms(ev, ev2))
    loop("query only", lambda: be.query(ev))
    loop("perf_counter_ns", pc)
    be.close()
