"""Signals around writing a trace: once writing has begun, it is finished.

A long export (seconds for millions of regions) is exactly when a user presses Ctrl-C or a
scheduler sends SIGTERM; stopping half way would lose everything recorded. So the first
SIGINT or SIGTERM is held until the file is written and then acts as it would have (the
process ends with 130 / 143, or a script's own handler runs). A second one aborts the write,
which removes its temp file, and the process ends by the first signal, saying so.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

#: the signals that end a process (a scheduler's SIGTERM, a closed terminal's SIGHUP): while
#: recording they raise Terminated, so the trace is written first, then end it as they would
ENDING = (signal.SIGTERM, signal.SIGHUP)
SIGNALS = (signal.SIGINT, *ENDING)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM or SIGHUP while recording, so the trace is written first."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: handlers that sessions ended on another thread could not put back (Python sets handlers
#: only from the main thread), by signal: the main thread puts them back at its next chance
_owed: dict[int, Any] = {}


def on_ending(signum: int, frame: Any) -> None:
    owed = _owed.pop(signum, None)
    if owed is not None:  # left installed, no session holds it: act as the handler it replaced
        signal.signal(signum, owed)
        signal.raise_signal(signum)
        return
    raise Terminated(signum)


def take_ending() -> dict[int, Any]:
    """On the main thread, ``on_ending`` for each ending signal still at its default action;
    returns the handlers it replaced (elsewhere, or where a program has its own: none)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, on_ending) for s in ENDING if signal.getsignal(s) == signal.SIG_DFL}


def signum_of(e: BaseException) -> int:
    """The signal a KeyboardInterrupt or Terminated stands for."""
    return e.signum if isinstance(e, Terminated) else signal.SIGINT


def put_back(signum: int, handler: Any) -> None:
    """``signal.signal(signum, handler)``, from any thread: off the main thread it is owed."""
    if threading.current_thread() is threading.main_thread():
        _owed.pop(signum, None)
        signal.signal(signum, handler)
    else:
        _owed[signum] = handler


def settle() -> None:
    """On the main thread: put back the handlers owed (see ``put_back``)."""
    for signum, handler in list(_owed.items()):
        put_back(signum, handler)


_held_for_fork = threading.local()


def _hold_before_fork() -> None:
    """SIGTERM is blocked in the forking thread across the fork, so that the child's first
    instant runs under the parent's mask: one sent to the child before it drops evtrace's handler
    waits for it (the child's pending signals start empty), instead of reaching that handler in
    the child's own fork hooks, or being dropped by Python once the handler is gone."""
    held = {s for s in ENDING if signal.getsignal(s) is on_ending}
    if held:
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
    _held_for_fork.on = held


def _release_in_parent() -> None:
    held = getattr(_held_for_fork, "on", None)
    if held:
        _held_for_fork.on = None
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _default_in_child() -> None:
    """A forked child (a DataLoader or Pool worker) records nothing, so SIGTERM there acts as it
    would without evtrace: the process ends at once. Raised as an exception instead, it unwinds the
    worker wherever it is, between taking a queue's lock and releasing it too, and the pool's
    other workers wait on that lock for ever."""
    for s in ENDING:
        if signal.getsignal(s) is on_ending:
            signal.signal(s, signal.SIG_DFL)
    _release_in_parent()  # a SIGTERM that came meanwhile ends the child now


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_hold_before_fork, after_in_parent=_release_in_parent, after_in_child=_default_in_child
    )


def die_by(signum: int) -> None:
    """End the process as ``signum`` would (exit status 128 + signum from a shell), quietly:
    no traceback, no atexit work. Python itself ends so after an uncaught KeyboardInterrupt."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)
    signal.pthread_kill(threading.get_ident(), signum)
    os._exit(128 + signum)  # not reached unless the signal cannot end us


class Finishing:
    """``with Finishing(path) as f: ...write...; f.written = True``.

    Holds SIGINT/SIGTERM inside the block (main thread only: Python runs handlers nowhere else).
    After the block, a held signal is raised again with the previous handlers back in place. A
    second signal raises KeyboardInterrupt inside the block; when it leaves the block unwritten,
    one line says so and the process ends by the first signal.
    """

    def __init__(self, what: object) -> None:
        self.what = what
        self.written = False
        #: the session's journal, named if the write is aborted
        self.journal: Path | None = None
        self.got: list[int] = []
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Finishing:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                if (
                    signal.getsignal(s) != signal.SIG_IGN
                ):  # an ignored signal stays ignored (nohup, a background job)
                    self._old[s] = signal.signal(s, self._on_signal)
        return self

    def restore(self, signum: int, handler: Any) -> None:
        """Put ``handler`` back for ``signum`` after the block, instead of the one found on entry."""
        if signum in self._old:
            self._old[signum] = handler
        else:
            put_back(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.got.append(signum)
        name = signal.Signals(signum).name
        if len(self.got) == 1:
            print(
                f"evtrace: {name}: finishing {self.what} first (again to abort)", file=sys.stderr, flush=True
            )
        elif len(self.got) == 2:
            raise KeyboardInterrupt  # the writer removes its temp file on the way out

    def __exit__(self, typ: object, exc: object, tb: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, signal.SIG_DFL if old is None else old)
        self._old.clear()
        if not self.got:
            return
        if len(self.got) > 1 and not self.written:
            kept = ""
            if self.journal is not None:
                from .journal import recover_hint

                kept = f"; the recording is kept in {self.journal}: {recover_hint(self.journal)}"
            print(
                f"evtrace: {signal.Signals(self.got[-1]).name}: stopped; {self.what} was not written{kept}",
                file=sys.stderr,
                flush=True,
            )
            die_by(self.got[0])
        signal.raise_signal(self.got[0])  # as if it came now: its handler (or the default) acts
