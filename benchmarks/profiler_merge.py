"""evtrace and torch.profiler in one run (issue 18): the merged trace's fit, and what it costs.

    python benchmarks/profiler_merge.py              # ~1 min on a GPU; $OUT set: merged trace there too
    python benchmarks/profiler_merge.py --trials 3   # fewer alternations (the CPU check)

1. The seed pipeline (samples/two_models.py: "sync" then "events" steps) under
   ``with torch.profiler.profile(...) as prof, evtrace.record(path, profiler=prof):``; the written
   trace is loaded back and the fit ``meta["profiler"]["0"]`` printed (RESULT profiler_fit), with a
   check of our own: the share of kernels that lie inside a model1/model2 region's device span.
2. The cost, variants alternated trial by trial: a few "events" steps untraced, under
   ``evtrace.record`` only, under ``torch.profiler`` only, and under both; each step time as a ratio
   to untraced (RESULT step_ratio). The end of each run is timed too (leaving the ``with``): for
   both, that is evtrace's stop and write, the profiler's stop, its export, the merge and the second
   write (RESULT end_ms).

Lines starting with RESULT are JSON; the last lines are a readable table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "samples"))
from common import alternate, emit, machine, ratio_stats, stat  # noqa: E402
from models import Model1, Model2, cpu_task, setup, sync  # type: ignore[import-not-found]  # noqa: E402

import evtrace  # noqa: E402

TMP = tempfile.mkdtemp(prefix="profiler-merge-")
CUDA = torch.cuda.is_available()
ACTS = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else [])


class Pipeline:
    """samples/two_models.py's models and loop, callable one step at a time."""

    def __init__(self) -> None:
        self.dev, self.x = setup()
        self.model1 = Model1().eval().to(self.dev)
        self.model2 = Model2().eval().to(self.dev)
        self.rng = np.random.default_rng(0)

    def step(self, mode: str) -> None:
        with evtrace.region(f"step ({mode})"):
            with evtrace.region("model1"):
                y = self.model1(self.x)
                if mode == "sync":
                    sync(self.dev)
            with evtrace.region("cpu_task", host_only=True):
                cpu_task(self.rng)
            with evtrace.region("model2"):
                self.model2(y)
                if mode == "sync":
                    sync(self.dev)

    def sample(self, iters: int) -> None:
        """The sample's main loop, as two_models.py runs it."""
        with torch.inference_mode():
            for mode in ("sync", "events"):
                for _ in range(iters):
                    self.step(mode)
                sync(self.dev)

    def steps(self, n: int) -> float:
        """``n`` "events" steps; ms a step, from a synchronized start to a synchronized end."""
        with torch.inference_mode():
            sync(self.dev)
            t = time.perf_counter_ns()
            for _ in range(n):
                self.step("events")
            sync(self.dev)
            return (time.perf_counter_ns() - t) / n / 1e6


def profile() -> torch.profiler.profile:
    return torch.profiler.profile(activities=ACTS)


def plain(d: dict[str, Any]) -> Any:
    """Metadata as JSON: the typed per-GPU alignment as its fields."""

    def field(o: Any) -> Any:
        return dataclasses.asdict(o) if dataclasses.is_dataclass(o) and not isinstance(o, type) else str(o)

    return json.loads(json.dumps(d, default=field))


def kernels_in_model_spans(
    s: evtrace.Session, names: tuple[str, ...] = ("model1", "model2")
) -> dict[str, Any]:
    """Our own check of the fit: profiler kernels (on evtrace's clock) inside the device span of a
    model1 or model2 region, where every kernel of the sample is launched."""
    r = s.regions
    keys = [k for k, n in enumerate(s.names) if n in names]
    g = r[np.isin(r["name"], keys) & (r["device"] >= 0)]
    g = g[np.argsort(g["dev_start"], kind="stable")]
    ds, de = g["dev_start"].astype(np.int64), g["dev_end"].astype(np.int64)
    ks = [ev for ev in s.profiler if ev.get("ph") == "X" and ev.get("cat") == "kernel"]
    a = np.array([round(float(ev["ts"]) * 1000) for ev in ks], np.int64)
    b = a + np.array([round(float(ev["dur"]) * 1000) for ev in ks], np.int64)
    j = np.searchsorted(ds, a, "right") - 1
    ok = (j >= 0) & (b <= de[np.maximum(j, 0)]) if len(ds) else np.zeros(len(ks), bool)
    # how far outside the others lie (ns past the span's end, or before the next span's start)
    out = np.where(j >= 0, b - de[np.maximum(j, 0)], 0)[~ok] if len(ds) else np.zeros(0)
    return {
        "kernels": len(ks),
        "inside_model_spans": int(ok.sum()),
        "share": round(float(ok.mean()), 4) if len(ks) else 0.0,
        "outside_by_us": stat([float(x) / 1000 for x in out]) if len(out) else None,
    }


