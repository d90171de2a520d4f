"""Provenance for the trace's metadata: versions and GPUs. Never environment variables."""

from __future__ import annotations

import ctypes
import platform
import sys
from typing import Any

from .device import DeviceInfo


def _driver_version() -> str | None:
    """The NVIDIA driver version through NVML, if it is there (no extra dependency)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
        buf = ctypes.create_string_buffer(96)
        ok = nvml.nvmlSystemGetDriverVersion(buf, 96) == 0
        nvml.nvmlShutdown()
        return buf.value.decode() if ok else None
    except (OSError, AttributeError):
        return None


def environment(devices: list[DeviceInfo]) -> dict[str, Any]:
    from . import __version__

    out: dict[str, Any] = {"evtrace": __version__, "python": platform.python_version()}
    torch = sys.modules.get("torch")  # only if the program uses it: importing it here costs ~1 s
    if torch is not None:
        out["torch"] = getattr(torch, "__version__", None)
        out["cuda"] = getattr(getattr(torch, "version", None), "cuda", None)
    if devices:
        out["driver"] = _driver_version()
        out["gpus"] = [d.name for d in devices]
    return out
