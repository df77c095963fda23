"""``dqk info`` for the data files: feature sets, bins, subsets, label and other arrays, archives,
and the selected-of-total tables that subsets and exports share."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dqkernels.core.errors import InputError
from dqkernels.formats.bins import bin_sizes_summary, load_bins_file
from dqkernels.formats.feature_set import FeatureSet, open_feature_set, read_sidecar
from dqkernels.formats.subset import load_subset_indices, read_manifest

# Columns per block of a count table, and columns shown at most (the totals always count all).
TABLE_COLUMNS = 12
TABLE_SHOWN = 48


def read_json(path: Path, what: str):
    """The parsed JSON document at ``path``; InputError naming it as ``what`` when unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise InputError(f"{what} {str(path)!r} is not readable JSON ({error})") from None


def percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def count_table(axis: str, names: Sequence, selected: Sequence[int], totals: Optional[Sequence[int]]) -> list[str]:
    """Indented lines of a per-``axis`` table: one column per name, rows ``selected`` and ``total``
    (without ``totals``, selected only), then the sum over all columns. At most TABLE_SHOWN
    columns are listed; the sums always count every one."""
    selected = [int(value) for value in selected]
    totals = None if totals is None else [int(value) for value in totals]
    heading = "selected of total" if totals is not None else "selected"
    plural = "classes" if axis == "class" else f"{axis}s"
    lines = [f"  per {axis}, {heading}:"]
    shown = min(len(names), TABLE_SHOWN)
    for start in range(0, shown, TABLE_COLUMNS):
        stop = min(start + TABLE_COLUMNS, shown)
        rows = [[str(name) for name in names[start:stop]], [str(v) for v in selected[start:stop]]]
        if totals is not None:
            rows.append([str(v) for v in totals[start:stop]])
        width = max(len(cell) for row in rows for cell in row)
        for label, row in zip((axis, "selected", "total"), rows):
            lines.append(f"    {label:<9}" + "".join(f"{cell:>{width + 2}}" for cell in row))
    if shown < len(names):
        rest = selected[shown:]
        lines.append(f"    ... {len(names) - shown} more {axis} columns (selected {min(rest)} to {max(rest)} each)")
    if totals is not None:
        all_selected, all_total = sum(selected), sum(totals)
        lines.append(f"    all {plural}: {all_selected} of {all_total} ({percent(all_selected, all_total)})")
        empty = [str(name) for name, k, n in zip(names, selected, totals) if n > 0 and k == 0]
        if empty:
            listed = ", ".join(empty[:20]) + (", ..." if len(empty) > 20 else "")
            lines.append(f"    warning: {len(empty)} non-empty {plural} with no selected sample: {listed}")
    else:
        lines.append(f"    all {plural}: {sum(selected)}")
    return lines


def describe_feature_set(feature_set: FeatureSet) -> str:
    sidecar = feature_set.sidecar
    lines = [f"{feature_set.sidecar_path.parent}: feature set, {sidecar['count']} samples, mode {sidecar['mode']}"]
    from dqkernels import GradEmbedding

    features = feature_set.features
    arrays = features._asdict() if isinstance(features, GradEmbedding) else {"features": features}
    for name, array in arrays.items():
        lines.append(f"  {name}: shape {array.shape}, dtype {array.dtype} ({sidecar['files'][name]})")
    if feature_set.labels is not None:
        counts = np.bincount(feature_set.labels - feature_set.labels.min()) if feature_set.labels.size else []
        counts = [int(c) for c in counts if c]
        lines.append(f"  labels: {feature_set.labels.shape[0]}, {len(counts)} classes "
                     f"(per class: {bin_sizes_summary(np.array(counts, dtype=np.int64))})")
    checkpoint = sidecar.get("checkpoint")
    if checkpoint == "random-init":
        weights = f"RANDOM-INIT weights (seed {sidecar.get('seed')}), not a trained model"
    else:
        weights = f"checkpoint {checkpoint}" if checkpoint else None
    lines.append(f"  model: {sidecar['model']}" + (f", {weights}" if weights else ""))
    source = sidecar["source"]
    classes = source.get("classes")
    lines.append(f"  source: {source['kind']} {source['path']} ({source['count']} items"
                 + (f", {len(classes)} classes" if classes else "") + ")")
    if "items" in sidecar["files"]:
        lines.append(f"  items: {sidecar['files']['items']} (relative path and size of every row)")
    if sidecar["skipped"]["count"]:
        lines.append(f"  skipped unreadable: {sidecar['skipped']['count']}")
    return "\n".join(lines)


def feature_set_member(path: Path) -> Optional[str]:
    """The role of ``path`` in the feature set beside it ("features", "labels", "items", ...), or None."""
    sidecar_path = path.parent / "features.json"
    if not sidecar_path.is_file():
        return None
    try:
        files = read_sidecar(sidecar_path)["files"]
    except InputError:
        return None
    return next((role for role, name in files.items() if name == path.name), None)


