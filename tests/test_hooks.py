"""Module instrumentation: spans per module path, and nothing about the model changes."""

from __future__ import annotations

import copy
import io
import pickle
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import evtrace
from evtrace.instrumentation import select
from evtrace.recorder import Recorder
from evtrace.session import Session

from .simdevice import FakeClock, SimBackend


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.attn(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.layers:
            x = b(x)
        return self.head(x)


def test_forward_spans_are_named_by_path_and_nest(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 8)
    with evtrace.instrument(net, depth=3) as ins:
        assert len(ins) == 1 + 1 + 2 + 2 * 2 + 1  # root, layers, 2 blocks, attn+mlp each, head
        with evtrace.record(tmp_path / "m.json", device=False, quiet=True) as r:
            net(x)
    s = r.session
    assert s is not None
    assert sorted(s.names) == sorted(
        [
            "Net",
            "Net.layers.0",
            "Net.layers.0.attn",
            "Net.layers.0.mlp",
            "Net.layers.1",
            "Net.layers.1.attn",
            "Net.layers.1.mlp",
            "Net.head",
        ]
    )
    reg = s.regions
    root = reg[reg["name"] == s.names.index("Net")][0]
    assert (reg["host_start"] >= root["host_start"]).all() and (reg["host_end"] <= root["host_end"]).all()


class Kernel(nn.Module):
    """Launches one simulated kernel of ``ns`` device time."""

    def __init__(self, sim: SimBackend, ns: int) -> None:
        super().__init__()
        self.sim, self.ns = sim, ns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sim.launch(self.ns)
        return x


def sequential_run(kernels_ns: list[int], hook_ns: int = 0) -> tuple[Session, int]:
    """One forward of nn.Sequential(Kernel, ...) on the simulated device, with boundaries shared
    only where evtrace is told they are adjacent (no host-time window): (session, marks)."""
    clk = FakeClock()
    sim = SimBackend(clk)
    seq = nn.Sequential(*(Kernel(sim, ns) for ns in kernels_ns))
    if hook_ns:  # a hook of the first child's that launches work after its forward
        seq[0].register_forward_hook(lambda m, a, o: sim.launch(hook_ns))
    rec = Recorder(sim, clk, background=False, share_ns=0)
    with evtrace.instrument(seq):
        rec.start()
        before = sim.records
        seq(torch.zeros(1))
        marks = sim.records - before
        return rec.stop(), marks


def device_spans(s: Session) -> dict[str, tuple[int, int]]:
    return {s.names[r["name"]]: (int(r["dev_start"]), int(r["dev_end"])) for r in s.regions}


def test_sequential_children_share_one_event_per_boundary() -> None:
    s, marks = sequential_run([10_000, 20_000, 30_000])
    assert marks == 4  # the container's start, then one per child's end (the last is the container's)
    span = device_spans(s)
    seq, c0, c1, c2 = (span[n] for n in ("Sequential", "Sequential.0", "Sequential.1", "Sequential.2"))
    assert c2[1] == seq[1]
    host0 = int(s.regions[s.regions["name"] == s.names.index("Sequential.0")]["host_start"][0])
    assert c0[0] == max(seq[0], host0 + 1)  # the device was idle: from its launch
    assert c1[0] == c0[1] and c2[0] == c1[1]
    for child, ns in (("Sequential.1", 20_000), ("Sequential.2", 30_000)):  # the device was busy: its kernel
        assert abs(span[child][1] - span[child][0] - ns) < 200
    assert s.meta["clamped_device_spans"] == 0


def test_a_child_with_hooks_does_not_share_its_end() -> None:
    """A forward hook may launch work after the child's span: the next child must not get it."""
    s, marks = sequential_run([10_000, 20_000], hook_ns=40_000)
    assert marks == 5  # the hooked child shares neither boundary; the second child's end is the container's
    span = device_spans(s)
    c0, c1 = span["Sequential.0"], span["Sequential.1"]
    assert c1[0] >= c0[1] + 40_000 - 200  # starts after the hook's kernel
    assert abs(c1[1] - c1[0] - 20_000) < 200


def test_shared_starts_stamped_before_their_launch_are_moved_not_counted() -> None:
    """On an idle device a child's start (the previous child's end) is stamped before the host
    enters the child: moved to just after the launch, and not reported as an alignment error."""
    s, _ = sequential_run([100, 100, 100])
    reg = s.regions
    assert (reg["dev_start"] > reg["host_start"]).all()
    assert s.meta["clamped_device_spans"] == 0


def test_include_exclude_and_depth() -> None:
    net = Net()
    names = lambda **k: [n for n, _ in select(net, **k)]  # noqa: E731
    assert names(depth=0) == ["Net"]
    assert names(depth=None, include=r"\.mlp\.\d$") == [
        "Net.layers.0.mlp.0",
        "Net.layers.0.mlp.1",
        "Net.layers.0.mlp.2",
        "Net.layers.1.mlp.0",
        "Net.layers.1.mlp.1",
        "Net.layers.1.mlp.2",
    ]
    assert "Net.head" not in names(exclude="head")
    assert names(depth=1, label="Net#2") == ["Net#2", "Net#2.layers", "Net#2.head"]


def test_outputs_grads_state_dict_and_pickle_are_unchanged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 8)
    ref = net(x)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]
    net.zero_grad()
    ref_keys = list(net.state_dict())
    ins = evtrace.instrument(net)
    with evtrace.record(tmp_path / "g.json", device=False, quiet=True):
        out = net(x)
        out.sum().backward()
    assert torch.equal(out, ref)
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), ref_grads))  # type: ignore[arg-type]
    assert list(net.state_dict()) == ref_keys
    buf = io.BytesIO()
    torch.save(net, buf)  # while instrumented
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert torch.equal(back(x), ref)
    assert all(
        isinstance(m.__dict__.get("forward", m.forward), types.MethodType) for m in back.modules()
    )  # plain
    assert torch.equal(pickle.loads(pickle.dumps(net))(x), ref)
    assert torch.equal(copy.deepcopy(net)(x), ref)
    ins.remove()
    assert all("forward" not in m.__dict__ for m in net.modules())


