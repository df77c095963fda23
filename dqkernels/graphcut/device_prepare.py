"""The working copy on a torch device (docs/method.md §1): validation, class grouping, the metric
transform, centring and power-of-two scaling, without the rows leaving the device.

The same rules as ``dqkernels.graphcut.prepare.working_features`` (the numpy front end of the
CPU engine), written in torch so that a CUDA tensor is never copied to the host: only scalars
(an error flag, the class counts) come back. On CPU tensors it runs the same code, which is how it
is tested against the numpy version. The transforms agree up to the order of summation; the
power-of-two property is kept exactly: features scaled by 2^k give the same working copy, bit for
bit, because every scaling is by a power of two and every sum is taken in a fixed order.

Temporaries are bounded: float64 intermediates are made ``CHUNK_ELEMENTS`` entries at a time.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from dqkernels.core.errors import InputError, InputTypeError
from dqkernels.core.validate import GradEmbedding, as_float_matrix, as_labels
from dqkernels.graphcut.prepare import _ORDINARY_SQUARES, _SCORE_LIMIT

CHUNK_ELEMENTS = 1 << 25
_MANTISSA_BITS = {torch.float32: 23, torch.float64: 52}


@dataclass
class DeviceFeatures:
    """Validated features on the engine's device, before any transform.

    rows: (M, d) floating tensor (the caller's own tensor when it already lives there), or the δ
    of a gradient embedding, with ``embed`` (M, D). source_dtype: the caller's element type name.
    host_arrays: the numpy arrays the caller passed, for the checksum; None for tensors.
    """

    rows: torch.Tensor
    embed: Optional[torch.Tensor]
    source_dtype: str
    host_arrays: Optional[tuple]

    @property
    def m(self) -> int:
        return int(self.rows.shape[0])

    @property
    def dims(self) -> list:
        dims = [int(self.rows.shape[1])]
        return dims if self.embed is None else dims + [int(self.embed.shape[1])]

    @property
    def gradient(self) -> bool:
        return self.embed is not None

    @property
    def input_dtype(self) -> np.dtype:
        """The numpy dtype whose precision the input has (bfloat16 and float16 count as float32
        for the default precision rule, float64 as float64)."""
        widest = max(t.dtype.itemsize for t in (self.rows, self.embed) if t is not None)
        return np.dtype(np.float64) if widest >= 8 else np.dtype(np.float32)


def row_ranges(m: int, width: int):
    """(lo, hi) row ranges of about CHUNK_ELEMENTS entries for rows of ``width`` entries."""
    rows = max(1, CHUNK_ELEMENTS // max(1, width))
    for lo in range(0, m, rows):
        yield lo, min(m, lo + rows)


def _first_bad_row(rows: torch.Tensor) -> int:
    """The first row holding NaN or inf, or -1: one scalar comes back from the device."""
    bad = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    for lo, hi in row_ranges(rows.shape[0], rows.shape[1]):
        bad[lo:hi] = ~torch.isfinite(rows[lo:hi]).all(dim=1)
    if not bool(bad.any()):
        return -1
    return int(torch.nonzero(bad)[0, 0])


def _tensor_matrix(value, name: str, device) -> torch.Tensor:
    """A validated (M, d) floating tensor on ``device``; tensors already there are not copied."""
    tensor = value.detach()
    if not torch.is_floating_point(tensor):
        raise InputTypeError(f"{name} must be a floating tensor, got {tensor.dtype}")
    if tensor.dim() != 2:
        raise InputError(f"{name} must be a 2-D (samples, dims) array, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {tuple(tensor.shape)})")
    tensor = tensor.to(device)
    bad = _first_bad_row(tensor)
    if bad >= 0:
        raise InputError(f"{name} contains NaN or inf (first at row {bad})")
    return tensor


def _host_matrix(value, name: str, device):
    """(numpy array as validated by ``as_float_matrix``, its tensor on ``device``)."""
    array = as_float_matrix(value, name)
    native = array.astype(array.dtype.newbyteorder("="), copy=False)
    with warnings.catch_warnings():
        # A read-only memory map: the tensor is only ever read.
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(np.ascontiguousarray(native))
    return array, tensor.to(device)


def _is_tensor(value) -> bool:
    return isinstance(value, torch.Tensor)


def device_features(features, device) -> DeviceFeatures:
    """Validate ``features`` ((M, d) array or tensor, or a GradEmbedding) onto ``device``.

    Tensors are checked where they are (or after one device-to-device move); numpy input is
    checked on the host, where it is, and copied to the device once in its own dtype.
    Raises InputTypeError / InputError naming the argument, as ``as_float_matrix`` does.
    """
    device = torch.device(device)

    def one(value, name):
        if _is_tensor(value):
            return None, _tensor_matrix(value, name, device)
        return _host_matrix(value, name, device)

    if isinstance(features, GradEmbedding):
        delta_host, delta = one(features.delta, "features.delta")
        embed_host, embed = one(features.embed, "features.embed")
        if delta.shape[0] != embed.shape[0]:
            raise InputError(
                f"features.delta has {delta.shape[0]} rows but features.embed has {embed.shape[0]}"
            )
        names = sorted({_dtype_name(features.delta), _dtype_name(features.embed)})
        hosts = (delta_host, embed_host) if delta_host is not None and embed_host is not None else None
        return DeviceFeatures(delta, embed, ",".join(names), hosts)
    host, rows = one(features, "features")
    return DeviceFeatures(rows, None, _dtype_name(features), None if host is None else (host,))


def _dtype_name(value) -> str:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return str(np.asarray(value).dtype)
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- labels and problems


def device_labels(labels, m: int, device) -> torch.Tensor:
    """(M,) int64 labels on ``device``; the checks and messages of ``as_labels``."""
    if not _is_tensor(labels):
        return torch.from_numpy(np.ascontiguousarray(as_labels(labels, m))).to(device)
    tensor = labels.detach()
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise InputTypeError(f"labels must be integers, got dtype {str(tensor.dtype).replace('torch.', '')}")
    if tensor.dim() != 1:
        raise InputError(f"labels must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] != m:
        raise InputError(f"labels has {tensor.shape[0]} entries but there are {m} samples")
    return tensor.to(device=device, dtype=torch.int64)


def group_by_label(labels: Optional[torch.Tensor], m: int, device):
    """The problems of a binning: (perm (M,) int64 tensor or None for the identity, class counts
    (P,) int64 numpy). Samples are grouped by class in ascending class order, stably, on the
    device; only the P counts come back to the host."""
    if labels is None:
        return None, np.array([m], dtype=np.int64)
    sorted_labels, perm = torch.sort(labels, stable=True)
    counts = torch.unique_consecutive(sorted_labels, return_counts=True)[1]
    return perm, counts.cpu().numpy().astype(np.int64)


def problem_of_rows(offsets: np.ndarray, device) -> torch.Tensor:
    """(M,) int64: the problem each working row belongs to (rows are grouped by problem)."""
    counts = torch.from_numpy(np.diff(offsets)).to(device)
    return torch.repeat_interleave(torch.arange(len(counts), device=device), counts)


# --------------------------------------------------------------------------- exact powers of two


def power_of_two_exponents(peaks: torch.Tensor) -> torch.Tensor:
    """(n,) int64 k with peak·2^k in [0.5, 1); 0 where a peak is zero or not finite
    (``prepare.power_of_two_exponent``, elementwise)."""
    exponent = -torch.frexp(peaks).exponent.to(torch.int64)
    usable = (peaks > 0) & torch.isfinite(peaks)
    return torch.where(usable, exponent, torch.zeros_like(exponent))


def times_power_of_two(values: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """values·2^k, k broadcast against values: exact whenever the result is a normal number.

    2^k is applied in two halves so that each factor is a normal float64 for any k a float64
    value can need (|k| ≤ 1100), where 2^k itself would overflow."""
    half = torch.div(exponents, 2, rounding_mode="floor")
    one = torch.ones(half.shape, dtype=torch.float64, device=values.device)
    first = torch.ldexp(one, half)
    second = torch.ldexp(one, exponents - half)
    return values * first.to(values.dtype) * second.to(values.dtype)


# --------------------------------------------------------------------------- segment sums


def segment_reduce_rows(source, offsets: np.ndarray, width: int, reduce: str, device) -> torch.Tensor:
    """(P, width) float64 per-problem column sums, maxima or minima of rows ``source(lo, hi)``.

    source(lo, hi) returns rows lo..hi-1 as a (hi-lo, width) tensor; problems are the row ranges
    of ``offsets``. Rows are visited in fixed chunks and partial results combined in a fixed
    order, so the result does not depend on the device's scheduling.
    """
    n_problems = len(offsets) - 1
    initial = {"sum": 0.0, "max": -math.inf, "min": math.inf}[reduce]
    out = torch.full((n_problems, width), initial, dtype=torch.float64, device=device)
    m = int(offsets[-1])
    for lo, hi in row_ranges(m, width):
        first = int(np.searchsorted(offsets, lo, side="right")) - 1
        last = int(np.searchsorted(offsets, hi - 1, side="right")) - 1
        starts = np.maximum(offsets[first : last + 1], lo)
        ends = np.minimum(offsets[first + 1 : last + 2], hi)
        lengths = torch.from_numpy((ends - starts).astype(np.int64)).to(device)
        part = torch.segment_reduce(source(lo, hi).to(torch.float64), reduce, lengths=lengths, axis=0)
        if reduce == "sum":
            out[first : last + 1] += part
        elif reduce == "max":
            out[first : last + 1] = torch.maximum(out[first : last + 1], part)
        else:
            out[first : last + 1] = torch.minimum(out[first : last + 1], part)
    return out


# --------------------------------------------------------------------------- the working copy


def _gather(rows: torch.Tensor, perm: Optional[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    return rows[lo:hi] if perm is None else rows[perm[lo:hi]]


def _compute_dtype(dtype: torch.dtype, working: torch.dtype) -> torch.dtype:
    """float32 or float64: the precision rows are normalised in before the working cast."""
    return torch.float64 if torch.float64 in (dtype, working) else torch.float32


def unit_rows(block: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, d) rows of unit L2 norm in float32/float64 ``dtype`` (``prepare.unit_rows``).

    Squares are summed in float64. Rows whose squared norm is outside [2^-180, 2^180] are first
    multiplied by the power of two that brings their largest entry into [0.5, 1), exactly; all
    others are multiplied by the rounded 1/‖row‖, which gives the same bits.
    ids: (n,) sample ids, to name an all-zero row.
    """
    rows = block.to(dtype)
    squares = torch.einsum("ij,ij->i", rows.double(), rows.double())
    ordinary = (squares > _ORDINARY_SQUARES[0]) & (squares < _ORDINARY_SQUARES[1])
    unit = rows * (1.0 / torch.sqrt(squares)).to(dtype)[:, None]
    if bool(ordinary.all()):
        return unit
    odd = torch.nonzero(~ordinary)[:, 0]
    odd_rows = rows[odd].double()
    peak = odd_rows.abs().amax(dim=1)
    if bool((peak == 0).any()):
        row = int(ids[odd[torch.nonzero(peak == 0)[0, 0]]])
        raise InputError(
            f"features: row {row} is all zeros; cosine needs non-zero rows (use metric='euclidean')"
        )
    rescaled = times_power_of_two(odd_rows, power_of_two_exponents(peak)[:, None]).to(dtype)
    inverse_norm = 1.0 / torch.sqrt(torch.einsum("ij,ij->i", rescaled.double(), rescaled.double()))
    unit[odd] = rescaled * inverse_norm.to(dtype)[:, None]
    return unit


def _sample_ids(perm, lo, hi, device):
    return torch.arange(lo, hi, device=device) if perm is None else perm[lo:hi]


def _cosine_working(rows, perm, offsets, dtype, problem) -> torch.Tensor:
    m, d = rows.shape
    compute = _compute_dtype(rows.dtype, dtype)
    x = torch.empty((m, d), dtype=dtype, device=rows.device)
    totals = torch.zeros((len(offsets) - 1, d), dtype=torch.float64, device=rows.device)
    for lo, hi in row_ranges(m, d):
        unit = unit_rows(_gather(rows, perm, lo, hi), _sample_ids(perm, lo, hi, rows.device), compute)
        # Sums of the unit rows before the working cast, in float64, chunk by chunk.
        chunk_offsets = np.clip(offsets, lo, hi) - lo
        totals += _padded_segment_sums(unit, chunk_offsets)
        x[lo:hi] = unit
    counts = torch.from_numpy(np.diff(offsets)).to(rows.device).to(torch.float64)
    means = (totals / counts[:, None]).to(dtype)
    for lo, hi in row_ranges(m, d):
        x[lo:hi] -= means[problem[lo:hi]]
    return x


def _padded_segment_sums(block: torch.Tensor, chunk_offsets: np.ndarray) -> torch.Tensor:
    """(P, d) float64 sums of the rows of ``block`` per problem, rows split by ``chunk_offsets``
    ((P+1,) cut points into the block; empty segments give zero rows)."""
    lengths = torch.from_numpy(np.diff(chunk_offsets).astype(np.int64)).to(block.device)
    return torch.segment_reduce(block.to(torch.float64), "sum", lengths=lengths, axis=0)


def _euclidean_working(rows, perm, offsets, dtype, problem) -> torch.Tensor:
    m, d = rows.shape
    device = rows.device
    counts = torch.from_numpy(np.diff(offsets)).to(device).to(torch.float64)

    def raw(lo, hi):
        return _gather(rows, perm, lo, hi)

    totals = segment_reduce_rows(raw, offsets, d, "sum", device)
    column_max = segment_reduce_rows(raw, offsets, d, "max", device)
    column_min = segment_reduce_rows(raw, offsets, d, "min", device)
    # Near float64's limit a column sum overflows: such a problem sums rows brought near 1.
    pre = torch.zeros(len(counts), dtype=torch.int64, device=device)
    overflow = ~torch.isfinite(totals).all(dim=1)
    if bool(overflow.any()):
        extreme = torch.maximum(column_max.abs().amax(dim=1), column_min.abs().amax(dim=1))
        pre = torch.where(overflow, power_of_two_exponents(extreme), pre)

        def prescaled(lo, hi):
            return times_power_of_two(raw(lo, hi).double(), pre[problem[lo:hi]][:, None])

        totals = torch.where(overflow[:, None], segment_reduce_rows(prescaled, offsets, d, "sum", device), totals)
        column_max = times_power_of_two(column_max, pre[:, None])
        column_min = times_power_of_two(column_min, pre[:, None])
    means = totals / counts[:, None]
    peaks = torch.maximum((column_max - means).amax(dim=1), (means - column_min).amax(dim=1))
    post = power_of_two_exponents(peaks)
    x = torch.empty((m, d), dtype=dtype, device=device)
    for lo, hi in row_ranges(m, d):
        ids = problem[lo:hi]
        block = times_power_of_two(raw(lo, hi).double(), pre[ids][:, None]) - means[ids]
        x[lo:hi] = times_power_of_two(block, post[ids][:, None]).to(dtype)
    return x


def gradient_unit_factors(delta: torch.Tensor, embed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(n,) float64 f with ‖f_i·g_i‖ = 1 for g_i = [δ_i, δ_i ⊗ e_i], scale-safe
    (``prepare.gradient_unit_factors``)."""
    delta_peak = delta.abs().amax(dim=1)
    if bool((delta_peak == 0).any()):
        row = int(ids[torch.nonzero(delta_peak == 0)[0, 0]])
        raise InputError(
            f"features: gradient embedding of row {row} is zero; cosine needs non-zero rows "
            "(use metric='euclidean')"
        )
    delta_unit = delta / delta_peak[:, None]
    delta_norm = delta_peak * torch.sqrt(torch.einsum("ij,ij->i", delta_unit, delta_unit))
    embed_peak = torch.clamp(embed.abs().amax(dim=1), min=1.0)
    embed_unit = embed / embed_peak[:, None]
    lift = embed_peak * torch.sqrt(embed_peak**-2 + torch.einsum("ij,ij->i", embed_unit, embed_unit))
    return 1.0 / delta_norm / lift


def _gradient_working(delta_rows, embed_rows, metric, perm, offsets, dtype, problem):
    """``prepare._gradient_working`` in torch: float64 throughout, then the working cast."""
    m = delta_rows.shape[0]
    device = delta_rows.device
    delta = _gather(delta_rows, perm, 0, m).double()
    embed = _gather(embed_rows, perm, 0, m).double()
    ids = _sample_ids(perm, 0, m, device)
    embed_square = float(torch.einsum("ij,ij->i", embed, embed).max())
    finfo = torch.finfo(dtype)
    if not embed_square * 4 < float(finfo.max):
        raise InputError(
            f"features: gradient embeddings e too large for {_name(dtype)} arithmetic (largest "
            f"squared norm {embed_square:.3g}); rescale them or pass precision='float64'"
        )
    if metric == "cosine":
        delta *= gradient_unit_factors(delta, embed, ids)[:, None]
    else:
        peaks = segment_reduce_rows(lambda lo, hi: delta[lo:hi].abs().amax(dim=1, keepdim=True), offsets, 1, "max", device)[:, 0]
        delta = times_power_of_two(delta, power_of_two_exponents(peaks)[problem][:, None])
    # Below the smallest normal number a float32 δ loses its digits; the products lose more.
    tiny = float(finfo.tiny) * 2.0 ** _MANTISSA_BITS[dtype]
    peak = delta.abs().amax(dim=1)
    small = (peak > 0) & (peak < tiny)
    if bool(small.any()):
        row = int(ids[torch.nonzero(small)[0, 0]])
        raise InputError(
            f"features: the gradient embedding of row {row} is too small next to its e for "
            f"{_name(dtype)} arithmetic; pass precision='float64'"
        )
    return delta.to(dtype).contiguous(), embed.to(dtype).contiguous()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def working_features(features: DeviceFeatures, metric: str, perm, offsets: np.ndarray, dtype: torch.dtype):
    """Rows as the engines see them, in problem order, on the features' device.

    The rules of ``dqkernels.graphcut.prepare.working_features``: cosine rows are L2-normalised
    (scale-safe) and each problem is centred on its own mean; euclidean problems are centred in
    float64 and multiplied by the power of two that brings their largest entry into [0.5, 1);
    gradient embeddings scale δ_i by 1/‖g_i‖ (cosine) or each problem's δ by a power of two.
    perm: (M,) int64 tensor of sample ids grouped by problem, or None (one problem, in order);
    offsets: (P+1,) int64 numpy problem boundaries; dtype: torch.float32 or torch.float64.
    Returns (x (M, d) dtype, embed (M, D) dtype or None), contiguous.
    """
    problem = problem_of_rows(offsets, features.rows.device)
    if features.gradient:
        return _gradient_working(features.rows, features.embed, metric, perm, offsets, dtype, problem)
    if metric == "cosine":
        return _cosine_working(features.rows, perm, offsets, dtype, problem), None
    return _euclidean_working(features.rows, perm, offsets, dtype, problem), None


def check_lam_fits(lam: float, x: torch.Tensor, embed: Optional[torch.Tensor], offsets: np.ndarray) -> None:
    """Refuse a λ for which λ·C2 could overflow float64 scores (``prepare.check_lam_fits``)."""
    largest_problem = int(np.diff(offsets).max())
    largest_square = torch.zeros((), dtype=torch.float64, device=x.device)
    for lo, hi in row_ranges(x.shape[0], x.shape[1] + (0 if embed is None else embed.shape[1])):
        block = x[lo:hi].double()
        squares = torch.einsum("ij,ij->i", block, block)
        if embed is not None:
            e = embed[lo:hi].double()
            squares = squares * (1.0 + torch.einsum("ij,ij->i", e, e))
        largest_square = torch.maximum(largest_square, squares.max())
    bound = 4.0 * largest_problem * max(float(largest_square), 1.0)
    if not lam * bound < _SCORE_LIMIT:
        raise InputError(
            f"lam={lam!r} is too large for these features: λ·C2 would overflow the scores "
            f"(λ must be below {_SCORE_LIMIT / bound:.3g})"
        )


# --------------------------------------------------------------------------- budget and checksum


def default_budget(device, host_default) -> int:
    """Bytes the device engines may hold by default: the free memory of a CUDA device when the
    call starts, else ``host_default()`` (the CPU engine's default)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(host_default())


def host_checksum(features: DeviceFeatures) -> Optional[str]:
    """The features checksum (``dqkernels.core.checksum``) of input that is on the host anyway —
    numpy arrays, CPU tensors (bfloat16 widened to float32, as the CPU engine sees it) — and None
    for CUDA tensors, which are never copied to the host for it."""
    from dqkernels.core.checksum import features_checksum

    if features.host_arrays is not None:
        return features_checksum(features.host_arrays)
    tensors = [t for t in (features.rows, features.embed) if t is not None]
    if any(t.device.type != "cpu" for t in tensors):
        return None
    return features_checksum([(t.float() if t.dtype == torch.bfloat16 else t).numpy() for t in tensors])
