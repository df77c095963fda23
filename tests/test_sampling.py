"""Bin sampling (docs/method.md §3) and the saved result formats."""

import json
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dqkernels import BinResult, graphcut_bins, load_bins, sample_bins
from dqkernels.core.errors import InputError, InputTypeError
from dqkernels.graphcut.sizes import official_sizes, split_sizes
from dqkernels.sampling.rounding import controlled_rounding, target_bounds


def binned_table(table, seed=0, class_ids=None):
    """A BinResult whose (bin, class) cells hold ``table[b, c]`` samples (ids shuffled).

    table: (R, C) ints. class_ids: the label of each column (default 0..C−1).
    """
    table = np.asarray(table, dtype=np.int64)
    class_ids = np.arange(table.shape[1]) if class_ids is None else np.asarray(class_ids)
    labels_in_order = np.concatenate([np.repeat(class_ids, row) for row in table]).astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels_in_order))  # ids in no bin/class order
    labels = np.empty_like(labels_in_order)
    labels[order] = labels_in_order
    offsets = np.concatenate([[0], np.cumsum(table.sum(axis=1))]).astype(np.int64)
    return BinResult(order.astype(np.int64), offsets, labels, "reference", "reference")


def selected_table(result, indices):
    """(R, C) selected count per (bin, class), classes = np.unique(result.labels)."""
    classes, class_index = np.unique(result.labels, return_inverse=True)
    table = np.zeros((result.n_bins, len(classes)), dtype=np.int64)
    np.add.at(table, (result.bin_of[indices], class_index[indices]), 1)
    return table


def present_columns(table):
    table = np.asarray(table, dtype=np.int64)
    return table[:, table.sum(axis=0) > 0]


def assert_floor_or_ceil(values, sizes, ratio: Fraction):
    """Every value is ⌊ratio·size⌋ or ⌈ratio·size⌉ (exact rational arithmetic)."""
    for value, size in zip(np.ravel(values), np.ravel(sizes)):
        target = ratio * int(size)
        assert target.__floor__() <= value <= target.__ceil__(), (value, size, target)


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


def test_exact_gives_every_bin_and_class_its_share_when_cells_hold_half_a_sample():
    # 10 bins × 6 classes × 5 samples, ρ = 0.1: every cell's target is 0.5. A rule that breaks
    # ties by position took 6, 6, 6, 6, 6, 0, 0, 0, 0, 0 per bin.
    result = binned_table(np.full((10, 6), 5))
    tables = []
    for seed in range(40):
        subset = sample_bins(result, 0.1, seed=seed)
        table = selected_table(result, subset.indices)
        assert table.sum(axis=1).tolist() == [3] * 10
        assert table.sum(axis=0).tolist() == [5] * 6
        assert set(np.unique(table)) <= {0, 1}
        assert [b["selected"] for b in subset.manifest["bins"]] == [3] * 10
        assert [c["selected"] for c in subset.manifest["classes"]] == [5] * 6
        tables.append(table)
    assert len({t.tobytes() for t in tables}) == 40  # the seed decides which cells round up
    rounded_up = np.sum(tables, axis=0)
    assert rounded_up.min() > 0 and rounded_up.max() < 40  # no cell always or never wins


@pytest.mark.filterwarnings("ignore::UserWarning")  # half the bins get no sample, by design
def test_exact_global_mode_spreads_the_remainder_by_seed():
    result = binned_table(np.full((10, 1), 5))  # ρ·|bin| = 0.5 everywhere, 5 samples in all
    result.labels = None
    per_bin = [np.bincount(result.bin_of[sample_bins(result, 0.1, seed=s).indices], minlength=10)
               for s in range(30)]
    for counts in per_bin:
        assert counts.sum() == 5 and set(counts.tolist()) <= {0, 1}
    assert np.sum(per_bin, axis=0).min() > 0


