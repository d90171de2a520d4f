"""Children the tests send SIGINT to start with SIGINT at its default.

A pytest run with SIGINT ignored (a background job of a non-interactive shell, nohup) passes the
ignored SIGINT to its children, and evtrace leaves an ignored signal ignored; ``restore_signals``
resets SIGPIPE, SIGXFZ and SIGXFSZ only. So such children are started with
``preexec_fn=sigint_default``."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def started(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """A child that prints "ready" once it is where the test wants to signal it; waited for."""
    p = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_default,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def killed_after(p: subprocess.Popen[str], seconds: float) -> tuple[list[tuple[int, float]], float]:
    """Read a child's "started" line, then its "REGION_INDEX WALL_TIME" lines (a region finished)
    for ``seconds``, and SIGKILL it: the regions it said were done, and the wall time of the kill."""
    assert p.stdout is not None and p.stdout.readline() == "started\n"
    done: list[tuple[int, float]] = []
    t0 = time.time()
    while time.time() - t0 < seconds:
        i, t = p.stdout.readline().split()
        done.append((int(i), float(t)))
    p.kill()
    killed = time.time()
    p.communicate()
    return done, killed
