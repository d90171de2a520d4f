"""`evtrace merge`: per-rank or per-process sessions onto one clock, as one Session.

Each rank is placed on the first rank's clock by the best means its metadata allows, and the
merged metadata says which each got (``merge.ranks``, summed up in ``merge.method``):

- one host (same machine and boot, see ``host_id``) and one monotonic clock: each session is
  shifted by the difference of its recorded origin, exact. One clock is checked where both
  traces have their start's clock pair (``clock_pair``: perf_counter and CLOCK_REALTIME read
  together): processes in different time namespaces share a boot but not ``perf_counter``;
- clock offsets measured through the job's process group (``evtrace.hostclock``: the same
  ``rank_clock.reference`` as the first rank): rank 0's clock, within each rank's stated bound,
  with the drift between the start and end measurements (constant beyond them);
- else the wall-clock origins, as uncertain as the hosts' clock synchronisation.

The result is a Session like any other (summary, report, render and merge read it) whose
``ranks`` hold one Session per input, each on the merged clock (``Session.combine``). Reading
and writing the files is the caller's job (the CLI's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import __version__
from .export.kineto import attach, relabel
from .metadata import CLOCK_PAIR, RANK_CLOCK, RankClock
from .session import COUNTS, Session, rank_labels

__all__ = ["COUNTS", "merge"]


#: two traces of one boot share perf_counter when their (CLOCK_REALTIME - perf_counter) at the
#: start agree within this, plus NTP's largest slew (500 ppm) of the time between the starts: a
#: time namespace moves it by its offset (seconds at least, in practice)
SAME_CLOCK_NS = 1_000_000
SLEW_PPM = 500.0
WALL = "wall-clock origin; uncertain by the hosts' clock synchronisation (NTP: typically 0.1-10 ms)"
SHARED = "one host: shared perf_counter, exact"

#: what to add to a rank's perf_counter ns (float64) to put them on the merged clock
Offset = Callable[[np.ndarray], np.ndarray]


def _constant(d: float) -> Offset:
    return lambda x: np.full_like(x, d)


def _shifted(s: Session, shift: int, vary: Offset | None = None) -> Session:
    """``s`` with its times ``shift`` ns later, and its origin as much earlier: the same instants.
    ``vary``: ns more, by time since ``s``'s origin, where a rank's offset drifts."""
    r = s.regions.copy()
    dev = r["device"] >= 0  # a region with no device span keeps its zero device times
    for col in ("host_start", "host_end"):
        r[col] += shift
        if vary is not None:
            r[col] += np.rint(vary(s.regions[col].astype(np.float64))).astype(np.int64)
    for col in ("dev_start", "dev_end"):
        r[col][dev] += shift
        if vary is not None:
            r[col][dev] += np.rint(vary(s.regions[col][dev].astype(np.float64))).astype(np.int64)
    meta = dict(s.meta)
    if "origin_perf_ns" in meta:
        meta["origin_perf_ns"] = int(meta["origin_perf_ns"]) - shift
    meta["shift_ns"] = int(meta.get("shift_ns", 0)) + shift  # from the rank's own recording
    return dataclasses.replace(s, regions=r, meta=meta, wall_origin_ns=s.wall_origin_ns - shift, ranks=[])


def _drift(f: Offset, origin: float, at_origin: float) -> Offset:
    """The change of offset ``f`` since ``origin`` (where it was ``at_origin``), by time since it."""
    return lambda t: f(t + origin) - at_origin


def _clock(s: Session) -> RankClock | None:
    c = s.meta.get(RANK_CLOCK)
    return c if isinstance(c, RankClock) else None


def _offset(c: RankClock) -> Offset:
    """Rank 0's clock minus this rank's, at this rank's ns: linear between the measurements."""
    ats = [c.start_at_ns] * bool(c.start_samples) + [c.end_at_ns] * bool(c.end_samples)
    offs = [c.start_offset_ns] * bool(c.start_samples) + [c.end_offset_ns] * bool(c.end_samples)
    if c.method == "reference" or not ats:
        return _constant(0.0)
    if len(ats) == 2 and ats[1] < ats[0]:
        ats, offs = ats[::-1], offs[::-1]
    xp, fp = np.array(ats, np.float64), np.array(offs, np.float64)
    return lambda x: np.interp(x, xp, fp)


def _measured(c: RankClock | None, token: str) -> bool:
    return (
        c is not None
        and bool(token)
        and c.reference == token
        and (c.method == "reference" or c.start_samples + c.end_samples > 0)
    )