random_tables = st.integers(1, 7).flatmap(
    lambda rows: st.integers(1, 5).flatmap(
        lambda cols: st.lists(
            st.lists(st.one_of(st.just(0), st.integers(0, 13)), min_size=cols, max_size=cols),
            min_size=rows, max_size=rows,
        )
    )
)
# Equal cells tie on every fractional part: where position-based tie breaking goes wrong.
uniform_tables = st.tuples(st.integers(1, 10), st.integers(1, 6), st.integers(1, 9)).map(
    lambda shape: [[shape[2]] * shape[1]] * shape[0]
)
table_strategy = st.one_of(random_tables, uniform_tables).filter(lambda table: sum(map(sum, table)) > 0)
ratio_strategy = st.one_of(st.integers(1, 12), st.integers(1, 1000)).flatmap(
    lambda q: st.integers(1, q).map(lambda p: Fraction(p, q))
)


@pytest.mark.filterwarnings("ignore::UserWarning")  # bins/classes left empty: tested below
@given(table=table_strategy, ratio=ratio_strategy, seed=st.integers(0, 2**32))
def test_exact_allocation_meets_every_bound(table, ratio, seed):
    result = binned_table(table, seed=seed % 7)
    subset = sample_bins(result, float(ratio), seed=seed)
    taken = selected_table(result, subset.indices)
    counts = present_columns(table)
    assert (taken <= counts).all()
    assert_floor_or_ceil(taken, counts, ratio)
    assert_floor_or_ceil(taken.sum(axis=1), counts.sum(axis=1), ratio)
    assert_floor_or_ceil(taken.sum(axis=0), counts.sum(axis=0), ratio)
    assert taken.sum() == max(1, round(ratio * int(counts.sum())))
    assert [c["selected"] for c in subset.manifest["cells"]] == taken.ravel().tolist()
    assert np.all(np.diff(subset.indices) > 0)

    result.labels = None
    global_subset = sample_bins(result, float(ratio), seed=seed)
    per_bin = np.bincount(result.bin_of[global_subset.indices], minlength=result.n_bins)
    assert_floor_or_ceil(per_bin, counts.sum(axis=1), ratio)
    assert per_bin.sum() == max(1, round(ratio * int(counts.sum())))


@pytest.mark.filterwarnings("ignore::UserWarning")  # cells rounded to 0: tested below
@given(table=table_strategy, ratio=ratio_strategy, seed=st.integers(0, 2**32))
def test_official_allocation_rounds_each_cell_half_to_even(table, ratio, seed):
    result = binned_table(table, seed=seed % 7)
    counts = present_columns(table)
    expected = np.array([[round(float(ratio) * int(n)) for n in row] for row in counts])
    if expected.sum() == 0:
        with pytest.raises(InputError, match="too small for this data"):
            sample_bins(result, float(ratio), seed=seed, allocation="official")
        return
    subset = sample_bins(result, float(ratio), seed=seed, allocation="official")
    taken = selected_table(result, subset.indices)
    np.testing.assert_array_equal(taken, expected)
    assert len(subset.indices) == expected.sum() == subset.manifest["n_selected"]


def test_controlled_rounding_keeps_integer_targets_and_empty_cells():
    counts = np.array([[30, 0, 10], [20, 7, 0]])
    for seed in range(10):
        take = controlled_rounding(counts, Fraction(1, 10), np.random.default_rng(seed))
        assert take[:, 0].tolist() == [3, 2] and take[0, 2] == 1  # 0.1·30 is 3, not 3.0000000000000004
        assert take[0, 1] == 0 and take[1, 2] == 0 and take[1, 1] in (0, 1)
        assert take.sum() == round(Fraction(67, 10))


