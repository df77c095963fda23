"""Input checks shared by the API and the CLI. Errors name the offending argument."""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dqkernels.core.errors import InputError, InputTypeError


class GradEmbedding(NamedTuple):
    """Factorised gradient-embedding features (docs/method.md §1): g_i = [δ_i, δ_i ⊗ e_i].

    delta: (M, C) float, δ_i = softmax(z_i) − onehot(y_i) (or the official δ).
    embed: (M, D) float, e_i = the penultimate embedding.
    The engines use g_i·g_j = (δ_i·δ_j)(1 + e_i·e_j); the C·D vectors are never formed.
    """

    delta: object
    embed: object


def source_dtype_name(value) -> str:
    """The element type the caller passed, before any widening: "float16", "bfloat16", ..."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return str(np.asarray(value).dtype)
    return str(dtype).replace("torch.", "")


def as_float_view(value, name: str) -> np.ndarray:
    """A (M, d) floating numpy view of a numpy array or torch tensor, reading no rows.

    numpy arrays of float16/32/64 in either byte order (memory maps included) are returned as
    they are, never copied: the working copy is made from them chunk by chunk. Torch tensors are
    viewed through numpy (bfloat16, which numpy lacks, is widened to float32 first).
    Raises InputTypeError for non-floating data, InputError for a bad shape.
    """
    if type(value).__module__.startswith("torch"):
        import torch

        tensor = value.detach()
        if not torch.is_floating_point(tensor):
            raise InputTypeError(f"{name} must be a floating tensor, got {tensor.dtype}")
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        value = tensor.cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise InputTypeError(f"{name} must hold floating-point numbers, got dtype {array.dtype}")
    if array.dtype.itemsize > 8:
        # Extended precision has no engine; it is the one case copied whole (to float64).
        array = array.astype(np.float64)
    if array.ndim != 2:
        raise InputError(f"{name} must be a 2-D (samples, dims) array, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {array.shape})")
    return array


def as_float_matrix(value, name: str) -> np.ndarray:
    """:func:`as_float_view`, checked finite (in bounded chunks: memory maps are not read whole).
    Raises InputError naming the first row with a NaN or inf."""
    array = as_float_view(value, name)
    chunk = max(1, (1 << 24) // array.shape[1])
    for lo in range(0, array.shape[0], chunk):
        finite = np.isfinite(array[lo : lo + chunk]).all(axis=1)
        if not finite.all():
            row = lo + int(np.flatnonzero(~finite)[0])
            raise InputError(f"{name} contains NaN or inf (first at row {row})")
    return array


def as_labels(labels, n_samples: int, name: str = "labels") -> np.ndarray:
    """(M,) int64 labels matching ``n_samples`` rows."""
    if type(labels).__module__.startswith("torch"):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.dtype.kind not in "iu":
        raise InputTypeError(f"{name} must be integers, got dtype {array.dtype}")
    if array.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {array.shape}")
    if len(array) != n_samples:
        raise InputError(f"{name} has {len(array)} entries but there are {n_samples} samples")
    return array.astype(np.int64, copy=False)


def as_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise InputError(f"{name} must be >= 1, got {value}")
    return int(value)


def as_positive_float(value, name: str) -> float:
    """A finite float > 0 from a Python or numpy real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be a finite number > 0, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise InputError(f"{name} must be a finite number > 0, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise InputError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def as_ratio(value, name: str = "ratio") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be a number in (0, 1], got {value!r}")
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise InputError(f"{name} must be in (0, 1], got {value}")
    return value


def as_choice(value, choices, name: str) -> str:
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def load_float_matrix(path: Path, what: str) -> np.ndarray:
    """Memory-map a 2-D floating-point ``.npy`` (any byte order, C or Fortran layout)."""
    if not Path(path).is_file():
        # A FIFO or device would block np.load forever; a folder gives an unhelpful message.
        raise InputError(f"{what} {str(path)!r} is not a regular file")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"{what} {str(path)!r} is not a readable .npy file ({error})") from None
    if not isinstance(array, np.ndarray):
        raise InputError(f"{what} {str(path)!r} is an archive, expected one .npy array")
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise InputError(
            f"{what} {str(path)!r} holds a {array.dtype} array of shape {array.shape}; "
            "expected a 2-D float array (samples × dims)"
        )
    return array
