"""The feature set: a directory of arrays and the sidecar ``features.json`` that describes them."""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from dqkernels.core.errors import InputError
from dqkernels.core.validate import load_float_matrix
from dqkernels.formats.items import Item, check_item_path, read_items
from dqkernels.formats.subset import manifest_path, read_manifest

SIDECAR_NAME = "features.json"
FEATURES_FORMAT = "dqkernels.features"
FEATURES_FILE = "feats.npy"
DELTA_FILE = "delta.npy"
EMBED_FILE = "embed.npy"
LABELS_FILE = "labels.npy"
ITEMS_FILE = "items.jsonl"


@dataclass
class FeatureSet:
    """Features ready for binning.

    features: (M, d) array (memory-mapped), or ``GradEmbedding(delta (M, C), embed (M, D))``.
    labels: (M,) int64, or None.
    sidecar_path / sidecar: the feature set's ``features.json`` and its contents, when known.
    path: the file or directory the set was opened from.
    """

    features: object
    labels: Optional[np.ndarray]
    sidecar_path: Optional[Path]
    sidecar: Optional[dict]
    path: Path

    @property
    def count(self) -> int:
        """Number of samples M."""
        from dqkernels import GradEmbedding

        rows = self.features.delta if isinstance(self.features, GradEmbedding) else self.features
        return int(rows.shape[0])


