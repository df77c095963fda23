"""One greedy step of P large problems in one launch (docs/method.md §1.3), for the Gram form
and the streaming form.

Grid (blocks, P): program (b, p) owns samples b·BLOCK .. b·BLOCK + BLOCK − 1 of problem p. A
launch applies the pending pick of every problem that still picks in this bin —
C1 += δ, C2 −= δ with δ(x) = n_x + n_pick − 2·k(pick, x), the kernel row read from the Gram
matrix (Gram form) or computed from the working rows (streaming form: one pass over the pool's
features, float32/float64 accumulation, bfloat16 rows allowed) — and reduces its block to
(max score, lowest position holding it). The last block of a problem to finish (an atomic
counter, reset by that block) reduces the block results to the next pick, records the applied
pick in the order and counts the step down. No program ever waits for another.

All state lives on the device and the arguments are the same at every step, so the host only
launches: a bin is ``steps + 1`` identical launches (the first only finds the first pick). A
problem whose bin is done (``remaining`` = 0 and no pending pick) does nothing, so on CUDA a
graph of GRAPH_LAUNCHES launches is captured once and replayed as often as each bin needs.

Ties go to the lowest index, written out (maximum, then smallest position holding it): the
Triton interpreter breaks argmax ties to the left whatever it is asked, so an implicit argmax
would pass every CPU test and could still differ on a GPU.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

# Launch configurations; the ahead-of-time compile test builds each of them and checks that no
# variant spills registers (a streaming step with 64-wide k-steps does).
GRAM_CONFIG = dict(BLOCK=1024, BLOCK_K=16, REDUCE=256, num_warps=4, num_stages=1)
STREAM_CONFIG = dict(BLOCK=64, BLOCK_K=32, REDUCE=256, num_warps=8, num_stages=1)
# Launches per captured CUDA graph: a bin replays it as often as it needs.
GRAPH_LAUNCHES = 256


@triton.jit
def _fused_step(
    gram_ptr,  # Gram form: (Σ n_p²,) packed Gram matrices
    gram_offsets_ptr,  # (P,) int64
    x_ptr,  # streaming form: (M, d) working rows (float32/float64/bfloat16)
    e_ptr,  # streaming form with GRADIENT: (M, D) embeddings
    row_offsets_ptr,  # (P+1,) int64
    norms_ptr,  # (M,) float64
    c1_ptr,  # (M,) float64
    c2_ptr,  # (M,) float64, +inf for taken samples
    coef_ptr,  # (2,) float64: 2 − λ, λ
    pick_ptr,  # (P,) int64: pending pick, −1 for none
    remaining_ptr,  # (P,) int64: picks left in this bin
    written_ptr,  # (P,) int64: picks recorded so far
    order_ptr,  # (M,) int64: local ids in pick order at each problem's row offset
    block_max_ptr,  # (P, max_blocks) float64 scratch
    block_pos_ptr,  # (P, max_blocks) int64 scratch
    arrived_ptr,  # (P,) int32: blocks of the current launch done; zero between launches
    d,
    dim_e,
    max_blocks,
    STREAM: tl.constexpr,
    GRADIENT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    REDUCE: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    problem = tl.program_id(1).to(tl.int64)
    lo = tl.load(row_offsets_ptr + problem)
    n = tl.load(row_offsets_ptr + problem + 1) - lo
    n_blocks = (n + BLOCK - 1) // BLOCK
    pick = tl.load(pick_ptr + problem)
    remaining = tl.load(remaining_ptr + problem)
    apply = pick >= 0
    # Blocks past the end of their problem, and problems with nothing to do, stay idle.
    live = (block < n_blocks) & (apply | (remaining > 0))
    wants_next = (remaining - apply.to(tl.int64)) > 0
    safe_pick = tl.where(apply, pick, 0)

    cols = block * BLOCK + tl.arange(0, BLOCK)
    inside = live & (cols < n)
    c1 = tl.load(c1_ptr + lo + cols, mask=inside, other=0.0)
    c2 = tl.load(c2_ptr + lo + cols, mask=inside, other=float("inf"))
    if STREAM:
        acc_type = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
        kernel_row = tl.zeros((BLOCK,), dtype=acc_type)
        for k in range(0, d, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            k_ok = ks < d
            rows = tl.load(x_ptr + (lo + cols)[:, None] * d + ks[None, :], mask=(inside & apply)[:, None] & k_ok[None, :], other=0.0)
            chosen = tl.load(x_ptr + (lo + safe_pick) * d + ks, mask=k_ok & live & apply, other=0.0)
            kernel_row += tl.sum(rows.to(acc_type) * chosen.to(acc_type)[None, :], axis=1)
        if GRADIENT:
            lift = tl.zeros((BLOCK,), dtype=acc_type)
            for k in range(0, dim_e, BLOCK_K):
                ks = k + tl.arange(0, BLOCK_K)
                k_ok = ks < dim_e
                rows = tl.load(e_ptr + (lo + cols)[:, None] * dim_e + ks[None, :], mask=(inside & apply)[:, None] & k_ok[None, :], other=0.0)
                chosen = tl.load(e_ptr + (lo + safe_pick) * dim_e + ks, mask=k_ok & live & apply, other=0.0)
                lift += tl.sum(rows.to(acc_type) * chosen.to(acc_type)[None, :], axis=1)
            kernel_row = kernel_row * (1.0 + lift)
        kernel_row = kernel_row.to(tl.float64)
    else:
        base = tl.load(gram_offsets_ptr + problem)
        kernel_row = tl.load(gram_ptr + base + safe_pick * n + cols, mask=inside & apply, other=0.0).to(tl.float64)
    norm = tl.load(norms_ptr + lo + cols, mask=inside & apply, other=0.0)
    pick_norm = tl.load(norms_ptr + lo + safe_pick, mask=live & apply, other=0.0)
    delta = norm + pick_norm - 2.0 * kernel_row
    c1 = tl.where(apply, c1 + delta, c1)
    c2 = tl.where(apply, tl.where(cols == pick, float("inf"), c2 - delta), c2)
    tl.store(c1_ptr + lo + cols, c1, mask=inside & apply)
    tl.store(c2_ptr + lo + cols, c2, mask=inside & apply)

    score = tl.load(coef_ptr) * c1 - tl.load(coef_ptr + 1) * c2
    top = tl.max(score, axis=0)
    top_pos = tl.min(tl.where(score == top, cols, n), axis=0)
    tl.store(block_max_ptr + problem * max_blocks + block, top, mask=live)
    tl.store(block_pos_ptr + problem * max_blocks + block, top_pos, mask=live)
    # Every thread's stores come before the arrival is counted (release, GPU scope).
    tl.debug_barrier()
    arrived = tl.atomic_add(arrived_ptr + problem, 1, mask=live, sem="acq_rel", scope="gpu")
    last = live & (arrived == n_blocks - 1)
    tl.debug_barrier()

    # The last block: reduce the blocks' results, lowest position among equal maxima.
    best = tl.full((), float("-inf"), tl.float64)
    best_pos = n * 0
    for start in range(0, max_blocks, REDUCE):
        ids = start + tl.arange(0, REDUCE)
        valid = last & (ids < n_blocks)
        maxima = tl.load(block_max_ptr + problem * max_blocks + ids, mask=valid, other=float("-inf"), cache_modifier=".cg")
        positions = tl.load(block_pos_ptr + problem * max_blocks + ids, mask=valid, other=0, cache_modifier=".cg")
        top = tl.max(maxima, axis=0)
        top_pos = tl.min(tl.where(valid & (maxima == top), positions, n), axis=0)
        better = top > best
        best = tl.where(better, top, best)
        best_pos = tl.where(better, top_pos, best_pos)
    written = tl.load(written_ptr + problem, mask=last, other=0)
    tl.store(order_ptr + lo + written, pick, mask=last & apply)
    tl.store(written_ptr + problem, written + apply.to(tl.int64), mask=last)
    tl.store(remaining_ptr + problem, remaining - apply.to(tl.int64), mask=last)
    tl.store(pick_ptr + problem, tl.where(wants_next, best_pos, -1), mask=last)
    tl.store(arrived_ptr + problem, 0, mask=last)


class FusedStep:
    """The device state of a fused-step binning and its launch.

    P problems with row ``offsets`` (P+1,), Gram form (``gram`` packed buffer) or streaming form
    (``x`` (M, d) rows, ``embed`` (M, D) or None); ``norms`` and ``c2`` (M,) float64 on the
    device (C2 over each whole problem; updated in place). ``step()`` launches one step with the
    same arguments every time; ``start_bin(sizes)`` arms the next bin; ``order`` (M,) holds the
    picks at each problem's row offset.
    """

    def __init__(self, offsets, norms, c2, lam, gram=None, x=None, embed=None, block: int = 0):
        from dqkernels.graphcut.kernels.packed_gram import gram_offsets

        device = norms.device
        self.stream = gram is None
        config = dict(STREAM_CONFIG if self.stream else GRAM_CONFIG)
        if block:
            config["BLOCK"] = block
        self.config = config
        counts = np.diff(offsets)
        self.n_problems = len(counts)
        self.max_blocks = int(-(-counts.max() // config["BLOCK"]))
        m = int(offsets[-1])
        self.norms, self.c2 = norms, c2
        self.c1 = torch.zeros(m, dtype=torch.float64, device=device)
        self.order = torch.empty(m, dtype=torch.int64, device=device)
        self.pick = torch.full((self.n_problems,), -1, dtype=torch.int64, device=device)
        self.remaining = torch.zeros(self.n_problems, dtype=torch.int64, device=device)
        self.written = torch.zeros(self.n_problems, dtype=torch.int64, device=device)
        self.block_max = torch.empty((self.n_problems, self.max_blocks), dtype=torch.float64, device=device)
        self.block_pos = torch.empty((self.n_problems, self.max_blocks), dtype=torch.int64, device=device)
        # The arrival counters must start at zero; each launch leaves them at zero.
        self.arrived = torch.zeros(self.n_problems, dtype=torch.int32, device=device)
        self.coefficients = torch.tensor([2.0 - lam, lam], dtype=torch.float64, device=device)
        self.row_offsets = torch.from_numpy(np.asarray(offsets, dtype=np.int64)).to(device)
        self.gram_offsets = torch.from_numpy(gram_offsets(counts)).to(device)
        placeholder = norms  # any device tensor for the operands a form does not read
        self.gram = placeholder if gram is None else gram
        self.x = placeholder if x is None else x.contiguous()
        self.embed = self.x if embed is None else embed.contiguous()
        self.gradient = embed is not None

    def start_bin(self, sizes: torch.Tensor) -> None:
        """Arm a bin: ``sizes`` (P,) int64 picks per problem; C1 restarts at zero."""
        self.remaining.copy_(sizes)
        self.pick.fill_(-1)
        self.c1.zero_()

    def step(self) -> None:
        _fused_step[(self.max_blocks, self.n_problems)](
            self.gram, self.gram_offsets, self.x, self.embed, self.row_offsets,
            self.norms, self.c1, self.c2, self.coefficients,
            self.pick, self.remaining, self.written, self.order,
            self.block_max, self.block_pos, self.arrived,
            self.x.shape[1] if self.stream else 1,
            self.embed.shape[1] if self.stream else 1,
            self.max_blocks,
            STREAM=self.stream, GRADIENT=self.stream and self.gradient,
            BLOCK=self.config["BLOCK"], BLOCK_K=self.config["BLOCK_K"], REDUCE=self.config["REDUCE"],
            num_warps=self.config["num_warps"], num_stages=self.config["num_stages"],
        )

    def run_bins(self, bin_sizes: np.ndarray, use_graph: bool) -> None:
        """All bins but the last. ``use_graph`` (CUDA only): capture GRAPH_LAUNCHES launches in
        a CUDA graph once and replay it as often as each bin needs; launches past the end of a
        bin find nothing armed and do nothing."""
        sizes = torch.from_numpy(np.ascontiguousarray(bin_sizes, dtype=np.int64)).to(self.norms.device)
        steps = bin_sizes[:, :-1].max(axis=0) if bin_sizes.shape[1] > 1 else np.zeros(0, dtype=np.int64)
        launches = int(steps.max()) + 1 if len(steps) else 0
        graph, per_graph = None, min(GRAPH_LAUNCHES, launches)
        if use_graph and launches > 1:
            graph = self._capture(per_graph)
        for b, count in enumerate(steps.tolist()):
            if count == 0:
                continue
            self.start_bin(sizes[:, b])
            if graph is not None:
                for _ in range(-(-(count + 1) // per_graph)):
                    graph.replay()
            else:
                for _ in range(count + 1):
                    self.step()

    def _capture(self, launches: int):
        """A CUDA graph of ``launches`` steps. Compiles and warms the kernel first, with no bin
        armed (every program idle), so nothing changes while warming up."""
        self.remaining.zero_()
        self.pick.fill_(-1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(launches):
                self.step()
        return graph
