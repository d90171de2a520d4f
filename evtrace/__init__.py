"""evtrace: host launch lanes and device execution lanes on one clock, for ui.perfetto.dev."""

from __future__ import annotations

__version__ = "0.1.0"

from . import startup  # noqa: F401  (first: it reads the warning filters before numpy and torch add theirs)
from .api import record
from .files import TraceError
from .instrumentation import instrument
from .metadata import DeviceAlignment
from .regions import region
from .session import Session

load = Session.load

# the API docs/api.md documents, and no more: tests/test_public_api.py pins it
__all__ = [
    "DeviceAlignment",
    "Session",
    "TraceError",
    "__version__",
    "instrument",
    "load",
    "record",
    "region",
]


def load_ipython_extension(ip: object) -> None:
    """``%load_ext evtrace``: the ``%%evtrace`` and ``%evtrace_view`` magics. IPython is imported
    only here, never by ``import evtrace``."""
    from .notebook import load_ipython_extension as register

    register(ip)
