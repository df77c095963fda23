"""``dqk report``: what a set of the tool's outputs holds, gathered for one self-contained page.

:func:`gather_outputs` takes any mix of a ``dqk run`` work directory, a feature set, a bins
``.npz``, a subset ``.npy`` (with its manifest), an export folder, a patch store and a ``dqk v2``
output, follows the files each one records (a subset names its bins and feature set, a bins
file its feature set, an export and a patch store their subset and feature set) and returns a
:class:`GatheredOutputs`. :func:`bin_class_table` counts samples and selected samples per
(bin, class) cell, :func:`report_warnings` lists what a user should know before trusting the
subset, and :func:`project_2d` gives the 2-D PCA picture. The page itself is drawn by
:mod:`dqkernels.pipeline.report_page` (:func:`write_report`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from dqkernels.core.errors import InputError
from dqkernels.formats.bins import load_bins_file
from dqkernels.formats.feature_set import (
    SIDECAR_NAME,
    open_feature_set,
    read_feature_items,
)
from dqkernels.formats.items import EXPORT_MANIFEST, read_export_manifest
from dqkernels.formats.subset import load_subset_indices, manifest_path, read_manifest

RUN_RECORD = "run.json"
V2_SUMMARY = "v2.json"
PATCH_HEADER = "header.json"
KINDS = ("features", "bins", "subset", "export", "patches", "v2")
# A non-empty (bin, class) cell smaller than this fraction of the median non-empty cell is "tiny".
TINY_CELL_FRACTION = 0.25
PCA_BLOCK = 16
PCA_ITERATIONS = 8


@dataclass
class GatheredOutputs:
    """Everything found in the given paths and the files they record.

    paths: {kind: path} for each kind in :data:`KINDS` that was found.
    read_files: every file read (the report must not overwrite any of them).
    sidecar / sidecar_path: the feature set's ``features.json`` contents and path, or None.
    features: (M, d) float array (memory-mapped) for the projection, or None.
    labels: (M,) int64 class of each sample, or None. class_names: names of the label values.
    bins: the ``BinResult``, or None. selected: (K,) int64 sorted selected ids, or None.
    manifest: the subset manifest, or None. export: the export manifest, or None.
    patch_store: a ``PatchStore``, or None. v2: the ``v2.json`` summary, or None.
    notes: warnings found while gathering (a recorded file that no longer exists, ...).
    """

    paths: dict = field(default_factory=dict)
    read_files: list = field(default_factory=list)
    sidecar: Optional[dict] = None
    sidecar_path: Optional[Path] = None
    features: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    class_names: Optional[list] = None
    bins: object = None
    selected: Optional[np.ndarray] = None
    manifest: Optional[dict] = None
    export: Optional[dict] = None
    patch_store: object = None
    v2: Optional[dict] = None
    notes: list = field(default_factory=list)

    @property
    def count(self) -> Optional[int]:
        """Number of samples M, from whichever output knows it."""
        if self.bins is not None:
            return int(self.bins.order.shape[0])
        if self.features is not None:
            return int(self.features.shape[0])
        if self.manifest is not None and isinstance(self.manifest.get("n_samples"), int):
            return self.manifest["n_samples"]
        return None

    def class_name(self, label) -> str:
        """Display name of a class value (None: all samples, in global mode)."""
        if label is None:
            return "all"
        if self.class_names is not None and 0 <= int(label) < len(self.class_names):
            return str(self.class_names[int(label)])
        return str(int(label))


def _classify(path: Path) -> tuple[str, Path]:
    """(kind, path) of one given path; kind "run" is a ``dqk run`` work directory."""
    if path.is_dir():
        for marker, kind in ((RUN_RECORD, "run"), (V2_SUMMARY, "v2"), (SIDECAR_NAME, "features"),
                             (EXPORT_MANIFEST, "export"), (PATCH_HEADER, "patches")):
            if (path / marker).is_file():
                return kind, path
        raise InputError(
            f"{str(path)!r} holds none of the tool's outputs (a dqk run work directory, a feature set, "
            "an export folder, a patch store or a dqk v2 output)"
        )
    if not path.is_file():
        raise InputError(f"{str(path)!r} does not exist")
    by_name = {RUN_RECORD: "run", V2_SUMMARY: "v2", SIDECAR_NAME: "features", EXPORT_MANIFEST: "export",
               PATCH_HEADER: "patches"}
    if path.name in by_name:
        kind = by_name[path.name]
        return kind, path if kind == "features" else path.parent
    if path.suffix == ".npz":
        return "bins", path
    if path.suffix == ".json" and path.with_suffix(".npy").is_file():
        return "subset", path.with_suffix(".npy")
    if path.suffix == ".npy":
        if manifest_path(path).is_file():
            return "subset", path
        if (path.parent / SIDECAR_NAME).is_file():
            return "features", path
    raise InputError(
        f"{str(path)!r} is not an output of the tool (expected a bins .npz, a subset .npy with its "
        ".json manifest, a feature set, an export folder, a patch store, a dqk v2 output or a run work directory)"
    )


def gather_outputs(paths) -> GatheredOutputs:
    """Open every given path and the outputs they record; InputError for anything unreadable.

    paths: one or more paths (see the module docstring). Two outputs of the same kind, or
    outputs of different sizes (M), are refused: they cannot describe one subset.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("give at least one output to report on")
    found: dict = {}
    given: set = set()  # kinds named by the user, which win over ones found beside them

    def add(kind: str, path: Path, explicit: bool) -> None:
        if kind in found and (kind in given or not explicit):
            if explicit and Path(os.path.realpath(found[kind])) != Path(os.path.realpath(path)):
                raise InputError(f"two {kind} outputs given: {str(found[kind])!r} and {str(path)!r}; give one")
            return
        found[kind] = path
        if explicit:
            given.add(kind)

    for path in paths:
        kind, located = _classify(path)
        if kind == "run":
            for name, sub_kind in (("features", "features"), ("bins.npz", "bins"), ("subset.npy", "subset"),
                                   ("patches", "patches")):
                if (located / name).exists():
                    add(sub_kind, located / name, True)
            found.setdefault("run", located)
            _add_run_export(located, add)
        elif kind == "v2":
            add("v2", located, True)
            for name, sub_kind in (("bins.npz", "bins"), ("subset.npy", "subset")):
                if (located / name).is_file():
                    add(sub_kind, located / name, True)
        else:
            add(kind, located, True)
            beside = located if located.is_dir() else located.parent
            if kind == "features":  # `dqk bin` and `dqk sample` write beside the features by default
                for name, sub_kind in (("bins.npz", "bins"), ("subset.npy", "subset")):
                    if (beside / name).is_file() and sub_kind not in found:
                        add(sub_kind, beside / name, False)
    gathered = GatheredOutputs()
    _open_all(gathered, found, add)
    gathered.paths = {kind: path for kind, path in found.items() if kind in KINDS or kind == "run"}
    _check_sizes(gathered)
    return gathered


