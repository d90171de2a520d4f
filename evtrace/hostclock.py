"""Each rank's host clock against rank 0's, measured through the job's own rendezvous store.

``evtrace merge`` needs every rank's times on one clock. Wall clocks (NTP) err by 0.1-10 ms,
and one boot id does not mean one monotonic clock (time namespaces: containers,
checkpoint/restore). So each rank measures its ``perf_counter`` against rank 0's, through the
store of the default process group the script made with ``torch.distributed``: no socket of
evtrace's own, and no collective, ``new_group`` or ``send``/``recv``, which would enter the
job's collective order (a rank that does not record would hang the others) or renumber its
groups.

The exchange (one at the start, one at the end: the drift comes from the two):

- rank 0 increments a counter key back to back (a *tick*), reading its clock before and after
  each increment: tick ``v`` happened at the store within ``[A_v, B_v]`` on rank 0's clock;
- every other rank reads the counter (``add(key, 0)``, atomic at the store) ``SAMPLES`` times
  back to back, reading its clock before and after each read (``t1``, ``t3``). A read that
  returns ``v`` happened after tick ``v`` and before tick ``v + 1``, so rank 0's clock minus
  this rank's lay within ``(A_v - t3, B_{v+1} - t1)`` at that read: a bracket, not a guess;
- rank 0 gathers the reads, and for each rank takes the middle of the intersection of its
  brackets (each widened by ``DRIFT_MAX_PPM`` for its distance from the burst's middle) as the
  offset, and half its width as the bound. It holds whatever the delays were, as long as the
  clocks' rates differ by less than that within a burst.

Rank 0's ticks serve every rank at once, so the ranks read in parallel; their bursts are
spread over ``world * SAMPLES / READ_RATE`` seconds so that the store is not swamped (the
docs/how-it-works.md has the budget at 1,024 ranks). Every wait is bounded (``TIMEOUT_S``): a rank that
never comes costs rank 0 at most that, a rank 0 that never comes costs a rank at most that,
and what could not be measured is said in the metadata (``RankClock.note``) and in one line.
"""

from __future__ import annotations

import array
import functools
import math
import random
import secrets
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import orjson

from . import private
from .metadata import CLOCK_PAIR, RANK_CLOCK, RankClock

Clock = Callable[[], int]

#: how long one rank waits for the others at an exchange, in s. At the start the ranks come
#: straight from ``init_process_group``'s rendezvous, ms apart; at the end a rank may still be
#: saving a checkpoint, and then the end is not measured (said so) rather than holding the
#: others longer. A module attribute: a script may change it before ``init_process_group``.
TIMEOUT_S = 10.0
#: reads of rank 0's counter each rank makes, back to back. On the 2-core CPU one read takes
#: 7 µs alone, so a burst lasts well under a ms and the clocks' drift inside it is negligible
SAMPLES = 32
#: where the brackets do not intersect (see ``estimate``), the fastest this fraction of them
#: make the estimate (the median of their midpoints): in a probe the single fastest bracket
#: erred by up to 17 µs, the median of the fastest 10 % by at most 6 µs (issue #25)
FASTEST = 0.1
#: the reads per second all ranks together aim at the store: half of what the 2-core CPU's
#: store served to 4 clients at once (49,550 ops/s; one client alone: 63,689), so the ticks
#: and the reads share it. Sets the window over which the ranks' bursts are spread
READ_RATE = 32_000
#: the largest rate difference assumed between two ranks' clocks within an exchange: the
#: kernel's limit on NTP's frequency correction (500 ppm, ``MAXFREQ``)
DRIFT_MAX_PPM = 500.0
#: rank 0 looks at how many ranks are done every this many ticks (one store read each)
CHECK_EVERY = 16
#: while every rank that came is done, rank 0 sleeps this long between looks (s)
IDLE_S = 0.001
#: rank 0 adds this to the counter when it stops: a later read knows it came too late
CLOSED = 1 << 40
PREFIX = "evtrace/clock"

_said: set[str] = set()
#: exchanges made in this process: the n-th exchange of every rank uses the same keys
_exchanges = 0


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        print(f"evtrace: {msg}", file=sys.stderr)


def _dist() -> Any:
    """``torch.distributed`` if the program imported it and it is usable, else None (never imported
    here: that costs seconds, and a program that did not import it has no process group)."""
    d = sys.modules.get("torch.distributed")
    try:
        return d if d is not None and d.is_available() else None
    except Exception:
        return None


def _default_store(dist: Any) -> Any:
    """The default process group's store, or None (said once) where this torch has no way to it."""
    c10d = sys.modules.get("torch.distributed.distributed_c10d")
    get = private.default_store(c10d)  # no public way to it: absent, nothing is measured, loudly
    if get is None:
        _say_once(
            f"torch.distributed.distributed_c10d.{private.DEFAULT_STORE} is missing in this torch: "
            "rank clock offsets are not measured; merge falls back to wall clocks"
        )
        return None
    return get()


