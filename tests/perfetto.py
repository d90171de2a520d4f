"""Perfetto's own importer (trace_processor) for the tests, where it is present: the judge of
whether a trace imports cleanly (see ../shared/tools/README.md)."""

from __future__ import annotations

import gzip
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

TP_GZ = Path(
    os.environ.get("EVTRACE_TRACE_PROCESSOR")
    or Path(__file__).parents[2] / "shared/tools/trace_processor_shell.gz"
)
#: the import's problems: any stat above info level (errors, data losses) that is not zero
ERRORS = "select name, value from stats where value > 0 and severity != 'info'"

#: runs SQL on a trace; the rows, each a list of its columns as text
Query = Callable[[Path, str], list[list[str]]]


def importer(workdir: Path) -> Query | None:
    """A query runner over trace_processor unpacked into ``workdir``; None where there is none,
    or where it cannot run (e.g. an older glibc)."""
    if not TP_GZ.exists():
        return None
    tp = workdir / "tp"
    raw = TP_GZ.read_bytes()
    tp.write_bytes(gzip.decompress(raw) if TP_GZ.suffix == ".gz" else raw)
    tp.chmod(0o755)

    def query(trace: Path, sql: str) -> list[list[str]]:
        (workdir / "q.sql").write_text(sql)
        res = subprocess.run(
            [str(tp), "-q", str(workdir / "q.sql"), str(trace)], capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, res.stderr
        return [[c.strip('"') for c in line.split(",")] for line in res.stdout.strip().splitlines()[1:]]

    try:
        subprocess.run([str(tp), "--version"], capture_output=True, timeout=60)
    except OSError:
        return None
    return query
