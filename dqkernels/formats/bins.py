"""The bins ``.npz`` as files: reading with one-line errors, and summaries of bin sizes."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from dqkernels.core.errors import InputError


def bin_sizes_summary(sizes: np.ndarray, shown: int = 12) -> str:
    """'180 180 179' for up to ``shown`` bin sizes, then '... (min a, max b)'."""
    listed = " ".join(str(int(size)) for size in sizes[:shown])
    if len(sizes) > shown:
        listed += f" ... (min {int(sizes.min())}, max {int(sizes.max())})"
    return listed


# Metadata entries that the pipeline follows, and the JSON types they must have.
_META_TYPES = {
    "features_path": (str, type(None)),
    "features_sidecar": (str, type(None)),
    "stage_fingerprint": (str, type(None)),
}


def _check_meta(path: str | os.PathLike) -> None:
    """Raise InputError unless the file's ``meta`` entry, when it has one, is a JSON object whose
    entries that the pipeline follows have the right types."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"bins file {str(path)!r} is not a readable bins .npz ({error})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(f"bins file {str(path)!r} holds a single array; a bins file is an .npz archive")
    with data:
        if "meta" not in data.files:
            return
        try:
            meta = json.loads(str(data["meta"]))
        except (OSError, ValueError, EOFError, RecursionError, zipfile.BadZipFile) as error:
            raise InputError(f"bins file {str(path)!r} has unreadable metadata ({error})") from None
    if not isinstance(meta, dict):
        raise InputError(f"bins file {str(path)!r}: its meta is not a JSON object")
    for key, types in _META_TYPES.items():
        if not isinstance(meta.get(key), types):
            raise InputError(f"bins file {str(path)!r}: meta entry {key!r} must be a string or null, got {meta[key]!r}")


def load_bins_file(path: str | os.PathLike):
    """``dqkernels.load_bins`` with a one-line InputError for any unreadable or malformed file."""
    from dqkernels import load_bins

    if os.path.isfile(path):
        _check_meta(path)
    try:
        return load_bins(path)
    except zipfile.BadZipFile as error:
        raise InputError(f"bins file {str(path)!r} is not a readable bins .npz ({error})") from None