def spread_s(world: int) -> float:
    """The window (s) over which the ranks' bursts are spread so that together they read the store
    at about READ_RATE."""
    return world * SAMPLES / READ_RATE


def _timeout(s: float) -> timedelta:
    return timedelta(seconds=max(s, 0.001))


# ---- one exchange -------------------------------------------------------------------------


class Result(dict[str, Any]):
    """One rank's side of one exchange: offset_ns, at_ns, bound_ns, samples, rtt_ns, token, note."""


def estimate(reads: np.ndarray, a: np.ndarray, b: np.ndarray, base: int) -> Result | None:
    """The offset (rank 0's clock minus the rank's) from its reads ``(value, t1, t3)`` and rank 0's
    tick stamps (tick ``base + k + 1`` within ``[a[k], b[k]]``); None without a usable read.

    Every bracket holds the truth, so their intersection does: its middle is the estimate and
    half its width the bound. The median of the fastest brackets' midpoints (``FASTEST``) erred
    more: on the 2-core CPU under load, over 15 exchanges of 4 ranks, 7.1 µs at p50 where the
    intersection's middle erred 2.5 µs (and its bound was 31 µs against 42). It is kept for brackets
    that do not intersect, which only a clock rate off by more than DRIFT_MAX_PPM makes."""
    if not len(reads):
        return None
    k = reads[:, 0] - base - 1
    ok = (k >= 0) & (k < len(a) - 1)
    k, t1, t3 = k[ok], reads[ok, 1].astype(np.float64), reads[ok, 2].astype(np.float64)
    if not len(k):
        return None
    at = (t1 + t3) / 2
    ref = float(np.median(at))
    slack = DRIFT_MAX_PPM * 1e-6 * np.abs(at - ref)  # the offset at ``ref`` may differ by this
    lo = a[k].astype(np.float64) - t3 - slack
    hi = b[k + 1].astype(np.float64) - t1 + slack
    low, high = float(lo.max()), float(hi.min())
    if low <= high:
        off, bound = (low + high) / 2, (high - low) / 2
    else:
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        keep = np.argsort(half, kind="stable")[: max(1, math.ceil(FASTEST * len(k)))]
        off = float(np.median(mid[keep]))
        bound = float(np.max(np.abs(off - mid[keep]) + half[keep]))
    return Result(
        offset_ns=round(off),
        at_ns=round(ref),
        bound_ns=math.ceil(bound),
        samples=int(len(k)),
        rtt_ns=int((t3 - t1).min()),
    )


def _keys(n: int, phase: str) -> str:
    return f"{PREFIX}/{n}/{phase}/"


def serve(
    store: Any, world: int, expect: list[int], clock: Clock, token: str, prefix: str
) -> tuple[dict[int, Result], list[int], float]:
    """Rank 0's side: tick until every rank of ``expect`` is done or TIMEOUT_S (and the window) have
    passed, then answer each. Returns the results by rank, the ranks that did not take part, and
    the fastest tick (ns)."""
    a, b = array.array("q"), array.array("q")
    store.set(prefix + "open", token)
    start = clock()
    deadline = start + int((TIMEOUT_S + spread_s(world)) * 1e9)
    base = -1
    i = 0
    while True:
        t = clock()
        v = store.add(prefix + "tick", 1)
        a.append(t)
        b.append(clock())
        if base < 0:
            base = v - 1
        i += 1
        if i % CHECK_EVERY:
            continue
        here, done = store.add(prefix + "here", 0), store.add(prefix + "done", 0)
        if done >= len(expect) or clock() > deadline:
            break
        while here <= done and done < len(expect) and clock() <= deadline:
            time.sleep(IDLE_S)  # every rank that came is done: wait for more without ticking
            here, done = store.add(prefix + "here", 0), store.add(prefix + "done", 0)
    t = clock()
    store.add(prefix + "tick", CLOSED)  # the last tick: a read before it lies before this stamp
    a.append(t)
    b.append(clock())
    ta, tb = np.frombuffer(a, np.int64), np.frombuffer(b, np.int64)
    results: dict[int, Result] = {}
    missing: list[int] = []
    for r in expect:
        key = prefix + f"reads/{r}"
        if not store.check([key]):
            missing.append(r)
            continue
        raw = store.get(key)
        reads = np.frombuffer(raw, np.int64).reshape(-1, 3) if raw else np.zeros((0, 3), np.int64)
        res = estimate(reads, ta, tb, base)
        if res is None:
            res = Result(samples=0, note="no read fell between two of rank 0's ticks")
        res["token"] = token
        results[r] = res
        store.set(prefix + f"result/{r}", orjson.dumps(res))
    return results, missing, float((tb - ta).min())


