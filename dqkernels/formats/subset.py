"""The subset: a ``.npy`` of sorted sample ids and its JSON manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dqkernels.core.errors import InputError


def manifest_path(subset_path: str | os.PathLike) -> Path:
    """The JSON manifest written beside a subset ``.npy``."""
    return Path(subset_path).with_suffix(".json")


def read_manifest(subset_path: str | os.PathLike) -> dict:
    """Parse the manifest of a subset ``.npy`` (ValueError when missing or malformed)."""
    path = manifest_path(subset_path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read subset manifest {str(path)!r}: {error}") from None


def load_subset_indices(subset: str | os.PathLike) -> np.ndarray:
    """Selected ids (K,) int64 from a subset ``.npy``; ValueError unless sorted, unique and ≥ 0."""
    try:
        indices = np.load(subset)
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"subset {str(subset)!r} is not a readable .npy file ({error})") from None
    if not isinstance(indices, np.ndarray) or indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise InputError(f"subset {str(subset)!r} must hold a 1-D integer array of sample ids")
    indices = indices.astype(np.int64, copy=False)
    if indices.size and (indices[0] < 0 or np.any(np.diff(indices) <= 0)):
        raise InputError(f"subset {str(subset)!r} must hold sorted, unique, non-negative ids")
    return indices
