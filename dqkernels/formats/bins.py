"""The bins ``.npz`` as files: reading with one-line errors, and summaries of bin sizes."""

from __future__ import annotations

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


def load_bins_file(path: str | os.PathLike):
    """``dqkernels.load_bins`` with a one-line ValueError for any unreadable file."""
    from dqkernels import load_bins

    try:
        return load_bins(path)
    except zipfile.BadZipFile as error:
        raise InputError(f"bins file {str(path)!r} is not a readable bins .npz ({error})") from None
