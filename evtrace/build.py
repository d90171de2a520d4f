"""Session building: a stopped recorder's rows become a Session, device times on the host clock.

Runs once, at ``stop()``: sorts the rows, aligns each device's stamps through its anchors and
region marks (``evtrace.align``), clamps what the constraints forbid, and gathers the metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from . import align as _align
from .device import DeviceInfo
from .metadata import DeviceAlignment
from .session import REGION_DTYPE, Session, Stream, Thread


class Devices(Protocol):
    @property
    def devices(self) -> Sequence[DeviceInfo]: ...

    def stream_label(self, device: int, stream: int) -> str: ...


class Stopped(Protocol):
    """What building a Session reads of a stopped recording: a ``Recorder``, or a journal read
    back (``evtrace.journal``)."""

    origin_ns: int
    wall_origin_ns: int
    argv: list[str]
    pid: int
    unfinished: int
    dropped_regions: int

    @property
    def backend(self) -> Devices | None: ...
    @property
    def share_ns(self) -> int: ...
    def counts(self) -> dict[str, Any]: ...
    def finished(self) -> tuple[np.ndarray, dict[int, dict[str, Any]]]: ...
    def anchors(self, device: int) -> list[tuple[int, int, float]]: ...
    def streams(self) -> list[tuple[int, int]]: ...
    def threads(self) -> list[Thread]: ...
    def name_of(self, key: int) -> str: ...
    def environment(self, devices: list[DeviceInfo]) -> dict[str, Any]: ...


def session(rec: Stopped, end_ns: int) -> Session:
    """The Session of a stopped recorder (or of a journal read back, ``evtrace.journal``): its rows
    in the order they began, device times aligned to the host clock (``evtrace.align``), and what
    the recording counted."""
    counts = rec.counts()
    live, args = rec.finished()
    hs = live["host_start"]
    if len(hs) > 1 and not (hs[1:] >= hs[:-1]).all():  # rows come in the order regions ended
        order = np.argsort(hs, kind="stable")  # regions in the order they began
        live = live[order]
        new_index = np.empty_like(order)
        new_index[order] = np.arange(len(order))
        args = {int(new_index[i]): a for i, a in args.items()}
    o = rec.origin_ns
    regions = np.zeros(len(live), REGION_DTYPE)
    # global name keys -> 0..n-1, in key order (a table lookup: keys are small ints)
    used = np.zeros(int(live["name"].max()) + 1 if len(live) else 0, bool)
    used[live["name"]] = True
    keys = np.flatnonzero(used)
    regions["name"] = (np.cumsum(used) - 1)[live["name"]]
    for f in ("thread", "device", "stream"):
        regions[f] = live[f]
    regions["host_start"] = live["host_start"] - o
    regions["host_end"] = live["host_end"] - o
    devices = list(rec.backend.devices) if rec.backend else []
    align: dict[str, DeviceAlignment] = {}
    clamped = 0
    for d in range(len(devices)):
        rows = regions["device"] == d
        a = rec.anchors(d)
        if not a:
            continue
        lo, hi, ms = (np.array(c) for c in zip(*a))
        h0, h1 = live["host_start"][rows], live["host_end"][rows]
        stamps, first, where = _first_boundaries(live["dev_start"][rows], live["dev_end"][rows], h0, h1)
        # a prompt stamp sits the shortest anchor bracket (record call) after its boundary's host
        # time; the share window (when boundaries share a mark) must not move device times
        fit = _align.fit(lo, hi, ms, first, stamps)
        t0 = fit.to_host(live["dev_start"][rows]) - o
        t1 = fit.to_host(live["dev_end"][rows]) - o
        s0, s1 = np.rint(t0).astype(np.int64), np.rint(t1).astype(np.int64)
        # A device span never starts at or before its host launch. A start mark shared with
        # an earlier boundary may be stamped before this region began, as early as the
        # boundary that recorded it: moved to just after the launch. Only a stamp placed
        # before its own record call breaks the map's constraints, and is counted.
        made = first[where[: len(h0)]] - o
        early = s0 < np.rint(made)
        clamped_d = int(early.sum())
        poor = _align.poor_stretches(fit, live["dev_start"][rows], early, o)
        h0 = regions["host_start"][rows]
        s0 = np.where(s0 <= h0, h0 + 1, s0)
        s1 = np.maximum(s1, s0)
        regions["dev_start"][rows] = s0
        regions["dev_end"][rows] = s1
        clamped += clamped_d
        align[str(d)] = DeviceAlignment(
            anchors=fit.anchors,
            anchors_late=fit.anchors_late,
            stamps=fit.stamps,
            drift_ppm=round(fit.drift_ppm, 3),
            latency_us=round(fit.latency_ns / 1e3, 3),
            slack_us_p99=round(fit.slack_us[0], 3),
            slack_us_max=round(fit.slack_us[1], 3),
            stamp_delay_us_p50=round(fit.anchor_delay_us[0], 3),
            stamp_delay_us_p99=round(fit.anchor_delay_us[1], 3),
            stamp_delay_us_max=round(fit.anchor_delay_us[2], 3),
            clamped_spans=clamped_d,
            poor_windows=poor[0],
            poor_stretches=poor[1],
            worst_stretches=poor[2],
        )
    nodev = regions["device"] < 0
    b = rec.backend
    streams = [Stream(d, b.stream_label(d, s) if b else f"stream {s:#x}") for (d, s) in rec.streams()]
    meta: dict[str, Any] = rec.environment(devices)
    meta.update(
        argv=rec.argv,
        regions=int(len(regions)),
        device_spans=int((~nodev).sum()),
        dropped_device_spans=sum(n for why, n in counts["lost"].items() if why != "split_over_devices"),
        split_device_spans=counts["lost"].get("split_over_devices", 0),
        lost_device_spans=counts["lost"],
        clamped_device_spans=clamped,
        unfinished_regions=rec.unfinished,
        marks_skipped_in_graph_capture=counts["captured"],
        dropped_regions=rec.dropped_regions,
        share_window_ns=max(rec.share_ns, 0),
        alignment=align,
        duration_ns=end_ns - o,
        origin_perf_ns=o,
    )
    if counts["resolver_errors"]:
        meta["resolver_errors"] = counts["resolver_errors"]
    names = [rec.name_of(k) for k in keys.tolist()]
    return Session(
        regions=regions,
        names=names,
        threads=rec.threads(),
        devices=devices,
        streams=streams,
        args=args,
        meta=meta,
        pid=rec.pid,
        wall_origin_ns=rec.wall_origin_ns,
    )


def _first_boundaries(
    start_ms: np.ndarray, end_ms: np.ndarray, h0: np.ndarray, h1: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each distinct device stamp with the host time of the earliest boundary that has it: where
    its mark was recorded (boundaries that share a mark share its stamp). Also, for each of
    the starts then the ends, the index of its stamp."""
    both = np.concatenate([start_ms, end_ms])
    stamps, where = np.unique(both, return_inverse=True)
    first = np.full(len(stamps), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, where, np.concatenate([h0, h1]))
    return stamps, first, where.reshape(-1)
