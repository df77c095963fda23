"""Uniform sampling of a keep ratio from every bin (docs/method.md §3)."""

from __future__ import annotations

import io
import json
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dqkernels.core.atomic import atomic_output
from dqkernels.core.errors import InputError, InputTypeError
from dqkernels.core.validate import as_choice, as_labels, as_ratio
from dqkernels.graphcut.api import BinResult
from dqkernels.sampling.rounding import controlled_rounding, rational_ratio

ALLOCATIONS = ("exact", "official")


@dataclass
class SubsetResult:
    """A selected subset. indices: (K,) int64 sorted sample ids; manifest: ratio, seed,
    allocation, n_samples, n_selected, and count/selected per cell, per bin and per class."""

    indices: np.ndarray
    manifest: dict

    def save(self, path) -> None:
        """Write ``path`` (.npy of indices) and its manifest ``path`` with suffix .json.

        The manifest records the ``.npy``'s ``size`` and ``sha256`` (``subset_file``) and is
        renamed into place first, the ``.npy`` second: a run killed between the two leaves a pair
        that ``dqkernels.formats.subset`` refuses, never ids read as another run's subset. Both
        paths are checked before anything is written (``dqkernels.formats.subset.write_subset``
        also keeps them off the subset's inputs).
        """
        import hashlib

        path = Path(path)
        manifest_file = path.with_suffix(".json")
        if manifest_file == path:
            raise InputError(f"subset output {str(path)!r} must not end in .json: its manifest is written to that name")
        for target in (path, manifest_file):
            if target.is_dir():
                raise InputError(f"subset output {str(target)!r} is a directory")
        buffer = io.BytesIO()
        np.save(buffer, self.indices)
        payload = buffer.getvalue()
        record = {"size": len(payload), "sha256": "sha256:" + hashlib.sha256(payload).hexdigest()}
        with atomic_output(manifest_file, "w") as handle:
            json.dump({**self.manifest, "subset_file": record}, handle, indent=1, sort_keys=True)
        with atomic_output(path) as handle:
            handle.write(payload)


def _as_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InputTypeError(f"seed must be a non-negative integer, got {seed!r}")
    if seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _cell_table(result: BinResult, labels):
    """The (bin, class) cells. labels: (M,) int64 or None (global mode: one class).

    Returns classes (C,) int64 (empty in global mode), counts (R, C) int64, and the cells' ids:
    ``grouped`` (M,) int64 sorted by (bin, class, id) with ``offsets`` (R·C + 1,) int64, so cell
    (b, c) holds grouped[offsets[b·C + c] : offsets[b·C + c + 1]], ascending.
    """
    n_bins = result.n_bins
    if labels is None:
        classes = np.zeros(0, dtype=np.int64)
        class_index = np.zeros(len(result.order), dtype=np.int64)
        n_classes = 1
    else:
        classes, class_index = np.unique(labels, return_inverse=True)
        n_classes = len(classes)
    cell_of = result.bin_of * n_classes + class_index.astype(np.int64)
    grouped = np.argsort(cell_of, kind="stable").astype(np.int64)
    counts = np.bincount(cell_of, minlength=n_bins * n_classes).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return classes.astype(np.int64), counts.reshape(n_bins, n_classes), grouped, offsets


def _official_counts(counts: np.ndarray, ratio: float) -> np.ndarray:
    """round(ratio·count) per cell, Python rounding (half to even) of the float product."""
    flat = [round(ratio * int(c)) for c in counts.ravel()]
    return np.array(flat, dtype=np.int64).reshape(counts.shape)


def _name_list(names) -> str:
    names = [str(n) for n in names]
    return ", ".join(names) if len(names) <= 20 else ", ".join(names[:20]) + ", …"


def _warn_unrepresented(counts, take, classes, ratio: float, allocation: str) -> None:
    """One warning naming the non-empty bins (and classes) that get no sample; for ``official``
    in per-class mode also the number of non-empty cells that get none.

    counts, take: (R, C) int64; classes: (C,) int64 labels, empty in global mode.
    """
    parts = []
    for axis, kind, names in ((1, "bins", np.arange(counts.shape[0])), (0, "classes", classes)):
        if kind == "classes" and len(classes) == 0:
            continue
        has_samples = counts.sum(axis=axis) > 0
        empty = np.flatnonzero(has_samples & (take.sum(axis=axis) == 0))
        if len(empty):
            listed = _name_list(names[empty])
            parts.append(f"{kind} {listed} ({len(empty)} of {int(has_samples.sum())} non-empty)")
    if allocation == "official" and len(classes):  # in global mode the cells are the bins
        starved = int(((counts > 0) & (take == 0)).sum())
        if starved:
            parts.append(f"{starved} of {int((counts > 0).sum())} non-empty (bin, class) cells")
    if parts:
        warnings.warn(
            f"allocation={allocation!r} at ratio {ratio} gives no sample to " + "; to ".join(parts)
            + ": they hold too few samples for this ratio",
            stacklevel=3,
        )


