"""Progress reporting: the plain lines, their time estimate, -q, and the C++ engine's step counter."""

from __future__ import annotations

import io

import numpy as np
import pytest

from conftest_data import invoke
from dqkernels import graphcut_bins
from dqkernels.cli.main import cli
from dqkernels.graphcut.api import greedy_steps, problem_layout
from dqkernels.pipeline.progress import INTERVAL_ENV, Progress, format_count

_C = pytest.importorskip("dqkernels.graphcut._C")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# --------------------------------------------------------------------------- the reporter


def test_every_update_is_a_line_at_interval_zero_and_the_estimate_skips_the_warm_up():
    clock, out = FakeClock(), io.StringIO()
    with Progress("bin", 47000, "greedy steps", stream=out, terminal=False, interval=0, clock=clock) as steps:
        clock.now += 30  # warm-up: the first update comes late
        steps(1000)
        clock.now += 1  # then 11 345 steps a second
        steps(12345)
        clock.now += 1
        steps(47000)
    assert _lines(out) == [
        "bin: 1 000 / 47 000 greedy steps, 2%, 30 s elapsed",  # no rate yet: no estimate
        "bin: 12 345 / 47 000 greedy steps, 26%, 31 s elapsed, ~3 s left",
        "bin: 47 000 / 47 000 greedy steps, 100%, 32 s elapsed",
        "bin: 47 000 / 47 000 greedy steps, 100%, done in 32 s",
    ]


def test_lines_are_throttled_to_the_interval():
    clock, out = FakeClock(), io.StringIO()
    steps = Progress("export", 100, "samples", stream=out, terminal=False, interval=5, clock=clock)
    for done in range(1, 101):
        clock.now += 0.25
        steps(done)
    steps.close()
    lines = _lines(out)
    assert len(lines) == 5 + 1  # at 5, 10, 15, 20, 25 s, and the last
    assert lines[0].startswith("export: 20 / 100 samples, 20%, 5 s elapsed, ~")
    assert lines[-1] == "export: 100 / 100 samples, 100%, done in 25 s"


def test_a_short_step_writes_nothing_and_a_disabled_one_never_does():
    out = io.StringIO()
    with Progress("sample", 10, stream=out, terminal=False, interval=5) as quick:
        quick(10)
    with Progress("bin", 10, stream=out, terminal=False, interval=0, enabled=False) as quiet:
        quiet(5)
        quiet.update(5)
    assert out.getvalue() == ""


def test_unknown_total_and_a_bad_interval(monkeypatch):
    clock, out = FakeClock(), io.StringIO()
    with Progress("features", stream=out, terminal=False, interval=0, clock=clock) as running:
        clock.now += 2
        running(0)
    assert _lines(out) == ["features: running, 2 s elapsed", "features: done in 2 s"]
    assert format_count(1234567) == "1 234 567"
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match=INTERVAL_ENV):
        Progress("bin", 1, terminal=False)


# --------------------------------------------------------------------------- the engine's counter


