"""Where P2's overhead goes: the P2 model's forward under each layer of evtrace, alternated.

    python benchmarks/diag_p2.py

A diagnostic, not a figure for BENCHMARKS.md. Each forward is timed on its own; a recorder
without its thread is polled between forwards, outside the timing: its hot path alone.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
from common import alternate  # noqa: E402
from gpu import instrumented  # noqa: E402

import evtrace  # noqa: E402
from evtrace import recorder  # noqa: E402
from evtrace.device import CudaBackend  # noqa: E402

FWD = 50
torch.manual_seed(0)
layers: list[nn.Module] = []
for _ in range(48):
    layers += [nn.Linear(256, 256), nn.GELU()]
model = nn.Sequential(*layers).cuda().eval()
x = torch.randn(8, 256, device="cuda")
out = os.path.join(tempfile.mkdtemp(), "d.json.gz")
pc = time.perf_counter_ns


def forwards(between: Callable[[], Any] = lambda: None) -> float:
    """µs per forward, each timed alone; ``between`` runs untimed after each."""
    total = 0
    with torch.no_grad():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        for _ in range(FWD):
            t = pc()
            model(x)
            total += pc() - t
            between()
    torch.cuda.synchronize()
    return total / FWD / 1000


def hot_path(pool: int, poll: bool) -> Callable[[], float]:
    """A device recorder without its resolver thread: polled between forwards, or never (a pool
    of fresh events big enough for every mark)."""

    def run() -> float:
        with instrumented(model):
            rec = recorder.Recorder(CudaBackend(), background=False, pool_size=pool)
            rec.start()
            try:
                return forwards(rec.poll if poll else lambda: None)
            finally:
                rec.stop()

    return run


def in_session(adjacent: bool = True, **kw: Any) -> Callable[[], float]:
    def run() -> float:
        with instrumented(model, adjacent), evtrace.record(out, quiet=True, **kw):
            return forwards()

    return run


variants = {
    "untraced": forwards,
    "host-only session": in_session(device=False),
    "device hot path, recycled events": hot_path(1024, True),
    "device hot path, fresh events": hot_path((FWD + 3) * 100, False),
    "device session": in_session(),
    "device session, no adjacency": in_session(adjacent=False),
}
res = alternate(variants, 11)
base = res.pop("untraced")
print(
    f"untraced forward: {statistics.median(base):.0f} µs (min {min(base):.0f}, max {max(base):.0f});"
    " 97 modules"
)
for k, v in res.items():
    d = [a - b for a, b in zip(v, base)]
    ratio = statistics.median([a / b for a, b in zip(v, base)])
    print(
        f"{k:34s} +{statistics.median(d):6.0f} µs/forward ({min(d):.0f}…{max(d):.0f}),"
        f" {statistics.median(d) / 97:5.1f} µs/module, ratio {ratio:.3f}",
        flush=True,
    )


def micro(label: str, fn: Callable[[], object], n: int = 100_000) -> None:
    t = pc()
    for _ in range(n):
        fn()
    print(f"{label:40s} {(pc() - t) / n:6.0f} ns", flush=True)


micro("empty lambda", lambda: None)
micro("torch.compiler.is_compiling()", torch.compiler.is_compiling)
micro("torch._C._cuda_getCurrentRawStream(0)", lambda: torch._C._cuda_getCurrentRawStream(0))
with evtrace.record(out, quiet=True):
    rec = recorder.current
    assert rec is not None
    micro("rec.nothing_launched()", rec.nothing_launched)
