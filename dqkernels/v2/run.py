"""DQ-V2 from files (docs/method.md §5): Tobias images enlarge the pool, which is binned and sampled.

    dqk v2 --images data/train --mix 0.5 --bins 10 --ratio 0.1 -o v2_out

:func:`run_v2` does the work; ``v2_command`` is its ``dqk v2`` command. The pool is the N
original images (ids 0..N−1, input order) followed by T = round(mix·N) Tobias images (ids
N..N+T−1, recipe order). Everything is written into a staging directory beside ``out_dir`` that
replaces it in one rename at the end, so a failed run leaves nothing behind. ``out_dir`` holds:

* ``masks.npz`` — ``masks`` (N, g, g) bool foreground masks of the originals and ``meta`` (JSON:
  grid, mask model, input fingerprint); pass it back with ``masks=`` to skip recomputing them;
* ``recipes.npz`` — ``base``, ``partner`` (−1: no swap), ``key``: (T,) int64 each, the recipe of
  every Tobias image (regenerate with :func:`dqkernels.v2.tobias.render`), and ``meta`` (JSON);
* ``pool_features.npy`` (N+T, D) float32 and ``pool_labels.npy`` (N+T,) int64 (when labelled);
* ``bins.npz`` and ``subset.npy`` + ``subset.json``: bins and the sampled pool ids (docs/method.md §1–3);
* ``subset/`` — the chosen samples in the input's format: an image folder gets the chosen
  originals copied to ``subset/<class>/...`` and the chosen Tobias images as
  ``subset/<class>/tobias_<pool id>.png``; an image array gets ``subset/<input file name>`` with
  the chosen images (and labels) in pool-id order;
* ``subset_items.jsonl`` — one line per exported sample: pool id, kind, label, where it is in
  ``subset/`` and where it came from (a Tobias image: its recipe);
* ``v2.json`` — options, pool and subset counts, and per (bin, class) cell the counts of
  originals and Tobias images in the pool and in the subset.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dqkernels import pipeline
from dqkernels.core.atomic import (
    atomic_output,
    save_npy,
    staged_directory,
    write_json,
    write_lines,
)
from dqkernels.core.errors import InputError
from dqkernels.core.fingerprint import (
    fingerprint_arrays,
    fingerprint_file,
    fingerprint_file_listing,
)
from dqkernels.formats.inputs import input_kind
from dqkernels.graphcut.api import METRICS
from dqkernels.pipeline.progress import Reporter, as_reporter
from dqkernels.sampling.sample import ALLOCATIONS
from dqkernels.v2 import tobias

V2_FORMAT = "dqkernels.v2"
MASK_MODELS = ("random", "early")
CHUNK_IMAGES = 256


# --------------------------------------------------------------------------- reading images


def _group_by_size(sizes: list) -> dict:
    """{(H, W): [positions]} of a list of (H, W) sizes, in first-seen order."""
    groups: dict = {}
    for position, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(position)
    return groups


def _resize_all(images: list, height: int, width: int):
    """List of (C, h_i, w_i) tensors → one (B, C, height, width) tensor, one resize per distinct size."""
    import torch

    out = torch.empty((len(images), images[0].shape[0], height, width), dtype=images[0].dtype)
    for positions in _group_by_size([image.shape[-2:] for image in images]).values():
        out[positions] = tobias.resize_images(torch.stack([images[p] for p in positions]), height, width)
    return out


def _resize_back(batch, sizes: list) -> list:
    """(B, C, S, S) tensor → list of (C, H_i, W_i) tensors, one resize per distinct size."""
    images = [None] * len(sizes)
    for (height, width), positions in _group_by_size(sizes).items():
        for position, image in zip(positions, tobias.resize_images(batch[positions], height, width)):
            images[position] = image
    return images


class _ImageSource:
    """The input images: an image folder or an (N, H, W[, C]) uint8/float array, read on demand.

    count: N. labels: (N,) int64, or None for an array without labels. channels: 3 for a
    folder (decoded as RGB), else the array's channel count. fingerprint: of the listing or
    of the array bytes (as ``dqk features`` records it).
    """

    def __init__(self, path: Path):
        from dqkernels.features.image import list_image_folder, load_image_array

        self.path = path
        self.kind = input_kind(path)
        if self.kind == "image-folder":
            self.listing = list_image_folder(path)
            self.array = None
            self.labels = self.listing.labels
            self.count = len(self.listing.relative_paths)
            self.channels = 3
            self.fingerprint = fingerprint_file_listing(path, self.listing.relative_paths)
        elif self.kind == "image-array":
            self.listing = None
            self.array, self.labels = load_image_array(path)
            self.count = int(self.array.shape[0])
            self.channels = 1 if self.array.ndim == 3 else int(self.array.shape[3])
            self.fingerprint = fingerprint_arrays(self.array, self.labels)
        else:
            raise InputError(f"dqk v2 needs images (an image folder or a .npy/.npz array), not {self.kind} data")

    def read(self, rows) -> list:
        """Images at ``rows`` ((B,) int64) at their own size: list of (C, H, W) tensors."""
        import torch
        from PIL import Image

        if self.array is not None:
            chunk = np.array(self.array[np.asarray(rows)])  # a writable copy, also of a memmap
            chunk = chunk[..., None] if chunk.ndim == 3 else chunk
            return list(torch.from_numpy(chunk).permute(0, 3, 1, 2))
        images = []
        for row in rows:
            file = self.path / self.listing.relative_paths[row]
            try:
                with Image.open(file) as image:
                    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                raise InputError(f"cannot read image {str(file)!r}: {type(error).__name__}: {error}") from None
            images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
        return images

    def as_layout(self, image) -> np.ndarray:
        """A (C, H, W) tensor as one row of the input array: (H, W) or (H, W, C)."""
        pixels = image.permute(1, 2, 0).numpy()
        return pixels[..., 0] if self.array is not None and self.array.ndim == 3 else pixels


class _WorkingImages:
    """The input images resized to ``side`` square on demand: ``view[rows]`` is (B, C, side, side)."""

    def __init__(self, source: _ImageSource, side: int):
        self.source = source
        self.side = side

    def __len__(self) -> int:
        return self.source.count

    def __getitem__(self, rows):
        return _resize_all(self.source.read(np.asarray(rows)), self.side, self.side)


def _render_tobias(source: _ImageSource, recipes: tobias.TobiasRecipes, masks: np.ndarray, side: int) -> list:
    """Tobias images of ``recipes`` at their base's own size: list of (C, H, W) tensors.

    The same operations as :func:`dqkernels.v2.tobias.render`, for images of any sizes read from
    ``source``: resize to ``side`` square, swap, resize back; a recipe without partner gives its
    base image exactly.
    """
    bases = source.read(recipes.base)
    partner_ids = np.where(recipes.swapped, recipes.partner, recipes.base)
    swapped = tobias.swap_backgrounds(
        _resize_all(bases, side, side), masks[recipes.base],
        _WorkingImages(source, side)[partner_ids], masks[partner_ids],
        recipes.key, recipes.swapped,
    )
    back = _resize_back(swapped, [image.shape[-2:] for image in bases])
    return [image if keep else base for image, base, keep in zip(back, bases, recipes.swapped)]


# --------------------------------------------------------------------------- pool features


def _pooled_features(network, images: list, *, img_size, batch_size, device) -> np.ndarray:
    """(B, D) float32 pooled features of a list of (C, H, W) tensors, one pass per distinct size."""
    from dqkernels.features.image import extract_image_features

    rows = [None] * len(images)
    for positions in _group_by_size([image.shape[-2:] for image in images]).values():
        batch = np.stack([images[p].permute(1, 2, 0).numpy() for p in positions])
        pooled = extract_image_features(
            network, images=batch, img_size=img_size, batch_size=batch_size, device=device
        ).pooled
        for position, values in zip(positions, pooled):
            rows[position] = values
    return np.stack(rows)


# --------------------------------------------------------------------------- masks


def _load_stored_masks(path: Path, source: _ImageSource, grid: int) -> tuple[np.ndarray, dict]:
    """Masks and their metadata from a ``masks.npz`` of an earlier run on the same input."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array, not the masks archive")
        with archive:
            masks = archive["masks"]
            meta = json.loads(str(archive["meta"]))
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
    except (OSError, KeyError, ValueError, EOFError, RecursionError, zipfile.BadZipFile) as error:
        raise InputError(f"{str(path)!r} is not a masks file written by dqk v2 ({error})") from None
    if meta.get("input_fingerprint") != source.fingerprint:
        raise InputError(f"masks {str(path)!r} were computed for other images than {str(source.path)!r}")
    if masks.dtype != bool or masks.shape != (source.count, grid, grid):
        raise InputError(
            f"masks {str(path)!r} have shape {masks.shape} {masks.dtype}; expected "
            f"({source.count}, {grid}, {grid}) bool for --grid {grid}"
        )
    return masks, dict(meta, stored=str(path.resolve()))


