"""The C++ CPU engine against the float64 reference and the replay criterion (docs/method.md §2)."""

from types import SimpleNamespace

import numpy as np
import pytest

from dqkernels import GradEmbedding, graphcut_bins
from dqkernels.graphcut.testing import check_binning

FORMS = ["gram", "stream"]
SHAPES = [  # (M, d, bins): tiny, d = 1 / 3, M not divisible by bins, larger than one tile
    (1, 1, 1),
    (2, 3, 2),
    (5, 1, 5),
    (37, 3, 4),
    (100, 64, 7),
    (513, 64, 10),
    (1001, 512, 10),
    (2000, 3, 3),
    (4001, 64, 10),
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("m,d,bins", SHAPES)
def test_float32_passes_replay(rng, form, m, d, bins):
    x = rng.standard_normal((m, d)).astype(np.float32)
    for metric in ("cosine", "euclidean"):
        result = graphcut_bins(x, bins=bins, metric=metric, form=form)
        assert result.backend == "cpu" and result.form == form
        check_binning(result, x, rtol=1e-4, expected_sizes="split")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("m,d,bins", [(1, 1, 1), (9, 1, 2), (64, 3, 5), (301, 64, 10), (700, 512, 6)])
def test_float64_matches_reference_pick_for_pick(rng, form, m, d, bins):
    x = rng.standard_normal((m, d)) * rng.uniform(0.1, 10.0) + rng.standard_normal(d)
    for metric in ("euclidean", "cosine"):
        if metric == "cosine" and d == 1:
            continue  # unit rows in 1-D are ±1: every score ties exactly
        fast = graphcut_bins(x, bins=bins, metric=metric, form=form)
        slow = graphcut_bins(x, bins=bins, metric=metric, backend="reference")
        assert fast.meta["precision"] == "float64"
        np.testing.assert_array_equal(fast.order, slow.order)
        np.testing.assert_array_equal(fast.bin_offsets, slow.bin_offsets)
        check_binning(fast, x, rtol=1e-9)


@pytest.mark.parametrize("lam", [0.25, 0.5, 1.5, 2.0, 3.0])
def test_lambda(rng, lam):
    x = rng.standard_normal((400, 16))
    fast = graphcut_bins(x, bins=5, lam=lam)
    slow = graphcut_bins(x, bins=5, lam=lam, backend="reference")
    np.testing.assert_array_equal(fast.order, slow.order)
    check_binning(graphcut_bins(x.astype(np.float32), bins=5, lam=lam), x, rtol=1e-4)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_all_equal_rows_tie_to_lowest_index(form, dtype, metric):
    x = np.full((53, 20), 0.37, dtype=dtype)
    result = graphcut_bins(x, bins=4, metric=metric, form=form)
    np.testing.assert_array_equal(result.order, np.arange(53))


@pytest.mark.parametrize("form", FORMS)
def test_duplicate_rows(rng, form):
    base = rng.standard_normal((60, 8))
    x = base[rng.integers(0, 60, size=400)]  # ~85% duplicates
    check_binning(graphcut_bins(x, bins=6, form=form), x, rtol=1e-9)
    x32 = x.astype(np.float32)
    check_binning(graphcut_bins(x32, bins=6, form=form), x32, rtol=1e-4)


def test_gram_and_stream_agree(rng):
    x = rng.standard_normal((900, 40))
    gram = graphcut_bins(x, bins=9, form="gram")
    stream = graphcut_bins(x, bins=9, form="stream")
    assert gram.form == "gram" and stream.form == "stream"
    np.testing.assert_array_equal(gram.order, stream.order)
    x32 = x.astype(np.float32)
    for form in FORMS:
        check_binning(graphcut_bins(x32, bins=9, form=form), x32, rtol=1e-4)


def test_cosine_equals_euclidean_on_normalised_rows(rng):
    x = rng.standard_normal((500, 24)) * rng.uniform(0.5, 3.0, size=(500, 1))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cosine = graphcut_bins(x, bins=5, metric="cosine")
    euclidean = graphcut_bins(unit, bins=5, metric="euclidean")
    np.testing.assert_array_equal(cosine.order, euclidean.order)


def _explicit_gradient(delta, embed):
    """g_i = [δ_i, δ_i ⊗ e_i]: (M, C + C·D)."""
    outer = (delta[:, :, None] * embed[:, None, :]).reshape(len(delta), -1)
    return np.concatenate([delta, outer], axis=1)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_factorised_gradient_kernel_equals_explicit(rng, form, metric):
    m, c, d = 300, 5, 7
    logits = rng.standard_normal((m, c))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    delta = probs - np.eye(c)[rng.integers(0, c, size=m)]
    embed = rng.standard_normal((m, d))
    explicit = _explicit_gradient(delta, embed)
    factorised = graphcut_bins(GradEmbedding(delta, embed), bins=4, metric=metric, form=form)
    plain = graphcut_bins(explicit, bins=4, metric=metric, backend="reference")
    np.testing.assert_array_equal(factorised.order, plain.order)
    assert factorised.meta["gradient_embedding"] and factorised.meta["dims"] == [c, d]
    grad32 = GradEmbedding(delta.astype(np.float32), embed.astype(np.float32))
    result32 = graphcut_bins(grad32, bins=4, metric=metric, form=form)
    check_binning(result32, explicit, metric=metric, rtol=1e-4)
    check_binning(result32, grad32, metric=metric, rtol=1e-4)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sizes", ["split", "official"])
def test_per_class_unbalanced_and_tiny_classes(rng, form, sizes):
    counts = {7: 500, 2: 3, 5: 1, 0: 61, 9: 10}  # classes smaller than the bin count included
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    rng.shuffle(labels)
    x = rng.standard_normal((len(labels), 32)).astype(np.float32)
    result = graphcut_bins(x, bins=10, labels=labels, form=form, sizes=sizes)
    np.testing.assert_array_equal(result.labels, labels)
    check_binning(result, x, rtol=1e-4, expected_sizes=sizes)
    # Per class, bins come out exactly as binning that class alone.
    x64 = x.astype(np.float64)
    per_class = graphcut_bins(x64, bins=10, labels=labels, form=form, sizes=sizes)
    bin_of = per_class.bin_of
    for cls in counts:
        members = np.flatnonzero(labels == cls)
        if sizes == "split" and len(members) >= 10:
            alone = graphcut_bins(x64[members], bins=10, backend="reference")
            np.testing.assert_array_equal(bin_of[members[alone.order]], alone.bin_of[alone.order])


def test_many_classes_run_concurrently(rng):
    labels = rng.integers(0, 40, size=4000)
    x = rng.standard_normal((4000, 16))
    fast = graphcut_bins(x, bins=5, labels=labels, threads=2)
    slow = graphcut_bins(x, bins=5, labels=labels, backend="reference")
    np.testing.assert_array_equal(fast.order, slow.order)


def test_explicit_sizes_and_official_sizes(rng):
    x = rng.standard_normal((103, 8))
    result = graphcut_bins(x, bins=3, sizes=[10, 0, 93])
    np.testing.assert_array_equal(result.bin_sizes, [10, 0, 93])
    check_binning(result, x, rtol=1e-9)
    official = graphcut_bins(x, bins=4, sizes="official")
    np.testing.assert_array_equal(official.bin_sizes, [26, 26, 26, 25])


def test_float16_and_torch_inputs(rng):
    x = rng.standard_normal((200, 12)).astype(np.float16)
    result = graphcut_bins(x, bins=4)
    assert result.meta["dtype"] == "float16" and result.meta["precision"] == "float32"
    check_binning(result, x.astype(np.float32), rtol=1e-4)
    torch = pytest.importorskip("torch")
    tensor = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    check_binning(graphcut_bins(tensor, bins=4), tensor.float().numpy(), rtol=1e-4)


def test_fortran_order_and_threads(rng):
    x = np.asfortranarray(rng.standard_normal((300, 20)))
    one = graphcut_bins(x, bins=3, threads=1)
    two = graphcut_bins(x, bins=3, threads=2)
    np.testing.assert_array_equal(one.order, two.order)


def test_gram_kernel_matches_numpy(rng):
    from dqkernels.graphcut import _C

    for n, d in [(1, 1), (13, 3), (77, 64), (300, 129)]:
        x = rng.standard_normal((n, d))
        gram = _C.gram_cpu(x)
        np.testing.assert_allclose(gram, x @ x.T, rtol=1e-12, atol=1e-12)
        assert np.array_equal(gram, gram.T)
        x32 = x.astype(np.float32)
        np.testing.assert_allclose(_C.gram_cpu(x32), x @ x.T, rtol=1e-4, atol=1e-4 * d)


def test_float32_input_in_float64_precision_is_exact(rng):
    x = rng.standard_normal((300, 20)).astype(np.float32)
    fast = graphcut_bins(x, bins=5, precision="float64")
    slow = graphcut_bins(x.astype(np.float64), bins=5, backend="reference")
    np.testing.assert_array_equal(fast.order, slow.order)
    check_binning(fast, x, rtol=1e-9)


@pytest.mark.parametrize("lam", [0.5, 1.0, 1.7])
def test_official_rule_gives_the_same_bins(rng, lam):
    """docs/method.md §1: the official GraphCut (s = ½ + ½·cos, naive greedy) is the same argmax."""
    from dqkernels.graphcut.reference import official_graphcut_bins
    from dqkernels.graphcut.sizes import split_sizes

    x = rng.standard_normal((240, 10))
    ours = graphcut_bins(x, bins=6, metric="cosine", lam=lam)
    exact = official_graphcut_bins(x, split_sizes(240, 6), lam=lam, similarity_dtype=np.float64)
    np.testing.assert_array_equal(exact, ours.order)
    as_shipped = official_graphcut_bins(x, split_sizes(240, 6), lam=lam)  # float32 similarities
    replay = SimpleNamespace(order=as_shipped, bin_offsets=ours.bin_offsets)
    check_binning(replay, x, metric="cosine", lam=lam, rtol=1e-4)