def _add_run_export(work_dir: Path, add) -> None:
    try:
        record = json.loads((work_dir / RUN_RECORD).read_text(encoding="utf-8"))
        export_dir = record["stages"]["export"]["dir"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return
    if isinstance(export_dir, str) and (Path(export_dir) / EXPORT_MANIFEST).is_file():
        add("export", Path(export_dir), False)


def _recorded(gathered: GatheredOutputs, add, kind: str, value, who: str) -> None:
    """Follow a path that ``who`` records for ``kind``; a note when it no longer exists."""
    if not isinstance(value, str):
        return
    path = Path(value)
    if path.exists():
        add(kind, path, False)
    else:
        gathered.notes.append(f"{who} records the {kind} {value!r}, which no longer exists")


def _open_all(gathered: GatheredOutputs, found: dict, add) -> None:
    """Open the outputs in an order where each can name the ones it was made from."""
    if "v2" in found:
        _open_v2(gathered, found["v2"])
    if "patches" in found:
        from dqkernels.pixel.patch_store import PatchStore

        store = PatchStore(found["patches"])
        gathered.patch_store = store
        gathered.read_files.extend(entry for entry in Path(found["patches"]).iterdir() if entry.is_file())
        source = store.header.get("source") or {}
        if "subset" not in found:
            _recorded(gathered, add, "subset", source.get("subset"), f"patch store {str(found['patches'])!r}")
        if "features" not in found:
            _recorded(gathered, add, "features", source.get("features_sidecar"),
                      f"patch store {str(found['patches'])!r}")
        if gathered.class_names is None:
            gathered.class_names = store.class_names
    if "export" in found:
        gathered.export = read_export_manifest(found["export"])
        gathered.read_files.append(found["export"] / EXPORT_MANIFEST)
        who = f"export {str(found['export'])!r}"
        if "bins" not in found:
            _recorded(gathered, add, "bins", gathered.export.get("bins_file"), who)
        if "features" not in found:
            _recorded(gathered, add, "features", gathered.export.get("features_sidecar"), who)
    if "subset" in found:
        subset = found["subset"]
        gathered.selected = load_subset_indices(subset)
        gathered.read_files.append(subset)
        if manifest_path(subset).is_file():
            gathered.manifest = read_manifest(subset)
            gathered.read_files.append(manifest_path(subset))
            who = f"subset {str(subset)!r}"
            if "bins" not in found:
                _recorded(gathered, add, "bins", gathered.manifest.get("bins_file"), who)
            if "features" not in found:
                _recorded(gathered, add, "features", gathered.manifest.get("features_sidecar"), who)
    if gathered.selected is None and gathered.export is not None:
        gathered.selected = np.unique(np.asarray([s["id"] for s in gathered.export.get("samples", [])],
                                                 dtype=np.int64))
    if "bins" in found:
        gathered.bins = load_bins_file(found["bins"])
        gathered.read_files.append(found["bins"])
        if "features" not in found and "v2" not in found:
            meta = gathered.bins.meta
            _recorded(gathered, add, "features", meta.get("features_sidecar") or meta.get("features_path"),
                      f"bins {str(found['bins'])!r}")
    if "features" in found:
        _open_features(gathered, found["features"])
    if gathered.bins is not None and gathered.bins.labels is not None:
        gathered.labels = gathered.bins.labels


def _open_features(gathered: GatheredOutputs, path: Path) -> None:
    feature_set = open_feature_set(path)
    gathered.read_files.append(feature_set.path)
    if feature_set.sidecar_path is not None:
        gathered.read_files.append(feature_set.sidecar_path)
    from dqkernels import GradEmbedding

    features = feature_set.features
    gathered.features = features.embed if isinstance(features, GradEmbedding) else features
    gathered.labels = feature_set.labels
    gathered.sidecar = feature_set.sidecar
    if feature_set.sidecar is not None:
        gathered.read_files.extend(feature_set.sidecar_path.parent / name
                                   for name in feature_set.sidecar["files"].values())
        gathered.sidecar_path = feature_set.sidecar_path
        classes = feature_set.sidecar["source"].get("classes")
        if classes is not None:
            gathered.class_names = classes


def _open_v2(gathered: GatheredOutputs, directory: Path) -> None:
    summary_path = directory / V2_SUMMARY
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise InputError(f"cannot read the DQ-V2 summary {str(summary_path)!r}: {error}") from None
    if not isinstance(summary, dict) or summary.get("format") != "dqkernels.v2":
        raise InputError(f"{str(summary_path)!r} is not a dqk v2 summary")
    gathered.v2 = summary
    gathered.read_files.extend(entry for entry in directory.iterdir() if entry.is_file())
    pool = directory / "pool_features.npy"
    if pool.is_file():
        feature_set = open_feature_set(pool, labels=directory / "pool_labels.npy"
                                       if (directory / "pool_labels.npy").is_file() else None)
        gathered.features, gathered.labels = feature_set.features, feature_set.labels
        gathered.read_files.append(pool)


def _check_sizes(gathered: GatheredOutputs) -> None:
    """All outputs must describe the same M samples, and the selected ids must be rows of them."""
    sizes = {}
    if gathered.bins is not None:
        sizes[f"bins {str(gathered.paths.get('bins'))!r}"] = int(gathered.bins.order.shape[0])
    if gathered.features is not None:
        sizes[f"features {str(gathered.paths.get('features') or gathered.paths.get('v2'))!r}"] = int(
            gathered.features.shape[0])
    if gathered.manifest is not None and isinstance(gathered.manifest.get("n_samples"), int):
        sizes[f"subset {str(gathered.paths.get('subset'))!r}"] = gathered.manifest["n_samples"]
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} has {count}" for name, count in sizes.items())
        raise InputError(f"the outputs describe different data sets ({listed} samples); give outputs of one run")
    count = gathered.count
    if gathered.selected is not None and count is not None and gathered.selected.size \
            and gathered.selected[-1] >= count:
        raise InputError(f"selected id {int(gathered.selected[-1])} is not a row of the {count} samples")


