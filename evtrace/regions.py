"""``region``: one name, three uses: ``with region("x")``, ``@region``, ``@region("x")``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from threading import get_ident
from typing import Any, TypeVar, overload

from . import recorder as _rec
from .values import snapshot

F = TypeVar("F", bound=Callable[..., Any])


class Region:
    """A named span. Near-free when no session is recording.

    One Region object may be entered by several threads at once (a module-level
    ``region("load")``, or a hook's): each exit closes the span its own thread opened.
    Args are snapshot on entry (see ``evtrace.values``): the trace holds what they were then.
    """

    __slots__ = ("name", "key", "args", "host_only", "_open")

    def __init__(self, name: str | None, args: dict[str, Any] | None, host_only: bool = False) -> None:
        self.name = name
        self.key = -1 if name is None else _rec.name_key(name)
        self.args = args or None
        self.host_only = host_only
        self._open: list[Any] = []  # per enter: (thread, exit, token), or None when nothing was recorded

    def __enter__(self) -> Region:
        rec = _rec.current
        if rec is None:
            self._open.append(None)
        elif self.key < 0:
            raise TypeError('region() needs a name when used with "with": with evtrace.region("step"): ...')
        else:
            args = self.args
            if args is not None:
                args = snapshot(args)
            if self.host_only:
                self._open.append((get_ident(), rec.exit_host, rec.enter_host(self.key, args)))
            else:
                self._open.append((get_ident(), rec.exit, rec.enter(self.key, args)))
        return self

    def __exit__(self, typ: object, value: object, tb: object) -> None:
        o = self._open
        if not o:
            return
        if o[-1] is None and o.count(None) == len(o):  # no thread recorded anything: any entry is ours
            o.remove(None)
            return
        me = get_ident()
        t = o[-1]
        if t is None or t[0] != me:  # another thread's entry is the last: find ours
            t = next((u for u in reversed(o) if u is not None and u[0] == me), None)
        if t is None and None not in o:
            t = o[-1]  # entered on another thread (a manual __enter__/__exit__ pair): as before
        o.remove(t)  # None: this thread recorded nothing, and one such entry is as good as another
        if t is not None:
            t[1](t[2])

    def __call__(self, fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"@region decorates a function, not {type(fn).__name__}")
        name = _rec.name_key(self.name or getattr(fn, "__qualname__", None) or repr(fn))
        args = self.args
        plain = args is None or snapshot(args) is args  # else snapshot on each call
        host_only = self.host_only
        wrapper: Callable[..., Any]
        if inspect.iscoroutinefunction(fn):

            async def wrapper(*a: Any, **k: Any) -> Any:
                rec = _rec.current
                if rec is None:
                    return await fn(*a, **k)
                enter, exit = (rec.enter_host, rec.exit_host) if host_only else (rec.enter, rec.exit)
                tok = enter(name, args if plain else snapshot(args))  # type: ignore[arg-type]
                try:
                    return await fn(*a, **k)
                finally:
                    exit(tok)

        else:

            def wrapper(*a: Any, **k: Any) -> Any:
                rec = _rec.current
                if rec is None:
                    return fn(*a, **k)
                enter, exit = (rec.enter_host, rec.exit_host) if host_only else (rec.enter, rec.exit)
                tok = enter(name, args if plain else snapshot(args))  # type: ignore[arg-type]
                try:
                    return fn(*a, **k)
                finally:
                    exit(tok)

        return functools.wraps(fn)(wrapper)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"region({self.name!r})"


@overload
def region(name: str, /, *, host_only: bool = False, **args: Any) -> Region: ...
@overload
def region(fn: F, /) -> F: ...
@overload
def region(*, host_only: bool = False, **args: Any) -> Region: ...
def region(name_or_fn: Any = None, /, *, host_only: bool = False, **args: Any) -> Any:
    """A span on the host lane of this thread and, with CUDA, on the current stream.

    ``with region("step", batch=3): ...``, ``@region`` (named after the function) or
    ``@region("load")``. Keyword args become slice args in the trace.

    ``host_only=True`` records no device span: for host work such as a CPU task, whose
    event pair would only show the stream idling (or waiting behind earlier work).
    """
    if name_or_fn is None or isinstance(name_or_fn, str):
        return Region(name_or_fn, args, host_only)
    if callable(name_or_fn) and not args and not host_only:
        return Region(None, None)(name_or_fn)
    raise TypeError(
        f"region() takes a name (str) or a function, not {type(name_or_fn).__name__}; "
        'use with evtrace.region("name") or @evtrace.region'
    )
