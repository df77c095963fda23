"""The replay checker of docs/method.md §2, public so users can audit any binning."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dqkernels.core.validate import GradEmbedding, as_float_matrix
from dqkernels.graphcut.prepare import (
    gradient_unit_factors,
    power_of_two_exponent,
    unit_rows,
)
from dqkernels.graphcut.sizes import bin_sizes_per_problem


@dataclass
class ReplayReport:
    """Outcome of ``check_binning``.

    worst_gap: the largest (best exact score − picked exact score) / max_{x∈R}|C2(x)| over all
    greedy steps; steps: how many greedy picks were replayed.
    """

    worst_gap: float
    steps: int


def _unit_rows(features, metric):
    """Float64 rows as the metric sees them, scale-safe: (x, embed or None).

    Cosine rows are normalised as the engines normalise them; euclidean rows (and δ) are
    centred and multiplied by a power of two, which scales every distance alike and so changes
    no pick and no relative gap, but keeps the squares finite for any finite input.
    """
    if isinstance(features, GradEmbedding):
        delta = as_float_matrix(features.delta, "features.delta").astype(np.float64)
        embed = as_float_matrix(features.embed, "features.embed").astype(np.float64)
        if metric == "cosine":
            delta *= gradient_unit_factors(delta, embed, np.arange(len(delta)))[:, None]
        else:
            delta = np.ldexp(delta, power_of_two_exponent(float(np.abs(delta).max())))
        return delta, embed
    x = as_float_matrix(features, "features")
    if metric == "cosine":
        return unit_rows(x, np.arange(len(x))), None
    x = np.ldexp(x.astype(np.float64), power_of_two_exponent(float(np.abs(x).max())))
    x -= x.mean(axis=0)
    return np.ldexp(x, power_of_two_exponent(float(np.abs(x).max()))), None


def _kernel_rows(x, embed, rows, cols):
    """k(g_r, g_c) for r in rows, c in cols: float64 (len(rows), len(cols))."""
    gram = x[rows] @ x[cols].T
    if embed is not None:
        gram *= 1.0 + embed[rows] @ embed[cols].T
    return gram


def check_binning(
    result,
    features,
    *,
    labels=None,
    metric=None,
    lam=None,
    rtol: float = 1e-4,
    expected_sizes=None,
) -> ReplayReport:
    """Replay a binning in float64 and raise AssertionError if it breaks docs/method.md §1–2.

    result: a ``BinResult`` (or anything with ``order`` and ``bin_offsets``).
    features: the (M, d) features that were binned, or a ``GradEmbedding``.
    labels / metric / lam: default to what ``result`` records.
    rtol: every pick's exact score must be within rtol · max_{x∈R}|C2(x)| of the best exact
        score in the pool (1e-4 for float32 engines, 1e-9 for float64 paths), beyond the
        replay's own float64 rounding (16·|R|·ε₆₄·max‖g‖² per score), which only matters where
        exact ties leave max|C2| at zero.
    expected_sizes: "split", "official" or a list; checks the bin sizes too.
    Checks: the order is a partition of range(M), the bin sizes (if asked), and that every
    greedy pick of every class is in that class's pool and admissible.
    """
    meta = getattr(result, "meta", {}) or {}
    metric = metric or meta.get("metric", "cosine")
    lam = float(lam if lam is not None else meta.get("lam", 1.0))
    if labels is None:
        labels = getattr(result, "labels", None)
    order = np.asarray(result.order, dtype=np.int64)
    offsets = np.asarray(result.bin_offsets, dtype=np.int64)
    x, embed = _unit_rows(features, metric)
    m = len(x)
    assert len(order) == m and np.array_equal(np.sort(order), np.arange(m)), (
        "order is not a permutation of range(M)"
    )
    assert offsets[0] == 0 and offsets[-1] == m and (np.diff(offsets) >= 0).all(), (
        "bin_offsets do not cover range(M)"
    )
    n_bins = len(offsets) - 1
    bin_of = np.repeat(np.arange(n_bins), np.diff(offsets))
    labels = np.zeros(m, dtype=np.int64) if labels is None else np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if expected_sizes is not None:
        expected = bin_sizes_per_problem(counts, n_bins, expected_sizes)
        for c, cls in enumerate(classes):
            got = np.bincount(bin_of[labels[order] == cls], minlength=n_bins)
            assert np.array_equal(got, expected[c]), (
                f"class {cls}: bin sizes {got.tolist()} != expected {expected[c].tolist()}"
            )

    worst, steps = 0.0, 0
    for cls in classes:
        in_class = labels[order] == cls
        picks, pick_bins = order[in_class], bin_of[in_class]
        pool = np.sort(picks)
        for b in range(n_bins - 1):
            chosen = picks[pick_bins == b]
            if len(chosen) == 0:
                continue
            norms = np.einsum("ij,ij->i", x[pool], x[pool])
            if embed is not None:
                norms = norms * (1.0 + np.einsum("ij,ij->i", embed[pool], embed[pool]))
            cross_sum = _kernel_rows(x, embed, pool, pool).sum(axis=1) if embed is not None else x[pool] @ x[pool].sum(0)
            c2 = len(pool) * norms - 2.0 * cross_sum + norms.sum()
            replay_noise = 16.0 * len(pool) * np.finfo(np.float64).eps * float(norms.max())
            c1 = np.zeros(len(pool))
            taken = np.zeros(len(pool), dtype=bool)
            position = {int(s): i for i, s in enumerate(pool)}
            for pick in chosen.tolist():
                assert pick in position and not taken[position[pick]], (
                    f"bin {b}: sample {pick} is not in the pool"
                )
                score = (2.0 - lam) * c1 - lam * c2
                score[taken] = -np.inf
                scale = np.abs(c2[~taken]).max()
                # The replay's own float64 rounding: when exact ties leave max|C2| at zero (a
                # pool of identical rows), scores still differ by this much, and that is no gap.
                own_noise = replay_noise * (abs(2.0 - lam) + lam)
                shortfall = max(0.0, score.max() - score[position[pick]] - own_noise)
                gap = shortfall / max(scale, np.finfo(float).tiny)
                worst = max(worst, gap)
                assert gap <= rtol, (
                    f"bin {b}: pick {pick} scores {gap:.3g}·max|C2| below the best (rtol {rtol})"
                )
                i = position[pick]
                taken[i] = True
                k_row = _kernel_rows(x, embed, np.array([pick]), pool)[0]
                delta = norms + norms[i] - 2.0 * k_row
                delta[i] = 0.0
                c1 += delta
                c2 -= delta
                steps += 1
            pool = pool[~taken]
    return ReplayReport(worst_gap=float(worst), steps=steps)