def _json_document(path: Path, what: str):
    """Parse a JSON file; one InputError for unreadable, invalid or too deeply nested text."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {what} {str(path)!r}: {error}") from None
    except RecursionError:
        raise InputError(f"cannot read {what} {str(path)!r}: JSON nested too deeply") from None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_sidecar(sidecar: object, sidecar_path: Path) -> dict:
    """Return ``sidecar`` if it is a well-formed feature-set sidecar, else raise InputError.

    Checked: ``format``; ``files`` — names (relative to the sidecar's directory, inside it) of
    ``features`` or of both ``delta`` and ``embed``, optionally ``labels`` and ``items``;
    ``count`` (rows); ``source`` with its ``path`` and ``kind`` (and ``classes``, ``count`` when
    present); ``skipped`` when present.
    """
    name = str(sidecar_path)
    if not isinstance(sidecar, dict) or sidecar.get("format") != FEATURES_FORMAT:
        raise InputError(f"{name!r} is not a dqk features sidecar")
    files = sidecar.get("files")
    if not isinstance(files, dict):
        raise InputError(f"feature sidecar {name!r} has no 'files' object naming its arrays")
    for key, file_name in files.items():
        check_item_path(file_name, f"feature sidecar {name!r}, files.{key}")
    if "features" not in files and not {"delta", "embed"} <= set(files):
        raise InputError(f"feature sidecar {name!r} names neither 'features' nor 'delta' and 'embed' in 'files'")
    if not _is_count(sidecar.get("count")):
        raise InputError(f"feature sidecar {name!r}: 'count' must be a non-negative integer")
    source = sidecar.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("path"), str) or not isinstance(
        source.get("kind"), str
    ):
        raise InputError(f"feature sidecar {name!r}: 'source' must be an object with a 'path' and a 'kind'")
    classes = source.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise InputError(f"feature sidecar {name!r}: 'source.classes' must be a list of class names")
    if "count" in source and not _is_count(source["count"]):
        raise InputError(f"feature sidecar {name!r}: 'source.count' must be a non-negative integer")
    skipped = sidecar.get("skipped")
    if skipped is not None and not (
        isinstance(skipped, dict) and _is_count(skipped.get("count")) and isinstance(skipped.get("items"), list)
    ):
        raise InputError(f"feature sidecar {name!r}: 'skipped' must be an object with 'count' and 'items'")
    for key in ("mode", "model"):
        if key in sidecar and not isinstance(sidecar[key], str):
            raise InputError(f"feature sidecar {name!r}: {key!r} must be a string")
    return sidecar


def read_sidecar(sidecar_path: Path) -> dict:
    """Parse and check a feature-set sidecar (:func:`check_sidecar`); InputError when it is not one."""
    return check_sidecar(_json_document(Path(sidecar_path), "feature sidecar"), Path(sidecar_path))


def sidecar_location(path: str | os.PathLike) -> Path:
    """The sidecar of a feature set given as its directory or as its ``features.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / SIDECAR_NAME
    if not path.is_file():
        raise InputError(f"feature set {str(path)!r} does not exist (expected a directory holding {SIDECAR_NAME})")
    return path


def read_feature_items(sidecar_path: Path, sidecar: dict) -> Optional[list[Item]]:
    """The item of every row of a feature set (image folders), or None when it records none.

    Raises InputError when ``items.jsonl`` is unreadable or invalid (see
    :func:`dqkernels.formats.items.read_items`) or does not hold one item per row.
    """
    files = sidecar["files"]
    if "items" not in files:
        return None
    items = read_items(Path(sidecar_path).parent / files["items"])
    if len(items) != sidecar["count"]:
        raise InputError(
            f"feature set {str(sidecar_path)!r} has {sidecar['count']} rows but its items file lists "
            f"{len(items)} items"
        )
    return items


@dataclass
class IdOrigin:
    """What the ids of a subset are rows of.

    sidecar_path / sidecar: the feature set the subset was drawn from, or None when it is not
        known (bare features, or a subset without a manifest).
    count: the number of rows the ids index (the feature set's count, else the subset manifest's
        ``n_samples``), or None when unknown.
    """

    sidecar_path: Optional[Path]
    sidecar: Optional[dict]
    count: Optional[int]

    def items(self) -> Optional[list[Item]]:
        """The feature set's items (:func:`read_feature_items`), None without recorded items."""
        if self.sidecar is None:
            return None
        return read_feature_items(self.sidecar_path, self.sidecar)

    @property
    def source_kind(self) -> Optional[str]:
        """The kind of input the feature set was extracted from ('image-folder', ...), or None."""
        return self.sidecar["source"]["kind"] if self.sidecar is not None else None


def id_origin(subset=None, features: Optional[str | os.PathLike] = None) -> IdOrigin:
    """Find the feature set whose rows the ids of ``subset`` are.

    subset: a subset ``.npy`` path (its ``.json`` manifest names the feature set), an array of
        ids, or None.
    features: the feature set (directory or ``features.json``) given explicitly; it wins.

    Without ``features``, the manifest's ``features_sidecar`` is used. When that file no longer
    exists — the feature folder was moved with the subset in it — the ``features.json`` beside
    the subset is used instead if it has the manifest's number of samples; otherwise
    InputError asks for the feature set. A subset drawn from the wrong number of rows for the
    feature set is an InputError too.
    """
    manifest = None
    if isinstance(subset, (str, os.PathLike)) and manifest_path(subset).is_file():
        try:
            manifest = read_manifest(subset)
        except RecursionError:
            raise InputError(f"cannot read subset manifest {str(manifest_path(subset))!r}: JSON nested too deeply") from None
    manifest_count = manifest.get("n_samples") if manifest is not None else None
    if manifest_count is not None and not _is_count(manifest_count):
        raise InputError(f"subset manifest {str(manifest_path(subset))!r}: 'n_samples' must be a count")

    sidecar_path = None
    if features is not None:
        sidecar_path = sidecar_location(features)
    elif manifest is not None and manifest.get("features_sidecar") is not None:
        recorded = manifest["features_sidecar"]
        if not isinstance(recorded, str):
            raise InputError(f"subset manifest {str(manifest_path(subset))!r}: 'features_sidecar' must be a path")
        beside = Path(subset).parent / SIDECAR_NAME
        if Path(recorded).is_file():
            sidecar_path = Path(recorded)
        elif beside.is_file() and read_sidecar(beside)["count"] == manifest_count:
            sidecar_path = beside
        else:
            raise InputError(
                f"subset {str(subset)!r} was drawn from the feature set {recorded!r}, which no longer exists; "
                "give the feature set it was drawn from (--features)"
            )
    if sidecar_path is None:
        return IdOrigin(None, None, manifest_count)
    sidecar = read_sidecar(sidecar_path)
    if manifest_count is not None and manifest_count != sidecar["count"]:
        raise InputError(
            f"subset {str(subset)!r} was drawn from {manifest_count} samples but the feature set "
            f"{str(sidecar_path)!r} has {sidecar['count']}"
        )
    return IdOrigin(sidecar_path, sidecar, sidecar["count"])


def _load_matrix(path: Path, what: str) -> np.ndarray:
    """``load_float_matrix`` with an InputError also for a truncated or corrupt archive."""
    try:
        return load_float_matrix(path, what)
    except (zipfile.BadZipFile, EOFError) as error:
        raise InputError(f"{what} {str(path)!r} is not a readable .npy file ({error})") from None


def load_labels(path: Path, count: int) -> np.ndarray:
    """Read a (count,) integer labels ``.npy`` as int64, raising InputError on any mismatch."""
    try:
        labels = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"labels {str(path)!r} is not a readable .npy file ({error})") from None
    if not isinstance(labels, np.ndarray):
        labels.close()
        raise InputError(f"labels {str(path)!r} is an archive, expected one .npy array")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels {str(path)!r} must be a 1-D integer array")
    if labels.shape[0] != count:
        raise InputError(f"labels {str(path)!r} have {labels.shape[0]} entries but the features have {count} rows")
    return labels.astype(np.int64, copy=False)


