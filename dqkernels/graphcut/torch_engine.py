"""Portable torch engine for GraphCut bins (docs/method.md §1): any device torch runs on.

All problems (classes) advance together as one batch: Gram matrices (P, n, n) from one batched
GEMM, then per greedy step one gathered Gram row per problem, a score update and an argmax, all
on the device — the loop never waits on the host. The step itself is either torch ops
(``step="torch"``) or the fused Triton kernels of ``dqkernels.graphcut.kernels.graphcut_step``
(``step="triton"``).
"""

from __future__ import annotations

import numpy as np

from dqkernels.core.errors import InputError

STEPS = ("torch", "triton")


def _batched(rows, offsets, n_max):
    """(P, n_max, d) zero-padded copy of per-problem row ranges of rows (M, d)."""
    n_problems = len(offsets) - 1
    out = rows.new_zeros((n_problems, n_max, rows.shape[1]))
    for p in range(n_problems):
        lo, hi = int(offsets[p]), int(offsets[p + 1])
        out[p, : hi - lo] = rows[lo:hi]
    return out


def batched_gram(x, embed=None):
    """G = x·xᵀ (or (δ·δᵀ)∘(1 + e·eᵀ) for gradient embeddings): (P, n, n) from (P, n, d)."""
    gram = x @ x.transpose(1, 2)
    if embed is not None:
        gram *= 1.0 + embed @ embed.transpose(1, 2)
    return gram


def graphcut_bins_torch(x, embed, offsets, bin_sizes, lam, device, step="torch"):
    """Greedy bins of P independent problems, batched.

    x: (M, d) numpy float32/float64 working rows, grouped by problem (offsets (P+1,) int64);
    embed: (M, D) or None (then x holds δ of a gradient embedding); bin_sizes: (P, N) int64;
    lam: λ > 0; device: a torch device; step: "torch" or "triton".
    Returns (M,) int64 local ids in pick order per problem, at each problem's row offset —
    the layout of the C++ engine's output.
    """
    import torch

    if step not in STEPS:
        raise InputError(f"step must be one of {STEPS}, got {step!r}")
    device = torch.device(device)
    offsets = np.asarray(offsets, dtype=np.int64)
    counts = np.diff(offsets)
    n_problems, n_bins = bin_sizes.shape
    n_max = int(counts.max())
    rows = torch.from_numpy(x).to(device)
    feats = _batched(rows, offsets, n_max)
    embeds = None if embed is None else _batched(torch.from_numpy(embed).to(device), offsets, n_max)
    gram = batched_gram(feats, embeds)
    norms = torch.diagonal(gram, dim1=1, dim2=2).double().contiguous()  # n_x = k(x, x)

    valid = torch.arange(n_max, device=device)[None, :] < torch.from_numpy(counts).to(device)[:, None]
    pool = valid.clone()
    sizes = torch.from_numpy(bin_sizes).to(device)
    # Picks land at order[p, written[p] + t]; column n_max absorbs inactive problems' writes.
    order = torch.full((n_problems, n_max + 1), -1, dtype=torch.int64, device=device)
    written = torch.zeros(n_problems, dtype=torch.int64, device=device)
    problem_ids = torch.arange(n_problems, device=device)
    if step == "triton":
        from dqkernels.graphcut.kernels.graphcut_step import GraphcutStepTriton

        fused = GraphcutStepTriton(n_problems, n_max, device)

    for b in range(n_bins - 1):
        bin_size = sizes[:, b]
        steps = int(bin_sizes[:, b].max())
        if steps == 0:
            continue
        pool_f = pool.to(gram.dtype)
        r = pool_f.sum(1, keepdim=True).double()
        pool_norm_sum = (norms * pool).sum(1, keepdim=True)
        cross = torch.bmm(gram, pool_f.unsqueeze(-1)).squeeze(-1).double()  # Σ_{p∈R} k(x, p)
        c2 = r * norms + pool_norm_sum - 2.0 * cross
        score = torch.where(pool, -lam * c2, torch.full_like(c2, -torch.inf))
        pick = torch.argmax(score, dim=1)  # first maximum: the lowest index
        for t in range(steps):
            active = bin_size > t
            slot = torch.where(active, written + t, torch.full_like(written, n_max))
            order[problem_ids, slot] = pick
            if step == "triton":
                pick = fused(gram, norms, score, pool, pick, active)
                continue
            taken = pick[:, None] == torch.arange(n_max, device=device)[None, :]
            taken &= active[:, None]
            pool &= ~taken
            score.masked_fill_(taken, -torch.inf)
            row = gram[problem_ids, pick].double()  # (P, n): k(pick, ·)
            delta = norms + norms.gather(1, pick[:, None]) - 2.0 * row
            score += torch.where(active[:, None], 2.0 * delta, torch.zeros_like(delta))
            pick = torch.argmax(score, dim=1)
        written += bin_size

    # The last bin: the rest of each pool, ascending.
    out = np.empty(int(offsets[-1]), dtype=np.int64)
    order_host = order.cpu().numpy()
    pool_host = pool.cpu().numpy()
    written_host = written.cpu().numpy()
    for p in range(n_problems):
        lo = offsets[p]
        picked = order_host[p, : written_host[p]]
        rest = np.flatnonzero(pool_host[p])
        out[lo : lo + counts[p]] = np.concatenate([picked, rest])
    return out
