"""Region args as small, plain snapshots taken when the region is entered.

A region keeps what its args *were*, not the objects: a tensor becomes its shape, dtype and
device (its data is neither copied nor kept alive), a container is copied, and anything else
becomes its repr, capped. Converting never raises: a value whose repr fails becomes a marker,
so one bad arg can never cost the session.

The snapshot is kept as JSON text (bytes), encoded on entry: the core encodes plain scalars
itself and hands everything else to :func:`encode`. Bytes need no GIL to move or drop.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import orjson

MAX_STR = 1000  # a str arg longer than this is cut, and the cut marked with "…"
MAX_REPR = 200  # the repr of any other object likewise
MAX_ITEMS = 100  # items kept of a list, tuple or dict
MAX_DEPTH = 4  # nesting kept of lists, tuples and dicts

_SCALARS = (float, bool, type(None))
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1  # what a JSON writer takes as a number
_INF = float("inf")


def snapshot(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` itself when every value is a plain scalar (the common ``step=i``), else a copy
    with each value converted by :func:`value`."""
    for v in args.values():
        t = type(v)
        if t is int:
            if not _INT_MIN <= v <= _INT_MAX:
                break
        elif t is str:
            if len(v) > MAX_STR:
                break
        elif t is float:
            if v != v or v in (_INF, -_INF):
                break
        elif t not in _SCALARS:
            break
    else:
        return args
    return {k if type(k) is str else _cap(_repr(k), MAX_REPR): value(v) for k, v in args.items()}


def encode(args: Mapping[str, Any]) -> bytes:
    """``args`` as the trace keeps them: the :func:`snapshot`, as JSON text."""
    snap = snapshot(dict(args))
    try:
        return orjson.dumps(snap)
    except orjson.JSONEncodeError:  # a str that is not valid Unicode (a lone surrogate)
        return orjson.dumps(_valid(snap))


def _valid(v: Any) -> Any:
    """``v`` with every str made valid Unicode (lone surrogates as backslash escapes)."""
    if type(v) is str:
        return v.encode("utf-8", "backslashreplace").decode("utf-8")
    if type(v) is dict:
        return {_valid(k): _valid(x) for k, x in v.items()}
    if type(v) is list:
        return [_valid(x) for x in v]
    return v


def value(v: Any, depth: int = 0) -> Any:
    """A plain, bounded copy of ``v`` that a JSON writer takes as it is."""
    t = type(v)
    if t is str:
        return _cap(v, MAX_STR)
    if t is int:
        if _INT_MIN <= v <= _INT_MAX:
            return v
        return (
            _cap(repr(v), MAX_REPR) if v.bit_length() < 10_000 else f"<int of {v.bit_length()} bits>"
        )  # repr refuses beyond
    if t is float and (v != v or v in (_INF, -_INF)):
        return repr(v)  # JSON has no NaN or infinity: "nan", "inf", "-inf", kept as they were
    if t in _SCALARS:
        return v
    if t is list or t is tuple or t is dict:
        if depth >= MAX_DEPTH:
            return f"{t.__name__}[{len(v)}] …"
        if t is dict:
            out: dict[str, Any] = {}
            for i, (k, x) in enumerate(v.items()):
                if i == MAX_ITEMS:
                    out["…"] = f"{len(v) - MAX_ITEMS} more"
                    break
                out[k if type(k) is str else _cap(_repr(k), MAX_REPR)] = value(x, depth + 1)
            return out
        items = [value(x, depth + 1) for x in v[:MAX_ITEMS]]
        if len(v) > MAX_ITEMS:
            items.append(f"… {len(v) - MAX_ITEMS} more")
        return items
    tensor = _array(v)
    if tensor is not None:
        return tensor
    return _cap(_repr(v), MAX_REPR)


def _array(v: Any) -> str | None:
    """``Tensor[1000, 1000] float32 cuda:0`` for a torch tensor, ``ndarray[3] int64`` for a
    numpy array; a numpy scalar as its number. None for anything else. Reads only metadata:
    no copy, no device sync."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and isinstance(v, torch.Tensor):
            return f"{type(v).__name__}{list(v.shape)} {str(v.dtype).removeprefix('torch.')} {v.device}"
        np = sys.modules.get("numpy")
        if np is not None and isinstance(v, np.ndarray):
            return f"{type(v).__name__}{list(v.shape)} {v.dtype}"
        if np is not None and isinstance(v, np.generic):
            return value(v.item())  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001  # a tensor subclass that fails on its metadata: its repr, or the marker
        return None
    return None


def _repr(v: Any) -> str:
    try:
        r = repr(v)
        return r if type(r) is str else str(r)
    except Exception as e:  # noqa: BLE001  # whatever it raises, the session is kept
        return f"<unrepresentable {type(v).__name__}: {type(e).__name__}>"


def _cap(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"