def check_recorded_sizes(sidecar_path: Path, sidecar: dict) -> None:
    """The files of a feature set must have the sizes its sidecar recorded when it was written
    (``integrity``: {name: {"size", "sha256"}}); a mismatch means an interrupted or edited set.
    Sets written before sizes were recorded have no ``integrity`` and are accepted as they are.
    The content hashes are checked where a stage decides whether to reuse its work."""
    integrity = sidecar.get("integrity")
    if integrity is None:
        return
    if not isinstance(integrity, dict):
        raise InputError(f"feature sidecar {str(sidecar_path)!r}: 'integrity' must be an object")
    for name in sidecar["files"].values():
        record = integrity.get(name)
        if not isinstance(record, dict) or not isinstance(record.get("size"), int):
            raise InputError(f"feature sidecar {str(sidecar_path)!r} records no size for {name}")
        try:
            actual = (sidecar_path.parent / name).stat().st_size
        except OSError as error:
            raise InputError(f"feature set {str(sidecar_path.parent)!r}: {name} is missing ({error})") from None
        if actual != record["size"]:
            raise InputError(
                f"feature set {str(sidecar_path.parent)!r}: {name} has {actual} bytes but its sidecar "
                f"records {record['size']}; the set is incomplete or was changed — rerun dqk features"
            )


def open_feature_set(
    path: str | os.PathLike, labels: Optional[str | os.PathLike] = None, use_labels: bool = True
) -> FeatureSet:
    """Open features for binning from a ``.npy``, a feature-set directory or its sidecar.

    A ``.npy`` with a sidecar beside it that names it as its features (or delta / embed)
    belongs to that feature set. The set's own
    labels are used unless ``use_labels`` is False; ``labels`` (a ``.npy`` path) overrides them.
    """
    from dqkernels import GradEmbedding

    path = Path(path)
    if not path.exists():
        raise InputError(f"features {str(path)!r} do not exist")
    sidecar_path = None
    if path.is_dir():
        sidecar_path = path / SIDECAR_NAME
        if not sidecar_path.is_file():
            raise InputError(f"directory {str(path)!r} holds no {SIDECAR_NAME}")
    elif path.suffix == ".json":
        sidecar_path = path
    elif (path.parent / SIDECAR_NAME).is_file():
        with contextlib.suppress(ValueError):
            sibling_files = read_sidecar(path.parent / SIDECAR_NAME)["files"]
            if path.name in (sibling_files.get(name) for name in ("features", "delta", "embed")):
                sidecar_path = path.parent / SIDECAR_NAME
    sidecar = read_sidecar(sidecar_path) if sidecar_path is not None else None

    set_labels = None
    if sidecar is None:
        features = _load_matrix(path, "features")
    else:
        base = sidecar_path.parent
        files = sidecar["files"]
        check_recorded_sizes(sidecar_path, sidecar)
        if "features" in files:
            features = _load_matrix(base / files["features"], "features")
        else:
            delta = _load_matrix(base / files["delta"], "gradient delta")
            embed = _load_matrix(base / files["embed"], "gradient embedding")
            if delta.shape[0] != embed.shape[0]:
                raise InputError(f"delta has {delta.shape[0]} rows but embed has {embed.shape[0]}")
            features = GradEmbedding(delta, embed)
        if use_labels and "labels" in files:
            set_labels = base / files["labels"]
    feature_set = FeatureSet(features, None, sidecar_path, sidecar, path)
    if sidecar is not None and feature_set.count != sidecar["count"]:
        raise InputError(
            f"feature sidecar {str(sidecar_path)!r} records {sidecar['count']} rows but its arrays have "
            f"{feature_set.count}"
        )
    labels_path = Path(labels) if labels is not None else set_labels
    if labels_path is not None:
        feature_set.labels = load_labels(labels_path, feature_set.count)
    return feature_set
