"""Outputs made of several files appear whole or not at all, also when the writer is killed.

The crash tests run ``python -m dqkernels.cli ...`` with ``DQK_CRASH_AT_WRITE=k``, which kills the
process with SIGKILL at its k-th commit point, for k = 1, 2, … until a run gets through; after
every kill they check what the kill left, rerun without the hook and compare with the
uninterrupted run. Each run is its own process, forked from a warm interpreter that has the
imports done (:class:`WarmPython`), so a loop of ``dqk features`` runs takes seconds; one run in a
fresh interpreter (:func:`run_command`) checks that both give the same bytes.

:func:`crash_at_every_commit_point`, :func:`dqk_command`, :class:`WarmPython` / :func:`run_command`,
:func:`output_snapshot` and :func:`temporaries` are meant for other crash tests too
(``from test_artifacts import crash_at_every_commit_point``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
from conftest_data import (
    REPO_ROOT,
    digits_arrays,
    invoke,
    snapshot_files,
    write_digits_image_folder,
)

from dqkernels import graphcut_bins, sample_bins
from dqkernels.core.errors import InputError
from dqkernels.formats.bins import load_bins_file
from dqkernels.formats.feature_set import SIDECAR_NAME, open_feature_set
from dqkernels.formats.subset import load_subset_indices, read_manifest, write_subset
from dqkernels.pipeline.stages import (
    draw_subset,
    make_bins,
    save_subset,
    write_feature_set,
)
from dqkernels.pixel.patch_store import write_patch_store

CRASH_HOOK = "DQK_CRASH_AT_WRITE"
# JSON keys whose values are run times, ignored when two runs' outputs are compared.
TIMING_KEYS = frozenset({"seconds", "elapsed", "started", "finished", "duration"})


# --------------------------------------------------------------------------- reusable helpers

# The loop of a warm interpreter: it imports once, then forks one process per request, runs
# ``python ARGS`` in it (``-m MODULE`` or ``-c CODE``) and answers with the exit status.
_WARM_LOOP = r"""
import importlib, json, os, runpy, sys, traceback

for name in sys.argv[1:]:
    importlib.import_module(name)
answers = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(request["cwd"])
            os.umask(request["umask"])
            os.environ.pop(request["hook"], None)
            os.environ.update(request["env"])
            for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            option, target, *rest = request["args"]
            sys.argv = [target if option == "-m" else "-c", *rest]
            try:
                if option == "-m":
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
                code = 0
            except SystemExit as stop:
                if stop.code is None or isinstance(stop.code, int):
                    code = stop.code or 0
                else:
                    print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    answers.write(json.dumps(os.waitstatus_to_exitcode(status)) + "\n")
    answers.flush()
