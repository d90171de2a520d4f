"""What the event calls evtrace makes cost: runtime vs driver API, ctypes itself, how handles are
passed, and reading many distinct done events once each, as the resolver does.

    python benchmarks/probe_driver.py

A diagnostic, not a figure for BENCHMARKS.md: ns per call, median of 5 loops of 20,000.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

pc = time.perf_counter_ns
vp, cint = ctypes.c_void_p, ctypes.c_int


def bench(label: str, fn: Callable[[], Any], n: int = 20000, reps: int = 5) -> None:
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = pc()
        for _ in range(n):
            fn()
        out.append((pc() - t0) / n)
    torch.cuda.synchronize()
    print(f"{label:52s} {statistics.median(out):8.0f} ns  (min {min(out):.0f})", flush=True)


def fn(lib: Any, name: str, argtypes: list[Any]) -> Any:
    f = getattr(lib, name)
    f.argtypes, f.restype = argtypes, cint
    return f


torch.cuda.init()
x = torch.zeros(1, device="cuda")
ms, sd = torch.cuda.current_stream().cuda_stream, torch.cuda.Stream().cuda_stream
major = torch.version.cuda.split(".")[0]  # type: ignore[union-attr]
rt = ctypes.PyDLL(f"libcudart.so.{major}")
drv = ctypes.PyDLL("libcuda.so.1")
libc = ctypes.PyDLL(None)

create = fn(rt, "cudaEventCreateWithFlags", [ctypes.POINTER(vp), ctypes.c_uint])
evs = []
for _ in range(4):
    h = vp()
    assert create(ctypes.byref(h), 0) == 0
    evs.append(h.value)
a, b, c, d = evs
out = ctypes.c_float()
op = ctypes.pointer(out)

labs = libc.labs
labs.argtypes, labs.restype = [ctypes.c_long], ctypes.c_long
getpid = libc.getpid
bench("ctypes: getpid() (no args)", getpid)
bench("ctypes: labs(int) (one converted arg)", lambda: labs(5))
bench("torch._C._cuda_getCurrentRawStream(0)", lambda: torch._C._cuda_getCurrentRawStream(0))

el_name = "cuEventElapsedTime_v2" if hasattr(drv, "cuEventElapsedTime_v2") else "cuEventElapsedTime"
apis = {
    "runtime": (
        fn(rt, "cudaEventRecord", [vp, vp]),
        fn(rt, "cudaEventQuery", [vp]),
        fn(rt, "cudaEventElapsedTime", [ctypes.POINTER(ctypes.c_float), vp, vp]),
    ),
    "driver": (
        fn(drv, "cuEventRecord", [vp, vp]),
        fn(drv, "cuEventQuery", [vp]),
        fn(drv, el_name, [ctypes.POINTER(ctypes.c_float), vp, vp]),
    ),
}
print(f"driver elapsed symbol: {el_name}")
for _round in range(2):
    for api, (rec, query, el) in apis.items():
        assert rec(a, sd) == 0 and rec(b, ms) == 0 and rec(c, ms) == 0
        torch.cuda.synchronize()
        assert query(b) == 0 and el(op, a, b) == 0
        bench(f"{api}: query (done)", lambda: query(b))
        bench(f"{api}: elapsed side anchor -> main (done)", lambda: el(op, a, b))
        bench(f"{api}: record, idle side stream", lambda: rec(d, sd))

        def after_kernel(rec: Any = rec) -> None:
            x.add_(1)
            rec(d, ms)

        bench(f"{api}: kernel + record", after_kernel)
    bench("kernel alone", lambda: x.add_(1))

# how ctypes passes the handles: converted by argtypes from ints, or prebuilt c_void_p objects
print("ctypes argument passing (runtime API)")
rec_t = fn(rt, "cudaEventRecord", [vp, vp])
el_t = fn(rt, "cudaEventElapsedTime", [ctypes.POINTER(ctypes.c_float), vp, vp])
q_t = fn(rt, "cudaEventQuery", [vp])
rec_n, el_n, q_n = rt.cudaEventRecord, rt.cudaEventElapsedTime, rt.cudaEventQuery  # no argtypes
dp, sdp, ap, bp = vp(d), vp(sd), vp(a), vp(b)
streams = {sd: sdp}
bench("  record(int, int), argtypes", lambda: rec_t(d, sd))
bench("  record(c_void_p, c_void_p), no argtypes", lambda: rec_n(dp, sdp))
bench("  record(c_void_p, streams[int]), no argtypes", lambda: rec_n(dp, streams[sd]))
bench("  elapsed(ptr, int, int), argtypes", lambda: el_t(op, a, b))
bench("  elapsed(ptr, c_void_p, c_void_p), no argtypes", lambda: el_n(op, ap, bp))
bench("  query(int), argtypes", lambda: q_t(b))
bench("  query(c_void_p), no argtypes", lambda: q_n(bp))

# many distinct done events, each read once against one anchor, as the resolver does
rec_t(a, sd)
many = []
for _ in range(20000):
    h = vp()
    create(ctypes.byref(h), 0)
    many.append(h.value)
for h in many:
    x.add_(1)
    rec_t(h, ms)
torch.cuda.synchronize()
for label, call in (("elapsed", lambda h: el_t(op, a, h)), ("query", q_t)):
    t0 = pc()
    for h in many:
        call(h)
    print(f"{'  ' + label + ', 20k distinct done events':52s} {(pc() - t0) / len(many):8.0f} ns", flush=True)
