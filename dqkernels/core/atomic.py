"""Atomic file output: write to a temporary file in the target directory, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise ValueError(f"output directory does not exist: {directory}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` through a temporary file beside ``path`` (the name is kept, no '.npy' added)."""
    with atomic_output(path) as handle:
        np.save(handle, array)


def write_json(path: str | os.PathLike, document: dict) -> None:
    """Write ``document`` as indented UTF-8 JSON through a temporary file beside ``path``."""
    with atomic_output(path) as handle:
        handle.write((json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Write UTF-8 text lines (each ending in a newline) through a temporary file beside ``path``."""
    with atomic_output(path) as handle:
        for line in lines:
            handle.write((line + "\n").encode("utf-8"))
