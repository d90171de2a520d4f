"""An unmodified training script under `python -m evtrace`: forward, backward, optimizer,
data-wait and host-wait slices on the right lanes, and the same losses as without evtrace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import evtrace
from evtrace.files import read_json as load_json

from .checker import problems

TRAIN = """
import sys
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x):
        return x + self.mlp(self.attn(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def main():
    data = TensorDataset(torch.randn(64, 16), torch.randn(64, 1))
    loader = DataLoader(data, batch_size=16, num_workers=2)
    model = Net().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.MSELoss()
    for epoch in range(2):
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            print(f"{loss.item():.6f}")


if __name__ == "__main__":
    main()
"""


@pytest.fixture
def script(tmp_path: Path) -> Path:
    p = tmp_path / "train.py"
    p.write_text(TRAIN)
    return p


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": os.environ.get("EVTRACE_TEST_CUDA", ""),
        "PYTHONPATH": str(Path(evtrace.__file__).parents[1]),  # this checkout's evtrace, not an installed one
    }
    return subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_training_step_is_traced_without_changing_it(tmp_path: Path, script: Path) -> None:
    plain = run(tmp_path, "train.py")
    traced = run(tmp_path, "-m", "evtrace", "-o", "t.json.gz", "train.py")
    assert plain.returncode == 0 and traced.returncode == 0, traced.stderr
    assert traced.stdout == plain.stdout and len(plain.stdout.split()) == 8  # the same losses
    doc = load_json(tmp_path / "t.json.gz")
    assert problems(doc) == []
    s = evtrace.load(tmp_path / "t.json.gz")
    names = set(s.names)
    # forward spans by module path, down to the default depth 2; the loss module is a root too
    # (a ModuleList is never called)
    assert {"Net", "Net.layers.0", "Net.layers.1", "Net.head", "MSELoss"} <= names
    assert "Net.layers.0.attn" not in names  # depth 3
    assert {"backward", "optimizer.step (AdamW)", "optimizer.zero_grad", "data wait"} <= names
    waits = [n for n in names if n.startswith("wait ")]
    on_gpu = bool(s.devices)
    line = TRAIN.splitlines().index('            print(f"{loss.item():.6f}")') + 1
    assert waits == (
        [f"wait .item() train.py:{line}"] if on_gpu else []
    )  # .item() of a CPU tensor waits for nothing
    count = {n: int((s.regions["name"] == s.names.index(n)).sum()) for n in names}
    assert count["optimizer.step (AdamW)"] == count["backward"] == count["Net"] == 8
    assert count["data wait"] >= 8
    # each traced module's backward, as a span of its own on the thread autograd ran it on
    module_bw = [f"{n} (backward)" for n in ("Net", "Net.layers.0", "Net.layers.1", "Net.head")]
    assert all(count[n] == 8 for n in module_bw) and "Net.layers.0.attn (backward)" not in names
    r = s.regions
    rows = {n: r[r["name"] == s.names.index(n)] for n in ["backward", *module_bw]}
    lanes = {s.threads[i].name for n in module_bw for i in rows[n]["thread"]}
    assert (
        lanes == ({"MainThread"} if not on_gpu else {n for n in lanes if n.startswith("autograd thread")})
        and len(lanes) == 1
    )
    for step in range(8):  # inside the step's backward, innermost last to begin, in reverse layer order
        b, net, l0, l1, head = (rows[n][step] for n in ["backward", *module_bw])
        assert (
            b["host_start"] <= net["host_start"] <= head["host_start"] < l1["host_start"] < l0["host_start"]
        )
        assert head["host_end"] <= l1["host_start"] and l1["host_end"] <= l0["host_start"]
        assert l0["host_end"] <= net["host_end"] <= b["host_end"]
    if on_gpu:  # forward and backward execute on the device, on the default stream
        for n in ("Net", "backward", "optimizer.step (AdamW)", *module_bw):
            assert (rows.get(n, r[r["name"] == s.names.index(n)])["device"] == 0).all()


def test_depth_include_exclude_and_no_hooks(tmp_path: Path, script: Path) -> None:
    r = run(tmp_path, "-m", "evtrace", "--depth", "0", "-o", "d0.json", "train.py")
    assert r.returncode == 0, r.stderr
    assert {
        n
        for n in evtrace.load(tmp_path / "d0.json").names
        if not n.startswith(("wait", "data", "optimizer", "backward"))
    } == {"Net", "MSELoss", "Net (backward)", "MSELoss (backward)"}
    r = run(
        tmp_path,
        "-m",
        "evtrace",
        "--depth",
        "9",
        "--include",
        r"attn|^Net$",
        "--exclude",
        "layers.1",
        "-o",
        "inc.json",
        "train.py",
    )
    assert r.returncode == 0, r.stderr
    mods = {
        n
        for n in evtrace.load(tmp_path / "inc.json").names
        if not n.startswith(("wait", "data", "optimizer", "backward"))
    }
    assert mods == {"Net", "Net.layers.0.attn", "Net (backward)", "Net.layers.0.attn (backward)"}
    r = run(tmp_path, "-m", "evtrace", "--no-hooks", "-o", "none.json", "train.py")
    assert r.returncode == 0, r.stderr
    assert len(evtrace.load(tmp_path / "none.json")) == 0
    bad = run(tmp_path, "-m", "evtrace", "--include", "(", "-o", "x.json", "train.py")
    assert (
        bad.returncode == 2
        and "not a regular expression" in bad.stderr
        and len(bad.stderr.strip().splitlines()) == 1
    )


def test_hooks_are_removed_when_the_session_ends(tmp_path: Path) -> None:
    import torch

    def patched() -> tuple[object, ...]:  # what the hooks replace while a session records
        return (
            torch.nn.Module.__call__,
            torch.autograd.backward,
            torch.optim.Optimizer.zero_grad,
            torch.Tensor.item,
            torch.cuda.synchronize,
        )

    before = patched()
    model = torch.nn.Linear(2, 2)
    with evtrace.record(tmp_path / "h.json", device=False, quiet=True, hooks=True):
        model(torch.ones(1, 2)).sum().item()
        assert torch.nn.Module.__call__ is not before[0]
    assert patched() == before
    assert "forward" not in model.__dict__
