"""The subset selectors compared by the quality benchmark, and the subsets' diversity.

Every selector but DQ-V2 returns sorted (K,) int64 ids into the train split. DQ fixes the
per-class counts (docs/method.md §3 `exact` allocation over its (bin, class) cells); the GraphCut coreset
and the random baseline take exactly those per-class counts, so the three differ only in *which*
samples of each class they keep. DQ-V2 (docs/method.md §5) selects from a larger pool — the train split
followed by Tobias images of it — and returns ids into that pool; it takes the same total
number of samples as DQ, spread over its own (bin, class) cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import dqkernels
from dqkernels.v2 import tobias


def dq_bins(features: np.ndarray, labels: np.ndarray, n_bins: int) -> dqkernels.BinResult:
    """DQ bins of the train split: per-class GraphCut bins (cosine, λ=1, array_split sizes).

    features: (M, d) float64; labels: (M,) int64.
    """
    return dqkernels.graphcut_bins(features, bins=n_bins, labels=labels)


def select_dq(bins: dqkernels.BinResult, ratio: float, seed: int) -> np.ndarray:
    """DQ subset: ``ratio`` of every (bin, class) cell, drawn uniformly with ``seed``."""
    return dqkernels.sample_bins(bins, ratio=ratio, seed=seed).indices


@dataclass
class TobiasPool:
    """The DQ-V2 pool: the M train images (ids 0..M−1) then T Tobias images (ids M..M+T−1).

    pixels: (M+T, 64) float64 in [0, 1]; labels: (M+T,) int64 (a Tobias image has its base's
    label); masks: (M, g, g) bool foreground masks of the train images; recipes: the T recipes.
    """

    pixels: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    recipes: tobias.TobiasRecipes


def tobias_pool(
    pixels: np.ndarray, labels: np.ndarray, *, mix: float, grid: int, cell_px: int, bg_prob: float,
    mask_px: int, seed: int, device: str = "cpu",
) -> TobiasPool:
    """Build the DQ-V2 pool of the train split (pixels (M, 64) float64 in [0, 1], labels (M,)).

    Masks come from the seeded random ResNet-50 (``seed``, on ``device``) at ``mask_px`` input; ``round(mix·M)``
    bases and their recipes are drawn from two streams derived from ``seed``, as ``dqk v2`` does.
    """
    images = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8)
    masks = tobias.object_masks(images, grid=grid, seed=seed, input_px=mask_px, device=device)
    bases_seed, recipes_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    recipes = tobias.draw_recipes(
        tobias.choose_bases(len(images), mix, bases_seed), len(images), bg_prob=bg_prob, seed=recipes_seed
    )
    tobias_images = tobias.render(recipes, images, masks, cell_px=cell_px)
    return TobiasPool(
        pixels=np.concatenate([pixels, tobias_images.reshape(len(recipes), -1).double().numpy()]),
        labels=np.concatenate([labels, labels[recipes.base]]),
        masks=masks,
        recipes=recipes,
    )


def select_dq_v2(pool_bins: dqkernels.BinResult, n_selected: int, seed: int) -> np.ndarray:
    """DQ-V2 subset of ``n_selected`` pool ids: ratio n_selected / |pool| of every (bin, class) cell.

    ``exact`` allocation gives exactly round(ratio·|pool|) = n_selected samples.
    """
    pool_size = len(pool_bins.order)
    indices = dqkernels.sample_bins(pool_bins, ratio=n_selected / pool_size, seed=seed).indices
    assert len(indices) == n_selected, (len(indices), n_selected)
    return indices


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


def diversity(unit_features: np.ndarray, indices: np.ndarray, covered=None) -> tuple[float, float]:
    """(mean pairwise distance among the selected rows, coverage) of a subset.

    unit_features: (M, d) unit rows of the whole train split (or of the DQ-V2 pool); indices:
    (K,) selected ids. Coverage = mean over the rows ``covered`` (default all M; for the DQ-V2
    pool: the train split) of the distance to the nearest selected row (0 for a selected row);
    lower is better. Mean pairwise distance is over the K·(K−1)/2 distinct pairs (NaN when
    K < 2); higher is more spread out.
    """
    selected = unit_features[indices]
    pairwise = _distances(selected, selected)
    k = len(indices)
    mean_pairwise = float(pairwise[np.triu_indices(k, 1)].mean()) if k >= 2 else float("nan")
    reference = unit_features if covered is None else unit_features[covered]
    coverage = float(_distances(reference, selected).min(axis=1).mean())
    return mean_pairwise, coverage
