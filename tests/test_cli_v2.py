"""``dqk v2``: DQ-V2 end to end on CPU (in-process and in a real subprocess) — pool counts per
(bin, class), exported originals and Tobias images regenerated from their recipes, reused masks,
and one-line errors with nothing half-written."""

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_data import digits_arrays, digits_folder_fixture, invoke, run_subprocess  # noqa: F401
from PIL import Image

import dqkernels
from dqkernels import pipeline
from dqkernels.formats.subset import load_subset_indices
from dqkernels.v2 import tobias

# Small and fast: the mask model sees 64 px, the features 32 px, the swap runs at the digits' 32 px.
FAST = ["--mask-px", "64", "--img-size", "32", "--cell-px", "8", "--batch-size", "16", "--device", "cpu",
        "--random-init"]


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
    """40 labelled 32 px RGB digits as images + labels in a .npz."""
    images, labels = digits_arrays(40)
    path = tmp_path_factory.mktemp("v2-input") / "digits.npz"
    np.savez(path, images=images, labels=labels)
    return path


@pytest.fixture(scope="module")
def array_run(tmp_path_factory, digits_npz):
    """One in-process ``dqk v2`` run on the .npz: 40 originals + 20 Tobias, 2 bins, half kept."""
    out = tmp_path_factory.mktemp("v2-array") / "out"
    result = invoke(["v2", "--images", digits_npz, "--mix", "0.5", "--bins", "2", "--ratio", "0.5", "-o", out, *FAST])
    assert result.exit_code == 0, result.output
    return out, result


def read_run(out: Path) -> dict:
    """Everything a run wrote, parsed."""
    with np.load(out / "recipes.npz") as archive:
        recipes = tobias.TobiasRecipes(archive["base"], archive["partner"], archive["key"])
        recipe_meta = json.loads(str(archive["meta"]))
    with np.load(out / "masks.npz") as archive:
        masks, mask_meta = archive["masks"], json.loads(str(archive["meta"]))
    return {
        "recipes": recipes,
        "recipe_meta": recipe_meta,
        "masks": masks,
        "mask_meta": mask_meta,
        "bins": dqkernels.load_bins(out / "bins.npz"),
        "chosen": load_subset_indices(out / "subset.npy"),
        "pool_labels": np.load(out / "pool_labels.npy"),
        "pool_features": np.load(out / "pool_features.npy"),
        "summary": json.loads((out / "v2.json").read_text()),
        "items": [json.loads(line) for line in (out / "subset_items.jsonl").read_text().splitlines()],
    }


def test_v2_has_help():
    result = invoke(["v2", "--help"])
    assert result.exit_code == 0 and "Usage: dqk v2" in result.output and "--mask-model" in result.output


def test_array_run_builds_the_mixed_pool_and_keeps_the_ratio(array_run, digits_npz):
    out, result = array_run
    run = read_run(out)
    assert "pool 40 originals + 20 Tobias images; subset 30" in result.stdout
    assert len(run["recipes"]) == 20 and run["recipes"].swapped.all()  # bg_prob 1
    assert len(np.unique(run["recipes"].base)) == 20  # mix 0.5: 20 distinct originals are bases
    assert run["masks"].shape == (40, 4, 4) and (run["masks"].reshape(40, -1).sum(axis=1) == 8).all()
    assert run["recipe_meta"]["cell_px"] == 8 and run["mask_meta"]["kind"] == "random"
    labels = np.load(digits_npz)["labels"]
    np.testing.assert_array_equal(run["pool_labels"], np.concatenate([labels, labels[run["recipes"].base]]))
    assert run["pool_features"].shape == (60, 512) and run["chosen"].shape == (30,)
    assert run["summary"]["subset"] == {
        "selected": 30, "originals": int((run["chosen"] < 40).sum()), "tobias": int((run["chosen"] >= 40).sum()),
    }


def test_counts_per_bin_and_class_match_the_bins_and_the_subset(array_run):
    run = read_run(array_run[0])
    selected = np.isin(np.arange(60), run["chosen"])
    cells = {(cell["bin"], cell["class"]): cell for cell in run["summary"]["cells"]}
    assert len(cells) == 2 * 10
    for bin_id, ids in enumerate(run["bins"].bins):
        for cls in range(10):
            cell_ids = ids[run["pool_labels"][ids] == cls]
            original, tobias_rows = cell_ids[cell_ids < 40], cell_ids[cell_ids >= 40]
            assert cells[bin_id, cls] == {
                "bin": bin_id, "class": cls, "originals": len(original), "tobias": len(tobias_rows),
                "selected_originals": int(selected[original].sum()),
                "selected_tobias": int(selected[tobias_rows].sum()),
            }
            kept = int(selected[cell_ids].sum())
            assert abs(kept - 0.5 * len(cell_ids)) < 1  # exact allocation: within one of ratio x count