def test_target_bounds_are_exact_for_large_counts():
    floor, ceil = target_bounds(np.array([2**62, 7]), Fraction(3, 10))
    assert floor.tolist() == [3 * 2**62 // 10, 2] and ceil.tolist() == [3 * 2**62 // 10 + 1, 3]


def test_same_seed_gives_the_same_subset():
    x = np.random.default_rng(5).standard_normal((1003, 8))
    result = graphcut_bins(x, bins=10)
    subset = sample_bins(result, 0.1, seed=3)
    assert len(subset.indices) == 100 and np.all(np.diff(subset.indices) > 0)
    per_bin = np.bincount(result.bin_of[subset.indices], minlength=10)
    assert_floor_or_ceil(per_bin, result.bin_sizes, Fraction(1, 10))
    np.testing.assert_array_equal(subset.indices, sample_bins(result, 0.1, seed=3).indices)
    assert subset.manifest == sample_bins(result, 0.1, seed=3).manifest
    assert not np.array_equal(subset.indices, sample_bins(result, 0.1, seed=4).indices)


def test_ratio_one_returns_everything():
    result = binned_table([[3, 0, 2], [1, 4, 1]])
    labels = result.labels
    for allocation in ("exact", "official"):
        for result.labels in (labels, None):
            subset = sample_bins(result, 1.0, allocation=allocation)
            np.testing.assert_array_equal(subset.indices, np.arange(11))


def test_manifest_counts_per_cell_bin_and_class():
    result = binned_table([[4, 0, 6], [2, 8, 0]], class_ids=[3, 5, 9])
    subset = sample_bins(result, 0.5, seed=1)
    manifest = subset.manifest
    assert {"ratio", "seed", "allocation", "n_samples", "n_selected"} <= manifest.keys()
    assert (manifest["ratio"], manifest["seed"], manifest["allocation"]) == (0.5, 1, "exact")
    assert manifest["n_samples"] == 20 and manifest["n_selected"] == 10 == len(subset.indices)
    assert [(c["bin"], c["class"], c["count"], c["selected"]) for c in manifest["cells"]] == [
        (0, 3, 4, 2), (0, 5, 0, 0), (0, 9, 6, 3), (1, 3, 2, 1), (1, 5, 8, 4), (1, 9, 0, 0),
    ]
    assert manifest["bins"] == [
        {"bin": 0, "count": 10, "selected": 5}, {"bin": 1, "count": 10, "selected": 5},
    ]
    assert manifest["classes"] == [
        {"class": 3, "count": 6, "selected": 3}, {"class": 5, "count": 8, "selected": 4},
        {"class": 9, "count": 6, "selected": 3},
    ]
    json.dumps(manifest)  # plain JSON types only

    result.labels = None
    manifest = sample_bins(result, 0.5, seed=1).manifest
    assert manifest["classes"] is None
    assert [(c["bin"], c["class"], c["count"]) for c in manifest["cells"]] == [(0, None, 10), (1, None, 10)]


def test_per_class_cells_follow_graphcut_bins():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 3, size=600)
    result = graphcut_bins(rng.standard_normal((600, 5)), bins=4, labels=labels)
    subset = sample_bins(result, 0.3, seed=0)
    cells = subset.manifest["cells"]
    assert len(cells) == 12 and [c["bin"] for c in cells[:3]] == [0, 0, 0]
    for cell in cells:
        members = (result.bin_of == cell["bin"]) & (labels == cell["class"])
        chosen = members[subset.indices].sum()
        assert chosen == cell["selected"]
        assert_floor_or_ceil([chosen], [members.sum()], Fraction(3, 10))


def test_exact_warns_naming_bins_without_a_sample():
    result = binned_table(np.ones((10, 1), dtype=int))
    with pytest.warns(UserWarning, match=r"gives no sample to bins [\d, ]+ \(7 of 10 non-empty\)") as record:
        subset = sample_bins(result, 0.3, seed=2)
    named = str(record[0].message).split("to bins ")[1].split(" (")[0]
    empty = [b["bin"] for b in subset.manifest["bins"] if b["selected"] == 0]
    assert [int(b) for b in named.split(", ")] == empty and len(subset.indices) == 3


