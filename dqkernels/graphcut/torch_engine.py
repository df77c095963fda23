"""Device engines for GraphCut bins (docs/method.md §1): torch ops, or the Triton kernels.

Both take the working copy on the device (``dqkernels.graphcut.device_prepare``) and return each
problem's local ids in pick order, on the device; nothing goes through the host but sizes and
the final order. Both keep per sample C1 (this bin) and C2 (the pool) in float64, start C2 from
one matrix–vector product per problem, and carry it from bin to bin (the pool's sum at the end
of a bin is the next bin's start), so no bin re-reads the Gram matrix.

- ``torch``: all problems padded to the largest and batched, ~10 torch operations per greedy step
  (the portable baseline; any torch device).
- ``triton-persistent``: per-class problems of up to ``PERSISTENT_MAX_N`` samples, Gram form —
  one launch of ``kernels.persistent_bins`` runs every bin of every problem.
- ``triton-fused``: large problems, or the streaming form — one launch of ``kernels.fused_step``
  per greedy step, identical arguments each time; on CUDA a whole bin replays from a CUDA graph.

Forms: ``gram`` (packed Σ n_p² matrices for Triton, padded P·n_max² for torch) when it fits
``memory_budget``, else ``stream``; an explicit form that does not fit, or a streaming state that
does not fit, is an input error. Gram products are computed at an explicit precision, never at
torch's global TF32 setting.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from dqkernels.core.errors import EngineError, InputError
from dqkernels.graphcut.device_prepare import (
    problem_of_rows,
    row_ranges,
    segment_reduce_rows,
)

KERNELS = ("torch", "triton-persistent", "triton-fused")
# Gram products for float32 working rows, always explicit: "tf32x3" (three tensor-core passes
# on split operands, an error close to float32's; what graphcut_bins uses), "ieee" (float32
# products on the ordinary cores), "tf32" (one tensor-core pass, 10-bit mantissa operands) or
# "bf16" (a bfloat16 copy of the working rows; Triton only). float64 rows use float64 products.
# The torch engine computes "tf32x3" as "ieee" (torch has no split-operand product). A CPU
# emulation of the operand rounding (n = 1 300–5 000, d = 512–768, cosine) gave float64 replay
# gaps (docs/method.md §2) of at most 3e-8 for tf32x3 and ieee, 4–6e-5 for tf32 (under rtol 1e-4
# by less than 2×) and 5–6e-4 for bf16 (over it); benchmarks/bench_gpu.py measures them on a GPU.
GRAM_PRECISIONS = ("tf32x3", "ieee", "tf32", "bf16")
# Largest problem the persistent kernel takes: one program sweeps its whole problem per step.
PERSISTENT_MAX_N = 8192
_STATE_BYTES_PER_SAMPLE = 8 * 4  # norms, C1, C2 (float64) and the order (int64)


@dataclass
class Problems:
    """P independent binning problems on one device.

    x: (M, d) float32/float64 working rows grouped by problem; embed: (M, D) or None (then x
    holds δ of a gradient embedding); offsets: (P+1,) int64 numpy row ranges; bin_sizes: (P, N)
    int64 numpy.
    """

    x: torch.Tensor
    embed: Optional[torch.Tensor]
    offsets: np.ndarray
    bin_sizes: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def width(self) -> int:
        return self.x.shape[1] + (0 if self.embed is None else self.embed.shape[1])


@dataclass
class EngineRun:
    """local_order: (M,) int64 device tensor, local ids at each problem's row offset (picks in
    order, then the last bin ascending); kernel: one of KERNELS; form: "gram" or "stream"."""

    local_order: torch.Tensor
    kernel: str
    form: str


# --------------------------------------------------------------------------- memory and form


def engine_bytes(problems: Problems, form: str, padded: bool, gram_precision: str = "tf32x3") -> int:
    """Device bytes the engine holds: working rows, per-sample state and, in the Gram form, the
    Gram matrices (packed for Triton, padded to the largest problem for torch)."""
    counts = problems.counts.astype(np.int64)
    itemsize = problems.x.element_size()
    m = int(counts.sum())
    total = m * problems.width * itemsize + m * _STATE_BYTES_PER_SAMPLE
    if padded:
        n_max = int(counts.max())
        total += len(counts) * n_max * (problems.width * itemsize + _STATE_BYTES_PER_SAMPLE)
        if form == "gram":
            total += len(counts) * n_max * n_max * itemsize
        return total
    if gram_precision == "bf16" and problems.x.dtype == torch.float32:
        total += m * problems.width * 2
    if form == "gram":
        total += int((counts**2).sum()) * itemsize
    return total


def choose_form(problems: Problems, form: str, memory_budget: int, padded: bool, gram_precision: str = "tf32x3") -> str:
    """"gram" or "stream" for ``form`` ("auto", "gram", "stream") within ``memory_budget`` bytes.

    auto: the Gram form when it fits, else the streaming form. Raises InputError when the asked
    form, or even the streaming form, does not fit."""
    stream_bytes = engine_bytes(problems, "stream", padded, gram_precision)
    if stream_bytes > memory_budget:
        raise InputError(
            f"memory_budget={memory_budget} bytes is too small for these features on the device: "
            f"even the streaming form needs {stream_bytes} bytes"
        )
    gram_bytes = engine_bytes(problems, "gram", padded, gram_precision)
    if form == "gram" and gram_bytes > memory_budget:
        raise InputError(
            f"form='gram' needs {gram_bytes} bytes on the device but memory_budget={memory_budget}; "
            "pass form='stream' or a larger memory_budget"
        )
    if form == "auto":
        return "gram" if gram_bytes <= memory_budget else "stream"
    return form


@contextlib.contextmanager
def matmul_precision(mode: str):
    """torch float32 matrix products at ``mode`` ("ieee" or "tf32") inside the block, whatever the
    caller's global setting; restored after."""
    if mode == "tf32x3":
        mode = "ieee"
    if mode not in ("ieee", "tf32"):
        raise InputError(f"the torch engine computes Gram products at 'ieee' or 'tf32', not {mode!r}")
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = mode
    try:
        yield
    finally:
        matmul.fp32_precision = previous


