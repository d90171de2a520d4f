"""GPU figures for BENCHMARKS.md, each measured side by side with its alternatives in one run.

    python benchmarks/gpu.py all                 # P1, P1b, P2, P2h, P3, P4 (60 s), anchors: ~5 min
    python benchmarks/gpu.py p4 --seconds 600    # the 10-minute alignment run

Every figure alternates its variants trial by trial and reports medians with min/max.
Lines starting with RESULT are JSON; the last lines are a readable table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "samples"))
from common import alternate, emit, machine, ratio_stats, stat  # noqa: E402

import evtrace  # noqa: E402
from evtrace import align as evalign  # noqa: E402
from evtrace import recorder  # noqa: E402
from evtrace.device import CudaBackend  # noqa: E402
from evtrace.instrumentation import Instrumentation, select  # noqa: E402

TMP = tempfile.gettempdir()
dev = torch.device("cuda:0")


def session(**kw: Any) -> evtrace.record:
    return evtrace.record(os.path.join(TMP, "bench.json.gz"), quiet=True, **kw)


def against_untraced(figure: str, res: dict[str, list[float]], label: str, scale: float) -> dict[str, Any]:
    """Each variant's per-trial ratio to "untraced", and the untraced figure itself (÷ scale)."""
    out = {k: ratio_stats(v, res["untraced"]) for k, v in res.items() if k != "untraced"}
    out[label] = stat([v / scale for v in res["untraced"]])
    emit(figure, out)
    return out