@pytest.mark.parametrize("classes, gram", [(1, True), (1, False), (12, True), (12, False)])
def test_cpu_engine_counts_every_greedy_step_and_gives_the_same_order(rng, classes, gram):
    m, d, n_bins = 1200, 32, 7
    x = rng.standard_normal((m, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.arange(m) % classes if classes > 1 else None
    _, perm, bin_sizes, offsets = problem_layout(labels, m, n_bins, "split")
    x = np.ascontiguousarray(x[perm])
    use_gram = np.full(len(offsets) - 1, gram)
    plain = _C.graphcut_cpu(x, None, offsets, bin_sizes, 1.0, use_gram, 2)
    counter = np.zeros(1, dtype=np.int64)
    counted = _C.graphcut_cpu(x, None, offsets, bin_sizes, 1.0, use_gram, 2, progress=counter)
    assert np.array_equal(plain, counted)
    assert counter[0] == greedy_steps(bin_sizes) == m - bin_sizes[:, -1].sum()


def test_cpu_engine_refuses_a_counter_it_cannot_update_in_place():
    x = np.eye(4)
    args = (x, None, np.array([0, 4]), np.array([[2, 2]]), 1.0, np.array([True]), 1)
    for bad in (np.zeros(1, dtype=np.int32), np.zeros(2, dtype=np.int64), [0]):
        with pytest.raises((TypeError, ValueError), match="progress"):
            _C.graphcut_cpu(*args, progress=bad)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_graphcut_bins_tells_progress_up_to_the_total_and_keeps_the_result(rng, backend):
    features = rng.standard_normal((300, 16)).astype(np.float32)
    labels = np.arange(300) % 3
    calls = []
    told = graphcut_bins(features, bins=5, labels=labels, backend=backend, progress=lambda *a: calls.append(a))
    plain = graphcut_bins(features, bins=5, labels=labels, backend=backend)
    assert np.array_equal(told.order, plain.order) and np.array_equal(told.bin_offsets, plain.bin_offsets)
    total = 300 - int(np.diff(plain.bin_offsets)[-1])
    assert all(t == total for _, t in calls) and calls[-1] == (total, total)
    done = [d for d, _ in calls]
    assert done == sorted(done)


# --------------------------------------------------------------------------- the commands


@pytest.fixture
def images_npz(tmp_path):
    generator = np.random.default_rng(0)
    path = tmp_path / "images.npz"
    np.savez(path, images=generator.integers(0, 255, (24, 16, 16, 3), dtype=np.uint8),
             labels=np.arange(24) % 3)
    return path


def _progress_lines(result, step: str) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(f"{step}: ")]


def test_bin_and_sample_write_progress_lines_and_quiet_silences_them(tmp_path, monkeypatch, rng):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    features = tmp_path / "feats.npy"
    np.save(features, rng.standard_normal((400, 8)).astype(np.float32))
    loud = invoke(["bin", "--features", features, "--bins", 4, "-o", tmp_path / "loud.npz"])
    quiet = invoke(["bin", "--features", features, "--bins", 4, "-o", tmp_path / "quiet.npz", "-q"])
    assert loud.exit_code == 0 and quiet.exit_code == 0, loud.output + quiet.output
    lines = _progress_lines(loud, "bin")
    assert lines[-1] == "bin: 300 / 300 greedy steps, 100%, done in 0 s"
    assert quiet.stderr == "" and quiet.stdout.startswith(str(tmp_path / "quiet.npz"))
    assert np.array_equal(np.load(tmp_path / "loud.npz")["order"], np.load(tmp_path / "quiet.npz")["order"])

    source = tmp_path / "rows.npy"
    np.save(source, np.arange(400 * 4, dtype=np.uint8).reshape(400, 2, 2))
    sample = ["sample", "--bins", tmp_path / "loud.npz", "--ratio", 0.5, "--source", source]
    loud = invoke([*sample, "-o", tmp_path / "a.npy", "--export", tmp_path / "a"])
    quiet = invoke([*sample, "-o", tmp_path / "b.npy", "--export", tmp_path / "b", "-q"])
    assert loud.exit_code == 0 and quiet.exit_code == 0, loud.output + quiet.output
    assert _progress_lines(loud, "export")[-1] == "export: 200 / 200 samples, 100%, done in 0 s"
    assert quiet.stderr == ""


def test_run_writes_progress_lines_and_quiet_silences_them(tmp_path, monkeypatch, images_npz):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    run = ["run", "--input", images_npz, "--random-init", "--img-size", 16, "--device", "cpu", "--bins", 2,
           "--ratio", 0.5]
    loud = invoke([*run, "--work-dir", tmp_path / "run-loud", "--export", tmp_path / "export-loud"])
    quiet = invoke([*run, "--work-dir", tmp_path / "run-quiet", "--export", tmp_path / "export-quiet", "-q"])
    assert loud.exit_code == 0 and quiet.exit_code == 0, loud.output + quiet.output
    for step, last in (("bin", "bin: 12 / 12 greedy steps, 100%, done in"), ("export", "export: 12 / 12 samples")):
        assert _progress_lines(loud, step)[-1].startswith(last)
    assert not any(_progress_lines(quiet, step) for step in ("features", "bin", "export"))
    assert [line.split(":")[0] for line in quiet.stdout.splitlines()] == ["features", "bins", "sample", "export"]


def test_every_long_running_command_takes_quiet():
    for name in ("features", "bin", "sample", "run", "v2", "quantize", "reconstruct"):
        assert "-q, --quiet" in invoke([name, "--help"]).output, name
    assert set(cli.commands) >= {"features", "bin", "sample", "run", "v2", "quantize", "reconstruct"}
