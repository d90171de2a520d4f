"""NVTX: every region also as an NVTX range (``torch.cuda.nvtx``), for Nsight Systems.

Owns the wrappers that ``Recorder(nvtx=True)`` (``evtrace.record(nvtx=True)``) puts around its
region calls. Imported only then: it imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Enter = Callable[[int, Any], Any]
Exit = Callable[[Any], None]


def push_pop(enter: Enter, exit: Exit, names: Sequence[str]) -> tuple[Enter, Exit]:
    """``enter``/``exit`` that also push and pop an NVTX range named after the region (per
    thread: a region must end on the thread it began on)."""
    import torch

    push: Callable[[str], object] = torch.cuda.nvtx.range_push
    pop: Callable[[], object] = torch.cuda.nvtx.range_pop

    def nvtx_enter(key: int, args: Any) -> Any:
        push(names[key])
        return enter(key, args)

    def nvtx_exit(tok: Any) -> None:
        exit(tok)
        pop()

    return nvtx_enter, nvtx_exit


def ranges(enter: Enter, exit: Exit, names: Sequence[str]) -> tuple[Enter, Exit]:
    """For spans that may end on another thread than they began (backward spans end on a device
    thread, or in the pass's end callback): push/pop ranges are per thread, start/end are not."""
    import torch

    start: Callable[[str], int] = torch.cuda.nvtx.range_start
    end: Callable[[int], None] = torch.cuda.nvtx.range_end

    def nvtx_enter(key: int, args: Any) -> Any:
        return (enter(key, args), start(names[key]))

    def nvtx_exit(tok: Any) -> None:
        exit(tok[0])
        end(tok[1])

    return nvtx_enter, nvtx_exit