def test_exported_array_holds_originals_and_tobias_images_regenerated_from_recipes(array_run, digits_npz):
    out, _ = array_run
    run = read_run(out)
    with np.load(digits_npz) as archive:
        images, labels = archive["images"], archive["labels"]
    with np.load(out / "subset" / "digits.npz") as archive:
        exported, exported_labels = archive["images"], archive["labels"]
    chosen, recipes = run["chosen"], run["recipes"]
    originals, tobias_rows = chosen[chosen < 40], chosen[chosen >= 40] - 40
    assert exported.shape == (30, 32, 32, 3) and exported.dtype == np.uint8
    np.testing.assert_array_equal(exported[: len(originals)], images[originals])
    regenerated = tobias.render(
        recipes.take(tobias_rows), torch.from_numpy(images).permute(0, 3, 1, 2), run["masks"], cell_px=8
    )
    np.testing.assert_array_equal(exported[len(originals):], regenerated.permute(0, 2, 3, 1).numpy())
    base_labels = labels[recipes.base[tobias_rows]]
    np.testing.assert_array_equal(exported_labels, np.concatenate([labels[originals], base_labels]))
    for row, item in zip(tobias_rows, run["items"][len(originals):]):
        assert item["kind"] == "tobias" and item["pool_id"] == row + 40
        assert (item["base"], item["partner"], item["key"]) == (
            recipes.base[row], recipes.partner[row], recipes.key[row],
        )
    assert [item["pool_id"] for item in run["items"]] == chosen.tolist()


def test_pool_features_of_the_originals_are_dqk_features(array_run, digits_npz, tmp_path):
    run = read_run(array_run[0])
    pipeline.extract_features(digits_npz, tmp_path / "feats", img_size=32, batch_size=16, device="cpu",
                              random_init=True)
    expected = np.load(tmp_path / "feats" / "feats.npy")
    np.testing.assert_allclose(run["pool_features"][:40], expected, rtol=1e-5, atol=1e-6)


