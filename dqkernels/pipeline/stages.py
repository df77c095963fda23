"""The DQ pipeline as files: features → bins → subset → export, each stage resumable.

Files written here:

* a **feature set** directory: ``feats.npy`` (N, D) float32 — or ``delta.npy`` (N, C) and
  ``embed.npy`` (N, D) in gradient mode — plus ``labels.npy`` (N,) int64 when labels are known,
  ``items.jsonl`` (image folders: each row's item, its relative path and size in bytes) and the
  sidecar ``features.json`` describing all of them, with the size and sha256 of each file
  (``integrity``);
* a bins ``.npz`` (``BinResult.save``), whose metadata names the feature set it was built from;
* a subset ``.npy`` of sorted row ids with its ``.json`` manifest
  (:func:`dqkernels.formats.subset.write_subset`), which names the bins file and the feature set
  and records the ``.npy``'s size and sha256;
* an export directory holding the chosen samples in the input's own format.

Outputs appear whole or not at all (:mod:`dqkernels.core.atomic`): a feature set is built in a
staging directory and swapped in, each other file is renamed into place, and everything is
checked before anything is written. Each stage records a fingerprint of its inputs and options
(``stage_fingerprint``); :func:`run_pipeline` reuses a stage whose recorded fingerprint matches.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Callable, Optional

import numpy as np

from dqkernels.core.atomic import (
    atomic_output,
    staged_directory,
    sweep_temporaries,
    write_json,
)
from dqkernels.core.errors import InputError
from dqkernels.core.fingerprint import (
    fingerprint_arrays,
    fingerprint_file,
    fingerprint_file_listing,
)
from dqkernels.formats.bins import load_bins_file
from dqkernels.formats.feature_set import (
    DELTA_FILE,
    EMBED_FILE,
    FEATURES_FILE,
    FEATURES_FORMAT,
    ITEMS_FILE,
    LABELS_FILE,
    SIDECAR_NAME,
    open_feature_set,
)
from dqkernels.formats.inputs import input_kind
from dqkernels.formats.items import item_line
from dqkernels.formats.subset import (
    check_subset_destination,
    subset_sources,
    write_subset,
)

# Every name a feature-set directory may hold; a directory holding nothing else is replaced as a
# whole, any other is written into file by file.
FEATURE_SET_NAMES = (FEATURES_FILE, DELTA_FILE, EMBED_FILE, LABELS_FILE, ITEMS_FILE, SIDECAR_NAME)


@dataclass
class _ExtractedFeatures:
    """Arrays and descriptions produced by one feature-extraction pass, before writing.

    arrays: {"features": (N, D)} or {"delta": (N, C), "embed": (N, D)}, float32.
    labels: (N,) int64 or None. items: image-folder ``Item`` (path, size) of each row, or None.
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
    sentence-embedding model ``text_model``. Nothing is written unless extraction succeeds, and
    the set appears whole or not at all (:func:`write_feature_set`).
    Returns the sidecar document that was written.
    """
    input_path = Path(input_path).resolve()
    kind = input_kind(input_path)
    out_dir = Path(out_dir)
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise InputError(f"output directory {str(out_dir)!r} exists and is not a directory")
    if kind == "text":
        if mode != "pooled":
            raise InputError("gradient mode needs labelled images; instruction data supports mode 'pooled'")
        extracted = _text_features(input_path, text_model, batch_size, device, progress)
    else:
        extracted = _image_features(
            input_path, kind, model=model, checkpoint=checkpoint, mode=mode, grad_delta=grad_delta,
            num_classes=num_classes, img_size=img_size, batch_size=batch_size, device=device,
            workers=workers, strict=strict, seed=seed, progress=progress,
        )

    file_names = {"features": FEATURES_FILE, "delta": DELTA_FILE, "embed": EMBED_FILE}
    contents = {file_names[name]: partial(np.save, arr=values) for name, values in extracted.arrays.items()}
    files = {name: file_names[name] for name in extracted.arrays}
    if extracted.labels is not None:
        contents[LABELS_FILE] = partial(np.save, arr=extracted.labels)
        files["labels"] = LABELS_FILE
    if extracted.items is not None:
        contents[ITEMS_FILE] = partial(_write_lines, [item_line(item) for item in extracted.items])
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
    return write_feature_set(out_dir, contents, sidecar)


def _write_lines(lines: list[str], handle: IO[bytes]) -> None:
    handle.write("".join(line + "\n" for line in lines).encode("utf-8"))


def _file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": fingerprint_file(path)}


def _is_feature_set_entry(name: str) -> bool:
    """A feature-set file, or a temporary one that a killed writer left."""
    return name in FEATURE_SET_NAMES or (
        name.endswith(".tmp") and any(name.startswith(f".{known}.") for known in FEATURE_SET_NAMES)
    )


def _holds_only_feature_set(out_dir: Path) -> bool:
    """True when ``out_dir`` is missing or a real directory holding nothing but a feature set."""
    if not os.path.lexists(out_dir):
        return True
    if out_dir.is_symlink() or not out_dir.is_dir():
        return False
    return all(_is_feature_set_entry(entry.name) for entry in os.scandir(out_dir))


def write_feature_set(out_dir: str | os.PathLike, contents: dict[str, Callable[[IO[bytes]], None]],
                      sidecar: dict) -> dict:
    """Write a feature set: every file of ``contents`` ({name: writer of its bytes}), then ``sidecar``.

    The sidecar gets ``integrity``: {name: {"size": bytes, "sha256": "sha256:<hex>"}} of every
    other file, so a reader can tell the files are the ones it describes.

    ``out_dir`` missing or holding only a feature set: the set is built in a staging directory
    and swapped in whole; a kill leaves the previous set or the new one. ``out_dir`` holding
    other files too (``dqk bin`` writes ``bins.npz`` beside the features by default): the
    previous sidecar is removed first, each file is renamed into place, the new sidecar last;
    a kill leaves a directory without sidecar, which no reader takes for a feature set.
    Returns the sidecar that was written.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if _holds_only_feature_set(out_dir):
        with staged_directory(out_dir) as staging:
            for name, write in contents.items():
                _write_new_file(staging / name, write)
            sidecar = {**sidecar, "integrity": {name: _file_record(staging / name) for name in contents}}
            _write_new_file(staging / SIDECAR_NAME, partial(_write_document, sidecar))
        return sidecar

    out_dir.mkdir(exist_ok=True)
    for name in FEATURE_SET_NAMES:
        sweep_temporaries(out_dir / name)
    previous_files = _files_named_by(out_dir / SIDECAR_NAME)
    with contextlib.suppress(FileNotFoundError):
        (out_dir / SIDECAR_NAME).unlink()  # the directory holds no feature set until the new sidecar
    for name, write in contents.items():
        with atomic_output(out_dir / name) as handle:
            write(handle)
    for name in previous_files - contents.keys():
        with contextlib.suppress(FileNotFoundError):
            (out_dir / name).unlink()
    sidecar = {**sidecar, "integrity": {name: _file_record(out_dir / name) for name in contents}}
    write_json(out_dir / SIDECAR_NAME, sidecar)
    return sidecar