def test_instrument_refuses_what_is_not_a_module() -> None:
    with pytest.raises(TypeError, match="takes an nn.Module"):
        evtrace.instrument(lambda x: x)  # type: ignore[arg-type]


def test_backward_spans_per_module_nest_in_reverse_order(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), Block(), nn.Identity(), Block())
    x = torch.randn(4, 8)
    with evtrace.instrument(net), evtrace.record(tmp_path / "b.json", device=False, quiet=True) as r:
        for _ in range(2):
            net(x).sum().backward()
        with torch.no_grad():
            net(x)  # no graph: no backward spans
    s = r.session
    assert s is not None
    reg = s.regions
    bw = {n: reg[reg["name"] == s.names.index(n)] for n in s.names if n.endswith(" (backward)")}
    # every module that made a gradient, twice; the identity passes its input through: no span
    assert all(len(v) == 2 for v in bw.values())
    assert "Sequential.2 (backward)" not in bw and {
        "Sequential (backward)",
        "Sequential.0 (backward)",
        "Sequential.3.mlp.2 (backward)",
    } <= set(bw)
    for step in range(2):
        span = {n: (int(v[step]["host_start"]), int(v[step]["host_end"])) for n, v in bw.items()}
        root = span.pop("Sequential (backward)")
        assert all(root[0] <= a and b <= root[1] for a, b in span.values())
        first, b1, b3 = (span[f"Sequential.{i} (backward)"] for i in (0, 1, 3))
        assert b3[1] <= b1[0]  # the last block's backward runs first
        assert b1[1] <= first[0]  # the first layer's last
        for blk in ("1", "3"):  # a block holds its submodules' backward spans, mlp.2 first
            a, b = span[f"Sequential.{blk} (backward)"]
            inner = [span[f"Sequential.{blk}.{m} (backward)"] for m in ("mlp.2", "mlp.1", "mlp.0", "attn")]
            assert all(a <= i0 and i1 <= b for i0, i1 in inner)
            assert all(p[1] <= q[0] for p, q in zip(inner, inner[1:]))
    s.save(tmp_path / "b.json")  # the checker (conftest) verifies nesting on each lane


