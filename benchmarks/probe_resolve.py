"""What resolving a mark costs on this machine: the CUDA calls the resolver makes, one loop each."""

from __future__ import annotations

import ctypes
import statistics
import time

import torch

import evtrace
from evtrace import recorder
from evtrace.device import CudaBackend

pc = time.perf_counter_ns


def bench(label: str, fn, n: int = 20000, reps: int = 5) -> None:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(reps):
        t0 = pc()
        for _ in range(n):
            fn()
        out.append((pc() - t0) / n)
    print(f"{label:48s} {statistics.median(out):8.0f} ns  (min {min(out):.0f})", flush=True)


torch.cuda.init()
x = torch.zeros(1, device="cuda")
main = torch.cuda.current_stream()
side = torch.cuda.Stream()
major = torch.version.cuda.split(".")[0]  # type: ignore[union-attr]
for kind, lib in (("PyDLL", ctypes.PyDLL(f"libcudart.so.{major}")), ("CDLL", ctypes.CDLL(f"libcudart.so.{major}"))):
    vp = ctypes.c_void_p
    create = lib.cudaEventCreateWithFlags
    create.argtypes, create.restype = [ctypes.POINTER(vp), ctypes.c_uint], ctypes.c_int
    rec = lib.cudaEventRecord
    rec.argtypes, rec.restype = [vp, vp], ctypes.c_int
    query = lib.cudaEventQuery
    query.argtypes, query.restype = [vp], ctypes.c_int
    el = lib.cudaEventElapsedTime
    el.argtypes, el.restype = [ctypes.POINTER(ctypes.c_float), vp, vp], ctypes.c_int
    evs = []
    for _ in range(4):
        h = vp()
        assert create(ctypes.byref(h), 0) == 0
        evs.append(h.value)
    a, b, c, d = evs
    ms, sd = main.cuda_stream, side.cuda_stream
    out = ctypes.c_float()
    op = ctypes.pointer(out)
    rec(a, sd)
    rec(b, ms)
    rec(c, ms)
    torch.cuda.synchronize()
    print(kind)
    bench("  query (done)", lambda: query(b))
    bench("  elapsed same stream (done)", lambda: el(op, b, c))
    bench("  elapsed side anchor -> main (done)", lambda: el(op, a, b))
    bench("  record idle side stream", lambda: rec(d, sd))
    torch.cuda.synchronize()

    def rec_after_kernel() -> None:
        x.add_(1)
        rec(d, ms)

    bench("  kernel + record", rec_after_kernel)
    torch.cuda.synchronize()
    bench("  kernel alone", lambda: x.add_(1))
    torch.cuda.synchronize()
    # many distinct done events, each resolved once, as the resolver does
    many = []
    for _ in range(20000):
        h = vp()
        create(ctypes.byref(h), 0)
        many.append(h.value)
    for h in many:
        x.add_(1)
        rec(h, ms)
    torch.cuda.synchronize()
    t0 = pc()
    for h in many:
        el(op, a, h)
    print(f"{'  elapsed anchor -> 20k distinct done events':48s} {(pc() - t0) / len(many):8.0f} ns", flush=True)
    t0 = pc()
    for h in many:
        query(h)
    print(f"{'  query 20k distinct done events':48s} {(pc() - t0) / len(many):8.0f} ns", flush=True)
torch.cuda.synchronize()

# how often adjacent boundaries share a mark in the P1 loop
reg = evtrace.region("tiny")
rec_ = recorder.Recorder(CudaBackend(), pool_size=30000, background=False)
rec_.start()
for _ in range(20000):
    with reg:
        x.add_(1)
marks = {id(r[0][6]) for r in rec_._done} | {id(r[4]) for r in rec_._done}
print(f"P1 loop: {len(rec_._done)} regions, {len(marks)} distinct marks", flush=True)
rec_.stop()
