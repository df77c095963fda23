"""The working copy the engines bin: rows transformed by the metric, centred, and scaled so the
working precision can hold them (docs/method.md §1).

Every step is scale-safe: rows are divided by their largest entry in float64 before their norm is
taken, and euclidean problems are multiplied by a power of two that brings their largest entry
into [0.5, 1). Multiplying features by 2^k scales every distance by 4^k and so leaves every
argmax unchanged; a power of two does so without rounding, which makes the property exact:
features scaled by any power of two give the same working copy, bit for bit, and so the same
bins. Data that the working precision still cannot represent is refused with a message, never
binned into garbage.
"""

from __future__ import annotations

import math

import numpy as np

from dqkernels.core.errors import InputError
from dqkernels.core.validate import GradEmbedding

CHUNK_ROWS = 1 << 14

# Squared row norms for which 1/‖row‖ and every product row·(1/‖row‖) stay normal numbers in
# float32 as well as float64 (2^±180 leaves 2^±38 of room for the entries of the row).
_ORDINARY_SQUARES = (2.0**-180, 2.0**180)

# The engines keep scores in float64; λ·C2 must stay far below its largest value.
_SCORE_LIMIT = 1e300


def row_chunks(rows: np.ndarray):
    """(start, rows[start:start + CHUNK_ROWS]) over ``rows`` (1-D ids): bounded temporaries."""
    for lo in range(0, len(rows), CHUNK_ROWS):
        yield lo, rows[lo : lo + CHUNK_ROWS]


def power_of_two_exponent(peak: float) -> int:
    """k such that peak·2^k lies in [0.5, 1); 0 for a zero peak. Apply with ``np.ldexp``,
    which is exact and cannot overflow on the way (2^k alone may not be a float64)."""
    if not peak > 0.0 or not math.isfinite(peak):
        return 0
    return -math.frexp(peak)[1]


def _times_power_of_two(values: np.ndarray, exponent: int) -> np.ndarray:
    """values·2^exponent, exactly, in place where possible (a multiply while 2^exponent is a
    normal float64, ``np.ldexp`` beyond)."""
    if exponent == 0:
        return values
    if -1000 < exponent < 1000:
        values *= 2.0**exponent
        return values
    return np.ldexp(values, exponent)


def _compute_dtype(dtype, working_dtype) -> np.dtype:
    """Native float32 or float64: the precision rows are normalised in before the working cast."""
    return np.promote_types(np.dtype(dtype).newbyteorder("="), np.promote_types(working_dtype, np.float32))


def unit_rows(block: np.ndarray, ids: np.ndarray, dtype=np.float64) -> np.ndarray:
    """(n, d) rows of unit L2 norm in ``dtype`` (float32 or float64), scale-safe for any finite
    input.

    block: (n, d) floating rows of any precision and byte order. ids: (n,) their sample ids, to
    name an all-zero row in the error. Each row is first multiplied by the power of two that
    brings its largest |entry| into [0.5, 1) — exact, so subnormal and near-overflow rows lose
    nothing and rows scaled by 2^k come out bit for bit the same — then divided by its norm,
    whose square is summed in float64.
    """
    rows = np.asarray(block, dtype=_compute_dtype(block.dtype, dtype))
    squares = np.einsum("ij,ij->i", rows, rows, dtype=np.float64)
    # Rows of ordinary magnitude need no rescaling: multiplying by the rounded 1/‖row‖ gives the
    # same bits as the rescaled path below, because powers of two cancel exactly in between.
    ordinary = (squares > _ORDINARY_SQUARES[0]) & (squares < _ORDINARY_SQUARES[1])
    if ordinary.all():
        rows = rows * (1.0 / np.sqrt(squares)).astype(rows.dtype)[:, None]
        return rows
    rows = np.array(rows)
    odd = np.flatnonzero(~ordinary)
    peak = np.abs(rows[odd]).max(axis=1)
    zero = np.flatnonzero(peak == 0)
    if len(zero):
        raise InputError(
            f"features: row {int(ids[odd[zero[0]]])} is all zeros; cosine needs non-zero rows "
            "(use metric='euclidean')"
        )
    rows[ordinary] *= (1.0 / np.sqrt(squares[ordinary])).astype(rows.dtype)[:, None]
    rescaled = np.ldexp(rows[odd], -np.frexp(peak)[1][:, None])
    inverse_norm = 1.0 / np.sqrt(np.einsum("ij,ij->i", rescaled, rescaled, dtype=np.float64))
    rows[odd] = rescaled * inverse_norm.astype(rows.dtype)[:, None]
    return rows