def test_backward_spans_can_be_left_out(tmp_path: Path) -> None:
    net = Block()
    with (
        evtrace.instrument(net, backward=False),
        evtrace.record(tmp_path / "n.json", device=False, quiet=True) as r,
    ):
        net(torch.randn(2, 8)).sum().backward()
    assert r.session is not None and not any(n.endswith("(backward)") for n in r.session.names)


def test_each_backward_pass_through_a_retained_graph_gets_its_spans(tmp_path: Path) -> None:
    net = Block()
    with evtrace.instrument(net), evtrace.record(tmp_path / "r.json", device=False, quiet=True) as r:
        loss = net(torch.randn(2, 8)).sum()
        loss.backward(retain_graph=True)
        loss.backward()
    s = r.session
    assert s is not None
    reg = s.regions
    for n in ("Block (backward)", "Block.attn (backward)", "Block.mlp (backward)"):
        spans = reg[reg["name"] == s.names.index(n)]
        assert len(spans) == 2 and spans["host_end"][0] <= spans["host_start"][1]


def test_nvtx_backward_spans_use_ranges_that_may_end_on_another_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NVTX push/pop is per thread; a backward span may end on another thread (the pass's end
    callback, a device thread), so it is a start/end range; forward spans stay push/pop."""
    import threading

    from evtrace import recorder

    calls: list[tuple[str, object]] = []
    ids = iter(range(100, 1000))

    def log(op: str, ret: object = None) -> object:
        def f(arg: object = None) -> object:
            calls.append((op, arg))
            return next(ids) if op == "start" else ret

        return f

    for op, name in (
        ("push", "range_push"),
        ("pop", "range_pop"),
        ("start", "range_start"),
        ("end", "range_end"),
    ):
        monkeypatch.setattr(torch.cuda.nvtx, name, log(op))
    model = nn.Linear(3, 3)
    rec = recorder.Recorder(None, background=False, nvtx=True)
    rec.start()
    try:
        with evtrace.instrument(model):
            out = model(torch.ones(3))
            t = threading.Thread(target=lambda: out.sum().backward())  # backward on another thread
            t.start()
            t.join()
    finally:
        rec.stop()
    assert ("push", "Linear") in calls and calls.count(("pop", None)) == 1
    (start,) = [c for c in calls if c[0] == "start"]
    assert start[1] == "Linear (backward)"
    assert calls.count(("end", 100)) == 1


def test_an_exception_in_a_forward_propagates_and_its_spans_close(tmp_path: Path) -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("boom")

    model = nn.Sequential(nn.Linear(2, 2), Boom(), nn.Linear(2, 2))
    with evtrace.instrument(model), evtrace.record(tmp_path / "e.json", device=False, quiet=True) as r:
        with pytest.raises(ValueError, match="^boom$"):
            model(torch.zeros(1, 2))
        model[0](torch.zeros(1, 2))  # the stack is clean: a later call is a span of its own
    s = r.session
    assert s is not None
    names = [s.names[k] for k in s.regions["name"]]
    assert sorted(names) == ["Sequential", "Sequential.0", "Sequential.0", "Sequential.1"]
    reg = s.regions
    outer = reg[names.index("Sequential")]
    boom = reg[names.index("Sequential.1")]
    assert outer["host_start"] <= boom["host_start"] <= boom["host_end"] <= outer["host_end"]
