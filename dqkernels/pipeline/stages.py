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
import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Callable, Optional

import numpy as np

from dqkernels.core.atomic import (
    atomic_output,
    commit_point,
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
from dqkernels.pipeline.progress import Reporter, as_reporter

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
    pretrained: bool = False,
    weights_file: Optional[str | os.PathLike] = None,
    random_init: bool = False,
    mode: str = "pooled",
    grad_delta: str = "standard",
    text_model: Optional[str | os.PathLike] = None,
    text_fields: Optional[str] = None,
    num_classes: Optional[int] = None,
    img_size: Optional[int] = None,
    batch_size: int = 64,
    device: Optional[str] = None,
    workers: int = 0,
    strict: bool = False,
    seed: int = 0,
    progress: bool | Reporter = False,
    stage_fingerprint: Optional[str] = None,
) -> dict:
    """Extract features of ``input_path`` into the feature-set directory ``out_dir``.

    Image inputs (a folder or an array file) run through the timm ``model`` with exactly one
    source of weights: ``pretrained`` (timm's pretrained weights; ``weights_file``, a local copy,
    implies it), ``checkpoint`` (local weights loaded strictly) or ``random_init`` (seeded from
    ``seed``; the sidecar then carries :data:`~dqkernels.features.image.RANDOM_INIT_WARNING`).
    Instruction data (.json/.jsonl) runs through the local sentence-embedding model
    ``text_model`` (default: the bundled one when installed), the text of a record taken from
    ``text_fields`` (:func:`dqkernels.features.text.parse_text_fields`; default: auto). Nothing is written unless extraction succeeds, and
    the set appears whole or not at all (:func:`write_feature_set`).
    progress: report progress, or a Reporter (:mod:`dqkernels.pipeline.progress`); the feature
    extractors draw a bar on a terminal and report nothing elsewhere.
    Returns the sidecar document that was written.
    """
    bar = as_reporter(progress).terminal  # the feature extractors take a bool: their own bar
    input_path = Path(input_path).resolve()
    kind = input_kind(input_path)
    out_dir = Path(out_dir)
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise InputError(f"output directory {str(out_dir)!r} exists and is not a directory")
    if kind == "text":
        if mode != "pooled":
            raise InputError("gradient mode needs labelled images; instruction data supports mode 'pooled'")
        extracted = _text_features(input_path, text_model, batch_size, device, bar, text_fields)
    else:
        extracted = _image_features(
            input_path, kind, model=model, checkpoint=checkpoint, pretrained=pretrained,
            weights_file=weights_file, random_init=random_init, mode=mode, grad_delta=grad_delta,
            num_classes=num_classes, img_size=img_size, batch_size=batch_size, device=device,
            workers=workers, strict=strict, seed=seed, progress=bar,
        )
    return write_extracted_features(out_dir, extracted, mode, stage_fingerprint)


def write_extracted_features(out_dir: Path, extracted: _ExtractedFeatures, mode: str,
                             stage_fingerprint: Optional[str], array_files: Optional[dict] = None) -> dict:
    """Write one extraction pass as the feature set ``out_dir`` (:func:`write_feature_set`).

    array_files: {array name: finished ``.npy`` holding that array of ``extracted.arrays``}, moved
    into the set instead of saved again (a shared memory-mapped output); default none.
    Returns the sidecar that was written.
    """
    array_files = array_files or {}
    file_names = {"features": FEATURES_FILE, "delta": DELTA_FILE, "embed": EMBED_FILE}
    contents = {
        file_names[name]: Path(array_files[name]) if name in array_files else partial(np.save, arr=values)
        for name, values in extracted.arrays.items()
    }
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


