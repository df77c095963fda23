"""The ``dqk`` command line: end to end on images, photos, text and arrays; any float .npy for
``dqk bin``; one-line errors with nothing half-written (in-process and in a real subprocess)."""

import filecmp
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest_data import (
    REPO_ROOT,
    assert_clean_failure,
    digits_arrays,
    digits_features_fixture,  # noqa: F401
    digits_folder_fixture,  # noqa: F401
    invoke,
    run_subprocess,
    snapshot_files,
    text_model_path,
    write_instruction_jsonl,
    write_photo_tiles_folder,
)

import dqkernels
import dqkernels.pipeline
from dqkernels.core.errors import InputError, InputTypeError


def _ok(args):
    result = invoke(args)
    assert result.exit_code == 0, result.output
    return result


def _items(features_dir):
    """The relative image path of every feature row (items.jsonl: {"path": ..., "size": ...} lines)."""
    with open(features_dir / "items.jsonl") as handle:
        return [json.loads(line)["path"] for line in handle]


@pytest.mark.parametrize("command", ["features", "bin", "sample", "run", "info"])
def test_every_command_has_help(command):
    result = _ok([command, "--help"])
    assert f"Usage: dqk {command}" in result.output
    assert len(result.output.splitlines()) > 5


def test_digits_image_folder_end_to_end(tmp_path, digits_folder):
    features = tmp_path / "feats"
    result = _ok(["features", digits_folder, "-o", features, "--img-size", 32, "--device", "cpu", "--random-init"])
    assert "random-init" in result.output
    sidecar = json.loads((features / "features.json").read_text())
    assert sidecar["checkpoint"] == "random-init" and sidecar["count"] == 40
    assert sidecar["dims"] == {"features": 512} and sidecar["source"]["kind"] == "image-folder"
    assert np.load(features / "labels.npy").tolist() == [c for c in range(10) for _ in range(4)]

    result = _ok(["bin", "--features", features, "--bins", 4])
    assert "per class" in result.output and "sizes 10 10 10 10" in result.output
    bins = dqkernels.load_bins(features / "bins.npz")
    assert bins.meta["features_sidecar"] == str((features / "features.json").resolve())

    export = tmp_path / "export"
    _ok(["sample", "--bins", features / "bins.npz", "--ratio", 0.25, "--seed", 1, "--export", export])
    subset = np.load(features / "subset.npy")
    assert subset.shape == (10,)
    items = _items(features)
    exported = sorted(p.relative_to(export).as_posix() for p in export.rglob("*.png"))
    assert exported == sorted(items[i] for i in subset)
    for relative in exported:
        assert filecmp.cmp(export / relative, digits_folder / relative, shallow=False)


def test_photo_tiles_end_to_end_with_symlinks(tmp_path):
    photos = write_photo_tiles_folder(tmp_path / "photos")
    features = tmp_path / "feats"
    _ok(["features", photos, "-o", features, "--img-size", 48, "--device", "cpu", "--workers", 2, "--random-init"])
    result = _ok(["bin", "--features", features, "--bins", 3, "--no-labels", "-o", tmp_path / "bins.npz"])
    assert "per class" not in result.output
    export = tmp_path / "export"
    _ok(["sample", "--bins", tmp_path / "bins.npz", "--ratio", 0.5, "--export", export, "--link"])

    subset = np.load(tmp_path / "subset.npy")
    assert subset.shape == (6,)
    items = _items(features)
    for row in subset:
        target = export / items[row]
        assert target.is_symlink() and target.resolve() == (photos / items[row]).resolve()


def test_instruction_jsonl_end_to_end(tmp_path):
    model_path = text_model_path()
    data = write_instruction_jsonl(tmp_path / "instructions.jsonl", count=20)
    features = tmp_path / "feats"
    _ok(["features", data, "-o", features, "--text-model", model_path, "--device", "cpu"])
    sidecar = json.loads((features / "features.json").read_text())
    assert sidecar["dims"] == {"features": 384} and "labels" not in sidecar["files"]

    _ok(["bin", "--features", features / "feats.npy", "--bins", 4])
    export = tmp_path / "export"
    _ok(["sample", "--bins", features / "bins.npz", "--ratio", 0.25, "--export", export])

    subset = np.load(features / "subset.npy")
    lines = data.read_text().splitlines()
    assert (export / "instructions.jsonl").read_text().splitlines() == [lines[i] for i in subset]