def _empty_subset_error(counts: np.ndarray, ratio: float) -> InputError:
    """``official`` rounded every cell to 0: name the ratio that would keep at least one sample."""
    largest = int(counts.max())
    return InputError(
        f"ratio {ratio} is too small for this data: allocation='official' rounds ratio·count to 0 "
        f"in every cell, so the subset would be empty. The largest cell holds {largest} samples, "
        f"so the smallest workable ratio is just above {0.5 / largest:.6g} (half a sample there); "
        "allocation='exact' always keeps at least one sample"
    )


def sample_bins(result, ratio: float, seed: int = 0, labels=None, allocation: str = "exact"):
    """Keep ``ratio`` of every bin (or every (bin, class) cell in per-class mode).

    result: a ``BinResult``. ratio: ρ in (0, 1]. seed: a non-negative integer. labels: (M,) ints
    to sample per class; defaults to the labels the bins were made with (None: global mode).
    allocation: how many samples each cell gives —
      "exact": a controlled rounding of the targets ρ·count (``rounding.controlled_rounding``):
        floor or ceil per cell, per bin and per class, max(1, round(ρ·M)) in all; which cells
        round up is drawn from a stream derived from ``seed``;
      "official": round(ρ·count) per cell, Python rounding, as the official code.
    The ids of each cell are then drawn uniformly without replacement with
    ``numpy.random.default_rng(seed)``: cells in order (bin, then class), each cell's ascending
    ids passed to ``rng.choice``. Warns (UserWarning) when a non-empty bin or class gets no
    sample; raises InputError when the subset would be empty.

    Returns a ``SubsetResult``; its manifest holds ratio, seed, allocation, n_samples,
    n_selected, and count/selected per cell ("cells", bin-major), per bin ("bins") and per
    class ("classes", None in global mode).
    """
    if not isinstance(result, BinResult):
        raise InputTypeError(
            f"result must be a BinResult (from graphcut_bins or load_bins), got {type(result).__name__}"
        )
    ratio = as_ratio(ratio)
    seed = _as_seed(seed)
    if not isinstance(allocation, str):
        choices = ", ".join(map(repr, ALLOCATIONS))
        raise InputTypeError(f"allocation must be one of {choices}, got {allocation!r}")
    as_choice(allocation, ALLOCATIONS, "allocation")
    m = len(result.order)
    if m == 0:
        raise InputError("result holds no samples, so there is nothing to sample")
    if labels is None:
        labels = result.labels
    if labels is not None:
        labels = as_labels(labels, m)
    classes, counts, grouped, offsets = _cell_table(result, labels)

    if allocation == "exact":
        rounding_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
        take = controlled_rounding(counts, rational_ratio(ratio), rounding_rng)
    else:
        take = _official_counts(counts, ratio)
        if take.sum() == 0:  # `exact` always takes max(1, round(ρ·M)) ≥ 1
            raise _empty_subset_error(counts, ratio)
    _warn_unrepresented(counts, take, classes, ratio, allocation)

    rng = np.random.default_rng(seed)
    flat_take = take.ravel()
    chosen = [
        rng.choice(grouped[offsets[cell] : offsets[cell + 1]], size=int(flat_take[cell]), replace=False)
        for cell in np.flatnonzero(flat_take)
    ]
    indices = np.sort(np.concatenate(chosen)).astype(np.int64)

    per_class = labels is not None
    class_names = [int(c) for c in classes] if per_class else [None]
    manifest = {
        "ratio": ratio,
        "seed": seed,
        "allocation": allocation,
        "n_samples": m,
        "n_selected": len(indices),
        "cells": [
            {"bin": b, "class": cls, "count": int(counts[b, j]), "selected": int(take[b, j])}
            for b in range(counts.shape[0])
            for j, cls in enumerate(class_names)
        ],
        "bins": [
            {"bin": b, "count": int(c), "selected": int(k)}
            for b, (c, k) in enumerate(zip(counts.sum(axis=1), take.sum(axis=1)))
        ],
        "classes": [
            {"class": cls, "count": int(c), "selected": int(k)}
            for cls, c, k in zip(class_names, counts.sum(axis=0), take.sum(axis=0))
        ]
        if per_class
        else None,
    }
    return SubsetResult(indices, manifest)
