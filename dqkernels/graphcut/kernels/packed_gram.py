"""Gram matrices of P problems of different sizes in one launch, packed (docs/method.md §1.3).

Problem p (rows lo_p .. lo_p + n_p of the working copy) gets its n_p × n_p Gram matrix at
``gram[gram_offsets[p] : gram_offsets[p] + n_p²]``, row-major: Σ n_p² entries in all, not
P·max(n_p)². One program computes one BLOCK × BLOCK tile (i ≤ j) of one problem on the tensor
cores and writes it and its mirror image. For gradient embeddings the tile is
(δ·δᵀ) ∘ (1 + e·eᵀ), both products in the same program.

The arithmetic is explicit: float64 working rows use float64 products; float32 rows use
``precision`` = "tf32x3" (three tensor-core passes on operands split into a tf32 head and tail:
an error close to float32's, the default), "ieee" (float32 products without tensor cores) or
"tf32" (one pass); bfloat16 rows (a rounded copy of the working rows) use bfloat16 products. All
accumulate in float32 (float64 for float64 rows). Nothing depends on torch's global TF32 setting.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from dqkernels.core.errors import InputError

PRECISIONS = ("ieee", "tf32", "tf32x3")


def config_for(precision: str, gradient: bool) -> dict:
    """The launch configuration of a variant: 64 × 64 tiles, with more warps and thinner k-steps
    where two products (gradient embeddings) or three (tf32x3) share the registers. The
    ahead-of-time compile test builds every variant and checks that none spills."""
    if precision == "tf32x3":
        return dict(BLOCK=64, BLOCK_K=16, num_warps=8)
    if gradient:
        return dict(BLOCK=64, BLOCK_K=32, num_warps=8)
    return dict(BLOCK=64, BLOCK_K=32, num_warps=4)


@triton.jit
def _packed_gram(
    x_ptr,  # (M, d) working rows: float32, float64 or bfloat16
    e_ptr,  # (M, D) embeddings (GRADIENT) else unused
    gram_ptr,  # (Σ n_p²,) float32 or float64, written
    tiles_ptr,  # (T, 3) int32: problem, tile row, tile column (row <= column)
    row_offsets_ptr,  # (P+1,) int64
    gram_offsets_ptr,  # (P,) int64
    d,
    dim_e,
    GRADIENT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    problem = tl.load(tiles_ptr + tile * 3)
    tile_i = tl.load(tiles_ptr + tile * 3 + 1).to(tl.int64)
    tile_j = tl.load(tiles_ptr + tile * 3 + 2).to(tl.int64)
    lo = tl.load(row_offsets_ptr + problem)
    n = tl.load(row_offsets_ptr + problem + 1) - lo
    base = tl.load(gram_offsets_ptr + problem)

    # Scalar 64-bit bases, 32-bit offsets inside a tile.
    lanes = tl.arange(0, BLOCK)
    lanes_k = tl.arange(0, BLOCK_K)
    row_ok = tile_i * BLOCK + lanes < n
    col_ok = tile_j * BLOCK + lanes < n
    acc_type = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK, BLOCK), dtype=acc_type)
    a_ptrs = x_ptr + (lo + tile_i * BLOCK) * d + (lanes[:, None] * d + lanes_k[None, :])
    b_ptrs = x_ptr + (lo + tile_j * BLOCK) * d + (lanes[None, :] * d + lanes_k[:, None])
    for k in range(0, d, BLOCK_K):
        k_ok = k + lanes_k < d
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc_type)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if GRADIENT:
        lift = tl.zeros((BLOCK, BLOCK), dtype=acc_type)
        a_ptrs = e_ptr + (lo + tile_i * BLOCK) * dim_e + (lanes[:, None] * dim_e + lanes_k[None, :])
        b_ptrs = e_ptr + (lo + tile_j * BLOCK) * dim_e + (lanes[None, :] * dim_e + lanes_k[:, None])
        for k in range(0, dim_e, BLOCK_K):
            k_ok = k + lanes_k < dim_e
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            lift = tl.dot(a, b, lift, input_precision=PRECISION, out_dtype=acc_type)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        acc = acc * (1.0 + lift)

    out = acc.to(gram_ptr.dtype.element_ty)
    inside = row_ok[:, None] & col_ok[None, :]
    within = lanes[:, None] * n.to(tl.int32) + lanes[None, :]
    tl.store(gram_ptr + base + tile_i * BLOCK * n + tile_j * BLOCK + within, out, mask=inside)
    # The mirror tile (j, i), written row by row as well; a diagonal tile is complete already.
    mirror = col_ok[:, None] & row_ok[None, :] & (tile_i != tile_j)
    tl.store(gram_ptr + base + tile_j * BLOCK * n + tile_i * BLOCK + within, tl.trans(out), mask=mirror)


def gram_offsets(counts: np.ndarray) -> np.ndarray:
    """(P,) int64 start of each problem's matrix in the packed buffer."""
    squares = np.asarray(counts, dtype=np.int64) ** 2
    return np.concatenate([[0], np.cumsum(squares)[:-1]]).astype(np.int64)


def upper_tiles(counts: np.ndarray, block: int) -> np.ndarray:
    """(T, 3) int32 (problem, i, j) with i <= j over every problem's BLOCK tiles."""
    pieces = []
    for tiles, group in _group_by(-(-np.asarray(counts, dtype=np.int64) // block)):
        i, j = np.triu_indices(int(tiles))
        pairs = np.stack([i, j], axis=1)
        problems = np.repeat(group, len(pairs))
        pieces.append(np.column_stack([problems, np.tile(pairs, (len(group), 1))]))
    tiles = np.concatenate(pieces)
    return np.ascontiguousarray(tiles[np.lexsort((tiles[:, 2], tiles[:, 1], tiles[:, 0]))], dtype=np.int32)


def _group_by(values: np.ndarray):
    """(value, indices holding it) for each distinct value."""
    for value in np.unique(values):
        yield value, np.flatnonzero(values == value)


def packed_gram(x: torch.Tensor, embed, counts: np.ndarray, precision: str = "tf32x3") -> torch.Tensor:
    """The packed Gram matrices of the problems of ``x``.

    x: (M, d) contiguous float32/float64/bfloat16 rows grouped by problem; embed: (M, D) of the
    same dtype or None; counts: (P,) int64 problem sizes; precision: one of PRECISIONS (float32
    rows only).
    Returns the (Σ n_p²,) buffer: float64 for float64 rows, float32 otherwise.
    """
    if precision not in PRECISIONS:
        raise InputError(f"Gram precision must be one of {PRECISIONS}, got {precision!r}")
    if x.dtype != torch.float32:
        precision = "ieee"
    if embed is not None and embed.dtype != x.dtype:
        raise InputError("embed must have the dtype of x")
    settings = config_for(precision, embed is not None)
    counts = np.asarray(counts, dtype=np.int64)
    device = x.device
    offsets = gram_offsets(counts)
    total = int(offsets[-1] + counts[-1] ** 2)
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    gram = torch.empty(total, dtype=out_dtype, device=device)
    tiles = torch.from_numpy(upper_tiles(counts, settings["BLOCK"])).to(device)
    row_offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)).to(device)
    x = x.contiguous()
    e = x if embed is None else embed.contiguous()
    _packed_gram[(len(tiles),)](
        x, e, gram, tiles, row_offsets, torch.from_numpy(offsets).to(device),
        x.shape[1], e.shape[1],
        GRADIENT=embed is not None, PRECISION=precision,
        BLOCK=settings["BLOCK"], BLOCK_K=settings["BLOCK_K"], num_warps=settings["num_warps"],
    )
    return gram
