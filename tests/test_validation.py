"""Bad input gets a ValueError/TypeError that names the argument (never a crash)."""

import os

import numpy as np
import pytest

from dqkernels import GradEmbedding, graphcut_bins, load_bins, sample_bins
from dqkernels.core.errors import InputError
from dqkernels.core.paths import refuse_overlap

X = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)


def _with(value, row=3, col=1):
    x = X.copy()
    x[row, col] = value
    return x


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(features=_with(np.nan)), ValueError, "features contains NaN or inf (first at row 3)"),
        (dict(features=_with(np.inf)), ValueError, "NaN or inf"),
        (dict(features=_with(-np.inf, row=0)), ValueError, "row 0"),
        (dict(features=X[0]), ValueError, "features must be a 2-D"),
        (dict(features=X[None]), ValueError, "features must be a 2-D"),
        (dict(features=np.zeros((0, 4), np.float32)), ValueError, "features is empty"),
        (dict(features=np.zeros((5, 0), np.float32)), ValueError, "features is empty"),
        (dict(features=X.astype(np.int32)), TypeError, "features must hold floating-point"),
        (dict(features=X.astype(object)), TypeError, "features must hold floating-point"),
        (dict(features=X.astype(bool)), TypeError, "features must hold floating-point"),
        (dict(features=X, bins=21), ValueError, "bins=21 is more than the number of samples (20)"),
        (dict(features=X, bins=0), ValueError, "bins must be >= 1"),
        (dict(features=X, bins=2.5), TypeError, "bins must be an integer"),
        (dict(features=_with(0.0, row=2, col=slice(None))), ValueError, "row 2 is all zeros"),
        (dict(features=X, labels=np.zeros(19, int)), ValueError, "labels has 19 entries but there are 20"),
        (dict(features=X, labels=np.zeros(20)), TypeError, "labels must be integers"),
        (dict(features=X, labels=np.zeros((20, 1), int)), ValueError, "labels must be 1-D"),
        (dict(features=X, metric="manhattan"), ValueError, "metric must be one of"),
        (dict(features=X, lam=0), ValueError, "lam must be a finite number > 0"),
        (dict(features=X, lam=float("nan")), ValueError, "lam must be"),
        (dict(features=X, backend="magic"), ValueError, "backend must be one of"),
        (dict(features=X, form="blocked"), ValueError, "form must be one of"),
        (dict(features=X, precision="float16"), ValueError, "precision must be one of"),
        (dict(features=X, device="cuda"), ValueError, "device='cuda'"),
        (dict(features=X, sizes="even"), ValueError, "sizes must be one of"),
        (dict(features=X, bins=2, sizes=[5, 5]), ValueError, "sum to the number of samples (20)"),
        (dict(features=X, bins=2, sizes=[25, -5]), ValueError, "non-negative"),
        (dict(features=X, bins=3, sizes=[10, 10]), ValueError, "sizes has 2 entries but bins=3"),
        (dict(features=X, bins=2, sizes=[10, 10], labels=np.arange(20) % 2), ValueError, "global binning only"),
        (dict(features=X, threads=0), ValueError, "threads must be >= 1"),
    ],
)
def test_graphcut_bins_rejects(kwargs, error, words):
    kwargs.setdefault("bins", 2)
    with pytest.raises(error) as info:
        graphcut_bins(**kwargs)
    assert words in str(info.value)


def test_cosine_normalises_huge_rows():
    x = np.random.default_rng(1).standard_normal((30, 3)) * 1e200
    np.testing.assert_array_equal(
        graphcut_bins(x, bins=3).order, graphcut_bins(x * 1e-200, bins=3).order
    )


def test_cosine_allows_zero_rows_under_euclidean():
    x = _with(0.0, row=2, col=slice(None))
    assert graphcut_bins(x, bins=2, metric="euclidean").n_bins == 2


def test_gradient_embedding_rejects():
    delta = np.ones((10, 3))
    with pytest.raises(ValueError, match="features.delta has 10 rows but features.embed has 9"):
        graphcut_bins(GradEmbedding(delta, np.ones((9, 2))), bins=2)
    with pytest.raises(ValueError, match="features.embed contains NaN"):
        graphcut_bins(GradEmbedding(delta, np.full((10, 2), np.nan)), bins=2)
    zero = delta.copy()
    zero[4] = 0
    with pytest.raises(ValueError, match="gradient embedding of row 4 is zero"):
        graphcut_bins(GradEmbedding(zero, np.ones((10, 2))), bins=2)


