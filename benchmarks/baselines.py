"""Baselines the engines are timed against, in the same run (not used by the package).

careful_numpy_bins: what a careful numpy user writes — per bin the pool compacted once, per
    step one float32 gemv over the pool with float64 running sums, in-place updates.
official_style_bins: the official DQ code's approach — a dense similarity matrix over the pool
    per bin (s = ½ + ½·cos) and a naive greedy that re-sums the selected rows every step
    (``dqkernels.graphcut.reference.official_graphcut_bins``).
torch_naive_bins: the plain torch loop (one gemv and one argmax per step, host sync per step).
"""

from __future__ import annotations

import numpy as np

from dqkernels.graphcut.reference import official_graphcut_bins


def _split(m: int, n_bins: int) -> list:
    base, extra = divmod(m, n_bins)
    return [base + (1 if b < extra else 0) for b in range(n_bins)]


def careful_numpy_bins(features: np.ndarray, n_bins: int, lam: float = 1.0) -> np.ndarray:
    """Cosine GraphCut bins, one problem. features (M, d) → (M,) int64 ids in pick order."""
    x = features.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    norms = np.einsum("ij,ij->i", x, x).astype(np.float64)
    pool = np.arange(len(x))
    order = []
    for b, size in enumerate(_split(len(x), n_bins)):
        if b == n_bins - 1:
            order.extend(pool.tolist())
            break
        xp = x[pool]
        np_ = norms[pool]
        total = xp.astype(np.float64).sum(axis=0)
        score = -lam * (len(pool) * np_ - 2.0 * (xp @ total.astype(np.float32)) + np_.sum())
        twice_norms = 2.0 * np_
        dots = np.empty(len(pool), dtype=np.float32)
        update = np.empty(len(pool), dtype=np.float64)
        for step in range(size):
            j = int(np.argmax(score))
            order.append(int(pool[j]))
            score[j] = -np.inf  # stays -inf: only finite values are added below
            if step == size - 1:
                break
            np.dot(xp, xp[j], out=dots)  # one float32 gemv over the pool
            np.multiply(dots, -4.0, out=update)  # score += 2δ = 2n_x + 2n_j − 4 f_x·f_j
            update += twice_norms
            update += twice_norms[j]
            score += update
        pool = pool[np.isfinite(score)]
    return np.asarray(order, dtype=np.int64)


def official_style_bins(features: np.ndarray, n_bins: int, lam: float = 1.0) -> np.ndarray:
    """The official code's rule (dense similarity per bin, naive greedy), float32 features."""
    return official_graphcut_bins(features.astype(np.float32), _split(len(features), n_bins), lam)


def torch_naive_bins(features, n_bins: int, lam: float = 1.0, device: str = "cpu"):
    """The plain torch loop: float32, one gemv + argmax per step, a host sync per step."""
    import torch

    x = torch.as_tensor(features, dtype=torch.float32, device=device)
    x = x / x.norm(dim=1, keepdim=True)
    norms = (x * x).sum(1).double()
    pool = torch.arange(len(x), device=device)
    order = []
    for b, size in enumerate(_split(len(x), n_bins)):
        if b == n_bins - 1:
            order.extend(pool.tolist())
            break
        xp, np_ = x[pool], norms[pool]
        c2 = len(pool) * np_ - 2.0 * (xp.double() @ xp.double().sum(0)) + np_.sum()
        score = -lam * c2
        taken = torch.zeros(len(pool), dtype=torch.bool, device=device)
        for _ in range(size):
            j = int(torch.argmax(score))
            taken[j] = True
            order.append(int(pool[j]))
            score += 2.0 * (np_ + np_[j] - 2.0 * (xp @ xp[j]).double())
            score[taken] = -float("inf")
        pool = pool[~taken]
    return np.asarray(order, dtype=np.int64)
