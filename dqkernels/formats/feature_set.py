"""The feature set: a directory of arrays and the sidecar ``features.json`` that describes them."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from dqkernels.core.errors import InputError
from dqkernels.core.validate import load_float_matrix

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


def read_sidecar(sidecar_path: Path) -> dict:
    """Parse a feature-set sidecar, raising ValueError when it is not one."""
    try:
        sidecar = json.loads(Path(sidecar_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read feature sidecar {str(sidecar_path)!r}: {error}") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FEATURES_FORMAT:
        raise InputError(f"{str(sidecar_path)!r} is not a dqk features sidecar")
    return sidecar


def load_labels(path: Path, count: int) -> np.ndarray:
    """Read a (count,) integer labels ``.npy`` as int64, raising ValueError on any mismatch."""
    try:
        labels = np.load(path)
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"labels {str(path)!r} is not a readable .npy file ({error})") from None
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels {str(path)!r} must be a 1-D integer array")
    if labels.shape[0] != count:
        raise InputError(f"labels {str(path)!r} have {labels.shape[0]} entries but the features have {count} rows")
    return labels.astype(np.int64, copy=False)


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
        features = load_float_matrix(path, "features")
    else:
        base = sidecar_path.parent
        files = sidecar["files"]
        if "features" in files:
            features = load_float_matrix(base / files["features"], "features")
        else:
            delta = load_float_matrix(base / files["delta"], "gradient delta")
            embed = load_float_matrix(base / files["embed"], "gradient embedding")
            if delta.shape[0] != embed.shape[0]:
                raise InputError(f"delta has {delta.shape[0]} rows but embed has {embed.shape[0]}")
            features = GradEmbedding(delta, embed)
        if use_labels and "labels" in files:
            set_labels = base / files["labels"]
    feature_set = FeatureSet(features, None, sidecar_path, sidecar, path)
    labels_path = Path(labels) if labels is not None else set_labels
    if labels_path is not None:
        feature_set.labels = load_labels(labels_path, feature_set.count)
    return feature_set