# --------------------------------------------------------------------------- what the page shows


@dataclass
class BinClassTable:
    """Samples and selected samples per (bin, class) cell.

    bins: B bin ids (None: no bins known). classes: C class values (None: global, no labels).
    counts, selected: (B, C) int64.
    """

    bins: list
    classes: list
    counts: np.ndarray
    selected: np.ndarray


def bin_class_table(gathered: GatheredOutputs) -> Optional[BinClassTable]:
    """The (bin, class) table from the bins, labels and selected ids; from the subset manifest's
    ``cells`` when the bins are not available. None when neither is known."""
    count = gathered.count
    if gathered.bins is not None:
        bin_of = gathered.bins.bin_of
        bins = list(range(gathered.bins.n_bins))
    elif gathered.manifest is not None and isinstance(gathered.manifest.get("cells"), list):
        cells = gathered.manifest["cells"]
        bins = sorted({cell["bin"] for cell in cells})
        classes = sorted({cell["class"] for cell in cells}, key=lambda c: (c is None, c))
        counts = np.zeros((len(bins), len(classes)), dtype=np.int64)
        chosen = np.zeros_like(counts)
        for cell in cells:
            position = bins.index(cell["bin"]), classes.index(cell["class"])
            counts[position], chosen[position] = cell["count"], cell["selected"]
        return BinClassTable(bins, classes, counts, chosen)
    elif count is not None:
        bin_of = np.zeros(count, dtype=np.int64)
        bins = [None]
    else:
        return None
    labels = gathered.labels
    classes = sorted(int(c) for c in np.unique(labels)) if labels is not None else [None]
    class_index = np.searchsorted(classes, labels) if labels is not None else np.zeros(len(bin_of), dtype=np.int64)
    flat = bin_of * len(classes) + class_index
    counts = np.bincount(flat, minlength=len(bins) * len(classes)).reshape(len(bins), len(classes))
    chosen = np.zeros_like(counts)
    if gathered.selected is not None:
        chosen = np.bincount(flat[gathered.selected], minlength=counts.size).reshape(counts.shape)
    return BinClassTable(bins, classes, counts.astype(np.int64), chosen.astype(np.int64))


