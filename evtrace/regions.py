"""``region``: one name, three uses: ``with region("x")``, ``@region``, ``@region("x")``."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar, overload

from . import recorder as _rec

F = TypeVar("F", bound=Callable[..., Any])


class Region:
    """A named span. Near-free when no session is recording."""

    __slots__ = ("name", "args", "_open")

    def __init__(self, name: str | None, args: dict[str, Any] | None) -> None:
        self.name = name
        self.args = args or None
        self._open: list[Any] = []  # (recorder, token) per enter; None when nothing recorded

    def __enter__(self) -> Region:
        rec = _rec._active
        if rec is None:
            self._open.append(None)
        else:
            if self.name is None:
                raise TypeError('region() needs a name when used with "with": with evtrace.region("step"): ...')
            self._open.append((rec, rec.enter(self.name, self.args)))
        return self

    def __exit__(self, *exc: object) -> None:
        t = self._open.pop() if self._open else None
        if t is not None:
            t[0].exit(t[1])

    def __call__(self, fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"@region decorates a function, not {type(fn).__name__}")
        name = self.name or getattr(fn, "__qualname__", None) or repr(fn)
        args = self.args
        wrapper: Callable[..., Any]
        if inspect.iscoroutinefunction(fn):

            async def wrapper(*a: Any, **k: Any) -> Any:
                rec = _rec._active
                if rec is None:
                    return await fn(*a, **k)
                tok = rec.enter(name, args)
                try:
                    return await fn(*a, **k)
                finally:
                    rec.exit(tok)

        else:

            def wrapper(*a: Any, **k: Any) -> Any:
                rec = _rec._active
                if rec is None:
                    return fn(*a, **k)
                tok = rec.enter(name, args)
                try:
                    return fn(*a, **k)
                finally:
                    rec.exit(tok)

        return functools.wraps(fn)(wrapper)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"region({self.name!r})"


@overload
def region(name: str, /, **args: Any) -> Region: ...
@overload
def region(fn: F, /) -> F: ...
@overload
def region(**args: Any) -> Region: ...
def region(name_or_fn: Any = None, /, **args: Any) -> Any:
    """A span on the host lane of this thread and, with CUDA, on the current stream.

    ``with region("step", batch=3): ...``, ``@region`` (named after the function) or
    ``@region("load")``. Keyword args become slice args in the trace.
    """
    if name_or_fn is None or isinstance(name_or_fn, str):
        return Region(name_or_fn, args)
    if callable(name_or_fn) and not args:
        return Region(None, None)(name_or_fn)
    raise TypeError(f"region() takes a name (str) or a function, not {type(name_or_fn).__name__}; " 'use with evtrace.region("name") or @evtrace.region')