# --------------------------------------------------------------------------- shared state


def row_norms(x: torch.Tensor, embed: Optional[torch.Tensor]) -> torch.Tensor:
    """(M,) float64 n_x = k(x, x) = ‖x‖² (·(1 + ‖e‖²) for gradient embeddings)."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for lo, hi in row_ranges(x.shape[0], x.shape[1]):
        block = x[lo:hi].double()
        out[lo:hi] = torch.einsum("ij,ij->i", block, block)
        if embed is not None:
            e = embed[lo:hi].double()
            out[lo:hi] *= 1.0 + torch.einsum("ij,ij->i", e, e)
    return out


def initial_c2(problems: Problems, norms: torch.Tensor, problem: torch.Tensor) -> torch.Tensor:
    """(M,) float64 C2(x) = n·n_x + Σ_{p} n_p − 2·Σ_{p} k(x, p) over x's whole problem, from one
    matrix–vector product per problem (docs/method.md §1.3), in float64."""
    x, embed, offsets = problems.x, problems.embed, problems.offsets
    device = x.device
    counts = torch.from_numpy(problems.counts).to(device).to(torch.float64)
    norm_sums = segment_reduce_rows(lambda lo, hi: norms[lo:hi, None], offsets, 1, "sum", device)[:, 0]
    cross = torch.empty(x.shape[0], dtype=torch.float64, device=device)
    if embed is None:
        sums = segment_reduce_rows(lambda lo, hi: x[lo:hi], offsets, x.shape[1], "sum", device)
        for lo, hi in row_ranges(x.shape[0], x.shape[1]):
            cross[lo:hi] = torch.einsum("ij,ij->i", x[lo:hi].double(), sums[problem[lo:hi]])
    else:
        # Σ_p (δ_x·δ_p)(1 + e_x·e_p) = δ_x·Σδ_p + δ_xᵀ (Σ_p δ_p e_pᵀ) e_x, problem by problem.
        for p, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
            delta = x[lo:hi].double()
            e = embed[lo:hi].double()
            outer = delta.T @ e
            cross[lo:hi] = delta @ delta.sum(dim=0) + torch.einsum("ij,jk,ik->i", delta, outer, e)
    return counts[problem] * norms + norm_sums[problem] - 2.0 * cross


def rest_of_pools(order: torch.Tensor, c2: torch.Tensor, problems: Problems, problem: torch.Tensor) -> None:
    """Write every problem's last bin — the samples whose C2 is still finite, ascending — after
    its picks, in place in ``order`` (M,) int64."""
    device = order.device
    offsets = torch.from_numpy(problems.offsets).to(device)
    picked = torch.from_numpy(problems.counts - problems.bin_sizes[:, -1]).to(device)
    left = torch.isfinite(c2)
    rank = torch.cumsum(left.to(torch.int64), dim=0)
    before = torch.cat([rank.new_zeros(1), rank])[offsets[:-1]]  # kept rows before each problem
    position = offsets[:-1][problem] + picked[problem] + rank - before[problem] - 1
    local = torch.arange(order.shape[0], device=device) - offsets[:-1][problem]
    order[position[left]] = local[left]


# --------------------------------------------------------------------------- torch engine


def run_torch(problems: Problems, lam: float, form: str, gram_precision: str = "tf32x3") -> EngineRun:
    """All problems padded to the largest and batched with torch operations."""
    x, embed = problems.x, problems.embed
    device = x.device
    counts = problems.counts
    n_problems, n_bins = problems.bin_sizes.shape
    n_max = int(counts.max())
    problem = problem_of_rows(problems.offsets, device)
    local = torch.arange(x.shape[0], device=device) - torch.from_numpy(problems.offsets[:-1]).to(device)[problem]

    norms = row_norms(x, embed)
    c2_rows = initial_c2(problems, norms, problem)
    padded_norms = torch.zeros((n_problems, n_max), dtype=torch.float64, device=device)
    padded_norms[problem, local] = norms
    c2 = torch.full((n_problems, n_max), torch.inf, dtype=torch.float64, device=device)
    c2[problem, local] = c2_rows
    feats = x.new_zeros((n_problems, n_max, x.shape[1]))
    feats[problem, local] = x
    embeds = None
    if embed is not None:
        embeds = embed.new_zeros((n_problems, n_max, embed.shape[1]))
        embeds[problem, local] = embed
    with matmul_precision(gram_precision):
        gram = None
        if form == "gram":
            gram = feats @ feats.transpose(1, 2)
            if embeds is not None:
                gram *= 1.0 + embeds @ embeds.transpose(1, 2)

        c1 = torch.zeros_like(c2)
        sizes = torch.from_numpy(problems.bin_sizes).to(device)
        # Picks land at order[p, written[p] + t]; column n_max absorbs inactive problems' writes.
        order = torch.full((n_problems, n_max + 1), -1, dtype=torch.int64, device=device)
        written = torch.zeros(n_problems, dtype=torch.int64, device=device)
        problem_ids = torch.arange(n_problems, device=device)
        for b in range(n_bins - 1):
            steps = int(problems.bin_sizes[:, b].max())
            if steps == 0:
                continue
            c1.zero_()
            bin_size = sizes[:, b]
            for t in range(steps):
                score = (2.0 - lam) * c1 - lam * c2
                pick = torch.argmax(score, dim=1)  # the first maximum: the lowest index
                active = bin_size > t
                slot = torch.where(active, written + t, torch.full_like(written, n_max))
                order[problem_ids, slot] = pick
                if gram is not None:
                    row = gram[problem_ids, pick]
                else:
                    row = torch.bmm(feats, feats[problem_ids, pick].unsqueeze(-1)).squeeze(-1)
                    if embeds is not None:
                        row *= 1.0 + torch.bmm(embeds, embeds[problem_ids, pick].unsqueeze(-1)).squeeze(-1)
                delta = padded_norms + padded_norms.gather(1, pick[:, None]) - 2.0 * row.double()
                delta = torch.where(active[:, None], delta, torch.zeros_like(delta))
                c1 += delta
                c2 -= delta
                taken = c2[problem_ids, pick]
                c2[problem_ids, pick] = torch.where(active, torch.full_like(taken, torch.inf), taken)
            written += bin_size

    local_order = torch.empty(x.shape[0], dtype=torch.int64, device=device)
    picked = torch.from_numpy(counts - problems.bin_sizes[:, -1]).to(device)
    is_pick = local < picked[problem]
    local_order[is_pick] = order[problem[is_pick], local[is_pick]]
    rest_of_pools(local_order, c2[problem, local], problems, problem)
    return EngineRun(local_order, "torch", form)


# --------------------------------------------------------------------------- Triton engine


def run_triton(
    problems: Problems,
    lam: float,
    form: str,
    gram_precision: str = "tf32x3",
    kernel: Optional[str] = None,
    block: int = 0,
    use_graph: Optional[bool] = None,
) -> EngineRun:
    """The Triton kernels. kernel: "triton-persistent" or "triton-fused", default by size (the
    persistent kernel for the Gram form up to PERSISTENT_MAX_N samples per problem); block: a
    BLOCK override for tests; use_graph: replay bins from a CUDA graph (default: on CUDA)."""
    from dqkernels.graphcut.kernels.fused_step import FusedStep
    from dqkernels.graphcut.kernels.packed_gram import packed_gram
    from dqkernels.graphcut.kernels.persistent_bins import persistent_bins

    if gram_precision not in GRAM_PRECISIONS:
        raise InputError(f"gram_precision must be one of {GRAM_PRECISIONS}, got {gram_precision!r}")
    x, embed = problems.x, problems.embed
    counts = problems.counts
    if kernel is None:
        small = int(counts.max()) <= PERSISTENT_MAX_N
        kernel = "triton-persistent" if form == "gram" and small else "triton-fused"
    if kernel == "triton-persistent" and form != "gram":
        raise InputError("the persistent kernel reads Gram rows: it needs form='gram'")
    problem = problem_of_rows(problems.offsets, x.device)
    norms = row_norms(x, embed)
    c2 = initial_c2(problems, norms, problem)
    rows, embed_rows, precision = x, embed, gram_precision
    if gram_precision == "bf16" and x.dtype == torch.float32:
        rows = x.to(torch.bfloat16)
        embed_rows = None if embed is None else embed.to(torch.bfloat16)
        precision = "ieee"
    gram = packed_gram(rows, embed_rows, counts, precision) if form == "gram" else None
    if kernel == "triton-persistent":
        order = persistent_bins(gram, problems.offsets, norms, c2, problems.bin_sizes, lam, block=block)
        return EngineRun(order, kernel, form)
    fused = FusedStep(problems.offsets, norms, c2, lam, gram=gram, x=rows, embed=embed_rows, block=block)
    if use_graph is None:
        use_graph = x.is_cuda
    fused.run_bins(problems.bin_sizes, use_graph)
    rest_of_pools(fused.order, c2, problems, problem)
    return EngineRun(fused.order, kernel, form)


# --------------------------------------------------------------------------- output


def check_local_order(local_order: torch.Tensor, offsets: np.ndarray, kernel: str) -> None:
    """``api.check_engine_order`` on the device: each problem's slice must be a permutation of
    its local ids. Raises EngineError naming the kernel otherwise."""
    device = local_order.device
    m = int(offsets[-1])
    if tuple(local_order.shape) != (m,):
        raise EngineError(f"the {kernel} engine returned {tuple(local_order.shape)} ids for {m} samples")
    problem = problem_of_rows(offsets, device)
    counts = torch.from_numpy(np.diff(offsets)).to(device)
    starts = torch.from_numpy(offsets[:-1]).to(device)
    valid = (local_order >= 0) & (local_order < counts[problem])
    seen = torch.zeros(m, dtype=torch.bool, device=device)
    seen[(starts[problem] + local_order)[valid]] = True
    if bool(valid.all()) and bool(seen.all()):
        return
    raise EngineError(
        f"the {kernel} engine returned an order that is not a partition of the samples: its "
        "scores were not finite or it has a bug; the result was discarded"
    )


def assemble(local_order: torch.Tensor, perm: Optional[torch.Tensor], offsets: np.ndarray, bin_sizes: np.ndarray):
    """Global (order (M,) int64 tensor, bin_offsets (N+1,) int64 numpy): dataset bin n is every
    problem's bin n, problems in order (``api._assemble`` on the device)."""
    device = local_order.device
    n_problems, n_bins = bin_sizes.shape
    starts = torch.from_numpy(offsets[:-1]).to(device)
    problem = problem_of_rows(offsets, device)
    sample = starts[problem] + local_order
    if perm is not None:
        sample = perm[sample]
    # Piece (p, b) sits at local start offsets[p] + Σ_{b'<b} sizes[p, b'] and goes to global
    # start Σ_{b'<b} |bin b'| + Σ_{p'<p} sizes[p', b].
    source_start = offsets[:-1, None] + np.cumsum(bin_sizes, axis=1) - bin_sizes
    bin_totals = bin_sizes.sum(axis=0)
    target_start = (np.cumsum(bin_totals) - bin_totals)[None, :] + np.cumsum(bin_sizes, axis=0) - bin_sizes
    piece = torch.repeat_interleave(
        torch.arange(n_problems * n_bins, device=device), torch.from_numpy(bin_sizes.reshape(-1)).to(device)
    )
    shift = torch.from_numpy((target_start - source_start).reshape(-1).astype(np.int64)).to(device)
    target = torch.arange(local_order.shape[0], device=device) + shift[piece]
    order = torch.empty_like(sample)
    order[target] = sample
    bin_offsets = np.concatenate([[0], np.cumsum(bin_totals)]).astype(np.int64)
    return order, bin_offsets