def test_labelled_npz_gradient_mode_end_to_end(tmp_path):
    images, labels = digits_arrays(30)
    np.savez(tmp_path / "digits.npz", images=images, labels=labels)
    features = tmp_path / "grad"
    _ok(["features", tmp_path / "digits.npz", "-o", features, "--mode", "gradient", "--device", "cpu", "--random-init"])
    sidecar = json.loads((features / "features.json").read_text())
    assert sidecar["dims"] == {"delta": 10, "embed": 512} and not (features / "feats.npy").exists()
    assert sidecar["img_size"] == 224 and sidecar["source"]["format"] == "npz"

    _ok(["bin", "--features", features / "features.json", "--bins", 2])
    bins = dqkernels.load_bins(features / "bins.npz")
    assert bins.meta["gradient_embedding"] and bins.meta["per_class"]
    export = tmp_path / "export"
    _ok(["sample", "--bins", features / "bins.npz", "--ratio", 0.5, "--export", export])

    subset = np.load(features / "subset.npy")
    with np.load(export / "digits.npz") as exported:
        np.testing.assert_array_equal(exported["images"], images[subset])
        np.testing.assert_array_equal(exported["labels"], labels[subset])


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_bin_accepts_any_float_npy_in_c_or_fortran_order(tmp_path, dtype):
    features = np.random.default_rng(0).standard_normal((60, 12)).astype(dtype)
    orders = {}
    for layout, array in (("c", np.ascontiguousarray(features)), ("f", np.asfortranarray(features))):
        folder = tmp_path / layout
        folder.mkdir()
        np.save(folder / "feats.npy", array)
        assert np.load(folder / "feats.npy").flags.f_contiguous == (layout == "f")
        result = invoke(["bin", "--features", folder / "feats.npy", "--bins", "10"])
        assert result.exit_code == 0, result.output
        bins = dqkernels.load_bins(folder / "bins.npz")
        assert bins.bin_sizes.tolist() == [6] * 10 and bins.meta["M"] == 60
        orders[layout] = bins.order
    np.testing.assert_array_equal(orders["c"], orders["f"])


def test_sample_export_uses_source_when_features_have_no_sidecar(tmp_path):
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(12)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    np.save(tmp_path / "feats.npy", np.random.default_rng(1).standard_normal((12, 5)))
    _ok(["bin", "--features", tmp_path / "feats.npy", "--bins", 3])

    result = invoke(["sample", "--bins", tmp_path / "bins.npz", "--ratio", 0.5, "--export", tmp_path / "a"])
    assert result.exit_code == 1 and "give the input data with --source" in result.stderr
    assert not (tmp_path / "subset.npy").exists() and not (tmp_path / "a").exists()

    _ok(["sample", "--bins", tmp_path / "bins.npz", "--ratio", 0.5, "--export", tmp_path / "b",
         "--source", tmp_path / "data.json"])
    subset = np.load(tmp_path / "subset.npy")
    assert json.loads((tmp_path / "b" / "data.json").read_text()) == [records[i] for i in subset]


def test_info_describes_features_bins_subset_and_plain_arrays(tmp_path, digits_features):
    features = tmp_path / "feats"
    shutil.copytree(digits_features, features)
    _ok(["bin", "--features", features, "--bins", 4])
    _ok(["sample", "--bins", features / "bins.npz", "--ratio", 0.5])
    np.save(tmp_path / "plain.npy", np.asfortranarray(np.zeros((3, 4), np.float16)))

    assert "feature set, 40 samples, mode pooled" in _ok(["info", features]).output
    assert "features: shape (40, 512), dtype float32" in _ok(["info", features / "feats.npy"]).output
    bins_info = _ok(["info", features / "bins.npz"]).output
    assert "40 samples in 4 bins" in bins_info and "bin sizes: 10 10 10 10" in bins_info
    assert "subset, 20 ids, dtype int64" in _ok(["info", features / "subset.npy"]).output
    assert "shape (3, 4), dtype float16, Fortran order" in _ok(["info", tmp_path / "plain.npy"]).output


