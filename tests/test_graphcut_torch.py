"""The torch engine and the Triton fused step against the reference (docs/method.md §2).

On a machine without a GPU the torch engine runs on CPU tensors and the Triton kernels run
through the Triton interpreter (set by conftest), on small shapes.
"""

import os

import numpy as np
import pytest

from dqkernels import GradEmbedding, graphcut_bins
from dqkernels.graphcut.testing import check_binning

torch = pytest.importorskip("torch")
BACKENDS = ["torch", "triton"]
needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,d,bins", [(1, 1, 1), (7, 1, 2), (37, 3, 4), (70, 64, 3), (130, 8, 2)])
def test_float64_matches_reference(rng, backend, m, d, bins):
    # Pools of two always tie exactly; these shapes keep every greedy pool at three or more, so
    # the comparison is pick for pick (ties in tiny pools are checked by replay elsewhere).
    x = rng.standard_normal((m, d)) + rng.standard_normal(d)
    for metric in ("euclidean", "cosine"):
        if metric == "cosine" and d == 1:
            continue  # ±1 rows: all exact ties
        fast = graphcut_bins(x, bins=bins, metric=metric, backend=backend, device=_device())
        slow = graphcut_bins(x, bins=bins, metric=metric, backend="reference")
        assert fast.backend == backend
        np.testing.assert_array_equal(fast.order, slow.order)


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_per_class_replay(rng, backend):
    labels = np.r_[np.zeros(60, int), np.ones(2, int), np.full(9, 5), np.full(1, 7)]
    rng.shuffle(labels)
    x = rng.standard_normal((len(labels), 16)).astype(np.float32)
    for sizes in ("split", "official"):
        result = graphcut_bins(x, bins=4, labels=labels, backend=backend, device=_device(), sizes=sizes)
        check_binning(result, x, rtol=1e-4, expected_sizes=sizes)


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lowest_index(backend):
    x = np.ones((45, 3), dtype=np.float32)
    result = graphcut_bins(x, bins=4, backend=backend, device=_device())
    np.testing.assert_array_equal(result.order, np.arange(45))


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_embedding(rng, backend):
    delta = rng.standard_normal((50, 4))
    embed = rng.standard_normal((50, 6))
    fast = graphcut_bins(GradEmbedding(delta, embed), bins=3, backend=backend, device=_device())
    slow = graphcut_bins(GradEmbedding(delta, embed), bins=3, backend="reference")
    np.testing.assert_array_equal(fast.order, slow.order)


def test_torch_engine_matches_cpu_engine_at_a_larger_size(rng):
    labels = rng.integers(0, 5, size=3000)
    x = rng.standard_normal((3000, 32))
    cpu = graphcut_bins(x, bins=10, labels=labels)
    on_torch = graphcut_bins(x, bins=10, labels=labels, backend="torch", device=_device())
    np.testing.assert_array_equal(cpu.order, on_torch.order)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_replay_large(rng, backend, dtype):
    m, d = 20000, 128
    x = torch.randn((m, d), device="cuda", dtype=getattr(torch, dtype))
    labels = rng.integers(0, 10, size=m)
    for per_class in (None, labels):
        result = graphcut_bins(x, bins=10, labels=per_class, backend=backend, device="cuda")
        check_binning(result, x.float().cpu().numpy(), rtol=1e-4, expected_sizes="split")
