"""Provenance for the trace's metadata: versions and GPUs. Never environment variables."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import sys
from typing import Any

from .device import DeviceInfo


@functools.cache  # one process, one driver: asked once (NVML's init costs), not at each start and stop
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


def rank() -> tuple[int, int] | None:
    """(rank, world size) under torchrun or torch.distributed's launch variables, else None."""
    r, w = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    try:
        return (int(r), int(w or 1)) if r is not None else None
    except ValueError:
        return None


def host_id() -> str:
    """Which machine and boot this is, as a hash: traces with the same id share perf_counter."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return hashlib.sha256(f"{platform.node()}/{boot}".encode()).hexdigest()[:16]


def environment(devices: list[DeviceInfo]) -> dict[str, Any]:
    from . import __version__

    out: dict[str, Any] = {"evtrace": __version__, "python": platform.python_version(), "host_id": host_id()}
    rw = rank()
    if rw is not None:
        out["rank"], out["world_size"] = rw
    torch = sys.modules.get("torch")  # only if the program uses it: importing it here costs ~1 s
    if torch is not None:
        out["torch"] = getattr(torch, "__version__", None)
        out["cuda"] = getattr(getattr(torch, "version", None), "cuda", None)
    if devices:
        out["driver"] = _driver_version()
        out["gpus"] = [d.name for d in devices]
    return out


_SECRET = re.compile(r"key|token|secret|passw|pwd|auth|credential|cookie", re.IGNORECASE)


def redacted_argv(argv: list[str], only_name: bool = False) -> list[str]:
    """The command line for the trace: the script as given, and ``<redacted>`` for the value of
    any option whose name looks secret (``--api-key X``, ``--token=X``, ``db.password=X``).
    ``only_name``: the script's file name alone, and one ``<redacted>`` for all its args."""
    if not argv:
        return []
    if only_name:
        return [os.path.basename(argv[0])] + (["<redacted>"] if len(argv) > 1 else [])
    out = [argv[0]]
    hide_next = False
    for a in argv[1:]:
        if hide_next and not a.startswith("-"):
            out.append("<redacted>")
            hide_next = False
            continue
        hide_next = False
        name, eq, _ = a.partition("=")
        if eq and _SECRET.search(name):
            out.append(f"{name}=<redacted>")
        else:
            out.append(a)
            hide_next = a.startswith("-") and bool(_SECRET.search(a))
    return out
