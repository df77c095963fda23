"""The Triton kernels against the float64 reference (docs/method.md §1–2), kernel by kernel.

Without a GPU they run under the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), with blocks shrunk to 16 so that small problems still take several blocks or
sweeps: n not a multiple of the block, d = 1, classes of one to three samples, exact ties,
official sizes and gradient embeddings. float64 runs must match the reference pick for pick;
float32 runs must pass the replay criterion. The interpreter runs programs one after another
and breaks argmax ties to the left by itself, which is why the kernels write their tie-break out
(see test_triton_lint.py) and why the GPU tests repeat these checks on a device.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from dqkernels import GradEmbedding, graphcut_bins
from dqkernels.graphcut.testing import check_binning

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)

from dqkernels.graphcut import torch_engine  # noqa: E402
from dqkernels.graphcut.kernels import fused_step, packed_gram, persistent_bins  # noqa: E402

SMALL = 16


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["persistent", "fused-gram", "fused-stream"])
def kernel(request, monkeypatch):
    """One Triton kernel path with 16-wide blocks; yields (form, expected result.backend)."""
    if request.param == "persistent":
        monkeypatch.setattr(persistent_bins, "CONFIGS", (dict(BLOCK=SMALL, num_warps=1),))
        return "gram", "triton-persistent"
    if request.param == "fused-gram":
        monkeypatch.setattr(torch_engine, "PERSISTENT_MAX_N", 0)
        monkeypatch.setitem(fused_step.GRAM_CONFIG, "BLOCK", SMALL)
        return "gram", "triton-fused"
    monkeypatch.setitem(fused_step.STREAM_CONFIG, "BLOCK", SMALL)
    return "stream", "triton-fused"


def _bins(features, kernel, **options):
    form, expected = kernel
    result = graphcut_bins(features, backend="triton", device=_device(), form=form, **options)
    assert (result.backend, result.form) == (expected, form)
    return result


# --------------------------------------------------------------------------- packed Gram


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gradient", [False, True])
def test_packed_gram_matches_torch(rng, dtype, gradient):
    counts = np.array([1, 70, 3, 64])  # one sample; two 64-tiles with a ragged edge; exact fit
    m = int(counts.sum())
    x = torch.from_numpy(rng.standard_normal((m, 33))).to(_device(), dtype)  # d not a multiple of BLOCK_K
    embed = torch.from_numpy(rng.standard_normal((m, 5))).to(_device(), dtype) if gradient else None
    gram = packed_gram.packed_gram(x, embed, counts)
    offsets = packed_gram.gram_offsets(counts)
    assert gram.shape == (int((counts**2).sum()),)
    rows = np.concatenate([[0], np.cumsum(counts)])
    for p, n in enumerate(counts.tolist()):
        block = x[rows[p] : rows[p + 1]].double()
        expected = block @ block.T
        if gradient:
            e = embed[rows[p] : rows[p + 1]].double()
            expected *= 1.0 + e @ e.T
        got = gram[offsets[p] : offsets[p] + n * n].view(n, n).double()
        tolerance = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))


def test_packed_gram_of_one_dimension_and_the_tile_list():
    x = torch.arange(1.0, 6.0, dtype=torch.float64, device=_device())[:, None]
    gram = packed_gram.packed_gram(x, None, np.array([5]))
    torch.testing.assert_close(gram.view(5, 5), x @ x.T, rtol=0, atol=0)
    tiles = packed_gram.upper_tiles(np.array([130, 1]), 64)
    assert tiles.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 1], [0, 1, 2], [0, 2, 2], [1, 0, 0]]


# --------------------------------------------------------------------------- whole binnings


@pytest.mark.parametrize(
    "m,d,bins,classes",
    [(37, 3, 4, 0), (29, 1, 3, 0), (40, 6, 3, 3)],
    ids=["ragged-blocks", "d=1", "per-class"],
)
def test_float64_pick_for_pick(rng, kernel, m, d, bins, classes):
    x = rng.standard_normal((m, d)) + rng.standard_normal(d)
    labels = rng.integers(0, classes, size=m) if classes else None
    for metric in ("euclidean", "cosine") if d > 1 else ("euclidean",):
        fast = _bins(x, kernel, bins=bins, labels=labels, metric=metric)
        slow = graphcut_bins(x, bins=bins, labels=labels, metric=metric, backend="reference")
        np.testing.assert_array_equal(fast.order, slow.order)


def test_tiny_classes_and_official_sizes_float32_replay(rng, kernel):
    # Classes of one, two and three samples leave bins empty; official sizes differ per class.
    labels = np.r_[np.zeros(30, int), np.ones(1, int), np.full(2, 4), np.full(3, 9)]
    rng.shuffle(labels)
    x = rng.standard_normal((len(labels), 5)).astype(np.float32)
    for sizes in ("split", "official"):
        result = _bins(x, kernel, bins=4, labels=labels, sizes=sizes, lam=0.7)
        check_binning(result, x, rtol=1e-4, expected_sizes=sizes)


def test_exact_ties_go_to_the_lowest_index(kernel):
    x = np.ones((35, 2), dtype=np.float32)
    result = _bins(x, kernel, bins=3, metric="euclidean")
    np.testing.assert_array_equal(result.order, np.arange(35))


def test_gradient_embedding_pick_for_pick(rng, kernel):
    delta = rng.standard_normal((34, 3))
    embed = rng.standard_normal((34, 4))
    fast = _bins(GradEmbedding(delta, embed), kernel, bins=3)
    slow = graphcut_bins(GradEmbedding(delta, embed), bins=3, backend="reference")
    np.testing.assert_array_equal(fast.order, slow.order)


def test_persistent_kernel_with_default_blocks_on_a_larger_per_class_problem(rng):
    labels = rng.integers(0, 3, size=300)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    result = graphcut_bins(x, bins=10, labels=labels, backend="triton", device=_device())
    assert result.backend == "triton-persistent"
    check_binning(result, x, rtol=1e-4, expected_sizes="split")
    np.testing.assert_array_equal(result.order, graphcut_bins(x, bins=10, labels=labels).order)


def test_fused_step_state_is_left_clean_between_launches(rng):
    """The arrival counters return to zero after every launch, and a launch with no bin armed
    changes nothing: the two facts that let a bin replay from a CUDA graph."""
    from dqkernels.graphcut.device_prepare import problem_of_rows

    x = torch.from_numpy(rng.standard_normal((40, 4))).to(_device())
    offsets = np.array([0, 25, 40])
    problems = torch_engine.Problems(x, None, offsets, np.array([[5, 20], [3, 12]]))
    norms = torch_engine.row_norms(x, None)
    c2 = torch_engine.initial_c2(problems, norms, problem_of_rows(offsets, x.device))
    gram = packed_gram.packed_gram(x, None, problems.counts)
    step = fused_step.FusedStep(offsets, norms, c2, 1.0, gram=gram, block=SMALL)
    before = [t.clone() for t in (step.c1, step.c2, step.pick, step.remaining, step.written)]
    step.step()  # nothing armed: every program idle
    for old, new in zip(before, (step.c1, step.c2, step.pick, step.remaining, step.written)):
        assert torch.equal(old, new)
    step.start_bin(torch.tensor([5, 3], device=_device()))
    for _ in range(6):
        step.step()
        assert step.arrived.tolist() == [0, 0]
    assert step.written.tolist() == [5, 3] and step.remaining.tolist() == [0, 0]
    assert step.pick.tolist() == [-1, -1]
