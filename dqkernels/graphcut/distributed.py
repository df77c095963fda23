"""GraphCut bins (docs/method.md §1) across processes and machines with torch.distributed.

One process per GPU (NCCL) or per CPU socket (gloo), launched by ``torchrun``; the caller
initialises the process group. Two ways to split the work, both giving the single-process
engine's bins:

- ``mode="classes"``: classes are independent problems. They are dealt to ranks so that each
  rank's total cost Σ|class|²·d is balanced (largest first, to the least loaded rank); every
  rank bins its classes with the local engine (C++ on the CPU, the batched torch engine on a
  GPU), and the local pick orders are gathered on one rank.
- ``mode="rows"``: every problem's rows are split into contiguous slices, one per rank. Each
  rank keeps the running score of its slice (docs/method.md §1 incremental form, float64). Per greedy step:
  one all-gather of every rank's local best (score, position, norm) picks the winner (highest
  score, lowest position on ties), the winner's row goes from its owner to every rank, and every
  rank updates its scores. The part of the update that needs no row (n_x + n_x*) runs while the
  row is in flight. With NCCL the row travels in an all-reduce to which the other ranks add
  zeros, so the owner never has to be known on the host and the loop stays queued on the GPU;
  with gloo it is a broadcast from the owner, gloo's cheapest collective.

Every rank only reads its own rows of the features: a memory-mapped ``.npy`` (or its path) is
never loaded whole. Bad input on any rank, or ranks that disagree about the input, raise the
same ValueError/TypeError on every rank; a rank that dies or stops answering makes every other
rank raise ``PeerFailureError`` as soon as its transport notices, at the latest after the process
group's timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from dqkernels.core.checksum import block_digests, combine_digests, features_checksum
from dqkernels.core.errors import InputError, InputTypeError
from dqkernels.core.validate import (
    GradEmbedding,
    as_choice,
    as_float_view,
    as_positive_float,
    as_positive_int,
    load_float_matrix,
    source_dtype_name,
)
from dqkernels.graphcut.api import (
    METRICS,
    BinResult,
    _assemble,
    _choose_forms,
    _version,
    bins_and_precision,
    check_engine_order,
    default_memory_budget,
    problem_layout,
)
from dqkernels.graphcut.prepare import (
    power_of_two_exponent,
    unit_rows,
    working_features,
)
from dqkernels.graphcut.prepare import row_chunks as _row_chunks
from dqkernels.graphcut.sizes import split_sizes

MODES = ("auto", "classes", "rows")
# The longest a rank waits for another (torchrun jobs started by make_bins_distributed). In per-class
# mode a rank also waits this long for the slowest rank to finish its classes.
DEFAULT_TIMEOUT_S = 1800
# Pools up to this size get C2 summed pair by pair, like the C++ engine's small pools.
_PAIRWISE_C2_MAX_POOL = 64


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def require_torchrun(what: str, example: str) -> None:
    """InputError unless torchrun's environment is set: ``what`` runs under torchrun, e.g.
    ``example`` (a command line)."""
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise InputError(f"{what} runs under torchrun ({', '.join(missing)} not set), e.g. {example}")


class PeerFailureError(ConnectionError):
    """A collective operation failed: another rank died, left the job, or did not answer within
    the process group's timeout."""


# --------------------------------------------------------------------------- communication


