"""What kind of input a path is: image folder, image array or instruction data."""

from __future__ import annotations

import os
from pathlib import Path

from dqkernels.core.errors import InputError

ARRAY_SUFFIXES = (".npy", ".npz")
TEXT_SUFFIXES = (".json", ".jsonl")


def input_kind(input_path: str | os.PathLike) -> str:
    """'image-folder', 'image-array' or 'text', from what ``input_path`` is."""
    path = Path(input_path)
    if not path.exists():
        raise InputError(f"input {str(path)!r} does not exist")
    if path.is_dir():
        return "image-folder"
    if path.suffix in ARRAY_SUFFIXES:
        return "image-array"
    if path.suffix in TEXT_SUFFIXES:
        return "text"
    raise InputError(
        f"input {str(path)!r} is not an image folder, a .npy/.npz image array or a .json/.jsonl file"
    )
