"""Where a trace goes: the default name, a rank's name, why a path cannot be written, and the
files claimed at the end (a default name exclusively, a rescue in the temp directory)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from . import formats

#: the names default_path() gave (absolute), with their stem: such a name is written
#: exclusively, never over an existing file (runs in the same second, or in two processes)
_defaults: dict[Path, str] = {}


def default_path() -> Path:
    """``evtrace-YYYYmmdd-HHMMSS.json.gz`` in the working directory, or with ``-1``, ``-2``...
    when that is taken (``-rank<R>`` last under torchrun). Checked again when it is written."""
    stem = time.strftime("evtrace-%Y%m%d-%H%M%S")
    n = 0
    while _numbered(stem, n).exists():
        n += 1
    path = _numbered(stem, n)
    _defaults[path.absolute()] = stem
    return path


def default_stem(path: Path) -> str | None:
    """The stem of ``path`` (absolute) if :func:`default_path` gave it, else None."""
    return _defaults.get(path)


def rank_path(path: Path) -> Path:
    """Under torchrun each rank writes its own file: ``name-rank3.json.gz``."""
    from .provenance import rank

    rw = rank()
    if rw is None:
        return path
    stem, suffix = formats.split_suffix(path.name)
    return path.with_name(f"{stem}-rank{rw[0]}{suffix}")


def output_problem(path: Path, trace: bool = True) -> str | None:
    """Why ``path`` cannot be written (a trace by default: a suffix of ``formats.TABLE``), or None."""
    if path.is_dir():
        return f"output path {path} is a directory"
    bad = formats.suffix_problem(path) if trace else None
    if bad:
        return f"output path {bad}"
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f"output directory {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK) or not _can_create_in(parent):
        return f"output directory {parent} is not writable"
    if path.exists() and not os.access(path, os.W_OK):
        return f"output file {path} is not writable"
    return None


def claim(stem: str, first: Path) -> Path:
    """Create the first free default name in ``first``'s directory, exclusively (O_EXCL: two processes
    never get the same one); the write then replaces this empty file."""
    directory, n = first.parent, 0
    while True:
        path = directory / _numbered(stem, n).name
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            n += 1


def rescue_path(target: Path) -> Path:
    """A new file in the temp directory for a trace that could not be written at ``target``."""
    stem, suffix = formats.split_suffix(target.name)
    directory, n = Path(tempfile.gettempdir()), 0
    while True:
        path = directory / f"{stem}-{os.getpid()}{f'-{n}' if n else ''}{suffix}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            n += 1


def _numbered(stem: str, n: int) -> Path:
    return rank_path(Path(f"{stem}-{n}.json.gz" if n else f"{stem}.json.gz"))


def _can_create_in(directory: Path) -> bool:
    """Really try (permissions alone miss read-only mounts, and root passes every access check)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False
