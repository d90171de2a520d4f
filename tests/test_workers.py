"""DataLoader workers (fork and spawn) and multiprocessing with functions from the script's
__main__ keep working under `python -m evtrace`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import evtrace

SCRIPT = """
import multiprocessing as mp
import sys
import torch
from torch.utils.data import DataLoader, Dataset
import evtrace


class Squares(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        with evtrace.region("getitem"):  # in a worker: must not break anything
            return torch.tensor([i * i])


def double(x):
    return 2 * x


if __name__ == "__main__":
    ctx = sys.argv[1]
    with evtrace.region("load"):
        loader = DataLoader(Squares(), batch_size=2, num_workers=2, multiprocessing_context=ctx)
        got = sorted(int(b) for batch in loader for b in batch)
    with evtrace.region("pool"):
        with mp.get_context(ctx).Pool(2) as pool:
            doubled = pool.map(double, range(4))
    print(got, doubled)
"""


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_workers_under_evtrace(tmp_path: Path, ctx: str) -> None:
    (tmp_path / "loader.py").write_text(SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(
        [sys.executable, "-m", "evtrace", "-o", "w.json", "loader.py", ctx],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[0, 1, 4, 9, 16, 25, 36, 49] [0, 2, 4, 6]"
    s = evtrace.load(tmp_path / "w.json")
    assert set(s.names) == {"load", "pool", "data wait"}  # workers do not record into the parent's session