os._exit(0)  # no interpreter teardown
"""


def _python_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))


def dqk_command(*args) -> list[str]:
    """``python -m dqkernels.cli ARGS`` as an argument list."""
    return [sys.executable, "-m", "dqkernels.cli", *[str(arg) for arg in args]]


def run_command(command: list[str], cwd: Path, crash_at: Optional[int] = None,
                umask: int = 0o022) -> subprocess.CompletedProcess:
    """Run ``command`` (e.g. :func:`dqk_command`) in a fresh process, this checkout first on the
    Python path, under ``umask``; with ``crash_at`` the hook kills it at that commit point."""
    env = _python_env()
    env.pop(CRASH_HOOK, None)
    if crash_at is not None:
        env[CRASH_HOOK] = str(crash_at)
    return subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, umask=umask, check=False)


class WarmPython:
    """Runs ``[sys.executable, *ARGS]`` commands as :func:`run_command` does, each in its own
    process forked from one interpreter that has already imported ``preload`` — a run of
    ``dqk features`` then costs its work, not the seconds of importing torch and timm. ARGS is
    ``-m MODULE ...`` or ``-c CODE ...``. A kill ends only the forked process.
    """

    def __init__(self, preload: tuple = ("dqkernels.cli.main",)):
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WARM_LOOP, *preload], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=_python_env(), text=True,
        )

    def run(self, command: list[str], cwd: Path, crash_at: Optional[int] = None,
            umask: int = 0o022) -> subprocess.CompletedProcess:
        assert command[0] == sys.executable and command[1] in ("-m", "-c"), command
        with tempfile.TemporaryDirectory() as streams:
            request = {
                "args": [str(arg) for arg in command[1:]], "cwd": str(cwd), "umask": umask, "hook": CRASH_HOOK,
                "env": {CRASH_HOOK: str(crash_at)} if crash_at is not None else {},
                "stdout": os.path.join(streams, "out"), "stderr": os.path.join(streams, "err"),
            }
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
            answer = self._process.stdout.readline()
            assert answer, "the warm interpreter died"
            output = [Path(request[name]).read_text() if Path(request[name]).exists() else ""
                      for name in ("stdout", "stderr")]
        return subprocess.CompletedProcess(command, json.loads(answer), *output)

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=60)


@pytest.fixture(scope="module", name="warm_python")
def warm_python_fixture():
    """A :class:`WarmPython` with the CLI, torch and timm imported."""
    launcher = WarmPython(("dqkernels.cli.main", "dqkernels.features.image", "timm"))
    yield launcher
    launcher.close()


def crash_at_every_commit_point(
    command: list[str],
    cwd: Path,
    after_crash: Callable[[int], None],
    before_each: Optional[Callable[[int], None]] = None,
    max_points: int = 200,
    python: Optional[WarmPython] = None,
) -> int:
    """Kill ``command`` at its 1st, 2nd, … commit point until a run completes; returns how many
    commit points it has.

    before_each(k): sets up the starting state of run k (e.g. restores a previous output).
    after_crash(k): inspects what the kill at commit point k left (and usually reruns).
    python: run the command through this :class:`WarmPython` instead of a fresh interpreter.
    The completing run must exit 0; its output is the uninterrupted result to compare with.
    """
    run = python.run if python is not None else run_command
    for k in range(1, max_points + 1):
        if before_each is not None:
            before_each(k)
        completed = run(command, cwd, crash_at=k)
        if completed.returncode == -signal.SIGKILL:
            after_crash(k)
            continue
        assert completed.returncode == 0, f"run with {CRASH_HOOK}={k} failed:\n{completed.stderr}"
        assert k > 1, "the command passed no commit point"
        return k - 1
    raise AssertionError(f"still killed after {max_points} commit points")


def _without_timing(document):
    if isinstance(document, dict):
        return {key: _without_timing(value) for key, value in document.items() if key not in TIMING_KEYS}
    if isinstance(document, list):
        return [_without_timing(value) for value in document]
    return document


def output_snapshot(root: Path) -> dict:
    """{relative path: content} of every file under ``root``, for comparing two runs' outputs:
    ``.npy`` as (dtype, shape, bytes), ``.json`` parsed without :data:`TIMING_KEYS`, anything else
    as bytes. Directories appear as None; temporaries (see :func:`temporaries`) are left out."""
    snapshot = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if any(part.endswith(".tmp") for part in relative.split("/")):
            continue
        if path.is_dir():
            snapshot[relative] = None
        elif path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            snapshot[relative] = (array.dtype.str, array.shape, array.tobytes())
        elif path.suffix == ".json":
            snapshot[relative] = _without_timing(json.loads(path.read_text(encoding="utf-8")))
        else:
            snapshot[relative] = path.read_bytes()
    return snapshot


def temporaries(root: Path) -> list[Path]:
    """Every file or folder under ``root`` whose name marks it as a temporary (``*.tmp``)."""
    return [path for path in root.rglob("*") if path.name.endswith(".tmp")]


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module", name="tiny_digits")
def tiny_digits_fixture(tmp_path_factory) -> Path:
    """20 digit images (10 classes × 2), 16×16 RGB."""
    return write_digits_image_folder(tmp_path_factory.mktemp("data") / "digits", per_class=2, size=16)


def _features_args(images: Path, out: Path, seed: int = 0) -> list:
    return ["features", images, "-o", out, "--img-size", 16, "--device", "cpu", "--seed", seed, "-q", "--random-init"]


def _check_feature_set(out: Path) -> None:
    """``out`` is a readable feature set whose files match the sizes and hashes its sidecar records."""
    feature_set = open_feature_set(out)
    integrity = feature_set.sidecar["integrity"]
    assert set(integrity) == set(feature_set.sidecar["files"].values())
    for name, record in integrity.items():
        data = (out / name).read_bytes()
        assert len(data) == record["size"]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == record["sha256"]


def _write_small_feature_set(out: Path, seed: int = 0, rows: int = 20) -> None:
    """A complete feature set of random features, written by :func:`write_feature_set`."""
    rng = np.random.default_rng(seed)
    contents = {"feats.npy": partial(np.save, arr=rng.standard_normal((rows, 4)).astype(np.float32)),
                "labels.npy": partial(np.save, arr=np.arange(rows) % 2)}
    write_feature_set(out, contents, {
        "format": "dqkernels.features", "mode": "pooled", "count": rows, "seed": seed,
        "files": {"features": "feats.npy", "labels": "labels.npy"},
        "source": {"path": "generated", "kind": "image-array"},
    })


def _bins_file(directory: Path) -> Path:
    features = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    labels = np.arange(40) % 3
    path = directory / "bins.npz"
    graphcut_bins(features, bins=4, labels=labels).save(path)
    return path


# --------------------------------------------------------------------------- kill -9: features


@pytest.mark.parametrize("with_previous", [False, True], ids=["fresh", "replacing"])
def test_features_killed_at_every_commit_point(tmp_path, tiny_digits, warm_python, with_previous):
    """Killed at any commit point, ``dqk features`` leaves nothing (or the previous feature set)
    or the whole new set, never a mix; the rerun gives exactly the uninterrupted result and no
    temporary is left beside the output."""
    previous_set = tmp_path / "earlier" / "out"
    previous_set.parent.mkdir()
    _write_small_feature_set(previous_set, seed=1)
    previous = output_snapshot(previous_set) if with_previous else None
    root = tmp_path / "work"
    root.mkdir()
    out = root / "out"
    command = dqk_command(*_features_args(tiny_digits, out))
    crashes = []  # (commit point, what the kill left, what the rerun wrote)

    def before_each(k):
        shutil.rmtree(out, ignore_errors=True)
        if with_previous:
            shutil.copytree(previous_set, out)

    def after_crash(k):
        left = output_snapshot(out) if out.exists() else None
        if left is not None:
            _check_feature_set(out)
        rerun = warm_python.run(command, root)
        assert rerun.returncode == 0, rerun.stderr
        assert temporaries(root) == []
        crashes.append((k, left, output_snapshot(out)))

    points = crash_at_every_commit_point(command, root, after_crash, before_each, python=warm_python)
    uninterrupted = output_snapshot(out)
    assert uninterrupted != output_snapshot(previous_set)
    assert temporaries(root) == []
    assert len(crashes) == points >= 2
    for k, left, rerun in crashes:
        assert rerun == uninterrupted, f"the rerun after a kill at commit point {k} differs"
        assert left in (uninterrupted, previous), f"a kill at commit point {k} left a mixed feature set"
    # A kill before the swap keeps what was there; one after it leaves the new set.
    assert crashes[0][1] == previous and crashes[-1][1] == uninterrupted
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    if not with_previous:  # the same bytes from `python -m dqkernels.cli` in a fresh interpreter
        fresh = run_command(dqk_command(*_features_args(tiny_digits, root / "fresh")), root)
        assert fresh.returncode == 0, fresh.stderr
        assert output_snapshot(root / "fresh") == uninterrupted


_IN_PLACE_WRITER = """
import sys
import numpy as np
from functools import partial
from dqkernels.pipeline.stages import write_feature_set

