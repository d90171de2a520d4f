"""A torch.profiler (Kineto) Chrome trace placed on an evtrace session's clock.

Owns recognising a Kineto trace (:func:`is_kineto`), fitting its clock to the session's
(:func:`attach`), and rewriting its events as lanes the strict checker and Perfetto accept:
its CPU ops and kernels go under pids from ``PROFILER_PID`` up (host, then GPU d at +100+d,
sorted beside evtrace's host and GPU d), crossing slices move to "(overlap)" lanes, and its
``ac2g`` launch→kernel arrows (v1 flows Perfetto loses) become v2 flows. The events are kept in
``Session.profiler``, so they round-trip through the trace file; the views skip them.

The fit: Kineto's ``baseTimeNanoseconds`` + ``ts`` is wall-clock time, and so is the session's
``wall_origin_ns``: that gives a first offset. Host side, a CPU op on an evtrace thread must not
cross an evtrace region there (it ran inside it or outside it); device side, a kernel launched
inside a region with a device span must lie inside that span. Each gives, per op or kernel, the
offsets that break or keep it; a sweep over them finds the offsets that break fewest (host) or
keep most (device), and the mid-point of that interval nearest the first offset is used. Drift
is fitted when the two halves of the run have disjoint intervals; else it is reported as 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..analysis import plural
from ..lanes import OVERLAP_TID, PROFILER_PID, lane_meta, overlap_suffix, sublanes
from ..metadata import json_value, text
from ..session import Session

__all__ = ["PROFILER_PID", "attach", "is_kineto", "relabel"]

KINETO_CATS = {"cpu_op", "kernel", "cuda_runtime", "cuda_driver", "user_annotation", "python_function"}
DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset", "gpu_user_annotation", "mtia_ccp_events"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}
SKIP_CATS = {"Trace"}  # the profiler's own whole-trace span: says nothing, fits nothing
PIDS_PER_TRACE = 1_000  # trace k: host pids PROFILER_PID + k*1000 + j, GPU d at + 100 + d
GPU_PID = 100
WINDOW_NS = 5_000_000  # how far the fit searches around the wall-clock offset
FLOW_BASE = 1 << 40  # flow ids above any evtrace region index
STREAM0_TID = 0x7E000000  # a stream whose id is 0 (or not a number): Perfetto folds tid 0 into the pid


def is_kineto(doc: Any) -> bool:
    """A torch.profiler Chrome trace: ``traceEvents`` with Kineto's categories, no evtrace metadata."""
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        return False
    meta = doc.get("metadata")
    if isinstance(meta, dict) and any(str(k).startswith("evtrace") for k in meta):
        return False
    if "schemaVersion" in doc and "deviceProperties" in doc:
        return True
    return any(isinstance(ev, dict) and ev.get("cat") in KINETO_CATS for ev in doc["traceEvents"][:10_000])


def _ns(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) > 1e16:
        return None
    return int(round(v * 1000))


def _best(
    pen: tuple[np.ndarray, np.ndarray], rew: tuple[np.ndarray, np.ndarray], prior: int
) -> tuple[int, int, int, int]:
    """The offset with the most reward intervals and fewest penalty intervals covering it
    (penalties first), within WINDOW_NS of ``prior``: (offset, lo, hi, score) where [lo, hi] is
    its best interval (nearest ``prior``) and the offset its mid-point, or ``prior`` clamped into it
    where one side is only the window's edge."""
    lo_w, hi_w = prior - WINDOW_NS, prior + WINDOW_NS
    pts = np.unique(np.r_[pen[0], pen[1], rew[0], rew[1], lo_w, hi_w])
    pts = pts[(pts >= lo_w) & (pts <= hi_w)]
    seg = pts[:-1]  # segment k is (pts[k], pts[k+1])

    def cover(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.sort(lo), seg, "right") - np.searchsorted(np.sort(hi), seg, "right")

    score = cover(*rew) - (len(rew[0]) + 1) * cover(*pen)
    best = score == score.max()
    # runs of best segments: [start, end) in segment indexes
    edge = np.diff(np.r_[0, best.astype(np.int8), 0])
    starts, ends = np.nonzero(edge == 1)[0], np.nonzero(edge == -1)[0]
    lo_c, hi_c = pts[starts], pts[ends]
    dist = np.where(prior < lo_c, lo_c - prior, np.where(prior > hi_c, prior - hi_c, 0))
    k = int(np.argmin(dist))
    lo, hi = int(lo_c[k]), int(hi_c[k])
    if lo > lo_w and hi < hi_w:
        off = (lo + hi) // 2
    else:
        off = min(max(prior, lo), hi)
    return off, lo, hi, int(score[starts[k]])


