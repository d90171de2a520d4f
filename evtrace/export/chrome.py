"""Chrome trace-event JSON as Perfetto imports it (``shared/TRACE_FORMAT.md``), via orjson.

Lanes: the host process (real pid) with one lane per thread, then one process per GPU
(pid 10_000_000 + index) with one lane per stream. Every lane gets all four M events.
Spans that would cross on a lane move to an extra "(overlap)" lane, so nothing is dropped.
Times are integer ns since the session origin, written as µs with three decimals.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ..device import DeviceInfo
from ..session import REGION_DTYPE, Session, Stream, Thread

FORMAT = 1
DEVICE_PID = 10_000_000  # above Linux's pid_max, so never a real process
OVERLAP_TID = 0x7F000000  # first tid of the extra lanes for crossing spans
OWN_ARGS = ("region", "host_dur_us", "device_dur_us", "launch_delay_us")


class TraceError(Exception):
    """A file that is not a readable evtrace trace."""


def sublanes(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """For spans on one lane, the sub-lane (0 = the lane itself) on which each one nests.

    Intervals are closed-open: touching spans are siblings. A span that would cross one
    already open goes to the first sub-lane where it nests.
    """
    out = np.zeros(len(start), dtype=np.int32)
    if len(start) < 2:
        return out
    order = np.lexsort((-end, start))
    s, e = start[order], end[order]
    if np.all(s[1:] >= e[:-1]):  # flat: nothing nests, nothing crosses
        return out
    stacks: list[list[int]] = []
    lane_of = np.zeros(len(start), dtype=np.int32)
    for k, (st, en) in enumerate(zip(s.tolist(), e.tolist())):
        for lane, stack in enumerate(stacks):
            while stack and stack[-1] <= st:
                stack.pop()
            if not stack or en <= stack[-1]:
                stack.append(en)
                lane_of[k] = lane
                break
        else:
            stacks.append([en])
            lane_of[k] = len(stacks) - 1
    out[order] = lane_of
    return out


def _us(ns: int) -> float:
    return ns / 1000


def _text(s: str) -> str:
    """Strings orjson can write: lone surrogates become '?'."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


def _value(v: Any) -> Any:
    """An arg value that serialises: repr() for anything orjson refuses (huge ints, objects)."""
    try:
        orjson.dumps(v)
        return v
    except (TypeError, orjson.JSONEncodeError):
        return _text(repr(v))