@dataclass
class _Ranks:
    """One process group and the device its collectives' tensors live on.

    group: the torch ProcessGroup (None: the default group); rank / size: this process's rank
    and the number of ranks in the group; backend: "gloo" or "nccl"; device: where collective
    tensors must be (cuda for NCCL, cpu for gloo). Every collective turns a transport failure
    into ``PeerFailureError`` naming this rank and what it was doing.
    """

    group: object
    rank: int
    size: int
    backend: str
    device: object

    @classmethod
    def of(cls, group) -> _Ranks:
        if not (dist.is_available() and dist.is_initialized()):
            raise InputError(
                "graphcut_bins_distributed needs an initialised process group: call "
                "torch.distributed.init_process_group (torchrun sets up its environment)"
            )
        backend = str(dist.get_backend(group)).lower()
        if backend not in ("gloo", "nccl"):
            raise InputError(f"process group backend must be gloo or nccl, got {backend!r}")
        device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )
        return cls(group, dist.get_rank(group), dist.get_world_size(group), backend, device)

    @contextlib.contextmanager
    def _collective(self, what: str):
        try:
            yield
        except RuntimeError as error:  # torch.distributed.DistError and gloo's errors
            raise PeerFailureError(
                f"rank {self.rank}: lost the other ranks while {what}: one died, left the job or "
                f"did not answer within the process group's timeout ({' '.join(str(error).split())})"
            ) from error

    def gather_objects(self, value, what: str) -> list:
        """Every rank's picklable ``value``, in rank order, on every rank."""
        values = [None] * self.size
        with self._collective(what):
            dist.all_gather_object(values, value, group=self.group)
        return values

    def all_reduce(self, tensor, what: str, op: str = "sum", async_op: bool = False):
        """In-place all-reduce (op "sum" or "max"); returns the work handle when ``async_op``."""
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        with self._collective(what):
            return dist.all_reduce(tensor, op=reduce_op, group=self.group, async_op=async_op)

    def broadcast(self, tensor, src: int, what: str):
        """Asynchronous in-place broadcast from group rank ``src``; returns the work handle."""
        global_src = src if self.group is None else dist.get_global_rank(self.group, src)
        with self._collective(what):
            return dist.broadcast(tensor, src=global_src, group=self.group, async_op=True)

    def wait(self, work, what: str) -> None:
        with self._collective(what):
            work.wait()

    def all_gather(self, out, tensor, what: str) -> None:
        """out (size·k,) ← every rank's tensor (k,), in rank order."""
        # Newer torch calls all_gather_into_tensor all_gather_single.
        gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        with self._collective(what):
            gather_into(out, tensor, group=self.group)

    def gather(self, tensor, dst: Optional[int], what: str):
        """(size, k) stack of every rank's tensor (k,) on rank ``dst`` (every rank when None);
        None on the other ranks."""
        out = tensor.new_empty((self.size, tensor.numel()))
        if dst is None:
            self.all_gather(out.view(-1), tensor, what)
            return out
        parts = list(out.unbind(0)) if self.rank == dst else None
        global_dst = dst if self.group is None else dist.get_global_rank(self.group, dst)
        with self._collective(what):
            dist.gather(tensor, parts, dst=global_dst, group=self.group)
        return out if self.rank == dst else None

    def agree(self, failure: Optional[BaseException], what: str, info=None) -> list:
        """Raise on every rank the lowest rank's ``failure`` (ValueError / TypeError, message
        prefixed with that rank), so no rank is left waiting in a later collective.

        Returns every rank's ``info`` (any picklable value) when no rank failed.
        """
        reports = self.gather_objects(
            (None if failure is None else (type(failure).__name__, str(failure)), info), what
        )
        for rank, (report, _) in enumerate(reports):
            if report is not None:
                kind, message = report
                error_type = {
                    "InputError": InputError, "InputTypeError": InputTypeError, "TypeError": TypeError
                }.get(kind, ValueError)
                raise error_type(f"rank {rank}: {message}")
        return [info for _, info in reports]


# --------------------------------------------------------------------------- the input


@dataclass
class _Plan:
    """What every rank agrees to compute.

    source: (M, d) float array, possibly memory-mapped (only this rank's rows are ever read),
        or a GradEmbedding of two such arrays.
    labels: (M,) int64 or None. perm: (M,) int64 sample ids grouped by problem (ascending
        within a problem); offsets: (P+1,) int64 problem boundaries in perm; bin_sizes: (P, N).
    dtype: working dtype (np.float32 / np.float64). mode: "classes" or "rows".
    description: what the ranks compare to detect mismatched input.
    """

    source: object
    labels: Optional[np.ndarray]
    perm: np.ndarray
    offsets: np.ndarray
    bin_sizes: np.ndarray
    dtype: type
    mode: str
    meta: dict
    description: dict


