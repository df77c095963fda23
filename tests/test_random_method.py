"""The random baseline (`method="random"`, `dqk sample --method random`, `method: random` in a run
config): the same allocation over classes as DQ sampling, with the whole set as one bin."""

import json
import math
import warnings

import numpy as np
import pytest
from conftest_data import digits_folder_fixture, invoke  # noqa: F401

import dqkernels
from dqkernels import pipeline
from dqkernels.pipeline.stages import draw_subset

LABELS = np.repeat(np.arange(3), [20, 13, 7])  # 40 samples in classes of unequal size


def _bins_file(tmp_path, bins: int, labels=LABELS, name: str = "bins.npz"):
    features = np.random.default_rng(0).standard_normal((len(LABELS), 6))
    result = dqkernels.graphcut_bins(features, bins=bins, labels=labels)
    result.save(tmp_path / name)
    return tmp_path / name


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 1.0])
def test_random_keeps_the_class_allocation_and_records_what_it_drew(tmp_path, ratio):
    bins_path = _bins_file(tmp_path, bins=4)
    random = _quiet(draw_subset, bins_path, ratio, seed=2, method="random")
    dq = _quiet(draw_subset, bins_path, ratio, seed=2)
    manifest = random.manifest
    assert manifest["method"] == "random" and dq.manifest["method"] == "dq"
    assert len(random.indices) == len(dq.indices) == max(1, round(ratio * len(LABELS)))
    chosen_per_class = np.bincount(LABELS[random.indices], minlength=3)
    for entry, total in zip(manifest["classes"], np.bincount(LABELS)):
        target = ratio * total
        assert entry["count"] == total and entry["selected"] == chosen_per_class[entry["class"]]
        assert math.floor(target) <= entry["selected"] <= math.ceil(target)
    # The per-bin and per-cell tables count what was drawn in each bin of the file.
    bin_of = dqkernels.load_bins(bins_path).bin_of
    assert [entry["selected"] for entry in manifest["bins"]] == np.bincount(bin_of[random.indices], minlength=4).tolist()
    assert [entry["count"] for entry in manifest["bins"]] == np.bincount(bin_of, minlength=4).tolist()
    for cell in manifest["cells"]:
        in_cell = (bin_of == cell["bin"]) & (LABELS == cell["class"])
        assert cell["count"] == in_cell.sum() and cell["selected"] == in_cell[random.indices].sum()
    assert sum(cell["selected"] for cell in manifest["cells"]) == len(random.indices)


def test_random_ignores_the_bins_and_follows_the_seed(tmp_path):
    few, many = _bins_file(tmp_path, 2, name="two.npz"), _bins_file(tmp_path, 5, name="five.npz")
    first = draw_subset(few, 0.3, seed=7, method="random").indices
    np.testing.assert_array_equal(first, draw_subset(many, 0.3, seed=7, method="random").indices)
    assert not np.array_equal(first, draw_subset(few, 0.3, seed=8, method="random").indices)
    assert not np.array_equal(draw_subset(many, 0.3, seed=7).indices, first)


def test_random_without_labels_is_a_uniform_draw_of_the_same_size(tmp_path):
    bins_path = _bins_file(tmp_path, bins=4, labels=None)
    subset = draw_subset(bins_path, 0.25, seed=1, method="random")
    assert subset.manifest["classes"] is None and len(subset.indices) == 10
    assert [cell["class"] for cell in subset.manifest["cells"]] == [None] * 4
    official = draw_subset(bins_path, 0.25, seed=1, method="random", allocation="official")
    assert official.manifest["allocation"] == "official" and len(official.indices) == 10


def test_unknown_method_is_an_input_error(tmp_path):
    with pytest.raises(ValueError, match="method must be one of 'dq', 'random', got 'uniform'"):
        draw_subset(_bins_file(tmp_path, bins=2), 0.5, method="uniform")


def test_dqk_sample_method_random(tmp_path):
    bins_path = _bins_file(tmp_path, bins=4)
    result = invoke(["sample", "--bins", bins_path, "--ratio", 0.5, "--seed", 4, "--method", "random"])
    assert result.exit_code == 0, result.output
    assert "kept 20 samples (ratio 0.5, seed 4, exact, method random)" in result.output
    manifest = json.loads((tmp_path / "subset.json").read_text())
    assert manifest["method"] == "random"
    np.testing.assert_array_equal(np.load(tmp_path / "subset.npy"),
                                  draw_subset(bins_path, 0.5, seed=4, method="random").indices)
    bad = invoke(["sample", "--bins", bins_path, "--ratio", 0.5, "--method", "uniform", "-o", tmp_path / "x.npy"])
    assert bad.exit_code == 2 and "'--method'" in bad.stderr and not (tmp_path / "x.npy").exists()


def test_run_config_method_is_part_of_the_subset_fingerprint(tmp_path, digits_folder):
    (tmp_path / "dq.yaml").write_text(
        f"input: {digits_folder}\nwork_dir: work\nrandom_init: true\nimg_size: 32\ndevice: cpu\nbins: 2\nratio: 0.5\n"
        "method: random\n"
    )
    config = pipeline.PipelineConfig.from_yaml(tmp_path / "dq.yaml")
    assert config.method == "random"

    def run():
        log = []
        pipeline.run_pipeline(config, log=log.append)
        return [line.split()[1] for line in log]

    assert run() == ["wrote", "wrote", "wrote"]
    manifest = json.loads((tmp_path / "work" / "subset.json").read_text())
    assert manifest["method"] == "random"
    np.testing.assert_array_equal(np.load(tmp_path / "work" / "subset.npy"),
                                  draw_subset(tmp_path / "work" / "bins.npz", 0.5, method="random").indices)
    assert run() == ["reused", "reused", "reused"]
    config.method = "dq"
    assert run() == ["reused", "reused", "wrote"]
    assert json.loads((tmp_path / "work" / "subset.json").read_text())["method"] == "dq"

    (tmp_path / "bad.yaml").write_text("method: uniform\n")
    with pytest.raises(ValueError, match="method"):
        pipeline.PipelineConfig.from_yaml(tmp_path / "bad.yaml")
    result = invoke(["run", "--input", digits_folder, "--work-dir", tmp_path / "w2", "--method", "uniform"])
    assert result.exit_code == 2 and "'--method'" in result.stderr
