"""Atomic file writes: a temporary file in the same folder, fsynced, then renamed into place, so a
reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tdpo.errors import UsageError


def atomic_write(path: Path, write: Callable[[IO[Any]], None], binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then replace ``path`` with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(
            fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})
        ) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_output_folder(path: str | Path, field: str) -> None:
    """A folder a command may write into: an existing folder, or one it can create (no regular
    file on the way, its nearest existing parent writable). Writes nothing."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(field, str(path), "exists and is not a folder; give a folder")
    _check_creatable(path, field)


def check_output_file(path: str | Path, field: str) -> None:
    """A file a command may write: not a folder, and its folder exists or can be created."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(field, str(path), "is a folder; give a file name")
    _check_creatable(path.parent, field, shown=path)


def _check_creatable(folder: Path, field: str, shown: Path | None = None) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(
            field, str(shown or folder), f"{existing} is a file, not a folder; choose another path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(field, str(shown or folder), f"{existing} is not writable")
