"""``dqk info``: human-readable descriptions of every file the tool writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dqkernels.core.errors import InputError
from dqkernels.formats.bins import bin_sizes_summary, load_bins_file
from dqkernels.formats.feature_set import SIDECAR_NAME, FeatureSet, open_feature_set
from dqkernels.formats.subset import load_subset_indices, manifest_path, read_manifest


def describe(path: str | os.PathLike) -> str:
    """Human-readable description of a bins ``.npz``, a subset, a feature set or any ``.npy``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{str(path)!r} does not exist")
    if path.is_dir() or path.name == SIDECAR_NAME:
        return _describe_feature_set(open_feature_set(path, use_labels=True))
    if path.suffix == ".npz":
        return _describe_bins(path)
    if path.suffix == ".json":
        path = path.with_suffix(".npy")
    if path.suffix != ".npy":
        raise InputError(f"{str(path)!r}: expected a .npz, .npy, .json or feature-set directory")
    if manifest_path(path).is_file():
        return _describe_subset(path)
    feature_set = open_feature_set(path)
    if feature_set.sidecar is not None:
        return _describe_feature_set(feature_set)
    array = feature_set.features
    layout = "Fortran" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
    return f"{path}: array, shape {array.shape}, dtype {array.dtype}, {layout} order"


def _describe_feature_set(feature_set: FeatureSet) -> str:
    sidecar = feature_set.sidecar
    lines = [f"{feature_set.sidecar_path}: feature set, {sidecar['count']} samples, mode {sidecar['mode']}"]
    from dqkernels import GradEmbedding

    features = feature_set.features
    arrays = features._asdict() if isinstance(features, GradEmbedding) else {"features": features}
    for name, array in arrays.items():
        lines.append(f"  {name}: shape {array.shape}, dtype {array.dtype}")
    if feature_set.labels is not None:
        classes = np.unique(feature_set.labels)
        lines.append(f"  labels: {feature_set.labels.shape[0]}, {classes.size} classes")
    lines.append(f"  model: {sidecar['model']}" + (
        f", checkpoint {sidecar['checkpoint']}" if "checkpoint" in sidecar else ""
    ))
    source = sidecar["source"]
    lines.append(f"  source: {source['kind']} {source['path']} ({source['count']} items, {source['fingerprint']})")
    if sidecar["skipped"]["count"]:
        lines.append(f"  skipped unreadable: {sidecar['skipped']['count']}")
    return "\n".join(lines)


def _describe_bins(path: Path) -> str:
    result = load_bins_file(path)
    lines = [
        f"{path}: bins, {result.order.shape[0]} samples in {result.bin_offsets.shape[0] - 1} bins "
        f"(backend {result.backend}, form {result.form})",
        f"  bin sizes: {bin_sizes_summary(result.bin_sizes)}",
    ]
    if result.labels is not None:
        lines.append(f"  per-class: {np.unique(result.labels).size} classes")
    lines.append("  metadata: " + json.dumps(result.meta, sort_keys=True, default=str))
    return "\n".join(lines)


def _describe_subset(path: Path) -> str:
    indices = load_subset_indices(path)
    manifest = read_manifest(path)
    shown = {key: value for key, value in manifest.items() if not isinstance(value, (list, dict))}
    return "\n".join(
        [
            f"{path}: subset, {indices.shape[0]} ids, dtype {indices.dtype}",
            "  manifest: " + json.dumps(shown, sort_keys=True, default=str),
        ]
    )
