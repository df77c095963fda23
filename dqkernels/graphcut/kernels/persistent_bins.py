"""All bins of all problems in one launch (docs/method.md §1.3): one program per problem.

Program p owns problem p (n_p samples, at most a few thousand) for the whole binning. Its state
is two float64 sums per sample, C1 (over the current bin) and C2 (over the pool), in a scratch
buffer it alone touches, so it stays in L2 and in the program's registers while it is swept.
Each greedy step is one sweep over the problem: read the last pick's Gram row, apply
C1 += δ, C2 −= δ with δ(x) = n_x + n_pick − 2·G[pick, x], and find the next pick, the argmax of
score = (2−λ)·C1 − λ·C2 — one Gram row read per step. A taken sample's C2 becomes +inf, so its
score is −inf from then on. C2 carries over from one bin to the next (it already sums over the
remaining pool); only C1 restarts at zero. The last bin, the rest of the pool, is written in
ascending order.

Ties go to the lowest index, written out: the maximum, then the smallest index holding it. (The
Triton interpreter breaks argmax ties to the left whatever it is asked, so an implicit argmax
would pass every CPU test and could still differ on a GPU.)
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

# (BLOCK, num_warps) the launcher chooses from; the ahead-of-time compile test builds each.
CONFIGS = (
    dict(BLOCK=256, num_warps=2),
    dict(BLOCK=1024, num_warps=4),
    dict(BLOCK=2048, num_warps=8),
)


@triton.jit
def _merge_block_max(score, cols, n, best, best_pos):
    """(best, best_pos) after one more block: the block's maximum and the smallest index holding
    it, taken only when strictly greater — earlier blocks hold smaller indices, so ties stay left."""
    top = tl.max(score, axis=0)
    top_pos = tl.min(tl.where(score == top, cols, n), axis=0)
    better = top > best
    return tl.where(better, top, best), tl.where(better, top_pos, best_pos)


@triton.jit
def _persistent_bins(
    gram_ptr,  # (Σ n_p²,) float32/float64 packed Gram matrices
    gram_offsets_ptr,  # (P,) int64
    row_offsets_ptr,  # (P+1,) int64
    norms_ptr,  # (M,) float64 n_x = k(x, x)
    c2_ptr,  # (M,) float64 C2 over the whole problem on entry; scratch
    c1_ptr,  # (M,) float64 scratch
    sizes_ptr,  # (P, n_bins) int64 bin sizes
    coef_ptr,  # (2,) float64: 2 − λ, λ
    order_ptr,  # (M,) int64 out: local ids in pick order at each problem's row offset
    n_bins,
    BLOCK: tl.constexpr,
):
    problem = tl.program_id(0).to(tl.int64)
    lo = tl.load(row_offsets_ptr + problem)
    n = tl.load(row_offsets_ptr + problem + 1) - lo
    base = tl.load(gram_offsets_ptr + problem)
    c1_weight = tl.load(coef_ptr)
    lam = tl.load(coef_ptr + 1)
    lanes = tl.arange(0, BLOCK)
    written = lo * 0  # int64 count of picks written

    for b in range(0, n_bins - 1):
        steps = tl.load(sizes_ptr + problem * n_bins + b)
        # Sweep 0 of a bin: C1 = 0, first pick = argmax of −λ·C2.
        best = tl.full((), float("-inf"), tl.float64)
        best_pos = lo * 0
        for start in range(0, n, BLOCK):
            cols = start + lanes
            inside = cols < n
            c2 = tl.load(c2_ptr + lo + cols, mask=inside, other=float("inf"))
            tl.store(c1_ptr + lo + cols, tl.zeros((BLOCK,), tl.float64), mask=inside)
            score = -lam * c2
            best, best_pos = _merge_block_max(score, cols, n, best, best_pos)
        tl.debug_barrier()
        for t in range(0, steps):
            pick = best_pos
            tl.store(order_ptr + lo + written, pick)
            written += 1
            pick_norm = tl.load(norms_ptr + lo + pick)
            best = tl.full((), float("-inf"), tl.float64)
            best_pos = lo * 0
            for start in range(0, n, BLOCK):
                cols = start + lanes
                inside = cols < n
                row = tl.load(gram_ptr + base + pick * n + cols, mask=inside, other=0.0).to(tl.float64)
                norm = tl.load(norms_ptr + lo + cols, mask=inside, other=0.0)
                c1 = tl.load(c1_ptr + lo + cols, mask=inside, other=0.0)
                c2 = tl.load(c2_ptr + lo + cols, mask=inside, other=float("inf"))
                delta = norm + pick_norm - 2.0 * row
                c1 = c1 + delta
                c2 = tl.where(cols == pick, float("inf"), c2 - delta)
                tl.store(c1_ptr + lo + cols, c1, mask=inside)
                tl.store(c2_ptr + lo + cols, c2, mask=inside)
                score = c1_weight * c1 - lam * c2
                best, best_pos = _merge_block_max(score, cols, n, best, best_pos)
            tl.debug_barrier()

    # The last bin: every sample still in the pool, ascending.
    for start in range(0, n, BLOCK):
        cols = start + lanes
        inside = cols < n
        c2 = tl.load(c2_ptr + lo + cols, mask=inside, other=float("inf"))
        left = inside & (c2 != float("inf"))
        rank = tl.cumsum(left.to(tl.int64), axis=0) - 1
        tl.store(order_ptr + lo + written + rank, cols, mask=left)
        written += tl.sum(left.to(tl.int64), axis=0)


def choose_config(n_max: int) -> int:
    """Index of the smallest config whose BLOCK holds the largest problem, else the largest."""
    for index, config in enumerate(CONFIGS):
        if config["BLOCK"] >= n_max:
            return index
    return len(CONFIGS) - 1


def persistent_bins(gram, offsets: np.ndarray, norms, c2, bin_sizes: np.ndarray, lam: float, block: int = 0):
    """Run the whole binning of P problems in one launch.

    gram: packed Gram buffer (``packed_gram``); offsets: (P+1,) int64 problem row ranges;
    norms, c2: (M,) float64 on the device (c2 is used as scratch); bin_sizes: (P, N) int64;
    block: BLOCK override (tests use small blocks to sweep in several pieces).
    Returns (M,) int64 local ids in pick order per problem, the last bin ascending.
    """
    from dqkernels.graphcut.kernels.packed_gram import gram_offsets

    device = norms.device
    counts = np.diff(offsets)
    config = dict(CONFIGS[choose_config(int(counts.max()))])
    if block:
        config = dict(BLOCK=block, num_warps=config["num_warps"])
    m = int(offsets[-1])
    order = torch.empty(m, dtype=torch.int64, device=device)
    c1 = torch.empty(m, dtype=torch.float64, device=device)
    coefficients = torch.tensor([2.0 - lam, lam], dtype=torch.float64, device=device)
    _persistent_bins[(len(counts),)](
        gram,
        torch.from_numpy(gram_offsets(counts)).to(device),
        torch.from_numpy(np.asarray(offsets, dtype=np.int64)).to(device),
        norms, c2, c1,
        torch.from_numpy(np.ascontiguousarray(bin_sizes, dtype=np.int64)).to(device),
        coefficients, order, int(bin_sizes.shape[1]),
        BLOCK=config["BLOCK"], num_warps=config["num_warps"],
    )
    return order
