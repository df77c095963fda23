"""The features checksum that bins metadata records.

blake2b-128 over the arrays' (dtype, shape) and the digests of consecutive row blocks of about
4 MiB. Any worker may hash any block in any order — threads here, ranks in a distributed run —
so the value does not depend on how the hashing was split.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BLOCK_BYTES = 1 << 22


def _block_rows(array: np.ndarray) -> int:
    return max(1, BLOCK_BYTES // max(1, array.shape[1] * array.dtype.itemsize))


def _digest(array: np.ndarray, block: int) -> bytes:
    rows = _block_rows(array)
    data = np.ascontiguousarray(array[block * rows : (block + 1) * rows])
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).digest()


def block_digests(arrays, part: int = 0, parts: int = 1, threads: int = 1) -> dict:
    """{(array index, block index): 16-byte digest} of the blocks b ≡ part (mod parts) of every
    (M, d) array, hashed by ``threads`` threads (hashlib releases the GIL on large buffers)."""
    keys = [
        (a, b)
        for a, array in enumerate(arrays)
        for b in range(part, -(-len(array) // _block_rows(array)), parts)
    ]
    if threads <= 1 or len(keys) <= 1:
        return {key: _digest(arrays[key[0]], key[1]) for key in keys}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        digests = pool.map(lambda key: _digest(arrays[key[0]], key[1]), keys)
        return dict(zip(keys, digests))


def combine_digests(arrays, digests: dict) -> str:
    """The checksum from the arrays' (dtype, shape) and all of their block digests."""
    total = hashlib.blake2b(digest_size=16)
    for array in arrays:
        total.update(str((array.dtype.str, array.shape)).encode())
    for key in sorted(digests):
        total.update(digests[key])
    return "blocks:" + total.hexdigest()


def features_checksum(arrays) -> str:
    """Checksum of a sequence of (M, d) numpy arrays (features, or δ and e), on all cores."""
    arrays = list(arrays)
    return combine_digests(arrays, block_digests(arrays, threads=os.cpu_count() or 1))