def join(store: Any, rank: int, world: int, clock: Clock, prefix: str) -> Result:
    """Another rank's side: read rank 0's ticks in one burst, hand the reads over, take the answer."""
    store.add(prefix + "here", 1)
    reads = array.array("q")
    gave_up = ""
    try:
        store.wait([prefix + "open"], _timeout(TIMEOUT_S))
    except Exception:  # the store's timeout error (its type differs across torch versions)
        gave_up = f"rank 0 did not start the exchange within {TIMEOUT_S:g} s"
    if not gave_up:
        time.sleep(2 * IDLE_S + random.uniform(0, spread_s(world)))  # rank 0 ticks again by then
        for _ in range(SAMPLES):
            t1 = clock()
            v = store.add(prefix + "tick", 0)
            t3 = clock()
            if v >= CLOSED:
                gave_up = "rank 0 had stopped waiting for this rank"
                break
            reads.extend((v, t1, t3))
    store.set(prefix + f"reads/{rank}", reads.tobytes())
    store.add(prefix + "done", 1)
    if gave_up and not reads:
        return Result(samples=0, note=gave_up)
    # rank 0 answers at most TIMEOUT_S and the window after it opened, which was before these reads
    left = TIMEOUT_S + spread_s(world) + 1.0
    key = prefix + f"result/{rank}"
    try:
        store.wait([key], _timeout(left))
    except Exception:
        return Result(samples=0, note=f"rank 0 gave no answer within {left:.3g} s")
    res = Result(orjson.loads(store.get(key)))
    for k in (f"reads/{rank}", f"result/{rank}"):
        store.delete_key(prefix + k)
    return res


def exchange(
    store: Any, rank: int, world: int, clock: Clock, phase: str, token: str, expect: list[int]
) -> Any:
    """One exchange of this process (its n-th: every rank's n-th uses the same keys)."""
    global _exchanges
    _exchanges += 1
    prefix = _keys(_exchanges, phase)
    if rank == 0:
        return serve(store, world, expect, clock, token, prefix)
    return join(store, rank, world, clock, prefix)


# ---- a session's measurements ------------------------------------------------------------


