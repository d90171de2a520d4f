from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from evtrace.files import read_json as load_json

from .checker import problems


@pytest.fixture(autouse=True)
def _every_trace_is_strict(tmp_path: Path) -> Iterator[None]:
    """Every trace a test writes under its tmp_path must pass the strict checker."""
    yield
    for p in list(tmp_path.rglob("*.json")) + list(tmp_path.rglob("*.json.gz")):
        if p.name.startswith("bad") or p.stat().st_size == 0:
            continue
        assert problems(load_json(p)) == [], p