def _ranges(i0: np.ndarray, i1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each k, the indexes i0[k]..i1[k]-1: (which k, index), flattened."""
    cnt = np.maximum(i1 - i0, 0)
    which = np.repeat(np.arange(len(i0)), cnt)
    idx = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(i0, cnt)
    return which, idx


def _crossings(
    a: np.ndarray, b: np.ndarray, rs: np.ndarray, re: np.ndarray, prior: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets at which op [a, b) + offset crosses a region [rs, re): open intervals (lo, hi),
    with the op's start as the time of each."""
    los, his, ts = [], [], []
    o1 = np.argsort(rs, kind="stable")
    s1, e1 = rs[o1], re[o1]
    k, j = _ranges(
        np.searchsorted(s1, a + prior - WINDOW_NS, "left"),
        np.searchsorted(s1, b + prior + WINDOW_NS, "right"),
    )
    # the region starts inside the op and ends after it
    los.append(s1[j] - b[k])
    his.append(np.minimum(s1[j] - a[k], e1[j] - b[k]))
    ts.append(a[k])
    o2 = np.argsort(re, kind="stable")
    s2, e2 = rs[o2], re[o2]
    k, j = _ranges(
        np.searchsorted(e2, a + prior - WINDOW_NS, "left"),
        np.searchsorted(e2, b + prior + WINDOW_NS, "right"),
    )
    # the region starts before the op and ends inside it
    los.append(np.maximum(s2[j] - a[k], e2[j] - b[k]))
    his.append(e2[j] - a[k])
    ts.append(a[k])
    lo, hi, t = np.concatenate(los), np.concatenate(his), np.concatenate(ts)
    keep = lo < hi
    return lo[keep], hi[keep], t[keep]


_EMPTY = np.zeros(0, np.int64)
_Intervals = tuple[np.ndarray, np.ndarray, np.ndarray]  # lo, hi, the time each constraint is from


class _Fit:
    """offset(t) = offset + drift * (t - t0), in ns; with the interval the data allows."""

    def __init__(self, pen: _Intervals, rew: _Intervals, prior: int) -> None:
        self.offset, self.lo, self.hi, self.score = _best(pen[:2], rew[:2], prior)
        self.drift, self.t0 = 0.0, 0
        self.drift_note = "not resolved: the two halves of the run agree"
        times = np.r_[pen[2], rew[2]]
        if len(times) < 40:
            self.drift_note = "not resolved: too few constraints"
            return
        mid = int(np.median(times))
        halves = []
        for late in (False, True):
            p, r, t = ((x[2] >= mid) == late for x in (pen, rew, (times, times, times)))
            fit = _best((pen[0][p], pen[1][p]), (rew[0][r], rew[1][r]), self.offset)
            halves.append((fit, int(np.median(times[t]))))
        (f1, t1), (f2, t2) = halves
        lo_w, hi_w = self.offset - WINDOW_NS, self.offset + WINDOW_NS
        bounded = all(f[1] > lo_w and f[2] < hi_w for f, _t in halves)
        if bounded and (f1[2] < f2[1] or f2[2] < f1[1]) and t2 > t1:
            self.drift = (f2[0] - f1[0]) / (t2 - t1)
            self.offset, self.t0 = f1[0], t1
            self.drift_note = "fitted: the two halves of the run need different offsets"

    def at(self, t: np.ndarray) -> np.ndarray:
        return self.offset + np.round(self.drift * (t - self.t0)).astype(np.int64)


def attach(s: Session, doc: dict[str, Any], source: str) -> Session:
    """``s`` with the Kineto trace ``doc`` placed on its clock (``Session.profiler``) and the fit in
    ``meta["profiler"][str(k)]`` (k: the how-manieth profiler trace of ``s``)."""
    known = s.meta.get("profiler")
    k = len(known) if isinstance(known, dict) else 0
    base = doc.get("baseTimeNanoseconds")
    prior = (int(base) if isinstance(base, int) else 0) - s.wall_origin_ns
    tnames: dict[tuple[Any, Any], str] = {}
    evs: list[dict[str, Any]] = []
    starts: list[int] = []
    durs: list[int] = []
    dropped = 0
    for ev in doc["traceEvents"]:
        if not isinstance(ev, dict):
            dropped += 1
            continue
        ph = ev.get("ph")
        if ph == "M" and ev.get("name") == "thread_name" and isinstance(ev.get("args"), dict):
            tnames[(ev.get("pid"), ev.get("tid"))] = text(str(ev["args"].get("name", "")))
        if ph != "X" or ev.get("cat") in SKIP_CATS:
            dropped += ph not in ("M", "s", "f", "i")  # M, ac2g flows and instants: rebuilt or not wanted
            continue
        ts, dur = _ns(ev.get("ts")), _ns(ev.get("dur"))
        if ts is None or dur is None or dur < 0:
            dropped += 1
            continue
        evs.append(ev)
        starts.append(ts)
        durs.append(dur)
    start = np.array(starts, np.int64)
    end = start + np.array(durs, np.int64)
    dev = np.array([ev.get("cat") in DEVICE_CATS for ev in evs], bool)
    tid = np.array([t if isinstance(t := ev.get("tid"), int) else -1 for ev in evs], np.int64)

    # host: ops on evtrace's threads must not cross its regions there
    r = s.regions
    pen: list[list[np.ndarray]] = [[_EMPTY], [_EMPTY], [_EMPTY]]
    host_ops = 0
    thread_of = {t.tid: i for i, t in enumerate(s.threads)}
    for t_id, ti in thread_of.items():
        ops = ~dev & (tid == t_id)
        host_ops += int(ops.sum())
        rows = r["thread"] == ti
        if ops.any() and rows.any():
            for part, x in zip(
                pen, _crossings(start[ops], end[ops], r["host_start"][rows], r["host_end"][rows], prior)
            ):
                part.append(x)
    pens: _Intervals = (np.concatenate(pen[0]), np.concatenate(pen[1]), np.concatenate(pen[2]))
    host = _Fit(pens, (_EMPTY, _EMPTY, _EMPTY), prior)
    hstart = start + host.at(start)
    hend = end + host.at(start)
    inside = 0
    for t_id, ti in thread_of.items():
        ops = ~dev & (tid == t_id)
        rows = r[r["thread"] == ti]
        if ops.any() and len(rows):
            o = np.argsort(rows["host_start"])
            rs, re = rows["host_start"][o], np.maximum.accumulate(rows["host_end"][o])
            j = np.searchsorted(rs, hstart[ops], "right") - 1
            inside += int(((j >= 0) & (hend[ops] <= re[np.maximum(j, 0)])).sum())

    # device: a kernel launched inside a region with a device span must lie inside that span
    corr: dict[Any, int] = {}
    kernels: list[tuple[int, Any]] = []
    for i, ev in enumerate(evs):
        c = ev.get("args", {}).get("correlation") if isinstance(ev.get("args"), dict) else None
        if c is None:
            continue
        if dev[i]:
            kernels.append((i, c))
        elif ev.get("cat") in LAUNCH_CATS:
            corr.setdefault(c, i)
    spans: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for t_id, ti in thread_of.items():
        g = r[(r["thread"] == ti) & (r["device"] >= 0)]
        g = g[np.argsort(g["host_start"], kind="stable")]
        spans[t_id] = (g["host_start"], g["host_end"], g["dev_start"], g["dev_end"])
    rew: list[list[int]] = [[], [], []]
    for i, c in kernels:
        li = corr.get(c)
        if li is None or int(tid[li]) not in spans:
            continue
        hs, he, ds, de = spans[int(tid[li])]
        launch = int(hstart[li])
        last = int(np.searchsorted(hs, launch, "right")) - 1
        for j in range(last, max(last - 64, -1), -1):  # the innermost region containing the launch
            if hs[j] <= launch < he[j]:
                rew[0].append(int(ds[j] - start[i]))
                rew[1].append(int(de[j] - end[i]))
                rew[2].append(int(start[i]))
                break
    rews: _Intervals = (np.array(rew[0], np.int64), np.array(rew[1], np.int64), np.array(rew[2], np.int64))
    placed = len(rews[0])
    device = _Fit(
        (_EMPTY, _EMPTY, _EMPTY), rews, host.at(np.array([int(np.median(start))]))[0] if len(start) else prior
    )
    if placed:
        off = device.at(rews[2])
        k_in = int(((rews[0] <= off) & (off <= rews[1])).sum())
    else:
        device.offset, device.drift, k_in = host.offset, host.drift, 0
        device.t0 = host.t0
    ours = {p for p in (s.pid, *(r.pid for r in s.ranks)) if p}  # the traced processes, where known
    host_pids = [ev.get("pid") for ev, d in zip(evs, dev) if not d]
    new_start = np.where(dev, start + device.at(start), hstart)
    new_end = new_start + (end - start)
    events, fit_lanes = _lanes(evs, dev, new_start, new_end, tnames, k)
    fit = {
        "source": text(source),
        "method": "wall clock (baseTimeNanoseconds), refined by containment in evtrace's regions",
        "wall_offset_ns": prior,
        "host_offset_ns": host.offset,
        "host_correction_ns": host.offset - prior,  # what containment moved it from the wall clock's
        "host_interval_ns": [host.lo - host.offset, host.hi - host.offset],
        "host_drift_ppm": round(host.drift * 1e6, 3),
        "host_drift": host.drift_note,
        "host_ops": len(host_pids),
        # CPU ops of the traced processes; -1: the session does not know its pid
        "host_ops_in_traced_processes": sum(p in ours for p in host_pids) if ours else -1,
        "host_ops_on_evtrace_threads": host_ops,
        "host_ops_inside_regions": inside,
        "host_ops_crossing_regions": max(0, -host.score),
        "device_offset_ns": device.offset,
        "device_correction_ns": device.offset - prior,
        "device_interval_ns": [device.lo - device.offset, device.hi - device.offset] if placed else [],
        "device_drift_ppm": round(device.drift * 1e6, 3),
        "device_drift": device.drift_note if placed else "no kernels placed",
        "kernels": int(dev.sum()),
        "kernels_placed": placed,
        "kernels_inside": k_in,
        "kernels_inside_share": round(k_in / placed, 4) if placed else 0.0,
        "events_dropped": dropped,
        **fit_lanes,
    }
    meta = dict(s.meta)
    meta["profiler"] = {**(known if isinstance(known, dict) else {}), str(k): fit}
    return dataclasses.replace(s, profiler=[*s.profiler, *events], meta=meta)


def doubts(fit: dict[str, Any]) -> list[str]:
    """Why a profiler trace placed by :func:`attach` may not be of the traced run, in words."""
    if fit.get("host_ops") and fit.get("host_ops_in_traced_processes") == 0:
        return [
            f"none of {fit['source']}'s {plural(fit['host_ops'], 'CPU op')} ran in the traced "
            "process: is it a profile of another run?"
        ]
    outside = [
        what
        for what, inside, placed in (
            ("kernels", fit["kernels_inside"], fit["kernels_placed"]),
            ("CPU ops", fit["host_ops_inside_regions"], fit["host_ops_on_evtrace_threads"]),
        )
        if placed and inside < 0.5 * placed
    ]
    if outside:
        return [
            f"most of {fit['source']}'s {' and '.join(outside)} fall outside every evtrace region: "
            "is it a profile of another run?"
        ]
    return []


def _lanes(
    evs: list[dict[str, Any]],
    dev: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    tnames: dict[tuple[Any, Any], str],
    k: int,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The placed events as X events on lanes of their own, M events for every lane, v2 flows."""
    base = PROFILER_PID + k * PIDS_PER_TRACE
    before = end <= 0
    clipped = int(((start < 0) & ~before).sum())
    start = np.maximum(start, 0)
    host_pids: dict[Any, int] = {}
    lane_key: dict[tuple[Any, Any, bool], tuple[int, int]] = {}
    odd_tid = STREAM0_TID
    pid_of = np.zeros(len(evs), np.int64)
    tid_of = np.zeros(len(evs), np.int64)
    for i, ev in enumerate(evs):
        if before[i]:
            continue
        key = (ev.get("pid"), ev.get("tid"), bool(dev[i]))
        if key not in lane_key:
            p, t = key[0], key[1]
            if key[2]:
                pid = base + GPU_PID + (p if isinstance(p, int) and 0 <= p < GPU_PID else 0)
            else:
                pid = base + host_pids.setdefault(p, len(host_pids))
            if not (isinstance(t, int) and 0 < t < OVERLAP_TID):
                t, odd_tid = odd_tid, odd_tid + 1
            lane_key[key] = (pid, t)
        pid_of[i], tid_of[i] = lane_key[key]
    # crossing slices on a lane move to extra lanes, as evtrace's own do
    extra: dict[tuple[int, int, int], int] = {}
    keep = ~before
    lanes = {(p, t) for p, t in lane_key.values()}
    for p, t in lanes:
        rows = np.nonzero(keep & (pid_of == p) & (tid_of == t))[0]
        sub = sublanes(start[rows], end[rows])
        for n in np.unique(sub[sub > 0]).tolist():
            extra[(p, t, n)] = OVERLAP_TID + len(extra)
            tid_of[rows[sub == n]] = extra[(p, t, n)]
    names = {v: tnames.get((kk[0], kk[1]), "") for kk, v in lane_key.items()}
    out: list[dict[str, Any]] = []
    order = sorted(lanes)
    for n, (p, t) in enumerate(order):
        gpu = p - base >= GPU_PID
        pname = f"torch.profiler · GPU {p - base - GPU_PID}" if gpu else "torch.profiler · host"
        if not gpu and len(host_pids) > 1:
            pname += f" {p - base}"
        tname = names[(p, t)] or (f"stream {t}" if gpu else f"thread {t}")
        psort = 1 + p - base - GPU_PID if gpu else 0
        out += lane_meta(p, t, pname, psort, text(tname), n * 100)
        for (p2, t2, m), tid in extra.items():
            if (p2, t2) == (p, t):
                out += lane_meta(p, tid, pname, psort, text(tname + overlap_suffix(m)), n * 100 + m)
    # v2 flows from each launch to its first kernel, where the launch starts strictly first
    launch: dict[Any, int] = {}
    sink: dict[Any, int] = {}
    for i, ev in enumerate(evs):
        a = ev.get("args")
        c = a.get("correlation") if isinstance(a, dict) and keep[i] else None
        if c is None:
            continue
        if dev[i]:
            if c not in sink or start[i] < start[sink[c]]:
                sink[c] = i
        elif ev.get("cat") in LAUNCH_CATS:
            launch.setdefault(c, i)
    bind: dict[int, tuple[int, str]] = {}
    flows = 0
    for c, j in sink.items():
        i = launch.get(c, -1)
        if i >= 0 and start[i] < start[j]:
            fid = FLOW_BASE + (k << 32) + flows
            bind[i], bind[j] = (fid, "flow_out"), (fid, "flow_in")
            flows += 1
    for i, ev in enumerate(evs):
        if not keep[i]:
            continue
        a = ev.get("args")
        x: dict[str, Any] = {
            "ph": "X",
            "cat": text(str(ev.get("cat", ""))),
            "name": text(str(ev.get("name", ""))),
            "pid": int(pid_of[i]),
            "tid": int(tid_of[i]),
            "ts": int(start[i]) / 1000,
            "dur": int(end[i] - start[i]) / 1000,
        }
        if i in bind:
            x["bind_id"], x[bind[i][1]] = bind[i][0], True
        if isinstance(a, dict) and a:
            v = json_value({text(str(kk)): vv for kk, vv in a.items()})
            x["args"] = v if isinstance(v, dict) else {"args": v}
        out.append(x)
    return out, {
        "events_placed": int(keep.sum()),
        "events_before_origin": int(before.sum()),
        "events_clipped_at_origin": clipped,
        "overlap_lanes": len(extra),
        "flows": flows,
        "flows_dropped": len(sink) + len(launch) - 2 * flows,
    }


def relabel(events: Sequence[dict[str, Any]], shift_ns: int, index: dict[int, int]) -> list[dict[str, Any]]:
    """Profiler events of one merge input, ``shift_ns`` later, its profiler trace k renumbered
    ``index[k]`` (pids and flow ids stay unique in the output)."""
    out = []
    for ev in events:
        e = dict(ev)
        k, j = divmod(int(ev["pid"]) - PROFILER_PID, PIDS_PER_TRACE)
        e["pid"] = PROFILER_PID + index.get(k, k) * PIDS_PER_TRACE + j
        if "ts" in e:
            e["ts"] = (int(round(float(e["ts"]) * 1000)) + shift_ns) / 1000
        if "bind_id" in e:
            k, j = divmod(int(e["bind_id"]) - FLOW_BASE, 1 << 32)
            e["bind_id"] = FLOW_BASE + (index.get(k, k) << 32) + j
        out.append(e)
    return out