def test_sample_bins_rejects():
    result = graphcut_bins(X, bins=4)
    for ratio in (0, -0.1, 1.0001, float("nan")):
        with pytest.raises(ValueError, match="ratio must be in"):
            sample_bins(result, ratio)
    with pytest.raises(TypeError, match="ratio must be a number"):
        sample_bins(result, "0.5")
    with pytest.raises(ValueError, match="allocation must be one of"):
        sample_bins(result, 0.5, allocation="greedy")
    with pytest.raises(ValueError, match="labels has 3 entries"):
        sample_bins(result, 0.5, labels=np.zeros(3, int))
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        sample_bins(result, 0.5, seed=-1)


def test_load_bins_rejects(tmp_path):
    with pytest.raises(ValueError, match="bins file not found"):
        load_bins(tmp_path / "missing.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(ValueError, match="not a dqkernels bins file"):
        load_bins(corrupt)
    other = tmp_path / "other.npz"
    np.savez(other, something=np.arange(3))
    with pytest.raises(ValueError, match="not a dqkernels bins file"):
        load_bins(other)
    result = graphcut_bins(X, bins=4)
    broken = tmp_path / "broken.npz"
    result.save(broken)
    with np.load(broken) as data:
        arrays = dict(data)
    arrays["order"] = arrays["order"].copy()
    arrays["order"][0] = arrays["order"][1]
    np.savez(broken, **arrays)
    with pytest.raises(ValueError, match="inconsistent"):
        load_bins(broken)


def test_save_is_atomic(tmp_path, monkeypatch):
    result = graphcut_bins(X, bins=4)
    target = tmp_path / "bins.npz"
    result.save(target)
    before = target.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        graphcut_bins(X, bins=2).save(target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bins.npz"]
    with pytest.raises(ValueError, match="output directory does not exist"):
        result.save(tmp_path / "nope" / "bins.npz")


# --------------------------------------------------------------------------- no input is an output


def _tree(root):
    """root/images/a/x.png, root/feats.npy, root/other.npy (hard link of feats.npy), root/link.npy
    (symlink to it) and root/notes.txt."""
    (root / "images" / "a").mkdir(parents=True)
    (root / "images" / "a" / "x.png").write_bytes(b"png")
    np.save(root / "feats.npy", X)
    os.link(root / "feats.npy", root / "other.npy")
    os.symlink(root / "feats.npy", root / "link.npy")
    (root / "notes.txt").write_text("notes")
    return root


@pytest.mark.parametrize(
    "inputs,outputs,options,words",
    [
        ({"--features": "feats.npy"}, {"-o": "feats.npy"}, {}, "-o '{root}/feats.npy' is the same file as --features '{root}/feats.npy'; an output must not overwrite"),
        ({"--features": "feats.npy"}, {"-o": "./images/../feats.npy"}, {}, "is the same file as --features"),
        ({"--features": "feats.npy"}, {"-o": "other.npy"}, {}, "-o '{root}/other.npy' is the same file as --features '{root}/feats.npy'"),
        ({"--features": "feats.npy"}, {"-o": "link.npy"}, {}, "is the same file as --features"),
        ({"INPUT": "images"}, {"-o": "images"}, {}, "is the same file as INPUT"),
        ({"INPUT": "images"}, {"-o": "images/a/feats"}, {}, "lies inside INPUT '{root}/images', which is read as input"),
        ({"INPUT": "images/a/x.png"}, {"--export": "images"}, {"folders": {"--export"}},
         "INPUT '{root}/images/a/x.png' lies inside --export '{root}/images', which is replaced as a whole"),
        ({"INPUT": "images"}, {"--export": "."}, {"folders": {"--export"}}, "lies inside --export"),
        ({}, {"-o": "subset.json", "its manifest": "subset.json"}, {},
         "-o '{root}/subset.json' and its manifest are the same path"),
        ({}, {"work_dir": "work", "export": "."}, {"folders": {"export"}}, "work_dir '{root}/work' lies inside export"),
    ],
)
def test_refuse_overlap_names_both_paths(tmp_path, monkeypatch, inputs, outputs, options, words):
    root = _tree(tmp_path)
    monkeypatch.chdir(root)
    with pytest.raises(InputError) as info:
        refuse_overlap(inputs, outputs, **options)
    assert words.format(root=root) in str(info.value)


def test_refuse_overlap_allows_what_touches_no_input(tmp_path, monkeypatch):
    root = _tree(tmp_path)
    monkeypatch.chdir(root)
    refuse_overlap({"--features": "feats.npy", "--labels": None}, {"-o": "bins.npz", "--export": None})
    refuse_overlap({"INPUT": "images"}, {"-o": "feats", "its sidecar": "feats/features.json"})
    refuse_overlap({"--features": "."}, {"-o": "bins.npz"}, shallow={"--features"})  # beside a feature set
    refuse_overlap({"--bins": "feats.npy"}, {"--export": "export"}, folders={"--export"})
    with pytest.raises(InputError, match="lies inside --features"):
        refuse_overlap({"--features": "."}, {"-o": "bins.npz"})  # a folder read whole
