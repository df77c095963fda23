"""The subset: a ``.npy`` of sorted sample ids and its JSON manifest.

The two files are one output. The manifest records the size and sha256 of the ``.npy`` it
belongs to (``subset_file``), and every reader here checks that record before using either file,
so ids and manifest from different runs — left by a run killed between its two renames — are
refused instead of being taken for a subset.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from dqkernels.core.errors import InputError

SUBSET_FILE_RECORD = "subset_file"


def manifest_path(subset_path: str | os.PathLike) -> Path:
    """The JSON manifest written beside a subset ``.npy``."""
    return Path(subset_path).with_suffix(".json")


def subset_file_record(payload: bytes) -> dict:
    """The manifest's record of the ``.npy`` bytes it belongs to: ``size`` and ``sha256``."""
    return {"size": len(payload), "sha256": "sha256:" + hashlib.sha256(payload).hexdigest()}


def _parse_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read subset manifest {str(path)!r}: {error}") from None
    if not isinstance(manifest, dict):
        raise InputError(f"subset manifest {str(path)!r} is not a JSON object")
    return manifest


def _read_ids_bytes(subset: Path) -> bytes:
    try:
        return subset.read_bytes()
    except OSError as error:
        raise InputError(f"cannot read subset {str(subset)!r}: {error.strerror or error}") from None


def _check_pair(subset: Path, manifest: dict, payload: bytes) -> None:
    """Raise InputError unless ``manifest`` records exactly these ``.npy`` bytes."""
    record = manifest.get(SUBSET_FILE_RECORD)
    if not isinstance(record, dict) or not {"size", "sha256"} <= record.keys():
        raise InputError(
            f"subset manifest {str(manifest_path(subset))!r} records no size and sha256 of "
            f"{subset.name}; rerun dqk sample"
        )
    if record["size"] != len(payload) or record["sha256"] != subset_file_record(payload)["sha256"]:
        raise InputError(
            f"{subset.name} does not match its manifest {manifest_path(subset).name} in "
            f"{str(subset.parent)!r} (a run was interrupted between writing the two); rerun dqk sample"
        )


def read_manifest(subset_path: str | os.PathLike) -> dict:
    """The manifest of a subset ``.npy``, checked against that ``.npy``.

    Raises InputError when the manifest is missing or malformed, or when the ``.npy`` beside it
    is not the one it was written with.
    """
    subset = Path(subset_path)
    manifest = _parse_manifest(manifest_path(subset))
    _check_pair(subset, manifest, _read_ids_bytes(subset))
    return manifest


def load_subset_indices(subset: str | os.PathLike) -> np.ndarray:
    """Selected ids (K,) int64 from a subset ``.npy``; InputError unless sorted, unique and ≥ 0.

    When a manifest lies beside the ``.npy`` (``dqk sample`` output) the ``.npy`` must be the
    one the manifest records; a ``.npy`` without a manifest is a plain list of ids.
    """
    subset = Path(subset)
    payload = _read_ids_bytes(subset)
    if manifest_path(subset) != subset and manifest_path(subset).exists():
        _check_pair(subset, _parse_manifest(manifest_path(subset)), payload)
    try:
        indices = np.load(io.BytesIO(payload), allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"subset {str(subset)!r} is not a readable .npy file ({error})") from None
    if not isinstance(indices, np.ndarray) or indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise InputError(f"subset {str(subset)!r} must hold a 1-D integer array of sample ids")
    indices = indices.astype(np.int64, copy=False)
    if indices.size and (indices[0] < 0 or np.any(np.diff(indices) <= 0)):
        raise InputError(f"subset {str(subset)!r} must hold sorted, unique, non-negative ids")
    return indices


def _same_file(first: Path, second: Path) -> bool:
    if first.resolve() == second.resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def subset_sources(manifest: dict) -> list[Path]:
    """The files a subset was drawn from: its bins file, the feature sidecar and the arrays that
    sidecar names (read leniently: this only decides what must not be overwritten)."""
    protected = [Path(manifest[key]) for key in ("bins_file", "features_sidecar") if isinstance(manifest.get(key), str)]
    sidecar_path = manifest.get("features_sidecar")
    if isinstance(sidecar_path, str):
        try:
            files = json.loads(Path(sidecar_path).read_text(encoding="utf-8")).get("files", {})
        except (OSError, ValueError, AttributeError, RecursionError):
            files = {}
        if isinstance(files, dict):
            protected.extend(Path(sidecar_path).parent / name for name in files.values() if isinstance(name, str))
    return protected


def check_subset_destination(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Raise InputError unless the subset ``path`` and its manifest can be written without
    touching ``inputs``; returns ``path``.

    The ``.npy`` and its ``.json`` manifest must be two different files, neither an existing
    directory, and neither may be one of ``inputs``.
    """
    path = Path(path)
    manifest = manifest_path(path)
    if manifest == path:
        raise InputError(f"subset output {str(path)!r} must not end in .json: its manifest is written to that name")
    for target in (path, manifest):
        if target.is_dir():
            raise InputError(f"subset output {str(target)!r} is a directory")
        for source in inputs:
            if _same_file(target, Path(source)):
                raise InputError(f"subset output {str(target)!r} would overwrite the input {str(source)!r}")
    return path


def write_subset(subset, path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a ``SubsetResult`` as ``path`` (.npy) and its manifest (``path`` with suffix .json).

    Everything is checked first (:func:`check_subset_destination`, protecting ``inputs`` and the
    bins file, feature sidecar and feature arrays the subset's manifest names), so a refused
    write leaves an existing subset as it was. ``SubsetResult.save`` writes the two files.
    """
    path = check_subset_destination(path, [*inputs, *subset_sources(subset.manifest)])
    subset.save(path)
    return path
