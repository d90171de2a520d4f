"""Files: atomic writes (temp file, then rename; gzip by suffix) and reading JSON that may be
gzipped. ``TraceError`` is what reading a file that is not a usable trace raises.

Imports nothing of evtrace: the session's save and load, merge and the CLI's text outputs use it.
"""

from __future__ import annotations

import gzip
import io
import os
import sys
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

PROGRESS_AFTER_S = 1.0  # a write that takes longer says so on stderr


class TraceError(Exception):
    """A file that is not a readable evtrace trace (missing, truncated, not JSON, not evtrace's)."""


def write_bytes(chunks: Iterable[bytes | bytearray] | bytes, path: Path) -> Path:
    """Write atomically (temp file, then rename), gzip when ``path`` ends in ``.gz``.

    The temp file is removed on any exception, KeyboardInterrupt and SystemExit included, and the
    exception goes on. A write that takes over a second prints a progress line on stderr.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    start = time.monotonic()
    shown = False
    written = 0
    try:
        with open(tmp, "wb") as raw:
            f: io.BufferedIOBase = (
                gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3, mtime=0)
                if path.suffix == ".gz"
                else raw
            )
            for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
                f.write(chunk)
                written += len(chunk)
                if not shown and time.monotonic() - start > PROGRESS_AFTER_S:
                    print(
                        f"evtrace: writing {path} ({written / 1e6:.0f} MB of JSON so far) ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    shown = True
            if f is not raw:
                f.close()
        os.replace(tmp, path)
    except BaseException:  # a signal or an error mid-write: no half file, no temp file left
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if shown:
        took = time.monotonic() - start
        print(
            f"evtrace: writing {path}: done, {path.stat().st_size / 1e6:.1f} MB in {took:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return path


def read_json(path: Path) -> Any:
    """The parsed JSON of a file (gzip detected by magic bytes). TraceError on failure."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TraceError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return orjson.loads(raw)
    except (EOFError, OSError, zlib.error):
        raise TraceError(f"{path} is not a complete gzip file (truncated or corrupt)") from None
    except orjson.JSONDecodeError as e:
        raise TraceError(f"{path} is not valid trace JSON ({e.args[0] if e.args else e})") from None