def _files_named_by(sidecar_path: Path) -> set[str]:
    """The feature-set files an existing sidecar lists (none when it is missing or unreadable)."""
    try:
        files = json.loads(sidecar_path.read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError, RecursionError):
        return set()
    if not isinstance(files, dict):
        return set()
    return {name for name in files.values() if name in FEATURE_SET_NAMES and name != SIDECAR_NAME}


def _write_document(document: dict, handle: IO[bytes]) -> None:
    handle.write((json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _write_new_file(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Create ``path`` (inside a staging directory) with the bytes ``write`` produces, synced."""
    with open(path, "xb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _text_features(input_path: Path, text_model, batch_size: int, device, progress: bool) -> _ExtractedFeatures:
    """Sentence embeddings of every instruction record, in file order."""
    from dqkernels.features.text import (
        embed_texts,
        read_instruction_records,
        record_text,
    )

    if text_model is None:
        raise InputError("instruction data needs a local sentence-embedding model (--text-model)")
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
    from dqkernels.features.image import (
        build_model,
        extract_image_features,
        list_image_folder,
        load_image_array,
    )

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
    all_items = listing.items if kind == "image-folder" else None
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
        items=[all_items[row] for row in extracted.kept_rows] if kind == "image-folder" else None,
        skipped=[listing.relative_paths[row] for row, _ in extracted.skipped] if kind == "image-folder" else [],
        source=source,
        model=model_meta,
    )

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
    from dqkernels import graphcut_bins

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
    from dqkernels import sample_bins

    bins_path = Path(bins)
    result = load_bins_file(bins_path)
    subset = sample_bins(result, ratio, seed=seed, labels=result.labels, allocation=allocation)
    subset.manifest["bins_file"] = str(bins_path.resolve())
    subset.manifest["features_sidecar"] = result.meta.get("features_sidecar")
    subset.manifest["stage_fingerprint"] = stage_fingerprint
    return subset


def subset_destination(subset, bins: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Path:
    """Where :func:`save_subset` writes ``subset``: ``out``, default ``subset.npy`` beside ``bins``.

    Raises InputError — before anything is written — when the ``.npy`` and its ``.json`` manifest
    would be the same file or a directory, or would overwrite the bins file or the feature set
    the subset was drawn from.
    """
    out = Path(out) if out is not None else Path(bins).parent / "subset.npy"
    return check_subset_destination(out, [bins, *subset_sources(subset.manifest)])


def save_subset(subset, bins: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Path:
    """Save ``subset`` to ``out`` (.npy + .json manifest, :func:`dqkernels.formats.subset.write_subset`);
    default ``subset.npy`` beside ``bins``. A refused destination (:func:`subset_destination`)
    leaves everything as it was."""
    out = subset_destination(subset, bins, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_subset(subset, out, [bins])