def _as_row_source(value, name: str) -> np.ndarray:
    """A 2-D floating numpy view of ``value`` (array, memmap, torch CPU tensor or .npy path)
    without reading its rows: finiteness is checked later, on the rows each rank reads."""
    if isinstance(value, (str, os.PathLike)):
        value = load_float_matrix(Path(value), name)
    return as_float_view(value, name)


def _plan(features, bins, labels, metric, lam, mode, sizes, precision, dst, ranks) -> _Plan:
    """Validate the arguments (reading no feature rows) and fix the problems and bin sizes."""
    as_choice(metric, METRICS, "metric")
    as_choice(mode, MODES, "mode")
    lam = as_positive_float(lam, "lam")
    if dst is not None and (isinstance(dst, bool) or not isinstance(dst, int) or not 0 <= dst < ranks.size):
        raise InputError(f"dst must be None or a rank in [0, {ranks.size}), got {dst!r}")
    if isinstance(features, GradEmbedding):
        delta = _as_row_source(features.delta, "features.delta")
        embed = _as_row_source(features.embed, "features.embed")
        if len(delta) != len(embed):
            raise InputError(f"features.delta has {len(delta)} rows but features.embed has {len(embed)}")
        source = GradEmbedding(delta, embed)
        input_dtype = np.result_type(delta.dtype, embed.dtype)
        source_dtype = ",".join(
            sorted({source_dtype_name(features.delta), source_dtype_name(features.embed)})
        )
        dims = [int(delta.shape[1]), int(embed.shape[1])]
    else:
        source = _as_row_source(features, "features")
        input_dtype = source.dtype
        source_dtype = source_dtype_name(source if isinstance(features, (str, os.PathLike)) else features)
        dims = [int(source.shape[1])]
    m = len(source.delta) if isinstance(source, GradEmbedding) else len(source)
    n_bins, precision = bins_and_precision(bins, m, precision, input_dtype)
    if mode == "auto":
        mode = "classes" if labels is not None else "rows"
    if mode == "rows" and isinstance(source, GradEmbedding):
        raise InputError(
            "mode='rows' needs plain features; bin gradient embeddings per class (mode='classes')"
        )

    if labels is None and mode == "classes":
        raise InputError("mode='classes' needs labels")
    label_array, perm, bin_sizes, offsets = problem_layout(labels, m, n_bins, sizes)
    meta = {
        "metric": metric,
        "lam": float(lam),
        "bins": n_bins,
        "per_class": labels is not None,
        "M": m,
        "dims": dims,
        "gradient_embedding": isinstance(source, GradEmbedding),
        "dtype": source_dtype,
        "precision": precision,
        "sizes": sizes if isinstance(sizes, str) else [int(s) for s in bin_sizes[0]],
        "version": _version(),
    }
    labels_digest = None
    if label_array is not None:
        labels_digest = hashlib.blake2b(np.ascontiguousarray(label_array).data, digest_size=16).hexdigest()
    description = dict(meta, mode=mode, dst=dst, labels=labels_digest, input_dtype=str(input_dtype))
    dtype = np.float32 if precision == "float32" else np.float64
    return _Plan(source, label_array, perm, offsets, bin_sizes, dtype, mode, meta, description)


def _check_finite(block: np.ndarray, ids: np.ndarray, name: str = "features") -> None:
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        raise InputError(f"{name} contains NaN or inf (first at row {int(ids[np.flatnonzero(~finite)[0]])})")


# --------------------------------------------------------------------------- per-class mode


