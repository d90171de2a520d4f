"""The trace itself as a view: Chrome trace-event JSON as Perfetto imports it.

The encoding is the session's save format and lives in ``evtrace.session``; this view gives it
the exporters' shape (a suffix, binary output, ``render(session)``).
"""

from __future__ import annotations

import gzip
from typing import ClassVar

from ..session import Session, trace_bytes


class ChromeTrace:
    """The trace document; gzipped when ``compress`` (the ``.json.gz`` suffix)."""

    suffix: ClassVar[str] = ".json.gz"
    binary: ClassVar[bool] = True

    def __init__(self, compress: bool = True) -> None:
        self.compress = compress

    def render(self, s: Session) -> bytes:
        raw = trace_bytes(s)
        return gzip.compress(raw, compresslevel=3, mtime=0) if self.compress else raw