def gradient_unit_factors(delta: np.ndarray, embed: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(n,) float64 factors f with ‖f_i·g_i‖ = 1 for g_i = [δ_i, δ_i ⊗ e_i], scale-safe.

    ‖g_i‖ = ‖δ_i‖·√(1 + ‖e_i‖²); both factors are computed from rows divided by their largest
    entry, so no square overflows or underflows in float64.
    """
    delta_peak = np.abs(delta).max(axis=1)
    zero = np.flatnonzero(delta_peak == 0)
    if len(zero):
        raise InputError(
            f"features: gradient embedding of row {int(ids[zero[0]])} is zero; cosine needs "
            "non-zero rows (use metric='euclidean')"
        )
    delta_unit = delta / delta_peak[:, None]
    delta_norm = delta_peak * np.sqrt(np.einsum("ij,ij->i", delta_unit, delta_unit))
    embed_peak = np.maximum(np.abs(embed).max(axis=1), 1.0)
    embed_unit = embed / embed_peak[:, None]
    lift = embed_peak * np.sqrt(embed_peak**-2 + np.einsum("ij,ij->i", embed_unit, embed_unit))
    return 1.0 / delta_norm / lift


def _check_representable(name: str, largest_square: float, dtype) -> None:
    """Refuse a working copy whose squared norms do not fit the working precision."""
    if not largest_square * 4 < float(np.finfo(dtype).max):
        raise InputError(
            f"features: {name} too large for {np.dtype(dtype).name} arithmetic (largest squared "
            f"norm {largest_square:.3g}); rescale them or pass precision='float64'"
        )


def _gradient_working(features: GradEmbedding, metric, perm, problem_offsets, dtype):
    delta = np.asarray(features.delta[perm], dtype=np.float64)
    embed = np.asarray(features.embed[perm], dtype=np.float64)
    with np.errstate(over="ignore"):
        embed_square = float(np.einsum("ij,ij->i", embed, embed).max())
    _check_representable("gradient embeddings e", embed_square, dtype)
    if metric == "cosine":
        delta *= gradient_unit_factors(delta, embed, perm)[:, None]
    else:
        for lo, hi in zip(problem_offsets[:-1], problem_offsets[1:]):
            if hi > lo:
                delta[lo:hi] = np.ldexp(delta[lo:hi], power_of_two_exponent(float(np.abs(delta[lo:hi]).max())))
    working_delta = delta.astype(dtype)
    # Below the smallest normal number a float32 δ loses its digits; the products lose more.
    tiny = np.finfo(dtype).tiny * 2.0 ** np.finfo(dtype).nmant
    peak = np.abs(delta).max(axis=1)
    small = (peak > 0) & (peak < tiny)
    if small.any():
        raise InputError(
            f"features: the gradient embedding of row {int(perm[np.flatnonzero(small)[0]])} is "
            f"too small next to its e for {np.dtype(dtype).name} arithmetic; pass "
            "precision='float64'"
        )
    return np.ascontiguousarray(working_delta), np.ascontiguousarray(embed, dtype=dtype)


def working_features(features, metric: str, perm: np.ndarray, problem_offsets, dtype):
    """Rows as the engine sees them, in problem order: x[i] = transform(features[perm[i]]).

    features: (M, d) floating array (any precision, byte order or memory map) or GradEmbedding.
    perm: (M,) int64 sample ids grouped by problem; problem_offsets: (P+1,) int64.
    Plain features: cosine rows are L2-normalised; every problem is then centred on its own mean
    and, for euclidean, scaled by a power of two so its largest entry lies in [0.5, 1).
    Gradient embeddings: cosine scales δ_i by 1/‖g_i‖ (g is linear in δ); euclidean scales each
    problem's δ by a power of two.
    Works on row chunks, so only the working copy (M×d in ``dtype``) is allocated whole:
    memory-mapped, byte-swapped and half-precision inputs are converted chunk by chunk.
    Returns (x (M, d) dtype, embed (M, D) dtype or None).
    """
    if isinstance(features, GradEmbedding):
        return _gradient_working(features, metric, perm, problem_offsets, dtype)

    x = np.empty(features.shape, dtype=dtype)
    for lo, hi in zip(problem_offsets[:-1], problem_offsets[1:]):
        members = perm[lo:hi]
        total = np.zeros(features.shape[1])
        if metric == "cosine":
            # Unit rows are bounded by 1, so centring them in the working precision loses
            # nothing beyond the final rounding.
            for start, ids in row_chunks(members):
                unit = unit_rows(features[ids], ids, dtype)
                total += unit.sum(axis=0, dtype=np.float64)
                x[lo + start : lo + start + len(ids)] = unit
            x[lo:hi] -= (total / len(members)).astype(dtype)
            continue
        # Euclidean: centre in float64, then scale by the power of two that brings the largest
        # centred entry into [0.5, 1). One pass gathers the column sums and extremes (the largest
        # centred entry is an extreme minus the mean); a second writes the working rows.
        column_max = np.full(features.shape[1], -np.inf)
        column_min = np.full(features.shape[1], np.inf)
        pre = 0
        for _, ids in row_chunks(members):
            block = features[ids]
            with np.errstate(over="ignore"):
                total += block.sum(axis=0, dtype=np.float64)
            column_max = np.maximum(column_max, block.max(axis=0))
            column_min = np.minimum(column_min, block.min(axis=0))
        if not np.isfinite(total).all():
            # Near float64's limit the sum overflows: sum rows brought near 1 instead.
            pre = power_of_two_exponent(float(max(np.abs(column_max).max(), np.abs(column_min).max())))
            total = sum(np.ldexp(features[ids].astype(np.float64), pre).sum(axis=0) for _, ids in row_chunks(members))
            column_max, column_min = np.ldexp(column_max, pre), np.ldexp(column_min, pre)
        mean = total / len(members)
        peak = float(max((column_max - mean).max(), (mean - column_min).max()))
        post = power_of_two_exponent(peak)
        for start, ids in row_chunks(members):
            block = features[ids].astype(np.float64)
            if pre:
                block = np.ldexp(block, pre)
            block -= mean
            x[lo + start : lo + start + len(ids)] = _times_power_of_two(block, post)
    return x, None


def check_lam_fits(lam: float, x: np.ndarray, embed, problem_offsets) -> None:
    """Refuse a λ for which λ·C2 could overflow the engines' float64 scores.

    C2(x) ≤ 4·n·max‖g‖² for a problem of n rows. The working copy is scaled, so max‖g‖² is
    bounded without reading it: plain rows are unit rows minus their mean (‖x‖ ≤ 2) or have
    entries below 1 (‖x‖² < d), so 4·d bounds both; a gradient embedding adds the factor
    1 + max‖e‖² (one pass over e). Only an absurd λ (say 1e300) is refused.
    """
    largest_problem = int(np.diff(problem_offsets).max())
    largest_square = 4.0 * x.shape[1]
    if embed is not None:
        embed_square = max(
            float(np.einsum("ij,ij->i", block, block, dtype=np.float64).max())
            for block in (embed[lo : lo + CHUNK_ROWS] for lo in range(0, len(embed), CHUNK_ROWS))
        )
        largest_square *= 1.0 + embed_square
    bound = 4.0 * largest_problem * largest_square
    if not lam * bound < _SCORE_LIMIT:
        raise InputError(
            f"lam={lam!r} is too large for these features: λ·C2 could overflow the scores "
            f"(λ must be below {_SCORE_LIMIT / bound:.3g})"
        )
