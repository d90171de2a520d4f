"""Host-only figures, for the 2-core CPU machine: P1b (region cost), an instrumented module's
cost, and P5 (1M regions).

python benchmarks/host_cpu.py [--regions 1000000]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import alternate, emit, machine, stat  # noqa: E402

import evtrace  # noqa: E402
from evtrace import recorder  # noqa: E402

#: this tree journals (evtrace.journal); the trees before it did not
JOURNAL = hasattr(recorder.Recorder, "start_journal")


def p1b(n: int = 200_000, trials: int = 9) -> None:
    reg = evtrace.region("r")

    @evtrace.region("f")
    def f() -> None:
        pass

    def plain() -> None:
        pass

    def loop_bare() -> float:
        t = time.perf_counter_ns()
        for _ in range(n):
            pass
        return (time.perf_counter_ns() - t) / n

    def loop_region() -> float:
        t = time.perf_counter_ns()
        for _ in range(n):
            with reg:
                pass
        return (time.perf_counter_ns() - t) / n

    def loop_region_new() -> float:  # as users write it: a new region each iteration
        t = time.perf_counter_ns()
        for _ in range(n):
            with evtrace.region("r"):
                pass
        return (time.perf_counter_ns() - t) / n

    def loop_region_arg() -> float:
        t = time.perf_counter_ns()
        for i in range(n):
            with evtrace.region("r", step=i):
                pass
        return (time.perf_counter_ns() - t) / n

    def loop_fn_bare() -> float:
        t = time.perf_counter_ns()
        for _ in range(n):
            plain()
        return (time.perf_counter_ns() - t) / n

    def loop_fn_region() -> float:
        t = time.perf_counter_ns()
        for _ in range(n):
            f()
        return (time.perf_counter_ns() - t) / n

    def loop_clock() -> float:
        pc = time.perf_counter_ns
        t = time.perf_counter_ns()
        for _ in range(n):
            pc()
        return (time.perf_counter_ns() - t) / n

    variants = {
        "bare": loop_bare,
        "with region (one object reused)": loop_region,
        "with region(...) per iteration": loop_region_new,
        "with region(..., step=i)": loop_region_arg,
        "call": loop_fn_bare,
        "@region call": loop_fn_region,
        "perf_counter_ns": loop_clock,
    }
    off = alternate(variants, trials)
    emit("P1b_no_session_ns", {k: stat(v) for k, v in off.items()})

    def in_session(fn, **opts):  # type: ignore[no-untyped-def]
        def run() -> float:
            path = os.path.join(tempfile.gettempdir(), "p1b.json")
            with evtrace.record(path, device=False, quiet=True, **opts):
                return fn()

        return run

    variants = {
        "bare": loop_bare,
        "with region (one object reused)": in_session(loop_region),
        "with region(...) per iteration": in_session(loop_region_new),
        "with region(..., step=i)": in_session(loop_region_arg),
        "@region call": in_session(loop_fn_region),
        "call": loop_fn_bare,
    }
    if JOURNAL:  # the same, with no journal beside the trace
        variants["with region(...) per iteration, no journal"] = in_session(loop_region_new, journal=False)
        variants["with region(..., step=i), no journal"] = in_session(loop_region_arg, journal=False)
    on = alternate(variants, trials)
    emit("P1b_host_session_ns", {k: stat(v) for k, v in on.items()})


def modules(n: int = 2000, trials: int = 9) -> None:
    """ns a module call adds when ``instrument(model)`` traces it: an nn.Sequential of 96
    nn.Identity (nothing of their own to do), ``torch.no_grad()``, minus the plain forward."""
    import torch
    from torch import nn

    model = nn.Sequential(*(nn.Identity() for _ in range(96)))
    x = torch.zeros(1)

    def forward() -> float:
        t = time.perf_counter_ns()
        for _ in range(n):
            model(x)
        return (time.perf_counter_ns() - t) / n / 97  # the 96 children and the container

    def traced(session: bool) -> Callable[[], float]:
        def run() -> float:
            with evtrace.instrument(model):
                if not session:
                    return forward()
                with evtrace.record(
                    os.path.join(tempfile.gettempdir(), "mod.json"), device=False, quiet=True
                ):
                    return forward()

        return run

    with torch.no_grad():
        res = alternate(
            {"plain": forward, "no session": traced(False), "host-only session": traced(True)}, trials
        )
    out = {k: stat([a - b for a, b in zip(v, res["plain"])]) for k, v in res.items() if k != "plain"}
    emit("modules_ns_over_plain", out | {"plain forward, ns a module": stat(res["plain"])})


def p5(n: int) -> None:
    """Record n host-only regions and export them to .json.gz; then memory per region while
    recording (a second run under tracemalloc, which slows recording, so it is not timed)."""
    path = os.path.join(tempfile.gettempdir(), "p5.json.gz")

    def record(trace_memory: bool) -> tuple[recorder.Recorder, float, float]:
        gc.collect()
        if trace_memory:
            tracemalloc.start()
        rec = recorder.Recorder(None, poll_s=0.01)
        rec.start()
        if JOURNAL and not trace_memory:  # as record() does: the journal beside the trace
            rec.start_journal(Path(path))
        t0 = time.perf_counter()
        for _ in range(n):
            with evtrace.region("step"):
                pass
        t_rec = time.perf_counter() - t0
        rec.poll(final=True)
        mem = 0.0
        if trace_memory:
            mem = tracemalloc.get_traced_memory()[0] / n
            tracemalloc.stop()
        return rec, t_rec, mem

    rec, t_rec, _ = record(False)
    t0 = time.perf_counter()
    s = rec.stop()
    t_stop = time.perf_counter() - t0
    t0 = time.perf_counter()
    s.save(path)
    journal_bytes = sum(f.stat().st_size for f in rec.journal.iterdir()) if JOURNAL and rec.journal else 0
    if JOURNAL:
        rec.close_journal(Path(path))  # as record() does once the trace is written: it goes
    t_save = time.perf_counter() - t0
    size = os.path.getsize(path)
    del s, rec
    rec, _, mem = record(True)
    rec.stop()
    emit(
        "P5",
        {
            "regions": n,
            "record_s": t_rec,
            "stop_s": t_stop,
            "export_s": t_save,
            "stop_and_write_s": t_stop + t_save,  # what a user waits for at the end of a run
            "bytes_per_region_recording": mem,
            "gz_bytes": size,
            "gz_bytes_per_region": size / n,
            "journal_bytes_per_region": journal_bytes / n,
        },
    )


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def stress(n: int, max_regions: int) -> None:
    """An hour's worth of regions (at ~1 kHz, a few million) under the default ring: flat memory."""
    rec = recorder.Recorder(None, max_regions=max_regions)
    rec.start()
    samples = []
    step = n // 10
    t0 = time.perf_counter()
    for i in range(n):
        with evtrace.region("step"):
            pass
        if i % step == step - 1:
            time.sleep(0.05)  # let the resolver catch up, as it would in a real hour
            samples.append(round(rss_mb(), 1))
    t = time.perf_counter() - t0
    s = rec.stop()
    emit(
        "stress",
        {
            "regions": n,
            "max_regions": max_regions,
            "kept": len(s),
            "dropped": s.meta["dropped_regions"],
            "rss_mb_every_tenth": samples,
            "seconds": t,
        },
    )


