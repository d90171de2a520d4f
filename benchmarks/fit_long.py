"""The cost of the device clock's fit at ``stop()`` for long runs (issue #23): time and peak memory
of ``align.fit`` on synthetic stamps of a 1 h and an 8 h run, fed as ``build.py`` feeds them.

    python benchmarks/fit_long.py            # 1 h and 8 h, the current fit
    python benchmarks/fit_long.py --before   # the same, and the fit as it was (tests/fit_reference.py)

The stamps (``tests.fit_reference.synthetic``): an anchor every 0.1 s, a region mark every 5 ms
(5.76M in 8 h), exponential stamping delays, a third of the marks queued behind kernels, a
drift of 21 ppm that wanders, and three 3 s stretches an hour in which every stamp is 10-20 µs
late; the marks in device-time order with their boundaries' host times, as ``_first_boundaries``
gives them. They are written once to .npy files; each figure comes from a fresh interpreter that
loads them and runs one fit:

- time: wall-clock seconds of the one ``fit`` call (its own process, no tracing);
- peak MB above the inputs, two ways: tracemalloc's peak during the fit less what was traced
  before it (numpy reports its buffers to tracemalloc), and /proc/self/status VmHWM after the fit
  less VmRSS before it (the high-water mark reset through /proc/self/clear_refs first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import numpy as np

from benchmarks.common import emit, machine
from tests.fit_reference import synthetic


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(folder: str, variant: str, how: str) -> None:
    """One fit in this (fresh) interpreter; prints its figures as JSON."""
    import tracemalloc

    a = {k: np.load(os.path.join(folder, f"{k}.npy")) for k in ("lo", "hi", "ms", "first", "stamps")}
    if variant == "before":
        from tests.fit_reference import old_fit as fit
    else:
        from evtrace.align import fit
    out: dict[str, float] = {}
    if how == "trace":
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        fit(a["lo"], a["hi"], a["ms"], a["first"], a["stamps"], latency_ns=None)
        out["tracemalloc_mb"] = (tracemalloc.get_traced_memory()[1] - base) / 1e6
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        rss = _status("VmRSS")
        t = time.perf_counter()
        fit(a["lo"], a["hi"], a["ms"], a["first"], a["stamps"], latency_ns=None)
        out["seconds"] = time.perf_counter() - t
        out["vmhwm_mb"] = (_status("VmHWM") - rss) / 1e6
    print(json.dumps(out))


def measure(folder: str, variant: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for how in ("time", "trace"):
        cmd = [sys.executable, __file__, "--child", folder, variant, how]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out.update(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--before", action="store_true", help="time the fit as it was too")
    p.add_argument("--hours", type=float, nargs="*", default=[1.0, 8.0])
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    print(json.dumps(machine()))
    for hours in args.hours:
        with tempfile.TemporaryDirectory() as folder:
            data = synthetic(hours)
            for k, v in data.items():
                np.save(os.path.join(folder, f"{k}.npy"), v)
            inputs = sum(v.nbytes for v in data.values()) / 1e6
            del data
            for variant in (["before"] if args.before else []) + ["after"]:
                got = measure(folder, variant)
                emit(f"fit_{hours:g}h_{variant}", {"inputs_mb": round(inputs, 1), **got})


if __name__ == "__main__":
    main()
