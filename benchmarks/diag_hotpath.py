"""Where a region's time goes on the GPU machine: hot path vs resolver vs GIL hand-offs."""

from __future__ import annotations

import sys
import time

import torch

import evtrace
from evtrace import recorder
from evtrace.device import CudaBackend

n = 20000
x = torch.zeros(1, device="cuda")
reg = evtrace.region("tiny")
be = CudaBackend()
pc = time.perf_counter_ns


def loop(label: str, body, rec=None) -> None:  # type: ignore[no-untyped-def]
    stats = {"polls": 0, "poll_ns": 0}
    if rec is not None:
        orig = rec.poll

        def timed(final: bool = False) -> None:
            t = pc()
            orig(final)
            stats["polls"] += 1
            stats["poll_ns"] += pc() - t

        rec.poll = timed
    torch.cuda.synchronize()
    t = pc()
    for _ in range(n):
        body()
    el = (pc() - t) / n
    torch.cuda.synchronize()
    print(f"{label:45s} {el:8.0f} ns/iter  polls={stats['polls']} poll ns/iter={stats['poll_ns'] / n:.0f}", flush=True)


def with_region() -> None:
    with reg:
        x.add_(1)


for rep in range(2):
    loop("bare", lambda: x.add_(1))
    rec = recorder.Recorder(be, pool_size=30000, background=False)
    rec.start()
    loop("region, no resolver, big pool", with_region, None)
    t = pc()
    rec.poll(final=True)
    print(f"   one poll for all: {(pc() - t) / n:.0f} ns/region", flush=True)
    rec.stop()
    be = CudaBackend()
    rec = recorder.Recorder(be)
    rec.start()
    loop("region, resolver thread", with_region, rec)
    rec.stop()
    be = CudaBackend()
    for sw in (0.0005, 0.05):
        old = sys.getswitchinterval()
        sys.setswitchinterval(sw)
        rec = recorder.Recorder(be)
        rec.start()
        loop(f"region, resolver thread, switch {sw}", with_region, rec)
        rec.stop()
        sys.setswitchinterval(old)
        be = CudaBackend()
    # pieces
    rec = recorder.Recorder(be, pool_size=30000, background=False)
    rec.start()
    e, xx = rec.enter, rec.exit
    k = recorder.name_key("p")
    loop("enter+exit only (no kernel)", lambda: xx(e(k, None)))
    loop("raw_stream() only", lambda: be.raw_stream(0))
    ev = be.new_event(0)
    loop("record raw only", lambda: be.record(ev, 0))
    loop("perf_counter_ns", pc)
    rec.stop()
    be = CudaBackend()
