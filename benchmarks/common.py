"""Shared helpers: alternate variants in one run, report medians with spread, name the machine."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable


def machine() -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import torch

        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["cuda"] = str(torch.version.cuda)
            out["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return out


def alternate(variants: dict[str, Callable[[], float]], trials: int) -> dict[str, list[float]]:
    """Run each variant once per trial, in turn, ``trials`` times; each call returns one figure."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    for t in range(trials):
        names = list(variants) if t % 2 == 0 else list(reversed(variants))
        for k in names:
            out[k].append(variants[k]())
    return out


def stat(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    """Per-trial ratios (each trial's pair ran back to back), then median and spread."""
    return stat([a / b for a, b in zip(num, den)])


def emit(name: str, result: dict) -> None:
    print(f"RESULT {name} " + json.dumps(result, sort_keys=True), flush=True)
