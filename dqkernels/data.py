"""Train on a DQ subset in two lines.

    train_set = DQSubset(ImageFolder("data/train"), "feats/subset.npy")   # a smaller Dataset
    # or keep the full dataset and sample only the chosen samples:
    loader = DataLoader(full_set, batch_size=128, sampler=DQSubsetSampler("subset.npy", dataset=full_set))
    # under DDP (torchrun) the same line gives each process its share; call
    # loader.sampler.set_epoch(epoch) before every epoch, as with DistributedSampler.

The subset file is the ``.npy`` of sorted sample ids written by ``dqk sample``. An id is a row of
the feature set the subset was drawn from (docs/method.md §3.5), not a position in whatever
dataset is at hand: a folder listing shifts when an unreadable image was skipped at extraction
or a file was added since. So the ids are resolved against the dataset:

* a torchvision ``ImageFolder`` / ``DatasetFolder`` (anything with ``root`` and ``samples``, a
  list of ``(path, class)``) is matched **by path**: each id's recorded item (relative path and
  size) must be one of the dataset's samples, with the same size, inside ``root``;
* any other dataset is indexed by position, which is only accepted when the feature set has
  exactly ``len(dataset)`` rows, or when you say so with ``positional=True``.

Anything else raises ``InputError`` naming the first id that cannot be resolved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
from torch.utils.data import Dataset, Sampler

from dqkernels.core.errors import InputError, InputTypeError
from dqkernels.formats.feature_set import IdOrigin, id_origin
from dqkernels.formats.items import Item, check_item_path, resolve_item
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


def _folder_samples(dataset) -> Optional[tuple[Path, list]]:
    """(root, samples) of a torchvision DatasetFolder-like dataset, else None."""
    root = getattr(dataset, "root", None)
    samples = getattr(dataset, "samples", None)
    if not isinstance(root, (str, os.PathLike)) or not isinstance(samples, (list, tuple)):
        return None
    return Path(root), samples


def _relative_sample_path(path, root_text: str) -> str:
    path = os.fspath(path)
    if path.startswith(root_text + os.sep):
        relative = path[len(root_text) + 1 :]
    else:
        relative = os.path.relpath(path, root_text)
    return relative.replace(os.sep, "/")


def _positions_by_path(ids: np.ndarray, items: list[Item], root: Path, samples) -> np.ndarray:
    """Dataset positions of ``items[id]`` for every id, matched by relative path and size."""
    root_text = os.fspath(root)
    position_of = {}
    for position, sample in enumerate(samples):
        position_of.setdefault(_relative_sample_path(sample[0], root_text), position)
    resolved_root = root.resolve()
    positions = np.empty(ids.shape[0], dtype=np.int64)
    for index, row in enumerate(ids.tolist()):
        item = items[row]
        where = f"subset id {row}"
        check_item_path(item.path, where)
        position = position_of.get(item.path)
        if position is None:
            raise InputError(
                f"{where}: item {item.path!r} is not among the {len(samples)} samples of the dataset at "
                f"{root_text!r}; the data changed since the features were extracted, or this is another dataset"
            )
        resolve_item(resolved_root, item, where)
        positions[index] = position
    return positions


def resolve_subset_positions(
    dataset,
    ids: np.ndarray,
    origin: IdOrigin,
    positional: bool = False,
) -> np.ndarray:
    """Positions in ``dataset`` of the samples the ids name: (K,) int64, in the order of ``ids``.

    ids: (K,) int64 rows of the feature set ``origin`` describes.
    With recorded items and a dataset with paths, ids are matched by path and size (always, even
    with ``positional``); otherwise ids are taken as positions, which needs ``positional`` or
    ``origin.count == len(dataset)``.
    Raises InputError naming the first id that cannot be resolved.
    """
    if origin.count is not None and ids.size and ids[-1] >= origin.count:
        raise InputError(f"subset id {int(ids[-1])} is out of range for the {origin.count} rows the ids index")
    folder = _folder_samples(dataset)
    items = origin.items() if folder is not None else None
    if items is not None:
        return _positions_by_path(ids, items, *folder)
    size = len(dataset)
    if not positional:
        if origin.count is None:
            raise InputError(
                "cannot tell which samples of this dataset the subset ids name: the subset names no feature "
                "set (give features=...), or pass positional=True if the dataset lists the samples in "
                "exactly the order the features were extracted in"
            )
        if origin.count != size:
            drawn_from = (
                f"the feature set {str(origin.sidecar_path)!r} has {origin.count} rows"
                if origin.sidecar_path is not None
                else f"the subset was drawn from {origin.count} samples"
            )
            raise InputError(
                f"{drawn_from} but the dataset has {size}; ids can be matched by position only for the "
                "same data in the same order (a torchvision ImageFolder is matched by path instead)"
            )
    if ids.size and ids[-1] >= size:
        raise InputError(
            f"subset id {int(ids[-1])} is out of range for a dataset of {size} samples; "
            "was the subset made for another dataset?"
        )
    return ids.copy()


class DQSubset(Dataset):
    """The samples of ``dataset`` that the ids in ``subset_file`` name, in id order.

    dataset: a torchvision ``ImageFolder``/``DatasetFolder`` (or any dataset with ``root`` and
        ``samples``, a list of ``(path, class)``), matched by path; or any map-style dataset
        (``__len__`` and ``__getitem__``), indexed by position.
    subset_file: path of a subset ``.npy`` from ``dqk sample`` (its manifest names the feature
        set), or a 1-D integer array of ids (then give ``features``, or ``positional=True``).
    features: the feature set (directory or ``features.json``) whose rows the ids are; default:
        the one the subset's manifest names.
    positional: where ids cannot be matched by path, take them as positions in ``dataset`` with
        no check but the range. Only right when ``dataset`` lists exactly the samples the
        features were extracted from, in that order. Matching by path, where possible, still wins.

    How an id becomes a sample, and what is refused (InputError naming the first bad id):

    * folder datasets with a feature set that records items (``dqk features`` on an image
      folder): the item's relative path must be one of ``dataset.samples`` (relative to
      ``dataset.root``), its file must have the recorded size, and it must not be a link
      leading outside ``root``. Unreadable images skipped at extraction, or class folders added
      since, do not shift anything.
    * datasets without paths (or feature sets without items): by position, accepted only when
      the feature set has exactly ``len(dataset)`` rows, or with ``positional=True``.

    ``indices``: (K,) int64 the subset's ids; ``positions``: (K,) int64 where they are in ``dataset``.
    """

    def __init__(
        self,
        dataset,
        subset_file: SubsetSource,
        *,
        features: Optional[str | os.PathLike] = None,
        positional: bool = False,
    ):
        self.dataset = dataset
        self.indices = _subset_indices(subset_file)
        origin = id_origin(subset_file, features)
        self.positions = resolve_subset_positions(dataset, self.indices, origin, positional)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, position: int):
        return self.dataset[int(self.positions[position])]


def _distributed_defaults(num_replicas, rank) -> tuple[int, int]:
    """(num_replicas, rank): the given values, else those of the initialised default process group,
    else (1, 0). InputError (InputTypeError for non-integers) unless 0 <= rank < num_replicas."""
    if num_replicas is None or rank is None:
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
    for name, value in (("num_replicas", num_replicas), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InputTypeError(f"{name} must be an integer, got {value!r}")
    if num_replicas < 1:
        raise InputError(f"num_replicas must be at least 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise InputError(f"rank must be in [0, {num_replicas - 1}] for num_replicas={num_replicas}, got {rank}")
    return int(num_replicas), int(rank)


class DQSubsetSampler(Sampler[int]):
    """Yields the dataset positions of a subset's samples, for ``DataLoader(dataset, sampler=...)``;
    under DDP each process gets its own share, as with ``torch.utils.data.DistributedSampler``.

    dataset: the dataset the loader reads; ids are resolved against it as :class:`DQSubset`
        does (by path for folder datasets). Required unless ``positional=True``.
    features / positional: as for :class:`DQSubset`.
    shuffle: a new permutation every epoch, drawn from ``numpy.random.default_rng((seed, epoch))``
        (the same on every rank); call ``set_epoch(epoch)`` before each epoch to change it.
        Without shuffle the samples come in id order.
    num_replicas, rank: how many processes share the subset and which one this is. Default: the
        world size and rank of the initialised ``torch.distributed`` process group, else 1 and 0.
    drop_last: as for DistributedSampler. False: the epoch's order is padded by repeating its
        first positions up to a multiple of ``num_replicas``, so every rank gets
        ceil(K / num_replicas) samples and together they cover the subset (a few twice). True:
        its tail is dropped to a multiple of ``num_replicas``, so every rank gets
        floor(K / num_replicas) and the shares are disjoint (those few samples skip this epoch).
        Rank r takes positions r, r + num_replicas, r + 2·num_replicas, … of that order.

    ``indices``: (K,) int64 the subset's ids; ``positions``: (K,) int64 where they are in ``dataset``.
    ``len(sampler)`` is the number of samples this rank yields per epoch.
    """

    def __init__(
        self,
        subset_file: SubsetSource,
        shuffle: bool = True,
        seed: int = 0,
        *,
        dataset=None,
        features: Optional[str | os.PathLike] = None,
        positional: bool = False,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        drop_last: bool = False,
    ):
        self.indices = _subset_indices(subset_file)
        if dataset is None:
            if not positional:
                raise InputError(
                    "DQSubsetSampler needs the dataset it samples from (dataset=...) to resolve the subset "
                    "ids, or positional=True"
                )
            self.positions = self.indices.copy()
        else:
            origin = id_origin(subset_file, features)
            self.positions = resolve_subset_positions(dataset, self.indices, origin, positional)
        self.num_replicas, self.rank = _distributed_defaults(num_replicas, rank)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.epoch = 0
        count = int(self.positions.shape[0])
        if self.drop_last:
            self.num_samples = count // self.num_replicas
        else:
            self.num_samples = -(-count // self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation of the coming epoch (give every rank the same epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(self.positions)
        else:
            order = self.positions
        if order.shape[0] and self.total_size > order.shape[0]:
            order = np.resize(order, self.total_size)  # repeats the order from its start
        order = order[: self.total_size]
        return iter(order[self.rank :: self.num_replicas].tolist())