def ring(n: int, max_regions: int) -> None:
    """The worst single region's host cost while the ring drops: an int arg on every region, as
    users write it, each region timed on its own once the ring is full."""
    import numpy as np

    rec = recorder.Recorder(None, max_regions=max_regions)
    rec.start()
    cost = np.zeros(n - max_regions, np.int64)
    clock = time.perf_counter_ns
    for i in range(max_regions):
        with evtrace.region("step", step=i):
            pass
    for i in range(len(cost)):
        t = clock()
        with evtrace.region("step", step=i):
            pass
        cost[i] = clock() - t
    s = rec.stop()
    emit(
        "ring",
        {
            "max_regions": max_regions,
            "regions_timed": len(cost),
            "dropped": s.meta["dropped_regions"],
            "worst_us": float(cost.max()) / 1e3,
            "p99_99_us": float(np.percentile(cost, 99.99)) / 1e3,
            "median_us": float(np.median(cost)) / 1e3,
            "over_1ms": int((cost > 1_000_000).sum()),
        },
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--regions", type=int, default=1_000_000)
    ap.add_argument("--only", choices=["p1b", "modules", "p5", "stress", "ring"])
    a = ap.parse_args()
    emit("machine", machine() | {"cores": str(os.cpu_count())})
    if a.only in (None, "p1b"):
        p1b()
    if a.only in (None, "modules"):
        modules()
    if a.only in (None, "p5"):
        p5(a.regions)
    if a.only in (None, "stress"):
        stress(8_000_000, 4_000_000)
    if a.only in (None, "ring"):
        ring(3_000_000, 1_000_000)
