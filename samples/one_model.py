"""Experiment 1 of the seed article: one model timed three ways.

    python -m evtrace samples/one_model.py

Host stamps alone measure only the launch; synchronizing measures the model but makes the host
wait; CUDA events measure it without blocking. Under evtrace each way is a region, so the trace
shows all three: the "naive" host slices are short while their device slices are long.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from models import Model1, Model2, setup, sync

import evtrace


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()
    dev, x = setup()
    model = torch.nn.Sequential(Model1(), Model2()).eval().to(dev)
    naive, synced, events = [], [], []
    with torch.inference_mode():
        for _ in range(a.iters):
            with evtrace.region("naive"):
                t0 = time.perf_counter()
                model(x)
                naive.append(time.perf_counter() - t0)
        for _ in range(a.iters):
            with evtrace.region("sync"):
                sync(dev)
                t0 = time.perf_counter()
                model(x)
                sync(dev)
                synced.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(a.iters):
                with evtrace.region("events"):
                    start.record()
                    model(x)
                    end.record()
                end.synchronize()
                events.append(start.elapsed_time(end) / 1000)
    w = a.warmup
    print(f"avg time:       {statistics.mean(naive[w:]):.5f} s   (host stamps: the launch only)")
    print(f"sync avg time:  {statistics.mean(synced[w:]):.5f} s")
    if events:
        print(f"event avg time: {statistics.mean(events[w:]):.5f} s")


if __name__ == "__main__":
    main()
