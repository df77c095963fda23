"""Pipeline files: feature sets and their sidecars, fingerprints, atomic outputs, export, resumable runs."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from conftest_data import digits_arrays, digits_features_fixture, digits_folder_fixture  # noqa: F401

import dqkernels
from dqkernels import pipeline
from dqkernels.core.fingerprint import (
    fingerprint_arrays,
    fingerprint_document,
    fingerprint_file_listing,
)
from dqkernels.formats.feature_set import open_feature_set
from dqkernels.formats.items import read_export_manifest


@pytest.fixture
def feature_dir(tmp_path, digits_features):
    """A private copy of the digits feature set (tests write bins and subsets into it)."""
    return shutil.copytree(digits_features, tmp_path / "feats")


def test_feature_set_opens_from_directory_sidecar_or_its_npy(feature_dir):
    from_dir = open_feature_set(feature_dir)
    from_sidecar = open_feature_set(feature_dir / "features.json")
    from_npy = open_feature_set(feature_dir / "feats.npy")
    for feature_set in (from_dir, from_sidecar, from_npy):
        assert isinstance(feature_set.features, np.memmap) and feature_set.features.shape == (40, 512)
        assert feature_set.labels.tolist() == [c for c in range(10) for _ in range(4)]
        assert feature_set.sidecar_path == feature_dir / "features.json"
    assert open_feature_set(feature_dir, use_labels=False).labels is None
    np.save(feature_dir / "other_labels.npy", np.arange(40) % 2)
    overridden = open_feature_set(feature_dir, labels=feature_dir / "other_labels.npy", use_labels=False)
    assert overridden.labels.tolist() == (np.arange(40) % 2).tolist()


def test_bare_npy_is_not_claimed_by_an_unrelated_sidecar(tmp_path):
    np.save(tmp_path / "mine.npy", np.ones((5, 3)))
    (tmp_path / "features.json").write_text('{"written by": "another tool"}')
    feature_set = open_feature_set(tmp_path / "mine.npy")
    assert feature_set.sidecar is None and feature_set.labels is None


def test_gradient_feature_set_becomes_a_grad_embedding(tmp_path):
    images, labels = digits_arrays(12)
    np.savez(tmp_path / "digits.npz", images=images, labels=labels)
    pipeline.extract_features(tmp_path / "digits.npz", tmp_path / "grad", mode="gradient", img_size=32, device="cpu",
                              random_init=True)
    feature_set = open_feature_set(tmp_path / "grad" / "embed.npy")
    assert isinstance(feature_set.features, dqkernels.GradEmbedding)
    assert feature_set.features.delta.shape == (12, 10) and feature_set.features.embed.shape == (12, 512)
    np.testing.assert_allclose(feature_set.features.delta.sum(axis=1), 0.0, atol=1e-6)  # softmax − onehot
    assert feature_set.labels.tolist() == labels.tolist()


def test_fingerprints_follow_content(tmp_path, digits_folder):
    listing = ["0/0000.png", "1/0001.png"]
    folder_fp = fingerprint_file_listing(digits_folder, listing)
    assert folder_fp == fingerprint_file_listing(digits_folder, listing[::-1])
    copy = shutil.copytree(digits_folder, tmp_path / "copy")
    os.utime(copy / listing[0], ns=(1, 1))
    assert fingerprint_file_listing(copy, listing) != folder_fp

    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert fingerprint_arrays(values) == fingerprint_arrays(values.copy())
    assert fingerprint_arrays(values) != fingerprint_arrays(values.astype(np.float64))
    assert fingerprint_arrays(values) != fingerprint_arrays(values, np.zeros(4, np.int64))
    assert fingerprint_document({"a": 1, "b": 2}) == fingerprint_document({"b": 2, "a": 1})


def test_failed_stages_write_nothing(tmp_path, feature_dir):
    np.save(tmp_path / "bad_labels.npy", np.zeros(39, dtype=np.int64))
    before = sorted(os.listdir(feature_dir))
    with pytest.raises(ValueError, match="have 39 entries but the features have 40 rows"):
        pipeline.make_bins(feature_dir, 4, labels=tmp_path / "bad_labels.npy")
    assert sorted(os.listdir(feature_dir)) == before

    broken = tmp_path / "images" / "a"
    broken.mkdir(parents=True)
    (broken / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        pipeline.extract_features(tmp_path / "images", tmp_path / "out", img_size=16, device="cpu", strict=True,
                                  random_init=True)
    assert not (tmp_path / "out").exists()


def test_skipped_images_are_recorded(tmp_path, digits_folder):
    images = shutil.copytree(digits_folder, tmp_path / "images")
    (images / "3" / "9999.png").write_bytes(b"not a png")
    sidecar = pipeline.extract_features(images, tmp_path / "feats", img_size=32, device="cpu", random_init=True)
    assert sidecar["skipped"] == {"count": 1, "items": ["3/9999.png"]}
    assert sidecar["count"] == 40 and sidecar["source"]["count"] == 41
    with open(tmp_path / "feats" / "items.jsonl") as handle:
        items = [json.loads(line) for line in handle]
    assert "3/9999.png" not in items and len(items) == 40


def test_export_checks_destination_and_ids(tmp_path, feature_dir):
    outcome = pipeline.make_bins(feature_dir, 4)
    subset = pipeline.draw_subset(outcome.path, 0.25)
    sidecar = subset.manifest["features_sidecar"]

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        pipeline.export_subset(subset.indices, tmp_path / "taken", features_sidecar=sidecar)
    with pytest.raises(ValueError, match="subset id 40 is out of range"):
        pipeline.export_subset(np.array([0, 40]), tmp_path / "new", features_sidecar=sidecar)
    assert not (tmp_path / "new").exists()

    pipeline.export_subset(subset.indices, tmp_path / "first", features_sidecar=sidecar)
    assert read_export_manifest(tmp_path / "first")["count"] == len(subset.indices)
    pipeline.export_subset(subset.indices[:3], tmp_path / "first", features_sidecar=sidecar, replace=True)
    assert len(list((tmp_path / "first").rglob("*.png"))) == 3
    assert [record["id"] for record in read_export_manifest(tmp_path / "first")["samples"]] == \
        subset.indices[:3].tolist()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_export_never_replaces_or_nests_in_its_input(tmp_path, feature_dir, digits_folder):
    images = shutil.copytree(digits_folder, tmp_path / "images")
    sidecar = feature_dir / "features.json"
    before = sorted(p.relative_to(images).as_posix() for p in images.rglob("*"))
    with pytest.raises(ValueError, match="holds the input"):
        pipeline.export_subset(np.array([0, 1]), tmp_path, source=images, features_sidecar=sidecar, replace=True)
    with pytest.raises(ValueError, match="is inside the input folder"):
        pipeline.export_subset(np.array([0, 1]), images / "new", source=images, features_sidecar=sidecar)
    assert sorted(p.relative_to(images).as_posix() for p in images.rglob("*")) == before


def test_export_of_arrays_checks_the_row_count_and_records_labels(tmp_path):
    images, labels = digits_arrays(12)
    np.savez(tmp_path / "digits.npz", images=images, labels=labels)
    sidecar = pipeline.extract_features(tmp_path / "digits.npz", tmp_path / "feats", img_size=32, device="cpu",
                                        random_init=True)
    assert sidecar["count"] == 12
    outcome = pipeline.make_bins(tmp_path / "feats", 3)
    dest = pipeline.export_subset(np.array([1, 4, 9]), tmp_path / "export", features_sidecar=tmp_path / "feats" /
                                  "features.json", bins_file=outcome.path)
    manifest = read_export_manifest(dest)
    assert manifest["samples"] == [
        {"id": row, "label": int(labels[row]), "bin": int(outcome.result.bin_of[row])} for row in (1, 4, 9)
    ]
    with np.load(dest / "digits.npz") as exported:
        np.testing.assert_array_equal(exported["images"], images[[1, 4, 9]])
    np.savez(tmp_path / "fewer.npz", images=images[:10], labels=labels[:10])
    with pytest.raises(ValueError, match="holds 10 samples but the features have 12 rows"):
        pipeline.export_subset(np.array([1]), tmp_path / "other", source=tmp_path / "fewer.npz",
                               features_sidecar=tmp_path / "feats" / "features.json")


def test_pipeline_config_from_yaml(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "cfg" / "dq.yaml").write_text(
        "input: ../data\nwork-dir: runs\nbins: 5\nper_class: false\nratio: 1\nverify_inputs: yes\n"
    )
    config = pipeline.PipelineConfig.from_yaml(tmp_path / "cfg" / "dq.yaml")
    assert config.input == str((tmp_path / "data").resolve())
    assert config.work_dir == str((tmp_path / "cfg" / "runs").resolve())
    assert (config.bins, config.per_class, config.ratio, config.verify_inputs) == (5, False, 1.0, True)
    assert isinstance(config.ratio, float)

    (tmp_path / "typo.yaml").write_text("ratoi: 0.2\n")
    with pytest.raises(ValueError, match="unknown key 'ratoi'"):
        pipeline.PipelineConfig.from_yaml(tmp_path / "typo.yaml")


def test_run_pipeline_recomputes_only_stages_whose_inputs_changed(tmp_path, digits_folder):
    images = shutil.copytree(digits_folder, tmp_path / "images")
    config = pipeline.PipelineConfig(
        input=str(images), work_dir=str(tmp_path / "work"), img_size=32, device="cpu", bins=4, ratio=0.5,
        random_init=True,
    )

    def run():
        log = []
        pipeline.run_pipeline(config, log=log.append)
        return [line.split()[1] for line in log]

    assert run() == ["wrote", "wrote", "wrote"]
    first_subset = np.load(tmp_path / "work" / "subset.npy")
    assert run() == ["reused", "reused", "reused"]

    config.bins = 2
    assert run() == ["reused", "wrote", "wrote"]
    config.ratio = 0.25
    assert run() == ["reused", "reused", "wrote"]
    config.ratio = 0.5
    os.utime(images / "0" / "0000.png", ns=(5, 5))  # input changed: everything is redone
    assert run() == ["wrote", "wrote", "wrote"]
    (tmp_path / "work" / "features" / "feats.npy").unlink()  # a missing output is redone, and what follows
    assert run() == ["wrote", "wrote", "wrote"]
    config.bins = 4
    assert run() == ["reused", "wrote", "wrote"]
    np.testing.assert_array_equal(np.load(tmp_path / "work" / "subset.npy"), first_subset)  # deterministic


def test_run_record_names_each_stage_fingerprint_and_output_hashes(tmp_path, digits_folder):
    config = pipeline.PipelineConfig(
        input=str(digits_folder), work_dir=str(tmp_path / "work"), img_size=32, device="cpu", bins=2, ratio=0.5,
        random_init=True,
    )
    pipeline.run_pipeline(config, log=lambda line: None)
    record = json.loads((tmp_path / "work" / "run.json").read_text())
    assert record["format"] == "dqkernels.run" and list(record["stages"]) == ["features", "bins", "subset"]
    features = record["stages"]["features"]
    assert set(features["outputs"]) == {f"features/{name}" for name in (
        "features.json", "feats.npy", "labels.npy", "items.jsonl")}
    for name, digest in features["outputs"].items():
        assert digest == "sha256:" + hashlib.sha256((tmp_path / "work" / name).read_bytes()).hexdigest()
    sidecar = json.loads((tmp_path / "work" / "features" / "features.json").read_text())
    assert sidecar["stage_fingerprint"] == features["fingerprint"]
    assert dqkernels.load_bins(tmp_path / "work" / "bins.npz").meta["stage_fingerprint"] == \
        record["stages"]["bins"]["fingerprint"]
    assert set(record["stages"]["subset"]["outputs"]) == {"subset.npy", "subset.json"}


def test_run_pipeline_pixel_stage_stores_the_subset_and_is_reused(tmp_path, digits_folder):
    from dqkernels.pixel.patch_store import PatchStore

    config = pipeline.PipelineConfig(
        input=str(digits_folder), work_dir=str(tmp_path / "work"), img_size=32, device="cpu",
        bins=2, ratio=0.25, drop=0.5, quantize_img_size=56, quantize_grid=14, batch_size=16, random_init=True,
    )

    def run():
        log = []
        outputs = pipeline.run_pipeline(config, log=log.append)
        return outputs, [line.split()[1] for line in log]

    outputs, actions = run()
    assert actions == ["wrote", "wrote", "wrote", "wrote"]
    store = PatchStore(outputs["patches"])
    subset = np.load(tmp_path / "work" / "subset.npy")
    np.testing.assert_array_equal(np.sort(store.sample_ids), subset)
    assert store.keep_counts.tolist() == [98] * len(subset)  # floor(196 · (1 − 0.5))

    assert run()[1] == ["reused", "reused", "reused", "reused"]
    config.drop = 0.25
    outputs, actions = run()
    assert actions == ["reused", "reused", "reused", "wrote"]
    assert PatchStore(outputs["patches"]).keep_counts.tolist() == [147] * len(subset)


def test_run_pipeline_checks_drop_before_any_stage(tmp_path, digits_folder):
    config = pipeline.PipelineConfig(input=str(digits_folder), work_dir=str(tmp_path / "work"), drop=1.5)
    with pytest.raises(ValueError, match=r"drop: 1.5 is not in the range 0<=x<1"):
        pipeline.run_pipeline(config, log=lambda line: None)
    config.drop, config.quantize_grid = 0.5, 10
    with pytest.raises(ValueError, match="quantize_grid must divide 224, got 10"):
        pipeline.run_pipeline(config, log=lambda line: None)
    assert not (tmp_path / "work").exists()
