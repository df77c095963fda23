"""`dqk run` resumes by content: a stage is reused only when what it reads, its options and its
recorded outputs are unchanged; a run killed at any commit point is finished by the next run."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest_data import (  # noqa: F401 (fixtures)
    digits_folder_fixture,
    invoke,
    text_model_path,
    write_digits_image_folder,
    write_instruction_jsonl,
)
from test_artifacts import (  # noqa: F401 (fixture)
    crash_at_every_commit_point,
    dqk_command,
    output_snapshot,
    temporaries,
    warm_python_fixture,
)

from dqkernels.pipeline.runner import PipelineConfig, run_pipeline


def _runner(config: PipelineConfig):
    """run() → what each stage did ("wrote" or "reused"), in stage order."""

    def run():
        log = []
        run_pipeline(config, log=log.append)
        return [line.split()[1] for line in log]

    return run


def _edit_npy(path, change):
    array = np.load(path)
    change(array)
    np.save(path, array)


def test_hand_edited_outputs_are_written_again(tmp_path, digits_folder):
    work = tmp_path / "work"
    run = _runner(PipelineConfig(input=str(digits_folder), work_dir=str(work), img_size=32, device="cpu",
                                 bins=4, ratio=0.5, random_init=True))
    assert run() == ["wrote", "wrote", "wrote"]
    features, subset = (work / "features" / "feats.npy").read_bytes(), (work / "subset.npy").read_bytes()

    _edit_npy(work / "features" / "feats.npy", lambda array: array.__setitem__((0, 0), array[0, 0] + 1))
    assert run() == ["wrote", "wrote", "wrote"]  # the edit is found and every stage after it is redone
    assert (work / "features" / "feats.npy").read_bytes() == features
    assert (work / "subset.npy").read_bytes() == subset

    with np.load(work / "bins.npz") as data:
        arrays = dict(data)
    np.savez(work / "bins.npz", **{**arrays, "order": arrays["order"][::-1]})
    assert run() == ["reused", "wrote", "wrote"]
    manifest = json.loads((work / "subset.json").read_text())
    (work / "subset.json").write_text(json.dumps({**manifest, "note": "edited by hand"}))
    assert run() == ["reused", "reused", "wrote"]
    assert (work / "subset.npy").read_bytes() == subset
    assert run() == ["reused", "reused", "reused"]


def test_replaced_checkpoint_at_the_same_path_is_read_again(tmp_path, digits_folder):
    import torch

    from dqkernels.features.image import build_model

    checkpoint = tmp_path / "weights.pth"
    torch.save(build_model("resnet18", num_classes=10, seed=1).state_dict(), checkpoint)
    work = tmp_path / "work"
    run = _runner(PipelineConfig(input=str(digits_folder), work_dir=str(work), checkpoint=str(checkpoint),
                                 img_size=32, device="cpu", bins=4, ratio=0.5))
    assert run() == ["wrote", "wrote", "wrote"]
    before = np.load(work / "features" / "feats.npy")

    torch.save(build_model("resnet18", num_classes=10, seed=2).state_dict(), checkpoint)
    assert run() == ["wrote", "wrote", "wrote"]
    assert not np.array_equal(np.load(work / "features" / "feats.npy"), before)


def test_replaced_text_model_weights_at_the_same_path_are_read_again(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = shutil.copytree(text_model_path(), tmp_path / "model")
    data = write_instruction_jsonl(tmp_path / "data.jsonl", count=12)
    work = tmp_path / "work"
    run = _runner(PipelineConfig(input=str(data), work_dir=str(work), text_model=str(model), device="cpu",
                                 bins=2, ratio=0.5))
    assert run() == ["wrote", "wrote", "wrote"]
    before = np.load(work / "features" / "feats.npy")
    assert run() == ["reused", "reused", "reused"]

    weights = load_file(model / "model.safetensors")
    name = next(key for key in weights if key.endswith("word_embeddings.weight"))
    weights[name] = weights[name] * np.float32(-1.0)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert run() == ["wrote", "wrote", "wrote"]
    assert not np.allclose(np.load(work / "features" / "feats.npy"), before)


def _bmp_folder(root):
    """Eight 16×16 BMP images in two classes: uncompressed, so a pixel can change in place."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(4):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.bmp")
    return root


def _change_pixels_keep_size_and_times(path):
    status = path.stat()
    payload = bytearray(path.read_bytes())
    payload[-48:] = bytes(255 - value for value in payload[-48:])
    path.write_bytes(bytes(payload))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert path.stat().st_size == status.st_size and path.stat().st_mtime_ns == status.st_mtime_ns


