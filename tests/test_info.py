"""``dqk info`` on everything the tool writes: one small run's outputs — a ``dqk run`` work
directory (features, bins, subset, export, patch store), a random-baseline subset and export, a
text export, an MAE reconstruction and a DQ-V2 output — walked file by file and folder by folder."""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_data import invoke, write_digits_image_folder

from dqkernels import pipeline
from dqkernels.pipeline import info_outputs
from dqkernels.pipeline.info_sets import indent
from dqkernels.pixel import mae
from dqkernels.pixel.mae import MAEConfig, MaskedAutoencoder, reconstruct_store
from dqkernels.v2 import run as v2_run

TINY_MAE = MAEConfig(patch_size=16, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                     decoder_num_heads=2)
V2_FAST = ["--mask-px", "32", "--img-size", "32", "--cell-px", "8", "--batch-size", "16", "--device", "cpu",
           "--random-init"]
RECORDS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(12)]


def _ok(args) -> str:
    result = invoke(args)
    assert result.exit_code == 0, (result.output, result.stderr)
    return result.output


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Every kind of output of a small run, under one folder ``out`` (inputs live beside it)."""
    base = tmp_path_factory.mktemp("info")
    images = write_digits_image_folder(base / "digits", per_class=2)
    out = base / "out"
    config = pipeline.PipelineConfig(
        input=str(images), work_dir=str(out / "work"), img_size=32, device="cpu", bins=2, ratio=0.5,
        export=str(out / "export"), drop=0.5, quantize_img_size=56, batch_size=16, random_init=True,
    )
    pipeline.run_pipeline(config, log=lambda line: None)
    with pytest.warns(UserWarning, match="gives no sample to classes"):
        _ok(["sample", "--bins", out / "work" / "bins.npz", "--ratio", 0.25, "--method", "random",
             "-o", out / "random.npy", "--export", out / "random_export"])

    torch.manual_seed(0)
    torch.save({"model": MaskedAutoencoder(TINY_MAE).state_dict()}, base / "tiny_mae.pth")
    reconstruct_store(out / "work" / "patches", base / "tiny_mae.pth", out / "recon", arch=TINY_MAE, device="cpu")

    small = write_digits_image_folder(base / "small", per_class=1)
    with warnings.catch_warnings():  # some of its 10 one-image classes may get no sample
        warnings.simplefilter("ignore", UserWarning)
        _ok(["v2", "--images", small, "--mix", "0.5", "--bins", "1", "--ratio", "0.5", "-o", out / "v2_out", *V2_FAST])

    text = out / "text"
    text.mkdir()
    (base / "data.json").write_text(json.dumps(RECORDS))
    np.save(text / "feats.npy", np.random.default_rng(1).standard_normal((12, 5)).astype(np.float32))
    _ok(["bin", "--features", text / "feats.npy", "--bins", 3])
    _ok(["sample", "--bins", text / "bins.npz", "--ratio", 0.5, "--export", text / "export", "--source",
         base / "data.json"])

    np.save(out / "labels.npy", np.repeat(np.arange(4), 5))
    np.save(out / "plain.npy", np.zeros((3, 4), np.float16))
    return out


def _info(path: Path) -> str:
    result = invoke(["info", path])
    assert result.exit_code == 0, (path, result.stderr)
    assert result.exception is None and "Traceback" not in result.output
    text = result.output.strip()
    assert text.startswith(str(path)), text
    return text


def test_every_file_and_folder_gets_a_description_of_its_kind(outputs, tmp_path):
    written_by_dqk = [path for path in [outputs, *sorted(outputs.rglob("*"))]
                      if path != outputs and path.name not in ("labels.npy", "plain.npy")]
    assert len(written_by_dqk) > 100
    for path in written_by_dqk:
        text = _info(path)
        assert "no dqk command" not in text and "not readable" not in text, text
        assert len(text.splitlines()[0]) > len(str(path)) + 10, text
    overview = _info(outputs)
    for line in ("a folder holding 6 dqk outputs (10 entries)", "  export: export of 10 samples", "  random.npy: subset, 5 ids",
                 "  recon: reconstructed images", "  v2_out: DQ-V2 output", "  work: dqk run work directory"):
        assert line in overview, line
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    assert "a folder that no dqk command wrote (1 files, 0 folders)" in _info(tmp_path / "plain")


def _table(text: str, axis: str, row: str) -> list[int]:
    """The numbers of one row of the first per-``axis`` table in ``text``."""
    block = text.split(f"per {axis}, selected", 1)[1]
    numbers = []
    for line in block.splitlines()[1:]:
        words = line.split()
        if words and words[0] == row:
            numbers += [int(word) for word in words[1:]]
        elif words and words[0] == "all":
            break
    return numbers


def _all_line(text: str, axis_plural: str) -> tuple[int, int]:
    found = re.search(rf"all {axis_plural}: (\d+) of (\d+)", text)
    return int(found.group(1)), int(found.group(2))


@pytest.mark.parametrize("name", ["work/subset.npy", "work/subset.json", "random.npy"])
def test_subset_tables_match_the_manifest(outputs, name):
    text = _info(outputs / name)
    manifest = json.loads((outputs / name).with_suffix(".json").read_text())
    assert f"method {manifest['method']}" in text
    assert f"{manifest['n_selected']} of {manifest['n_samples']} samples" in text
    assert _table(text, "bin", "selected") == [entry["selected"] for entry in manifest["bins"]]
    assert _table(text, "bin", "total") == [entry["count"] for entry in manifest["bins"]]
    assert _table(text, "class", "selected") == [entry["selected"] for entry in manifest["classes"]]
    assert _all_line(text, "bins") == _all_line(text, "classes") == (manifest["n_selected"], manifest["n_samples"])


@pytest.mark.parametrize(("export", "subset"), [("export", "work/subset.npy"), ("random_export", "random.npy")])
def test_export_tables_count_the_exported_samples(outputs, export, subset):
    text = _info(outputs / export)
    manifest = json.loads((outputs / export / "dqk_export.json").read_text())
    subset_manifest = json.loads((outputs / subset).with_suffix(".json").read_text())
    assert f"export of {manifest['count']} samples (image-folder)" in text
    assert _table(text, "bin", "selected") == [entry["selected"] for entry in subset_manifest["bins"]]
    assert _table(text, "bin", "total") == [entry["count"] for entry in subset_manifest["bins"]]
    assert _all_line(text, "classes") == (manifest["count"], subset_manifest["n_samples"])
    sample = manifest["samples"][0]
    member = _info(outputs / export / sample["path"])
    assert f"exported sample id {sample['id']} (bin {sample['bin']}, class '{sample['class']}'" in member
    assert f"class folder '{sample['class']}'" in _info(outputs / export / sample["class"])


def test_run_directory_shows_its_stages_and_outputs(outputs):
    text = _info(outputs / "work")
    assert "dqk run work directory, stages features, bins, subset, export, patches" in text
    for line in ("features: 4 outputs, outputs present", "patches: 1 outputs, outputs present",
                 "feature set, 20 samples, mode pooled", "RANDOM-INIT weights", "20 samples in 2 bins per class",
                 "subset, 10 ids", "export of 10 samples", "patch store, 10 images of 56x56x3"):
        assert line in text, line
    assert _info(outputs / "work" / "run.json").endswith(text.replace("\n", "\n  "))


def test_feature_set_files_bins_and_arrays(outputs):
    features = outputs / "work" / "features"
    assert "feature set, 20 samples, mode pooled" in _info(features)
    assert "the features array of a feature set: shape (20, 512), dtype float32" in _info(features / "feats.npy")
    assert "the labels of a feature set, 20 entries, 10 classes" in _info(features / "labels.npy")
    assert "the item list of a feature set, 20 items" in _info(features / "items.jsonl")
    bins = _info(outputs / "work" / "bins.npz")
    assert "20 samples in 2 bins per class" in bins and "bin sizes: 10 10" in bins
    labels = _info(outputs / "labels.npy")
    assert "shape (20,), dtype int64" in labels and "as labels: 4 classes of 5 5 5 5 samples" in labels
    assert "shape (3, 4), dtype float16, C order" in _info(outputs / "plain.npy")


def test_patch_store_and_reconstruction(outputs):
    store = _info(outputs / "work" / "patches")
    assert "patch store, 10 images of 56x56x3, 4 px patches (14x14 grid)" in store
    assert "kept patches per image: 98 to 98 of 196" in store
    assert "the sample_ids array of a patch store: shape (10,), dtype int64" in _info(
        outputs / "work" / "patches" / "sample_ids.npy")
    assert "the header of\n" + indent(store) in _info(outputs / "work" / "patches" / "header.json")
    recon = _info(outputs / "recon")
    assert "reconstructed images (dqk reconstruct), 10 PNG images" in recon and "image size: 56x56 RGB" in recon
    record = json.loads((outputs / "recon" / "samples.jsonl").read_text().splitlines()[0])
    assert f"reconstructed image of sample id {record['id']} (label {record['label']}, 56x56 RGB)" in _info(
        outputs / "recon" / record["path"])


def test_v2_output_masks_recipes_and_subset(outputs):
    v2 = outputs / "v2_out"
    summary = json.loads((v2 / "v2.json").read_text())
    text = _info(v2)
    assert "DQ-V2 output, pool of 10 originals + 5 Tobias images" in text
    assert _all_line(text, "bins") == (summary["subset"]["selected"], 15)
    assert "DQ-V2 foreground masks, 10 images on a 4x4 grid" in _info(v2 / "masks.npz")
    assert "DQ-V2 Tobias recipes, 5 images" in _info(v2 / "recipes.npz") and "pool ids 10 to 14" in _info(
        v2 / "recipes.npz")
    assert "DQ-V2 pool features, shape (15, 512)" in _info(v2 / "pool_features.npy")
    items = [json.loads(line) for line in (v2 / "subset_items.jsonl").read_text().splitlines()]
    tobias = next(item for item in items if item["kind"] == "tobias")
    assert f"pool id {tobias['pool_id']}" in _info(v2 / "subset" / tobias["file"])
    assert "Tobias image of" in _info(v2 / "subset" / tobias["file"])


def test_text_export_and_unknown_files(outputs, tmp_path):
    text = _info(outputs / "text" / "export")
    assert "export of 6 samples (text)" in text and _all_line(text, "bins") == (6, 12)
    assert "the exported data of" in _info(outputs / "text" / "export" / "data.json")
    (tmp_path / "notes.txt").write_text("hello")
    assert "a 5 bytes file that no dqk command writes" in _info(tmp_path / "notes.txt")
    (tmp_path / "records.json").write_text(json.dumps(RECORDS))
    assert "JSON data, 12 records (fields instruction, output)" in _info(tmp_path / "records.json")
    (tmp_path / "broken.npy").write_bytes(b"not an array")
    result = invoke(["info", tmp_path / "broken.npy"])
    assert result.exit_code == 1 and "is not a readable .npy file" in result.stderr
    (tmp_path / "odd_run").mkdir()
    (tmp_path / "odd_run" / "run.json").write_text(json.dumps({"format": "dqkernels.run", "stages": {
        "export": {"dir": 5}}}))
    result = invoke(["info", tmp_path / "odd_run"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "looks like a dqk output but its records are malformed" in result.stderr


def test_info_knows_the_names_other_layers_write():
    """info cannot import the v2 layer or torch-bound modules; it spells their names itself."""
    assert info_outputs.RECON_SAMPLES == mae.SAMPLES_FILE
    assert info_outputs.V2_FORMAT == v2_run.V2_FORMAT
    from dqkernels.pipeline import runner

    assert (info_outputs.RUN_RECORD, info_outputs.RUN_FORMAT) == (runner.RUN_RECORD, runner.RUN_FORMAT)
