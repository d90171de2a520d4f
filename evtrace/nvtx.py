"""NVTX: every region also as an NVTX range (``torch.cuda.nvtx``), for Nsight Systems.

Gives the calls that ``Recorder(nvtx=True)`` (``evtrace.record(nvtx=True)``) hands to the core,
which makes them around each region. Imported only then: it imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def calls() -> dict[str, Callable[..., Any]]:
    """Push/pop (per thread) for a region that ends on the thread it began on; start/end, by
    range id, for one that may end on another (backward spans end on a device thread, or in the
    pass's end callback)."""
    import torch

    nvtx: Any = torch.cuda.nvtx
    return dict(
        nvtx_push=nvtx.range_push,
        nvtx_pop=nvtx.range_pop,
        nvtx_start=nvtx.range_start,
        nvtx_end=nvtx.range_end,
    )