def per_iter(n: int, body: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter_ns()
    for _ in range(n):
        body()
    el = time.perf_counter_ns() - t
    torch.cuda.synchronize()
    return el / n


def instrumented(model: nn.Module, adjacent: bool = True) -> Instrumentation:
    """``evtrace.instrument(model)``; without ``adjacent`` as if no module were an nn.Sequential."""
    return Instrumentation(select(model), adjacent=adjacent)


#: this tree journals (evtrace.journal); the trees before it did not
JOURNAL = hasattr(recorder.Recorder, "start_journal")


@contextlib.contextmanager
def live(
    share: bool = True, raw_events: bool = True, journal: bool = False, **kw: Any
) -> Iterator[recorder.Recorder]:
    """A device session as ``record()`` runs one (resolver thread, default pool and anchors),
    without writing a file. ``share=False``: a share window of 0, every boundary its own event;
    ``journal``: with its journal on disk, as ``record()`` keeps one; ``kw``: other Recorder options
    (``background=False``: no resolver until stop)."""
    rec = recorder.Recorder(CudaBackend(raw=raw_events), share_ns=None if share else 0, **kw)
    rec.start()
    trace = Path(TMP) / "bench.json.gz"
    if journal:
        rec.start_journal(trace)
    try:
        yield rec
    finally:
        s = rec.stop()
        if journal:
            rec.close_journal(trace)
    assert s.meta["dropped_device_spans"] == 0


# ---- P1: one region around a tiny kernel ------------------------------------------------------
def p1(n: int = 20000, trials: int = 9) -> dict[str, Any]:
    x = torch.zeros(1, device=dev)
    s = torch.cuda.current_stream()
    e1, e2 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e1.record(s), e2.record(s)
    reg = evtrace.region("tiny")
    rt = ctypes.CDLL("libcudart.so." + torch.version.cuda.split(".")[0])  # type: ignore[union-attr]
    rec_raw = rt.cudaEventRecord
    rec_raw.argtypes, rec_raw.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    h1, h2, sp = (
        ctypes.c_void_p(e1.cuda_event),
        ctypes.c_void_p(e2.cuda_event),
        ctypes.c_void_p(s.cuda_stream),
    )

    def bare() -> float:
        return per_iter(n, lambda: x.add_(1))

    def naive() -> float:
        def body() -> None:
            e1.record()
            x.add_(1)
            e2.record()

        return per_iter(n, body)

    def with_stream() -> float:
        def body() -> None:
            e1.record(s)
            x.add_(1)
            e2.record(s)

        return per_iter(n, body)

    def raw() -> float:
        def body() -> None:
            rec_raw(h1, sp)
            x.add_(1)
            rec_raw(h2, sp)

        return per_iter(n, body)

    def body() -> None:
        with reg:
            x.add_(1)

    def body_new() -> None:  # as users write it: a region made each iteration
        with evtrace.region("tiny"):
            x.add_(1)

    def in_session(
        share: bool = True, raw_events: bool = True, each: Callable[[], None] = body
    ) -> Callable[[], float]:
        def run() -> float:
            with live(share, raw_events):
                return per_iter(n, each)

        return run

    def no_resolver() -> float:
        rec = recorder.Recorder(CudaBackend(), background=False, pool_size=n + 100)
        rec.start()
        try:
            return per_iter(n, body)
        finally:
            rec.stop()

    variants = {
        "bare": bare,
        "region": in_session(),
        "region, a new one each iteration": in_session(each=body_new),
        "region, no sharing": in_session(share=False),
        "region, torch events": in_session(raw_events=False),
        "region, resolver off (hot path only)": no_resolver,
        "Event.record() x2": naive,
        "Event.record(stream) x2": with_stream,
        "raw cudaEventRecord x2": raw,
    }
    res = alternate(variants, trials)
    out = {k: stat([v - b for v, b in zip(vals, res["bare"])]) for k, vals in res.items() if k != "bare"}
    out["bare loop (kernel launch)"] = stat(res["bare"])
    emit("P1_ns_over_bare", out)
    return out


# ---- P1b: no session, and a host-only session, on this machine's CPU ---------------------------
def p1b(n: int = 200_000, trials: int = 7) -> dict[str, Any]:
    reg = evtrace.region("r")

    def loop(body: Callable[[], Any]) -> float:
        t = time.perf_counter_ns()
        for _ in range(n):
            body()
        return (time.perf_counter_ns() - t) / n

    def empty() -> None:
        pass

    def region_body() -> None:
        with reg:
            pass

    def host_session() -> float:
        with evtrace.record(os.path.join(TMP, "p1b.json"), device=False, quiet=True):
            return loop(region_body)

    res = alternate(
        {
            "call": lambda: loop(empty),
            "no session": lambda: loop(region_body),
            "host-only session": host_session,
        },
        trials,
    )
    out = {k: stat([v - b for v, b in zip(res[k], res["call"])]) for k in ("no session", "host-only session")}
    emit("P1b_ns_over_empty_call", out)
    return out


# ---- P2: launch-bound model, every module traced ----------------------------------------------
def p2(fwd: int = 50, trials: int = 9, headline: bool = False) -> dict[str, Any]:
    """P2, 48 x (Linear 256, GELU), every module traced, against the untraced forward. ``headline``:
    only evtrace and torch.profiler, so that each trial's three runs lie close together in time."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(48):
        layers += [nn.Linear(256, 256), nn.GELU()]
    model = nn.Sequential(*layers).to(dev).eval()
    x = torch.randn(8, 256, device=dev)

    def timed() -> float:
        with torch.no_grad():
            for _ in range(3):
                model(x)
            return per_iter(fwd, lambda: model(x))

    def evtrace_all(
        share: bool, adjacent: bool = True, raw_events: bool = True, **kw: Any
    ) -> Callable[[], float]:
        def run() -> float:
            with instrumented(model, adjacent) as ins, live(share, raw_events, **kw):
                assert len(ins) == 97
                return timed()

        return run

    # The floor: what one event per boundary costs before any bookkeeping. Each child's forward
    # wrapped to do only that: nothing, record one event, or record one and read one (the
    # reading's CPU cost, on an event long done, as the resolver would).
    rt = ctypes.PyDLL("libcudart.so." + torch.version.cuda.split(".")[0])  # type: ignore[union-attr]
    rec_raw, el = rt.cudaEventRecord, rt.cudaEventElapsedTime
    rec_raw.argtypes, el.argtypes = (
        [ctypes.c_void_p] * 2,
        [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p],
    )
    ev_a, ev_b, ev_r = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    ev_a.record(), ev_b.record(), ev_r.record()
    torch.cuda.synchronize()
    ha, hb, hr, out = ev_a.cuda_event, ev_b.cuda_event, ev_r.cuda_event, ctypes.c_float()
    op = ctypes.pointer(out)

    def floor(record: bool, read: bool) -> Callable[[], float]:
        def wrap(f: Callable[[Any], Any], stream: int, container: bool) -> Callable[[Any], Any]:
            def forward(x: Any) -> Any:
                if container:  # its start; its end is its last child's
                    if record:
                        rec_raw(hr, stream)
                    if read:
                        el(op, ha, hb)
                    return f(x)
                y = f(x)
                if record:
                    rec_raw(hr, stream)
                if read:
                    el(op, ha, hb)
                return y

            return forward

        def run() -> float:
            stream = torch.cuda.current_stream().cuda_stream
            for m in model.modules():
                m.__dict__["forward"] = wrap(m.forward, stream, m is model)
            try:
                return timed()
            finally:
                for m in model.modules():
                    del m.__dict__["forward"]

        return run

    def noop_hooks() -> float:
        hs = []
        for m in model.modules():
            hs.append(m.register_forward_pre_hook(lambda m, a: None))
            hs.append(m.register_forward_hook(lambda m, a, o: None))
        try:
            return timed()
        finally:
            for h in hs:
                h.remove()

    def profiler() -> float:
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts):
            return timed()

    if headline:
        variants = {"untraced": timed, "evtrace, every module": evtrace_all(True), "torch.profiler": profiler}
        if JOURNAL:
            variants["evtrace, every module, journal"] = evtrace_all(True, journal=True)
        return against_untraced("P2_headline", alternate(variants, trials), "untraced forward µs", 1000)
    res = alternate(
        {
            "untraced": timed,
            "evtrace, every module": evtrace_all(True),
            "evtrace, no Sequential adjacency": evtrace_all(True, adjacent=False),
            "evtrace, event pair per module": evtrace_all(False, adjacent=False),
            "evtrace, torch events": evtrace_all(True, raw_events=False),
            "evtrace, resolver off (hot path only)": evtrace_all(True, background=False, pool_size=8192),
            "evtrace, resolver every 50 ms": evtrace_all(True, poll_s=0.05),
            "floor: no-op forward wrappers": floor(False, False),
            "floor: wrappers recording one raw event per boundary": floor(True, False),
            "floor: ... and reading one per boundary": floor(True, True),
            "no-op module hooks": noop_hooks,
            "torch.profiler": profiler,
        },
        trials,
    )
    return against_untraced("P2_ratio", res, "untraced forward µs", 1000)


# ---- P3: the seed article's pipeline -----------------------------------------------------------
def p3(iters: int = 10, trials: int = 21) -> dict[str, Any]:
    from models import Model1, Model2, cpu_task

    torch.manual_seed(0)
    m1, m2 = Model1().to(dev).eval(), Model2().to(dev).eval()
    x = torch.randn(32, 3, 224, 224, device=dev)

    def pipeline(mode: str) -> float:
        rng = np.random.default_rng(0)  # the same CPU task in every variant
        torch.cuda.synchronize()
        t = time.perf_counter_ns()
        with torch.inference_mode():
            for _ in range(iters):
                if mode == "traced":
                    with evtrace.region("step"):
                        with evtrace.region("model1"):
                            y = m1(x)
                        with evtrace.region("cpu_task", host_only=True):
                            cpu_task(rng)
                        with evtrace.region("model2"):
                            m2(y)
                else:
                    y = m1(x)
                    if mode == "sync":
                        torch.cuda.synchronize()
                    cpu_task(rng)
                    m2(y)
                    if mode == "sync":
                        torch.cuda.synchronize()
        torch.cuda.synchronize()
        return (time.perf_counter_ns() - t) / iters

    def traced() -> float:
        with evtrace.instrument(m1, depth=2), evtrace.instrument(m2, depth=2), session():
            return pipeline("traced")

    def profiler() -> float:
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts):
            return pipeline("plain")

    pipeline("plain")
    res = alternate(
        {
            "untraced": lambda: pipeline("plain"),
            "evtrace": traced,
            "sync timing": lambda: pipeline("sync"),
            "torch.profiler": profiler,
        },
        trials,
    )
    return against_untraced("P3_ratio", res, "untraced step ms", 1e6)


# ---- P6: the CLI defaults on a realistic training step ----------------------------------------
def p6(steps: int = 10, trials: int = 9) -> dict[str, Any]:
    """A small transformer's training step (AdamW, .item() each step), untraced vs traced the way
    `python -m evtrace` does by default (modules to depth 2, backward, optimizer, waits)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=4).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(16, 128, 256, device=dev)

    def train() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter_ns()
        for _ in range(steps):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            loss.item()
        torch.cuda.synchronize()
        return (time.perf_counter_ns() - t) / steps

    def traced() -> float:
        with session(hooks=True):
            return train()

    def modules(backward: bool) -> Callable[[], float]:
        def run() -> float:
            with evtrace.instrument(model, depth=2, backward=backward), session():
                return train()

        return run

    train()
    res = alternate(
        {
            "untraced": train,
            "evtrace CLI defaults": traced,
            "modules to depth 2, forward only": modules(False),
            "modules to depth 2, forward and backward": modules(True),
        },
        trials,
    )
    return against_untraced("P6_ratio", res, "untraced step ms", 1e6)


