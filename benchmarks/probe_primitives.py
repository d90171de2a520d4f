"""Probe the cost of the CUDA primitives the hot path is built from (one device call)."""

import ctypes
import statistics
import sys
import time

import torch


def bench(fn, n=20000, reps=5):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        out.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(out)


print(
    "torch",
    torch.__version__,
    "cuda",
    torch.version.cuda,
    torch.cuda.get_device_name(0),
    sys.version.split()[0],
)
torch.cuda.init()
x = torch.ones(1, device="cuda")
s = torch.cuda.current_stream()
ev = torch.cuda.Event(enable_timing=True)
ev.record(s)
base_record = torch._C._CudaEventBase.record
rows = {
    "perf_counter_ns": lambda: time.perf_counter_ns(),
    "current_stream()": lambda: torch.cuda.current_stream(),
    "_cuda_getDevice": lambda: torch._C._cuda_getDevice(),
    "_cuda_getCurrentRawStream(0)": lambda: torch._C._cuda_getCurrentRawStream(0),
    "_cuda_getCurrentStream(0)": lambda: torch._C._cuda_getCurrentStream(0),
    "Event.record()": lambda: ev.record(),
    "Event.record(s)": lambda: ev.record(s),
    "_CudaEventBase.record(ev,s)": lambda: base_record(ev, s),
    "Event.query()": lambda: ev.query(),
}
print("cuda_event attr:", hasattr(ev, "cuda_event"), getattr(ev, "cuda_event", None))
try:
    rt = ctypes.CDLL("libcudart.so.13")
except OSError as e:
    rt = None
    print("no libcudart.so.13", e)
if rt is not None:
    rec = rt.cudaEventRecord
    rec.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    rec.restype = ctypes.c_int
    h = ctypes.c_void_p(ev.cuda_event)
    sp = ctypes.c_void_p(s.cuda_stream)
    rows["ctypes cudaEventRecord"] = lambda: rec(h, sp)
for k, f in rows.items():
    print(f"{k:34s} {bench(f):8.0f} ns")
# fresh events: lazy creation
evs = [torch.cuda.Event(enable_timing=True) for _ in range(20000)]
it = iter(evs)
t0 = time.perf_counter_ns()
for e in evs:
    e.record(s)
print(f"{'fresh Event.record(s)':34s} {(time.perf_counter_ns() - t0) / len(evs):8.0f} ns")
t0 = time.perf_counter_ns()
for e in evs:
    e.record(s)
print(f"{'re-record same events':34s} {(time.perf_counter_ns() - t0) / len(evs):8.0f} ns")
torch.cuda.synchronize()
# signed elapsed_time
a = torch.cuda.Event(enable_timing=True)
b = torch.cuda.Event(enable_timing=True)
a.record(s)
torch.cuda._sleep(1000000)
b.record(s)
torch.cuda.synchronize()
print("elapsed a->b", a.elapsed_time(b), "b->a", b.elapsed_time(a))
# anchor promptness on idle side stream while main stream busy
side = torch.cuda.Stream()
anc = torch.cuda.Event(enable_timing=True)
anc.record(side)
torch.cuda.synchronize()
h_anchor = time.perf_counter_ns()
torch.cuda._sleep(200_000_000)  # ~100 ms of queued work on main stream
res = []
for _i in range(5):
    e = torch.cuda.Event(enable_timing=True)
    h0 = time.perf_counter_ns()
    e.record(side)
    h1 = time.perf_counter_ns()
    res.append((h0, h1, e))
    time.sleep(0.001)
for h0, h1, e in res:
    print("anchor bracket ns", h1 - h0, "query", e.query())
torch.cuda.synchronize()
# relative stamp vs host: compare side-stream deltas with host deltas
ds = [res[0][2].elapsed_time(e) * 1e6 for (_, _, e) in res]
hs = [((h0 + h1) / 2 - (res[0][0] + res[0][1]) / 2) for (h0, h1, _) in res]
print("device-host delta ns:", [round(d - h) for d, h in zip(ds, hs)])
print("sync in thread test:")
import threading


def th():
    e = torch.cuda.Event(enable_timing=True)
    e.record(side)
    print(" thread record ok, dev", torch.cuda.current_device())


t = threading.Thread(target=th)
t.start()
t.join()