out, seed = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(seed)
features = rng.standard_normal((30, 8)).astype(np.float32)
labels = rng.integers(0, 3, 30)
contents = {"feats.npy": partial(np.save, arr=features), "labels.npy": partial(np.save, arr=labels)}
sidecar = {"format": "dqkernels.features", "mode": "pooled", "count": 30,
           "files": {"features": "feats.npy", "labels": "labels.npy"},
           "source": {"path": "generated", "kind": "image-array"}, "seed": seed}
write_feature_set(out, contents, sidecar)
"""


def test_feature_set_among_other_files_killed_at_every_commit_point(tmp_path, warm_python):
    """A feature-set folder that also holds other outputs is written into file by file: a kill
    leaves either no feature set at all (no sidecar) or the whole new one, the other files are
    never touched, and a rerun gives the uninterrupted result."""
    out = tmp_path / "out"
    command = [sys.executable, "-c", _IN_PLACE_WRITER, str(out), "0"]
    _write_small_feature_set(out, seed=1)
    (out / "bins.npz").write_bytes(b"another stage's output")
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    crashes = []

    def before_each(k):
        shutil.rmtree(out)
        shutil.copytree(pristine, out)

    def after_crash(k):
        assert (out / "bins.npz").read_bytes() == b"another stage's output"
        if (out / SIDECAR_NAME).exists():
            _check_feature_set(out)
            left = output_snapshot(out)
        else:
            with pytest.raises(InputError, match="holds no features.json"):
                open_feature_set(out)
            left = None
        rerun = warm_python.run(command, tmp_path)
        assert rerun.returncode == 0, rerun.stderr
        assert temporaries(tmp_path) == []
        crashes.append((k, left, output_snapshot(out)))

    points = crash_at_every_commit_point(command, tmp_path, after_crash, before_each, python=warm_python)
    uninterrupted = output_snapshot(out)
    assert open_feature_set(out).sidecar["seed"] == 0
    assert len(crashes) == points >= 4
    for k, left, rerun in crashes:
        assert rerun == uninterrupted
        assert left in (None, uninterrupted), f"a kill at commit point {k} left a mixed feature set"
    assert crashes[-1][1] == uninterrupted


# --------------------------------------------------------------------------- kill -9: subset


@pytest.mark.parametrize("with_previous", [False, True], ids=["fresh", "replacing"])
def test_sample_killed_at_every_commit_point(tmp_path, warm_python, with_previous):
    """After a kill, the ids and manifest on disk are a whole subset (the previous one or the new
    one) or a pair every reader refuses — never read, nor reused by ``dqk run``, as a subset; the
    rerun gives the uninterrupted result and leaves no temporary."""
    bins = _bins_file(tmp_path)
    root = tmp_path / "work"
    root.mkdir()
    out = root / "subset.npy"
    draw_subset(bins, 0.5, seed=1).save(out)
    previous_files = {path.name: path.read_bytes() for path in root.iterdir()}
    previous = output_snapshot(root) if with_previous else None
    command = dqk_command("sample", "--bins", bins, "--ratio", 0.5, "-o", out)
    crashes = []

    def before_each(k):
        for path in root.iterdir():
            path.unlink()
        if with_previous:
            for name, data in previous_files.items():
                (root / name).write_bytes(data)

    def after_crash(k):
        left = output_snapshot(root) or None
        if left is not None:
            try:
                indices = load_subset_indices(out)
            except InputError as error:
                assert "does not match its manifest" in str(error) or "cannot read subset" in str(error)
                with pytest.raises(InputError):
                    read_manifest(out)  # what `dqk run` reads before reusing a subset
                left = "refused"
            else:
                assert read_manifest(out)["n_selected"] == len(indices)
        rerun = warm_python.run(command, tmp_path)
        assert rerun.returncode == 0, rerun.stderr
        assert temporaries(root) == []
        crashes.append((k, left, output_snapshot(root)))

    points = crash_at_every_commit_point(command, tmp_path, after_crash, before_each, python=warm_python)
    uninterrupted = output_snapshot(root)
    assert len(crashes) == points >= 4
    for k, left, rerun in crashes:
        assert rerun == uninterrupted
        assert left in ("refused", uninterrupted, previous), f"a kill at commit point {k} left {left!r}"
    states = [left for _, left, _ in crashes]
    assert states[0] == previous and states[-1] == uninterrupted and "refused" in states
    assert previous != uninterrupted


def test_subset_reader_refuses_a_mismatched_pair(tmp_path):
    bins = _bins_file(tmp_path)
    result = load_bins_file(bins)
    first, second = sample_bins(result, 0.5, seed=1), sample_bins(result, 0.5, seed=2)
    first.save(tmp_path / "a.npy")
    second.save(tmp_path / "b.npy")
    np.testing.assert_array_equal(load_subset_indices(tmp_path / "a.npy"), first.indices)
    shutil.copy(tmp_path / "b.npy", tmp_path / "a.npy")  # same size, other ids
    for read in (load_subset_indices, read_manifest):
        with pytest.raises(InputError, match=r"a\.npy does not match its manifest a\.json .* rerun dqk sample"):
            read(tmp_path / "a.npy")
    manifest = json.loads((tmp_path / "b.json").read_text())
    del manifest["subset_file"]
    (tmp_path / "b.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="records no size and sha256"):
        load_subset_indices(tmp_path / "b.npy")
    (tmp_path / "b.json").unlink()
    np.testing.assert_array_equal(load_subset_indices(tmp_path / "b.npy"), second.indices)  # plain ids


# --------------------------------------------------------------------------- refused before writing


def test_refused_subset_outputs_leave_everything_as_it_was(tmp_path):
    bins = _bins_file(tmp_path)
    assert invoke(["sample", "--bins", bins, "--ratio", 0.5, "-o", tmp_path / "subset.npy"]).exit_code == 0
    (tmp_path / "taken.json").mkdir()
    np.save(tmp_path / "taken.npy", np.array([1, 2, 3]))
    before = snapshot_files(tmp_path)
    subset = draw_subset(bins, 0.25, seed=4)
    for out, message in [
        (tmp_path / "taken.npy", "taken.json' is a directory"),
        (tmp_path / "subset.json", "must not end in .json"),
        (tmp_path / "bins.npz", "would overwrite the input"),
    ]:
        with pytest.raises(InputError, match=message):
            save_subset(subset, bins, out)
        with pytest.raises(InputError, match=message):
            write_subset(subset, out, [bins])
        assert snapshot_files(tmp_path) == before
    with pytest.raises(InputError, match="is a directory"):
        subset.save(tmp_path / "taken.npy")
    assert snapshot_files(tmp_path) == before
    result = invoke(["sample", "--bins", bins, "--ratio", 0.25, "--seed", 4, "-o", tmp_path / "taken.npy"])
    assert result.exit_code == 1 and "taken.json" in result.output
    assert snapshot_files(tmp_path) == before


def test_subset_output_never_overwrites_the_feature_set(tmp_path):
    """A subset named after a feature-set file would overwrite the features or their sidecar."""
    feature_dir = tmp_path / "feats"
    _write_small_feature_set(feature_dir)
    outcome = make_bins(feature_dir, 2)
    before = snapshot_files(tmp_path)
    subset = draw_subset(outcome.path, 0.5)
    for name in ("feats.npy", "features.npy"):
        with pytest.raises(InputError, match="would overwrite the input"):
            save_subset(subset, outcome.path, feature_dir / name)
    assert snapshot_files(tmp_path) == before
    assert save_subset(subset, outcome.path) == feature_dir / "subset.npy"
    _check_feature_set(feature_dir)


# --------------------------------------------------------------------------- permissions


@pytest.fixture(name="umask")
def umask_fixture(request):
    """Runs the test under the umask it is parametrised with, then restores the previous one."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _modes(root: Path) -> dict:
    return {path.relative_to(root).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], indirect=True, ids=["022", "077", "002"])
