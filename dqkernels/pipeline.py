"""The DQ pipeline as files: features → bins → subset → export, each stage resumable.

Files written here:

* a **feature set** directory: ``feats.npy`` (N, D) float32 — or ``delta.npy`` (N, C) and
  ``embed.npy`` (N, D) in gradient mode — plus ``labels.npy`` (N,) int64 when labels are known,
  ``items.jsonl`` (image folders: the relative path of each row's image, one JSON string per
  line) and the sidecar ``features.json`` describing all of them;
* a bins ``.npz`` (``BinResult.save``), whose metadata names the feature set it was built from;
* a subset ``.npy`` of sorted row ids with its ``.json`` manifest (``SubsetResult.save``), which
  names the bins file and the feature set;
* an export directory holding the chosen samples in the input's own format.

Every file is written to a temporary name in its own directory and moved into place with
``os.replace``, so a failed run leaves no half-written output. Each stage records a fingerprint of
its inputs and options (``stage_fingerprint``); :func:`run_pipeline` reuses a stage whose
recorded fingerprint matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from ._io import atomic_output

SIDECAR_NAME = "features.json"
FEATURES_FORMAT = "dqkernels.features"
FEATURES_FILE = "feats.npy"
DELTA_FILE = "delta.npy"
EMBED_FILE = "embed.npy"
LABELS_FILE = "labels.npy"
ITEMS_FILE = "items.jsonl"
ARRAY_SUFFIXES = (".npy", ".npz")


# --------------------------------------------------------------------------- atomic writes


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` through a temporary file beside ``path`` (the name is kept, no '.npy' added)."""
    with atomic_output(path) as handle:
        np.save(handle, array)


