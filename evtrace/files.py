"""Files: atomic writes (temp file, then rename; gzip by suffix, deflated on worker threads) and
reading JSON that may be gzipped. ``TraceError`` is what reading a file that is not a usable trace
raises.

Imports nothing of evtrace: the session's save and load, the Chrome view, merge and the CLI's text
outputs use it.
"""

from __future__ import annotations

import gzip
import os
import struct
import sys
import time
import zlib
from collections import deque
from collections.abc import Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson

PROGRESS_AFTER_S = 1.0  # a write that takes over this long says so on stderr
# level 2 costs ~15 % less CPU than 3 for ~2.5 % more bytes (137 MB of trace text, 1M host-only
# regions: 0.46 s of deflate for 15.4 MB instead of 0.54 s for 15.0 MB); deflate is most of a write
GZIP_LEVEL = 2
PIECE = 1 << 20  # the text is deflated in pieces of about this many bytes, several at once


class TraceError(Exception):
    """A file that is not a readable evtrace trace (missing, truncated, not JSON, not evtrace's)."""


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (zlib's crc32.c; reflected bits)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ 0xEDB88320 if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^n) modulo the polynomial
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from those of A and B and the length of B (zlib's, which Python's
    zlib module lacks): pieces checksummed on several threads give the file's one CRC."""
    p, k = 1 << 31, 3  # x^(8 * len2): len2 bytes of zeros appended
    while len2:
        if len2 & 1:
            p = _multmodp(_X2N[k & 31], p)
        len2 >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


def _deflate(text: list[bytes | bytearray], level: int) -> tuple[bytes, int, int]:
    """One piece: its raw deflate data, unfinished and ending on a byte boundary (so that pieces
    join into one stream), its CRC-32 and its length."""
    z = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    out, crc, size = [], 0, 0
    for t in text:
        out.append(z.compress(t))
        crc = zlib.crc32(t, crc)
        size += len(t)
    out.append(z.flush(zlib.Z_SYNC_FLUSH))
    return b"".join(out), crc, size


def gzip_stream(chunks: Iterable[bytes | bytearray], level: int = GZIP_LEVEL) -> Generator[bytes, None, None]:
    """The gzip file of the chunks' concatenation, in pieces, as pigz makes it: one member whose
    deflate stream is ~1 MB pieces compressed independently on worker threads while the caller
    makes the next chunks (zlib releases the GIL).
    """
    # no file name, no time: the same trace gives the same file (OS unknown, as GzipFile writes)
    yield b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(4, cpus)
    pool: ThreadPoolExecutor | None = None
    jobs: deque[Future[tuple[bytes, int, int]]] = deque()
    text: list[bytes | bytearray] = []
    crc = size = pending = 0

    def done(piece: tuple[bytes, int, int]) -> bytes:
        nonlocal crc, size
        data, piece_crc, piece_size = piece
        crc, size = crc32_combine(crc, piece_crc, piece_size), size + piece_size
        return data

    try:
        for chunk in chunks:
            text.append(chunk)
            pending += len(chunk)
            if pending >= PIECE:
                pool = pool or ThreadPoolExecutor(workers, thread_name_prefix="evtrace-gzip")
                jobs.append(pool.submit(_deflate, text, level))
                text, pending = [], 0
                while jobs and (jobs[0].done() or len(jobs) > workers + 1):  # in order; memory bounded
                    yield done(jobs.popleft().result())
        for job in jobs:
            yield done(job.result())
        yield done(_deflate(text, level)) + b"\x03\x00"  # and the final block, empty
        yield struct.pack("<II", crc, size & 0xFFFFFFFF)
    finally:
        if pool:  # on an error too: no worker outlives the write
            pool.shutdown(cancel_futures=True)


CLEAR = "\r\x1b[K"  # back to the start of the terminal's line, and clear it


class Progress:
    """A line on stderr for work that has taken over PROGRESS_AFTER_S so far: "evtrace: <what>
    (<detail>) ...", rewritten in place on a terminal (every second), a new line now and then in a
    log (every 10 s); and a closing "evtrace: <what>: done, <detail> in <t> s" where one was shown."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.start = time.monotonic()
        self.due = self.start + PROGRESS_AFTER_S
        self.tty = sys.stderr.isatty()
        self.shown = False

    def update(self, detail: str) -> None:
        if time.monotonic() > self.due:
            line = f"evtrace: {self.what} ({detail}) ..."
            tty = self.tty
            print(f"{CLEAR}{line}" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
            self.shown, self.due = True, time.monotonic() + (1.0 if tty else 10.0)

    def done(self, detail: str) -> None:
        if self.shown:
            took = time.monotonic() - self.start
            print(
                f"{CLEAR if self.tty else ''}evtrace: {self.what}: done, {detail} in {took:.1f} s",
                file=sys.stderr,
                flush=True,
            )


def write_bytes(chunks: Iterable[bytes | bytearray] | bytes, path: Path) -> Path:
    """Write atomically (temp file, then rename), gzip when ``path`` ends in ``.gz``.

    The temp file is removed on any exception, KeyboardInterrupt and SystemExit included, and the
    exception goes on. A write that takes over a second prints a progress line on stderr.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    progress = Progress(f"writing {path}")

    def text() -> Generator[bytes | bytearray, None, None]:
        written = 0
        for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
            written += len(chunk)
            progress.update(f"{written / 1e6:.0f} MB so far")
            yield chunk

    try:
        # closed on the way out: gzip's workers stop with the write, an interrupted one too
        with open(tmp, "wb") as f, closing(gzip_stream(text()) if path.suffix == ".gz" else text()) as out:
            for piece in out:
                f.write(piece)
        os.replace(tmp, path)
    except BaseException:  # a signal or an error mid-write: no half file, no temp file left
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    progress.done(f"{path.stat().st_size / 1e6:.1f} MB")
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
