"""Instrumentation of unmodified code: nn.Module forward spans (more to come).

Modules are wrapped by replacing ``forward`` on the *instance* with a small callable, not by
``register_forward_hook``: any hook sends every call through ``nn.Module``'s slow path, which
alone costs 3–4 µs a call (measured on an H100 here), as much as the kernel launch itself.
The wrapper pickles back to the plain method, so a model saved while instrumented loads as
an ordinary one; ``remove()`` restores the instance exactly.
"""

from __future__ import annotations

import re
import types
from typing import TYPE_CHECKING, Any, Callable, Iterable

from . import recorder as _rec

if TYPE_CHECKING:
    import torch

_MISSING = object()
_is_compiling: Callable[[], bool] = lambda: False  # noqa: E731  (torch's, once instrument() runs)


def _bind_torch() -> None:
    """Import torch only when instrumenting, so that `evtrace summary` starts fast."""
    global _is_compiling
    import torch

    _is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", _is_compiling)


def _plain_forward(module: torch.nn.Module) -> Any:  # noqa: F821
    """What ``module.forward`` is without evtrace: used when an instrumented model is unpickled."""
    return types.MethodType(type(module).forward, module)


class _Forward:
    """``module.forward`` as a region named after the module's path. A no-op without a session,
    and while torch.compile traces (the compiled graph is not split, its modules are not traced)."""

    __slots__ = ("fn", "name", "key", "module", "__weakref__")

    def __init__(self, module: torch.nn.Module, fn: Any, name: str) -> None:
        self.module = module
        self.fn = fn
        self.name = name
        self.key = _rec.name_key(name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rec = _rec._active
        if rec is None or _is_compiling():
            return self.fn(*args, **kwargs)
        tok = rec.enter(self.key, None)
        try:
            return self.fn(*args, **kwargs)
        finally:
            rec.exit(tok)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_plain_forward, (self.module,))

    def __repr__(self) -> str:
        return f"<evtrace forward of {self.name}>"


def select(model: torch.nn.Module, depth: int | None = None, include: str | None = None, exclude: str | None = None) -> list[tuple[str, torch.nn.Module]]:
    """The (path, module) pairs to trace: the root is depth 0, its children depth 1, and so on.

    ``include``/``exclude`` are regexes searched in the path (the root's path is its class name).
    """
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    out = []
    for path, m in model.named_modules():
        d = 0 if path == "" else path.count(".") + 1
        name = path or type(m).__name__
        if depth is not None and d > depth:
            continue
        if inc is not None and not inc.search(name):
            continue
        if exc is not None and exc.search(name):
            continue
        out.append((name, m))
    return out


class Instrumentation:
    """What ``instrument`` changed; ``remove()`` (or leaving the ``with`` block) undoes it."""

    def __init__(self, modules: Iterable[tuple[str, torch.nn.Module]]) -> None:
        self._saved: list[tuple[torch.nn.Module, Any]] = []
        for name, m in modules:
            if isinstance(m.__dict__.get("forward"), _Forward):
                continue  # already traced by another instrumentation
            prev = m.__dict__.get("forward", _MISSING)
            fn = prev if prev is not _MISSING else m.forward
            m.__dict__["forward"] = _Forward(m, fn, name)
            self._saved.append((m, prev))

    def __len__(self) -> int:
        return len(self._saved)

    def remove(self) -> None:
        for m, prev in reversed(self._saved):
            if prev is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = prev
        self._saved.clear()

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def instrument(model: torch.nn.Module, *, depth: int | None = None, include: str | None = None, exclude: str | None = None) -> Instrumentation:
    """Trace ``model``'s forward, and its submodules' down to ``depth`` (None: all of them).

    Each module call becomes a region named by its path (``encoder.layers.3.attn``), on the host
    and on the current stream. Undo with ``.remove()`` or use it as a context manager.
    """
    import torch

    _bind_torch()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"instrument() takes an nn.Module, not {type(model).__name__}")
    return Instrumentation(select(model, depth, include, exclude))
