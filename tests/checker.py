"""A strict checker for the traces evtrace writes, after shared/TRACE_FORMAT.md.

``problems(doc)`` lists every rule broken; a good trace has none.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

#: Perfetto's importer drops a slice at depth 512 or more on its lane (slice_max_depth_exceeded, v58.2)
MAX_DEPTH = 512
LANE_META = {"process_name", "process_sort_index", "thread_name", "thread_sort_index"}


def _ns(v: Any) -> int | None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return None
    ns = round(v * 1000)
    # at most three decimals of µs; a float's own rounding grows with it (past ~2.4 h of µs, more than 1e-3)
    return ns if abs(v * 1000 - ns) < max(1e-3, 2 * math.ulp(v) * 1000) else None


def problems(doc: Any) -> list[str]:
    out: list[str] = []
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        return ["not an object with a traceEvents list"]
    if not isinstance(doc.get("metadata"), dict) or "evtrace" not in doc["metadata"]:
        out.append("no metadata with the evtrace version")
    lanes: dict[tuple[int, int], list[tuple[int, int, str]]] = defaultdict(list)
    meta: dict[tuple[int, int], set[str]] = defaultdict(set)
    flows_out: dict[int, int] = {}
    flows_in: dict[int, int] = {}
    for k, ev in enumerate(doc["traceEvents"]):
        ph = ev.get("ph")
        pid, tid = ev.get("pid"), ev.get("tid")
        if not all(isinstance(x, int) and 0 < x < 2**32 for x in (pid, tid)):
            out.append(f"event {k}: pid/tid {pid}/{tid} not in 1..2^32-1")
            continue
        if ph == "M":
            if ev.get("name") not in LANE_META:
                out.append(f"event {k}: M event {ev.get('name')!r} is ignored by Perfetto")
            meta[(pid, tid)].add(ev["name"])
        elif ph == "X":
            ts, dur = _ns(ev.get("ts")), _ns(ev.get("dur"))
            if ts is None or dur is None or ts < 0 or dur < 0:
                out.append(
                    f"event {k}: X ts/dur {ev.get('ts')}/{ev.get('dur')}"
                    " not a non-negative µs value with ≤3 decimals"
                )
                continue
            if not isinstance(ev.get("name"), str):
                out.append(f"event {k}: X without a string name")
            lanes[(pid, tid)].append((ts, ts + dur, ev.get("name", "")))
            if ev.get("flow_out") is True:
                if ev.get("bind_id") in flows_out:
                    out.append(f"event {k}: flow id {ev.get('bind_id')} used twice as a source")
                flows_out[ev["bind_id"]] = ts
            if ev.get("flow_in") is True:
                if ev.get("bind_id") in flows_in:
                    out.append(f"event {k}: flow id {ev.get('bind_id')} used twice as a sink")
                flows_in[ev["bind_id"]] = ts
            if ("bind_id" in ev) and not isinstance(ev["bind_id"], int):
                out.append(f"event {k}: bind_id is not an integer")
        elif ph == "C":
            args = ev.get("args")
            ts = _ns(ev.get("ts"))
            if ts is None or ts < 0:
                out.append(f"event {k}: counter ts {ev.get('ts')} not a non-negative µs value")
            if (
                not isinstance(args, dict)
                or not args
                or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in args.values()
                )
            ):
                out.append(f"event {k}: counter args {args!r} are not finite numbers")
        else:
            out.append(f"event {k}: phase {ph!r} (only X, M and C are written)")
    for fid, ts_in in flows_in.items():
        if fid not in flows_out:
            out.append(f"flow {fid}: sink without source")
        elif not flows_out[fid] < ts_in:
            out.append(f"flow {fid}: source at {flows_out[fid]} ns is not strictly before sink at {ts_in} ns")
    for fid in flows_out.keys() - flows_in.keys():
        out.append(f"flow {fid}: source without sink")
    for lane, spans in lanes.items():
        if meta.get(lane, set()) != LANE_META:
            out.append(f"lane {lane}: M events {sorted(meta.get(lane, set()))}, want all four")
        spans.sort(key=lambda s: (s[0], -s[1]))  # Perfetto's order: by ts, the longer first, then as written
        stack: list[tuple[int, int, str]] = []
        deep = 0
        for s in spans:
            # touching spans are siblings; but as Perfetto nests, a span of no length stays open
            # for the next at its instant (which can only be of no length too)
            while stack and (stack[-1][1] < s[0] or stack[-1][0] < stack[-1][1] == s[0]):
                stack.pop()
            if stack and s[1] > stack[-1][1]:
                out.append(
                    f"lane {lane}: {s[2]!r} [{s[0]}, {s[1]})"
                    f" crosses {stack[-1][2]!r} [{stack[-1][0]}, {stack[-1][1]})"
                )
                continue
            if len(stack) >= MAX_DEPTH and not deep:
                out.append(
                    f"lane {lane}: {s[2]!r} [{s[0]}, {s[1]}) at depth {len(stack)}, past {MAX_DEPTH - 1}"
                )
            deep += len(stack) >= MAX_DEPTH
            stack.append(s)
        if deep > 1:
            out.append(f"lane {lane}: {deep} slices in all past depth {MAX_DEPTH - 1}, which Perfetto drops")
    return out
