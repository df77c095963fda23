"""Float64 numpy reference of GraphCut bin generation (docs/method.md §1), written for clarity.

It forms the full pairwise distance matrix of a problem (n×n float64), so it is meant for
tests and small inputs; the engines compute the same argmax without it.
"""

from __future__ import annotations

import numpy as np

from dqkernels.core.errors import InputError


def pairwise_sq_distances(features: np.ndarray, embed: np.ndarray | None = None) -> np.ndarray:
    """d(p, x) = ‖g_p − g_x‖² for all pairs, float64 (n, n), zero diagonal.

    features: (n, d) float64 rows g_i — or, with ``embed`` (n, D), the δ_i of a gradient
    embedding, g_i = [δ_i, δ_i ⊗ e_i], whose Gram matrix is (δ·δᵀ) ∘ (1 + e·eᵀ).
    """
    features = np.asarray(features, dtype=np.float64)
    gram = features @ features.T
    if embed is not None:
        embed = np.asarray(embed, dtype=np.float64)
        gram = gram * (1.0 + embed @ embed.T)
    norms = np.diag(gram).copy()
    dist = norms[:, None] + norms[None, :] - 2.0 * gram
    np.fill_diagonal(dist, 0.0)
    return np.maximum(dist, 0.0)


def greedy_bins_reference(dist: np.ndarray, bin_sizes, lam: float = 1.0) -> np.ndarray:
    """Greedy GraphCut bins of one problem from its distance matrix.

    For each bin but the last: S ← ∅; repeat size times: for every x in the pool R,
    score(x) = (2−λ)·Σ_{p∈S} d(p,x) − λ·Σ_{p∈R} d(p,x); pick the argmax (lowest id on ties) and
    move it from R to S. The last bin is the rest of the pool, in ascending id order.

    dist: (n, n) float64 distances. bin_sizes: (N,) ints summing to n.
    Returns (n,) int64 local ids in pick order, bin after bin.
    """
    n = dist.shape[0]
    bin_sizes = [int(s) for s in bin_sizes]
    if sum(bin_sizes) != n:
        raise InputError("bin_sizes must sum to the number of samples")
    pool = np.arange(n)
    order: list[int] = []
    for b, size in enumerate(bin_sizes):
        if b == len(bin_sizes) - 1:
            order.extend(pool.tolist())
            break
        if size == 0:
            continue
        c1 = np.zeros(len(pool))
        c2 = dist[np.ix_(pool, pool)].sum(axis=0)
        taken = np.zeros(len(pool), dtype=bool)
        for _ in range(size):
            score = (2.0 - lam) * c1 - lam * c2
            score[taken] = -np.inf
            pick = int(np.argmax(score))  # first maximum: lowest id, the pool is ascending
            taken[pick] = True
            order.append(int(pool[pick]))
            row = dist[pool[pick], pool]
            c1 += row
            c2 -= row
        pool = pool[~taken]
    return np.asarray(order, dtype=np.int64)


def official_graphcut_bins(
    features: np.ndarray, bin_sizes, lam: float = 1.0, similarity_dtype=np.float32
) -> np.ndarray:
    """The official DQ code's bin generation, step for step (one problem, cosine).

    For each bin but the last: the similarity matrix of the pool V, s = ½ + ½·cos (stored in
    ``similarity_dtype``: float32 in the official code), its column sums, and a naive greedy whose gain for every candidate x,
    λ·Σ_{i∈V} s_ix − 2·Σ_{j∈S} s_jx, re-sums the selected rows at every step (O(|S|·|V|) per
    step). Equal to ``greedy_bins_reference`` on normalised rows (docs/method.md §1); kept as the
    baseline that the engines are timed against.

    features: (n, d) float rows; bin_sizes: (N,) ints summing to n.
    Returns (n,) int64 ids in pick order, bin after bin (last bin ascending).
    """
    x = np.asarray(features)
    pool = np.arange(len(x))
    order: list[int] = []
    for b, size in enumerate(int(s) for s in bin_sizes):
        if b == len(bin_sizes) - 1:
            order.extend(pool.tolist())
            break
        feats = x[pool]
        norms = np.linalg.norm(feats, axis=1)
        sim = np.zeros((len(pool), len(pool)), dtype=similarity_dtype)
        sim[:] = 0.5 + 0.5 * (feats @ feats.T) / (norms[:, None] * norms[None, :])
        col_sums = sim.sum(axis=0)
        selected = np.zeros(len(pool), dtype=bool)
        gain = np.zeros(len(pool))
        for _ in range(size):
            candidates = ~selected
            gain[candidates] = lam * col_sums[candidates] - 2.0 * sim[np.ix_(selected, candidates)].sum(axis=0)
            pick = int(gain.argmax())
            selected[pick] = True
            gain[pick] = -np.inf
            order.append(int(pool[pick]))
        pool = pool[~selected]
    return np.asarray(order, dtype=np.int64)
