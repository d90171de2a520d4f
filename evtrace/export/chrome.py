"""The trace itself as a view: Chrome trace-event JSON as Perfetto imports it.

The encoding is the session's save format and lives in ``evtrace.session``; this view gives it
the exporters' shape (a suffix, binary output, ``render(session)``) and keeps the names that
earlier versions exported here (``load_json``, ``write_bytes``, ``dumps``, ``TraceError``, ...).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import ClassVar

from ..files import TraceError, read_json, write_bytes
from ..session import DEVICE_PID, Session, rank_labels, sublanes, trace_bytes

__all__ = [
    "DEVICE_PID",
    "ChromeTrace",
    "TraceError",
    "dumps",
    "load_json",
    "rank_labels",
    "read",
    "sublanes",
    "write",
    "write_bytes",
]


class ChromeTrace:
    """The trace document; gzipped when ``compress`` (the ``.json.gz`` suffix)."""

    suffix: ClassVar[str] = ".json.gz"
    binary: ClassVar[bool] = True

    def __init__(self, compress: bool = True) -> None:
        self.compress = compress

    def render(self, s: Session) -> bytes:
        raw = trace_bytes(s)
        return gzip.compress(raw, compresslevel=3, mtime=0) if self.compress else raw


def dumps(s: Session) -> bytes:
    """The uncompressed trace document."""
    return trace_bytes(s)


def write(s: Session, path: Path) -> Path:
    """``s.save(path)``."""
    return s.save(path)


def read(path: Path) -> Session:
    """``Session.load(path)``."""
    return Session.load(path)


load_json = read_json  # the parsed JSON of a trace file (gzip by magic bytes); TraceError on failure
