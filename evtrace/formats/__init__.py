"""Trace formats, each in one module that writes and reads its own files, picked by suffix
through one table:

    .json  .json.gz          chrome.py    Chrome trace-event JSON (any viewer; Perfetto's legacy importer)
    .pftrace  .pftrace.gz    pftrace.py   Perfetto's native TrackEvent protobuf (3x leaner to import)

:meth:`Session.save`, :func:`evtrace.load`, ``record(path)``, ``-o`` and every command come here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from ..files import TraceError
from ..session import Session
from . import chrome, pftrace


class Format(NamedTuple):
    name: str  # as a user reads it
    save: Callable[[Session, Path], Path]
    read: Callable[[Path], Session]


CHROME = Format("Chrome JSON", chrome.save, chrome.read_slow)
PERFETTO = Format("Perfetto protobuf", pftrace.save, pftrace.read)

#: the one suffix table; the longest suffix that a name ends in wins
TABLE: dict[str, Format] = {
    ".json": CHROME,
    ".json.gz": CHROME,
    ".pftrace": PERFETTO,
    ".pftrace.gz": PERFETTO,
}
SUFFIXES = tuple(TABLE)


def suffix_of(path: Path | str) -> str | None:
    """The table's suffix that ``path`` ends in (case-insensitive), or None."""
    name = str(path).lower()
    found = [sfx for sfx in TABLE if name.endswith(sfx)]
    return max(found, key=len) if found else None


def split_suffix(name: str) -> tuple[str, str]:
    """``name`` as (stem, suffix) with a table suffix (``a.pftrace.gz`` -> ``a``, ``.pftrace.gz``),
    else as ``Path`` splits it."""
    sfx = suffix_of(name)
    if sfx:
        return name[: -len(sfx)], name[-len(sfx) :]
    p = Path(name)
    return p.stem, p.suffix


def suffix_problem(path: Path | str) -> str | None:
    """Why ``path`` names no trace format, in one line, or None."""
    if suffix_of(path) is None:
        kinds = {f: [k for k, g in TABLE.items() if g == f] for f in TABLE.values()}
        return f"{path} must end in " + ", or ".join(f"{' or '.join(k)} ({f.name})" for f, k in kinds.items())
    return None


def format_of(path: Path | str) -> Format:
    """The format ``path``'s suffix names; TraceError with one line when none does."""
    sfx = suffix_of(path)
    if sfx is None:
        raise TraceError(suffix_problem(path) or "")
    return TABLE[sfx]


def save(s: Session, path: Path) -> Path:
    """Write ``s`` in the format of ``path``'s suffix (atomic, as every format writes)."""
    return format_of(path).save(s, path)


def load(path: Path) -> Session:
    """Read a trace evtrace wrote, in the format of its suffix; TraceError on anything else."""
    return format_of(path).read(path)
