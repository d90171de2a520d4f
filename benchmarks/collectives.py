"""The hooks' cost per collective call, on torch's "fake" backend (rank 0 of 4: an op that does
nothing, so the per-call figure is c10d's own Python and the hooks'; gloo's worker-thread handoff
varies from 15 to 130 µs a call on the 2-core CPU and buries a few µs): a 1-element all_reduce,
blocking and async + wait, without a session, and in a session with and without hooks. The fake
backend has no sequence counter, so this is evtrace's fallback; reading torch's counter (gloo's)
is timed apart. Variants alternate; µs per call.

python benchmarks/collectives.py [--calls 20000] [--trials 9]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import alternate, emit, machine, stat  # noqa: E402

import evtrace  # noqa: E402


def per_call(calls: int, op: Callable[[], None], hooks: bool | None) -> Callable[[], float]:
    """µs per call of ``op``: with no session (hooks None), or in one with or without hooks."""

    def run() -> float:
        with tempfile.TemporaryDirectory() as d:
            rec = (
                None
                if hooks is None
                else evtrace.record(f"{d}/t.json.gz", hooks=hooks, quiet=True, device=False)
            )
            if rec is not None:
                rec.__enter__()
            t = time.perf_counter_ns()
            for _ in range(calls):
                op()
            dt = time.perf_counter_ns() - t
            if rec is not None:
                rec.__exit__(None, None, None)
                assert rec.session is not None and len(rec.session) == (calls if hooks else 0)
        return dt / calls / 1e3

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--trials", type=int, default=9)
    ns = ap.parse_args()
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    x = torch.ones(1)

    def blocking() -> None:
        dist.all_reduce(x)

    def waited() -> None:
        w = dist.all_reduce(x, async_op=True)
        assert w is not None
        w.wait()

    for name, op in (("all_reduce", blocking), ("all_reduce async + wait", waited)):
        variants = {
            "no session": per_call(ns.calls, op, None),
            "session, no hooks": per_call(ns.calls, op, False),
            "session, hooks": per_call(ns.calls, op, True),
        }
        got = alternate(variants, ns.trials)
        emit(name, {"machine": machine(), "us_per_call": {k: stat(v) for k, v in got.items()}})
    dist.destroy_process_group()
    with tempfile.TemporaryDirectory() as d:  # torch's sequence counter, as the hooks read it
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        pg: Any = dist.group.WORLD

        def counter() -> float:
            t = time.perf_counter_ns()
            for _ in range(ns.calls):
                pg._get_sequence_number_for_group()
            return (time.perf_counter_ns() - t) / ns.calls / 1e3

        got = alternate({"gloo's sequence counter": counter}, ns.trials)
        emit("sequence counter", {"machine": machine(), "us_per_call": {k: stat(v) for k, v in got.items()}})
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
