"""Experiment 2 of the seed article: model1 → CPU task → model2.

    python -m evtrace samples/two_models.py

With a synchronize after each model, the host waits for model1 before it starts the CPU task.
Without it, the host runs the CPU task while model1 is still executing on the device, and the
step ends sooner. In the trace the "events" steps show the host's cpu_task slice side by side
with model1's device slice; in the "sync" steps they follow each other.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from models import Model1, Model2, cpu_task, setup, sync

import evtrace


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    dev, x = setup()
    model1, model2 = Model1().eval().to(dev), Model2().eval().to(dev)
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        for mode in ("sync", "events"):
            for _ in range(a.iters):
                with evtrace.region(f"step ({mode})"):
                    with evtrace.region("model1"):
                        y = model1(x)
                        if mode == "sync":
                            sync(dev)
                    with evtrace.region("cpu_task", host_only=True):
                        cpu_task(rng)
                    with evtrace.region("model2"):
                        model2(y)
                        if mode == "sync":
                            sync(dev)
            sync(dev)
    print("done: compare 'step (sync)' with 'step (events)' in the trace or in evtrace summary")


if __name__ == "__main__":
    main()
