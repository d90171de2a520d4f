"""Children the tests send SIGINT to start with SIGINT at its default.

A pytest run with SIGINT ignored (a background job of a non-interactive shell, nohup) passes the
ignored SIGINT to its children, and evtrace leaves an ignored signal ignored; ``restore_signals``
resets SIGPIPE, SIGXFZ and SIGXFSZ only. So such children are started with
``preexec_fn=sigint_default``."""

from __future__ import annotations

import signal


def sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