def _one_clock(a: Session, b: Session) -> bool | None:
    """Whether two traces of one boot read one perf_counter, by their clock pairs; None: unknown."""
    pa, pb = a.meta.get(CLOCK_PAIR), b.meta.get(CLOCK_PAIR)
    if not (isinstance(pa, list) and isinstance(pb, list) and len(pa) == len(pb) == 2):
        return None
    gap = abs((int(pa[1]) - int(pa[0])) - (int(pb[1]) - int(pb[0])))
    return gap <= SAME_CLOCK_NS + SLEW_PPM * 1e-6 * abs(int(pa[1]) - int(pb[1]))


def _describe(c: RankClock) -> str:
    bound = max(c.start_bound_us, c.end_bound_us)
    sides = " and ".join(p for p, n in (("start", c.start_samples), ("end", c.end_samples)) if n)
    drift = f", drift {c.drift_ppm:+.2f} ppm" if c.start_samples and c.end_samples else ""
    return (
        f"offset to rank 0 measured through the process group's store at the {sides}: ±{bound:.1f} µs{drift}"
    )


def _placements(ranks: list[Session]) -> tuple[list[Offset], list[str]]:
    """What to add to each rank's perf_counter ns to put them on the first rank's clock (rank 0's
    where offsets were measured), and the method, in words."""
    a = ranks[0]
    ca = _clock(a)
    token = ca.reference if ca is not None and _measured(ca, ca.reference) else ""
    off_a = _offset(ca) if token and ca is not None else _constant(0.0)
    offsets: list[Offset] = []
    methods: list[str] = []
    for s in ranks:
        c = _clock(s)
        same = s.meta.get("host_id") is not None and s.meta.get("host_id") == a.meta.get("host_id")
        one = _one_clock(a, s) if same else False
        if s is a:
            offsets.append(off_a)
            methods.append(_describe(c) if token and c is not None and c.method != "reference" else SHARED)
        elif same and one is not False:  # one perf_counter: as exact as it gets
            offsets.append(off_a)
            methods.append(SHARED + (", one monotonic clock checked" if one else ""))
        elif _measured(c, token) and c is not None:
            offsets.append(_offset(c))
            methods.append(
                _describe(c) + ("; one boot, another monotonic clock (a time namespace?)" if same else "")
            )
        else:  # the wall clock: this rank's origin at its wall time's distance from the first rank's
            o_s, o_a = float(s.meta["origin_perf_ns"]), float(a.meta["origin_perf_ns"])
            offsets.append(
                _constant(o_a + float(off_a(np.array([o_a]))[0]) + s.wall_origin_ns - a.wall_origin_ns - o_s)
            )
            why = "one boot, another monotonic clock (a time namespace?); " if same else ""
            if c is not None and c.note:
                why += f"its offset was not measured ({c.note}); "
            methods.append(why + WALL)
    return offsets, methods


def _summary(methods: list[str], labels: list[str]) -> str:
    """The methods, each once, with the ranks that got it."""
    if all(m.startswith(SHARED) for m in methods):
        return SHARED
    if all(m == WALL for m in methods):
        return "several hosts: wall-clock origins; " + WALL.split("; ", 1)[1]
    groups: dict[str, list[str]] = {}
    for m, label in zip(methods, labels):
        short = SHARED if m.startswith(SHARED) else m.split(": ±")[0]
        groups.setdefault(short, []).append(label)
    return "; ".join(f"{', '.join(who)}: {m}" for m, who in groups.items())


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
    if all("origin_perf_ns" in s.meta for s in ranks):
        offsets, methods = _placements(ranks)
        starts = [float(s.meta["origin_perf_ns"]) for s in ranks]
    else:  # traces without their perf_counter origin: the wall clock alone
        offsets, methods = [_constant(0.0)] * len(ranks), [WALL] * len(ranks)
        starts = [float(s.wall_origin_ns) for s in ranks]
    at = [float(f(np.array([o]))[0]) for f, o in zip(offsets, starts)]  # each origin's offset
    origins = [round(o + d) for o, d in zip(starts, at)]
    base = min(origins)
    labels = rank_labels(ranks)
    meta: dict[str, Any] = {
        "evtrace": __version__,
        "merge.method": _summary(methods, labels),
        "merge.ranks": [f"{label}: {m}" for label, m in zip(labels, methods)],
        "merge.inputs": list(inputs),
    }
    shifted = []
    for s, f, st, d, o in zip(ranks, offsets, starts, at, origins):
        end = st + float(s.meta.get("duration_ns", 0))
        drifts = float(f(np.array([end]))[0]) != d  # else a shift is exact, without float rounding
        shifted.append(_shifted(s, o - base, _drift(f, st, d) if drifts else None))
    out = Session.combine(shifted, meta)
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
