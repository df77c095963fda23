"""GraphCut bin generation: the engines against the baselines, timed in the same run.

    pytest benchmarks/bench_graphcut.py --benchmark-json=benchmarks/results/cpu.json
    python benchmarks/report.py benchmarks/results/cpu.json

Each case bins cosine features (standard normal, float32) into 10 bins. Every engine's output
is checked against the replay criterion once, outside the timed region, at the smaller sizes.
"""

import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import baselines  # noqa: E402

import dqkernels  # noqa: E402
from dqkernels.graphcut.testing import check_binning  # noqa: E402

BINS = 10
# (case name, classes, samples per class, dims)
CASES = {
    "global-5000x512": (1, 5000, 512),
    "global-20000x512": (1, 20000, 512),
    "cifar10-per-class-10x5000x512": (10, 5000, 512),
}
# Baselines too slow for a size are left out of it (official-style is cubic in the bin size).
ENGINES = {
    "dqk-cpu-gram": {"global-5000x512", "global-20000x512", "cifar10-per-class-10x5000x512"},
    "dqk-cpu-stream": {"global-5000x512", "global-20000x512", "cifar10-per-class-10x5000x512"},
    "numpy-careful": {"global-5000x512", "global-20000x512"},
    "official-style": {"global-5000x512"},
    "torch-naive-cpu": {"global-5000x512"},
}


def _features(case):
    classes, per_class, dims = CASES[case]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((classes * per_class, dims)).astype(np.float32)
    labels = np.repeat(np.arange(classes), per_class) if classes > 1 else None
    return x, labels


def _run(engine, x, labels):
    if engine == "dqk-cpu-gram":
        return dqkernels.graphcut_bins(x, BINS, labels=labels, form="gram")
    if engine == "dqk-cpu-stream":
        return dqkernels.graphcut_bins(x, BINS, labels=labels, form="stream")
    if engine == "numpy-careful":
        return baselines.careful_numpy_bins(x, BINS)
    if engine == "official-style":
        return baselines.official_style_bins(x, BINS)
    if engine == "torch-naive-cpu":
        pytest.importorskip("torch")
        return baselines.torch_naive_bins(x, BINS)
    raise KeyError(engine)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_graphcut(benchmark, engine, case):
    if case not in ENGINES[engine]:
        pytest.skip(f"{engine} is not timed at {case}")
    x, labels = _features(case)
    classes, per_class, dims = CASES[case]
    steps = classes * (per_class - per_class // BINS)  # greedy picks: all bins but the last
    benchmark.extra_info.update(
        engine=engine, case=case, M=len(x), d=dims, classes=classes, bins=BINS, steps=steps,
        threads=os.cpu_count(),
    )
    # The minimum over rounds is reported. The first touch of fresh memory in a process is slower
    # on a virtual machine, so every case runs at least twice except the slow baselines.
    rounds = 1 if engine in ("official-style", "torch-naive-cpu") else (2 if len(x) > 10000 else 3)
    out = benchmark.pedantic(_run, args=(engine, x, labels), rounds=rounds, iterations=1)
    if len(x) <= 5000:
        check_binning(_as_result(out, len(x)), x, labels=labels, metric="cosine", lam=1.0, rtol=1e-4)


def _as_result(out, m):
    """A BinResult, or a baseline's bare order with np.array_split bin offsets."""
    if hasattr(out, "order"):
        return out
    sizes = [len(part) for part in np.array_split(np.arange(m), BINS)]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return SimpleNamespace(order=out, bin_offsets=offsets)