def test_changed_image_with_same_size_and_time_is_found_with_verify_inputs(tmp_path):
    images = _bmp_folder(tmp_path / "images")
    config = PipelineConfig(input=str(images), work_dir=str(tmp_path / "work"), img_size=16, device="cpu",
                            bins=2, ratio=0.5, verify_inputs=True, random_init=True)
    run = _runner(config)
    assert run() == ["wrote", "wrote", "wrote"]
    assert run() == ["reused", "reused", "reused"]
    before = np.load(tmp_path / "work" / "features" / "feats.npy")

    _change_pixels_keep_size_and_times(images / "b" / "2.bmp")
    config.verify_inputs = False  # by default the size and time of each image are trusted
    assert run() == ["reused", "reused", "reused"]
    config.verify_inputs = True
    assert run() == ["wrote", "wrote", "wrote"]
    assert not np.array_equal(np.load(tmp_path / "work" / "features" / "feats.npy")[6], before[6])

    _change_pixels_keep_size_and_times(images / "a" / "0.bmp")
    result = invoke(["run", "--input", images, "--work-dir", tmp_path / "work", "--img-size", 16, "--device", "cpu",
                     "--bins", 2, "--ratio", 0.5, "--verify-inputs", "-q", "--random-init"])
    assert result.exit_code == 0, result.output
    assert [line.split()[1] for line in result.output.splitlines()] == ["wrote", "wrote", "wrote"]


def test_own_export_is_replaced_and_checked_by_listing(tmp_path, digits_folder):
    work, export = tmp_path / "work", tmp_path / "export"
    config = PipelineConfig(input=str(digits_folder), work_dir=str(work), img_size=32, device="cpu",
                            bins=4, ratio=0.25, export=str(export), random_init=True)
    run = _runner(config)
    assert run() == ["wrote", "wrote", "wrote", "wrote"]
    assert run() == ["reused", "reused", "reused", "reused"]
    picked = sorted(export.rglob("*.png"))
    picked[0].unlink()  # a hand-deleted exported file
    assert run() == ["reused", "reused", "reused", "wrote"]
    assert sorted(export.rglob("*.png")) == picked
    record = json.loads((work / "run.json").read_text())
    assert record["stages"]["export"]["dir"] == str(export)


# --------------------------------------------------------------------------- kill -9


def test_run_killed_at_every_commit_point_is_finished_by_the_next_run(tmp_path, warm_python):
    """Every kill leaves a state from which the next run writes exactly the uninterrupted outputs
    and leaves no temporary behind."""
    write_digits_image_folder(tmp_path / "digits", per_class=2, size=16)
    config_path = tmp_path / "dq.yaml"
    config_path.write_text("input: digits\nwork_dir: work\nimg_size: 16\ndevice: cpu\nbins: 2\nratio: 0.5\n"
                           "export: picked\nrandom_init: true\n")
    work, export = tmp_path / "work", tmp_path / "picked"

    def rerun():
        run_pipeline(PipelineConfig.from_yaml(config_path), log=lambda line: None)

    def outputs():
        """Both output trees; the export's recorded listing holds file times, so it is left out."""
        snapshot = {"work": output_snapshot(work), "export": output_snapshot(export)}
        snapshot["work"]["run.json"]["stages"]["export"].pop("outputs")
        return snapshot

    rerun()
    uninterrupted = outputs()
    assert list(uninterrupted["work"]["run.json"]["stages"]) == ["features", "bins", "subset", "export"]

    def before_each(k):
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(export, ignore_errors=True)

    reruns = []

    def after_crash(k):
        rerun()
        assert temporaries(tmp_path) == [], f"temporaries left after a kill at commit point {k}"
        reruns.append((k, outputs()))

    points = crash_at_every_commit_point(dqk_command("run", config_path, "-q"), tmp_path, after_crash, before_each,
                                         python=warm_python)
    assert len(reruns) == points >= 10
    for k, written in reruns:
        assert written == uninterrupted, f"the rerun after a kill at commit point {k} differs"
    assert outputs() == uninterrupted and temporaries(tmp_path) == []


@pytest.mark.parametrize("damage", ["unreadable", "not an object", "stages not an object"])
def test_damaged_run_record_only_makes_stages_run_again(tmp_path, digits_folder, damage):
    work = tmp_path / "work"
    run = _runner(PipelineConfig(input=str(digits_folder), work_dir=str(work), img_size=32, device="cpu",
                                 bins=2, ratio=0.5, random_init=True))
    assert run() == ["wrote", "wrote", "wrote"]
    (work / "run.json").write_text({"unreadable": "{", "not an object": "[1]",
                                    "stages not an object": '{"stages": 3}'}[damage])
    assert run() == ["wrote", "wrote", "wrote"]
    assert run() == ["reused", "reused", "reused"]


def test_tree_fingerprints_see_listing_changes_and_with_content_also_bytes(tmp_path):
    from dqkernels.core.fingerprint import fingerprint_file_contents, fingerprint_tree

    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.bin").write_bytes(b"abcd")
    os.symlink("a/x.bin", root / "link")
    listing, content = fingerprint_tree(root), fingerprint_tree(root, content=True)
    files = fingerprint_file_contents(root, ["a/x.bin"])

    status = (root / "a" / "x.bin").stat()
    (root / "a" / "x.bin").write_bytes(b"abce")  # same size, same times
    os.utime(root / "a" / "x.bin", ns=(status.st_atime_ns, status.st_mtime_ns))
    assert fingerprint_tree(root) == listing
    assert fingerprint_tree(root, content=True) != content
    assert fingerprint_file_contents(root, ["a/x.bin"]) != files

    (root / "link").unlink()
    os.symlink("a", root / "link")  # a link is recorded by its target, not followed
    assert fingerprint_tree(root) != listing
    before = fingerprint_tree(root)
    (root / "a" / "y.bin").write_bytes(b"")  # a new, empty file
    assert fingerprint_tree(root) != before
