"""Fused greedy step of GraphCut bin generation (docs/method.md §1) in Triton, batched over problems.

One step for every problem p at once, in two launches and without a host sync:
  1. grid (P, blocks): mark the last pick taken, score += 2δ with δ(x) = n_x + n_pick − 2·G[pick, x]
     (only where the problem is still active in this bin), and reduce each block to its
     (max, lowest position of the max);
  2. grid (P,): reduce the blocks to the next pick (lowest position on ties).
Taken and out-of-pool samples hold −inf, which the additions keep.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dqkernels.core.errors import InputError


@triton.jit
def _update_block_argmax(
    gram_ptr,  # (P, n, n) float32/float64
    norms_ptr,  # (P, n) float64
    score_ptr,  # (P, n) float64, updated in place
    pool_ptr,  # (P, n) uint8, updated in place
    pick_ptr,  # (P,) int64: the pick to apply
    active_ptr,  # (P,) uint8: problem still picking in this bin
    block_max_ptr,  # (P, n_blocks) float64
    block_pos_ptr,  # (P, n_blocks) int64
    n,
    n_blocks,
    BLOCK: tl.constexpr,
):
    problem = tl.program_id(0)
    block = tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    in_range = cols < n
    row_base = problem.to(tl.int64) * n
    pick = tl.load(pick_ptr + problem)
    active = tl.load(active_ptr + problem) != 0

    score = tl.load(score_ptr + row_base + cols, mask=in_range, other=-float("inf"))
    is_pick = (cols == pick) & active
    score = tl.where(is_pick, -float("inf"), score)
    gram_row = tl.load(gram_ptr + (row_base + pick) * n + cols, mask=in_range, other=0.0)
    norm = tl.load(norms_ptr + row_base + cols, mask=in_range, other=0.0)
    pick_norm = tl.load(norms_ptr + row_base + pick)
    delta = norm + pick_norm - 2.0 * gram_row.to(tl.float64)
    score = tl.where(active, score + 2.0 * delta, score)
    tl.store(score_ptr + row_base + cols, score, mask=in_range)
    pool = tl.load(pool_ptr + row_base + cols, mask=in_range, other=0)
    tl.store(pool_ptr + row_base + cols, tl.where(is_pick, 0, pool).to(tl.uint8), mask=in_range)

    best = tl.max(score, axis=0)
    best_pos = tl.argmax(score, axis=0, tie_break_left=True)
    tl.store(block_max_ptr + problem * n_blocks + block, best)
    tl.store(block_pos_ptr + problem * n_blocks + block, block * BLOCK + best_pos.to(tl.int64))


@triton.jit
def _reduce_blocks(
    block_max_ptr,  # (P, n_blocks) float64
    block_pos_ptr,  # (P, n_blocks) int64
    pick_ptr,  # (P,) int64: out, the next pick
    n_blocks,
    BLOCKS: tl.constexpr,
):
    problem = tl.program_id(0)
    ids = tl.arange(0, BLOCKS)
    valid = ids < n_blocks
    maxima = tl.load(block_max_ptr + problem * n_blocks + ids, mask=valid, other=-float("inf"))
    positions = tl.load(block_pos_ptr + problem * n_blocks + ids, mask=valid, other=0)
    winner = tl.argmax(maxima, axis=0, tie_break_left=True)
    pick = tl.sum(tl.where(ids == winner, positions, 0), axis=0)
    tl.store(pick_ptr + problem, pick)


class GraphcutStepTriton:
    """Launcher with its scratch buffers, for P problems padded to n samples each."""

    def __init__(self, n_problems: int, n: int, device, block: int = 1024):
        self.n_problems, self.n = n_problems, n
        self.block = min(block, triton.next_power_of_2(n))
        self.n_blocks = triton.cdiv(n, self.block)
        self.blocks_pow2 = triton.next_power_of_2(self.n_blocks)
        self.block_max = torch.empty((n_problems, self.n_blocks), dtype=torch.float64, device=device)
        self.block_pos = torch.empty((n_problems, self.n_blocks), dtype=torch.int64, device=device)
        self.next_pick = torch.empty(n_problems, dtype=torch.int64, device=device)

    def __call__(self, gram, norms, score, pool, pick, active):
        """Applies ``pick`` (P,) where ``active`` (P,) bool; updates score (P, n) and pool (P, n)
        in place; returns the next pick (P,) int64."""
        for name, tensor in (("gram", gram), ("norms", norms), ("score", score), ("pool", pool)):
            if not tensor.is_contiguous():
                raise InputError(f"{name} must be contiguous")
        _update_block_argmax[(self.n_problems, self.n_blocks)](
            gram, norms, score, pool.view(torch.uint8), pick.contiguous(),
            active.to(torch.uint8), self.block_max, self.block_pos,
            self.n, self.n_blocks, BLOCK=self.block,
        )
        _reduce_blocks[(self.n_problems,)](
            self.block_max, self.block_pos, self.next_pick, self.n_blocks, BLOCKS=self.blocks_pow2
        )
        return self.next_pick.clone()
