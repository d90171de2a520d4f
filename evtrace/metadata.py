"""A session's metadata in typed form, and its two spellings in a trace file.

Owns :class:`DeviceAlignment` (the fit of one device's clock onto the host's, numbers as numbers),
:class:`RankClock` (this rank's host clock against rank 0's, measured through the job's store), the
flat dotted keys Perfetto shows under Info & Stats (:func:`flat`), and the nested JSON form a
trace also carries so that loading gives back exactly what was recorded (:func:`to_json`,
:func:`from_json`).
Imports nothing of evtrace: the recorder, the alignment and the session all read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

#: the metadata key of the per-device alignments: ``meta[ALIGNMENT]["0"]`` is GPU 0's
ALIGNMENT = "alignment"
#: the metadata key of this rank's clock offset to rank 0 (``evtrace.hostclock``)
RANK_CLOCK = "rank_clock"
#: the metadata key of the clock pair read at the start: [perf_counter ns, CLOCK_REALTIME ns]
CLOCK_PAIR = "clock_pair"


@dataclass(frozen=True)
class DeviceAlignment:
    """How one device's stamps were placed on the host clock (see ``align.fit``)."""

    anchors: int  # anchor records used
    anchors_late: int  # of them, stamped later than the map allows
    stamps: int  # device stamps (anchors and region marks) that constrained the map
    drift_ppm: float  # device clock rate against the host's, parts per million
    latency_us: float  # the shortest record call seen: a prompt stamp sits this far after its call
    slack_us_p99: float  # how much earlier each second's stamps would let the lane sit: p99 ...
    slack_us_max: float  # ... and the largest
    stamp_delay_us_p50: float  # how late anchors were stamped, by their probes
    stamp_delay_us_p99: float
    stamp_delay_us_max: float
    clamped_spans: int  # device spans placed before their launch and moved after it
    # 1 s windows (of device time) whose slack is over 5 µs or with over 0.5 % of their spans
    # clamped (``align.poor_stretches``); traces written before these were kept read as none
    poor_windows: int = 0
    poor_stretches: int = 0  # runs of consecutive poor windows
    # the worst few of them, in time order: (start s, end s since the session's start, the largest
    # slack there in µs, % of its device spans clamped)
    worst_stretches: tuple[tuple[float, float, float, float], ...] = ()

    def __getitem__(self, key: str) -> Any:
        """``a["drift_ppm"]``: the field, as the metadata's nested dicts were read before."""
        key = _RENAMED.get(key, key)
        if key not in _FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    @classmethod
    def from_mapping(cls, m: dict[str, Any]) -> DeviceAlignment:
        """From a JSON object or flat strings: each field as its type (ints, floats, stretches).
        Fields a trace lacks are 0 (none); a field's former name is read as the field; keys this
        version does not know are ignored."""
        m = {_RENAMED.get(k, k): v for k, v in m.items()}
        return cls(**{f: read(m.get(f, 0)) for f, read in _FIELDS.items()})


@dataclass(frozen=True)
class RankClock:
    """This rank's host clock (perf_counter) against rank 0's, measured through the rendezvous
    store of the job's default process group (``evtrace.hostclock``). Rank 0's clock at local
    time ``t`` is ``t + offset(t)``: ``start_offset_ns`` at ``start_at_ns``, ``end_offset_ns`` at
    ``end_at_ns``, linear between them. A side that was not measured has 0 samples."""

    method: str  # "reference" (rank 0), "store" (measured) or "none" (nothing measured: see note)
    reference: str  # rank 0's token for the job: ranks with the same one were measured together
    rank: int
    world_size: int
    start_at_ns: int  # this rank's clock at the start measurement
    start_offset_ns: int  # rank 0's clock minus this rank's there
    start_bound_us: float  # the offset's true error is at most this (from the exchange's brackets)
    start_samples: int  # exchanges made (0: not measured)
    end_at_ns: int
    end_offset_ns: int
    end_bound_us: float
    end_samples: int
    drift_ppm: float  # from the two measurements (0 with fewer than two)
    rtt_us: float  # the fastest round trip through the store
    exchange_ms: float  # the longest exchange on this rank, waits for the others included
    note: str  # what could not be measured, in words; "" when both were

    def __getitem__(self, key: str) -> Any:
        if key not in _CLOCK_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    @classmethod
    def from_mapping(cls, m: dict[str, Any]) -> RankClock:
        """From a JSON object or flat strings; missing fields are empty."""
        return cls(**{f: read(m.get(f, "" if read is str else 0)) for f, read in _CLOCK_FIELDS.items()})


def _stretches(v: Any) -> tuple[tuple[float, float, float, float], ...]:
    """Stretches as a trace holds them: a list of 4-number lists (a JSON string in a flat form)."""
    if not v:
        return ()
    if isinstance(v, str):
        v = orjson.loads(v)
    return tuple((float(a), float(b), float(c), float(d)) for a, b, c, d in v)


def _reader(f: dataclasses.Field[Any]) -> Callable[[Any], Any]:
    if f.name == "worst_stretches":
        return _stretches
    return int if f.type in ("int", int) else float


_FIELDS: dict[str, Callable[[Any], Any]] = {f.name: _reader(f) for f in dataclasses.fields(DeviceAlignment)}
#: DeviceAlignment's fields under the names trace format 1 gave them
_RENAMED = {"bound_us_p99": "slack_us_p99", "bound_us_max": "slack_us_max"}
_CLOCK_FIELDS: dict[str, Callable[[Any], Any]] = {
    f.name: {"str": str, "int": int}.get(str(f.type), float) for f in dataclasses.fields(RankClock)
}


def text(s: str) -> str:
    """A string orjson can write: lone surrogates become '?'."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


def json_value(v: Any) -> Any:
    """A value that serialises: ``repr()`` for anything orjson refuses (huge ints, objects)."""
    try:
        orjson.dumps(v)
        return v
    except (TypeError, orjson.JSONEncodeError):
        return text(repr(v))


def _plain(v: Any) -> Any:
    """Typed values as JSON values: an DeviceAlignment as its fields, dicts and lists throughout."""
    if isinstance(v, (DeviceAlignment, RankClock)):
        return dataclasses.asdict(v)
    if isinstance(v, dict):
        return {text(str(k)): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return json_value(v)


def to_json(meta: dict[str, Any]) -> dict[str, Any]:
    """The nested metadata as JSON values; :func:`from_json` gives ``meta`` back."""
    out: dict[str, Any] = _plain(meta)
    return out


def from_json(obj: dict[str, Any]) -> dict[str, Any]:
    """The typed metadata from :func:`to_json`'s form: each alignment an :class:`DeviceAlignment`,
    the rank clock a :class:`RankClock`."""
    meta = dict(obj)
    if isinstance(meta.get(RANK_CLOCK), dict):
        meta[RANK_CLOCK] = RankClock.from_mapping(meta[RANK_CLOCK])
    al = meta.get(ALIGNMENT)
    if isinstance(al, dict):
        meta[ALIGNMENT] = {
            str(d): DeviceAlignment.from_mapping(g) for d, g in al.items() if isinstance(g, dict)
        }
    return meta


def flat(meta: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts (and alignments) as dotted keys, floats as ``%.6g`` strings: what Perfetto
    shows, as it would turn floats into such strings anyway."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if isinstance(v, (DeviceAlignment, RankClock)):
            v = dataclasses.asdict(v)
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{text(str(k))}."))
        elif isinstance(v, float):
            out[prefix + text(str(k))] = f"{v:.6g}"
        else:
            out[prefix + text(str(k))] = json_value(v)
    return out
