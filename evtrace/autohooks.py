"""The automatic hooks of ``python -m evtrace`` / ``record(hooks=True)``: global patches.

Owns ``Hooks``: module forward spans for every top-level module as it is first called (through
``instrument``), ``backward``, the optimizer, DataLoader waits and host waits on the device, all
by patching torch globally while a session records, and undoing every patch at its end.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from typing import Any

from . import defaults
from . import recorder as _rec
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
      of CUDA tensors (host only, named by call site).

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
        for part in (
            self._install_modules,
            self._install_backward,
            self._install_optimizer,
            self._install_data,
            self._install_waits,
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

        self._around(_BaseDataLoaderIter, "__next__", "data wait", host_only=True)

    def _install_waits(self, torch: Any) -> None:
        def waiting(owner: Any, name: str, label: str, only_cuda: bool) -> None:
            fn = getattr(owner, name)

            def traced(*a: Any, **k: Any) -> Any:
                if only_cuda and not (a and getattr(a[0], "is_cuda", False)):
                    return fn(*a, **k)
                if _rec.current is None:
                    return fn(*a, **k)
                with Region(f"wait {label} {_call_site()}", None, host_only=True):
                    return fn(*a, **k)

            self._patches.set(owner, name, traced)

        waiting(torch.cuda, "synchronize", "synchronize", False)
        waiting(torch.cuda.Event, "synchronize", "Event.synchronize", False)
        waiting(torch.cuda.Stream, "synchronize", "Stream.synchronize", False)
        for method in ("item", "cpu", "tolist", "numpy"):
            waiting(torch.Tensor, method, f".{method}()", True)

    def remove(self) -> None:
        self._patches.undo()
        for h in self._handles:
            h.remove()
        for ins in self._instrumented:
            ins.remove()
        self._instrumented.clear()