def test_subprocess_on_an_image_folder_exports_a_trainable_folder(tmp_path, digits_folder):
    out = tmp_path / "out"
    completed = run_subprocess(
        ["v2", "--images", digits_folder, "--mix", "0.5", "--bins", "2", "--ratio", "0.25", "-o", out, *FAST],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    run = read_run(out)
    chosen, recipes, pool_labels = run["chosen"], run["recipes"], run["pool_labels"]
    assert len(recipes) == 20 and chosen.shape == (15,)  # pool of 60, a quarter kept
    listing = dqkernels.features.image.list_image_folder(digits_folder)
    exported = dqkernels.features.image.list_image_folder(out / "subset")
    for cls, name in enumerate(listing.class_names):
        files = [p for p in exported.relative_paths if p.startswith(f"{name}/")]
        tobias_files = [p for p in files if Path(p).name.startswith("tobias_")]
        assert len(files) - len(tobias_files) == int(((chosen < 40) & (pool_labels[chosen] == cls)).sum())
        assert len(tobias_files) == int(((chosen >= 40) & (pool_labels[chosen] == cls)).sum())
    for row in chosen[chosen < 40]:
        relative = listing.relative_paths[row]
        assert filecmp.cmp(digits_folder / relative, out / "subset" / relative, shallow=False)
    folder_images = torch.from_numpy(
        np.stack([np.asarray(Image.open(digits_folder / p).convert("RGB")) for p in listing.relative_paths])
    ).permute(0, 3, 1, 2)
    tobias_rows = chosen[chosen >= 40] - 40
    regenerated = tobias.render(recipes.take(tobias_rows), folder_images, run["masks"], cell_px=8)
    for row, image in zip(tobias_rows, regenerated):
        name = listing.class_names[listing.labels[recipes.base[row]]]
        saved = np.asarray(Image.open(out / "subset" / name / f"tobias_{row + 40:07d}.png"))
        np.testing.assert_array_equal(saved, image.permute(1, 2, 0).numpy())


def test_early_mask_model_and_reused_masks_give_the_same_run(tmp_path, digits_npz, array_run):
    first, second = tmp_path / "early", tmp_path / "reused"
    common = ["--images", digits_npz, "--mix", "0.5", "--bins", "2", "--ratio", "0.5", *FAST]
    result = invoke(["v2", *common, "--mask-model", "early", "--mask-epochs", "1", "-o", first])
    assert result.exit_code == 0, result.output
    early = read_run(first)
    assert early["mask_meta"]["kind"] == "early" and early["mask_meta"]["epochs"] == 1
    assert not np.array_equal(early["masks"], read_run(array_run[0])["masks"])  # training moved the masks
    result = invoke(["v2", *common, "--masks", first / "masks.npz", "-o", second])
    assert result.exit_code == 0, result.output
    reused = read_run(second)
    assert reused["mask_meta"]["stored"] == str((first / "masks.npz").resolve())
    for name in ("masks", "chosen", "pool_features"):
        np.testing.assert_array_equal(reused[name], early[name])
    assert np.array_equal(reused["recipes"].key, early["recipes"].key)
    assert filecmp.cmp(first / "subset" / "digits.npz", second / "subset" / "digits.npz", shallow=False)


def test_given_mask_checkpoint_and_mix_zero_give_plain_dq_on_the_originals(tmp_path, digits_npz, array_run):
    weights = tmp_path / "mask_resnet50.pth"
    torch.save(tobias.random_mask_model(seed=0).state_dict(), weights)
    out = tmp_path / "out"
    result = invoke(["v2", "--images", digits_npz, "--mix", "0", "--bins", "2", "--ratio", "0.5", "--seed", "1",
                     "--mask-checkpoint", weights, "-o", out, *FAST])
    assert result.exit_code == 0, result.output
    run = read_run(out)
    images = np.load(digits_npz)["images"]
    # The seed-0 weights, not a seed-1 random model: the masks of the seed-0 run.
    np.testing.assert_array_equal(run["masks"], read_run(array_run[0])["masks"])
    assert run["mask_meta"]["kind"] == "checkpoint" and len(run["recipes"]) == 0
    assert run["summary"]["subset"] == {"selected": 20, "originals": 20, "tobias": 0}
    with np.load(out / "subset" / "digits.npz") as archive:
        np.testing.assert_array_equal(archive["images"], images[run["chosen"]])


BAD_INVOCATIONS = {
    "missing folder": (["--images", "missing_folder"], 2, "does not exist"),
    "negative mix": (["--mix", "-0.5"], 2, "'--mix'"),
    "ratio zero": (["--ratio", "0"], 2, "'--ratio'"),
    "ratio above one": (["--ratio", "1.5"], 2, "'--ratio'"),
    "grid zero": (["--grid", "0"], 2, "'--grid'"),
    "unknown mask model": (["--mask-model", "pretrained"], 2, "'--mask-model'"),
    "checkpoint with early model": (["--mask-model", "early", "--mask-checkpoint", "digits.npz"], 2,
                                    "exclude each other"),
    "masks of another grid": (["--masks", "masks.npz", "--grid", "2"], 1, "expected (40, 2, 2) bool"),
    "more bins than the pool": (["--bins", "61", "--masks", "masks.npz"], 1, "bins"),  # fails after the features
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, digits_npz, array_run):
    """A directory with the digits and the masks of ``array_run``."""
    root = tmp_path_factory.mktemp("v2-bad")
    (root / "digits.npz").write_bytes(digits_npz.read_bytes())
    (root / "masks.npz").write_bytes((array_run[0] / "masks.npz").read_bytes())
    return root


@pytest.mark.parametrize("case", list(BAD_INVOCATIONS))
def test_bad_input_is_one_error_line_and_writes_nothing(bad_inputs, monkeypatch, case):
    args, expected_code, expected_text = BAD_INVOCATIONS[case]
    monkeypatch.chdir(bad_inputs)
    before = sorted(p.name for p in bad_inputs.iterdir())
    defaults = ["--images", "digits.npz", "--mix", "0.5", "--bins", "2", "--ratio", "0.5", "-o", "out", *FAST]
    result = invoke(["v2", *defaults, *args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == expected_code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected_text in lines[0], result.stderr
    assert sorted(p.name for p in bad_inputs.iterdir()) == before  # no output, no staging left


def test_non_empty_output_directory_is_refused_untouched(tmp_path, digits_npz):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    result = invoke(["v2", "--images", digits_npz, "-o", out, *FAST])
    assert result.exit_code == 1 and "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
