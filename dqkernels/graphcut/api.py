"""``graphcut_bins``: DQ bin generation (docs/method.md §1) behind one call, and its result object."""

from __future__ import annotations

import io
import json
import os
import threading
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from dqkernels.core.atomic import atomic_output
from dqkernels.core.checksum import features_checksum
from dqkernels.core.errors import EngineError, InputError
from dqkernels.core.validate import (
    GradEmbedding,
    as_choice,
    as_float_matrix,
    as_labels,
    as_positive_float,
    as_positive_int,
    source_dtype_name,
)
from dqkernels.core.version import __version__
from dqkernels.graphcut import reference
from dqkernels.graphcut.prepare import check_lam_fits, working_features
from dqkernels.graphcut.sizes import bin_sizes_per_problem

METRICS = ("cosine", "euclidean")
BACKENDS = ("auto", "cpu", "torch", "triton", "reference")
FORMS = ("auto", "gram", "stream")
PRECISIONS = ("float32", "float64")
MAX_THREADS = 1024
# Below this many dims per sample a streaming step costs about as much as reading a Gram row,
# and writing the n² Gram matrix dominates: at d = 64 the streaming form is the faster one from
# M ≈ 8 000 on, at d = 512 the Gram form is 3-4× faster (benchmarks/RESULTS.md, scaling).
_MIN_DIMS_FOR_GRAM = 128


def _version() -> str:
    return __version__


@dataclass
class BinResult:
    """Bins of a data set (docs/method.md §1 output).

    order: (M,) int64 sample ids in pick order, bin after bin.
    bin_offsets: (N+1,) int64; bin n is order[bin_offsets[n]:bin_offsets[n+1]].
    labels: (M,) int64 class of each sample when binned per class, else None.
    backend: the engine that ran ("cpu", "reference", "torch", "triton-persistent",
    "triton-fused"); form: "gram", "stream", "gram+stream" (per class), or "reference".
    meta: metric, lam, bins, per_class, M, dims, dtype, precision, sizes, version, checksum.
    """

    order: np.ndarray
    bin_offsets: np.ndarray
    labels: Optional[np.ndarray]
    backend: str
    form: str
    meta: dict = field(default_factory=dict)

    @property
    def n_bins(self) -> int:
        return len(self.bin_offsets) - 1

    @property
    def bin_of(self) -> np.ndarray:
        """(M,) int64 bin id of each sample."""
        out = np.empty(len(self.order), dtype=np.int64)
        out[self.order] = np.repeat(np.arange(self.n_bins), np.diff(self.bin_offsets))
        return out

    @property
    def bins(self) -> list:
        """Bin n's sample ids (int64 arrays, pick order), as views of ``order``."""
        return [self.order[a:b] for a, b in zip(self.bin_offsets[:-1], self.bin_offsets[1:])]

    @property
    def bin_sizes(self) -> np.ndarray:
        return np.diff(self.bin_offsets)

    def save(self, path) -> None:
        """Write one ``.npz`` (order, bin_offsets, bin_of, labels?, meta JSON) atomically."""
        arrays = {"order": self.order, "bin_offsets": self.bin_offsets, "bin_of": self.bin_of}
        if self.labels is not None:
            arrays["labels"] = self.labels
        meta = dict(self.meta, backend=self.backend, form=self.form)
        arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with atomic_output(path) as handle:
            handle.write(buffer.getvalue())


def load_bins(path) -> BinResult:
    """Read a bins ``.npz`` written by ``BinResult.save``; ValueError if it is not one."""
    if not os.path.isfile(path):
        raise InputError(f"bins file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in ("order", "bin_offsets", "labels") if name in data.files}
            meta = json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError, EOFError, RecursionError, zipfile.BadZipFile) as exc:
        raise InputError(f"not a dqkernels bins file: {path} ({exc})") from None
    for name, array in arrays.items():
        # Ids and offsets are integers: a float or complex array would be truncated silently.
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise InputError(f"bins file {path}: {name!r} must be a 1-D integer array, got {array.dtype} {array.shape}")
    if "order" not in arrays or "bin_offsets" not in arrays:
        raise InputError(f"not a dqkernels bins file: {path} (no 'order' or 'bin_offsets')")
    if not isinstance(meta, dict):
        raise InputError(f"bins file {path}: its metadata must be a JSON object")
    order = arrays["order"].astype(np.int64)
    offsets = arrays["bin_offsets"].astype(np.int64)
    labels = arrays["labels"].astype(np.int64) if "labels" in arrays else None
    m = len(order)
    if (
        offsets.ndim != 1
        or len(offsets) < 2
        or offsets[0] != 0
        or offsets[-1] != m
        or (np.diff(offsets) < 0).any()
        or not np.array_equal(np.sort(order), np.arange(m))
        or (labels is not None and len(labels) != m)
    ):
        raise InputError(f"bins file is inconsistent (not a partition of its samples): {path}")
    return BinResult(order, offsets, labels, meta.pop("backend", "?"), meta.pop("form", "?"), meta)


