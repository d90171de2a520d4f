"""Trace size per region (plain and gzip), for host-only and device regions. Size does not depend
on the card: device regions come from the simulated device of the tests.

    python benchmarks/trace_size.py
    EVTRACE_TRACE_PROCESSOR=/tmp/tp python benchmarks/trace_size.py big 1e6 [arg] [.json.gz .pftrace ...]
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import evtrace  # noqa: E402
from benchmarks.common import emit  # noqa: E402
from tests.simdevice import FakeClock, SimBackend  # noqa: E402

# ---- issue #26: big sessions in both formats (python benchmarks/trace_size.py big N [arg]) ----


def big_session(n: int, arg: bool) -> evtrace.Session:
    """``n`` device regions built with numpy, as a loop makes them: 8 names in turn on one thread,
    10 µs apart, each with a 6 µs device span on one stream 4 µs after its launch."""
    import numpy as np

    from evtrace.device import DeviceInfo
    from evtrace.session import REGION_DTYPE, Stream, Thread

    r = np.zeros(n, REGION_DTYPE)
    r["name"] = np.arange(n) % 8
    r["host_start"] = np.arange(n, dtype=np.int64) * 10_000 + 1_000
    r["host_end"] = r["host_start"] + 7_000 + np.arange(n) % 997
    r["dev_start"] = r["host_start"] + 4_000
    r["dev_end"] = r["dev_start"] + 6_000 - np.arange(n) % 1_013
    args = {i: {"step": i} for i in range(n)} if arg else {}
    return evtrace.Session(
        r,
        [f"layer{k}.forward" for k in range(8)],
        [Thread(1234, "MainThread")],
        [DeviceInfo(0, "Sim GPU 0")],
        [Stream(0, "stream 0 (default)")],
        args=args,
        meta={"evtrace": evtrace.__version__, "duration_ns": int(r["host_end"].max())},
        pid=1234,
    )


def big(n: int, arg: bool, suffixes: list[str], tp: str | None) -> None:
    """Write time, bytes a region, and (with trace_processor) its import: peak memory
    (``/usr/bin/time -v``), time, errors, slice and flow counts."""
    import re
    import subprocess
    import time

    s = big_session(n, arg)
    for suffix in suffixes:
        path = os.path.join(tmp, f"big{suffix}")
        t = time.perf_counter()
        s.save(path)
        took = time.perf_counter() - t
        res = {
            "regions": n,
            "arg": arg,
            "write_s": round(took, 2),
            "bytes_per_region": os.path.getsize(path) / n,
        }
        if tp:
            q = os.path.join(tmp, "q.sql")
            with open(q, "w") as f:
                f.write(
                    "select (select count(*) from slice where name != 'evtrace') as slices,"
                    " (select count(*) from flow) as flows, (select count(*) from stats where value > 0"
                    " and severity in ('error', 'data_losses')) as errors"
                )
            t = time.perf_counter()
            run = subprocess.run(["/usr/bin/time", "-v", tp, "-q", q, path], capture_output=True, text=True)
            res["import_s"] = round(time.perf_counter() - t, 1)
            peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)
            res["import_peak_mb"] = int(peak.group(1)) // 1024 if peak else None
            res["slices_flows_errors"] = run.stdout.strip().splitlines()[-1]
            res["want_slices_flows"] = f"{2 * n},{n}"
        emit(f"big{suffix}", res)
        os.unlink(path)


def small() -> None:
    N = 100_000
    for kind in ("host-only", "device"):
        clk = FakeClock()
        backend = SimBackend(clk) if kind == "device" else None
        out = {}
        for suffix in (".json", ".json.gz", ".pftrace", ".pftrace.gz"):
            path = os.path.join(tmp, f"size{suffix}")
            with evtrace.record(path, backend=backend, clock=clk, device=kind == "device", quiet=True):
                for _i in range(N):
                    with evtrace.region("step"):
                        if backend:
                            backend.launch(10_000)
            out[suffix] = os.path.getsize(path) / N
        emit(f"size_{kind}", {"regions": N, **{f"bytes_per_region{k}": v for k, v in out.items()}})


tmp = tempfile.mkdtemp()
if __name__ == "__main__":
    if sys.argv[1:2] == ["big"]:
        big(
            int(float(sys.argv[2])),
            "arg" in sys.argv[3:],
            [a for a in sys.argv[3:] if a.startswith(".")] or [".json.gz", ".pftrace", ".pftrace.gz"],
            os.environ.get("EVTRACE_TRACE_PROCESSOR"),
        )
    else:
        small()
