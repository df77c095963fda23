"""Distributed bin generation on gloo over loopback, 2–3 processes: both modes give the
single-process engine's float64 bins and pass the float32 replay check; bad or mismatched input
and a killed rank end every rank with an error within a bounded time; ``dqk bin --distributed``
under torchrun writes the single-process file, or nothing when a rank dies. On a machine with a
GPU, an NCCL world of one runs the same float64 cases on the device.

Every launched process has a hard deadline, so a hang fails the test instead of stalling CI.
Run as a script (``torchrun ... tests/test_distributed.py --kill-rank R --kill-at K ARGS``) this
file is the ``dqk`` command line with rank R killed at its K-th collective operation.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GROUP_TIMEOUT_S = 20  # the process group's timeout: the longest a rank waits for another
WORLD_DEADLINE_S = 90  # hard limit on one launched world, far above its normal run time
COLLECTIVES = (
    "all_gather_object",
    "all_reduce",
    "all_gather_single",
    "all_gather_into_tensor",
    "gather",
    "broadcast",
)


# --------------------------------------------------------------------------- data


def _write_data(directory: Path, dtype=np.float64, seed: int = 0) -> dict:
    """Saved as .npy files in ``directory``: features x (233, 12) with an offset, uneven labels
    (two classes smaller than 4 bins), a gradient embedding (delta (233, 5), embed (233, 7)), and
    ties (160, 3): small integers with mean exactly 0, every row twice, the copies 80 rows apart
    (so on different ranks) — every engine's euclidean scores are exact integers there, and
    equal scores are decided by the lowest index alone."""
    rng = np.random.default_rng(seed)
    counts = [70, 55, 41, 33, 29, 3, 2]
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int64)
    base = rng.integers(-3, 4, size=(40, 3))
    symmetric = np.concatenate([base, -base])
    arrays = {
        "x": (rng.standard_normal((len(labels), 12)) * 2.0 + rng.standard_normal(12)).astype(dtype),
        "labels": labels,
        "delta": rng.standard_normal((len(labels), 5)).astype(dtype),
        "embed": rng.standard_normal((len(labels), 7)).astype(dtype),
        "ties": np.concatenate([symmetric, symmetric]).astype(dtype),
    }
    for name, array in arrays.items():
        np.save(directory / f"{name}.npy", array)
    return arrays


def _load(directory: Path) -> dict:
    """The arrays of ``_write_data``, features memory-mapped as a rank would open them."""
    return {
        name: np.load(directory / f"{name}.npy", mmap_mode=None if name == "labels" else "r")
        for name in ("x", "labels", "delta", "embed", "ties")
    }


# The cases both modes must get right: (name, keyword arguments of graphcut_bins_distributed).
EXACT_CASES = [
    ("classes", dict(bins=4, labels=True)),
    (
        "classes-official-euclidean",
        dict(bins=3, labels=True, sizes="official", metric="euclidean", lam=0.5, dst=None),
    ),
    ("classes-gradient", dict(bins=4, labels=True, gradient=True)),
    ("rows", dict(bins=5, dst=None)),
    ("rows-euclidean-lam", dict(bins=3, metric="euclidean", lam=1.5, dst=1)),
    ("rows-per-class", dict(bins=4, labels=True, mode="rows", sizes="official")),
    ("rows-exact-ties", dict(bins=4, features="ties", metric="euclidean")),
]


def _features(arrays: dict, case: dict):
    """The features a case bins: the "features" array named by the case, or the gradient embedding."""
    import dqkernels

    if case.get("gradient"):
        return dqkernels.GradEmbedding(arrays["delta"], arrays["embed"])
    return arrays[case.get("features", "x")]


def _call(arrays: dict, case: dict, library):
    """Run ``library`` (graphcut_bins or graphcut_bins_distributed) on one case."""
    import dqkernels

    features = _features(arrays, case)
    case = {key: value for key, value in case.items() if key not in ("gradient", "features")}
    labels = arrays["labels"] if case.pop("labels", False) else None
    if library is dqkernels.graphcut_bins:
        case.pop("mode", None)
        case.pop("dst", None)
        case["precision"] = "float64" if np.asarray(arrays["x"][:1]).dtype == np.float64 else "float32"
    return library(features, labels=labels, **case)


# --------------------------------------------------------------------------- launching worlds


def _rank_main(rank: int, world: int, directory: str, task: str, kwargs: dict) -> None:
    """One spawned rank: join the gloo group over loopback, run ``task``, record the outcome."""
    import torch.distributed as dist

    os.environ.update(GLOO_SOCKET_IFNAME="lo", LOCAL_WORLD_SIZE=str(world))  # as torchrun sets it
    directory = Path(directory)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{directory / 'store'}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
    )
    started = time.monotonic()
    report = {"rank": rank}
    try:
        globals()[task](rank, directory, **kwargs)
    except Exception as error:  # recorded for the test to judge
        report.update(error=type(error).__name__, message=str(error), trace=traceback.format_exc())
    report["seconds"] = time.monotonic() - started
    (directory / f"report-{rank}.json").write_text(json.dumps(report))
    if "error" not in report:
        dist.destroy_process_group()


def _launch(world: int, directory: Path, task: str, **kwargs) -> list:
    """Run ``task`` on ``world`` spawned ranks; kill every rank still alive at the deadline.

    Returns (exit code, report dict or None) per rank.
    """
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_rank_main, args=(rank, world, str(directory), task, kwargs))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + WORLD_DEADLINE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for rank in hung:
        os.kill(processes[rank].pid, signal.SIGKILL)
        processes[rank].join()
    assert not hung, f"ranks {hung} were still running after {WORLD_DEADLINE_S} s"
    outcomes = []
    for rank, process in enumerate(processes):
        path = directory / f"report-{rank}.json"
        outcomes.append((process.exitcode, json.loads(path.read_text()) if path.exists() else None))
    return outcomes


def _assert_all_succeeded(outcomes) -> None:
    for exit_code, report in outcomes:
        assert exit_code == 0 and report is not None and "error" not in report, report


# --------------------------------------------------------------------------- tasks (run in ranks)


def _task_bin_cases(rank: int, directory: Path) -> None:
    """Every EXACT_CASES case; the result of each rank that gets one is saved."""
    from dqkernels.graphcut.distributed import graphcut_bins_distributed

    arrays = _load(directory)
    for name, case in EXACT_CASES:
        result = _call(arrays, case, graphcut_bins_distributed)
        if result is not None:
            np.savez(
                directory / f"{name}-rank{rank}.npz",
                order=result.order,
                bin_offsets=result.bin_offsets,
                meta=json.dumps(result.meta),
            )


def _task_bad_inputs(rank: int, directory: Path) -> None:
    """Cases where one rank's input is wrong; every rank records the error it got, then all bin
    a good input together to show that the group is still usable."""
    from dqkernels.graphcut.distributed import graphcut_bins_distributed

    arrays = _load(directory)
    x = np.array(arrays["x"])
    labels = arrays["labels"].copy()
    other_labels = labels.copy()
    if rank == 1:
        other_labels[0] = (other_labels[0] + 1) % 7
    zero_row = x.copy()
    zero_row[-1] = 0.0  # the last row lies in the last rank's slice
    nan_row = x.copy()
    nan_row[np.flatnonzero(labels == 1)[0]] = np.nan  # class 1 goes to rank 1
    cases = {
        "bins": lambda: graphcut_bins_distributed(x, bins=4 + rank),
        "labels": lambda: graphcut_bins_distributed(x, bins=4, labels=other_labels),
        "zero-row": lambda: graphcut_bins_distributed(zero_row, bins=4),
        "nan-row": lambda: graphcut_bins_distributed(nan_row, bins=4, labels=labels),
        "bad-argument": lambda: graphcut_bins_distributed(x, bins=4, lam=-1.0 if rank == 1 else 1.0),
    }
    errors = {}
    for name, run in cases.items():
        try:
            run()
            errors[name] = None
        except (ValueError, TypeError) as error:
            errors[name] = [type(error).__name__, str(error)]
    result = graphcut_bins_distributed(x, bins=4, labels=labels, dst=None)
    errors["good-order"] = result.order.tolist()
    (directory / f"errors-{rank}.json").write_text(json.dumps(errors))


def _kill_at_collective(victim: int, rank: int, at: int) -> None:
    """Make rank ``victim`` SIGKILL itself when it enters its ``at``-th collective operation."""
    import torch.distributed as dist

    if rank != victim:
        return
    calls = [0]

    def dying(function):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] >= at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)

        return wrapper

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, dying(getattr(dist, name)))


def _task_killed_rank(rank: int, directory: Path, mode: str, kill_at: int) -> None:
    """Rank 1 dies at its ``kill_at``-th collective while the ranks bin in ``mode``."""
    from dqkernels.graphcut.distributed import graphcut_bins_distributed

    arrays = _load(directory)
    _kill_at_collective(1, rank, kill_at)
    labels = arrays["labels"] if mode == "classes" else None
    graphcut_bins_distributed(arrays["x"], bins=4, labels=labels, mode=mode)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world", [2, 3])
def test_both_modes_give_the_single_process_bins_in_float64(tmp_path, world):
    import dqkernels
    from dqkernels.graphcut.distributed import features_block_checksum

    arrays = _write_data(tmp_path)
    _assert_all_succeeded(_launch(world, tmp_path, "_task_bin_cases"))
    for name, case in EXACT_CASES:
        expected = _call(arrays, case, dqkernels.graphcut_bins)
        dst = case.get("dst", 0)
        receivers = range(world) if dst is None else [dst]
        for rank in range(world):
            path = tmp_path / f"{name}-rank{rank}.npz"
            assert path.exists() == (rank in receivers), (name, rank)
            if rank not in receivers:
                continue
            with np.load(path) as got:
                np.testing.assert_array_equal(got["order"], expected.order, err_msg=f"{name}, rank {rank}")
                np.testing.assert_array_equal(got["bin_offsets"], expected.bin_offsets)
                meta = json.loads(str(got["meta"]))
            assert meta["distributed"]["world_size"] == world
            assert meta["distributed"]["mode"] == case.get(
                "mode", "classes" if case.get("labels") else "rows"
            )
            assert meta["precision"] == "float64"
            assert meta["checksum"] == features_block_checksum(_features(arrays, case))


def test_float32_passes_the_replay_check(tmp_path):
    import dqkernels
    from dqkernels.graphcut.testing import check_binning

    arrays = _write_data(tmp_path, dtype=np.float32, seed=1)
    _assert_all_succeeded(_launch(2, tmp_path, "_task_bin_cases"))
    for name, case in EXACT_CASES:
        rank = case.get("dst", 0) or 0
        with np.load(tmp_path / f"{name}-rank{rank}.npz") as got:
            result = dqkernels.BinResult(
                got["order"], got["bin_offsets"], None, "", "", json.loads(str(got["meta"]))
            )
        assert result.meta["precision"] == "float32"
        labels = arrays["labels"] if case.get("labels") else None
        report = check_binning(
            result,
            _features(arrays, case),
            labels=labels,
            rtol=1e-4,
            expected_sizes=case.get("sizes", "split"),
        )
        assert report.steps >= len(result.order) // 2  # every bin but the last was replayed


def test_bad_or_mismatched_input_raises_the_same_error_on_every_rank(tmp_path):
    import dqkernels

    arrays = _write_data(tmp_path)
    _assert_all_succeeded(_launch(2, tmp_path, "_task_bad_inputs"))
    errors = [json.loads((tmp_path / f"errors-{rank}.json").read_text()) for rank in range(2)]
    assert errors[0] == errors[1]
    expected_messages = {
        "bins": "ranks disagree on bins: rank 0 has 4, rank 1 has 5",
        "labels": "ranks disagree on labels",
        "zero-row": "rank 1: features: row 232 is all zeros",
        "nan-row": "rank 1: features contains NaN or inf",
        "bad-argument": "rank 1: lam must be a finite number > 0",
    }
    for name, message in expected_messages.items():
        kind, text = errors[0][name]
        assert kind == "InputError" and message in text, (name, text)
    expected = dqkernels.graphcut_bins(arrays["x"], bins=4, labels=arrays["labels"])
    assert errors[0]["good-order"] == expected.order.tolist()


@pytest.mark.parametrize("mode,kill_at", [("classes", 2), ("rows", 40)])
def test_a_killed_rank_makes_every_other_rank_fail_promptly(tmp_path, mode, kill_at):
    _write_data(tmp_path)
    outcomes = _launch(3, tmp_path, "_task_killed_rank", mode=mode, kill_at=kill_at)
    assert outcomes[1] == (-signal.SIGKILL, None)
    for rank in (0, 2):
        _, report = outcomes[rank]
        assert report is not None and report.get("error") == "PeerFailureError", report
        assert report["message"].startswith(f"rank {rank}: ")
        assert report["seconds"] < GROUP_TIMEOUT_S, report


def _torchrun(args: list, directory: Path) -> subprocess.CompletedProcess:
    """``torchrun ARGS`` with 2 processes on this machine, loopback only. Past WORLD_DEADLINE_S
    seconds torchrun and its workers (one process group) are killed and the test fails."""
    env = dict(
        os.environ,
        GLOO_SOCKET_IFNAME="lo",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--local-addr", "127.0.0.1"]
    command += ["--monitor-interval", "0.2", *[str(a) for a in args]]
    with subprocess.Popen(
        command,
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as job:
        try:
            stdout, stderr = job.communicate(timeout=WORLD_DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
            pytest.fail(f"torchrun was still running after {WORLD_DEADLINE_S} s")
    return subprocess.CompletedProcess(command, job.returncode, stdout, stderr)


def test_cli_under_torchrun_writes_the_single_process_bins(tmp_path):
    from conftest_data import invoke

    _write_data(tmp_path)
    common = ["bin", "--features", tmp_path / "x.npy", "--labels", tmp_path / "labels.npy", "--bins", 4]
    run = _torchrun(
        ["-m", "dqkernels.cli", *common, "-o", tmp_path / "distributed.npz", "--distributed"], tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("distributed.npz: 233 samples in 4 bins per class") == 1  # rank 0 reports
    single = invoke([*common, "-o", tmp_path / "single.npz"])
    assert single.exit_code == 0, single.output
    with np.load(tmp_path / "distributed.npz") as got, np.load(tmp_path / "single.npz") as expected:
        for name in ("order", "bin_offsets", "bin_of", "labels"):
            np.testing.assert_array_equal(got[name], expected[name])
        meta = json.loads(str(got["meta"]))
    assert meta["distributed"] == {"mode": "classes", "world_size": 2, "process_group": "gloo"}
    assert meta["features_path"] == str((tmp_path / "x.npy").resolve())


def test_cli_job_with_a_killed_rank_fails_and_writes_nothing(tmp_path):
    _write_data(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [Path(__file__), "--kill-rank", 1, "--kill-at", 40, "bin", "--features", tmp_path / "x.npy"]
    args += ["--no-labels", "--bins", 4, "-o", tmp_path / "bins.npz", "--distributed"]
    run = _torchrun(args, tmp_path)
    assert run.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary file
    assert "bins.npz:" not in run.stdout


def test_cli_rejects_a_distributed_run_outside_torchrun(tmp_path, monkeypatch):
    from conftest_data import invoke

    _write_data(tmp_path)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    result = invoke(["bin", "--features", tmp_path / "x.npy", "--distributed"])
    assert result.exit_code == 1 and "runs under torchrun" in result.output
    result = invoke(["bin", "--features", tmp_path / "x.npy", "--distributed", "--backend", "reference"])
    assert result.exit_code == 2 and "--backend applies to single-process runs" in result.output
    assert not (tmp_path / "bins.npz").exists()


def test_api_needs_an_initialised_process_group():
    from dqkernels.graphcut.distributed import graphcut_bins_distributed

    with pytest.raises(ValueError, match="initialised process group"):
        graphcut_bins_distributed(np.ones((4, 2)), bins=2)


def test_classes_are_dealt_by_cost():
    from dqkernels.graphcut.distributed import deal_classes, shard_bounds

    rng = np.random.default_rng(0)
    counts = rng.integers(1, 500, size=40)
    for ranks in (1, 2, 3, 8):
        owner = deal_classes(counts, 64, ranks)
        load = np.bincount(owner, weights=counts.astype(float) ** 2, minlength=ranks)
        assert load.max() <= load.sum() / ranks + counts.max() ** 2
        np.testing.assert_array_equal(owner, deal_classes(counts, 64, ranks))
    assert deal_classes([10, 10, 10], 4, 2).tolist() == [0, 1, 0]
    assert shard_bounds(10, 3).tolist() == [0, 4, 7, 10]
    assert shard_bounds(2, 3).tolist() == [0, 1, 2, 2]


@pytest.mark.gpu
def test_nccl_world_of_one_gives_the_single_process_bins(tmp_path):
    import torch.distributed as dist

    import dqkernels

    if not dist.is_nccl_available():
        pytest.skip("torch was built without NCCL")
    arrays = _write_data(tmp_path)
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=_nccl_rank_main, args=(str(tmp_path),))
    process.start()
    process.join(WORLD_DEADLINE_S)
    if process.is_alive():
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        pytest.fail(f"the NCCL rank was still running after {WORLD_DEADLINE_S} s")
    report = json.loads((tmp_path / "report-0.json").read_text())
    assert process.exitcode == 0 and "error" not in report, report
    for name, case in EXACT_CASES:
        expected = _call(arrays, case, dqkernels.graphcut_bins)
        with np.load(tmp_path / f"{name}-rank0.npz") as got:
            np.testing.assert_array_equal(got["order"], expected.order, err_msg=name)
            assert json.loads(str(got["meta"]))["distributed"]["process_group"] == "nccl"


def _nccl_rank_main(directory: str) -> None:
    """A world of one NCCL rank on cuda:0 running EXACT_CASES on the GPU."""
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl",
        init_method=f"file://{Path(directory) / 'store'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
    )
    report = {"rank": 0}
    try:
        _task_bin_cases(0, Path(directory))
    except Exception as error:  # recorded for the test to judge
        report.update(error=type(error).__name__, message=str(error), trace=traceback.format_exc())
    (Path(directory) / "report-0.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    # torchrun entry: python tests/test_distributed.py --kill-rank R --kill-at K <dqk arguments>
    kill_rank, kill_at = int(sys.argv[2]), int(sys.argv[4])
    _kill_at_collective(kill_rank, int(os.environ["RANK"]), kill_at)
    from dqkernels.cli.main import cli

    cli(sys.argv[5:], prog_name="dqk")