# ---- P4: alignment against CUPTI --------------------------------------------------------------
def wall_to_perf() -> tuple[float, float]:
    """(perf_counter ns, time_ns) at one instant: the tightest of many brackets."""
    best = (1 << 62, 0.0, 0.0)
    for _ in range(2000):
        a = time.perf_counter_ns()
        w = time.time_ns()
        b = time.perf_counter_ns()
        if b - a < best[0]:
            best = (b - a, (a + b) / 2, float(w))
    return best[1], best[2]


def spin(us: float) -> None:
    torch.cuda._sleep(int(us * 1980))  # ~1.98 GHz


def p4(seconds: float) -> dict[str, Any]:
    """Regions that each hold one kernel, in busy and idle phases, traced by evtrace and by the
    profiler (CUPTI) at once. Error = evtrace's device end - CUPTI's kernel end, on perf_counter.

    The profiler's clock is mapped onto perf_counter through "probe" record_function ranges taken
    throughout the run, each bracketed by perf_counter stamps (midpoint to midpoint, a linear fit):
    a host-to-host mapping, independent of evtrace's anchors.
    """
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    prof = torch.profiler.profile(activities=acts)
    r = Kept()
    probes: list[tuple[int, int]] = []
    w_start = wall_to_perf()
    with prof, r:
        t_end = time.perf_counter() + seconds
        phase = 0
        while time.perf_counter() < t_end:
            busy = phase % 2 == 0
            ph_end = min(time.perf_counter() + 2.5, t_end)
            while time.perf_counter() < ph_end:
                with evtrace.region("k"):
                    spin(500 if busy else 50)
                time.sleep(0.0005 if busy else 0.02)
                if not busy:
                    a = time.perf_counter_ns()
                    with torch.profiler.record_function("probe"):
                        pass
                    probes.append((a, time.perf_counter_ns()))
            phase += 1
        torch.cuda.synchronize()
    w_end = wall_to_perf()
    s = r.session
    assert s is not None
    # (A) the profiler's own unix-ns kernel times, through a tight time_ns bracket at each end
    unix = None
    try:
        kev = [
            e
            for e in prof.profiler.kineto_results.events()
            if "spin" in e.name() and e.device_type() == torch.autograd.DeviceType.CUDA
        ]
        kev.sort(key=lambda e: e.start_ns())
        wslope = (w_end[0] - w_start[0]) / (w_end[1] - w_start[1])
        unix = (
            np.array([w_start[0] + (e.start_ns() + e.duration_ns() - w_start[1]) * wslope for e in kev])
            - r.rec.origin_ns
        )
    except Exception as e:  # report, and fall back to (B)
        print("unix-ns mapping unavailable:", type(e).__name__, e)
    path = os.path.join(TMP, "p4_prof.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        doc = json.load(f)
    evs = doc["traceEvents"]
    probe_ev = sorted(
        (e for e in evs if e.get("name") == "probe" and e.get("ph") == "X"), key=lambda e: float(e["ts"])
    )
    assert len(probe_ev) == len(probes), (len(probe_ev), len(probes))
    kx = np.array([float(e["ts"]) + float(e.get("dur", 0)) / 2 for e in probe_ev])
    py = np.array([(a + b) / 2 for a, b in probes], dtype=float) - r.rec.origin_ns
    k0 = kx[0]
    slope, icept = np.polyfit(kx - k0, py, 1)
    probe_resid = py - (icept + slope * (kx - k0))
    to_perf = lambda us: icept + slope * (us - k0)  # noqa: E731
    kernels = sorted(
        (e for e in evs if e.get("cat") == "kernel" and "spin" in e.get("name", "")),
        key=lambda e: float(e["ts"]),
    )
    k_end = np.array([to_perf(float(e["ts"]) + float(e["dur"])) for e in kernels])
    assert s.meta["dropped_device_spans"] == 0 and s.device_spans == len(s)
    reg = s.regions
    order = np.argsort(reg["host_start"], kind="stable")
    d_end = reg["dev_end"][order].astype(float)
    n = min(len(k_end), len(d_end))
    err_us = (d_end[:n] - k_end[:n]) / 1000
    err_unix = (
        (d_end[: len(unix)] - unix[: len(d_end)]) / 1000
        if unix is not None and len(unix) == len(d_end)
        else None
    )
    # a single anchor (the first), as a one-shot calibration would do
    anc = [np.array(c, dtype=float) for c in zip(*r.rec.anchors(0))]
    single = evalign.fit(anc[0][:1], anc[1][:1], anc[2][:1])
    d_single = single.to_host(r.rec.raw_regions()["dev_end"][order]) - r.rec.origin_ns
    ref = unix if err_unix is not None else k_end
    err_single = (d_single[:n] - ref[:n]) / 1000
    al = s.meta["alignment"]["0"]
    out = {
        "seconds": seconds,
        "regions": int(len(reg)),
        "kernels": len(kernels),
        "matched": n,
        "median_us": float(np.median(err_us)),
        "median_abs_us": float(np.median(np.abs(err_us))),
        "p95_abs_us": float(np.percentile(np.abs(err_us), 95)),
        "p5_us": float(np.percentile(err_us, 5)),
        "p95_us": float(np.percentile(err_us, 95)),
        "max_abs_us": float(np.max(np.abs(err_us))),
        "single_anchor_abs_us_last_50": float(np.abs(err_single[-50:]).mean()),
        "unix_ns_mapping": None
        if err_unix is None
        else {
            "median_us": float(np.median(err_unix)),
            "median_abs_us": float(np.median(np.abs(err_unix))),
            "p95_abs_us": float(np.percentile(np.abs(err_unix), 95)),
            "p5_us": float(np.percentile(err_unix, 5)),
            "max_abs_us": float(np.max(np.abs(err_unix))),
            # the same for the regions of the run's first minute
            "first_60s": {
                k: f(err_unix[reg["host_start"][order][: len(err_unix)] < 60e9])
                for k, f in (
                    ("median_us", np.median),
                    ("p95_abs_us", lambda e: np.percentile(np.abs(e), 95)),
                    ("n", len),
                )
            },
        },
        "profiler_json_keys": sorted(k for k in doc if k != "traceEvents")[:12],
        "profiler_clock_fit": {
            "probes": len(probes),
            "resid_us_median_abs": float(np.median(np.abs(probe_resid)) / 1000),
            "ppm": float((slope / 1000 - 1) * 1e6),
        },
        "anchors": al["anchors"],
        "drift_ppm": al["drift_ppm"],
        "anchors_late": al["anchors_late"],
        "slack_us_p99": al["slack_us_p99"],
        "slack_us_max": al["slack_us_max"],
        "clamped": s.meta["clamped_device_spans"],
        "over_100us": int((np.abs(err_us) > 100).sum()),
        # the worst few: where in the run, and how long evtrace's span and CUPTI's kernel were
        "worst": [
            {
                "i": int(i),
                "of": n,
                "err_us": round(float(err_us[i]), 1),
                "at_s": round(float(reg["host_start"][order][i]) / 1e9, 3),
                "span_us": round(float(d_end[i] - reg["dev_start"][order][i]) / 1e3, 1),
                "kernel_us": round(float(kernels[i]["dur"]), 1),
                "host_us": round(float(reg["host_end"][order][i] - reg["host_start"][order][i]) / 1e3, 1),
            }
            for i in np.argsort(-np.abs(err_us))[:5]
        ],
    }
    emit(f"P4_{int(seconds)}s", out)
    return out


class Kept:
    """A device session whose recorder is kept after ``stop()``: its raw anchors and device ms,
    for the single-anchor comparison."""

    def __init__(self) -> None:
        self.rec = recorder.Recorder(CudaBackend())
        self.session: evtrace.Session | None = None

    def __enter__(self) -> Kept:
        self.rec.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.session = self.rec.stop()


# ---- anchors: cost, promptness under load, float32 --------------------------------------------
def anchors() -> dict[str, Any]:
    rec = recorder.Recorder(CudaBackend(), background=False, anchor_interval_s=1e6)  # anchors by hand
    rec.start()
    costs = []
    for _ in range(50):
        t = time.perf_counter_ns()
        rec.anchor_now()
        costs.append((time.perf_counter_ns() - t) / 1000)
        rec.poll()
    torch.cuda.synchronize()
    rec.poll()
    n_idle = len(rec.anchors(0))
    time.sleep(0.05)
    rec.anchor_now()
    torch.cuda.synchronize()
    rec.poll()
    busy_from = len(rec.anchors(0))
    # saturate the main stream with ~100 ms of queued work, then anchor on the side stream
    spin(100_000)
    for _ in range(10):
        time.sleep(0.005)
        rec.anchor_now()
    torch.cuda.synchronize()
    time.sleep(0.05)
    rec.anchor_now()
    torch.cuda.synchronize()
    rec.poll()
    lo, hi, ms = (np.array(c, dtype=float) for c in zip(*rec.anchors(0)))
    idle = np.r_[np.arange(n_idle, n_idle + 1), np.arange(len(ms) - 1, len(ms))]
    fit = evalign.fit(lo[idle], hi[idle], ms[idle])
    busy = np.arange(busy_from, busy_from + 10)
    err = (fit.to_host(ms[busy]) - (lo[busy] + hi[busy]) / 2) / 1000
    rec.stop()
    ulp = {f"{x:g} ms": float(np.spacing(np.float32(x)) * 1000) for x in (1e3, 1e4, 1e6)}
    out = {
        "anchor_cost_us": stat(costs),
        "interval_s": 1.0,
        "saturated_anchor_err_us": {
            "min": float(err.min()),
            "max": float(err.max()),
            "median": float(np.median(err)),
        },
        "float32_ulp_us_at": ulp,
    }
    emit("anchors", out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    figures: dict[str, Callable[[], dict[str, Any]]] = {
        "P1": p1,
        "P1b": p1b,
        "P2": lambda: p2(fwd=a.fwd, trials=a.trials or 9),
        "P2h": lambda: p2(fwd=a.fwd, trials=a.trials or 31, headline=True),
        "P3": lambda: p3(trials=a.trials or 21),
        "P6": p6,
        "anchors": anchors,
        "P4": lambda: p4(a.seconds),
    }
    ap.add_argument("what", choices=["all", *(k.lower() for k in figures)])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--trials", type=int, help="P2's and P3's alternations (default P2 9, P2h 31, P3 21)")
    ap.add_argument("--fwd", type=int, default=50, help="P2's forwards a trial")
    a = ap.parse_args()
    emit("machine", machine())
    table = {k: run() for k, run in figures.items() if a.what in ("all", k.lower())}
    gc.collect()
    for k, v in table.items():
        print(k, json.dumps(v, indent=None, default=str)[:2000])


if __name__ == "__main__":
    main()