def test_run_from_yaml_reuses_finished_stages(tmp_path, digits_folder):
    config = tmp_path / "dq.yaml"
    config.write_text(
        f"input: {digits_folder}\nwork_dir: work\nimg_size: 32\ndevice: cpu\nbins: 4\nratio: 0.25\nexport: out\n"
        "random_init: true\n"
    )
    first = _ok(["run", config, "-q"]).output
    assert [line.split(":")[0] + ":" + line.split()[1] for line in first.splitlines()] == [
        "features:wrote", "bins:wrote", "sample:wrote", "export:wrote"
    ]
    subset = np.load(tmp_path / "work" / "subset.npy")
    assert len(list((tmp_path / "out").rglob("*.png"))) == subset.size == 10

    second = _ok(["run", config, "-q"]).output
    assert all(" reused " in line for line in second.splitlines()) and len(second.splitlines()) == 4

    third = _ok(["run", config, "-q", "--ratio", 0.5]).output.splitlines()
    assert " reused " in third[0] and " reused " in third[1]
    assert " wrote " in third[2] and " wrote " in third[3]
    assert len(list((tmp_path / "out").rglob("*.png"))) == 20  # its own previous export replaced


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """A directory of broken and mismatching inputs, plus valid ones to combine them with."""
    root = tmp_path_factory.mktemp("bad-inputs")
    rng = np.random.default_rng(0)
    np.save(root / "feats.npy", rng.standard_normal((20, 8)).astype(np.float32))
    np.save(root / "short_labels.npy", np.zeros(19, dtype=np.int64))
    np.save(root / "int_feats.npy", np.zeros((20, 8), dtype=np.int32))
    (root / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    (root / "corrupt_bins.npz").write_bytes(b"PK\x03\x04 not really a zip")
    dqkernels.graphcut_bins(np.load(root / "feats.npy"), bins=2).save(root / "bins.npz")
    (root / "empty_folder").mkdir()
    images = root / "images" / "only_class"
    images.mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "good.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    torch.save({"fc.weight": torch.zeros(3, 3)}, root / "unfit.pth")
    np.save(root / "unlabelled_images.npy", digits_arrays(4)[0])
    write_instruction_jsonl(root / "data.jsonl", count=4)
    (root / "not_empty").mkdir()
    (root / "not_empty" / "keep.txt").write_text("keep")
    np.save(root / "labels.npy", np.arange(20) % 2)
    os.link(root / "feats.npy", root / "feats_hardlink.npy")
    with np.load(root / "bins.npz") as data:
        arrays = dict(data)
    np.savez(root / "list_meta_bins.npz", **{**arrays, "meta": np.array(json.dumps([1, 2]))})
    (root / "model_number.yaml").write_text("input: images\nwork_dir: work\nmodel: 123\n")
    (root / "run.json").write_text('{"input": "images", "work_dir": ".", "device": "cpu"}\n')  # YAML is JSON too
    (root / "records.json").write_text(json.dumps([{"instruction": f"q{i}"} for i in range(20)]))
    return root


IMAGE_OPTIONS = ["-o", "out", "--img-size", "16", "--device", "cpu"]
BAD_INVOCATIONS = {
    "missing features": (["bin", "--features", "missing.npy"], 2, "does not exist"),
    "corrupt features": (["bin", "--features", "corrupt.npy"], 1, "not a readable .npy"),
    "integer features": (["bin", "--features", "int_feats.npy"], 1, "expected a 2-D float array"),
    "labels mismatch": (["bin", "--features", "feats.npy", "--labels", "short_labels.npy"], 1,
                        "have 19 entries but the features have 20 rows"),
    "more bins than samples": (["bin", "--features", "feats.npy", "--bins", "21"], 1,
                               "more than the number of samples"),
    "ratio zero": (["sample", "--bins", "bins.npz", "--ratio", "0"], 2, "'--ratio'"),
    "ratio above one": (["sample", "--bins", "bins.npz", "--ratio", "1.5"], 2, "'--ratio'"),
    "corrupt bins": (["sample", "--bins", "corrupt_bins.npz", "--ratio", "0.5"], 1, "bins"),
    "export into non-empty directory": (
        ["sample", "--bins", "bins.npz", "--ratio", "0.5", "--export", "not_empty"], 1, "not empty"),
    "empty folder": (["features", "empty_folder", *IMAGE_OPTIONS, "--random-init"], 1, "holds no images"),
    "unknown model": (["features", "images", *IMAGE_OPTIONS, "--random-init", "--model", "resnet19"], 1, "unknown timm model"),
    "checkpoint does not fit": (["features", "images", *IMAGE_OPTIONS, "--checkpoint", "unfit.pth"], 1,
                                "does not fit resnet18"),
    "unreadable image, strict": (["features", "images", *IMAGE_OPTIONS, "--random-init", "--strict"], 1,
                                 "cannot read image"),
    "gradient mode without labels": (["features", "unlabelled_images.npy", *IMAGE_OPTIONS, "--random-init", "--mode", "gradient"],
                                     1, "needs labels"),
    "official delta without gradient mode": (["features", "images", *IMAGE_OPTIONS, "--grad-delta", "official"],
                                             2, "--mode gradient only"),
    "info on a corrupt file": (["info", "corrupt.npy"], 1, "not a readable .npy"),
    "bins meta not an object": (["sample", "--bins", "list_meta_bins.npz", "--ratio", "0.5"], 1,
                                "its meta is not a JSON object"),
    "a .npy given as bins": (["sample", "--bins", "feats.npy", "--ratio", "0.5"], 1, "holds a single array"),
    "number for a model name in YAML": (["run", "model_number.yaml"], 1, "model must be a string, got 123"),
    "bin over its features": (["bin", "--features", "feats.npy", "-o", "feats.npy"], 1,
                              "is the same file as --features"),
    "sample ids over their manifest": (["sample", "--bins", "bins.npz", "--ratio", "0.5", "-o", "subset.json"], 1,
                                       "and its manifest are the same path"),
}

# No input is ever an output: each command refuses, before any work, to write over or into its inputs.
OVERLAPPING_INVOCATIONS = {
    "bin over its features": (["bin", "--features", "feats.npy", "-o", "feats.npy"], "is the same file as --features"),
    "bin over a hard link of its features": (["bin", "--features", "feats.npy", "-o", "feats_hardlink.npy"],
                                             "is the same file as --features"),
    "bin over its labels": (["bin", "--features", "feats.npy", "--labels", "labels.npy", "-o", "labels.npy"],
                            "is the same file as --labels"),
    "sample over its bins": (["sample", "--bins", "bins.npz", "--ratio", "0.5", "-o", "bins.npz"],
                             "is the same file as --bins"),
    "sample manifest over its source": (["sample", "--bins", "bins.npz", "--ratio", "0.5", "-o", "records.npy",
                                         "--export", "picked", "--source", "records.json"],
                                        "its manifest '{root}/records.json' is the same file as --source"),
    "sample ids over their manifest": (["sample", "--bins", "bins.npz", "--ratio", "0.5", "-o", "subset.json"],
                                       "and its manifest are the same path"),
    "export over its source": (["sample", "--bins", "bins.npz", "--ratio", "0.5", "--export", "images",
                                "--source", "images"], "is the same file as --source"),
    "export inside its source": (["sample", "--bins", "bins.npz", "--ratio", "0.5", "--export", "images/picked",
                                  "--source", "images"], "lies inside --source"),
    "features into their input folder": (["features", "images", "-o", "images/feats", "--device", "cpu"],
                                         "lies inside INPUT"),
    "features over their input array": (["features", "feats.npy", "-o", ".", "--device", "cpu"],
                                        "-o/--out-dir's feats.npy '{root}/feats.npy' is the same file as INPUT"),
    "run work dir inside its input": (["run", "--input", "images", "--work-dir", "images/work", "--device", "cpu"],
                                      "work_dir '{root}/images/work' lies inside input '{root}/images'"),
    "run export over its input": (["run", "--input", "images", "--work-dir", "work", "--export", "images",
                                   "--device", "cpu"], "export '{root}/images' is the same file as input"),
    "run over its config": (["run", "run.json"], "the run record '{root}/run.json' is the same file as CONFIG"),
    "quantize into its images": (["quantize", "--images", "images", "-o", "images/patches", "--device", "cpu"],
                                 "lies inside --images"),
    "quantize around its images": (["quantize", "--images", "images", "-o", ".", "--device", "cpu"],
                                   "which is replaced as a whole"),
    "reconstruct into its store": (["reconstruct", "images", "--mae", "unfit.pth", "-o", "images/out"],
                                   "lies inside PATCHES"),
    "v2 into its images": (["v2", "--images", "images", "-o", "images/v2", "--device", "cpu"], "lies inside --images"),
}


INPUT_DIRECTORIES = ["empty_folder", "images", "not_empty"]


@pytest.mark.parametrize("case", list(BAD_INVOCATIONS))
def test_bad_input_is_one_error_line_in_process(bad_inputs, monkeypatch, case):
    args, expected_code, expected_text = BAD_INVOCATIONS[case]
    monkeypatch.chdir(bad_inputs)
    before = snapshot_files(bad_inputs)
    result = invoke(args)
    assert_clean_failure(
        bad_inputs, before, result.exit_code, result.stderr, expected_code, expected_text, INPUT_DIRECTORIES
    )
    assert result.stdout == ""


@pytest.mark.parametrize("case", list(BAD_INVOCATIONS))
def test_bad_input_is_one_error_line_in_a_subprocess(bad_inputs, case):
    args, expected_code, expected_text = BAD_INVOCATIONS[case]
    before = snapshot_files(bad_inputs)
    completed = run_subprocess(args, cwd=bad_inputs)
    assert_clean_failure(
        bad_inputs, before, completed.returncode, completed.stderr, expected_code, expected_text, INPUT_DIRECTORIES
    )
    assert "Traceback" not in completed.stderr and completed.stdout == ""


@pytest.mark.parametrize("case", list(OVERLAPPING_INVOCATIONS))
def test_no_command_writes_over_or_into_its_inputs(bad_inputs, monkeypatch, case):
    args, expected_text = OVERLAPPING_INVOCATIONS[case]
    monkeypatch.chdir(bad_inputs)
    before = snapshot_files(bad_inputs)
    result = invoke(args)
    expected_text = expected_text.format(root=bad_inputs)
    assert_clean_failure(bad_inputs, before, result.exit_code, result.stderr, 1, expected_text, INPUT_DIRECTORIES)


# --------------------------------------------------------------------------- the error policy


@pytest.mark.parametrize("error", [TypeError("a bug"), ValueError("a bug"), KeyError("a bug")])
def test_a_library_bug_keeps_its_traceback(tmp_path, monkeypatch, error):
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(dqkernels.pipeline, "draw_subset", broken)
    np.save(tmp_path / "feats.npy", np.random.default_rng(0).standard_normal((10, 3)))
    dqkernels.graphcut_bins(np.load(tmp_path / "feats.npy"), bins=2).save(tmp_path / "bins.npz")
    result = invoke(["sample", "--bins", tmp_path / "bins.npz", "--ratio", "0.5"])
    assert result.exit_code == 1 and result.exception is error  # not turned into an "Error:" line
    assert "Error:" not in result.stderr


@pytest.mark.parametrize("error,code", [(InputError("bad value x"), 1), (InputTypeError("bad value x"), 1),
                                        (PermissionError(13, "Permission denied", "x"), 1)])
def test_input_and_os_errors_are_one_line(tmp_path, monkeypatch, error, code):
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(dqkernels.pipeline, "draw_subset", refuse)
    dqkernels.graphcut_bins(np.random.default_rng(0).standard_normal((10, 3)), bins=2).save(tmp_path / "bins.npz")
    result = invoke(["sample", "--bins", tmp_path / "bins.npz", "--ratio", "0.5"])
    assert result.exit_code == code and result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1
    assert str(error) in result.stderr


def test_a_refused_text_model_is_one_error_line(tmp_path):
    """A model directory whose weights are an untrusted pickle is refused, never executed."""
    model = shutil.copytree(text_model_path(), tmp_path / "model")
    (model / "model.safetensors").unlink()
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"embeddings.word_embeddings.weight": Payload()}, model / "pytorch_model.bin")
    data = write_instruction_jsonl(tmp_path / "data.jsonl", count=4)
    result = invoke(["features", data, "-o", tmp_path / "out", "--text-model", model, "--device", "cpu"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and "cannot load text model" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_importing_the_cli_loads_no_torch(tmp_path):
    probe = ("import sys, dqkernels.cli; heavy = sorted({m.split('.')[0] for m in sys.modules} & "
             "{'torch', 'timm', 'torchvision', 'sentence_transformers'}); print(heavy)")
    completed = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), timeout=120)
    assert completed.returncode == 0 and completed.stdout.strip() == "[]", completed.stderr