def default_memory_budget() -> int:
    """A quarter of physical memory, in bytes: what the Gram form may use by default."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 2 << 30


def graphcut_bins(
    features,
    bins: int = 10,
    labels=None,
    metric: str = "cosine",
    lam: float = 1.0,
    device=None,
    backend: str = "auto",
    sizes="split",
    precision: Optional[str] = None,
    form: str = "auto",
    memory_budget: Optional[int] = None,
    threads: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> BinResult:
    """Split a data set into ``bins`` non-overlapping bins by greedy GraphCut (docs/method.md §1).

    features: (M, d) float16/bfloat16/float32/float64 numpy array or torch tensor, or a
        ``GradEmbedding(delta (M, C), embed (M, D))``.
    bins: number of bins N (1 <= N <= M).
    labels: optional (M,) integers; then every class is binned on its own (per-class mode) and
        dataset bin n is the union of the classes' bin n.
    metric: "cosine" (rows L2-normalised; the official code's choice) or "euclidean".
    lam: λ > 0 of score = (2−λ)·C1 − λ·C2.
    device: None/"cpu", or "cuda"/"cuda:N" (a torch device); None means the device of a CUDA
        tensor, else the CPU.
    backend: "auto" (the C++ engine on the CPU, the Triton kernels on CUDA), "cpu" (C++ engine),
        "torch" (batched torch operations, any torch device), "triton" (the Triton kernels; CUDA,
        or CPU tensors under TRITON_INTERPRET=1), or "reference" (float64 numpy, small inputs
        only). On a torch device the features never visit the host; a CUDA tensor's checksum is
        then not computed (meta checksum None). ``result.backend`` names the kernel that ran:
        "cpu", "reference", "torch", "triton-persistent" or "triton-fused".
    sizes: "split" (np.array_split sizes), "official", or a list of N sizes (global mode).
    precision: "float32" or "float64" arithmetic; default float64 for float64 input, else float32.
    form: "gram" (one Gram matrix, then a row per step), "stream" (O(M·d) memory), or "auto":
        Gram for d >= 128 when it fits ``memory_budget`` bytes (default a quarter of RAM). On a
        torch device: Gram whenever it fits ``memory_budget`` (default the device's free memory
        on CUDA); an explicit form, or a streaming state, that does not fit is an InputError.
    threads: OpenMP threads (default: all cores).
    progress: None, or a callable(done, total) told the greedy steps done (picks in every bin but
        the last, all problems together) while the engine runs: the C++ engine every fraction of a
        second (it counts them without the GIL; the call runs in a worker thread meanwhile), the
        reference after each problem, a device engine at its start and end.
    Returns a ``BinResult``. Raises ValueError/TypeError naming the bad argument.
    """
    as_choice(metric, METRICS, "metric")
    as_choice(backend, BACKENDS, "backend")
    as_choice(form, FORMS, "form")
    if device is None:
        device = _tensor_device(features)
    device = _resolve_device(device, backend)
    lam = as_positive_float(lam, "lam")
    if backend in ("torch", "triton") or (backend == "auto" and device != "cpu"):
        return _graphcut_bins_device(
            features, bins, labels, metric, lam, device, backend, sizes, precision, form, memory_budget,
            threads, progress,
        )

    if isinstance(features, GradEmbedding):
        delta = as_float_matrix(features.delta, "features.delta")
        embed = as_float_matrix(features.embed, "features.embed")
        if len(delta) != len(embed):
            raise InputError(
                f"features.delta has {len(delta)} rows but features.embed has {len(embed)}"
            )
        user_features = GradEmbedding(delta, embed)
        input_dtype = np.result_type(delta.dtype, embed.dtype)
        source_dtype = ",".join(sorted({source_dtype_name(features.delta), source_dtype_name(features.embed)}))
        dims = [int(delta.shape[1]), int(embed.shape[1])]
    else:
        user_features = as_float_matrix(features, "features")
        input_dtype = user_features.dtype
        source_dtype = source_dtype_name(features)
        dims = [int(user_features.shape[1])]
    m = len(user_features[0]) if isinstance(user_features, GradEmbedding) else len(user_features)
    n_bins, precision = bins_and_precision(bins, m, precision, input_dtype)
    memory_budget, threads = budget_and_threads(memory_budget, threads, default_memory_budget)

    label_array, perm, bin_sizes, offsets = problem_layout(labels, m, n_bins, sizes)

    dtype = np.float32 if precision == "float32" else np.float64
    x, embed_work = working_features(user_features, metric, perm, offsets, dtype)
    check_lam_fits(lam, x, embed_work, offsets)

    if backend == "reference":
        local_order = _run_reference(x, embed_work, offsets, bin_sizes, lam, progress)
        used_backend, used_form = "reference", "reference"
    else:
        use_gram = _choose_forms(np.diff(offsets), sum(dims), dtype, form, memory_budget, threads)
        try:
            from dqkernels.graphcut import _C
        except ImportError as exc:
            raise InputError(
                f"backend={backend!r}: the C++ engine is not built ({exc}); reinstall with "
                "`pip install -e .`, or pass backend='reference'"
            ) from None

        engine_args = (x, embed_work, offsets, bin_sizes, lam, use_gram, int(threads or 0))
        if progress is None:
            local_order = _C.graphcut_cpu(*engine_args)
        else:
            local_order = _run_cpu_polled(_C, engine_args, greedy_steps(bin_sizes), progress)
        used_backend = "cpu"
        used_form = "+".join(sorted({"gram" if g else "stream" for g in use_gram.tolist()}))

    check_engine_order(local_order, offsets, used_backend)
    order, bin_offsets = _assemble(local_order, perm, offsets, bin_sizes)
    meta = _bins_meta(
        metric, lam, n_bins, labels is not None, m, dims, isinstance(user_features, GradEmbedding),
        source_dtype, precision, sizes, bin_sizes,
        features_checksum(user_features if isinstance(user_features, GradEmbedding) else (user_features,)),
    )
    return BinResult(order, bin_offsets, label_array, used_backend, used_form, meta)


def _bins_meta(metric, lam, n_bins, per_class, m, dims, gradient, source_dtype, precision, sizes, bin_sizes, checksum):
    """The metadata every BinResult records, whichever engine ran (the keys ``meta`` documents)."""
    return {
        "metric": metric,
        "lam": lam,
        "bins": n_bins,
        "per_class": per_class,
        "M": m,
        "dims": dims,
        "gradient_embedding": gradient,
        "dtype": source_dtype,
        "precision": precision,
        "sizes": sizes if isinstance(sizes, str) else [int(s) for s in bin_sizes[0]],
        "version": _version(),
        "checksum": checksum,
    }


def _tensor_device(features) -> Optional[str]:
    """The device of a CUDA tensor (or of a GradEmbedding's δ), else None."""
    value = features.delta if isinstance(features, GradEmbedding) else features
    device = getattr(value, "device", None)
    if getattr(device, "type", None) == "cuda":
        return str(device)
    return None


def _graphcut_bins_device(
    features, bins, labels, metric, lam, device, backend, sizes, precision, form, memory_budget, threads,
    progress=None,
) -> BinResult:
    """``graphcut_bins`` on a torch device: the front end, the engine and the assembly all run
    there; the order, the labels and scalars come back. ``threads`` is checked, and used by
    nothing here."""
    import torch

    from dqkernels.graphcut import device_prepare, torch_engine

    prepared = device_prepare.device_features(features, device)
    m = prepared.m
    n_bins, precision = bins_and_precision(bins, m, precision, prepared.input_dtype)
    memory_budget, threads = budget_and_threads(
        memory_budget, threads, lambda: device_prepare.default_budget(device, default_memory_budget)
    )
    label_tensor = None if labels is None else device_prepare.device_labels(labels, m, device)
    perm, class_counts = device_prepare.group_by_label(label_tensor, m, device)
    if isinstance(sizes, str):
        as_choice(sizes, ("split", "official"), "sizes")
    bin_sizes = bin_sizes_per_problem(class_counts, n_bins, sizes)
    offsets = np.concatenate([[0], np.cumsum(class_counts)]).astype(np.int64)

    dtype = torch.float32 if precision == "float32" else torch.float64
    x, embed = device_prepare.working_features(prepared, metric, perm, offsets, dtype)
    device_prepare.check_lam_fits(lam, x, embed, offsets)
    problems = torch_engine.Problems(x, embed, offsets, bin_sizes)
    use_triton = backend == "triton" or (backend == "auto" and _triton_available())
    if progress is not None:
        progress(0, greedy_steps(bin_sizes))
    used_form = torch_engine.choose_form(problems, form, memory_budget, padded=not use_triton)
    if use_triton:
        run = torch_engine.run_triton(problems, lam, used_form)
    else:
        run = torch_engine.run_torch(problems, lam, used_form)
    torch_engine.check_local_order(run.local_order, offsets, run.kernel)
    if progress is not None:
        progress(greedy_steps(bin_sizes), greedy_steps(bin_sizes))
    order, bin_offsets = torch_engine.assemble(run.local_order, perm, offsets, bin_sizes)
    meta = _bins_meta(
        metric, lam, n_bins, labels is not None, m, prepared.dims, prepared.gradient,
        prepared.source_dtype, precision, sizes, bin_sizes, device_prepare.host_checksum(prepared),
    )
    label_array = None if label_tensor is None else label_tensor.cpu().numpy()
    return BinResult(order.cpu().numpy(), bin_offsets, label_array, run.kernel, run.form, meta)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def budget_and_threads(memory_budget, threads, default_budget):
    """Checked (memory_budget bytes, threads or None); ``default_budget()`` when no budget."""
    memory_budget = default_budget() if memory_budget is None else as_positive_int(memory_budget, "memory_budget")
    if threads is not None:
        threads = as_positive_int(threads, "threads")
        if threads > MAX_THREADS:
            raise InputError(f"threads must be at most {MAX_THREADS}, got {threads}")
    return memory_budget, threads


def bins_and_precision(bins, m: int, precision, input_dtype) -> tuple:
    """Checked (bins, precision): 1 <= bins <= M; precision defaults to float64 for float64
    input, else float32."""
    n_bins = as_positive_int(bins, "bins")
    if n_bins > m:
        raise InputError(f"bins={n_bins} is more than the number of samples ({m})")
    if precision is None:
        precision = "float64" if np.dtype(input_dtype).itemsize >= 8 else "float32"
    as_choice(precision, PRECISIONS, "precision")
    return n_bins, precision


def problem_layout(labels, m: int, n_bins: int, sizes):
    """The independent problems of a binning: one per class, or one for the whole set.

    Returns (labels (M,) int64 or None, perm (M,) int64 — sample ids grouped by class, stable —,
    bin_sizes (P, N) int64, offsets (P+1,) int64 — problem p is perm[offsets[p]:offsets[p+1]]).
    """
    if labels is not None:
        label_array = as_labels(labels, m)
        perm = np.argsort(label_array, kind="stable")
        class_counts = np.unique(label_array, return_counts=True)[1]
    else:
        label_array = None
        perm = np.arange(m)
        class_counts = np.array([m])
    if isinstance(sizes, str):
        as_choice(sizes, ("split", "official"), "sizes")
    bin_sizes = bin_sizes_per_problem(class_counts, n_bins, sizes)
    offsets = np.concatenate([[0], np.cumsum(class_counts)]).astype(np.int64)
    return label_array, perm, bin_sizes, offsets


def _resolve_device(device, backend) -> str:
    """The torch device string the engines run on ("cpu" for the C++ engine and the reference)."""
    if device is None:
        return "cpu"
    name = str(device)
    if name != "cpu" and not name.startswith("cuda"):
        raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if name.startswith("cuda"):
        if backend in ("cpu", "reference"):
            raise InputError(f"backend={backend!r} runs on the CPU; it cannot use device={name!r}")
        try:
            import torch
        except ImportError:
            raise InputError(f"device={name!r} needs torch with CUDA; torch is not installed") from None
        if not torch.cuda.is_available():
            raise InputError(f"device={name!r}: no CUDA device is available to torch")
    elif backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError("backend='triton' needs device='cuda' (or TRITON_INTERPRET=1 on the CPU)")
    return name


def _choose_forms(class_counts, dims, dtype, form, memory_budget, threads) -> np.ndarray:
    """(P,) bool: Gram form per problem. A Gram matrix takes n²·itemsize bytes; when problems run
    concurrently (many classes), one per thread is alive at a time."""
    counts = np.asarray(class_counts, dtype=np.int64)
    if form == "gram":
        return np.ones(len(counts), dtype=bool)
    if form == "stream":
        return np.zeros(len(counts), dtype=bool)
    n_threads = threads or os.cpu_count() or 1
    concurrent = n_threads if len(counts) >= 2 * n_threads else 1
    gram_bytes = counts.astype(np.float64) ** 2 * np.dtype(dtype).itemsize * concurrent
    return (gram_bytes <= memory_budget) & (dims >= _MIN_DIMS_FOR_GRAM)


def greedy_steps(bin_sizes: np.ndarray) -> int:
    """Greedy steps of a binning, (P, N) int64 bin sizes: the picks of every bin but the last."""
    return int(np.asarray(bin_sizes)[:, :-1].sum())


# Seconds between two reads of the C++ engine's step counter.
_POLL_SECONDS = 0.2


def _run_cpu_polled(engine, engine_args: tuple, total: int, progress: Callable[[int, int], None]) -> np.ndarray:
    """``engine.graphcut_cpu(*engine_args)`` in a worker thread (the engine runs without the GIL)
    while this thread reads its step counter and tells ``progress(done, total)``."""
    counter = np.zeros(1, dtype=np.int64)
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["order"] = engine.graphcut_cpu(*engine_args, progress=counter)
        except BaseException as error:  # re-raised in the calling thread
            outcome["error"] = error

    # A daemon: an interrupted caller does not wait for the engine, which cannot be stopped.
    worker = threading.Thread(target=work, name="dqk-graphcut", daemon=True)
    progress(0, total)
    worker.start()
    finished = False
    while not finished:
        worker.join(_POLL_SECONDS)
        finished = not worker.is_alive()  # read before the counter: the last read sees every step
        if "error" in outcome:
            break
        progress(int(counter[0]), total)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["order"]


def _run_reference(x, embed, offsets, bin_sizes, lam, progress=None) -> np.ndarray:
    out = np.empty(offsets[-1], dtype=np.int64)
    total, done = greedy_steps(bin_sizes), 0
    for p, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        dist = reference.pairwise_sq_distances(x[lo:hi], None if embed is None else embed[lo:hi])
        out[lo:hi] = reference.greedy_bins_reference(dist, bin_sizes[p], lam)
        done += int(bin_sizes[p, :-1].sum())
        if progress is not None:
            progress(done, total)
    return out


def _assemble(local_order, perm, offsets, bin_sizes):
    """Global (order, bin_offsets): dataset bin n = each problem's bin n, problems in order."""
    n_problems, n_bins = bin_sizes.shape
    global_order = perm[local_order + np.repeat(offsets[:-1], np.diff(offsets))]
    starts = offsets[:-1, None] + np.concatenate(
        [np.zeros((n_problems, 1), dtype=np.int64), np.cumsum(bin_sizes, axis=1)[:, :-1]], axis=1
    )
    pieces = [
        global_order[starts[p, b] : starts[p, b] + bin_sizes[p, b]]
        for b in range(n_bins)
        for p in range(n_problems)
    ]
    order = np.concatenate(pieces).astype(np.int64)
    bin_offsets = np.concatenate([[0], np.cumsum(bin_sizes.sum(axis=0))]).astype(np.int64)
    return order, bin_offsets


def check_engine_order(local_order: np.ndarray, offsets: np.ndarray, backend: str) -> None:
    """O(M) self-check of an engine's output: each problem's slice of ``local_order`` must be a
    permutation of its local ids 0..n-1. Raises EngineError naming the engine otherwise — an
    engine bug or scores that stopped being finite, never a result to return."""
    local_order = np.asarray(local_order)
    m = int(offsets[-1])
    if local_order.shape != (m,):
        raise EngineError(f"the {backend} engine returned {local_order.shape} ids for {m} samples")
    sizes = np.diff(offsets)
    problem = np.repeat(np.arange(len(sizes)), sizes)
    local_size = sizes[problem]
    valid = (local_order >= 0) & (local_order < local_size)
    if valid.all():
        seen = np.zeros(m, dtype=bool)
        seen[offsets[:-1][problem] + local_order] = True
        if seen.all():
            return
    bad = int(problem[np.flatnonzero(~valid)[0]]) if not valid.all() else None
    where = f" (problem {bad})" if bad is not None else ""
    raise EngineError(
        f"the {backend} engine returned an order that is not a partition of the samples{where}: "
        "its scores were not finite or it has a bug; the result was discarded"
    )
