"""How cost grows with M and d: every engine against the baselines, in the same run.

    pytest benchmarks/bench_scaling.py --benchmark-json=benchmarks/results/scaling.json
    python benchmarks/report.py benchmarks/results/scaling.json --plots benchmarks/plots

Global cosine binning into 10 bins of standard-normal float32 features, M from 1 000 up,
d ∈ {64, 512, 2048}. Each record carries the peak resident memory the run added (Linux:
the high-water mark is reset before each run). A baseline is timed up to the size where one
run stays within a minute on two cores; apricot-select's GraphCut runs when it is installed.
"""

import os
import re
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import baselines  # noqa: E402

import dqkernels  # noqa: E402
from dqkernels.graphcut.reference import greedy_bins_reference, pairwise_sq_distances  # noqa: E402
from dqkernels.graphcut.sizes import split_sizes  # noqa: E402

BINS = 10
SIZES = [1000, 2000, 4000, 8000, 16000]
DIMS = [64, 512, 2048]
# Largest M and largest M·d each engine is timed at (beyond them one run takes minutes on two
# cores; the official-style rule and the float64 reference grow like M³ and M² memory).
LIMITS = {
    "dqk-cpu-gram": (16000, 16000 * 2048),
    "dqk-cpu-stream": (16000, 16000 * 512),
    "dqk-torch-cpu": (8000, 8000 * 512),
    "numpy-careful": (16000, 16000 * 512),
    "float64-reference": (4000, 4000 * 512),
    "official-style": (4000, 4000 * 512),
    "apricot-graphcut": (4000, 4000 * 512),
}


OPTIONAL_MODULES = {"dqk-torch-cpu": "torch", "apricot-graphcut": "apricot"}


def _reset_peak_memory() -> int:
    """Resets this process's resident high-water mark; returns the current resident kB."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_kb("VmRSS")
    except OSError:
        return -1


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+) kB", handle.read()).group(1))


def _apricot_bins(x):
    import apricot

    pool = np.arange(len(x))
    order = []
    for b, size in enumerate(split_sizes(len(x), BINS)):
        if b == BINS - 1:
            order.extend(pool.tolist())
            break
        selector = apricot.GraphCutSelection(int(size), metric="cosine", optimizer="naive")
        selector.fit(x[pool])
        chosen = pool[selector.ranking]
        order.extend(chosen.tolist())
        pool = np.setdiff1d(pool, chosen)
    return np.asarray(order)


def _run(engine, x):
    if engine == "dqk-cpu-gram":
        return dqkernels.graphcut_bins(x, BINS, form="gram").order
    if engine == "dqk-cpu-stream":
        return dqkernels.graphcut_bins(x, BINS, form="stream").order
    if engine == "dqk-torch-cpu":
        return dqkernels.graphcut_bins(x, BINS, backend="torch").order
    if engine == "numpy-careful":
        return baselines.careful_numpy_bins(x, BINS)
    if engine == "float64-reference":
        unit = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
        return greedy_bins_reference(pairwise_sq_distances(unit), split_sizes(len(x), BINS))
    if engine == "official-style":
        return baselines.official_style_bins(x, BINS)
    if engine == "apricot-graphcut":
        return _apricot_bins(x)
    raise KeyError(engine)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("engine", list(LIMITS))
def test_scaling(benchmark, engine, m, d):
    max_m, max_md = LIMITS[engine]
    if m > max_m or m * d > max_md:
        pytest.skip(f"{engine} is not timed beyond M = {max_m}, M·d = {max_md}")
    if engine in OPTIONAL_MODULES:
        pytest.importorskip(OPTIONAL_MODULES[engine])
    x = np.random.default_rng(0).standard_normal((m, d)).astype(np.float32)
    steps = m - m // BINS
    base_kb = _reset_peak_memory()
    benchmark.pedantic(_run, args=(engine, x), rounds=1, warmup_rounds=0, iterations=1)
    peak_kb = _status_kb("VmHWM") - base_kb if base_kb >= 0 else -1
    benchmark.extra_info.update(
        engine=engine, case=f"global-{m}x{d}", M=m, d=d, bins=BINS, steps=steps,
        peak_added_mb=round(peak_kb / 1024, 1), threads=os.cpu_count(),
    )
