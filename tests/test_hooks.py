"""Module instrumentation: spans per module path, and nothing about the model changes."""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import evtrace


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
    assert sorted(s.names) == sorted(["Net", "layers.0", "layers.0.attn", "layers.0.mlp", "layers.1", "layers.1.attn", "layers.1.mlp", "head"])
    reg = s.regions
    root = reg[reg["name"] == s.names.index("Net")][0]
    assert (reg["host_start"] >= root["host_start"]).all() and (reg["host_end"] <= root["host_end"]).all()


def test_include_exclude_and_depth() -> None:
    net = Net()
    names = lambda **k: [n for n, _ in evtrace.hooks.select(net, **k)]  # noqa: E731
    assert names(depth=0) == ["Net"]
    assert names(depth=None, include=r"\.mlp\.\d$") == ["layers.0.mlp.0", "layers.0.mlp.1", "layers.0.mlp.2", "layers.1.mlp.0", "layers.1.mlp.1", "layers.1.mlp.2"]
    assert "head" not in names(exclude="head")


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
    assert not any(isinstance(m.__dict__.get("forward"), evtrace.hooks._Forward) for m in back.modules())
    assert torch.equal(pickle.loads(pickle.dumps(net))(x), ref)
    assert torch.equal(copy.deepcopy(net)(x), ref)
    ins.remove()
    assert all("forward" not in m.__dict__ for m in net.modules())


def test_instrument_refuses_what_is_not_a_module() -> None:
    with pytest.raises(TypeError, match="takes an nn.Module"):
        evtrace.instrument(lambda x: x)  # type: ignore[arg-type]