def clock_pair() -> list[int]:
    """[perf_counter ns, CLOCK_REALTIME ns] read together (the tightest of a few tries): two
    processes of one boot share perf_counter only if this difference agrees (time namespaces)."""
    best: tuple[int, int, int] | None = None
    for _ in range(5):
        w0 = time.time_ns()
        p = time.perf_counter_ns()
        w1 = time.time_ns()
        if best is None or w1 - w0 < best[0]:
            best = (w1 - w0, p, (w0 + w1) // 2)
    assert best is not None
    return [best[1], best[2]]


class RankClocks:
    """The clock offsets of one recording session: measured right after ``init_process_group``
    (at the start if it has run already) and before ``destroy_process_group`` (else at the
    session's stop). Its patches are undone at the stop."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sides: dict[str, Result] = {}  # "start" / "end" -> this rank's result
        self.notes: list[str] = []
        self.rank, self.world = 0, 1
        self.token = secrets.token_hex(8)  # rank 0's: names the job's measurements
        self.came: list[int] | None = None  # on rank 0: the ranks that took part at the start
        self.rtt_ns: float = 0.0
        self.longest_ns = 0
        self._patched: list[tuple[Any, str, Any]] = []
        self._meta: dict[str, Any] = {}
        self._started = False
        #: told the metadata once the start is measured (the journal keeps it for `evtrace recover`)
        self.on_start: Callable[[dict[str, Any]], None] | None = None

    def known(self) -> dict[str, Any]:
        """The metadata known so far: this process's clock pair, and the start's measurement."""
        if "start" in self.sides and self.world >= 2:
            return {**self._meta, RANK_CLOCK: self.record()}
        return dict(self._meta)

    def start(self) -> None:
        """Measure now if the process group exists, else right after ``init_process_group`` returns
        (patched until the stop). Why then: it is the rendezvous every rank passes, so the ranks
        come to the exchange together and nobody waits long; the store exists from then on; and
        nothing else of the job runs yet that the exchange could slow."""
        self._started = True
        if self.clock is time.perf_counter_ns:
            self._meta[CLOCK_PAIR] = clock_pair()
        dist = _dist()
        if dist is None:
            return
        if dist.is_initialized():
            self._measure("start")
        else:
            self._patch(dist, "init_process_group", self._after_init)
        self._patch(dist, "destroy_process_group", self._before_destroy)

    def _patch(self, dist: Any, name: str, make: Callable[[Any], Any]) -> None:
        c10d = sys.modules.get("torch.distributed.distributed_c10d")
        for mod in (dist, c10d):
            old = getattr(mod, name, None)
            if old is not None:
                new = make(old)
                setattr(mod, name, new)
                self._patched.append((mod, name, (old, new)))

    def _after_init(self, init: Any) -> Any:
        @functools.wraps(init)
        def init_then_measure(*a: Any, **k: Any) -> Any:
            out = init(*a, **k)
            if "start" not in self.sides:
                self._measure("start")
            return out

        return init_then_measure

    def _before_destroy(self, destroy: Any) -> Any:
        @functools.wraps(destroy)
        def measure_then_destroy(*a: Any, **k: Any) -> Any:
            group = a[0] if a else k.get("group")
            if group is None and "end" not in self.sides:
                self._measure("end")
            return destroy(*a, **k)

        return measure_then_destroy

    def _measure(self, phase: str) -> None:
        """One exchange; never raises, never waits past its timeouts."""
        dist = _dist()
        try:
            if dist is None or not dist.is_initialized():
                return
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if self.world < 2:
                return
            store = _default_store(dist)
            if store is None:
                self.notes.append(f"{phase}: no way to the process group's store in this torch")
                return
            expect = self.came if (phase == "end" and self.came is not None) else list(range(1, self.world))
            t0 = self.clock()
            got = exchange(store, self.rank, self.world, self.clock, phase, self.token, expect)
            self.longest_ns = max(self.longest_ns, self.clock() - t0)
        except Exception as e:  # a store that went away (its host rank exited), a torch change
            self.notes.append(f"{phase}: the exchange failed ({type(e).__name__}: {e})")
            return
        if self.rank == 0:
            results, missing, tick = got
            self.came = sorted(results)
            self.rtt_ns = tick
            self.sides[phase] = Result(offset_ns=0, at_ns=0, bound_ns=0, samples=len(results))
            if missing:
                self.notes.append(
                    f"{phase}: rank{'s' if len(missing) > 1 else ''} {_ranks(missing)} took no part "
                    f"within {TIMEOUT_S:g} s"
                )
        elif got.get("samples"):
            self.sides[phase] = got
            self.rtt_ns = min(self.rtt_ns or math.inf, float(got["rtt_ns"]))
        else:
            self.notes.append(f"{phase}: not measured: {got.get('note', 'no answer')}")
        if phase == "start" and phase in self.sides and self.on_start is not None:
            self.on_start({RANK_CLOCK: self.record()})

    def finish(self) -> dict[str, Any]:
        """Measure the end if nothing did yet, undo the patches; the metadata to add."""
        if self._started and "end" not in self.sides:
            self._measure("end")
        for mod, name, (old, new) in reversed(self._patched):
            if getattr(mod, name, None) is new:
                setattr(mod, name, old)
        self._patched = []
        if self.world < 2:
            return dict(self._meta)
        return {**self._meta, RANK_CLOCK: self.record()}

    def record(self) -> RankClock:
        s, e = self.sides.get("start"), self.sides.get("end")
        if self.rank == 0:
            method = "reference"
        else:
            method = "store" if (s or e) else "none"
        if "start" not in self.sides and not any(n.startswith("start") for n in self.notes):
            self.notes.insert(
                0, "start: not measured (the process group was made where evtrace could not see it)"
            )
        drift = 0.0
        if s and e and self.rank and e["at_ns"] != s["at_ns"]:
            drift = (e["offset_ns"] - s["offset_ns"]) / (e["at_ns"] - s["at_ns"]) * 1e6
        token = next((str(x.get("token", "")) for x in (s, e) if x), "") if self.rank else self.token
        note = "; ".join(self.notes)
        if note:
            _say_once(f"rank {self.rank} clock: {note}")
        return RankClock(
            method=method,
            reference=token,
            rank=self.rank,
            world_size=self.world,
            start_at_ns=int(s["at_ns"]) if s else 0,
            start_offset_ns=int(s["offset_ns"]) if s else 0,
            start_bound_us=round(s["bound_ns"] / 1e3, 3) if s else 0.0,
            start_samples=int(s["samples"]) if s else 0,
            end_at_ns=int(e["at_ns"]) if e else 0,
            end_offset_ns=int(e["offset_ns"]) if e else 0,
            end_bound_us=round(e["bound_ns"] / 1e3, 3) if e else 0.0,
            end_samples=int(e["samples"]) if e else 0,
            drift_ppm=round(drift, 3),
            rtt_us=round(self.rtt_ns / 1e3, 3),
            exchange_ms=round(self.longest_ns / 1e6, 3),
            note=note,
        )


def _ranks(rs: list[int]) -> str:
    return ", ".join(map(str, rs))