def deal_classes(class_counts, dims: int, n_ranks: int) -> np.ndarray:
    """(P,) int64 rank of each class, balancing Σ|class|²·d per rank.

    Largest cost first, each to the rank with the least cost so far (lowest rank on ties): the
    same answer on every rank, and no rank has more than the balanced share plus one class.
    """
    cost = np.asarray(class_counts, dtype=np.float64) ** 2 * dims
    load = np.zeros(n_ranks)
    owner = np.empty(len(cost), dtype=np.int64)
    for problem in np.argsort(-cost, kind="stable"):
        rank = int(np.argmin(load))
        owner[problem] = rank
        load[rank] += cost[problem]
    return owner


def _local_cores() -> int:
    """Cores for this rank: the machine's, shared among the ranks torchrun started on it."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _bin_classes(plan: _Plan, ranks: _Ranks, device, threads, dst) -> tuple:
    """Bin this rank's classes, gather every rank's pick orders on ``dst``.

    Returns ((M,) int64 local pick order per problem at its offset — the engines' layout — on
    ``dst`` (every rank when dst is None), else None; the forms the engines used).
    """
    counts = np.diff(plan.offsets)
    owner = deal_classes(counts, sum(plan.meta["dims"]), ranks.size)
    mine = np.flatnonzero(owner == ranks.rank)
    local_offsets = np.concatenate([[0], np.cumsum(counts[mine])]).astype(np.int64)
    failure, form = None, None
    local_order = np.empty(0, dtype=np.int64)
    try:
        if len(mine):
            local_perm = np.concatenate([plan.perm[plan.offsets[p] : plan.offsets[p + 1]] for p in mine])
            x, embed = _class_working_rows(plan, local_perm, local_offsets)
            local_order, form = _local_engine(
                x, embed, local_offsets, plan.bin_sizes[mine], plan.meta["lam"], plan.dtype, device, threads
            )
    except (ValueError, TypeError) as error:
        failure = error
    forms = ranks.agree(failure, "binning this rank's classes", info=form)

    rows_per_rank = np.bincount(owner, weights=counts, minlength=ranks.size).astype(np.int64)
    padded = torch.full((int(rows_per_rank.max()),), -1, dtype=torch.int64)
    padded[: len(local_order)] = torch.from_numpy(np.asarray(local_order, dtype=np.int64))
    gathered = ranks.gather(padded.to(ranks.device), dst, "gathering the pick orders")
    if gathered is None:
        return None, forms
    gathered = gathered.cpu().numpy()
    order = np.empty(int(plan.offsets[-1]), dtype=np.int64)
    for rank in range(ranks.size):
        written = 0
        for p in np.flatnonzero(owner == rank):
            lo, hi = plan.offsets[p], plan.offsets[p + 1]
            order[lo:hi] = gathered[rank, written : written + hi - lo]
            written += hi - lo
    return order, forms


def _class_working_rows(plan: _Plan, local_perm: np.ndarray, local_offsets: np.ndarray):
    """``api._working_features`` of this rank's classes: (x (n, d), embed (n, D) or None) in the
    working dtype, rows in ``local_perm`` order; only these n rows are read.

    Errors name the sample ids of the whole data set.
    """
    metric = plan.meta["metric"]
    if isinstance(plan.source, GradEmbedding):
        x, embed = working_features(plan.source, metric, local_perm, local_offsets, plan.dtype)
        _check_finite(x, local_perm)
        _check_finite(embed, local_perm)
        return x, embed
    rows = plan.source[local_perm]
    _check_finite(rows, local_perm)
    if metric == "cosine":
        zero = np.flatnonzero(~rows.any(axis=1))
        if len(zero):
            raise InputError(
                f"features: row {int(local_perm[zero[0]])} is all zeros; cosine needs non-zero rows "
                "(use metric='euclidean')"
            )
    return working_features(rows, metric, np.arange(len(rows)), local_offsets, plan.dtype)


def _local_engine(x, embed, offsets, bin_sizes, lam, dtype, device, threads):
    """The fastest engine here: the C++ engine on the CPU, the batched torch engine on a GPU.

    Returns ((n,) int64 local pick orders at the problems' offsets, form name).
    """
    counts = np.diff(offsets)
    if device.type != "cpu":
        from dqkernels.graphcut.torch_engine import graphcut_bins_torch

        order = graphcut_bins_torch(x, embed, offsets, bin_sizes, lam, device)
        check_engine_order(order, offsets, "torch")
        return order, "gram"
    try:
        from dqkernels.graphcut import _C
    except ImportError as error:
        raise InputError(
            f"the C++ engine is not built ({error}); reinstall with `pip install -e .`"
        ) from None
    threads = threads or _local_cores()
    dims = x.shape[1] + (0 if embed is None else embed.shape[1])
    budget = default_memory_budget() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    use_gram = _choose_forms(counts, dims, dtype, "auto", budget, threads)
    order = _C.graphcut_cpu(x, embed, offsets, bin_sizes, lam, use_gram, int(threads))
    check_engine_order(order, offsets, "cpu")
    return order, "+".join(sorted({"gram" if g else "stream" for g in use_gram.tolist()}))


# --------------------------------------------------------------------------- row-sharded mode


def shard_bounds(n: int, n_ranks: int) -> np.ndarray:
    """(n_ranks+1,) int64: rank r holds positions [bounds[r], bounds[r+1]) of an n-row problem
    (``np.array_split`` sizes)."""
    return np.concatenate([[0], np.cumsum(split_sizes(n, n_ranks))]).astype(np.int64)


def _working_slice(source, metric, ids, problem_size, m_total, dtype, ranks):
    """This rank's rows of one problem as the engine sees them: (len(ids)+1, d) ``dtype``.

    Same transform as ``api._working_features`` (cosine: unit rows; then centred), but centred
    on the whole problem's mean, summed in float64 across ranks. The extra last row is a zero
    sentinel: an empty slice still proposes a candidate, which never wins.
    """
    rows = np.zeros((len(ids) + 1, source.shape[1]), dtype=dtype)
    column_sum = np.zeros(source.shape[1])
    failure = None
    try:
        for start, chunk in _row_chunks(ids):
            block = source[chunk]
            _check_finite(block, chunk)
            if metric == "cosine":
                unit = unit_rows(block, chunk, dtype)
                column_sum += unit.sum(axis=0, dtype=np.float64)
                rows[start : start + len(chunk)] = unit
            else:
                column_sum += block.sum(axis=0, dtype=np.float64)
    except (ValueError, TypeError) as error:
        failure = error
    ranks.agree(failure, "reading this rank's rows")
    column_sum = torch.from_numpy(column_sum).to(ranks.device)
    ranks.all_reduce(column_sum, "summing the problem's rows")
    mean = column_sum.cpu().numpy() / problem_size
    if metric == "cosine":
        rows[: len(ids)] -= mean.astype(dtype)
        return rows
    # The problem's largest centred entry, over every rank, sets the exact power-of-two scale
    # (as graphcut.prepare does in one process).
    peak = 0.0
    for _, chunk in _row_chunks(ids):
        peak = max(peak, float(np.abs(source[chunk].astype(np.float64) - mean).max()))
    peak_tensor = torch.tensor([peak], dtype=torch.float64, device=ranks.device)
    ranks.all_reduce(peak_tensor, "comparing the rows' magnitudes", op="max")
    exponent = power_of_two_exponent(float(peak_tensor.item()))
    for start, chunk in _row_chunks(ids):
        rows[start : start + len(chunk)] = np.ldexp(source[chunk].astype(np.float64) - mean, exponent)
    return rows


def _float64_matvec(rows, vector, chunk_rows: int = 1 << 16):
    """rows (n, d) any float dtype · vector (d,) float64 → (n,) float64, in row chunks."""
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)
    for lo in range(0, rows.shape[0], chunk_rows):
        out[lo : lo + chunk_rows] = rows[lo : lo + chunk_rows].double() @ vector
    return out


def _pool_sums(rows, norms, pool, chunk_rows: int = 1 << 16):
    """(d+2,) float64 [Σ_{p∈R} f_p, Σ_{p∈R} n_p, |R|] over this rank's pool rows."""
    pool_f = pool.double()
    column_sum = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    for lo in range(0, rows.shape[0], chunk_rows):
        column_sum += pool_f[lo : lo + chunk_rows] @ rows[lo : lo + chunk_rows].double()
    return torch.cat([column_sum, (norms * pool_f).sum().reshape(1), pool_f.sum().reshape(1)])


def _pairwise_c2(rows, norms, pool, ranks: _Ranks):
    """(m+1,) float64 C2 of this rank's pool rows, summed pair by pair over the whole pool.

    For pools of at most _PAIRWISE_C2_MAX_POOL rows: every rank gathers the pool's rows (in
    position order) and forms the same symmetric distance matrix, so d(p, x) = d(x, p) bit for
    bit and true ties (a pool of two always ties) stay exact, to go to the lowest position.
    """
    device, width = rows.device, rows.shape[1] + 2
    local = torch.nonzero(pool).squeeze(1)
    # Per pool row: [1 (a row, not padding), n_x, f_x]; each rank sends _PAIRWISE_C2_MAX_POOL slots.
    slots = torch.zeros((_PAIRWISE_C2_MAX_POOL, width), dtype=torch.float64, device=device)
    slots[: len(local), 0] = 1.0
    slots[: len(local), 1] = norms[local]
    slots[: len(local), 2:] = rows[local].double()
    gathered = torch.empty((ranks.size * _PAIRWISE_C2_MAX_POOL, width), dtype=torch.float64, device=device)
    ranks.all_gather(gathered.view(-1), slots.view(-1), "gathering a small pool")
    present = gathered[:, 0] > 0
    pool_norms, pool_rows = gathered[present, 1], gathered[present, 2:]
    gram = pool_rows @ pool_rows.T
    gram = (gram + gram.T) / 2.0
    distances = pool_norms[:, None] + pool_norms[None, :] - 2.0 * gram
    distances.fill_diagonal_(0.0)
    before = int(present.view(ranks.size, -1)[: ranks.rank].sum())
    c2 = torch.zeros(rows.shape[0], dtype=torch.float64, device=device)
    c2[local] = distances.sum(dim=0)[before : before + len(local)]
    return c2


def greedy_rows(rows, norms, first_position: int, bin_sizes, lam: float, ranks: _Ranks):
    """Greedy bins of one problem whose rows are split across the ranks (docs/method.md §1, incremental).

    rows: (m+1, d) float32/float64 tensor on ``ranks.device`` — this rank's m rows, problem
        positions first_position .. first_position+m−1, then a zero sentinel row.
    norms: (m+1,) float64 n_x = ‖f_x‖². bin_sizes: (N,) ints of the whole problem.
    Returns (n,) int64 problem positions in pick order, bin after bin; the last bin is the
    rest of the pool, ascending. Every rank returns the same array.
    """
    device = rows.device
    m = rows.shape[0] - 1
    pool = torch.ones(m + 1, dtype=torch.bool, device=device)
    pool[m] = False
    positions = torch.arange(first_position, first_position + m + 1, dtype=torch.float64, device=device)
    n_steps = int(np.sum(bin_sizes[:-1]))
    picks = torch.empty(n_steps, dtype=torch.float64, device=device)
    proposals = torch.empty(ranks.size * 3, dtype=torch.float64, device=device)
    row_buffer = torch.empty(rows.shape[1], dtype=torch.float64, device=device)
    taken = torch.tensor(-torch.inf, dtype=torch.float64, device=device)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    step = 0
    for b, size in enumerate(int(s) for s in bin_sizes[:-1]):
        if size == 0:
            continue
        if int(np.sum(bin_sizes[b:])) <= _PAIRWISE_C2_MAX_POOL:
            c2 = _pairwise_c2(rows, norms, pool, ranks)
        else:
            sums = _pool_sums(rows, norms, pool)
            ranks.all_reduce(sums, "summing the pool")
            pool_sum, pool_norm_sum, pool_count = sums[:-2], sums[-2], sums[-1]
            c2 = pool_count * norms - 2.0 * _float64_matvec(rows, pool_sum) + pool_norm_sum
        score = torch.where(pool, -lam * c2, taken)
        for _ in range(size):
            best = torch.argmax(score)  # first maximum: this rank's lowest position
            ranks.all_gather(
                proposals,
                torch.stack([score[best], positions[best], norms[best]]),
                "proposing the step's best sample",
            )
            candidates = proposals.view(ranks.size, 3)
            leaders = candidates[:, 0] == candidates[:, 0].max()
            contenders = torch.where(leaders, candidates[:, 1], torch.inf)
            winner_rank = torch.argmin(contenders)  # highest score, then lowest position
            picks[step] = contenders[winner_rank]
            owner = winner_rank == ranks.rank
            if ranks.backend == "gloo":
                # On the CPU the owner's rank costs nothing to read, and a broadcast is gloo's
                # cheapest way to ship the row (half an all-reduce's time or less).
                owner_rank = int(winner_rank)
                if owner_rank == ranks.rank:
                    row_buffer.copy_(rows[best])
                work = ranks.broadcast(row_buffer, owner_rank, "sharing the picked row")
            else:
                # NCCL: the owner stays on the GPU; the others add zeros, and the host never waits.
                torch.where(owner, rows[best].double(), zero, out=row_buffer)
                work = ranks.all_reduce(row_buffer, "sharing the picked row", async_op=True)
            # While the row travels: the row-free part of Δscore = 2δ = 2(n_x + n_x*) − 4 f_x·f_x*.
            score += 2.0 * (norms + candidates[winner_rank, 2])
            score[best] = torch.where(owner, taken, score[best])
            pool[best] &= ~owner
            ranks.wait(work, "sharing the picked row")
            score -= 4.0 * (rows @ row_buffer.to(rows.dtype)).double()
            step += 1
    picked = picks.cpu().numpy().astype(np.int64)
    total = int(np.sum(bin_sizes))
    rest = np.setdiff1d(np.arange(total, dtype=np.int64), picked, assume_unique=True)
    return np.concatenate([picked, rest])


@contextlib.contextmanager
def _torch_threads(count: int):
    """torch's CPU threads set to ``count`` for the duration (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _bin_rows(plan: _Plan, ranks: _Ranks, device) -> np.ndarray:
    """Every problem in turn, its rows sharded across the ranks. Returns the (M,) int64 local
    pick orders at the problems' offsets (the engines' layout), on every rank."""
    order = np.empty(int(plan.offsets[-1]), dtype=np.int64)
    for p, (lo, hi) in enumerate(zip(plan.offsets[:-1], plan.offsets[1:])):
        bounds = shard_bounds(int(hi - lo), ranks.size)
        start, stop = int(bounds[ranks.rank]), int(bounds[ranks.rank + 1])
        ids = plan.perm[lo + start : lo + stop]
        rows = _working_slice(
            plan.source, plan.meta["metric"], ids, int(hi - lo), int(plan.offsets[-1]), plan.dtype, ranks
        )
        norms = np.zeros(len(rows))
        for row, chunk in _row_chunks(rows):
            norms[row : row + len(chunk)] = np.einsum("ij,ij->i", chunk, chunk, dtype=np.float64)
        order[lo:hi] = greedy_rows(
            torch.from_numpy(rows).to(device),
            torch.from_numpy(norms).to(device),
            start,
            plan.bin_sizes[p],
            plan.meta["lam"],
            ranks,
        )
    return order


# --------------------------------------------------------------------------- checksum


def features_block_checksum(features) -> str:
    """``dqkernels.core.checksum.features_checksum`` of features given as arrays, memory maps, torch
    tensors or ``.npy`` paths. features: (M, d) or a GradEmbedding."""
    arrays = features if isinstance(features, GradEmbedding) else (features,)
    return features_checksum([_as_row_source(array, "features") for array in arrays])


def _distributed_checksum(source, ranks: _Ranks) -> str:
    """The features checksum with the blocks hashed round-robin by the ranks."""
    arrays = source if isinstance(source, GradEmbedding) else (source,)
    digests = {}
    for part in ranks.gather_objects(
        block_digests(arrays, ranks.rank, ranks.size), "checksumming the features"
    ):
        digests.update(part)
    return combine_digests(arrays, digests)


# --------------------------------------------------------------------------- public API


def graphcut_bins_distributed(
    features,
    bins: int = 10,
    labels=None,
    metric: str = "cosine",
    lam: float = 1.0,
    *,
    mode: str = "auto",
    sizes="split",
    precision: Optional[str] = None,
    device=None,
    threads: Optional[int] = None,
    dst: Optional[int] = 0,
    group=None,
) -> Optional[BinResult]:
    """``graphcut_bins`` across the ranks of an initialised process group; call it on every rank
    with the same arguments.

    features: (M, d) float16/bfloat16/float32/float64 array — best a memory-mapped ``.npy``
        (``np.load(path, mmap_mode="r")``) or its path, since each rank reads only its own rows
        — or a torch CPU tensor, or a ``GradEmbedding`` (mode "classes" only).
    bins, labels, metric, lam, sizes, precision: as ``graphcut_bins``.
    mode: "classes" (deal classes to ranks; needs labels), "rows" (shard every problem's rows,
        problems one after another: for one large problem), or "auto" (classes when labels are
        given, else rows).
    device: where this rank computes; default cuda:current_device() for an NCCL group (call
        ``torch.cuda.set_device(local_rank)`` first), "cpu" for gloo.
    threads: CPU threads of this rank (default: the machine's cores over LOCAL_WORLD_SIZE).
    dst: the rank that returns the result; None: every rank returns it.
    group: the process group (default: the default group).
    Returns the ``BinResult`` on ``dst`` (all ranks when None), None elsewhere. Float64 runs
    give the single-process engine's bins (pick for pick, except at exact ties).
    Raises ValueError/TypeError on every rank when any rank's input is bad or the ranks' inputs
    differ; ``PeerFailureError`` when another rank dies or times out.
    """
    ranks = _Ranks.of(group)
    plan, failure = None, None
    try:
        plan = _plan(features, bins, labels, metric, lam, mode, sizes, precision, dst, ranks)
        device = torch.device(device if device is not None else ranks.device)
        if (device.type == "cuda") != (ranks.backend == "nccl"):
            raise InputError(
                f"device={str(device)!r} does not fit a {ranks.backend} process group "
                "(NCCL runs on GPUs, gloo on the CPU)"
            )
        if threads is not None:
            as_positive_int(threads, "threads")
    except (ValueError, TypeError) as error:
        failure = error
    descriptions = ranks.agree(failure, "checking the input", info=None if plan is None else plan.description)
    for rank, description in enumerate(descriptions[1:], start=1):
        for key, value in descriptions[0].items():
            if description[key] != value:
                raise InputError(
                    f"ranks disagree on {key}: rank 0 has {value!r}, rank {rank} has "
                    f"{description[key]!r}; every rank must get the same input"
                )

    if plan.mode == "classes":
        local_order, forms = _bin_classes(plan, ranks, device, threads, dst)
        backend = "cpu" if device.type == "cpu" else "torch"
        form = "+".join(sorted({part for f in forms if f for part in f.split("+")}))
    else:
        with _torch_threads(threads or _local_cores()):
            local_order = _bin_rows(plan, ranks, device)
        backend, form = "torch", "stream"
    checksum = _distributed_checksum(plan.source, ranks)
    if dst is not None and ranks.rank != dst:
        return None
    order, bin_offsets = _assemble(local_order, plan.perm, plan.offsets, plan.bin_sizes)
    meta = dict(
        plan.meta,
        checksum=checksum,
        distributed={"mode": plan.mode, "world_size": ranks.size, "process_group": ranks.backend},
    )
    return BinResult(order, bin_offsets, plan.labels, backend, form, meta)