def merged_run(pipe: Pipeline, iters: int) -> dict[str, Any]:
    """One merged run of the whole sample; prints its fit, copies the trace to $OUT."""
    path = os.path.join(TMP, "merged.json.gz")
    with profile() as prof, evtrace.record(path, profiler=prof):
        pipe.sample(iters)
        t_end = time.perf_counter_ns()
    end_ms = (time.perf_counter_ns() - t_end) / 1e6
    s = evtrace.load(path)
    if "profiler" not in s.meta:
        raise SystemExit("the trace holds no merged profiler trace: see evtrace's lines above")
    fit = s.meta["profiler"]["0"]
    meta = plain({k: v for k, v in s.meta.items() if k in ("torch", "cuda", "driver", "gpus", "python")})
    res = {
        "fit": fit,
        "check": kernels_in_model_spans(s),
        "regions": len(s),
        "device_spans": s.device_spans,
        "profiler_events_kept": len(s.profiler),
        "alignment": plain(s.meta.get("alignment", {})),
        "trace_bytes": os.path.getsize(path),
        "end_ms": end_ms,
        "versions": meta,
    }
    emit("profiler_fit", res)
    if os.environ.get("OUT"):
        shutil.copy(path, os.path.join(os.environ["OUT"], "merged.json.gz"))
    return res


def cost(pipe: Pipeline, steps: int, trials: int) -> dict[str, Any]:
    """Step time and end-of-run time, four variants alternated trial by trial."""
    ends: dict[str, list[float]] = {"evtrace": [], "profiler": [], "both": []}

    @contextlib.contextmanager
    def timed_end(key: str, cm: contextlib.AbstractContextManager[Any]) -> Iterator[list[int]]:
        mark: list[int] = []
        with cm:
            yield mark  # the body appends the perf_counter_ns at its end
        ends[key].append((time.perf_counter_ns() - mark[0]) / 1e6)

    def run(body: Callable[[], float], key: str | None, cm: Callable[[], Any]) -> float:
        if key is None:
            return body()
        with timed_end(key, cm()) as mark:
            ms = body()
            mark.append(time.perf_counter_ns())
        return ms

    def ev_only() -> Any:
        return evtrace.record(os.path.join(TMP, "evtrace.json.gz"), quiet=True)

    @contextlib.contextmanager
    def both() -> Iterator[None]:
        with profile() as prof, evtrace.record(os.path.join(TMP, "both.json.gz"), quiet=True, profiler=prof):
            yield

    def body() -> float:
        return pipe.steps(steps)

    variants: dict[str, Callable[[], float]] = {
        "untraced": lambda: run(body, None, contextlib.nullcontext),
        "evtrace": lambda: run(body, "evtrace", ev_only),
        "profiler": lambda: run(body, "profiler", profile),
        "both": lambda: run(body, "both", both),
    }
    for v in variants.values():  # warm-up, not counted
        v()
    for k in ends:
        ends[k].clear()
    res = alternate(variants, trials)
    step: dict[str, Any] = {k: ratio_stats(v, res["untraced"]) for k, v in res.items() if k != "untraced"}
    step["untraced step ms"] = stat(res["untraced"])
    step["steps a trial"] = steps
    emit("step_ratio", step)
    # both's end less evtrace's and the profiler's ends of the same trial: export + merge + write
    extra = [b - e - p for b, e, p in zip(ends["both"], ends["evtrace"], ends["profiler"])]
    end = {k: stat(v) for k, v in ends.items()}
    end["both minus evtrace minus profiler"] = stat(extra)
    end["both / evtrace"] = ratio_stats(ends["both"], ends["evtrace"])
    emit("end_ms", end)
    return {"step_ratio": step, "end_ms": end}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20, help="the sample's iterations per mode")
    ap.add_argument("--steps", type=int, default=10, help='"events" steps per trial')
    ap.add_argument("--trials", type=int, default=11 if CUDA else 5)
    a = ap.parse_args()
    emit("machine", machine())
    pipe = Pipeline()
    with torch.inference_mode():  # cuDNN's choices and the allocator, before anything is timed
        for mode in ("sync", "events"):
            pipe.step(mode)
        sync(pipe.dev)
    table = {"merged run": merged_run(pipe, a.iters), **cost(pipe, a.steps, a.trials)}
    fit = table["merged run"]["fit"]
    print(
        f"fit: device offset {fit['device_offset_ns']} ns (correction {fit['device_correction_ns']} ns), "
        f"{fit['kernels_inside']}/{fit['kernels_placed']} kernels inside ({fit['kernels_inside_share']}), "
        f"host ops crossing regions {fit['host_ops_crossing_regions']}, "
        f"events dropped {fit['events_dropped']}"
    )
    for k, v in table.items():
        if k != "merged run":
            print(k, json.dumps(v, default=str))
    shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    main()
