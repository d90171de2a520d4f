"""Diagnostic (session 6; deleted after use, figures in BENCHMARKS.md): does a forward's cost grow
with the session's length? P2's model, N forwards in one session, each forward timed on the host;
untraced / evtrace / torch.profiler alternated 3 times."""

import json
import time

import numpy as np
import torch
import torch.nn as nn

from evtrace import recorder
from evtrace.device import CudaBackend
from evtrace.instrumentation import Instrumentation, select

dev = torch.device("cuda:0")
torch.manual_seed(0)
layers = []
for _ in range(48):
    layers += [nn.Linear(256, 256), nn.GELU()]
model = nn.Sequential(*layers).to(dev).eval()
x = torch.randn(8, 256, device=dev)
import os

N = int(os.environ.get("STEADY_N", "600"))


def run():
    out = np.empty(N)
    for _ in range(3):
        model(x)
    torch.cuda.synchronize()
    for i in range(N):
        t = time.perf_counter_ns()
        model(x)
        out[i] = time.perf_counter_ns() - t
    torch.cuda.synchronize()
    return out


made = [0]


def untraced():
    return run(), {}


def ev():
    b = CudaBackend(raw=True)
    ne = b.new_event

    def counting(d):
        made[0] += 1
        return ne(d)

    b.new_event = counting
    made[0] = 0
    with Instrumentation(select(model)):
        rec = recorder.Recorder(b)
        rec.start()
        try:
            r = run()
        finally:
            s = rec.stop()
    return r, {
        "events_created": made[0],
        "dropped": s.meta["dropped_device_spans"],
        "regions": len(s.regions),
    }


def prof():
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts):
        return run(), {}


res = {"untraced": [], "evtrace": [], "profiler": []}
info = {}
with torch.no_grad():
    for _t in range(3):
        for k, f in (("untraced", untraced), ("evtrace", ev), ("profiler", prof)):
            r, i = f()
            res[k].append(r)
            info.setdefault(k, []).append(i)
edges = [e for e in (0, 10, 25, 50, 100, 200, 400, 600) if e <= N]
for k, rs in res.items():
    a = np.vstack(rs)
    med = {f"{lo}-{hi}": round(float(np.median(a[:, lo:hi])) / 1000, 1) for lo, hi in zip(edges, edges[1:])}
    mean = {f"{lo}-{hi}": round(float(np.mean(a[:, lo:hi])) / 1000, 1) for lo, hi in zip(edges, edges[1:])}
    print("STEADY us median", k, json.dumps(med), "mean", json.dumps(mean), json.dumps(info.get(k)))
u = np.vstack(res["untraced"])
for k in ("evtrace", "profiler"):
    a = np.vstack(res[k])
    row = {
        f"{lo}-{hi}": round(float(np.mean(a[:, lo:hi]) / np.mean(u[:, lo:hi])), 3)
        for lo, hi in zip(edges, edges[1:])
    }
    print("RATIO of means", k, json.dumps(row))
