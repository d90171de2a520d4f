"""Reading traces back (#26): wall time and peak memory of `evtrace summary`, `diff` and `merge`
on 2M-region traces, each command a fresh process as a user runs it (``/usr/bin/time -v``),
median of ``--trials``.

    python benchmarks/read_speed.py [--trials 3] [--tree DIR ...] [--dir DIR] [--only CASES]

``--tree`` runs another checkout's evtrace (the before figures); given twice or more, the trees'
trials alternate, so that a shared machine's load weighs on each alike. The traces are made once in
``--dir`` with this tree: 2M host-only regions (two, for diff and merge), 2M device regions
from the simulated device, and (``summary_args``) 2M host-only regions each with a user arg; a
loop of ``step`` with ``forward`` inside, as a user records them.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.common import emit, machine  # noqa: E402

MAKE = """
import sys
sys.path.insert(0, {root!r})
import evtrace
from tests.simdevice import FakeClock, SimBackend
clk = FakeClock()
backend = SimBackend(clk) if {device!r} else None
with evtrace.record({path!r}, backend=backend, clock=clk, device={device!r}, quiet=True,
                    max_regions=4_000_000):
    for i in range({n} // 2):
        with evtrace.region("step", step=i) if {args!r} else evtrace.region("step"):
            with evtrace.region("forward", layer="x") if {args!r} else evtrace.region("forward"):
                if backend:
                    backend.launch(10_000)
"""


def make(path: str, n: int, device: bool, args: bool = False) -> None:
    if not os.path.exists(path):
        root = os.path.join(os.path.dirname(__file__), "..")
        code = MAKE.format(root=os.path.abspath(root), path=path, n=n, device=device, args=args)
        subprocess.run([sys.executable, "-c", code], check=True)


RANKS = """
import sys
sys.path.insert(0, {root!r})
import evtrace
from evtrace import metadata
one = evtrace.load({path!r})
for r in range({ranks}):  # one job's ranks: the same recording, each its own rank and process
    one.meta["rank"], one.meta["world_size"] = r, {ranks}
    one.meta.pop(metadata.RANK_CLOCK, None)
    one.pid = 1000 + r
    one.save({out!r}.format(r=r))
"""


def make_ranks(template: str, n: int, ranks: int) -> list[str]:
    """``ranks`` files of one job, ``n`` host-only regions each (#25's scale: 64 x 100k)."""
    out = os.path.join(os.path.dirname(template), "rank{r}_" + f"{n}.json.gz")
    paths = [out.format(r=r) for r in range(ranks)]
    if not all(os.path.exists(p) for p in paths):
        make(template, n, False)
        root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
        code = RANKS.format(root=root, path=template, ranks=ranks, out=out)
        subprocess.run([sys.executable, "-c", code], check=True)
    return paths


def timed(tree: str, args: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MB) and CPU seconds (user + system, all threads) of
    ``python -m evtrace ARGS`` run in ``tree``. The CPU time says more than the wall time on a
    machine that other work shares."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "evtrace", *args]
    p = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{args} failed:\n{p.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", p.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", p.stderr))
    assert wall and rss, p.stderr
    h, m, s = wall.groups()
    return int(h or 0) * 3600 + int(m) * 60 + float(s), int(rss.group(1)) / 1024, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--tree", action="append", help="a checkout to run (repeatable); default: this one")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--regions", type=int, default=2_000_000)
    ap.add_argument("--only", default="", help="comma-separated subset of the cases")
    ap.add_argument("--ranks", type=int, default=64, help="rank files for summary_ranks (of 100k regions)")
    a = ap.parse_args()
    n = a.regions
    only = [c for c in a.only.split(",") if c]
    host, host2, dev = (os.path.join(a.dir, f"read_{k}_{n}.json.gz") for k in ("host", "host2", "device"))
    cases: dict[str, list[str]] = {}
    if not only or "summary_args" in only:
        with_args = os.path.join(a.dir, f"read_args_{n}.json.gz")
        make(with_args, n, False, args=True)
        cases["summary_args"] = ["summary", with_args]
    if not only or set(only) - {"summary_ranks", "summary_args"}:
        make(host, n, False)
        make(host2, n, False)
        make(dev, n, True)
        out = os.path.join(a.dir, "read_merged.json.gz")
        cases |= {
            "summary_host": ["summary", host],
            "summary_device": ["summary", dev],
            "diff_host": ["diff", host, host2],
            "merge_host": ["merge", host, host2, "-o", out],
        }
    if not only or "summary_ranks" in only:
        ranks = make_ranks(os.path.join(a.dir, "read_rank_100000.json.gz"), 100_000, a.ranks)
        cases["summary_ranks"] = ["summary", *ranks]
    trees = [os.path.abspath(t) for t in a.tree or [os.path.join(os.path.dirname(__file__), "..")]]
    for name, args in cases.items():
        if only and name not in only:
            continue
        runs: dict[str, list[tuple[float, float, float]]] = {t: [] for t in trees}
        for _ in range(a.trials):
            for tree in trees:
                runs[tree].append(timed(tree, args))
        for tree, got in runs.items():
            walls, peaks, cpus = [r[0] for r in got], [r[1] for r in got], [r[2] for r in got]
            emit(
                f"read_{name}",
                {
                    "regions": n if name != "summary_ranks" else f"{a.ranks} x 100000",
                    "tree": tree,
                    "wall_s_median": statistics.median(walls),
                    "wall_s": walls,
                    "peak_mb_median": statistics.median(peaks),
                    "peak_mb": peaks,
                    "cpu_s_median": statistics.median(cpus),
                    "cpu_s": cpus,
                    "load_avg_1min": os.getloadavg()[0],
                    **machine(),
                },
            )


if __name__ == "__main__":
    main()
