"""``dqk quantize`` and ``dqk reconstruct``: features → bins → subset → patch store → ImageFolder, with
ids mapped through the feature set (not file-name order), and one-line errors for bad input, in
process and in a real subprocess."""

import json

import numpy as np
import pytest
import torch
from conftest_data import (
    assert_clean_failure,
    digits_arrays,
    invoke,
    run_subprocess,
    snapshot_files,
    write_digits_image_folder,
)
from PIL import Image

from dqkernels.cli.pixel import MAE_ARCH_NAMES
from dqkernels.pixel.mae import MAE_ARCHS, MAEConfig, MaskedAutoencoder
from dqkernels.pixel.patch_store import PatchStore, patchify, write_patch_store

TINY = MAEConfig(patch_size=16, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                 decoder_num_heads=2)


def _ok(args):
    result = invoke(args)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("command", ["quantize", "reconstruct"])
def test_commands_have_help(command):
    result = _ok([command, "--help"])
    assert f"Usage: dqk {command}" in result.output and "--device" in result.output


def test_cli_offers_every_mae_size():
    assert MAE_ARCH_NAMES == tuple(MAE_ARCHS)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A randomly initialised MAE ViT-B/16 saved as MAE saves it ({"model": state_dict})."""
    path = tmp_path_factory.mktemp("mae") / "mae_base.pth"
    torch.manual_seed(0)
    torch.save({"model": MaskedAutoencoder("base").state_dict()}, path)
    return path


@pytest.fixture
def folder_with_a_broken_image(tmp_path):
    """Digits (3 per class) plus an unreadable image among the first files: `dqk features` skips it,
    so feature rows no longer follow the folder's file order."""
    root = write_digits_image_folder(tmp_path / "digits", per_class=3, size=32)
    (root / "0" / "0000_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return root


def test_quantize_and_reconstruct_end_to_end(tmp_path, folder_with_a_broken_image, base_checkpoint):
    images = folder_with_a_broken_image
    features = tmp_path / "feats"
    _ok(["features", images, "-o", features, "--img-size", 32, "--device", "cpu", "--random-init"])
    _ok(["bin", "--features", features, "--bins", 3])
    _ok(["sample", "--bins", features / "bins.npz", "--ratio", 0.2, "--seed", 3, "-o", tmp_path / "subset.npy"])
    subset = np.load(tmp_path / "subset.npy")
    items = [json.loads(line)["path"] for line in (features / "items.jsonl").read_text().splitlines()]
    assert len(items) == 30 and "0/0000_broken.png" not in items and subset.shape == (6,)

    patches = tmp_path / "patches"
    result = _ok(["quantize", "--subset", tmp_path / "subset.npy", "--images", images, "--drop", 0.25,
                  "--img-size", 56, "-o", patches, "--device", "cpu"])
    store = PatchStore(patches)
    image_bytes = 6 * 56 * 56 * 3
    assert f"6 images, 147 of 196 patches kept each (drop 0.25) | bytes {image_bytes} -> {store.stored_bytes()}" \
        in result.output
    assert store.stored_bytes() < image_bytes
    assert store.sample_ids.tolist() == subset.tolist()
    assert store.items == [items[row] for row in subset]  # through items.jsonl, not the folder's file order
    assert store.labels.tolist() == np.load(features / "labels.npy")[subset].tolist()
    assert store.class_names == [str(digit) for digit in range(10)]
    assert store.header["scoring"]["target_layer"] == "layer4" and store.header["scoring"]["kept_per_image"] == 147
    stored = store.batch(slice(0, 6))
    for row, item in enumerate(store.items):
        with Image.open(images / item) as image:
            original = np.asarray(image.convert("RGB").resize((56, 56), Image.Resampling.BILINEAR))
        assert np.array_equal(stored.patches[row][stored.keep_mask[row]],
                              patchify(original[None], 4)[0][stored.keep_mask[row]])

    rebuilt = tmp_path / "rebuilt"
    result = _ok(["reconstruct", patches, "--mae", base_checkpoint, "--arch", "base", "-o", rebuilt,
                  "--device", "cpu", "--batch-size", 4])
    assert "6 images of 56x56" in result.output
    written = sorted(p.relative_to(rebuilt).as_posix() for p in rebuilt.rglob("*.png"))
    assert written == sorted(store.items)
    records = [json.loads(line) for line in (rebuilt / "samples.jsonl").read_text().splitlines()]
    assert [record["id"] for record in records] == subset.tolist()
    for row, record in enumerate(records):
        assert record["source"] == store.items[row] and record["label"] == int(store.labels[row])
        pixels = np.asarray(Image.open(rebuilt / record["path"]))
        kept = stored.keep_mask[row]
        assert np.array_equal(patchify(pixels[None], 4)[0][kept], stored.patches[row][kept])


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """A directory of inputs that the pixel commands must refuse."""
    root = tmp_path_factory.mktemp("bad-pixel-inputs")
    np.save(root / "unlabelled.npy", digits_arrays(4, size=32)[0])
    np.save(root / "subset_99.npy", np.array([0, 99]))
    torch.save({"fc.weight": torch.zeros(3, 3)}, root / "unfit.pth")
    torch.save({"model": MaskedAutoencoder(TINY).state_dict()}, root / "tiny_mae.pth")
    images = np.zeros((2, 56, 56, 3), dtype=np.uint8)
    write_patch_store(root / "store", images, np.ones((2, 196), dtype=bool), [0, 1], patch=4)
    write_patch_store(root / "store_7x7", images, np.ones((2, 49), dtype=bool), [0, 1], patch=8)
    (root / "not_a_store").mkdir()
    (root / "not_empty").mkdir()
    (root / "not_empty" / "keep.txt").write_text("keep")
    return root


QUANTIZE = ["quantize", "--images", "unlabelled.npy", "--device", "cpu"]
BAD_INVOCATIONS = {
    "drop of one": ([*QUANTIZE, "-o", "out", "--drop", "1"], 2, "'--drop'"),
    "negative drop": ([*QUANTIZE, "-o", "out", "--drop", "-0.1"], 2, "'--drop'"),
    "missing images": (["quantize", "--images", "missing.npy", "-o", "out"], 2, "does not exist"),
    "image size off the grid": ([*QUANTIZE, "-o", "out", "--img-size", "50"], 1,
                                "img_size must be a positive multiple of the grid (14)"),
    "grid not dividing 224": ([*QUANTIZE, "-o", "out", "--grid", "15", "--img-size", "30"], 1,
                              "grid must be a positive integer dividing 224"),
    "subset id out of range": ([*QUANTIZE, "-o", "out", "--subset", "subset_99.npy"], 1,
                               "subset id 99 is out of range"),
    "label target without labels": ([*QUANTIZE, "-o", "out", "--target", "label"], 1, "needs labels"),
    "cam checkpoint does not fit": ([*QUANTIZE, "-o", "out", "--cam-checkpoint", "unfit.pth"], 1,
                                    "does not fit resnet18"),
    "unknown cam layer": ([*QUANTIZE, "-o", "out", "--cam-layer", "layer9"], 1, "target_layer 'layer9'"),
    "quantize into a non-empty directory": ([*QUANTIZE, "-o", "not_empty"], 1, "already exists and is not empty"),
    "not a patch store": (["reconstruct", "not_a_store", "--mae", "tiny_mae.pth", "--arch", "base", "-o", "out"], 1,
                          "is not a patch store"),
    "missing mae checkpoint": (["reconstruct", "store", "--mae", "missing.pth", "-o", "out"], 2, "does not exist"),
    "checkpoint of another architecture": (["reconstruct", "store", "--mae", "tiny_mae.pth", "--arch", "base",
                                            "-o", "out", "--device", "cpu"], 1, "does not fit MAE base"),
    "store off the mae grid": (["reconstruct", "store_7x7", "--mae", "tiny_mae.pth", "--arch", "huge", "-o", "out"],
                               1, "do not fit this MAE's 16x16 grid"),
    "reconstruct into a non-empty directory": (["reconstruct", "store", "--mae", "tiny_mae.pth", "-o", "not_empty"],
                                               1, "already exists and is not empty"),
}
SUBPROCESS_CASES = ["drop of one", "image size off the grid", "checkpoint of another architecture"]


INPUT_DIRECTORIES = ["not_a_store", "not_empty", "store", "store_7x7"]


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


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_is_one_error_line_in_a_subprocess(bad_inputs, case):
    args, expected_code, expected_text = BAD_INVOCATIONS[case]
    before = snapshot_files(bad_inputs)
    completed = run_subprocess(args, cwd=bad_inputs)
    assert_clean_failure(
        bad_inputs, before, completed.returncode, completed.stderr, expected_code, expected_text, INPUT_DIRECTORIES
    )
    assert "Traceback" not in completed.stderr and completed.stdout == ""


def test_quantize_an_image_array_without_a_subset(tmp_path, bad_inputs):
    images = np.load(bad_inputs / "unlabelled.npy")  # 4 digits, 32×32 RGB
    np.save(tmp_path / "images.npy", images)
    result = _ok(["quantize", "--images", tmp_path / "images.npy", "--img-size", 32, "--grid", 16, "--drop", 0.5,
                  "-o", tmp_path / "patches", "--device", "cpu", "--mode", "compat"])
    assert "4 images, 128 of 256 patches kept each" in result.output
    store = PatchStore(tmp_path / "patches")
    assert store.sample_ids.tolist() == [0, 1, 2, 3] and store.labels is None and store.items is None
    batch = store.batch(slice(0, 4))
    assert np.array_equal(batch.patches[batch.keep_mask], patchify(images, 2)[batch.keep_mask])  # no resize
    assert store.header["scoring"]["mode"] == "compat" and store.header["source"]["kind"] == "image-array"
