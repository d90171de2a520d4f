"""Trace formats, each in one module that writes and reads its own files, picked by suffix
through one table:

    .json  .json.gz          chrome.py    Chrome trace-event JSON (any viewer; Perfetto's legacy importer)
    .pftrace  .pftrace.gz    pftrace.py   Perfetto's native TrackEvent protobuf (3x leaner to import)

:meth:`Session.save`, :func:`evtrace.load`, ``record(path)``, ``-o`` and every command come here.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import NamedTuple

from ..files import TraceError
from ..session import Session


class Format(NamedTuple):
    """A format, by the modules of this package that write and read it: imported on first use,
    so that ``import evtrace`` (the table: paths, suffixes) does not load the writers."""

    name: str  # as a user reads it
    writer: str  # evtrace.formats.<writer>.save(session, path) -> path
    reader: str  # evtrace.formats.<reader>.read(path) -> Session

    def save(self, s: Session, path: Path) -> Path:
        out: Path = importlib.import_module(f"{__name__}.{self.writer}").save(s, path)
        return out

    def read(self, path: Path) -> Session:
        s: Session = importlib.import_module(f"{__name__}.{self.reader}").read(path)
        return s


CHROME = Format("Chrome JSON", "chrome", "chrome_read")
PERFETTO = Format("Perfetto protobuf", "pftrace", "pftrace")

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


#: ui.perfetto.dev runs trace_processor compiled to WebAssembly, whose practical limit Perfetto's
#: docs put near 2 GB of memory
UI_LIMIT_BYTES = 2_000_000_000
#: trace_processor v58.2's peak memory (``/usr/bin/time -v``) per slice imported, on the 2-core CPU
#: (BENCHMARKS.md, #26), less the base, from the measurement nearest each format's limit: JSON, 1M
#: device regions (2M slices, 1M flows, the counters) in 1,289 MiB; .pftrace, 4M of them in 1,763
#: MiB. The native build stands in for the UI's wasm one.
IMPORT_BYTES_PER_SLICE = {CHROME: 660, PERFETTO: 227}
#: and per region with args: .pftrace 1M regions with one int arg each, 553 MiB against 520 without;
#: JSON's not measured (each of its slices carries 3-4 args of evtrace's already), counted as none
IMPORT_BYTES_PER_ARGS = {CHROME: 0, PERFETTO: 35}
IMPORT_BASE_BYTES = 35_000_000  # trace_processor with an empty trace (the figure)


def slices(s: Session) -> int:
    """The slices a viewer imports from ``s``: a host slice a region, a device slice a span."""
    return len(s) + s.device_spans + len(s.profiler)


def import_bytes(s: Session, fmt: Format) -> int:
    """About the memory Perfetto's importer needs for ``s`` written as ``fmt``."""
    return (
        IMPORT_BASE_BYTES + IMPORT_BYTES_PER_SLICE[fmt] * slices(s) + IMPORT_BYTES_PER_ARGS[fmt] * len(s.args)
    )


def too_big_for_ui(s: Session, path: Path | str) -> str | None:
    """Why ``s`` written at ``path`` is too big for ui.perfetto.dev to open, in one line, or None."""
    fmt = format_of(path)
    need = import_bytes(s, fmt)
    if need <= UI_LIMIT_BYTES:
        return None
    said = (
        f"{path} is too big for ui.perfetto.dev: {len(s):,} regions need about {need / 1e9:.1f} GB to import"
    )
    said += f" there, past its ~{UI_LIMIT_BYTES / 1e9:.0f} GB"
    if fmt is CHROME and import_bytes(s, PERFETTO) <= UI_LIMIT_BYTES:
        stem = split_suffix(str(path))[0]
        lean = import_bytes(s, PERFETTO) / 1e9
        return f"{said}; as .pftrace it needs {lean:.1f} GB (evtrace convert {path} {stem}.pftrace)"
    return f"{said} even as .pftrace; open a time window of it: evtrace view {path} --window START:END"


def save(s: Session, path: Path) -> Path:
    """Write ``s`` in the format of ``path``'s suffix (atomic, as every format writes); say on
    stderr when the UI could not open what was written."""
    out = format_of(path).save(s, path)
    big = too_big_for_ui(s, path)
    if big:
        print(f"evtrace: warning: {big}", file=sys.stderr)
    return out


def load(path: Path) -> Session:
    """Read a trace evtrace wrote, in the format of its suffix; TraceError on anything else."""
    return format_of(path).read(path)
