"""The automatic hooks of ``python -m evtrace`` / ``record(hooks=True)``: global patches.

Owns ``Hooks``: module forward spans for every top-level module as it is first called (through
``instrument``), ``backward``, the optimizer, DataLoader waits and host waits on the device, all
by patching torch globally while a session records, and undoing every patch at its end.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

from . import defaults, private
from . import recorder as _rec
from .analysis import DATA_WAIT, WAIT
from .collectives import COLLECTIVES, OPS, PREFIX
from .instrumentation import Instrumentation, bind_torch, compiling, instrument
from .regions import Region

_MISSING = object()


class _Patches:
    """Attribute patches that undo themselves in reverse order."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        self._undo.append(
            (
                owner,
                name,
                owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else getattr(owner, name),
            )
        )
        setattr(owner, name, value)

    def undo(self) -> None:
        for owner, name, old in reversed(self._undo):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
        self._undo.clear()


def _call_site(depth: int = 2) -> str:
    f = sys._getframe(depth)
    return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}"


class Hooks:
    """Everything an unmodified training or inference script gets under ``python -m evtrace``:

    - module forward spans, for each top-level module as it is first called, down to ``depth``,
      named by the model's label and the module's path (``Net.layers.0``, ``Sequential#2.1``;
      see ``instrument``), and each module's backward span (``Net.layers.0 (backward)``) on the
      thread autograd runs it on;
    - ``backward`` around ``torch.autograd.backward`` (and so ``loss.backward()``);
    - ``optimizer.step (AdamW)`` and ``optimizer.zero_grad``, from torch's global optimizer hooks;
    - ``data wait`` while a DataLoader iterator produces the next batch (host only);
    - ``wait <what> <file:line>`` where the host blocks on the device: ``torch.cuda.synchronize``,
      ``Event``/``Stream.synchronize``, and ``.item()``, ``.cpu()``, ``.tolist()``, ``.numpy()``
      of CUDA tensors (host only, named by call site);
    - ``dist.<op>`` around each call of a ``torch.distributed`` collective or point-to-point op
      (see ``_install_collectives``).

    ``remove()`` restores every patched attribute and removes every module wrapper.
    """

    def __init__(
        self, depth: int | None = defaults.HOOK_DEPTH, include: str | None = None, exclude: str | None = None
    ) -> None:
        import torch

        bind_torch()
        self.depth, self.include, self.exclude = depth, include, exclude
        self._patches = _Patches()
        self._roots: weakref.WeakSet[Any] = weakref.WeakSet()
        self._instrumented: list[Instrumentation] = []
        self._local = threading.local()
        self._handles: list[Any] = []
        self._pending: dict[int, tuple[Any, _Async]] = {}  # id(work) -> (its finalizer, its region)
        for part in (
            self._install_modules,
            self._install_backward,
            self._install_optimizer,
            self._install_data,
            self._install_waits,
            self._install_collectives,
        ):
            try:
                part(torch)
            except Exception as e:  # a torch without that API: the rest still works
                print(
                    f"evtrace: warning: {part.__name__[9:]} hooks unavailable ({type(e).__name__}: {e})",
                    file=sys.stderr,
                )

    def _install_modules(self, torch: Any) -> None:
        module = torch.nn.Module
        call = module.__call__
        hooks, local = self, self._local

        def __call__(mod: Any, *a: Any, **k: Any) -> Any:
            depth = getattr(local, "depth", 0)
            if depth == 0 and mod not in hooks._roots and not compiling():
                hooks._adopt(mod)
            local.depth = depth + 1
            try:
                return call(mod, *a, **k)
            finally:
                local.depth = depth

        self._patches.set(module, "__call__", __call__)

    def _adopt(self, root: Any) -> None:
        """A module called at the top level: trace it and its submodules down to the depth. Its
        label (a second root of its class is ``Net#2``) is taken now: in order of first call."""
        self._roots.add(root)
        ins = instrument(root, depth=self.depth, include=self.include, exclude=self.exclude)
        self._instrumented.append(ins)

    def _around(self, owner: Any, name: str, region: str, host_only: bool = False) -> None:
        """Patch ``owner.name`` to run inside a region named ``region``. The token lives in the
        call, so threads (or generators) through the same patched function never cross spans."""
        fn = getattr(owner, name)
        key = _rec.name_key(region)

        def traced(*a: Any, **k: Any) -> Any:
            rec = _rec.current
            if rec is None:
                return fn(*a, **k)
            enter, exit = (rec.enter_host, rec.exit_host) if host_only else (rec.enter, rec.exit)
            tok = enter(key, None)
            try:
                return fn(*a, **k)
            finally:
                exit(tok)

        self._patches.set(owner, name, traced)

    def _install_backward(self, torch: Any) -> None:
        # on the device too: the caller's stream orders it
        self._around(torch.autograd, "backward", "backward")

    def _install_optimizer(self, torch: Any) -> None:
        opt = torch.optim.Optimizer
        open_steps = self._local

        def pre(o: Any, args: Any, kwargs: Any) -> None:
            r = Region(f"optimizer.step ({type(o).__name__})", None)
            r.__enter__()
            open_steps.__dict__.setdefault("steps", []).append(r)

        def post(o: Any, args: Any, kwargs: Any) -> None:
            steps = open_steps.__dict__.get("steps")
            if steps:
                steps.pop().__exit__(None, None, None)

        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._handles += [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        self._around(opt, "zero_grad", "optimizer.zero_grad")

    def _install_data(self, torch: Any) -> None:
        from torch.utils.data.dataloader import _BaseDataLoaderIter

        self._around(_BaseDataLoaderIter, "__next__", DATA_WAIT, host_only=True)

    def _install_waits(self, torch: Any) -> None:
        def waiting(owner: Any, name: str, label: str, only_cuda: bool) -> None:
            fn = getattr(owner, name)

            def traced(*a: Any, **k: Any) -> Any:
                if only_cuda and not (a and getattr(a[0], "is_cuda", False)):
                    return fn(*a, **k)
                if _rec.current is None:
                    return fn(*a, **k)
                with Region(f"{WAIT}{label} {_call_site()}", None, host_only=True):
                    return fn(*a, **k)

            self._patches.set(owner, name, traced)

        waiting(torch.cuda, "synchronize", "synchronize", False)
        waiting(torch.cuda.Event, "synchronize", "Event.synchronize", False)
        waiting(torch.cuda.Stream, "synchronize", "Stream.synchronize", False)
        for method in ("item", "cpu", "tolist", "numpy"):
            waiting(torch.Tensor, method, f".{method}()", True)

    def _install_collectives(self, torch: Any) -> None:
        """``dist.all_reduce`` and its kin (``collectives.OPS``): one region per user call, where
        ``torch.distributed`` and ``distributed_c10d`` name them (FSDP2 calls
        ``dist.all_gather_single`` and ``dist.reduce_scatter_single``). A call made inside another
        (one op's wrapper calling another op) is the outer one's: a thread-local flag.
        Args: bytes (of the input), dtype, the reduce op, the group's name and size, its sequence
        number (torch's own counter, read before the call, which every member advances alike;
        else evtrace's count of the group's collectives since recording began), and async_op.
        A blocking call's region is its call (and on the device, up to the point where the
        current stream has waited for it). An async call's region lasts until its work is
        waited on (``Work.wait``); a work never waited on leaves its region unfinished."""
        import torch.distributed as dist

        if not dist.is_available():
            return
        from torch.distributed import distributed_c10d as c10d

        shared = _Shared(self._pending)
        pending = self._pending

        for op in OPS:
            fn = getattr(c10d, op, None)
            if fn is None:  # an op this torch does not have
                continue
            traced = _collective(op, fn, shared)
            for owner in (dist, c10d):
                if getattr(owner, op, None) is fn:
                    self._patches.set(owner, op, traced)

        work = c10d.Work
        wait = work.wait

        def waited(w: Any, *a: Any, **k: Any) -> Any:
            out = wait(w, *a, **k)
            got = pending.get(id(w))
            if got is not None and got[0].detach() is not None:  # not collected meanwhile
                got[1].done(pending, id(w), True)
            return out

        self._patches.set(work, "wait", waited)

    def remove(self) -> None:
        self._patches.undo()
        for close, _ in list(self._pending.values()):
            close.detach()  # what is still open is closed as unfinished by the recorder
        self._pending.clear()
        for h in self._handles:
            h.remove()
        for ins in self._instrumented:
            ins.remove()
        self._instrumented.clear()


class _Async:
    """An async call's region, closed when every work it returned has been waited on."""

    __slots__ = ("left", "rec", "tok")

    def __init__(self, rec: _rec.Recorder, tok: Any, left: int) -> None:
        self.rec, self.tok, self.left = rec, tok, left

    def done(self, pending: dict[int, Any], key: int, waited: bool) -> None:
        """One of its works waited on (or collected unwaited: ``waited`` False)."""
        pending.pop(key, None)
        self.left -= 1
        # a work collected unwaited says nothing of when the op ended: its region stays open
        # (unfinished at the end); no call into the recorder from inside the garbage collector
        if waited and self.left == 0 and _rec.current is self.rec:
            self.rec.exit_cross(self.tok)


def _param(sig: inspect.Signature, *names: str) -> tuple[int, str, Any] | None:
    """(position, name, default) of the first of ``names`` the signature has."""
    params = list(sig.parameters.values())
    for i, p in enumerate(params):
        if p.name in names:
            return i, p.name, None if p.default is inspect.Parameter.empty else p.default
    return None


def _arg(a: tuple[Any, ...], k: dict[str, Any], spec: tuple[int, str, Any] | None) -> Any:
    if spec is None:
        return None
    i, name, default = spec
    return a[i] if i < len(a) else k.get(name, default)


def _nbytes(x: Any) -> tuple[int, Any]:
    """Bytes of a tensor, or of the tensors in a (nested) list or P2POps, and the first dtype."""
    if hasattr(x, "element_size"):
        return x.numel() * x.element_size(), x.dtype
    n, dtype = 0, None
    for y in x if isinstance(x, (list, tuple)) else ():
        b, d = _nbytes(getattr(y, "tensor", y))
        n, dtype = n + b, dtype if dtype is not None else d
    return n, dtype


#: the parameter holding each op's input data (its bytes are the args' ``bytes``)
_INPUT = {
    "all_gather": "tensor",
    "all_gather_into_tensor": "input_tensor",
    "all_gather_single": "input_tensor",
    "reduce_scatter": "input_list",
    "reduce_scatter_tensor": "input",
    "reduce_scatter_single": "input",
    "all_to_all": "input_tensor_list",
    "all_to_all_single": "input",
    "batch_isend_irecv": "p2p_op_list",
}
_ASYNC = ("isend", "irecv", "batch_isend_irecv")  # always async: they return work
_COLLECTIVE = frozenset(COLLECTIVES)


class _Shared:
    """What the collectives' wrappers of one Hooks share. The descriptions of groups, dtypes and
    reduce ops are kept: made anew, they took 9.5 µs a call, most of it ``str`` of a reduce op
    (3 µs) and of a dtype, on the 2-core CPU; kept, 5 µs."""

    def __init__(self, pending: dict[int, tuple[Any, _Async]]) -> None:
        self.local = threading.local()
        self.pending = pending  # id(work) -> (its finalizer, its region)
        self.counts: dict[str, int] = {}  # evtrace's sequence numbers, of the groups without torch's
        self._groups: dict[Any, tuple[str, int, Callable[[], int] | None]] = {}
        self._text: dict[Any, str] = {}

    def group(self, g: Any) -> tuple[str, int, Callable[[], int] | None]:
        """A group's name, size and sequence counter (torch's, private: None where it has none)."""
        got = self._groups.get(g)
        if got is None:
            counter = private.group_sequence(g)
            got = self._groups[g] = (g.group_name, g.size(), counter)
        return got

    def text(self, v: Any) -> str:
        """``float32`` for torch.float32, ``SUM`` for ReduceOp.SUM."""
        try:
            return self._text[v]
        except (KeyError, TypeError):  # not seen yet, or not hashable
            t = str(v).rsplit(".", 1)[-1]
            try:
                self._text[v] = t
            except TypeError:
                pass
            return t


def _collective(op: str, fn: Callable[..., Any], shared: _Shared) -> Callable[..., Any]:
    """``fn`` (the op ``op`` of torch.distributed) inside a region ``dist.<op>`` with its args."""
    import torch.distributed as dist

    key = _rec.name_key(PREFIX + op)
    sig = inspect.signature(fn)
    data = _param(sig, _INPUT.get(op, "tensor"))
    reduce_op = _param(sig, "op")
    group_p = _param(sig, "group")
    async_p = _param(sig, "async_op")
    peer = _param(sig, "dst", "src")
    counted = op in _COLLECTIVE

    def describe(a: tuple[Any, ...], k: dict[str, Any]) -> dict[str, Any]:
        args: dict[str, Any] = {}
        x = _arg(a, k, data)
        if x is not None:
            n, dtype = _nbytes(x)
            args["bytes"] = n
            if dtype is not None:
                args["dtype"] = shared.text(dtype)
        r = _arg(a, k, reduce_op)
        if r is not None:
            args["op"] = shared.text(r)
        p = _arg(a, k, peer)
        if p is not None:
            args["peer"] = p
        g = _arg(a, k, group_p)
        if g is None and op == "batch_isend_irecv" and x:
            g = getattr(x[0], "group", None)
        g = g if g is not None else dist.group.WORLD
        if isinstance(g, dist.ProcessGroup):
            name, args["group_size"], counter = shared.group(g)
            args["group"] = name
            if counter is not None:
                args["seq"] = counter()
            elif counted:
                args["seq"] = shared.counts[name] = shared.counts.get(name, -1) + 1
                args["seq_by"] = "evtrace"
        args["async_op"] = op in _ASYNC or bool(_arg(a, k, async_p))
        return args

    local, pending = shared.local, shared.pending

    def traced(*a: Any, **k: Any) -> Any:
        rec = _rec.current
        if rec is None or compiling() or getattr(local, "inside", False):
            return fn(*a, **k)
        try:
            args = describe(a, k)
        except Exception:  # whatever the call is given, the op itself says what is wrong with it
            args = {}
        is_async = bool(args.get("async_op"))
        tok = (rec.enter_cross if is_async else rec.enter)(key, args)
        local.inside = True
        try:
            out = fn(*a, **k)
        except BaseException:
            rec.exit(tok)
            raise
        finally:
            local.inside = False
        works = [w for w in (out if isinstance(out, list) else [out]) if w is not None] if is_async else []
        if not works:
            rec.exit(tok)
            return out
        state = _Async(rec, tok, len(works))
        for w in works:
            try:
                pending[id(w)] = (weakref.finalize(w, state.done, pending, id(w), False), state)
            except TypeError:  # a work that takes no weak reference: its region is its call
                state.done(pending, id(w), True)
                continue
        return out

    return functools.wraps(fn)(traced)
