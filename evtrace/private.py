"""Every private CPython or torch name evtrace reads at run time, in one place, and what happens
where one is absent: a public fallback (slower or coarser, said here), or one clear error.
Never a silent guess (such as "torch is not compiling").

========================================================  =================================================
Private name (reader)                                      Absent
========================================================  =================================================
``_PyInterpreterState_GetEvalFrameFunc``,                 C symbols of CPython's own API, resolved when
``_PyEval_EvalFrameDefault`` (``_core/forward.c``:        ``evtrace._core`` loads: without them it does not
forward() sees torch.compile's frame evaluator)           build or import (ImportError naming the symbol)
``torch.compiler._is_compiling_flag`` (the core reads     ``torch.compiler.is_compiling()``, public: a call
it per instrumented forward: a dict lookup)               per forward instead of a lookup (``compiler_parts``)
``torch._C._cuda_getCurrentRawStream`` (device.py,        ``torch.cuda.current_stream(d).cuda_stream``,
per region boundary)                                      public, ~10 µs a call instead of ~0.2 µs
``torch._C._cuda_getDevice`` (device.py, per boundary     ``torch.cuda.current_device``, public
with several devices)
``torch._C._CudaEventBase.record`` (device.py, torch's    ``torch.cuda.Event.record``, public (one Python
events without a loadable libcudart)                      frame more)
``torch._C._current_graph_task_id`` (instrumentation.py:  ``threading.get_ident``: backward passes told
which backward pass runs)                                 apart by thread, not by pass
``torch.nn.modules.module._global_forward_pre_hooks``,    sequential() never shares a child's boundary
``_global_forward_hooks``, ``_global_backward_pre_hooks``, with the one before: correct, one event pair
``_global_backward_hooks``; a module's ``_forward_hooks``, a child more (``global_hooks``)
``_forward_pre_hooks``, ``_backward_hooks``,
``_backward_pre_hooks``, ``_compiled_call_impl`` (the
core's sequential(): is a child plain, hook-free)
``Variable._execution_engine.queue_callback``             a backward span ends when its last gradient
(instrumentation.py: ends a backward pass's spans)        comes, or at the session's end
``torch._dynamo`` (instrumentation.py: the module whose   nothing to do: torch.compile is not in use
import is watched, to register forward()'s twins)
``torch._C._current_autograd_node`` (recorder.py: names   the thread's Python name ("Dummy-N")
torch's backward threads)
``distributed_c10d._get_default_store`` (hostclock.py:    rank clock offsets not measured, said once on
the rank clock exchange)                                  stderr; merge falls back to wall clocks
``ProcessGroup._get_sequence_number_for_group``           evtrace's own count of the group's collectives
(autohooks.py: collectives' sequence numbers)
========================================================  =================================================
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

#: torch.compiler's module global that says whether dynamo is tracing (also named in _core/module.c)
COMPILING_FLAG = "_is_compiling_flag"
EVAL_FRAME = ("_PyInterpreterState_GetEvalFrameFunc", "_PyEval_EvalFrameDefault")
RAW_STREAM = "_cuda_getCurrentRawStream"
GET_DEVICE = "_cuda_getDevice"
EVENT_BASE = "_CudaEventBase"
GRAPH_TASK_ID = "_current_graph_task_id"
DYNAMO = "torch._dynamo"
AUTOGRAD_NODE = "_current_autograd_node"
DEFAULT_STORE = "_get_default_store"
GROUP_SEQUENCE = "_get_sequence_number_for_group"


def compiler_parts(torch: Any) -> dict[str, Any]:
    """``_core.bind``'s parts for "is torch compiling": torch.compiler's globals where its private
    flag is, else its public ``is_compiling``. RuntimeError where torch has neither."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and COMPILING_FLAG in vars(compiler):
        return {"compiler_globals": vars(compiler)}
    public = getattr(compiler, "is_compiling", None)
    if public is None:
        raise RuntimeError(
            f"this torch ({getattr(torch, '__version__', '?')}) has neither torch.compiler.{COMPILING_FLAG} "
            "nor torch.compiler.is_compiling: evtrace cannot tell whether torch.compile is tracing"
        )
    return {"is_compiling": public}


#: torch's global module hooks (torch.nn.modules.module) and a module's own (read by _core/forward.c)
GLOBAL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)
MODULE_ATTRS = (
    "_compiled_call_impl",
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
)
#: stands for a hook evtrace cannot see: never empty, so the core never takes a child as plain
UNKNOWN_HOOKS = {"evtrace: torch's module hooks are not where evtrace reads them": None}


def global_hooks(torch: Any) -> tuple[dict[Any, Any], ...]:
    """torch's global module hooks, for the core's sequential(); where they or a module's own hook
    tables are not where the core reads them, UNKNOWN_HOOKS (each child then gets its own events)."""
    tm = torch.nn.modules.module
    found = [getattr(tm, n, None) for n in GLOBAL_HOOKS]
    # a module's own tables, and _compiled_call_impl: a class default until compile() sets it
    own = set(vars(torch.nn.Module())) | {n for n in MODULE_ATTRS if hasattr(torch.nn.Module, n)}
    if any(not isinstance(h, dict) for h in found) or not set(MODULE_ATTRS) <= own:
        return (UNKNOWN_HOOKS,)
    return tuple(found)  # type: ignore[arg-type]


def queue_callback(torch: Any) -> Callable[[Callable[[], None]], None] | None:
    """Run a callable when the current backward pass ends, or None."""
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    return getattr(engine, "queue_callback", None)


def raw_stream(torch: Any) -> Callable[[int], int]:
    """The current stream's raw handle on device d."""
    fast: Callable[[int], int] | None = getattr(torch._C, RAW_STREAM, None)
    if fast is not None:
        return fast
    cuda = torch.cuda
    return lambda d: int(cuda.current_stream(d).cuda_stream)


def get_device(torch: Any) -> Callable[[], int]:
    """The current device's index."""
    fast: Callable[[], int] | None = getattr(torch._C, GET_DEVICE, None)
    return fast if fast is not None else torch.cuda.current_device


def event_record(torch: Any) -> Callable[[Any, Any], None]:
    """Record a torch CUDA event on a torch stream: ``record(event, stream)``."""
    base = getattr(torch._C, EVENT_BASE, None)
    fast: Callable[[Any, Any], None] | None = getattr(base, "record", None)
    return fast if fast is not None else torch.cuda.Event.record


def graph_task_id(torch: Any) -> Callable[[], int]:
    """Which backward pass runs (by thread where torch does not say)."""
    fast: Callable[[], int] | None = getattr(torch._C, GRAPH_TASK_ID, None)
    return fast if fast is not None else threading.get_ident


def in_autograd(torch: Any) -> bool:
    """Whether this thread runs an autograd node now (False where torch does not say)."""
    node = getattr(torch._C, AUTOGRAD_NODE, None)
    try:
        return node is not None and node() is not None
    except RuntimeError:
        return False


def default_store(c10d: Any) -> Callable[[], Any] | None:
    """The default process group's store getter, or None (the caller says so once)."""
    return getattr(c10d, DEFAULT_STORE, None)


def group_sequence(group: Any) -> Callable[[], int] | None:
    """A process group's collective counter, or None where it has none."""
    counter: Callable[[], int] | None = getattr(group, GROUP_SEQUENCE, None)
    try:
        return counter if counter is not None and counter() is not None else None
    except RuntimeError:  # "ProcessGroup custom does not yet support sequence numbers."
        return None
