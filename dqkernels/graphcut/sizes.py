"""Bin sizes (docs/method.md §1): ``np.array_split`` sizes, or the official code's sizes."""

from __future__ import annotations

import numpy as np

from dqkernels.core.errors import InputError, InputTypeError

SIZE_RULES = ("split", "official")


def split_sizes(count: int, n_bins: int) -> np.ndarray:
    """Sizes of ``np.array_split`` of ``count`` items into ``n_bins`` parts (larger first).

    Returns an (n_bins,) int64 array summing to ``count``.
    """
    base, extra = divmod(count, n_bins)
    sizes = np.full(n_bins, base, dtype=np.int64)
    sizes[:extra] += 1
    return sizes


def official_sizes(class_counts: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin sizes per class as the official DQ code draws them.

    K = round(M/N) (Python rounding). Bins 1..N-1 take K samples overall: from class c,
    round(K / |pool| · |c ∩ pool|), with pool = samples not yet binned, clamped to what the class
    has left. Bin N takes the rest. With one class this is K, K, ..., rest.

    class_counts: (P,) int64 sizes of the classes. Returns (P, n_bins) int64, rows summing to
    class_counts.
    """
    class_counts = np.asarray(class_counts, dtype=np.int64)
    total = int(class_counts.sum())
    per_bin = round(total / n_bins)
    remaining = class_counts.copy()
    sizes = np.zeros((len(class_counts), n_bins), dtype=np.int64)
    for b in range(n_bins - 1):
        pool = int(remaining.sum())
        if pool == 0:
            break
        for c, left in enumerate(remaining.tolist()):
            take = min(round(per_bin / pool * left), left)
            sizes[c, b] = take
        remaining -= sizes[:, b]
    sizes[:, n_bins - 1] = remaining
    return sizes


def bin_sizes_per_problem(class_counts: np.ndarray, n_bins: int, rule) -> np.ndarray:
    """(P, n_bins) int64 sizes for P independent problems by ``rule``.

    rule: "split" (array_split of each problem), "official", or an explicit sequence of
    n_bins sizes (one problem only).
    """
    class_counts = np.asarray(class_counts, dtype=np.int64)
    if isinstance(rule, str):
        if rule == "split":
            return np.stack([split_sizes(int(c), n_bins) for c in class_counts])
        if rule == "official":
            return official_sizes(class_counts, n_bins)
        raise InputError(f"sizes must be one of {SIZE_RULES} or a list of bin sizes, got {rule!r}")
    explicit = np.asarray(rule)
    if explicit.ndim != 1 or explicit.dtype.kind not in "iu":
        raise InputTypeError("sizes must be 'split', 'official' or a 1-D sequence of integers")
    if len(class_counts) != 1:
        raise InputError("explicit sizes apply to global binning only (labels=None)")
    if len(explicit) != n_bins:
        raise InputError(f"sizes has {len(explicit)} entries but bins={n_bins}")
    # Python integers: a sum of int64 sizes could wrap around and pass the check.
    values = [int(v) for v in explicit.tolist()]
    count = int(class_counts[0])
    if any(v < 0 for v in values) or sum(values) != count:
        raise InputError(f"sizes must be non-negative and sum to the number of samples ({count})")
    return np.array(values, dtype=np.int64)[None, :]
