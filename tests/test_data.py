"""DQSubset / DQSubsetSampler: training on a saved DQ subset."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import dqkernels
from dqkernels.data import DQSubset, DQSubsetSampler


@pytest.fixture
def subset_file(tmp_path):
    """A subset of 30 of 100 samples, saved by the library as ``dqk sample`` does."""
    features = np.random.default_rng(0).standard_normal((100, 6))
    subset = dqkernels.sample_bins(dqkernels.graphcut_bins(features, bins=5), ratio=0.3, seed=0)
    subset.save(tmp_path / "subset.npy")
    return tmp_path / "subset.npy"


@pytest.fixture
def dataset():
    """100 samples whose input is their own id."""
    ids = torch.arange(100)
    return TensorDataset(ids, ids * 10)


def test_subset_dataset_serves_the_selected_samples(subset_file, dataset):
    chosen = np.load(subset_file)
    subset = DQSubset(dataset, subset_file)
    assert len(subset) == 30
    assert [int(subset[i][0]) for i in range(len(subset))] == chosen.tolist()
    batches = [ids for ids, _ in DataLoader(subset, batch_size=8)]
    assert torch.cat(batches).tolist() == chosen.tolist()


def test_subset_dataset_rejects_a_subset_of_another_dataset(subset_file, dataset):
    chosen = np.load(subset_file)
    with pytest.raises(ValueError, match="subset was drawn from 100 samples but the dataset has 50"):
        DQSubset(TensorDataset(torch.arange(50)), subset_file)
    with pytest.raises(ValueError, match="unique and non-negative"):
        DQSubset(dataset, np.array([3, 3, 5]), positional=True)
    with pytest.raises(ValueError, match="1-D integer"):
        DQSubset(dataset, np.array([1.0, 2.0]), positional=True)
    # positional=True waives the row-count check, never the range check.
    with pytest.raises(ValueError, match=f"subset id {chosen[-1]} is out of range for a dataset of 50"):
        DQSubset(TensorDataset(torch.arange(50)), subset_file, positional=True)


def test_bare_ids_need_a_feature_set_or_an_explicit_positional_opt_in(dataset):
    with pytest.raises(ValueError, match="positional=True"):
        DQSubset(dataset, np.array([1, 7]))
    assert [int(sample[0]) for sample in DQSubset(dataset, np.array([7, 1]), positional=True)] == [1, 7]
    with pytest.raises(ValueError, match="out of range for a dataset of 100 samples"):
        DQSubset(dataset, np.array([1, 100]), positional=True)


def test_subset_sampler_shuffles_per_epoch_reproducibly(subset_file, dataset):
    chosen = np.load(subset_file).tolist()
    sampler = DQSubsetSampler(subset_file, shuffle=True, seed=7, dataset=dataset)
    epoch0 = list(sampler)
    assert len(sampler) == 30 and sorted(epoch0) == chosen and epoch0 != chosen
    assert list(sampler) == epoch0  # same epoch, same order
    assert list(DQSubsetSampler(subset_file, shuffle=True, seed=7, positional=True)) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0 and sorted(sampler) == chosen

    loader = DataLoader(dataset, batch_size=16, sampler=DQSubsetSampler(subset_file, shuffle=False, dataset=dataset))
    assert torch.cat([ids for ids, _ in loader]).tolist() == chosen


def test_subset_sampler_resolves_against_the_dataset_it_samples(subset_file):
    with pytest.raises(ValueError, match="needs the dataset it samples from"):
        DQSubsetSampler(subset_file)
    with pytest.raises(ValueError, match="subset was drawn from 100 samples but the dataset has 99"):
        DQSubsetSampler(subset_file, dataset=TensorDataset(torch.arange(99)))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("count", [1, 7, 12, 30])
def test_ranks_share_the_subset_like_distributed_sampler(world_size, count):
    """Shards are DistributedSampler's: padded to cover the subset, or trimmed to be disjoint."""
    positions = np.arange(count) * 3 + 1
    for drop_last in (False, True):
        shards = [
            list(DQSubsetSampler(positions, shuffle=True, seed=5, positional=True, num_replicas=world_size,
                                 rank=rank, drop_last=drop_last))
            for rank in range(world_size)
        ]
        sizes = {len(shard) for shard in shards}
        expected = count // world_size if drop_last else -(-count // world_size)
        assert sizes == {expected}
        assert all(
            len(DQSubsetSampler(positions, positional=True, num_replicas=world_size, rank=rank,
                                drop_last=drop_last)) == expected
            for rank in range(world_size)
        )
        taken = [position for shard in shards for position in shard]
        assert set(taken) <= set(positions.tolist())
        if drop_last:
            assert len(set(taken)) == len(taken) == expected * world_size  # disjoint
        else:
            assert set(taken) == set(positions.tolist())  # covering
            assert len(taken) - len(set(taken)) == expected * world_size - count  # only the padding repeats
        # Without shuffle the shards are exactly DistributedSampler's over the subset's positions.
        for rank in range(world_size):
            ours = DQSubsetSampler(positions, shuffle=False, positional=True, num_replicas=world_size, rank=rank,
                                   drop_last=drop_last)
            theirs = DistributedSampler(range(count), num_replicas=world_size, rank=rank, shuffle=False,
                                        drop_last=drop_last)
            assert list(ours) == positions[list(theirs)].tolist()


def test_set_epoch_reshuffles_every_rank_alike(subset_file, dataset):
    chosen = np.load(subset_file).tolist()

    def epoch_shards(epoch):
        samplers = [DQSubsetSampler(subset_file, seed=3, dataset=dataset, num_replicas=4, rank=rank)
                    for rank in range(4)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        return [list(sampler) for sampler in samplers]

    first, second = epoch_shards(0), epoch_shards(1)
    assert first != second and first == epoch_shards(0)
    for shards in (first, second):
        assert set().union(*map(set, shards)) == set(chosen) and all(len(shard) == 8 for shard in shards)


def test_defaults_come_from_the_process_group(monkeypatch, subset_file, dataset):
    import torch.distributed as dist

    whole = DQSubsetSampler(subset_file, shuffle=False, dataset=dataset)
    assert (whole.num_replicas, whole.rank) == (1, 0) and list(whole) == np.load(subset_file).tolist()
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 3)
    monkeypatch.setattr(dist, "get_rank", lambda *args, **kwargs: 2)
    sampler = DQSubsetSampler(subset_file, shuffle=False, dataset=dataset)
    assert (sampler.num_replicas, sampler.rank, len(sampler)) == (3, 2, 10)
    assert list(sampler) == list(whole)[2::3]
    assert DQSubsetSampler(subset_file, dataset=dataset, rank=0).rank == 0  # an explicit value wins


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_replicas": 0, "rank": 0}, "num_replicas must be at least 1"),
        ({"num_replicas": 2, "rank": 2}, r"rank must be in \[0, 1\]"),
        ({"num_replicas": 2, "rank": -1}, r"rank must be in \[0, 1\]"),
        ({"num_replicas": 2.0, "rank": 0}, "num_replicas must be an integer"),
    ],
)
def test_bad_rank_or_world_size_is_an_input_error(subset_file, dataset, options, message):
    with pytest.raises(ValueError, match=message):
        DQSubsetSampler(subset_file, dataset=dataset, **options)
