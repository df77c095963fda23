"""DQSubset / DQSubsetSampler: training on a saved DQ subset."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

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