def test_exact_warns_naming_classes_without_a_sample():
    result = binned_table([[10, 1, 1]], class_ids=[3, 7, 9])  # targets 2, 0.2, 0.2; total 2
    with pytest.warns(UserWarning, match=r"gives no sample to classes 7, 9 \(2 of 3 non-empty\)"):
        subset = sample_bins(result, 0.2, seed=0)
    assert (result.labels[subset.indices] == 3).all()


def test_no_warning_when_every_bin_and_class_is_represented():
    result = binned_table(np.full((4, 3), 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for allocation in ("exact", "official"):
            sample_bins(result, 0.1, seed=0, allocation=allocation)


def test_official_warns_about_starved_cells():
    result = binned_table([[4, 1], [4, 4]])  # round(0.5·1) = 0 in one cell
    with pytest.warns(UserWarning, match=r"gives no sample to 1 of 4 non-empty \(bin, class\) cells"):
        subset = sample_bins(result, 0.5, allocation="official")
    assert selected_table(result, subset.indices).tolist() == [[2, 0], [2, 2]]
    result = binned_table([[1], [4]])
    result.labels = None  # global mode: the cells are the bins
    with pytest.warns(UserWarning, match=r"official' at ratio 0.3 gives no sample to bins 0 \(1 of 2 non-empty\):"):
        assert len(sample_bins(result, 0.3, allocation="official").indices) == 1


def test_empty_subset_is_an_error_for_both_allocations():
    result = binned_table(np.full((10, 1), 4))  # round(0.1·4) = 0 in every cell
    with pytest.raises(InputError, match=r"ratio 0.1 is too small .* just above 0.125"):
        sample_bins(result, 0.1, allocation="official")
    assert len(sample_bins(result, 0.126, allocation="official").indices) == 10
    with pytest.warns(UserWarning, match=r"gives no sample to bins .* \(6 of 10 non-empty\)"):
        assert len(sample_bins(result, 0.1).indices) == 4  # exact keeps round(0.1·40)
    with pytest.warns(UserWarning, match=r"\(9 of 10 non-empty\)"):
        assert len(sample_bins(result, 0.001).indices) == 1  # ... and at least one sample
    empty = BinResult(np.zeros(0, np.int64), np.zeros(2, np.int64), None, "reference", "reference")
    for allocation in ("exact", "official"):
        with pytest.raises(InputError, match="no samples"):
            sample_bins(empty, 0.5, allocation=allocation)


def test_sample_bins_rejects_wrong_types_naming_the_argument():
    result = binned_table([[3, 2], [2, 3]])
    with pytest.raises(InputTypeError, match="result must be a BinResult"):
        sample_bins(None, 0.1)
    with pytest.raises(InputTypeError, match="result must be a BinResult"):
        sample_bins(np.arange(10), 0.1)
    with pytest.raises(InputTypeError, match="ratio must be a number"):
        sample_bins(result, None)
    for seed in ("3", 1.5, True, None):
        with pytest.raises(InputTypeError, match="seed must be a non-negative integer"):
            sample_bins(result, 0.5, seed=seed)
    with pytest.raises(InputError, match="seed must be a non-negative integer"):
        sample_bins(result, 0.5, seed=np.int64(-2))
    for allocation in (None, 1, ["exact"]):
        with pytest.raises(InputTypeError, match="allocation must be one of"):
            sample_bins(result, 0.5, allocation=allocation)
    with pytest.raises(InputTypeError, match="labels must be integers"):
        sample_bins(result, 0.5, labels=np.zeros(10))


def test_numpy_scalars_are_accepted():
    result = binned_table([[6, 2], [2, 6]])
    expected = sample_bins(result, 0.25, seed=3)
    for ratio in (np.float64(0.25), np.float32(0.25)):
        for seed in (np.int64(3), np.uint8(3)):
            subset = sample_bins(result, ratio, seed=seed)
            np.testing.assert_array_equal(subset.indices, expected.indices)
            assert subset.manifest == expected.manifest
            json.dumps(subset.manifest)


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(8)
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
    assert manifest["cells"] == subset.manifest["cells"] and manifest["bins"] == subset.manifest["bins"]
