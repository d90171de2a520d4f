"""The trace itself as a view: Chrome trace-event JSON as Perfetto imports it.

The encoding is the session's save format and lives in ``evtrace.session``; this view gives it
the exporters' shape (a suffix, binary output, ``render(session)``).
"""

from __future__ import annotations

from typing import ClassVar

from ..files import gzip_stream
from ..session import Session, trace_bytes, trace_chunks


class ChromeTrace:
    """The trace document; gzipped when ``compress`` (the ``.json.gz`` suffix), as ``save`` writes it."""

    suffix: ClassVar[str] = ".json.gz"
    binary: ClassVar[bool] = True

    def __init__(self, compress: bool = True) -> None:
        self.compress = compress

    def render(self, s: Session) -> bytes:
        return b"".join(gzip_stream(trace_chunks(s))) if self.compress else trace_bytes(s)
