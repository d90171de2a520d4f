from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from evtrace.files import read_json as load_json

from .checker import problems
from .perfetto import Query, importer


@pytest.fixture(autouse=True)
def _every_trace_is_strict(tmp_path: Path) -> Iterator[None]:
    """Every trace a test writes under its tmp_path must pass the strict checker."""
    yield
    for p in list(tmp_path.rglob("*.json")) + list(tmp_path.rglob("*.json.gz")):
        if p.name.startswith("bad") or p.stat().st_size == 0:
            continue
        assert problems(load_json(p)) == [], p


@pytest.fixture(scope="session")
def maybe_perfetto(tmp_path_factory: pytest.TempPathFactory) -> Query | None:
    """Perfetto's importer as a query runner (``tests/perfetto.py``); None where it is not present."""
    return importer(tmp_path_factory.mktemp("tp"))


@pytest.fixture
def perfetto(maybe_perfetto: Query | None) -> Query:
    """Perfetto's importer as a query runner; the test is skipped where it is not present."""
    if maybe_perfetto is None:
        pytest.skip("no trace_processor (or it cannot run here)")
    return maybe_perfetto