def _lane_meta(pid: int, tid: int, pname: str, psort: int, tname: str, tsort: int) -> list[dict[str, Any]]:
    return [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": tid, "args": {"name": pname}},
        {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": psort}},
        {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": tname}},
        {"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tsort}},
    ]


def _flat(meta: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys; Perfetto shows flat metadata."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, float):
            out[prefix + k] = f"{v:.6g}"  # Perfetto turns floats into %g strings anyway
        else:
            out[prefix + k] = v
    return out


def trace_events(s: Session) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """The events of a session, and the overlap lanes as [extra tid, original tid] pairs."""
    r = s.regions
    names = [_text(n) for n in s.names]
    pid = s.pid
    events: list[dict[str, Any]] = []
    overlap: list[list[int]] = []
    next_extra = OVERLAP_TID

    # lanes: (pid, tid) for every region's host and device span, with crossings split off
    host_tid = np.array([t.tid for t in s.threads] or [0], dtype=np.int64)[r["thread"]]
    has_dev = r["device"] >= 0
    dev_pid = DEVICE_PID + r["device"].astype(np.int64)
    dev_tid = 1 + r["stream"].astype(np.int64)

    def split(lane_ids: np.ndarray, base_tid: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, dict[tuple[int, int], int]]:
        nonlocal next_extra
        tid = base_tid.copy()
        extras: dict[tuple[int, int], int] = {}
        for lane in np.unique(lane_ids):
            rows = np.nonzero(lane_ids == lane)[0]
            sub = sublanes(start[rows], end[rows])
            for k in np.unique(sub[sub > 0]).tolist():
                orig = int(base_tid[rows[0]])
                extras[(orig, k)] = next_extra
                overlap.append([next_extra, orig])
                tid[rows[sub == k]] = next_extra
                next_extra += 1
        return tid, extras

    h_tid, h_extra = split(r["thread"], host_tid, r["host_start"], r["host_end"])
    dev_rows = np.nonzero(has_dev)[0]
    d_lane = r["stream"][dev_rows]
    d_tid_rows, d_extra = split(d_lane, dev_tid[dev_rows], r["dev_start"][dev_rows], r["dev_end"][dev_rows])
    d_tid = dev_tid.copy()
    d_tid[dev_rows] = d_tid_rows

    # M events: host first, then GPU 0, 1, ...; threads in order of first appearance
    for i, t in enumerate(s.threads):
        events += _lane_meta(pid, t.tid, "host", 0, _text(t.name), i * 100)
        for (orig, k), extra in h_extra.items():
            if orig == t.tid:
                suffix = " (overlap)" if k == 1 else f" (overlap {k})"
                events += _lane_meta(pid, extra, "host", 0, _text(t.name) + suffix, i * 100 + k)
    order = sorted(range(len(s.streams)), key=lambda j: (s.streams[j].label != "default stream", j))
    for rank, j in enumerate(order):
        st = s.streams[j]
        dpid = DEVICE_PID + st.device
        pname = f"GPU {st.device} · {s.devices[st.device].name}"
        events += _lane_meta(dpid, j + 1, pname, 1 + st.device, st.label, rank * 100)
        for (orig, k), extra in d_extra.items():
            if orig == j + 1:
                suffix = " (overlap)" if k == 1 else f" (overlap {k})"
                events += _lane_meta(dpid, extra, pname, 1 + st.device, st.label + suffix, rank * 100 + k)

    # X events and v2 flows (host span -> device span)
    h0, h1 = r["host_start"].tolist(), r["host_end"].tolist()
    d0, d1 = r["dev_start"].tolist(), r["dev_end"].tolist()
    name_ix, dev_l = r["name"].tolist(), has_dev.tolist()
    htid, dtid, dpid_l = h_tid.tolist(), d_tid.tolist(), dev_pid.tolist()
    for i in range(len(r)):
        args: dict[str, Any] = {}
        user = s.args.get(i)
        if user:
            args.update((_text(str(k)), _value(v)) for k, v in user.items())
        args["region"] = i
        args["host_dur_us"] = _us(h1[i] - h0[i])
        name = names[name_ix[i]]
        host = {"ph": "X", "cat": "region", "name": name, "pid": pid, "tid": htid[i], "ts": _us(h0[i]), "dur": _us(h1[i] - h0[i]), "args": args}
        events.append(host)
        if dev_l[i]:
            args["device_dur_us"] = _us(d1[i] - d0[i])
            args["launch_delay_us"] = _us(d0[i] - h0[i])
            host["bind_id"] = i + 1
            host["flow_out"] = True
            events.append(
                {"ph": "X", "cat": "device", "name": name, "pid": dpid_l[i], "tid": dtid[i], "ts": _us(d0[i]), "dur": _us(d1[i] - d0[i]), "bind_id": i + 1, "flow_in": True, "args": args}
            )
    return events, overlap


def dumps(s: Session) -> bytes:
    events, overlap = trace_events(s)
    meta = _flat(s.meta)
    meta.update(
        {
            "evtrace.format": FORMAT,
            "evtrace.pid": s.pid,
            "evtrace.wall_origin_ns": s.wall_origin_ns,
            "evtrace.overlap_lanes": overlap,
            "evtrace.streams": [[st.device, st.label] for st in s.streams],
            "evtrace.devices": [[d.index, d.name] for d in s.devices],
        }
    )
    doc = {"traceEvents": events, "displayTimeUnit": "ms", "baseTimeNanoseconds": s.wall_origin_ns, "metadata": meta}
    return orjson.dumps(doc, default=lambda o: _text(repr(o)))


def write(s: Session, path: Path) -> Path:
    """Write atomically (temp file, then rename). gzip when the name ends in ``.gz``."""
    data = dumps(s)
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=3, mtime=0)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_json(path: Path) -> Any:
    """The parsed JSON of a trace file (gzip detected by magic bytes). TraceError on failure."""
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


def read(path: Path) -> Session:
    """Rebuild a Session from a trace evtrace wrote."""
    doc = load_json(path)
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or meta.get("evtrace.format") != FORMAT or not isinstance(doc.get("traceEvents"), list):
        raise TraceError(f"{path} is not an evtrace trace (format {FORMAT})")
    try:
        return _rebuild(doc["traceEvents"], meta)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise TraceError(f"{path} is an evtrace trace with damaged events ({type(e).__name__}: {e})") from None


def _rebuild(events: list[Any], meta: dict[str, Any]) -> Session:
    pid = int(meta["evtrace.pid"])
    parent = {int(a): int(b) for a, b in meta.get("evtrace.overlap_lanes", [])}
    streams = [Stream(int(d), str(label)) for d, label in meta.get("evtrace.streams", [])]
    devices = [DeviceInfo(int(i), str(n)) for i, n in meta.get("evtrace.devices", [])]
    threads: list[Thread] = []
    thread_ix: dict[int, int] = {}
    hosts: dict[int, dict[str, Any]] = {}
    devs: dict[int, dict[str, Any]] = {}
    for ev in events:
        ph = ev.get("ph")
        if ph == "M" and ev.get("name") == "thread_name" and ev.get("pid") == pid and ev["tid"] not in parent:
            thread_ix[ev["tid"]] = len(threads)
            threads.append(Thread(int(ev["tid"]), str(ev["args"]["name"])))
        elif ph == "X" and ev.get("cat") == "region":
            hosts[int(ev["args"]["region"])] = ev
        elif ph == "X" and ev.get("cat") == "device":
            devs[int(ev["args"]["region"])] = ev
    n = len(hosts)
    if sorted(hosts) != list(range(n)):
        raise ValueError("region ids are not 0..n-1")
    regions = np.zeros(n, REGION_DTYPE)
    names: dict[str, int] = {}
    args: dict[int, dict[str, Any]] = {}
    ns = lambda us: int(round(float(us) * 1000))  # noqa: E731
    for i in range(n):
        h = hosts[i]
        row = regions[i]
        row["name"] = names.setdefault(h["name"], len(names))
        row["thread"] = thread_ix[parent.get(h["tid"], h["tid"])]
        row["host_start"] = ns(h["ts"])
        row["host_end"] = ns(h["ts"]) + ns(h["dur"])
        user = {k: v for k, v in h["args"].items() if k not in OWN_ARGS}
        if user:
            args[i] = user
        d = devs.get(i)
        if d is None:
            row["device"], row["stream"] = -1, -1
        else:
            tid = parent.get(d["tid"], d["tid"])
            row["stream"] = tid - 1
            row["device"] = streams[tid - 1].device
            row["dev_start"] = ns(d["ts"])
            row["dev_end"] = ns(d["ts"]) + ns(d["dur"])
    own = {"evtrace.format", "evtrace.pid", "evtrace.wall_origin_ns", "evtrace.overlap_lanes", "evtrace.streams", "evtrace.devices"}
    return Session(
        regions=regions,
        names=list(names),
        threads=threads,
        devices=devices,
        streams=streams,
        args=args,
        meta={k: v for k, v in meta.items() if k not in own},
        pid=pid,
        wall_origin_ns=int(meta.get("evtrace.wall_origin_ns", 0)),
    )
