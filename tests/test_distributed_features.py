"""``dqk features --distributed`` under torchrun (2 gloo processes on the CPU) writes the feature
set one process writes: the same bytes in every array, labels and items file and the same
sidecar, also with unreadable images, for image folders and image arrays; an error on one rank
ends every rank and writes nothing. The shard split and a shard in which no image can be read
are checked in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest_data import digits_arrays, invoke, write_digits_image_folder
from hypothesis import given
from hypothesis import strategies as st

from dqkernels.pipeline.distributed_features import _extract_shard, shard_bounds

REPO_ROOT = Path(__file__).resolve().parents[1]
JOBS_DEADLINE_S = 240  # hard limit on the three torchrun jobs together, far above their run time
FEATURE_SET = ("feats.npy", "delta.npy", "embed.npy", "labels.npy", "items.jsonl")
# Small and fast: 16 px digits through a random-init resnet18, 4 images per batch.
COMMON = ["--model", "resnet18", "--random-init", "--img-size", 16, "--batch-size", 4, "--device", "cpu", "-q"]


def _assert_same_feature_set(got: Path, expected: Path) -> None:
    names = [name for name in FEATURE_SET if (expected / name).exists()]
    assert names and sorted(p.name for p in got.iterdir()) == sorted([*names, "features.json"])
    for name in names:
        assert (got / name).read_bytes() == (expected / name).read_bytes(), name
    assert json.loads((got / "features.json").read_text()) == json.loads((expected / "features.json").read_text())


def _write_cases(root: Path) -> dict:
    """{case: (its folder, the `dqk features` arguments)} of the three torchrun jobs."""
    unreadable = root / "unreadable"
    folder = write_digits_image_folder(unreadable / "digits", per_class=3, size=16)
    (folder / "0" / "broken.png").write_bytes(b"not an image")  # row 3 of 32, in rank 0's shard
    (folder / "7" / "broken.png").write_bytes(b"")  # row 25 of 32, in rank 1's shard
    array = root / "array"
    array.mkdir()
    images, labels = digits_arrays(27, size=16)
    np.savez(array / "digits.npz", images=images, labels=labels)
    failing = root / "failing"
    # With 4 images per batch rank 1's shard holds the digits 4–9, which a 5-class classifier cannot take.
    write_digits_image_folder(failing / "digits", per_class=2, size=16)
    return {
        "unreadable": (unreadable, [folder, *COMMON]),
        "array": (array, [array / "digits.npz", *COMMON, "--mode", "gradient"]),
        "failing": (failing, [failing / "digits", *COMMON, "--mode", "gradient", "--num-classes", 5]),
    }


@pytest.fixture(scope="module", name="jobs")
def jobs_fixture(tmp_path_factory) -> dict:
    """{case: (its folder, its arguments, the finished torchrun job)}: all jobs run at once, each
    ``torchrun`` with 2 processes writing ``distributed/`` in its folder."""
    cases = _write_cases(tmp_path_factory.mktemp("jobs"))
    env = dict(
        os.environ,
        GLOO_SOCKET_IFNAME="lo",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--local-addr", "127.0.0.1"]
    command += ["--monitor-interval", "0.2", "-m", "dqkernels.cli", "features"]
    started = {
        case: subprocess.Popen(
            [*command, *map(str, arguments), "-o", str(folder / "distributed"), "--distributed"],
            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        for case, (folder, arguments) in cases.items()
    }
    deadline = time.monotonic() + JOBS_DEADLINE_S
    finished = {}
    try:
        for case, job in started.items():
            stdout, stderr = job.communicate(timeout=max(1.0, deadline - time.monotonic()))
            finished[case] = (*cases[case], subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun was still running after {JOBS_DEADLINE_S} s")
    finally:
        for job in started.values():
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.communicate()
    return finished


def test_image_folder_with_unreadable_images_gives_the_single_process_set(jobs):
    folder, arguments, run = jobs["unreadable"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1 and "skipped 2 unreadable images" in run.stdout  # rank 0 reports
    single = invoke(["features", *arguments, "-o", folder / "single"])
    assert single.exit_code == 0, single.output

    _assert_same_feature_set(folder / "distributed", folder / "single")
    sidecar = json.loads((folder / "distributed" / "features.json").read_text())
    assert sidecar["count"] == 30 and sidecar["skipped"]["items"] == ["0/broken.png", "7/broken.png"]
    assert sorted(p.name for p in folder.iterdir()) == ["digits", "distributed", "single"]  # no staging left


def test_image_array_in_gradient_mode_gives_the_single_process_set(jobs):
    folder, arguments, run = jobs["array"]
    assert run.returncode == 0, run.stderr[-3000:]
    single = invoke(["features", *arguments, "-o", folder / "single"])
    assert single.exit_code == 0, single.output
    _assert_same_feature_set(folder / "distributed", folder / "single")
    assert np.load(folder / "distributed" / "delta.npy").shape == (27, 10)


def test_an_error_on_one_rank_ends_every_rank_and_writes_nothing(jobs):
    folder, _, run = jobs["failing"]
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == ["Error: rank 1: label 9 does not fit a classifier with 5 classes"] * 2, run.stderr[-3000:]
    assert sorted(p.name for p in folder.iterdir()) == ["digits"]


def test_distributed_outside_torchrun_is_refused_in_one_line(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    folder = write_digits_image_folder(tmp_path / "digits", per_class=1, size=16)
    result = invoke(["features", folder, "-o", tmp_path / "features", "--distributed", *COMMON])
    assert result.exit_code == 1
    assert result.output.startswith("Error: distributed feature extraction runs under torchrun")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "features").exists()


@given(total=st.integers(0, 200), batch_size=st.integers(1, 16), world=st.integers(1, 6))
def test_shards_are_contiguous_runs_of_whole_batches_covering_every_row(total, batch_size, world):
    bounds = [shard_bounds(total, batch_size, rank, world) for rank in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    for (lo, hi), (next_lo, _) in zip(bounds, bounds[1:]):
        assert lo <= hi == next_lo and hi % batch_size == 0
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= batch_size  # whole batches dealt as evenly as possible


def test_a_shard_without_readable_images_is_all_skipped(tmp_path):
    from dqkernels.features.image import build_model

    paths = []
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"not an image")
        paths.append(str(tmp_path / name))
    model = build_model("resnet18", num_classes=2)
    options = {"image_paths": paths, "images": None, "labels": None, "img_size": 16, "device": "cpu"}
    shard = _extract_shard(model, 1, 3, strict=False, **options)
    assert shard.pooled is None and len(shard.kept_rows) == 0
    assert [row for row, _ in shard.skipped] == [0, 1]
    assert "UnidentifiedImageError" in shard.skipped[0][1]
    with pytest.raises(ValueError, match="cannot read image"):
        _extract_shard(model, 1, 3, strict=True, **options)
