"""`evtrace merge`: per-rank or per-process traces onto one clock, in one file.

On one host (same machine and boot, see ``host_id``) every process reads the same monotonic
``perf_counter``, so each trace is shifted by the difference of its recorded origin: exact.
Across hosts the wall-clock origins are used, and the merged metadata says how uncertain
that is (as good as the hosts' clock synchronisation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from .chrome import DEVICE_PID, FORMAT, TraceError, load_json

HOST_PID_BASE = 1_000_000  # merged host processes: below the device pids, unique per input
PIDS_PER_INPUT = 1_000  # room for one host and its GPUs per input


def _ns(us: Any) -> int:
    return round(float(us) * 1000)


def merge(paths: list[Path]) -> dict[str, Any]:
    """The merged document; inputs ordered by rank (then by position)."""
    docs = []
    for p in paths:
        doc = load_json(p)
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        if not isinstance(meta, dict) or meta.get("evtrace.format") != FORMAT:
            raise TraceError(f"{p} is not an evtrace trace (format {FORMAT})")
        docs.append((p, doc, meta))
    docs.sort(key=lambda t: int(t[2]["rank"]) if isinstance(t[2].get("rank"), int) else 1 << 30)
    hosts = {m.get("host_id") for _, _, m in docs}
    same_host = len(hosts) == 1 and None not in hosts and all("origin_perf_ns" in m for _, _, m in docs)
    if same_host:
        origins = [int(m["origin_perf_ns"]) for _, _, m in docs]
        method = "one host: shared perf_counter, exact"
    else:
        origins = [int(m["evtrace.wall_origin_ns"]) for _, _, m in docs]
        method = "several hosts: wall-clock origins; uncertain by the hosts' clock synchronisation (NTP: typically 0.1-10 ms)"
    base = min(origins)
    walls = [int(m["evtrace.wall_origin_ns"]) for _, _, m in docs]
    events: list[dict[str, Any]] = []
    meta_out: dict[str, Any] = {"evtrace": docs[0][2].get("evtrace"), "evtrace.merged": [str(p) for p, _, _ in docs], "merge.method": method}
    next_flow = 0
    for i, ((p, doc, meta), origin) in enumerate(zip(docs, origins)):
        shift = origin - base
        label = f"rank {meta['rank']}" if isinstance(meta.get("rank"), int) else f"trace {i}"
        host_pid = int(meta["evtrace.pid"])
        pid_map: dict[int, int] = {}

        def new_pid(pid: int) -> int:
            if pid not in pid_map:
                off = 0 if pid == host_pid else 1 + (pid - DEVICE_PID if pid >= DEVICE_PID else len(pid_map))
                pid_map[pid] = HOST_PID_BASE + i * PIDS_PER_INPUT + off
            return pid_map[pid]

        max_flow = 0
        for ev in doc["traceEvents"]:
            ev = dict(ev)
            ev["pid"] = new_pid(int(ev["pid"]))
            if "ts" in ev:
                ev["ts"] = (_ns(ev["ts"]) + shift) / 1000
            if "bind_id" in ev:
                max_flow = max(max_flow, int(ev["bind_id"]))
                ev["bind_id"] = int(ev["bind_id"]) + next_flow
            if ev.get("ph") == "M" and ev.get("name") == "process_name":
                name = str(ev["args"]["name"])
                name = name.split(" · ", 1)[1] if name.startswith("rank ") and " · " in name else name
                ev["args"] = {"name": f"{label} · {name}"}
            elif ev.get("ph") == "M" and ev.get("name") == "process_sort_index":
                ev["args"] = {"sort_index": i * 100 + int(ev["args"]["sort_index"])}
            events.append(ev)
        next_flow += max_flow
        for k, v in meta.items():
            if not k.startswith("evtrace."):
                meta_out[f"{label}.{k}"] = v
        meta_out[f"{label}.shift_ns"] = shift
    return {"traceEvents": events, "displayTimeUnit": "ms", "baseTimeNanoseconds": walls[origins.index(base)], "metadata": meta_out}


def write(doc: dict[str, Any], path: Path) -> Path:
    from .chrome import write_bytes

    return write_bytes(orjson.dumps(doc), path)