def write_feature_set(out_dir: str | os.PathLike, contents: dict[str, Callable[[IO[bytes]], None] | Path],
                      sidecar: dict) -> dict:
    """Write a feature set: every file of ``contents`` ({name: writer of its bytes, or the Path of
    a finished file, which is moved in}), then ``sidecar``.

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
                if isinstance(write, Path):
                    _move_file_into_place(write, staging / name)
                else:
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
        if isinstance(write, Path):
            _move_file_into_place(write, out_dir / name)
            continue
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


def _move_file_into_place(source: Path, target: Path) -> None:
    """Put the finished file ``source`` at ``target`` with one rename, synced first (copied through
    a temporary file beside ``target`` when the two are on different file systems)."""
    with open(source, "rb") as handle:
        os.fsync(handle.fileno())
    try:
        commit_point()
        os.replace(source, target)
        commit_point()
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        with atomic_output(target) as handle, open(source, "rb") as data:
            shutil.copyfileobj(data, handle)
        source.unlink()


def _write_document(document: dict, handle: IO[bytes]) -> None:
    handle.write((json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _write_new_file(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Create ``path`` (inside a staging directory) with the bytes ``write`` produces, synced."""
    with open(path, "xb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _text_features(input_path: Path, text_model, batch_size: int, device, progress: bool,
                   text_fields: Optional[str] = None) -> _ExtractedFeatures:
    """Sentence embeddings of every instruction record, in file order."""
    from dqkernels.features.text import (
        embed_texts,
        parse_text_fields,
        read_instruction_records,
        record_texts,
        resolve_text_model,
    )

    fields = parse_text_fields(text_fields)
    text_model = resolve_text_model(text_model)
    instructions = read_instruction_records(input_path, fields)
    embeddings = embed_texts(
        record_texts(instructions.records, fields, str(input_path)),
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
    model = {"model": "sentence-transformers", "checkpoint": str(Path(text_model).resolve()),
             "text_fields": "auto" if fields is None else ",".join(fields)}
    return _ExtractedFeatures({"features": embeddings}, None, None, [], source, model)


def _image_features(input_path: Path, kind: str, *, model: str, checkpoint, num_classes, seed: int,
                    workers: int, pretrained: bool = False, weights_file=None, random_init: bool = False,
                    text_fields: Optional[str] = None, extract_images: Optional[Callable] = None,
                    **extraction_options) -> _ExtractedFeatures:
    """timm features of an image folder or image array (see ``extract_image_features``).

    text_fields: unused (text only), accepted so that image and text inputs share one call shape.
    extract_images: what runs the model over the images, called as ``extract_image_features``
    and returning the same; default ``extract_image_features`` (torchrun jobs pass one that
    splits the images among the ranks).
    """
    from dqkernels.features.image import (
        RANDOM_INIT_WARNING,
        build_model,
        extract_image_features,
        list_image_folder,
        load_image_array,
        weights_source,
    )

    weights = weights_source(pretrained, weights_file, checkpoint, random_init)
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
    if num_classes is None and weights == "random-init":
        num_classes = data_classes
    network = build_model(model, checkpoint=checkpoint, num_classes=num_classes, seed=seed,
                          pretrained=weights == "pretrained", weights_file=weights_file)
    extracted = (extract_images or extract_image_features)(
        network, labels=all_labels, num_workers=workers, **image_inputs, **extraction_options
    )
    mode = extraction_options["mode"]
    all_items = listing.items if kind == "image-folder" else None
    arrays = {"features": extracted.pooled} if mode == "pooled" else {
        "delta": extracted.delta, "embed": extracted.embed
    }
    weights_path = checkpoint if checkpoint is not None else weights_file
    model_meta = {
        "model": model,
        "weights": weights,
        "random_init": weights == "random-init",
        "checkpoint": str(Path(weights_path).resolve()) if weights_path is not None else (
            "random-init" if weights == "random-init" else "pretrained"),
        "checkpoint_sha256": fingerprint_file(weights_path) if weights_path is not None else None,
        "pretrained": _pretrained_record(network) if weights == "pretrained" else None,
        "seed": seed if weights == "random-init" else None,
        "num_classes": int(network.num_classes),
        "img_size": int(extraction_options["img_size"] or network.pretrained_cfg["input_size"][-1]),
    }
    if mode == "gradient":
        model_meta["grad_delta"] = extraction_options["grad_delta"]
    if weights == "random-init":
        model_meta["warning"] = RANDOM_INIT_WARNING
    return _ExtractedFeatures(
        arrays=arrays,
        labels=all_labels[extracted.kept_rows] if all_labels is not None else None,
        items=[all_items[row] for row in extracted.kept_rows] if kind == "image-folder" else None,
        skipped=[listing.relative_paths[row] for row, _ in extracted.skipped] if kind == "image-folder" else [],
        source=source,
        model=model_meta,
    )

def _pretrained_record(network) -> dict:
    """What timm's pretrained config says about the weights a model was given."""
    config = network.pretrained_cfg
    return {key: config.get(key) for key in ("architecture", "tag", "hf_hub_id", "file")}

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
    progress: bool | Reporter = False,
) -> BinsOutcome:
    """Run ``dqkernels.graphcut_bins`` on a feature set and save the result.

    out: the ``.npz`` to write; default ``bins.npz`` beside the features (inside a feature-set
    directory). The saved metadata also names the features (``features_path``) and their
    sidecar (``features_sidecar``, None for bare features), which ``dqk sample --export`` follows.
    progress: report the greedy steps (:mod:`dqkernels.pipeline.progress`), or a Reporter.
    """
    from dqkernels import graphcut_bins

    feature_set = open_feature_set(features, labels=labels, use_labels=use_labels)
    if out is None:
        base = feature_set.path if feature_set.path.is_dir() else feature_set.path.parent
        out = base / "bins.npz"
    started = time.perf_counter()
    reporter = as_reporter(progress)
    with reporter.step("bin", unit="greedy steps") as steps:
        result = graphcut_bins(
            feature_set.features,
            bins=bins,
            labels=feature_set.labels,
            metric=metric,
            lam=lam,
            device=device,
            backend=backend,
            sizes=sizes,
            progress=steps if reporter.enabled else None,
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


SAMPLING_METHODS = ("dq", "random")


def draw_subset(
    bins: str | os.PathLike,
    ratio: float,
    *,
    seed: int = 0,
    allocation: str = "exact",
    method: str = "dq",
    stage_fingerprint: Optional[str] = None,
):
    """Draw a subset from a saved bins file and return the SubsetResult (unsaved).

    method: "dq" — ``dqkernels.sample_bins`` over the bins (docs/method.md §3); "random" — the
    baseline for A/B runs: the same sampler and ``allocation`` with the whole set as one bin, so
    with labels it is stratified by class (class totals rounded as for DQ) and uniform within
    each class, blind to the bins. Either way the manifest's ``bins`` and ``cells`` count, per
    bin of the file (and class), the samples there and how many of them were selected, and
    ``method`` records the method. The manifest also names the bins file and the feature set
    the bins were made from (``features_sidecar``, None for bare features).
    """
    from dqkernels import sample_bins

    if not isinstance(method, str) or method not in SAMPLING_METHODS:
        raise InputError(f"method must be one of {', '.join(map(repr, SAMPLING_METHODS))}, got {method!r}")
    bins_path = Path(bins)
    result = load_bins_file(bins_path)
    if method == "dq":
        subset = sample_bins(result, ratio, seed=seed, labels=result.labels, allocation=allocation)
    else:
        subset = sample_bins(_one_bin(result), ratio, seed=seed, labels=result.labels, allocation=allocation)
        subset.manifest.update(_selected_per_bin(result, subset.indices))
    subset.manifest["method"] = method
    subset.manifest["bins_file"] = str(bins_path.resolve())
    subset.manifest["features_sidecar"] = result.meta.get("features_sidecar")
    subset.manifest["stage_fingerprint"] = stage_fingerprint
    return subset


def _one_bin(result):
    """``result`` with all its samples in a single bin (ids ascending), same labels and metadata."""
    from dqkernels import BinResult

    count = len(result.order)
    return BinResult(
        order=np.arange(count, dtype=np.int64),
        bin_offsets=np.array([0, count], dtype=np.int64),
        labels=result.labels,
        backend=result.backend,
        form=result.form,
        meta=dict(result.meta),
    )


def _selected_per_bin(result, indices: np.ndarray) -> dict:
    """The manifest's ``cells`` and ``bins`` of ``indices`` (sorted int64 ids) over the bins of
    ``result``: per (bin, class) cell (class None without labels) and per bin, the samples there
    (``count``) and how many of them ``indices`` holds (``selected``)."""
    bin_of = result.bin_of
    chosen = np.zeros(len(bin_of), dtype=bool)
    chosen[indices] = True
    if result.labels is None:
        classes, class_index = [None], np.zeros(len(bin_of), dtype=np.int64)
    else:
        values, class_index = np.unique(result.labels, return_inverse=True)
        classes = [int(value) for value in values]
    cell_of = bin_of * len(classes) + class_index
    shape = (result.n_bins, len(classes))
    counts = np.bincount(cell_of, minlength=shape[0] * shape[1]).reshape(shape)
    selected = np.bincount(cell_of[chosen], minlength=shape[0] * shape[1]).reshape(shape)
    return {
        "cells": [
            {"bin": b, "class": cls, "count": int(counts[b, j]), "selected": int(selected[b, j])}
            for b in range(shape[0])
            for j, cls in enumerate(classes)
        ],
        "bins": [
            {"bin": b, "count": int(c), "selected": int(k)}
            for b, (c, k) in enumerate(zip(counts.sum(axis=1), selected.sum(axis=1)))
        ],
    }


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
