"""The private names evtrace reads (evtrace.private): each one absent falls back to a public API or
fails with one clear line; and the core's C row checked against the recorder's dtype."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import evtrace
from evtrace import _core, instrumentation, private, recorder


def test_the_core_row_is_the_recorders_dtype_field_by_field() -> None:
    size, fields = _core.row_layout()
    dt = recorder.LIVE_DTYPE
    assert size == dt.itemsize
    assert [f[0] for f in fields] == list(dt.names or ())
    assert fields[2] == ("host_start", 8, 8, "i") and fields[-1] == ("dev_end", 38, 8, "f")


def test_a_field_moved_on_one_side_is_refused_though_the_size_matches() -> None:
    live = recorder.LIVE_DTYPE
    types = {n: live.fields[n][0] for n in live.names or ()} if live.fields else {}
    names = list(types)
    swapped = names[:2][::-1] + names[2:]  # name and thread: both int32, the size is the same
    dt = np.dtype([(n, types[n]) for n in swapped])
    assert dt.itemsize == live.itemsize  # what the check before this one compared
    with pytest.raises(ImportError, match="evtrace's core has rows"):
        recorder._check_row_layout(dt)
    floats = np.dtype([(n, np.float64 if n == "host_start" else types[n]) for n in names])
    with pytest.raises(ImportError):
        recorder._check_row_layout(floats)  # same offsets and sizes, another kind


def test_compiling_reads_torch_compilers_flag_where_it_is() -> None:
    assert private.COMPILING_FLAG in vars(torch.compiler)  # this torch has it: the fast path
    assert private.compiler_parts(torch) == {"compiler_globals": vars(torch.compiler)}


def test_compiling_falls_back_to_the_public_is_compiling() -> None:
    public = lambda: False  # noqa: E731
    fake = SimpleNamespace(compiler=SimpleNamespace(is_compiling=public))
    assert private.compiler_parts(fake) == {"is_compiling": public}


def test_a_torch_that_cannot_say_whether_it_compiles_is_refused_loudly() -> None:
    with pytest.raises(RuntimeError, match="cannot tell whether torch.compile is tracing"):
        private.compiler_parts(SimpleNamespace(__version__="9.9", compiler=SimpleNamespace()))


@pytest.fixture
def no_compiling_flag(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """torch.compiler without its private flag, its public is_compiling() saying what the test sets;
    the core bound to torch's own parts again afterwards."""
    says = [False]
    monkeypatch.delattr(torch.compiler, private.COMPILING_FLAG)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: says[0])
    yield says
    monkeypatch.undo()
    instrumentation.bind_torch()


def _forward_regions(tmp_path: Path) -> int:
    model = torch.nn.Linear(4, 4)
    with evtrace.instrument(model), evtrace.record(tmp_path / "t.json", device=False, quiet=True) as r:
        model(torch.randn(2, 4))
    s = r.session
    assert s is not None
    return int((s.regions["name"] == s.names.index("Linear")).sum()) if "Linear" in s.names else 0


def test_without_the_flag_an_instrumented_forward_asks_torch_in_public(
    no_compiling_flag: list[bool], tmp_path: Path
) -> None:
    assert _forward_regions(tmp_path) == 1
    no_compiling_flag[0] = True  # "tracing": the forward runs, as no region (it was always a region before)
    assert _forward_regions(tmp_path) == 0


def _torch_without(*names: str) -> Any:
    c = SimpleNamespace(
        **{n: getattr(torch._C, n) for n in dir(torch._C) if n not in names and not n.startswith("__")}
    )
    return SimpleNamespace(
        _C=c, cuda=SimpleNamespace(current_stream=_Stream, current_device=lambda: 3, Event=_Event)
    )


class _Stream:
    def __init__(self, d: int) -> None:
        self.cuda_stream = 0x1000 + d


class _Event:
    def record(self, stream: Any = None) -> None: ...


def test_cuda_getters_fall_back_to_torch_cuda() -> None:
    fake = _torch_without(private.RAW_STREAM, private.GET_DEVICE, private.EVENT_BASE)
    assert private.raw_stream(fake)(2) == 0x1002
    assert private.get_device(fake)() == 3
    assert private.event_record(fake) is _Event.record


def test_backward_passes_and_threads_without_torchs_private_getters() -> None:
    fake = _torch_without(private.GRAPH_TASK_ID, private.AUTOGRAD_NODE)
    assert private.graph_task_id(fake) is threading.get_ident
    assert private.in_autograd(fake) is False
    assert private.graph_task_id(torch) is getattr(torch._C, private.GRAPH_TASK_ID)


def test_process_group_parts_without_torchs_private_getters() -> None:
    assert private.default_store(SimpleNamespace()) is None
    assert private.group_sequence(SimpleNamespace()) is None

    def unsupported() -> int:
        raise RuntimeError("ProcessGroup custom does not yet support sequence numbers.")

    assert private.group_sequence(SimpleNamespace(_get_sequence_number_for_group=unsupported)) is None
    assert private.group_sequence(SimpleNamespace(_get_sequence_number_for_group=lambda: 7))() == 7  # type: ignore[misc]


def test_module_hooks_not_where_the_core_reads_them_stop_sharing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert private.global_hooks(torch) == tuple(
        getattr(torch.nn.modules.module, n) for n in private.GLOBAL_HOOKS
    )
    monkeypatch.delattr(torch.nn.modules.module, "_global_forward_hooks")
    assert private.global_hooks(torch) == (private.UNKNOWN_HOOKS,)
    assert private.UNKNOWN_HOOKS  # never empty: the core's sequential() then takes no child as plain


def test_backward_passes_end_without_torchs_queue_callback() -> None:
    assert private.queue_callback(SimpleNamespace(autograd=SimpleNamespace(Variable=object))) is None
    assert private.queue_callback(torch) is not None
