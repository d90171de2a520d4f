"""NCCL on one GPU (world size 1): a collective's region has its device span. On a card:

python -m pytest -q -m cuda tests/cuda/test_nccl.py
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import evtrace

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_nccl_available()), reason="needs torch.distributed with NCCL"
    ),
]


@pytest.fixture
def nccl_of_one(tmp_path: Path) -> Iterator[None]:
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_all_reduce_region_has_its_device_span(nccl_of_one: None, tmp_path: Path) -> None:
    x = torch.ones(16 << 20, device="cuda")  # 64 MiB: the collective takes device time
    dist.all_reduce(x)  # NCCL's communicator is made on first use: not in the recording
    torch.cuda.synchronize()
    with evtrace.record(tmp_path / "t.json.gz", hooks=True, quiet=True) as r:
        for _ in range(3):
            dist.all_reduce(x)
        work = dist.all_reduce(x, async_op=True)
        work.wait()
    assert torch.equal(x, torch.ones_like(x))  # a sum over one rank: unchanged
    s = r.session
    assert s is not None
    mine = s.regions[s.regions["name"] == s.names.index("dist.all_reduce")]
    assert len(mine) == 4 and (mine["device"] >= 0).all()  # each with a device span
    assert (mine["dev_start"] >= mine["host_start"]).all() and (mine["dev_end"] >= mine["dev_start"]).all()
    order = np.argsort(mine["host_start"])
    assert (np.diff(mine["dev_start"][order]) > 0).all()  # one stream: in call order
    args = [s.args[int(i)] for i in np.nonzero(s.regions["name"] == s.names.index("dist.all_reduce"))[0]]
    assert {a["bytes"] for a in args} == {64 << 20} and {a["dtype"] for a in args} == {"float32"}
    assert sorted(a["async_op"] for a in args) == [False, False, False, True]
