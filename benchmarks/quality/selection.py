"""The three subset selectors compared by the quality benchmark, and the subsets' diversity.

Every selector returns sorted (K,) int64 ids into the train split. DQ fixes the per-class
counts (SPEC §3 `exact` allocation over its (bin, class) cells); the GraphCut coreset and the
random baseline take exactly those per-class counts, so the three differ only in *which*
samples of each class they keep.
"""

from __future__ import annotations

import numpy as np

import dqkernels


def dq_bins(features: np.ndarray, labels: np.ndarray, n_bins: int) -> dqkernels.BinResult:
    """DQ bins of the train split: per-class GraphCut bins (cosine, λ=1, array_split sizes).

    features: (M, d) float64; labels: (M,) int64.
    """
    return dqkernels.graphcut_bins(features, bins=n_bins, labels=labels)


def select_dq(bins: dqkernels.BinResult, ratio: float, seed: int) -> np.ndarray:
    """DQ subset: ``ratio`` of every (bin, class) cell, drawn uniformly with ``seed``."""
    return dqkernels.sample_bins(bins, ratio=ratio, seed=seed).indices


def class_counts(indices: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(C,) int64 number of ``indices`` in each of ``classes`` (labels: (M,) int64)."""
    return np.array([int((labels[indices] == c).sum()) for c in classes], dtype=np.int64)


def select_graphcut_coreset(
    features: np.ndarray, labels: np.ndarray, classes: np.ndarray, budgets: np.ndarray
) -> np.ndarray:
    """One greedy GraphCut selection per class of its whole budget (the 1-bin coreset).

    Class c's first bin of ``graphcut_bins(features[class c], bins=2, sizes=[k_c, n_c − k_c])``
    is the greedy GraphCut selection of k_c samples (cosine, λ=1). Deterministic: no seed.
    features: (M, d) float64; labels: (M,) int64; classes, budgets: (C,) int64.
    """
    chosen = []
    for cls, budget in zip(classes, budgets):
        ids = np.flatnonzero(labels == cls)
        result = dqkernels.graphcut_bins(
            features[ids], bins=2, sizes=[int(budget), len(ids) - int(budget)]
        )
        chosen.append(ids[result.bins[0]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def select_random(
    labels: np.ndarray, classes: np.ndarray, budgets: np.ndarray, seed: int
) -> np.ndarray:
    """Stratified uniform random subset: k_c samples of class c without replacement.

    One ``numpy.random.default_rng(seed)``, classes in the order of ``classes``.
    """
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(labels == cls), size=int(budget), replace=False)
        for cls, budget in zip(classes, budgets)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def unit_rows(features: np.ndarray) -> np.ndarray:
    """(M, d) float64 rows scaled to unit L2 norm: the space the cosine metric selects in."""
    features = features.astype(np.float64)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) euclidean distances between unit rows: sqrt(2 − 2·a·b)."""
    return np.sqrt(np.maximum(2.0 - 2.0 * (a @ b.T), 0.0))


def diversity(unit_features: np.ndarray, indices: np.ndarray) -> tuple[float, float]:
    """(mean pairwise distance among the selected rows, coverage) of a subset.

    unit_features: (M, d) unit rows of the whole train split; indices: (K,) selected ids.
    Coverage = mean over all M rows of the distance to the nearest selected row (0 for a
    selected row); lower is better. Mean pairwise distance is over the K·(K−1)/2 distinct pairs
    (NaN when K < 2); higher is more spread out.
    """
    selected = unit_features[indices]
    pairwise = _distances(selected, selected)
    k = len(indices)
    mean_pairwise = float(pairwise[np.triu_indices(k, 1)].mean()) if k >= 2 else float("nan")
    coverage = float(_distances(unit_features, selected).min(axis=1).mean())
    return mean_pairwise, coverage
