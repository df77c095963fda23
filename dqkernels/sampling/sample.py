"""Uniform sampling of a keep ratio from every bin (docs/method.md §3)."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dqkernels.core.atomic import atomic_output
from dqkernels.core.errors import InputError
from dqkernels.core.validate import as_choice, as_labels, as_ratio

ALLOCATIONS = ("exact", "official")


@dataclass
class SubsetResult:
    """A selected subset. indices: (K,) int64 sorted sample ids; manifest: ratio, seed,
    allocation, per-cell counts and picks."""

    indices: np.ndarray
    manifest: dict

    def save(self, path) -> None:
        """Write ``path`` (.npy of indices) and ``path`` with suffix .json (manifest), atomically."""
        path = Path(path)
        buffer = io.BytesIO()
        np.save(buffer, self.indices)
        with atomic_output(path) as handle:
            handle.write(buffer.getvalue())
        with atomic_output(path.with_suffix(".json"), "w") as handle:
            json.dump(self.manifest, handle, indent=1, sort_keys=True)


def _cells(result, labels):
    """Cells in order (bin, then class): list of (bin, class or None, sorted ids)."""
    cells = []
    for b, ids in enumerate(result.bins):
        ids = np.sort(ids)
        if labels is None:
            cells.append((b, None, ids))
            continue
        cell_labels = labels[ids]
        for cls in np.unique(labels):
            cells.append((b, int(cls), ids[cell_labels == cls]))
    return cells


def largest_remainder(counts: np.ndarray, ratio: float) -> np.ndarray:
    """Per-cell sample counts that total max(1, round(ratio·Σcounts)) exactly.

    Every cell gets floor(ratio·count); the remainder goes one each to the cells with the
    largest fractional parts (ties → earlier cell), never to an empty cell.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = max(1, round(ratio * int(counts.sum())))
    exact = ratio * counts.astype(np.float64)
    take = np.floor(exact).astype(np.int64)
    remainder = total - int(take.sum())
    fraction = np.where(counts > take, exact - take, -1.0)
    winners = np.lexsort((np.arange(len(counts)), -fraction))[:remainder]
    take[winners] += 1
    return np.minimum(take, counts)


def sample_bins(result, ratio: float, seed: int = 0, labels=None, allocation: str = "exact"):
    """Keep ``ratio`` of every bin (or every (bin, class) cell in per-class mode).

    result: a ``BinResult``. ratio: ρ in (0, 1]. seed: for ``numpy.random.default_rng``; cells
    are drawn in order (bin, then class), each cell's sorted ids passed to ``rng.choice``
    without replacement. labels: (M,) ints to sample per class; defaults to the labels the bins
    were made with. allocation: "exact" (total round(ρ·M), largest remainder) or "official"
    (round(ρ·count) per cell, Python rounding; warns when a non-empty cell gets nothing).
    Returns a ``SubsetResult``.
    """
    ratio = as_ratio(ratio)
    as_choice(allocation, ALLOCATIONS, "allocation")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    m = len(result.order)
    if labels is None:
        labels = getattr(result, "labels", None)
    if labels is not None:
        labels = as_labels(labels, m)
    cells = _cells(result, labels)
    counts = np.array([len(ids) for _, _, ids in cells], dtype=np.int64)
    if ratio == 1.0:
        take = counts.copy()
    elif allocation == "exact":
        take = largest_remainder(counts, ratio)
    else:
        take = np.array([round(ratio * int(c)) for c in counts], dtype=np.int64)
        starved = int(((take == 0) & (counts > 0)).sum())
        if starved:
            warnings.warn(
                f"allocation='official': {starved} of {int((counts > 0).sum())} non-empty cells "
                f"get no sample at ratio {ratio}",
                stacklevel=2,
            )
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(ids, size=int(k), replace=False) for (_, _, ids), k in zip(cells, take) if k > 0
    ]
    indices = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    manifest = {
        "ratio": ratio,
        "seed": int(seed),
        "allocation": allocation,
        "n_samples": m,
        "n_selected": int(len(indices)),
        "cells": [
            {"bin": b, "class": cls, "count": int(c), "selected": int(k)}
            for (b, cls, _), c, k in zip(cells, counts, take)
        ],
    }
    return SubsetResult(indices.astype(np.int64), manifest)
