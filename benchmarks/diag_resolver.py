"""Does the resolver cost more on its own thread than inline? P1's loop, alternated, ns over bare."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import evtrace
from evtrace import recorder
from evtrace.device import CudaBackend

n = 20000
x = torch.zeros(1, device="cuda")
reg = evtrace.region("tiny")
pc = time.perf_counter_ns


def timed(body: Callable[[int], Any]) -> float:
    torch.cuda.synchronize()
    t = pc()
    for i in range(n):
        body(i)
    el = (pc() - t) / n
    torch.cuda.synchronize()
    return el


def bare() -> float:
    return timed(lambda i: x.add_(1))


def session(background: bool, every: int = 0, poll_s: float = 0.01, **kw: Any) -> Callable[[], float]:
    def run() -> float:
        rec = recorder.Recorder(CudaBackend(), background=background, poll_s=poll_s, **kw)
        rec.start()

        def body(i: int) -> None:
            with reg:
                x.add_(1)
            if every and i % every == 0:
                rec.poll()

        try:
            return timed(body)
        finally:
            rec.stop()

    return run


variants = {
    "bare": bare,
    "thread (default)": session(True),
    "thread, poll 100 ms": session(True, poll_s=0.1),
    "inline poll every 1024": session(False, 1024),
    "inline poll every 8192": session(False, 8192, pool_size=9000),
}
res: dict[str, list[float]] = {k: [] for k in variants}
for t in range(int(sys.argv[1]) if len(sys.argv) > 1 else 9):
    for k in variants if t % 2 == 0 else reversed(variants):
        res[k].append(variants[k]())
for k, v in res.items():
    d = [a - b for a, b in zip(v, res["bare"])] if k != "bare" else v
    print(f"{k:30s} median {statistics.median(d):8.0f} ns  min {min(d):8.0f}  max {max(d):8.0f}", flush=True)
