"""Fingerprints: sha256 of documents, files, arrays, file listings and directory trees, as
'sha256:<hex>'.

A file read whole is fingerprinted by its content (:func:`fingerprint_file`, streamed). A large
tree can be fingerprinted cheaply by each file's (path, size, mtime in ns), or by content.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np


def fingerprint_document(document: dict) -> str:
    """sha256 of a JSON-serialisable document with sorted keys, as 'sha256:<hex>'."""
    payload = json.dumps(document, sort_keys=True, default=str).encode("utf-8")
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def fingerprint_file_listing(root: Path, relative_paths: list[str]) -> str:
    """sha256 over the sorted (path, size, mtime_ns) of files under ``root``."""
    digest = hashlib.sha256()
    for relative_path in sorted(relative_paths):
        stat = (root / relative_path).stat()
        digest.update(f"{relative_path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8"))
    return "sha256:" + digest.hexdigest()


def fingerprint_file_contents(root: Path, relative_paths: list[str]) -> str:
    """sha256 over the sorted (path, sha256 of the content) of files under ``root``."""
    digest = hashlib.sha256()
    for relative_path in sorted(relative_paths):
        digest.update(f"{relative_path}\0{fingerprint_file(Path(root) / relative_path)}\n".encode("utf-8"))
    return "sha256:" + digest.hexdigest()


def fingerprint_tree(root: str | os.PathLike, content: bool = False) -> str:
    """sha256 over everything below the directory ``root``, in sorted relative-path order.

    Each entry contributes its relative path and kind; a symbolic link its target; a file its
    size and mtime in ns, or with ``content`` the sha256 of its bytes (read through links).
    Links to directories are recorded, not followed.
    """
    root = Path(root)
    digest = hashlib.sha256()
    entries = []
    for directory, directory_names, file_names in os.walk(root):
        for name in directory_names + file_names:
            entries.append(Path(directory, name))
    for path in sorted(entries, key=lambda entry: entry.relative_to(root).as_posix()):
        relative_path = path.relative_to(root).as_posix()
        if path.is_symlink():
            record = f"link\0{os.readlink(path)}"
            if content and path.is_file():
                record += f"\0{fingerprint_file(path)}"
        elif path.is_dir():
            record = "dir"
        elif content:
            record = f"file\0{fingerprint_file(path)}"
        else:
            stat = path.stat()
            record = f"file\0{stat.st_size}\0{stat.st_mtime_ns}"
        digest.update(f"{relative_path}\0{record}\n".encode("utf-8"))
    return "sha256:" + digest.hexdigest()


def fingerprint_arrays(*arrays: Optional[np.ndarray], chunk_rows: int = 4096) -> str:
    """sha256 over dtype, shape and bytes of each array (None arrays are skipped), read in chunks."""
    digest = hashlib.sha256()
    for array in arrays:
        if array is None:
            continue
        digest.update(f"{array.dtype.str}{array.shape}".encode("utf-8"))
        for start in range(0, max(array.shape[0], 1), chunk_rows):
            digest.update(np.ascontiguousarray(array[start : start + chunk_rows]).tobytes())
    return "sha256:" + digest.hexdigest()


def fingerprint_file(path: str | os.PathLike, block_bytes: int = 1 << 20) -> str:
    """sha256 of a file's bytes, as 'sha256:<hex>'."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(block_bytes), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()
