"""Collectives across ranks: who made everyone wait.

The hooks (``autohooks``) record each ``torch.distributed`` call as a region named ``dist.<op>``
with its group and a per-group sequence number in its args. Here the calls of several ranks on
one clock (a merged trace's ``ranks``) are matched by (group, sequence number): one instance of a
collective is one call on each rank that took part. A blocking collective ends on every rank only
once the last rank has called it, so each instance gives:

- the arrival skew: the last rank's call minus the first's;
- the last arriver;
- the wait it caused: the sum, over the other ranks, of how much earlier each one called.

Point-to-point ops (send, recv, ...) have regions too, but no instance: they involve two ranks,
not the group. numpy only; no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from .analysis import aligned, fmt_ns, plural

__all__ = [
    "COLLECTIVES",
    "OPS",
    "POINT_TO_POINT",
    "PREFIX",
    "Stragglers",
    "stragglers",
    "stragglers_markdown",
    "stragglers_text",
]

#: region names are this prefix and the op's name: ``dist.all_reduce``
PREFIX = "dist."
#: the ops every member of a group calls (matched across ranks)
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "broadcast",
    "reduce",
    "barrier",
    "all_to_all",
    "all_to_all_single",
)
#: the ops between two ranks (recorded, never matched)
POINT_TO_POINT = ("send", "recv", "isend", "irecv", "batch_isend_irecv")
OPS = COLLECTIVES + POINT_TO_POINT
_MATCHED = frozenset(PREFIX + op for op in COLLECTIVES)


class Collective(NamedTuple):
    """One collective name's instances across ranks; times in ns."""

    name: str
    instances: int  # matched on two ranks or more
    skew_p50: float
    skew_p95: float
    straggler: str  # the rank whose late arrivals caused the most wait here
    straggler_last: int  # how many of the instances it arrived last at
    straggler_wait: int  # the wait it caused the others here, summed
    wait: int  # the wait every late arrival caused, summed


class Straggler(NamedTuple):
    """One rank's late arrivals over every collective."""

    rank: str
    last: int  # instances it arrived last at
    wait: int  # the wait it caused the others, ns summed


class Stragglers(NamedTuple):
    """The collectives of a run of several ranks, matched: per name, and per rank."""

    ranks: int  # ranks with at least one collective region
    instances: int
    collectives: list[Collective]
    stragglers: list[Straggler]  # by wait caused, most first


def _arrivals(s: Any) -> dict[tuple[str, str, int], int]:
    """(name, group, seq) -> host start of each collective call of one rank that has them."""
    names = s.names
    wanted = np.array([n in _MATCHED for n in names] or [False])
    r = s.regions
    out: dict[tuple[str, str, int], int] = {}
    for i in np.nonzero(wanted[r["name"]])[0].tolist() if len(r) else []:
        a = s.args.get(i)
        if not a or "seq" not in a or "group" not in a:
            continue
        out.setdefault((names[r["name"][i]], str(a["group"]), int(a["seq"])), int(r["host_start"][i]))
    return out


def stragglers(ranks: Sequence[Any], labels: Sequence[str]) -> Stragglers:
    """Match the collective calls of ``ranks`` (Sessions on one clock, e.g. a merged trace's
    ``ranks``, named by ``labels``) by group and sequence number, and say who arrived last."""
    calls = [_arrivals(s) for s in ranks]
    present = [i for i, c in enumerate(calls) if c]
    keys: dict[tuple[str, str, int], list[tuple[int, int]]] = {}
    for i in present:
        for k, t in calls[i].items():
            keys.setdefault(k, []).append((t, i))
    by_name: dict[str, list[list[tuple[int, int]]]] = {}
    for k, got in keys.items():
        if len(got) > 1:
            by_name.setdefault(k[0], []).append(got)
    last = np.zeros(len(ranks), np.int64)
    caused = np.zeros(len(ranks), np.int64)
    rows = []
    for name, insts in by_name.items():
        skew = np.empty(len(insts))
        n_last = np.zeros(len(ranks), np.int64)
        w = np.zeros(len(ranks), np.int64)
        for j, got in enumerate(insts):
            at = np.array([a for a, _ in got])
            late = got[int(np.argmax(at))][1]
            skew[j] = at.max() - at.min()
            n_last[late] += 1
            w[late] += int((at.max() - at).sum())
        top = int(np.argmax(w)) if w.any() else int(np.argmax(n_last))
        rows.append(
            Collective(
                name,
                len(insts),
                float(np.percentile(skew, 50)),
                float(np.percentile(skew, 95)),
                labels[top],
                int(n_last[top]),
                int(w[top]),
                int(w.sum()),
            )
        )
        last += n_last
        caused += w
    rows.sort(key=lambda c: (-c.wait, c.name))
    order = sorted((i for i in range(len(ranks)) if last[i]), key=lambda i: (-caused[i], -last[i], i))
    who = [Straggler(labels[i], int(last[i]), int(caused[i])) for i in order]
    return Stragglers(len(present), sum(c.instances for c in rows), rows, who)


def _share(k: int, n: int) -> str:
    return f"{k} of {n} ({100 * k / n:.0f}%)" if n else "0"


#: the stragglers table shows this many ranks (a run of 1,000 ranks is one screen, not a page)
TOP_RANKS = 8


def stragglers_text(st: Stragglers) -> str | None:
    """The text tables (per collective, then per rank), or None where nothing was matched."""
    if not st.collectives:
        return None
    head = (
        f"collectives across {plural(st.ranks, 'rank')}, matched by group and sequence number\n"
        "(arrival: when a rank called it; wait caused: how much earlier the others had, summed)"
    )
    table = [["collective", "matched", "skew p50", "skew p95", "straggler", "last at", "wait caused"]]
    for c in st.collectives:
        table.append(
            [
                c.name,
                str(c.instances),
                fmt_ns(c.skew_p50),
                fmt_ns(c.skew_p95),
                c.straggler,
                _share(c.straggler_last, c.instances),
                fmt_ns(c.straggler_wait),
            ]
        )
    lines = [head, *aligned(table), "", "stragglers"]
    who = [["rank", "last arrivals", "wait caused"]]
    who += [[s.rank, _share(s.last, st.instances), fmt_ns(s.wait)] for s in st.stragglers[:TOP_RANKS]]
    lines += aligned(who)
    if len(st.stragglers) > TOP_RANKS:
        lines.append(f"({len(st.stragglers) - TOP_RANKS} more not shown)")
    return "\n".join(lines)


def stragglers_markdown(st: Stragglers, code: Any) -> list[str]:
    """The report's paragraph: who made everyone wait, in words (``code`` formats a name)."""
    if not st.collectives:
        return []
    out = []
    for c in st.collectives[:4]:
        out.append(
            f"- {code(c.name)}: {plural(c.instances, 'instance')} matched; arrival skew p50 "
            f"{fmt_ns(c.skew_p50)}, p95 {fmt_ns(c.skew_p95)}. {c.straggler.capitalize()} arrived last at "
            f"{_share(c.straggler_last, c.instances)} and made the other ranks wait "
            f"{fmt_ns(c.straggler_wait)} in all."
        )
    s = st.stragglers[0]
    said = (
        f"**Who made everyone wait:** {s.rank}, last at {_share(s.last, st.instances)} collectives, "
        f"costing the other ranks {fmt_ns(s.wait)} of waiting"
    )
    if len(st.stragglers) > 1:
        nxt = st.stragglers[1]
        said += f" (next: {nxt.rank}, {fmt_ns(nxt.wait)})"
    return [said + ".", "", *out, ""]  # the list apart: a line after it would continue its last item