def _compute_masks(source: _ImageSource, *, grid: int, side: int, mask_model: str, mask_checkpoint,
                   mask_epochs: int, mask_px: int, batch_size: int, seed: int, device) -> tuple[np.ndarray, dict]:
    """Foreground masks of every original (computed from its ``side``-square resize) and their metadata."""
    from dqkernels.features.image import build_model

    working = _WorkingImages(source, side)
    meta = {"model": tobias.MASK_MODEL_NAME, "kind": mask_model, "seed": seed, "input_px": mask_px}
    if mask_checkpoint is not None:
        model = build_model(tobias.MASK_MODEL_NAME, checkpoint=mask_checkpoint)
        meta.update(kind="checkpoint", checkpoint=str(Path(mask_checkpoint).resolve()),
                    checkpoint_sha256=fingerprint_file(mask_checkpoint))
    elif mask_model == "early":
        model = tobias.train_mask_model(
            working, source.labels, epochs=mask_epochs, batch_size=batch_size, seed=seed,
            input_px=mask_px, device=device,
        )
        meta.update(epochs=mask_epochs, optimizer=tobias.EARLY_OPTIMIZER, lr=tobias.EARLY_LR,
                    weight_decay=tobias.EARLY_WEIGHT_DECAY)
    else:
        model = tobias.random_mask_model(seed)
    masks = tobias.object_masks(working, model, grid, input_px=mask_px, batch_size=batch_size, device=device)
    return masks, meta