def describe_feature_member(path: Path, role: str) -> str:
    feature_set = open_feature_set(path.parent, use_labels=True)
    if role == "items":
        with open(path, encoding="utf-8") as handle:
            count = sum(1 for line in handle if line.strip())
        head = f"{path}: the item list of a feature set, {count} items (relative path and size of each row)"
    elif role == "labels":
        labels = feature_set.labels
        head = f"{path}: the labels of a feature set, {labels.shape[0]} entries, {np.unique(labels).size} classes"
    else:
        array = np.load(path, mmap_mode="r")
        head = f"{path}: the {role} array of a feature set: shape {array.shape}, dtype {array.dtype}"
    return head + "\n" + indent(describe_feature_set(feature_set))


def describe_bins(path: Path) -> str:
    result = load_bins_file(path)
    meta = result.meta
    lines = [
        f"{path}: bins, {result.order.shape[0]} samples in {result.n_bins} bins"
        f"{' per class' if result.labels is not None else ''} (backend {result.backend}, form {result.form})",
        f"  bin sizes: {bin_sizes_summary(result.bin_sizes)}",
    ]
    if result.labels is not None:
        classes, counts = np.unique(result.labels, return_counts=True)
        lines.append(f"  per class: {classes.size} classes of {bin_sizes_summary(counts)} samples")
    settings = [f"{key} {meta[key]}" for key in ("metric", "lam", "sizes", "precision", "dims") if key in meta]
    if settings:
        lines.append("  options: " + ", ".join(settings))
    if meta.get("features_path"):
        lines.append(f"  features: {meta['features_path']}")
    if meta.get("version"):
        lines.append(f"  written by dqkernels {meta['version']}")
    return "\n".join(lines)


def describe_subset(path: Path) -> str:
    indices = load_subset_indices(path)
    manifest = read_manifest(path)
    method = manifest.get("method", "dq")
    options = ", ".join(f"{key} {manifest[key]}" for key in ("ratio", "seed", "allocation") if key in manifest)
    lines = [
        f"{path}: subset, {indices.shape[0]} ids, dtype {indices.dtype}: {manifest.get('n_selected')} of "
        f"{manifest.get('n_samples')} samples ({options}, method {method})"
    ]
    if method == "random":
        lines.append("  random baseline: drawn per class ignoring the bins; the tables count where it landed")
    for key, label in (("bins_file", "bins"), ("features_sidecar", "features")):
        if manifest.get(key):
            lines.append(f"  {label}: {manifest[key]}")
    lines += _manifest_tables(manifest)
    return "\n".join(lines)


def _manifest_tables(manifest: dict) -> list[str]:
    lines = []
    bins = manifest.get("bins")
    if isinstance(bins, list) and bins:
        lines += count_table("bin", [e["bin"] for e in bins], [e["selected"] for e in bins], [e["count"] for e in bins])
    classes = manifest.get("classes")
    if isinstance(classes, list) and classes:
        lines += count_table("class", [e["class"] for e in classes], [e["selected"] for e in classes],
                             [e["count"] for e in classes])
    elif bins:
        lines.append("  global mode: sampled without labels")
    return lines


def subset_manifest_of(path: Path) -> bool:
    """True when ``path`` (.npy or .json) is one half of a subset pair."""
    npy, manifest = path.with_suffix(".npy"), path.with_suffix(".json")
    if not (npy.is_file() and manifest.is_file()):
        return False
    try:
        document = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(document, dict) and "subset_file" in document


def describe_array(path: Path) -> str:
    """A plain ``.npy``: shape, dtype and layout; integer vectors also as labels or ids."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"{str(path)!r} is not a readable .npy file ({error})") from None
    layout = "Fortran" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
    line = f"{path}: array, shape {array.shape}, dtype {array.dtype}, {layout} order"
    if array.ndim == 1 and array.dtype.kind in "iu" and array.size:
        values = np.asarray(array)
        classes, counts = np.unique(values, return_counts=True)
        line += (f"\n  integers {int(values.min())} to {int(values.max())}, {classes.size} distinct"
                 f"{' (sorted and unique: a list of ids)' if np.all(np.diff(values) > 0) else ''}")
        if classes.size <= max(1, values.size // 2):
            line += f"\n  as labels: {classes.size} classes of {bin_sizes_summary(counts)} samples"
    elif array.ndim == 4 and array.dtype == np.uint8:
        line += f"\n  {array.shape[0]} images of {array.shape[1]}x{array.shape[2]}, {array.shape[3]} channels"
    return line


def npz_arrays(path: Path) -> dict:
    """{name: (shape, dtype)} of an ``.npz`` archive; InputError when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise InputError(f"{str(path)!r} holds a single array, not an .npz archive")
            return {name: (archive[name].shape, archive[name].dtype) for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"{str(path)!r} is not a readable .npz archive ({error})") from None


def describe_archive(path: Path, arrays: dict) -> str:
    listed = ", ".join(f"{name} {shape} {dtype}" for name, (shape, dtype) in arrays.items())
    line = f"{path}: archive of {len(arrays)} arrays: {listed}"
    if "images" in arrays:
        shape = arrays["images"][0]
        line += f"\n  an image array: {shape[0]} images" + (", with labels" if "labels" in arrays else "")
    return line


def indent(text: str) -> str:
    """``text`` with every line indented by two spaces."""
    return "\n".join("  " + line for line in text.splitlines())


def first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


def file_size(path: Path) -> str:
    size = path.stat().st_size
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024.0
    return f"{size} bytes"


def is_relative(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True

