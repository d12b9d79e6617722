"""Atomic file writes: a reader (or a resume after kill -9) sees the old file or the new one, never
half of one. One naming scheme for the temporaries, so they can be found and cleaned up."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "temporary_name", "leftover_temporaries"]


def temporary_name(path: Path) -> Path:
    """`.NAME.tmpPID` beside `path`: same folder (so os.replace is a rename), hidden, per process."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def leftover_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Temporaries an interrupted atomic write left in `folder` (any process's)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name and p.is_file())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; on success it is fsynced and moved onto `path`.

    On any exception the temporary is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
