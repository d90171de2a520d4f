"""Trace size per region (plain and gzip), for host-only and device regions. Size does not depend
on the card: device regions come from the simulated device of the tests.

    python benchmarks/trace_size.py
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import evtrace  # noqa: E402
from benchmarks.common import emit  # noqa: E402
from tests.simdevice import FakeClock, SimBackend  # noqa: E402

N = 100_000
tmp = tempfile.mkdtemp()
for kind in ("host-only", "device"):
    clk = FakeClock()
    backend = SimBackend(clk) if kind == "device" else None
    out = {}
    for suffix in (".json", ".json.gz"):
        path = os.path.join(tmp, f"size{suffix}")
        with evtrace.record(path, backend=backend, clock=clk, device=kind == "device", quiet=True):
            for _i in range(N):
                with evtrace.region("step"):
                    if backend:
                        backend.launch(10_000)
        out[suffix] = os.path.getsize(path) / N
    emit(
        f"size_{kind}",
        {"regions": N, "bytes_per_region_json": out[".json"], "bytes_per_region_gz": out[".json.gz"]},
    )
