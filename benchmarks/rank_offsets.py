"""#25: the rank clock exchange (``evtrace.hostclock``) at N ranks, each a process with its clock
moved by ``rank * 37 s``, on one TCPStore: how long it takes and how far off it is.

    python benchmarks/rank_offsets.py 16 5    # ranks, exchanges
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from datetime import timedelta
from typing import Any

from evtrace import hostclock

SHIFT = 37_000_000_000


def rank(r: int, world: int, reps: int, port: int, q: Any) -> None:
    import torch.distributed as dist

    store = dist.PrefixStore("default_pg", dist.TCPStore("127.0.0.1", port, timeout=timedelta(seconds=60)))
    clock = lambda: time.perf_counter_ns() + r * SHIFT  # noqa: E731
    out = []
    for n in range(reps):
        t = time.perf_counter()
        prefix = hostclock._keys(n + 1, "start")
        if r == 0:
            res = hostclock.serve(store, world, list(range(1, world)), clock, "bench", prefix)[0]
        else:
            res = hostclock.join(store, r, world, clock, prefix)
        out.append((res, time.perf_counter() - t))
    q.put((r, out))


def main() -> None:
    import torch.distributed as dist

    world, reps = int(sys.argv[1]), int(sys.argv[2])
    master = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    q: Any = mp.Queue()
    ps = [mp.Process(target=rank, args=(r, world, reps, master.port, q)) for r in range(world)]
    for p in ps:
        p.start()
    got = dict(q.get() for _ in ps)
    for p in ps:
        p.join()
    for n in range(reps):
        results, took0 = got[0][n]
        err = [abs(results[r]["offset_ns"] + r * SHIFT) / 1e3 for r in range(1, world)]
        bound = [results[r]["bound_ns"] / 1e3 for r in range(1, world)]
        slowest = max(got[r][n][1] for r in range(world))
        print(
            f"exchange {n}: {slowest * 1e3:.1f} ms on the slowest rank; error max {max(err):.1f} µs, "
            f"p50 {sorted(err)[len(err) // 2]:.1f}; bound max {max(bound):.1f} µs; "
            f"covered: {all(e <= b for e, b in zip(err, bound))}"
        )


if __name__ == "__main__":
    main()
