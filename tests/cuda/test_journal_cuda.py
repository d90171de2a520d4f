"""The journal on a card: SIGKILL after 6 s of 1 ms regions with kernels in them; `evtrace recover`
gives every region finished 1.2 s before the kill, with its device span, aligned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evtrace
from evtrace.files import read_json

from ..checker import problems
from ..children import killed_after

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, time, torch, evtrace
x = torch.randn(512, 512, device="cuda")
t0, i = time.time(), 0
print("started", flush=True)
while True:
    with evtrace.region("step", i=i):
        y = x @ x  # ~10 µs of device work
        time.sleep(0.001)
    if i % 20 == 0:
        print(i, time.time(), flush=True)
    i += 1
"""


def test_sigkill_with_a_device_recovers_aligned_device_spans(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "job.py").write_text(SCRIPT)
    p = subprocess.Popen(
        [sys.executable, "-m", "evtrace", "--no-hooks", "-o", "t.json.gz", "job.py"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    done, killed = killed_after(p, 6)
    folder = tmp_path / "t.json.gz.journal"
    journal_bytes = sum(f.stat().st_size for f in folder.iterdir())
    r = subprocess.run(
        [sys.executable, "-m", "evtrace", "recover", str(folder)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    s = evtrace.load(tmp_path / "t.json.gz")
    assert problems(read_json(tmp_path / "t.json.gz")) == []
    due = max(i for i, t in done if t <= killed - 1.2)
    index = {a["i"]: k for k, a in s.args.items() if "i" in a}
    assert set(range(due + 1)) <= set(index)
    rows = s.regions[[index[i] for i in range(due + 1)]]
    assert (rows["device"] == 0).all()  # every one resolved, with its device span
    assert (rows["dev_start"] > rows["host_start"]).all() and (rows["dev_end"] >= rows["dev_start"]).all()
    launch_to_start = (rows["dev_start"] - rows["host_start"]) / 1e3
    assert np.median(launch_to_start) < 200  # µs: a matmul starts soon after its launch
    al = s.meta["alignment"]["0"]
    assert al.anchors >= 10 and al.clamped_spans == 0
    print(f"journal {journal_bytes / len(s):.1f} B/region ({len(s)} regions); recover: {r.stderr.strip()}")
