"""Bin sampling (docs/method.md §3) and the saved result formats."""

import json

import numpy as np
import pytest

from dqkernels import graphcut_bins, load_bins, sample_bins
from dqkernels.graphcut.sizes import official_sizes, split_sizes
from dqkernels.sampling.sample import largest_remainder


def test_split_sizes_match_numpy():
    for m in range(1, 40):
        for n in range(1, m + 1):
            expected = [len(p) for p in np.array_split(np.arange(m), n)]
            assert split_sizes(m, n).tolist() == expected


def test_official_sizes():
    assert official_sizes(np.array([10]), 4).tolist() == [[2, 2, 2, 4]]  # K = round(2.5) = 2
    assert official_sizes(np.array([7]), 4).tolist() == [[2, 2, 2, 1]]
    assert official_sizes(np.array([9]), 6).tolist() == [[2, 2, 2, 2, 1, 0]]  # clamped
    per_class = official_sizes(np.array([60, 30, 10]), 4)  # K = 25
    assert per_class[:, 0].tolist() == [15, 8, 2]  # round(25/100·60), round(7.5)=8, round(2.5)=2
    assert (per_class.sum(1) == [60, 30, 10]).all()


def test_largest_remainder_is_exact():
    counts = np.array([7, 7, 7, 0, 3])
    take = largest_remainder(counts, 0.5)
    assert take.sum() == round(0.5 * 24) and take.tolist() == [4, 4, 3, 0, 1]
    assert largest_remainder(np.array([5, 5]), 0.01).tolist() == [1, 0]  # at least one sample
    for ratio in np.linspace(0.01, 1.0, 37):
        counts = np.random.default_rng(1).integers(0, 50, size=23)
        take = largest_remainder(counts, ratio)
        assert take.sum() == max(1, round(ratio * counts.sum()))
        assert (np.abs(take - ratio * counts) < 1).all() and (take <= counts).all()


def test_sample_exact_per_bin(rng):
    x = rng.standard_normal((1003, 8))
    result = graphcut_bins(x, bins=10)
    subset = sample_bins(result, 0.1, seed=3)
    assert len(subset.indices) == 100 and np.all(np.diff(subset.indices) > 0)
    per_bin = np.bincount(result.bin_of[subset.indices], minlength=10)
    assert (np.abs(per_bin - 0.1 * result.bin_sizes) < 1).all()
    again = sample_bins(result, 0.1, seed=3)
    np.testing.assert_array_equal(subset.indices, again.indices)
    assert not np.array_equal(subset.indices, sample_bins(result, 0.1, seed=4).indices)
    np.testing.assert_array_equal(sample_bins(result, 1.0).indices, np.arange(1003))


def test_sample_per_class_cells(rng):
    labels = rng.integers(0, 3, size=600)
    x = rng.standard_normal((600, 5))
    result = graphcut_bins(x, bins=4, labels=labels)
    subset = sample_bins(result, 0.3, seed=0)
    cells = subset.manifest["cells"]
    assert len(cells) == 12 and [c["bin"] for c in cells[:3]] == [0, 0, 0]
    for cell in cells:
        members = (result.bin_of == cell["bin"]) & (labels == cell["class"])
        chosen = members[subset.indices].sum()
        assert chosen == cell["selected"] and abs(chosen - 0.3 * members.sum()) < 1


def test_sample_official_rounding_warns(rng):
    x = rng.standard_normal((40, 3))
    result = graphcut_bins(x, bins=10)  # cells of 4
    with pytest.warns(UserWarning, match="non-empty cells get no sample"):
        subset = sample_bins(result, 0.1, allocation="official")  # round(0.4) = 0 per cell
    assert len(subset.indices) == 0
    exact = sample_bins(result, 0.1)
    assert len(exact.indices) == 4


def test_save_and_load_round_trip(tmp_path, rng):
    labels = rng.integers(0, 4, size=200)
    x = rng.standard_normal((200, 6)).astype(np.float32)
    result = graphcut_bins(x, bins=5, labels=labels)
    path = tmp_path / "bins.npz"
    result.save(path)
    loaded = load_bins(path)
    np.testing.assert_array_equal(loaded.order, result.order)
    np.testing.assert_array_equal(loaded.bin_offsets, result.bin_offsets)
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.backend == "cpu" and loaded.meta["metric"] == "cosine"
    assert loaded.meta["M"] == 200 and loaded.meta["dims"] == [6] and loaded.meta["per_class"]
    with np.load(path) as data:
        np.testing.assert_array_equal(data["bin_of"], result.bin_of)
    subset = sample_bins(loaded, 0.25, seed=1)
    subset.save(tmp_path / "subset.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "subset.npy"), subset.indices)
    manifest = json.loads((tmp_path / "subset.json").read_text())
    assert manifest["n_selected"] == 50 and manifest["seed"] == 1