def test_outputs_get_the_permissions_the_umask_allows(tmp_path, umask):
    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    rng = np.random.default_rng(0)
    sidecar = {"format": "dqkernels.features", "mode": "pooled", "count": 10,
               "files": {"features": "feats.npy"}, "source": {"path": "generated", "kind": "image-array"}}
    contents = {"feats.npy": partial(np.save, arr=rng.standard_normal((10, 3)).astype(np.float32))}

    staged = tmp_path / "new" / "deeper" / "features"  # parents created as well
    write_feature_set(staged, contents, sidecar)
    write_feature_set(staged, contents, sidecar)  # replacing a set: the new folder too
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, folder_mode)
    (shared / "notes.txt").write_text("kept")
    write_feature_set(shared, contents, sidecar)

    result = graphcut_bins(rng.standard_normal((10, 3)).astype(np.float32), bins=2)
    result.save(tmp_path / "bins.npz")
    save_subset(sample_bins(result, 0.5), tmp_path / "bins.npz", tmp_path / "subsets" / "subset.npy")

    images, _ = digits_arrays(2, size=16)
    write_patch_store(tmp_path / "patches", images, np.ones((2, 4), dtype=bool), np.arange(2), patch=8)

    modes = _modes(tmp_path)
    del modes["."]  # made by pytest
    for relative, mode in modes.items():
        expected = folder_mode if (tmp_path / relative).is_dir() else file_mode
        assert mode == expected, f"{relative}: {oct(mode)}, expected {oct(expected)} under umask {oct(umask)}"
    assert {"new/deeper/features/features.json", "shared/features.json", "subsets/subset.json",
            "patches/header.json"} <= modes.keys()
