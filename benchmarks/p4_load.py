"""P4 under load (issue 14): device ends against a physical ground truth, phase by phase.

    python benchmarks/p4_load.py                      # 600 s: one session, phases of 3 s in turn
    python benchmarks/p4_load.py --seconds 60 --repeat 3

Phases: idle (truth samples only, 0.1-1 ms host gaps), copies (pinned H2D/D2H on a side stream),
matmul (compute-bound kernels on a side stream), polling (kernels polling pinned host memory),
gaps (the host sleeps 1-50 ms between samples). See benchmarks/truth.py for the truth itself.
``--seconds`` is each session's length; wall time is that plus ~5 s (imports, nvcc ~0.5 s, the
loads) and the session's stop and save (printed; 0.6 s after 30 s, ~1.2k regions/s). Under a
600 s command limit use ``--seconds 570``. Lines starting with RESULT are JSON; then a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import emit, machine  # noqa: E402
from truth import PHASES, RTT_OK_NS, Truth, loads, run  # noqa: E402


def table(results: list[dict[str, Any]]) -> str:
    def f(d: dict[str, float], k: str) -> str:
        return f"{d[k]:.2f}" if k in d else "-"

    lines = []
    for i, res in enumerate(results):
        m = res["meta"]
        lines.append(
            f"run {i + 1}: {res['seconds']:.0f} s, L = {res['L_us']:.2f} us,"
            f" clamped {m.get('clamped_device_spans')} / {m.get('device_spans')} device spans,"
            f" stop+save {res['stop_and_save_s']} s"
        )
        lines.append(
            f"  {'phase':8s} {'n':>7s} {'rtt<=8':>7s} {'rtt p50':>8s}"
            f" | {'err p50':>8s} {'p95':>7s} {'p99':>7s} {'max':>7s}"
            f" | {'|err-L| p50':>11s} {'p95':>7s} {'p99':>7s} {'max':>7s} {'neg':>4s}"
        )
        for ph, d in res["phases"].items():
            e, a = d["err_us"], d["abs_err_minus_L_us"]
            lines.append(
                f"  {ph:8s} {d['n']:7d} {d['n_short']:7d} {f(d['rtt_us'], 'p50'):>8s}"
                f" | {f(e, 'p50'):>8s} {f(e, 'p95'):>7s} {f(e, 'p99'):>7s} {f(e, 'max'):>7s} | "
                f"{f(a, 'p50'):>11s} {f(a, 'p95'):>7s} {f(a, 'p99'):>7s} {f(a, 'max'):>7s}"
                f" {d['n_err_negative']:4d}"
            )
        gpu = {ph: d["gpu_clock"] for ph, d in res["phases"].items() if "gpu_clock" in d}
        if gpu:  # independent of evtrace's alignment: the kernel's own GPU-clock stamps
            lines.append(
                f"  {'GPU clock':8s} {'seen-set p50':>12s}"
                f" | {'evtrace end - kernel end p5':>27s} {'p50':>6s} {'p95':>6s}"
                f" | {'next kernel - kernel end p50':>28s} {'p95':>6s}"
                f" | {'evtrace end - next kernel p50':>29s} {'p99':>6s} {'max':>6s}"
            )
            for ph, d in gpu.items():
                a, b, c, e = (
                    d[k]
                    for k in (
                        "seen_minus_set_us",
                        "evtrace_end_minus_kernel_end_us",
                        "next_start_minus_kernel_end_us",
                        "evtrace_end_minus_next_start_us",
                    )
                )
                lines.append(
                    f"  {ph:8s} {f(a, 'p50'):>12s}"
                    f" | {f(b, 'p5'):>27s} {f(b, 'p50'):>6s} {f(b, 'p95'):>6s}"
                    f" | {f(c, 'p50'):>28s} {f(c, 'p95'):>6s}"
                    f" | {f(e, 'p50'):>29s} {f(e, 'p99'):>6s} {f(e, 'max'):>6s}"
                )
        lines.append(f"  alignment: {m.get('alignment')}")
    lines.append(
        "(us; err = device end - host's flag set;"
        f" over samples with round trip <= {RTT_OK_NS / 1000:.0f} us;"
        " neg = device end before the set: impossible)"
    )
    lines.append(
        "(GPU clock: the kernel's own %globaltimer stamps, put on perf_counter by a line through"
        " the idle phase's samples; next kernel: a stamp kernel queued behind the end event)"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600.0, help="length of each session (default 600)")
    ap.add_argument("--phase", type=float, default=3.0, help="seconds per phase turn (default 3)")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated, from: " + ",".join(PHASES))
    ap.add_argument("--repeat", type=int, default=1, help="independent sessions back to back")
    a = ap.parse_args()
    phases = tuple(a.phases.split(","))
    assert set(phases) <= set(PHASES), phases
    t0 = time.perf_counter()
    truth = Truth()
    feeders = loads(truth.drv)
    print(
        f"setup {time.perf_counter() - t0:.1f} s"
        f" (compiled with {truth.drv.compiler} in {truth.drv.compile_s:.1f} s)",
        flush=True,
    )
    results = []
    for i in range(a.repeat):
        res = run(
            os.path.join(tempfile.gettempdir(), f"p4_load_{i}.json.gz"),
            a.seconds,
            phases,
            a.phase,
            truth,
            feeders,
            seed=i,
        )
        res["machine"] = machine()
        emit("P4_load", res)
        results.append(res)
    print(table(results))
    print(f"wall {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
