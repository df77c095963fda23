"""Export: the chosen samples written in the input's own format into a new directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dqkernels.core.errors import InputError
from dqkernels.formats.feature_set import read_sidecar
from dqkernels.formats.inputs import input_kind


def export_subset(
    indices: np.ndarray,
    dest: str | os.PathLike,
    *,
    features_sidecar: Optional[str | os.PathLike] = None,
    source: Optional[str | os.PathLike] = None,
    link: bool = False,
    replace: bool = False,
) -> Path:
    """Write the samples at ``indices`` (sorted int64 row ids) to the new directory ``dest``.

    The samples keep the input's own format: image folder → ``dest/<class>/...`` copies
    (symlinks with ``link``); instruction data → ``dest/<input file name>`` with the chosen
    records; image array → ``dest/<input file name>`` with the chosen images (and labels). The
    input is the one recorded in ``features_sidecar``; ``source`` points at it instead (e.g. after
    the data moved, or for features without a sidecar). ``dest`` must be missing or empty, unless
    ``replace``: then a previous export there is swapped for the new one once it is complete.
    """
    dest = Path(dest)
    if not replace:
        check_export_destination(dest)
    sidecar = read_sidecar(Path(features_sidecar)) if features_sidecar else None
    if sidecar is None and source is None:
        raise InputError("the features have no dqk sidecar naming their input; give the input data with --source")
    source_path = Path(source) if source is not None else Path(sidecar["source"]["path"])
    kind = input_kind(source_path)
    writer = _export_writer(kind, source_path, sidecar, features_sidecar, indices, link)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    retired = staging.with_name(staging.name + ".old")
    try:
        writer(staging)
        if replace and dest.exists():
            os.replace(dest, retired)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    return dest


def check_export_destination(dest: str | os.PathLike) -> None:
    """Raise ValueError unless ``dest`` is missing or an empty directory."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"export directory {str(dest)!r} already exists and is not empty")


def _export_writer(
    kind: str,
    source_path: Path,
    sidecar: Optional[dict],
    sidecar_path: Optional[str],
    indices: np.ndarray,
    link: bool,
) -> Callable[[Path], None]:
    """Check the source against the subset and return a function writing the export into a directory."""
    if kind == "image-folder":
        if sidecar is not None and "items" in sidecar["files"]:
            items_file = Path(sidecar_path).parent / sidecar["files"]["items"]
            with open(items_file, encoding="utf-8") as handle:
                items = [json.loads(line) for line in handle]
        else:
            from dqkernels.features.image import list_image_folder

            items = list_image_folder(source_path).relative_paths
        _check_ids_fit(indices, len(items), source_path)

        def write(staging: Path) -> None:
            for row in indices:
                relative_path = items[row]
                origin = source_path / relative_path
                target = staging / relative_path
                target.parent.mkdir(parents=True, exist_ok=True)
                if link:
                    os.symlink(origin.resolve(), target)
                else:
                    shutil.copy2(origin, target)

        return write

    if kind == "text":
        from dqkernels.features.text import (
            read_instruction_records,
            write_instruction_records,
        )

        instructions = read_instruction_records(source_path)
        _check_ids_fit(indices, len(instructions.records), source_path)
        return lambda staging: write_instruction_records(
            instructions, indices, staging / source_path.name
        )

    from dqkernels.features.image import load_image_array

    images, labels = load_image_array(source_path)
    _check_ids_fit(indices, images.shape[0], source_path)

    def write_arrays(staging: Path) -> None:
        if source_path.suffix == ".npz":
            chosen = {"images": images[indices]}
            if labels is not None:
                chosen["labels"] = labels[indices]
            np.savez(staging / source_path.name, **chosen)
        else:
            np.save(staging / source_path.name, images[indices])

    return write_arrays


def _check_ids_fit(indices: np.ndarray, count: int, source_path: Path) -> None:
    if indices.size and indices[-1] >= count:
        raise InputError(
            f"subset id {int(indices[-1])} is out of range for {str(source_path)!r} ({count} samples)"
        )
