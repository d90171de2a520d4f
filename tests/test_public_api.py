"""The public surface of ``import evtrace`` is the API docs/api.md documents, chosen and pinned."""

from __future__ import annotations
import __future__

import inspect
import re
import types
from pathlib import Path

import evtrace

PUBLIC = {
    "DeviceAlignment",
    "Session",
    "TraceError",
    "__version__",
    "instrument",
    "load",
    "record",
    "region",
}
# public names that are not API: IPython's `%load_ext evtrace` hook
NOT_API = {"load_ipython_extension"}


def test_all_is_the_documented_api() -> None:
    assert set(evtrace.__all__) == PUBLIC
    assert len(evtrace.__all__) == len(PUBLIC)  # no name twice


def test_each_public_name_is_importable_and_documented() -> None:
    for name in evtrace.__all__:
        obj = getattr(evtrace, name)
        if inspect.isclass(obj) or callable(obj):
            assert inspect.getdoc(obj), f"evtrace.{name} has no docstring"
    assert isinstance(evtrace.__version__, str) and evtrace.__version__.count(".") == 2


def test_star_import_gives_exactly_all() -> None:
    ns: dict[str, object] = {}
    exec("from evtrace import *", ns)
    assert set(ns) - {"__builtins__"} == PUBLIC


def test_no_public_name_escapes_all() -> None:
    """A new top-level name is either API (added to ``__all__`` and here) or private (``_``)."""
    stray = {
        name
        for name, obj in vars(evtrace).items()
        if not name.startswith("_") and not isinstance(obj, (types.ModuleType, __future__._Feature))
    }
    assert stray - NOT_API == PUBLIC - {"__version__"}


def test_readme_api_names_are_public() -> None:
    """What the API's documentation (docs/api.md, linked from the README) calls ``evtrace.X`` is in
    ``__all__``, and the sentence that lists the API names all of it."""
    api = (Path(__file__).parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
    named = set(re.findall(r"evtrace\.([A-Za-z_]\w*)", api))
    assert named <= PUBLIC, named - PUBLIC
    listed = api[api.index("`__all__` names:") + 16 :].split(";", 1)[0]
    assert set(re.findall(r"`(\w+)`", listed)) == PUBLIC
