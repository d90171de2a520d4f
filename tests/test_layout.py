"""The package's seams: no module reaches into another module's private names; the architecture
table in docs/how-it-works.md matches the tree."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "evtrace"
#: the native core (evtrace/_core/) is private to the modules that are its Python faces
NATIVE_FACES = {"recorder.py", "regions.py", "instrumentation.py", "journal.py"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_uses_another_modules_private_names() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = set()  # local names bound to evtrace modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("evtrace")):
                for a in node.names:
                    if _private(a.name) and not (a.name == "_core" and path.name in NATIVE_FACES):
                        where = "." * node.level + (node.module or "")
                        found.append(f"{path.name}: from {where} import {a.name}")
                    modules.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                modules.update(a.asname or a.name for a in node.names if a.name.startswith("evtrace"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
                and _private(node.attr)
            ):
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert found == []


def test_every_module_says_what_it_owns() -> None:
    paths = sorted(PACKAGE.rglob("*.py"))
    missing = [p.name for p in paths if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []


def test_the_architecture_table_names_every_file_of_the_package_and_no_other() -> None:
    """docs/how-it-works.md's table (the README links it) matches the tree: each source file of
    evtrace/ is named in it, by its path under evtrace/ or by its name in a row that names its
    folder (``export/``); and each file the table names exists."""
    doc = (PACKAGE.parent / "docs" / "how-it-works.md").read_text(encoding="utf-8")
    table = doc[doc.index("## Architecture") :]
    token = r"`([\w/.]+\.(?:py|pyi|c|h)|\w+/)`"
    rows = [set(re.findall(token, line)) for line in table.splitlines() if line.startswith("|")]
    files = [
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*")
        if p.suffix in (".py", ".pyi", ".c", ".h") and "__pycache__" not in p.parts
    ]

    def named(f: str) -> bool:
        folder, _, name = f.rpartition("/")
        return any(f in row or (name in row and (not folder or folder + "/" in row)) for row in rows)

    assert [f for f in files if not named(f)] == []
    mentioned = {n for row in rows for n in row if not n.endswith("/")}
    gone = {n for n in mentioned if not any(f == n or f.endswith("/" + n) for f in files)}
    assert gone == set()


def test_import_evtrace_loads_no_trace_writer() -> None:
    """The formats' writers and readers (tens of ms on a small CPU) load on the first save or load,
    not with ``import evtrace``."""
    code = "import sys, evtrace; print(sorted(m for m in sys.modules if m.startswith('evtrace.formats.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
