"""`evtrace merge`: per-rank or per-process traces onto one clock, in one file.

On one host (same machine and boot, see ``host_id``) every process reads the same monotonic
``perf_counter``, so each trace is shifted by the difference of its recorded origin: exact.
Across hosts the wall-clock origins are used, and the merged metadata says how uncertain
that is (as good as the hosts' clock synchronisation).

The result is a Session like any other (summary, report, render and merge read it) whose
``ranks`` hold one Session per input, each on the merged clock.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from ..session import Session
from . import chrome

#: metadata counts that add up over ranks
COUNTS = ("dropped_device_spans", "split_device_spans", "clamped_device_spans", "dropped_regions", "unfinished_regions")


def _shifted(s: Session, shift: int) -> Session:
    """``s`` with its times ``shift`` ns later, and its origin as much earlier: the same instants."""
    r = s.regions.copy()
    for col in ("host_start", "host_end", "dev_start", "dev_end"):
        r[col] += shift
    meta = dict(s.meta)
    if "origin_perf_ns" in meta:
        meta["origin_perf_ns"] = int(meta["origin_perf_ns"]) - shift
    meta["shift_ns"] = int(meta.get("shift_ns", 0)) + shift  # from the rank's own recording
    return dataclasses.replace(s, regions=r, meta=meta, wall_origin_ns=s.wall_origin_ns - shift, ranks=[])


def merge(paths: list[Path]) -> Session:
    """The merged session; inputs ordered by rank (then by position). A merged input gives its ranks."""
    ranks: list[Session] = []
    for p in paths:
        s = chrome.read(p)
        ranks += s.ranks or [s]
    ranks.sort(key=lambda s: s.meta["rank"] if isinstance(s.meta.get("rank"), int) else 1 << 30)
    hosts = {s.meta.get("host_id") for s in ranks}
    if len(hosts) == 1 and None not in hosts and all("origin_perf_ns" in s.meta for s in ranks):
        origins = [int(s.meta["origin_perf_ns"]) for s in ranks]
        method = "one host: shared perf_counter, exact"
    else:
        origins = [s.wall_origin_ns for s in ranks]
        method = "several hosts: wall-clock origins; uncertain by the hosts' clock synchronisation (NTP: typically 0.1-10 ms)"
    base = min(origins)
    from .. import __version__

    return combine([_shifted(s, o - base) for s, o in zip(ranks, origins)], {"evtrace": __version__, "merge.method": method, "merge.inputs": [str(p) for p in paths]})


def combine(ranks: list[Session], meta: dict[str, Any]) -> Session:
    """One Session holding every rank's regions (threads, devices and streams one after another),
    with ``ranks`` kept. Its metadata: ``meta``, the counts summed, every GPU, the longest duration,
    and the first rank's versions and command."""
    names: dict[str, int] = {}
    parts: list[np.ndarray] = []
    args: dict[int, dict[str, Any]] = {}
    threads: list[Any] = []
    devices: list[Any] = []
    streams: list[Any] = []
    first = ranks[0].meta if ranks else {}
    out_meta: dict[str, Any] = {k: first[k] for k in ("python", "torch", "cuda", "driver", "argv", "host_id") if k in first}
    out_meta.update(meta)
    for k in COUNTS:
        if any(k in s.meta for s in ranks):
            out_meta[k] = sum(int(s.meta.get(k, 0)) for s in ranks)
    out_meta["gpus"] = [g for s in ranks for g in (s.meta.get("gpus") or [])]
    ends = [int(s.meta.get("duration_ns", 0)) + int(s.meta.get("shift_ns", 0)) for s in ranks]
    out_meta["duration_ns"] = max(ends, default=0)
    for s in ranks:
        r = s.regions.copy()
        name_map = np.array([names.setdefault(n, len(names)) for n in s.names] or [0], dtype=np.int32)
        r["name"] = name_map[r["name"]]
        r["thread"] += len(threads)
        dev = r["device"] >= 0
        r["stream"][dev] += len(streams)
        r["device"][dev] += len(devices)
        offset = sum(len(part) for part in parts)
        args.update({i + offset: a for i, a in s.args.items()})
        parts.append(r)
        threads += s.threads
        streams += [dataclasses.replace(st, device=st.device + len(devices)) for st in s.streams]
        devices += [dataclasses.replace(d, index=len(devices) + k) for k, d in enumerate(s.devices)]
    regions = np.concatenate(parts) if parts else np.zeros(0, chrome.REGION_DTYPE)
    wall = min((s.wall_origin_ns for s in ranks), default=0)
    pid = ranks[0].pid if ranks else 0
    return Session(regions, list(names), threads, devices, streams, args, out_meta, pid, wall, ranks=list(ranks))


def write(s: Session, path: Path) -> Path:
    return chrome.write(s, path)
