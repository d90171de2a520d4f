"""``region``: one name, three uses: ``with region("x")``, ``@region``, ``@region("x")``.

``Region`` and the common call, ``region("name", **args)``, are C (``evtrace._core``): a region
costs a few hundred ns with no session and not much more in one. The decorator's wrapper and
the less common calls are here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from . import _core
from . import recorder as _rec
from .values import MAX_STR, encode

F = TypeVar("F", bound=Callable[..., Any])

Region = _core.Region
region = _core.region


def _decorate(r: Region, fn: Any) -> Any:
    """``@region`` / ``@region("name")``: ``fn`` wrapped in a region named after it (or ``r``'s
    name), with ``r``'s args, copied on each call."""
    if not callable(fn):
        raise TypeError(f"@region decorates a function, not {type(fn).__name__}")
    name = _rec.name_key(r.name or getattr(fn, "__qualname__", None) or repr(fn))
    args = None if r.args is None else dict(r.args)  # the wrapper's own: nothing else can change it
    host_only = r.host_only
    wrapper: Callable[..., Any]
    if inspect.iscoroutinefunction(fn):

        async def wrapper(*a: Any, **k: Any) -> Any:
            rec = _rec.current
            if rec is None:
                return await fn(*a, **k)
            enter, exit = (rec.enter_host, rec.exit_host) if host_only else (rec.enter, rec.exit)
            tok = enter(name, args)
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
            tok = enter(name, args)
            try:
                return fn(*a, **k)
            finally:
                exit(tok)

    return functools.wraps(fn)(wrapper)


def _region_slow(name_or_fn: Any = None, /, *, host_only: bool = False, **args: Any) -> Any:
    """``region(...)`` for all but a str name (which the core handles): a function to decorate,
    args alone (a decorator with args), or a mistake, said plainly."""
    if name_or_fn is None or isinstance(name_or_fn, str):
        return Region(name_or_fn, args, host_only)
    if callable(name_or_fn) and not args and not host_only:
        return _decorate(Region(None, None), name_or_fn)
    raise TypeError(
        f"region() takes a name (str) or a function, not {type(name_or_fn).__name__}; "
        'use with evtrace.region("name") or @evtrace.region'
    )


# The core's Python parts, bound once at `import evtrace` (torch's, which that never imports, are
# bound by instrumentation.bind_torch): Region interns its name through the recorder's table.
_core.bind(
    **_rec.core_parts(),
    encode=encode,
    decorate=_decorate,
    region_slow=_region_slow,
    max_str=MAX_STR,
)