def write_json(path: str | os.PathLike, document: dict) -> None:
    """Write ``document`` as indented UTF-8 JSON through a temporary file beside ``path``."""
    with atomic_output(path) as handle:
        handle.write((json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Write UTF-8 text lines (each ending in a newline) through a temporary file beside ``path``."""
    with atomic_output(path) as handle:
        for line in lines:
            handle.write((line + "\n").encode("utf-8"))


# --------------------------------------------------------------------------- fingerprints


def fingerprint_document(document: dict) -> str:
    """sha256 of a JSON-serialisable document with sorted keys, as 'sha256:<hex>'."""
    payload = json.dumps(document, sort_keys=True, default=str).encode("utf-8")
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def fingerprint_file_listing(root: Path, relative_paths: list[str]) -> str:
    """sha256 over the sorted (path, size, mtime_ns) of files under ``root``."""
    digest = hashlib.sha256()
    for relative_path in sorted(relative_paths):
        stat = (root / relative_path).stat()
        digest.update(f"{relative_path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8"))
    return "sha256:" + digest.hexdigest()


def fingerprint_arrays(*arrays: Optional[np.ndarray], chunk_rows: int = 4096) -> str:
    """sha256 over dtype, shape and bytes of each array (None arrays are skipped), read in chunks."""
    digest = hashlib.sha256()
    for array in arrays:
        if array is None:
            continue
        digest.update(f"{array.dtype.str}{array.shape}".encode("utf-8"))
        for start in range(0, max(array.shape[0], 1), chunk_rows):
            digest.update(np.ascontiguousarray(array[start : start + chunk_rows]).tobytes())
    return "sha256:" + digest.hexdigest()


def fingerprint_file(path: str | os.PathLike, block_bytes: int = 1 << 20) -> str:
    """sha256 of a file's bytes, as 'sha256:<hex>'."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(block_bytes), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


# --------------------------------------------------------------------------- features stage


def input_kind(input_path: str | os.PathLike) -> str:
    """'image-folder', 'image-array' or 'text', from what ``input_path`` is."""
    from .text import TEXT_SUFFIXES

    path = Path(input_path)
    if not path.exists():
        raise ValueError(f"input {str(path)!r} does not exist")
    if path.is_dir():
        return "image-folder"
    if path.suffix in ARRAY_SUFFIXES:
        return "image-array"
    if path.suffix in TEXT_SUFFIXES:
        return "text"
    raise ValueError(
        f"input {str(path)!r} is not an image folder, a .npy/.npz image array or a .json/.jsonl file"
    )


@dataclass
class _ExtractedFeatures:
    """Arrays and descriptions produced by one feature-extraction pass, before writing.

    arrays: {"features": (N, D)} or {"delta": (N, C), "embed": (N, D)}, float32.
    labels: (N,) int64 or None. items: image-folder path of each row, or None.
    skipped: relative paths of unreadable images. source / model: sidecar sections.
    """

    arrays: dict
    labels: Optional[np.ndarray]
    items: Optional[list]
    skipped: list
    source: dict
    model: dict


def extract_features(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model: str = "resnet18",
    checkpoint: Optional[str | os.PathLike] = None,
    mode: str = "pooled",
    grad_delta: str = "standard",
    text_model: Optional[str | os.PathLike] = None,
    num_classes: Optional[int] = None,
    img_size: Optional[int] = None,
    batch_size: int = 64,
    device: Optional[str] = None,
    workers: int = 0,
    strict: bool = False,
    seed: int = 0,
    progress: bool = False,
    stage_fingerprint: Optional[str] = None,
) -> dict:
    """Extract features of ``input_path`` into the feature-set directory ``out_dir``.

    Image inputs (a folder or an array file) run through the timm ``model`` (random init from
    ``seed`` unless ``checkpoint``); instruction data (.json/.jsonl) through the local
    sentence-embedding model ``text_model``. Nothing is written unless extraction succeeds.
    Returns the sidecar document that was written.
    """
    input_path = Path(input_path).resolve()
    kind = input_kind(input_path)
    if kind == "text":
        if mode != "pooled":
            raise ValueError("gradient mode needs labelled images; instruction data supports mode 'pooled'")
        extracted = _text_features(input_path, text_model, batch_size, device, progress)
    else:
        extracted = _image_features(
            input_path, kind, model=model, checkpoint=checkpoint, mode=mode, grad_delta=grad_delta,
            num_classes=num_classes, img_size=img_size, batch_size=batch_size, device=device,
            workers=workers, strict=strict, seed=seed, progress=progress,
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    file_names = {"features": FEATURES_FILE, "delta": DELTA_FILE, "embed": EMBED_FILE}
    files = {}
    for name, values in extracted.arrays.items():
        save_npy(out_dir / file_names[name], values)
        files[name] = file_names[name]
    if extracted.labels is not None:
        save_npy(out_dir / LABELS_FILE, extracted.labels)
        files["labels"] = LABELS_FILE
    if extracted.items is not None:
        write_lines(out_dir / ITEMS_FILE, (json.dumps(item) for item in extracted.items))
        files["items"] = ITEMS_FILE
    first = next(iter(extracted.arrays.values()))
    sidecar = {
        "format": FEATURES_FORMAT,
        "mode": mode,
        **extracted.model,
        "count": int(first.shape[0]),
        "dims": {name: int(values.shape[1]) for name, values in extracted.arrays.items()},
        "dtype": str(first.dtype),
        "files": files,
        "source": extracted.source,
        "skipped": {"count": len(extracted.skipped), "items": extracted.skipped},
        "stage_fingerprint": stage_fingerprint,
    }
    write_json(out_dir / SIDECAR_NAME, sidecar)  # last: a sidecar means the set is complete
    return sidecar


def _text_features(input_path: Path, text_model, batch_size: int, device, progress: bool) -> _ExtractedFeatures:
    """Sentence embeddings of every instruction record, in file order."""
    from .text import embed_texts, read_instruction_records, record_text

    if text_model is None:
        raise ValueError("instruction data needs a local sentence-embedding model (--text-model)")
    instructions = read_instruction_records(input_path)
    embeddings = embed_texts(
        [record_text(record) for record in instructions.records],
        text_model,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    source = {
        "path": str(input_path),
        "kind": "text",
        "format": instructions.file_format,
        "count": len(instructions.records),
        "fingerprint": fingerprint_file(input_path),
    }
    model = {"model": "sentence-transformers", "checkpoint": str(Path(text_model).resolve())}
    return _ExtractedFeatures({"features": embeddings}, None, None, [], source, model)


def _image_features(input_path: Path, kind: str, *, model: str, checkpoint, num_classes, seed: int,
                    workers: int, **extraction_options) -> _ExtractedFeatures:
    """timm features of an image folder or image array (see ``extract_image_features``)."""
    from .features import build_model, extract_image_features, list_image_folder, load_image_array

    source = {"path": str(input_path), "kind": kind}
    if kind == "image-folder":
        listing = list_image_folder(input_path)
        all_labels = listing.labels
        source.update(
            format="folder",
            count=len(listing.relative_paths),
            classes=listing.class_names,
            fingerprint=fingerprint_file_listing(input_path, listing.relative_paths),
        )
        image_inputs = {"image_paths": [str(input_path / p) for p in listing.relative_paths]}
        data_classes = len(listing.class_names)
    else:
        images, all_labels = load_image_array(input_path)
        source.update(
            format=input_path.suffix[1:],
            count=int(images.shape[0]),
            fingerprint=fingerprint_arrays(images, all_labels),
        )
        image_inputs = {"images": images}
        data_classes = int(all_labels.max()) + 1 if all_labels is not None else None
    if num_classes is None and checkpoint is None:
        num_classes = data_classes
    network = build_model(model, checkpoint=checkpoint, num_classes=num_classes, seed=seed)
    extracted = extract_image_features(
        network, labels=all_labels, num_workers=workers, **image_inputs, **extraction_options
    )
    mode = extraction_options["mode"]
    arrays = {"features": extracted.pooled} if mode == "pooled" else {
        "delta": extracted.delta, "embed": extracted.embed
    }
    model_meta = {
        "model": model,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else "random-init",
        "checkpoint_sha256": fingerprint_file(checkpoint) if checkpoint is not None else None,
        "seed": None if checkpoint is not None else seed,
        "num_classes": int(network.num_classes),
        "img_size": int(extraction_options["img_size"] or network.pretrained_cfg["input_size"][-1]),
    }
    if mode == "gradient":
        model_meta["grad_delta"] = extraction_options["grad_delta"]
    return _ExtractedFeatures(
        arrays=arrays,
        labels=all_labels[extracted.kept_rows] if all_labels is not None else None,
        items=[listing.relative_paths[row] for row in extracted.kept_rows] if kind == "image-folder" else None,
        skipped=[listing.relative_paths[row] for row, _ in extracted.skipped] if kind == "image-folder" else [],
        source=source,
        model=model_meta,
    )


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
        from . import GradEmbedding

        rows = self.features.delta if isinstance(self.features, GradEmbedding) else self.features
        return int(rows.shape[0])


def read_sidecar(sidecar_path: Path) -> dict:
    """Parse a feature-set sidecar, raising ValueError when it is not one."""
    try:
        sidecar = json.loads(Path(sidecar_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read feature sidecar {str(sidecar_path)!r}: {error}") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FEATURES_FORMAT:
        raise ValueError(f"{str(sidecar_path)!r} is not a dqk features sidecar")
    return sidecar


def load_float_matrix(path: Path, what: str) -> np.ndarray:
    """Memory-map a 2-D floating-point ``.npy`` (any byte order, C or Fortran layout)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{what} {str(path)!r} is not a readable .npy file ({error})") from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{what} {str(path)!r} is an archive, expected one .npy array")
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"{what} {str(path)!r} holds a {array.dtype} array of shape {array.shape}; "
            "expected a 2-D float array (samples × dims)"
        )
    return array


def load_labels(path: Path, count: int) -> np.ndarray:
    """Read a (count,) integer labels ``.npy`` as int64, raising ValueError on any mismatch."""
    try:
        labels = np.load(path)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"labels {str(path)!r} is not a readable .npy file ({error})") from None
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels {str(path)!r} must be a 1-D integer array")
    if labels.shape[0] != count:
        raise ValueError(f"labels {str(path)!r} have {labels.shape[0]} entries but the features have {count} rows")
    return labels.astype(np.int64, copy=False)


def open_feature_set(
    path: str | os.PathLike, labels: Optional[str | os.PathLike] = None, use_labels: bool = True
) -> FeatureSet:
    """Open features for binning from a ``.npy``, a feature-set directory or its sidecar.

    A ``.npy`` with a sidecar beside it that names it as its features (or delta / embed)
    belongs to that feature set. The set's own
    labels are used unless ``use_labels`` is False; ``labels`` (a ``.npy`` path) overrides them.
    """
    from . import GradEmbedding

    path = Path(path)
    if not path.exists():
        raise ValueError(f"features {str(path)!r} do not exist")
    sidecar_path = None
    if path.is_dir():
        sidecar_path = path / SIDECAR_NAME
        if not sidecar_path.is_file():
            raise ValueError(f"directory {str(path)!r} holds no {SIDECAR_NAME}")
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
                raise ValueError(f"delta has {delta.shape[0]} rows but embed has {embed.shape[0]}")
            features = GradEmbedding(delta, embed)
        if use_labels and "labels" in files:
            set_labels = base / files["labels"]
    feature_set = FeatureSet(features, None, sidecar_path, sidecar, path)
    labels_path = Path(labels) if labels is not None else set_labels
    if labels_path is not None:
        feature_set.labels = load_labels(labels_path, feature_set.count)
    return feature_set


# --------------------------------------------------------------------------- bins stage


@dataclass
class BinsOutcome:
    """A saved bin generation: the BinResult, where it was written and how long binning took."""

    result: object
    path: Path
    seconds: float


def make_bins(
    features: str | os.PathLike,
    bins: int = 10,
    *,
    out: Optional[str | os.PathLike] = None,
    labels: Optional[str | os.PathLike] = None,
    use_labels: bool = True,
    metric: str = "cosine",
    lam: float = 1.0,
    device: Optional[str] = None,
    backend: str = "auto",
    sizes: str = "split",
    stage_fingerprint: Optional[str] = None,
) -> BinsOutcome:
    """Run ``dqkernels.graphcut_bins`` on a feature set and save the result.

    out: the ``.npz`` to write; default ``bins.npz`` beside the features (inside a feature-set
    directory). The saved metadata also names the features (``features_path``) and their
    sidecar (``features_sidecar``, None for bare features), which ``dqk sample --export`` follows.
    """
    from . import graphcut_bins

    feature_set = open_feature_set(features, labels=labels, use_labels=use_labels)
    if out is None:
        base = feature_set.path if feature_set.path.is_dir() else feature_set.path.parent
        out = base / "bins.npz"
    started = time.perf_counter()
    result = graphcut_bins(
        feature_set.features,
        bins=bins,
        labels=feature_set.labels,
        metric=metric,
        lam=lam,
        device=device,
        backend=backend,
        sizes=sizes,
    )
    seconds = time.perf_counter() - started
    result.meta["features_path"] = str(feature_set.path.resolve())
    result.meta["features_sidecar"] = (
        str(feature_set.sidecar_path.resolve()) if feature_set.sidecar_path is not None else None
    )
    result.meta["stage_fingerprint"] = stage_fingerprint
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    return BinsOutcome(result, Path(out), seconds)


def bin_sizes_summary(sizes: np.ndarray, shown: int = 12) -> str:
    """'180 180 179' for up to ``shown`` bin sizes, then '... (min a, max b)'."""
    listed = " ".join(str(int(size)) for size in sizes[:shown])
    if len(sizes) > shown:
        listed += f" ... (min {int(sizes.min())}, max {int(sizes.max())})"
    return listed


# --------------------------------------------------------------------------- sample stage


def load_bins_file(path: str | os.PathLike):
    """``dqkernels.load_bins`` with a one-line ValueError for any unreadable file."""
    from . import load_bins

    try:
        return load_bins(path)
    except zipfile.BadZipFile as error:
        raise ValueError(f"bins file {str(path)!r} is not a readable bins .npz ({error})") from None


def draw_subset(
    bins: str | os.PathLike,
    ratio: float,
    *,
    seed: int = 0,
    allocation: str = "exact",
    stage_fingerprint: Optional[str] = None,
):
    """Run ``dqkernels.sample_bins`` on a saved bins file and return the SubsetResult (unsaved).

    Its manifest also names the bins file and the feature set the bins were made from
    (``features_sidecar``, None for bare features).
    """
    from . import sample_bins

    bins_path = Path(bins)
    result = load_bins_file(bins_path)
    subset = sample_bins(result, ratio, seed=seed, labels=result.labels, allocation=allocation)
    subset.manifest["bins_file"] = str(bins_path.resolve())
    subset.manifest["features_sidecar"] = result.meta.get("features_sidecar")
    subset.manifest["stage_fingerprint"] = stage_fingerprint
    return subset


def save_subset(subset, bins: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Path:
    """Save ``subset`` to ``out`` (.npy + .json manifest); default ``subset.npy`` beside ``bins``."""
    out = Path(out) if out is not None else Path(bins).parent / "subset.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    subset.save(out)
    return out


def manifest_path(subset_path: str | os.PathLike) -> Path:
    """The JSON manifest written beside a subset ``.npy``."""
    return Path(subset_path).with_suffix(".json")


def read_manifest(subset_path: str | os.PathLike) -> dict:
    """Parse the manifest of a subset ``.npy`` (ValueError when missing or malformed)."""
    path = manifest_path(subset_path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read subset manifest {str(path)!r}: {error}") from None


def load_subset_indices(subset: str | os.PathLike) -> np.ndarray:
    """Selected ids (K,) int64 from a subset ``.npy``; ValueError unless sorted, unique and ≥ 0."""
    try:
        indices = np.load(subset)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"subset {str(subset)!r} is not a readable .npy file ({error})") from None
    if not isinstance(indices, np.ndarray) or indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"subset {str(subset)!r} must hold a 1-D integer array of sample ids")
    indices = indices.astype(np.int64, copy=False)
    if indices.size and (indices[0] < 0 or np.any(np.diff(indices) <= 0)):
        raise ValueError(f"subset {str(subset)!r} must hold sorted, unique, non-negative ids")
    return indices


# --------------------------------------------------------------------------- export


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
        raise ValueError("the features have no dqk sidecar naming their input; give the input data with --source")
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
        raise ValueError(f"export directory {str(dest)!r} already exists and is not empty")


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
            from .features import list_image_folder

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
        from .text import read_instruction_records, write_instruction_records

        instructions = read_instruction_records(source_path)
        _check_ids_fit(indices, len(instructions.records), source_path)
        return lambda staging: write_instruction_records(
            instructions, indices, staging / source_path.name
        )

    from .features import load_image_array

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
        raise ValueError(
            f"subset id {int(indices[-1])} is out of range for {str(source_path)!r} ({count} samples)"
        )


# --------------------------------------------------------------------------- resumable run


@dataclass
class PipelineConfig:
    """Everything ``dqk run`` needs; YAML keys and ``dqk run`` options have these names.

    Paths in a YAML file are relative to the file's directory.
    """

    input: Optional[str] = None
    work_dir: Optional[str] = None
    # features
    model: str = "resnet18"
    checkpoint: Optional[str] = None
    mode: str = "pooled"
    grad_delta: str = "standard"
    text_model: Optional[str] = None
    num_classes: Optional[int] = None
    device: Optional[str] = None
    img_size: Optional[int] = None
    batch_size: int = 64
    workers: int = 0
    strict: bool = False
    feature_seed: int = 0
    # bins
    bins: int = 10
    per_class: bool = True
    metric: str = "cosine"
    lam: float = 1.0
    bin_device: Optional[str] = None
    backend: str = "auto"
    sizes: str = "split"
    # sample
    ratio: float = 0.1
    seed: int = 0
    allocation: str = "exact"
    # export
    export: Optional[str] = None
    link: bool = False
    # pixel quantization of the subset (images only; off unless ``drop`` is set)
    drop: Optional[float] = None
    quantize_img_size: int = 224
    quantize_grid: int = 14
    cam_model: str = "resnet18"
    cam_checkpoint: Optional[str] = None

    PATH_KEYS = ("input", "work_dir", "checkpoint", "text_model", "export", "cam_checkpoint")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "PipelineConfig":
        """Read a flat YAML mapping of the field names (dashes or underscores)."""
        import yaml

        path = Path(path)
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise ValueError(f"cannot read config {str(path)!r}: {first_line}") from None
        if not isinstance(document, dict):
            raise ValueError(f"config {str(path)!r} must be a mapping of option names to values")
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in document.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ValueError(f"config {str(path)!r}: unknown key {key!r} (known: {', '.join(sorted(known))})")
            if name in cls.PATH_KEYS and value is not None:
                value = str((path.parent / str(value)).resolve())
            values[name] = value
        return cls(**values)


def run_pipeline(config: PipelineConfig, log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Features → bins → subset (→ export) (→ patch store) in ``config.work_dir``, reusing
    finished stages.

    Each stage's fingerprint covers its upstream stage's fingerprint and its own options; a stage
    whose output records the same fingerprint is reused. Returns the output path of each stage.
    """
    if config.input is None:
        raise ValueError("run needs an input (--input or 'input:' in the config)")
    if config.work_dir is None:
        raise ValueError("run needs a work directory (--work-dir or 'work_dir:' in the config)")
    if config.drop is not None:  # checked before any stage runs
        if isinstance(config.drop, bool) or not isinstance(config.drop, (int, float)) or not 0 <= config.drop < 1:
            raise ValueError(f"drop must be a ratio in [0, 1), got {config.drop!r}")
        if input_kind(config.input) == "text":
            raise ValueError("drop: pixel quantization needs images, the input is text")
    work_dir = Path(config.work_dir)
    options = asdict(config)
    input_path = Path(config.input).resolve()

    features_dir = work_dir / "features"
    features_fp = fingerprint_document(
        {
            "input": _input_fingerprint(input_path),
            "checkpoint": fingerprint_file(config.checkpoint) if config.checkpoint else None,
            **{key: options[key] for key in (
                "model", "mode", "grad_delta", "text_model", "num_classes", "img_size", "device", "strict",
                "feature_seed",
            )},
        }
    )
    if _recorded_fingerprint(features_dir / SIDECAR_NAME, "features") == features_fp:
        log(f"features: reused {features_dir}")
    else:
        started = time.perf_counter()
        sidecar = extract_features(
            input_path,
            features_dir,
            model=config.model,
            checkpoint=config.checkpoint,
            mode=config.mode,
            grad_delta=config.grad_delta,
            text_model=config.text_model,
            num_classes=config.num_classes,
            img_size=config.img_size,
            batch_size=config.batch_size,
            device=config.device,
            workers=config.workers,
            strict=config.strict,
            seed=config.feature_seed,
            progress=progress,
            stage_fingerprint=features_fp,
        )
        log(f"features: wrote {features_dir} ({sidecar['count']} samples, "
            f"{time.perf_counter() - started:.1f} s)")

    bins_path = work_dir / "bins.npz"
    bins_fp = fingerprint_document(
        {
            "features": features_fp,
            **{key: options[key] for key in ("bins", "per_class", "metric", "lam", "bin_device", "backend", "sizes")},
        }
    )
    if _recorded_fingerprint(bins_path, "bins") == bins_fp:
        log(f"bins: reused {bins_path}")
    else:
        outcome = make_bins(
            features_dir,
            config.bins,
            out=bins_path,
            use_labels=config.per_class,
            metric=config.metric,
            lam=config.lam,
            device=config.bin_device,
            backend=config.backend,
            sizes=config.sizes,
            stage_fingerprint=bins_fp,
        )
        log(f"bins: wrote {bins_path} (backend {outcome.result.backend}, {outcome.seconds:.2f} s, "
            f"sizes {bin_sizes_summary(outcome.result.bin_sizes)})")

    subset_path = work_dir / "subset.npy"
    subset_fp = fingerprint_document(
        {"bins": bins_fp, **{key: options[key] for key in ("ratio", "seed", "allocation")}}
    )
    if _recorded_fingerprint(subset_path, "subset") == subset_fp:
        log(f"sample: reused {subset_path}")
    else:
        subset = draw_subset(
            bins_path, config.ratio, seed=config.seed, allocation=config.allocation, stage_fingerprint=subset_fp
        )
        save_subset(subset, bins_path, subset_path)
        log(f"sample: wrote {subset_path} ({len(subset.indices)} samples)")

    outputs = {"features": features_dir, "bins": bins_path, "subset": subset_path}
    if config.export is not None:
        export_dir = Path(config.export).resolve()
        export_record = work_dir / "export.json"
        export_fp = fingerprint_document({"subset": subset_fp, "dir": str(export_dir), "link": config.link})
        recorded_fp = _recorded_fingerprint(export_record, "export")
        if recorded_fp == export_fp and export_dir.is_dir():
            log(f"export: reused {export_dir}")
        else:
            # The directory of this run's previous export is replaced; any other is left alone.
            previous_dir = json.loads(export_record.read_text(encoding="utf-8"))["dir"] if recorded_fp else None
            export_subset(
                load_subset_indices(subset_path),
                export_dir,
                features_sidecar=read_manifest(subset_path).get("features_sidecar"),
                link=config.link,
                replace=previous_dir == str(export_dir),
            )
            write_json(export_record, {"dir": str(export_dir), "stage_fingerprint": export_fp})
            log(f"export: wrote {export_dir}")
        outputs["export"] = export_dir
    if config.drop is not None:
        outputs["patches"] = _quantize_stage(config, work_dir, subset_path, subset_fp, log, progress)
    return outputs


def _quantize_stage(config: PipelineConfig, work_dir: Path, subset_path: Path, subset_fp: str,
                    log: Callable[[str], None], progress: bool) -> Path:
    """The pixel-quantization stage of ``run_pipeline``: GradCAM++ patch store of the subset in
    work_dir/patches, reused while the subset and the quantization options are unchanged."""
    from .pixel import quantize_images

    store_dir = work_dir / "patches"
    record = work_dir / "patches.json"
    options = {key: getattr(config, key) for key in (
        "drop", "quantize_img_size", "quantize_grid", "cam_model", "cam_checkpoint", "feature_seed")}
    quantize_fp = fingerprint_document({"subset": subset_fp, **options})
    recorded_fp = _recorded_fingerprint(record, "patches")
    if recorded_fp == quantize_fp and store_dir.is_dir():
        log(f"quantize: reused {store_dir}")
        return store_dir
    if recorded_fp is not None and store_dir.is_dir():
        shutil.rmtree(store_dir)  # this run's own previous store, made with other options
    started = time.perf_counter()
    outcome = quantize_images(
        config.input, store_dir, subset=subset_path, drop=config.drop,
        img_size=config.quantize_img_size, grid=config.quantize_grid, cam_model=config.cam_model,
        cam_checkpoint=config.cam_checkpoint, batch_size=config.batch_size, device=config.device,
        workers=config.workers, seed=config.feature_seed, progress=progress,
    )
    write_json(record, {"dir": str(store_dir), "stage_fingerprint": quantize_fp})
    log(f"quantize: wrote {store_dir} ({outcome.count} images, {outcome.kept} of "
        f"{outcome.num_patches} patches kept, {outcome.image_bytes} -> {outcome.store_bytes} bytes, "
        f"{time.perf_counter() - started:.1f} s)")
    return store_dir


def _input_fingerprint(input_path: Path) -> str:
    """Fingerprint of the pipeline input, as recorded in the feature sidecar."""
    kind = input_kind(input_path)
    if kind == "image-folder":
        from .features import list_image_folder

        return fingerprint_file_listing(input_path, list_image_folder(input_path).relative_paths)
    if kind == "text":
        return fingerprint_file(input_path)
    from .features import load_image_array

    return fingerprint_arrays(*load_image_array(input_path))


def _recorded_fingerprint(path: Path, stage: str) -> Optional[str]:
    """The stage fingerprint stored in an existing output, or None when there is none."""
    try:
        if stage == "bins":
            return load_bins_file(path).meta.get("stage_fingerprint") if path.is_file() else None
        if stage == "subset":
            return read_manifest(path).get("stage_fingerprint") if path.is_file() else None
        document = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return None
    if stage == "features" and not all(
        (path.parent / name).is_file() for name in document.get("files", {}).values()
    ):
        return None
    return document.get("stage_fingerprint")


# --------------------------------------------------------------------------- info


def describe(path: str | os.PathLike) -> str:
    """Human-readable description of a bins ``.npz``, a subset, a feature set or any ``.npy``."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist")
    if path.is_dir() or path.name == SIDECAR_NAME:
        return _describe_feature_set(open_feature_set(path, use_labels=True))
    if path.suffix == ".npz":
        return _describe_bins(path)
    if path.suffix == ".json":
        path = path.with_suffix(".npy")
    if path.suffix != ".npy":
        raise ValueError(f"{str(path)!r}: expected a .npz, .npy, .json or feature-set directory")
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
    from . import GradEmbedding

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
