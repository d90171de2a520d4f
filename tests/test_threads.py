"""Threads through one region, one patched call or concurrent backward passes keep their own spans."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import evtrace
from evtrace.session import Session

MS = 1_000_000


def spans_ms(s: Session, name: str) -> dict[str, float]:
    """{thread name: span length in ms} of the regions called ``name``."""
    ix = s.names.index(name)
    rows = s.regions[s.regions["name"] == ix]
    return {s.threads[r["thread"]].name: (r["host_end"] - r["host_start"]) / MS for r in rows}


def crossing(run: Callable[[Callable[[], None]], None]) -> None:
    """Thread "a" enters first and leaves after ~20 ms; "b" enters after "a" and leaves ~60 ms
    after "a" does: two spans that overlap without nesting. ``run(body)`` runs ``body`` inside
    the shared region, patched call or backward pass under test."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def body() -> None:
        if threading.current_thread().name == "a":
            a_in.set()
            b_in.wait(5)
            time.sleep(0.02)
            a_out.set()
        else:
            b_in.set()
            a_out.wait(5)
            time.sleep(0.06)

    def thread_b() -> None:
        a_in.wait(5)
        run(body)

    threads = [
        threading.Thread(target=run, args=(body,), name="a"),
        threading.Thread(target=thread_b, name="b"),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def check(spans: dict[str, float]) -> None:
    assert 20 <= spans["a"] < 50, spans  # not ~80 (closed by b's exit)
    assert 60 <= spans["b"] < 90, spans  # not ~20 (closed by a's exit)


def test_two_threads_through_one_region_object(tmp_path: Path) -> None:
    shared = evtrace.region("shared")

    def run(body: Callable[[], None]) -> None:
        with shared:
            body()

    with evtrace.record(tmp_path / "t.json", device=False, quiet=True) as r:
        crossing(run)
    assert r.session is not None
    check(spans_ms(r.session, "shared"))


def test_two_threads_through_one_patched_call(tmp_path: Path) -> None:
    """The data-wait hook wraps DataLoader's iterator class: one patched __next__ for all."""

    class Waits(torch.utils.data.Dataset[int]):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> int:
            body()
            return i

    def body() -> None:
        pass

    def run(b: Callable[[], None]) -> None:
        nonlocal body
        body = b
        next(iter(torch.utils.data.DataLoader(Waits(), batch_size=None)))

    with evtrace.record(tmp_path / "t.json", device=False, quiet=True, hooks=True) as r:
        crossing(run)
    assert r.session is not None
    check(spans_ms(r.session, "data wait"))


class Slow(torch.autograd.Function):
    """Identity whose backward runs ``ctx.body``: the backward pass's length is under control."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, body: Callable[[], None]) -> torch.Tensor:
        ctx.body = body
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.body()
        return g, None


class First(nn.Module):
    """A first layer: its input carries no gradient, so its backward span ends with the pass."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor, body: Callable[[], None]) -> torch.Tensor:
        return Slow.apply(x * self.w, body)


def test_two_concurrent_backward_passes_end_their_own_spans(tmp_path: Path) -> None:
    model = First()

    def run(body: Callable[[], None]) -> None:
        model(torch.ones(3), body).sum().backward()

    with evtrace.record(tmp_path / "t.json", device=False, quiet=True), evtrace.instrument(model):
        crossing(run)
    s = evtrace.load(tmp_path / "t.json")
    check(spans_ms(s, "First (backward)"))