def random_init_description(sidecar: Optional[dict]) -> Optional[str]:
    """'model resnet18, seed 0' when a feature sidecar records a randomly initialised network."""
    if sidecar is None:
        return None
    random = sidecar.get("checkpoint") == "random-init" or sidecar.get("random_init") is True \
        or sidecar.get("weights") == "random-init"
    if not random:
        return None
    seed = sidecar.get("seed")
    return f"model {sidecar.get('model', '?')}" + (f", seed {seed}" if seed is not None else "")


def _listed(values: list, shown: int = 12) -> str:
    text = ", ".join(str(v) for v in values[:shown])
    return text + (f" and {len(values) - shown} more" if len(values) > shown else "")


def report_warnings(gathered: GatheredOutputs, table: Optional[BinClassTable]) -> list[str]:
    """One line per thing a user should know before trusting the subset, most serious first."""
    warnings = []
    random_model = random_init_description(gathered.sidecar)
    if random_model is not None:
        warnings.append(
            f"Features come from a random-init network ({random_model}): the bins follow low-level "
            "image statistics, not content. Extract features with trained weights for a meaningful subset."
        )
    v2_options = (gathered.v2 or {}).get("options") or {}
    if gathered.v2 is not None and (v2_options.get("random_init") is True or not (
            v2_options.get("checkpoint") or v2_options.get("pretrained"))):
        warnings.append("The DQ-V2 pool features come from a random-init network (no checkpoint was given to dqk v2).")
    if gathered.patch_store is not None:
        scoring = gathered.patch_store.header.get("scoring") or {}
        if scoring.get("cam_checkpoint") == "random-init":
            warnings.append("The patch store's GradCAM++ scores come from a random-init network: "
                            "the dropped patches are not chosen by what a trained model looks at.")
    if gathered.sidecar is not None and gathered.sidecar.get("skipped", {}).get("count"):
        skipped = gathered.sidecar["skipped"]
        warnings.append(f"{skipped['count']} unreadable input(s) were skipped during feature extraction: "
                        f"{_listed(skipped['items'], 5)}")
    if gathered.class_names is not None and gathered.labels is not None:
        present = set(np.unique(gathered.labels).tolist())
        empty = [name for index, name in enumerate(gathered.class_names) if index not in present]
        if empty:
            warnings.append(f"{len(empty)} class(es) have no sample at all: {_listed(empty)}")
    if table is not None:
        bin_totals, class_totals = table.counts.sum(axis=1), table.counts.sum(axis=0)
        empty_bins = [b for b, total in zip(table.bins, bin_totals) if b is not None and total == 0]
        if empty_bins:
            warnings.append(f"{len(empty_bins)} empty bin(s): {_listed(empty_bins)}")
        nonempty = table.counts[table.counts > 0]
        if nonempty.size:
            limit = TINY_CELL_FRACTION * float(np.median(nonempty))
            tiny = [(b, c, int(table.counts[i, j])) for i, b in enumerate(table.bins)
                    for j, c in enumerate(table.classes) if 0 < table.counts[i, j] < limit]
            if tiny:
                cells = [f"bin {b} / {gathered.class_name(c)} ({n})" for b, c, n in tiny]
                warnings.append(f"{len(tiny)} tiny cell(s), under a quarter of the median cell "
                                f"({float(np.median(nonempty)):g} samples): {_listed(cells, 8)}")
        if gathered.selected is not None or gathered.manifest is not None:
            selected_bins, selected_classes = table.selected.sum(axis=1), table.selected.sum(axis=0)
            unpicked = [gathered.class_name(c) for c, total, chosen in
                        zip(table.classes, class_totals, selected_classes) if c is not None and total and not chosen]
            if unpicked:
                warnings.append(f"{len(unpicked)} class(es) have no selected sample: {_listed(unpicked)}")
            unpicked_bins = [b for b, total, chosen in zip(table.bins, bin_totals, selected_bins)
                             if b is not None and total and not chosen]
            if unpicked_bins:
                warnings.append(f"{len(unpicked_bins)} non-empty bin(s) have no selected sample: "
                                f"{_listed(unpicked_bins)}")
    if gathered.selected is None and gathered.manifest is None:
        warnings.append("No subset was given or found: the page shows the data and its bins only.")
    return list(dict.fromkeys(warnings + gathered.notes))


