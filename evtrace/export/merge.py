"""`evtrace merge`: per-rank or per-process sessions onto one clock, as one Session.

On one host (same machine and boot, see ``host_id``) every process reads the same monotonic
``perf_counter``, so each session is shifted by the difference of its recorded origin: exact.
Across hosts the wall-clock origins are used, and the merged metadata says how uncertain
that is (as good as the hosts' clock synchronisation).

The result is a Session like any other (summary, report, render and merge read it) whose
``ranks`` hold one Session per input, each on the merged clock (``Session.combine``). Reading
and writing the files is the caller's job (the CLI's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..session import COUNTS, Session
from .kineto import attach, relabel

__all__ = ["COUNTS", "merge"]


def _shifted(s: Session, shift: int) -> Session:
    """``s`` with its times ``shift`` ns later, and its origin as much earlier: the same instants."""
    r = s.regions.copy()
    dev = r["device"] >= 0  # a region with no device span keeps its zero device times
    for col in ("host_start", "host_end"):
        r[col] += shift
    for col in ("dev_start", "dev_end"):
        r[col][dev] += shift
    meta = dict(s.meta)
    if "origin_perf_ns" in meta:
        meta["origin_perf_ns"] = int(meta["origin_perf_ns"]) - shift
    meta["shift_ns"] = int(meta.get("shift_ns", 0)) + shift  # from the rank's own recording
    return dataclasses.replace(s, regions=r, meta=meta, wall_origin_ns=s.wall_origin_ns - shift, ranks=[])


def merge(
    sessions: Sequence[Session],
    inputs: Sequence[str] = (),
    profiles: Sequence[tuple[dict[str, Any], str]] = (),
) -> Session:
    """The merged session; inputs ordered by rank (then by position). A merged input gives its
    ranks. ``inputs`` (e.g. the file names) are kept in the metadata as ``merge.inputs``.
    ``profiles``: torch.profiler (Kineto) traces with their names, placed on the merged clock
    (``export.kineto``); profiler lanes an input already has are kept, on the merged clock."""
    ranks: list[Session] = []
    carried: list[tuple[Session, Session]] = []  # (input with profiler lanes, its first rank)
    for s in sessions:
        ranks += s.ranks or [s]
        if s.profiler:
            carried.append((s, (s.ranks or [s])[0]))
    ranks.sort(key=lambda s: s.meta["rank"] if isinstance(s.meta.get("rank"), int) else 1 << 30)
    hosts = {s.meta.get("host_id") for s in ranks}
    if len(hosts) == 1 and None not in hosts and all("origin_perf_ns" in s.meta for s in ranks):
        origins = [int(s.meta["origin_perf_ns"]) for s in ranks]
        method = "one host: shared perf_counter, exact"
    else:
        origins = [s.wall_origin_ns for s in ranks]
        method = (
            "several hosts: wall-clock origins; uncertain by the hosts' clock synchronisation "
            "(NTP: typically 0.1-10 ms)"
        )
    base = min(origins)
    meta: dict[str, Any] = {"evtrace": __version__, "merge.method": method, "merge.inputs": list(inputs)}
    out = Session.combine([_shifted(s, o - base) for s, o in zip(ranks, origins)], meta)
    fits: dict[str, Any] = {}
    for s, first in carried:
        shift = origins[next(i for i, r in enumerate(ranks) if r is first)] - base
        old = s.meta.get("profiler")
        index: dict[int, int] = {}
        for n, fit in old.items() if isinstance(old, dict) else []:
            index[int(n)] = len(fits)
            fits[str(len(fits))] = fit
        out.profiler += relabel(s.profiler, shift, index)
    if fits:
        out.meta["profiler"] = fits
    for doc, name in profiles:
        out = attach(out, doc, name)
    return out