# --------------------------------------------------------------------------- the run


@dataclass
class V2Outcome:
    """What :func:`run_v2` wrote. out_dir: the output directory; summary: the ``v2.json`` document."""

    out_dir: Path
    summary: dict


def _check_options(mix, bins, ratio, grid, cell_px, bg_prob, mask_model, mask_checkpoint, mask_epochs,
                   mask_px, batch_size, metric, allocation, seed) -> None:
    """Raise ValueError naming the first bad option, before any work is done."""
    if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not (mix >= 0 and math.isfinite(mix)):
        raise InputError(f"mix must be a finite number >= 0, got {mix!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise InputError(f"ratio must be in (0, 1], got {ratio!r}")
    if isinstance(bg_prob, bool) or not isinstance(bg_prob, (int, float)) or not 0 <= bg_prob <= 1:
        raise InputError(f"bg_prob must be in [0, 1], got {bg_prob!r}")
    integers = [("bins", bins, 1), ("grid", grid, 1), ("mask_epochs", mask_epochs, 1),
                ("mask_px", mask_px, 32), ("batch_size", batch_size, 1), ("seed", seed, 0)]
    if cell_px is not None:
        integers.append(("cell_px", cell_px, 1))
    for name, value, low in integers:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if mask_model not in MASK_MODELS:
        raise InputError(f"mask_model must be one of {', '.join(MASK_MODELS)}, got {mask_model!r}")
    if mask_checkpoint is not None and mask_model == "early":
        raise InputError("a mask checkpoint and mask_model 'early' exclude each other")
    if metric not in METRICS:
        raise InputError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if allocation not in ALLOCATIONS:
        raise InputError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")


def run_v2(
    images: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    mix: float = 0.5,
    bins: int = 10,
    ratio: float = 0.1,
    grid: int = tobias.DEFAULT_GRID,
    cell_px: Optional[int] = None,
    bg_prob: float = 1.0,
    mask_model: str = "random",
    mask_checkpoint: Optional[str | os.PathLike] = None,
    mask_epochs: int = 3,
    mask_px: int = tobias.MASK_INPUT_PX,
    masks: Optional[str | os.PathLike] = None,
    model: str = "resnet18",
    checkpoint: Optional[str | os.PathLike] = None,
    img_size: Optional[int] = None,
    batch_size: int = 64,
    device: Optional[str] = None,
    metric: str = "cosine",
    allocation: str = "exact",
    seed: int = 0,
    log: Callable[[str], None] = print,
    progress: bool | Reporter = False,
) -> V2Outcome:
    """DQ-V2 on an image folder or image array: Tobias pool → features → bins → subset → export.

    images: an ImageFolder tree or a .npy/.npz (N, H, W[, C]) array (a .npz may hold labels).
    out_dir: a new (missing or empty) directory; see the module docstring for what it holds.
    mix: Tobias images per original (T = round(mix·N); 0 gives plain DQ without MAE).
    bins / ratio / metric / allocation: as ``dqk bin`` and ``dqk sample``; bins are per class
        when the images have labels.
    grid, cell_px, bg_prob: the Tobias swap (:mod:`dqkernels.v2.tobias`).
    mask_model: "random" (seeded random ResNet-50) or "early" (that ResNet-50 trained
        ``mask_epochs`` epochs on the images; needs labels); mask_checkpoint: local ResNet-50
        weights to use instead; masks: a ``masks.npz`` of an earlier run on the same images (and
        grid) to reuse. mask_px: input side of the mask model (224 in Tobias).
    model / checkpoint / img_size / batch_size / device: the feature extractor, as ``dqk features``.
    seed: drives the base and recipe draws (two independent streams derived from it), the random
        initialisations and the sampling.
    log: where the summary line of each step goes. progress: report the long steps (features,
        bins, export; :mod:`dqkernels.pipeline.progress`), or a Reporter.
    """
    from dqkernels.features.image import build_model, check_model_name, resolve_device

    _check_options(mix, bins, ratio, grid, cell_px, bg_prob, mask_model, mask_checkpoint, mask_epochs,
                   mask_px, batch_size, metric, allocation, seed)
    device = str(resolve_device(device))
    out_dir = Path(out_dir)
    pipeline.check_export_destination(out_dir)
    check_model_name(model)
    source = _ImageSource(Path(images).resolve())
    if mask_model == "early" and masks is None and source.labels is None:
        raise InputError("mask_model 'early' trains on labels; these images have none")
    cell_px = cell_px or tobias.default_cell_px(grid)
    side = grid * cell_px
    started = time.perf_counter()
    reporter = as_reporter(progress)

    if masks is not None:
        object_masks, mask_meta = _load_stored_masks(Path(masks), source, grid)
    else:
        reporter.log(f"masks: computing the object masks of {source.count} images ({mask_model} model)")
        object_masks, mask_meta = _compute_masks(
            source, grid=grid, side=side, mask_model=mask_model, mask_checkpoint=mask_checkpoint,
            mask_epochs=mask_epochs, mask_px=mask_px, batch_size=batch_size, seed=seed, device=device,
        )
    mask_meta.update(grid=grid, count=source.count, input_fingerprint=source.fingerprint)
    log(f"masks: {source.count} images, {grid}x{grid} grid, {mask_meta['kind']} {tobias.MASK_MODEL_NAME}")

    bases_seed, recipes_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    recipes = tobias.draw_recipes(
        tobias.choose_bases(source.count, mix, bases_seed), source.count, bg_prob=bg_prob, seed=recipes_seed
    )
    n_originals, n_tobias = source.count, len(recipes)
    pool_labels = (
        np.concatenate([source.labels, source.labels[recipes.base]]) if source.labels is not None else None
    )

    # Without a checkpoint the classifier is sized to the data's classes, as `dqk features` sizes
    # it, so the random initialisation from SEED is the same as there.
    data_classes = int(source.labels.max()) + 1 if source.labels is not None else None
    network = build_model(model, checkpoint=checkpoint, num_classes=None if checkpoint else data_classes, seed=seed)
    feature_options = {"img_size": img_size, "batch_size": batch_size, "device": device}
    feature_chunks = []
    with reporter.step("features", n_originals + n_tobias, "images") as extracted:
        for start in range(0, n_originals, CHUNK_IMAGES):
            rows = np.arange(start, min(start + CHUNK_IMAGES, n_originals))
            feature_chunks.append(_pooled_features(network, source.read(rows), **feature_options))
            extracted.update(len(rows))
        for start in range(0, n_tobias, CHUNK_IMAGES):
            chunk = recipes.take(np.arange(start, min(start + CHUNK_IMAGES, n_tobias)))
            feature_chunks.append(
                _pooled_features(network, _render_tobias(source, chunk, object_masks, side), **feature_options)
            )
            extracted.update(len(chunk))
    pool_features = np.concatenate(feature_chunks)
    log(f"features: {n_originals} originals + {n_tobias} Tobias images ({int(recipes.swapped.sum())} swapped), "
        f"{pool_features.shape[1]} dims, {model}")

    from dqkernels import graphcut_bins, sample_bins

    with reporter.step("bin", unit="greedy steps") as steps:
        bin_result = graphcut_bins(pool_features, bins=bins, labels=pool_labels, metric=metric,
                                   progress=steps if reporter.enabled else None)
    subset = sample_bins(bin_result, ratio, seed=seed, allocation=allocation)
    chosen = subset.indices
    log(f"bins: {bins}{' per class' if pool_labels is not None else ''}; "
        f"sample: kept {chosen.shape[0]} of {n_originals + n_tobias}")

    options = {
        "mix": mix, "bins": bins, "ratio": ratio, "grid": grid, "cell_px": cell_px, "bg_prob": bg_prob,
        "mask_model": mask_meta["kind"], "mask_epochs": mask_epochs, "mask_px": mask_px, "model": model,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None, "img_size": img_size,
        "metric": metric, "allocation": allocation, "seed": seed,
        "bases_seed": bases_seed, "recipes_seed": recipes_seed,
    }
    summary = {
        "format": V2_FORMAT,
        "input": {"path": str(source.path), "kind": source.kind, "count": source.count,
                  "fingerprint": source.fingerprint},
        "options": options,
        "pool": {"originals": n_originals, "tobias": n_tobias, "swapped": int(recipes.swapped.sum())},
        "subset": {"selected": int(chosen.shape[0]), "originals": int((chosen < n_originals).sum()),
                   "tobias": int((chosen >= n_originals).sum())},
        "cells": _cell_counts(bin_result, pool_labels, chosen, n_originals),
        "seconds": round(time.perf_counter() - started, 2),
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged_directory(out_dir) as staging:  # an empty directory there is replaced
        _save_npz(staging / "masks.npz", masks=object_masks, meta=mask_meta)
        _save_npz(staging / "recipes.npz", base=recipes.base, partner=recipes.partner, key=recipes.key,
                  meta={"grid": grid, "cell_px": cell_px, "bg_prob": bg_prob, "seed": recipes_seed,
                        "pool_offset": n_originals})
        save_npy(staging / "pool_features.npy", pool_features)
        if pool_labels is not None:
            save_npy(staging / "pool_labels.npy", pool_labels)
        bin_result.save(staging / "bins.npz")
        subset.save(staging / "subset.npy")
        with reporter.step("export", len(chosen), "samples") as exported:
            items = _export(source, recipes, object_masks, side, chosen, staging / "subset", exported)
        write_lines(staging / "subset_items.jsonl", (json.dumps(item) for item in items))
        write_json(staging / "v2.json", summary)
    return V2Outcome(out_dir, summary)


def _save_npz(path: Path, meta: dict, **arrays) -> None:
    """``np.savez`` of ``arrays`` plus ``meta`` as a JSON string, written atomically."""
    with atomic_output(path) as handle:
        np.savez(handle, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)


def _cell_counts(bin_result, pool_labels, chosen: np.ndarray, n_originals: int) -> list:
    """Per (bin, class) cell — class None without labels —: pool and subset counts of originals and Tobias images."""
    selected = np.zeros(len(bin_result.order), dtype=bool)
    selected[chosen] = True
    classes = np.unique(pool_labels) if pool_labels is not None else [None]
    cells = []
    for bin_id, ids in enumerate(bin_result.bins):
        for cls in classes:
            cell = ids if cls is None else ids[pool_labels[ids] == cls]
            original = cell < n_originals
            cells.append({
                "bin": bin_id, "class": None if cls is None else int(cls),
                "originals": int(original.sum()), "tobias": int((~original).sum()),
                "selected_originals": int(selected[cell[original]].sum()),
                "selected_tobias": int(selected[cell[~original]].sum()),
            })
    return cells


def _export(source: _ImageSource, recipes: tobias.TobiasRecipes, masks: np.ndarray, side: int,
            chosen: np.ndarray, dest: Path, progress: Callable[[int], None] = lambda done: None) -> list:
    """Write the chosen pool samples into ``dest`` (input format); returns one item record per sample.

    Tobias images are regenerated from their recipes here. progress(done): told the samples
    written so far.
    """
    from PIL import Image

    n_originals = source.count
    original_rows = chosen[chosen < n_originals]
    tobias_rows = chosen[chosen >= n_originals] - n_originals
    tobias_images = []
    for start in range(0, len(tobias_rows), CHUNK_IMAGES):
        chunk = recipes.take(tobias_rows[start : start + CHUNK_IMAGES])
        tobias_images.extend(_render_tobias(source, chunk, masks, side))

    def label_of(row: int):
        return int(source.labels[row]) if source.labels is not None else None

    def recipe_of(row: int) -> dict:
        return {"base": int(recipes.base[row]), "partner": int(recipes.partner[row]), "key": int(recipes.key[row])}

    dest.mkdir()
    items = []
    if source.kind == "image-folder":
        paths = source.listing.relative_paths
        for row in original_rows:
            target = dest / paths[row]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source.path / paths[row], target)
            items.append({"pool_id": int(row), "kind": "original", "label": label_of(row),
                          "file": paths[row], "source": paths[row]})
            progress(len(items))
        for row, image in zip(tobias_rows, tobias_images):
            pool_id = int(row) + n_originals
            base = int(recipes.base[row])
            relative = f"{source.listing.class_names[source.labels[base]]}/tobias_{pool_id:07d}.png"
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(dest / relative)
            partner = int(recipes.partner[row])
            items.append({"pool_id": pool_id, "kind": "tobias", "label": label_of(base), "file": relative,
                          **recipe_of(row), "base_file": paths[base],
                          "partner_file": paths[partner] if partner != tobias.NO_PARTNER else None})
            progress(len(items))
        return items

    exported = [np.asarray(source.array[row]) for row in original_rows]
    exported += [source.as_layout(image).astype(source.array.dtype, copy=False) for image in tobias_images]
    labels = [label_of(row) for row in original_rows] + [label_of(int(recipes.base[row])) for row in tobias_rows]
    for position, row in enumerate(original_rows):
        items.append({"pool_id": int(row), "kind": "original", "label": labels[position],
                      "row": position, "source": int(row)})
    for position, row in enumerate(tobias_rows, start=len(original_rows)):
        items.append({"pool_id": int(row) + n_originals, "kind": "tobias", "label": labels[position],
                      "row": position, **recipe_of(row)})
    images = np.stack(exported) if exported else np.zeros((0, *source.array.shape[1:]), source.array.dtype)
    if source.path.suffix == ".npz":
        arrays = {"images": images}
        if source.labels is not None:
            arrays["labels"] = np.asarray(labels, dtype=np.int64)
        np.savez(dest / source.path.name, **arrays)
    else:
        np.save(dest / source.path.name, images)
    progress(len(items))
    return items


# --------------------------------------------------------------------------- the command