def project_2d(features: np.ndarray, rows: np.ndarray, fit_rows: np.ndarray, seed: int,
               normalize: bool) -> np.ndarray:
    """(len(rows), 2) float64 coordinates on the first two principal components.

    features: (M, d) array (may be memory-mapped). fit_rows: the rows the components are
    computed from (a random sample, at most a few ten thousand). normalize: scale rows to unit
    length first (cosine bins). The components come from subspace iteration on a block of
    ``PCA_BLOCK`` directions with a Rayleigh–Ritz step, so the cost is O(n·d) per pass and no
    d × d matrix is ever decomposed; with d ≤ ``PCA_BLOCK`` the result is exact.
    """
    def read(selection: np.ndarray) -> np.ndarray:
        order = np.argsort(selection)
        block = np.empty((selection.shape[0], features.shape[1]), dtype=np.float32)
        block[order] = np.asarray(features[selection[order]], dtype=np.float32)
        if normalize:
            block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        return block

    fit = read(np.asarray(fit_rows))
    mean = fit.mean(axis=0, dtype=np.float64).astype(np.float32)
    fit -= mean
    width = fit.shape[1]
    rank = min(2, width)
    rng = np.random.default_rng(seed)
    basis = _orthonormal(rng.standard_normal((width, min(width, PCA_BLOCK))).astype(np.float32))
    for _ in range(PCA_ITERATIONS if width > PCA_BLOCK else 0):
        basis = _orthonormal(fit.T @ (fit @ basis))
    projected = (fit @ basis).astype(np.float64)
    _, vectors = np.linalg.eigh(projected.T @ projected)
    directions = basis.astype(np.float64) @ vectors[:, ::-1][:, :rank]
    directions *= np.where(directions.sum(axis=0) < 0, -1.0, 1.0)  # a fixed sign per component
    coordinates = (read(np.asarray(rows)) - mean).astype(np.float64) @ directions
    if rank < 2:
        coordinates = np.hstack([coordinates, np.zeros((coordinates.shape[0], 2 - rank))])
    return coordinates


def _orthonormal(block: np.ndarray) -> np.ndarray:
    """An orthonormal basis (d, k) of the columns of ``block`` (d, k), from its k × k Gram matrix;
    directions the block has (nearly) lost are kept with a floor on their length instead."""
    gram = block.T.astype(np.float64) @ block.astype(np.float64)
    values, vectors = np.linalg.eigh(gram)
    values = np.maximum(values, values.max() * 1e-10 + 1e-30)
    return (block.astype(np.float64) @ (vectors / np.sqrt(values))).astype(np.float32)


def image_rows_source(gathered: GatheredOutputs):
    """How a sample id becomes an image: ("folder", root, items), ("array", path, None), ("text",
    path, None), or None with the reason in a note."""
    sidecar = gathered.sidecar
    if sidecar is None:
        return None
    source = sidecar["source"]
    path = Path(source["path"])
    if not path.exists():
        gathered.notes.append(f"the input {source['path']!r} the features were extracted from no longer "
                              "exists, so no thumbnails or records are shown")
        return None
    if source["kind"] == "image-folder":
        items = read_feature_items(gathered.sidecar_path, sidecar)
        return ("folder", path, items) if items is not None else None
    if source["kind"] == "image-array":
        return "array", path, None
    if source["kind"] == "text":
        return "text", path, None
    return None
