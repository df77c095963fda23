"""Train on a DQ subset in two lines.

    train_set = DQSubset(full_train_set, "subset.npy")          # a smaller Dataset
    # or keep the full dataset and sample only the chosen ids:
    loader = DataLoader(full_train_set, batch_size=128, sampler=DQSubsetSampler("subset.npy"))

The subset file is the ``.npy`` of sorted sample ids written by ``dqk sample`` (or
``SubsetResult.save``); ids refer to positions in the dataset the features were extracted from.
"""

from __future__ import annotations

import os
from typing import Iterator, Union

import numpy as np
from torch.utils.data import Dataset, Sampler

from dqkernels.core.errors import InputError
from dqkernels.formats.subset import load_subset_indices

SubsetSource = Union[str, os.PathLike, np.ndarray]


def _subset_indices(subset: SubsetSource) -> np.ndarray:
    """Sorted int64 ids from a subset file path or an array of unique ids."""
    if isinstance(subset, (str, os.PathLike)):
        return load_subset_indices(subset)
    indices = np.asarray(subset)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise InputError("subset ids must be a 1-D integer array")
    indices = np.sort(indices.astype(np.int64))
    if indices.size and (indices[0] < 0 or np.any(indices[1:] == indices[:-1])):
        raise InputError("subset ids must be unique and non-negative")
    return indices


class DQSubset(Dataset):
    """The samples of ``dataset`` whose ids are in ``subset_file``, in id order.

    dataset: any map-style dataset (``__len__`` and ``__getitem__``).
    subset_file: path of a subset ``.npy`` (or an integer array of ids); every id must be
        < ``len(dataset)`` — a mismatch means the subset was made for another dataset.
    """

    def __init__(self, dataset, subset_file: SubsetSource):
        self.dataset = dataset
        self.indices = _subset_indices(subset_file)
        if self.indices.size and self.indices[-1] >= len(dataset):
            raise InputError(
                f"subset id {int(self.indices[-1])} is out of range for a dataset of {len(dataset)} "
                "samples; was the subset made for another dataset?"
            )

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, position: int):
        return self.dataset[int(self.indices[position])]


class DQSubsetSampler(Sampler[int]):
    """Yields the ids of a subset (dataset positions), for ``DataLoader(full_dataset, sampler=...)``.

    shuffle: a new permutation every epoch, drawn from ``numpy.random.default_rng((seed, epoch))``;
        call ``set_epoch(epoch)`` before each epoch (as with DistributedSampler) to change it.
        Without shuffle the ids come in sorted order.
    """

    def __init__(self, subset_file: SubsetSource, shuffle: bool = True, seed: int = 0):
        self.indices = _subset_indices(subset_file)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation of the coming epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(self.indices)
        else:
            order = self.indices
        return iter(order.tolist())
