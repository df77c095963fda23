"""The device path of graphcut_bins: the torch front end, the torch engine and the Triton
engine against the reference (docs/method.md §1–2), forms, budgets and precision.

On a machine without a GPU everything runs on CPU tensors, the Triton kernels through the
interpreter (set by conftest), on small shapes. The tests marked ``gpu`` repeat the replay checks
on a CUDA device at up to 200 000 samples, with fresh random inputs and poisoned buffers.
"""

import os

import numpy as np
import pytest

from dqkernels import GradEmbedding, graphcut_bins
from dqkernels.core.checksum import features_checksum
from dqkernels.core.errors import EngineError, InputError
from dqkernels.graphcut import api
from dqkernels.graphcut.prepare import working_features as numpy_working_features
from dqkernels.graphcut.testing import check_binning

torch = pytest.importorskip("torch")

from dqkernels.graphcut import device_prepare, torch_engine  # noqa: E402

BACKENDS = ["torch", "triton"]
needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _ran(result, backend):
    """result.backend names the kernel: "torch", or one of the Triton kernels."""
    return result.backend == "torch" if backend == "torch" else result.backend.startswith("triton-")


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty comes back full of NaN (floats) or the smallest int64 (integers): an
    element an engine reads without writing it first shows up as a wrong or invalid result."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            return out.fill_(float("nan"))
        if out.dtype in (torch.int64, torch.int32):
            return out.fill_(torch.iinfo(out.dtype).min)
        return out

    monkeypatch.setattr(torch, "empty", poisoned_empty)


# --------------------------------------------------------------------------- engines


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
        assert _ran(fast, backend)
        np.testing.assert_array_equal(fast.order, slow.order)


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_per_class_replay(rng, backend, poisoned):
    labels = np.r_[np.zeros(60, int), np.ones(2, int), np.full(9, 5), np.full(1, 7)]
    rng.shuffle(labels)
    x = rng.standard_normal((len(labels), 16)).astype(np.float32)
    for sizes in ("split", "official"):
        for form in ("gram", "stream"):
            result = graphcut_bins(x, bins=4, labels=labels, backend=backend, device=_device(), sizes=sizes, form=form)
            assert result.form == form
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
    stream = graphcut_bins(x, bins=10, labels=labels, backend="torch", device=_device(), form="stream")
    np.testing.assert_array_equal(cpu.order, stream.order)


# --------------------------------------------------------------------------- routing and options


def test_auto_on_cuda_routes_to_the_device_path_and_the_triton_kernels(monkeypatch, rng):
    """backend="auto" with device="cuda" takes the device path, and the device path with
    backend "auto" runs a Triton kernel (checked here on CPU tensors, which is all a machine
    without a GPU can run; the gpu tests repeat it on CUDA)."""
    calls = []
    monkeypatch.setattr(api, "_resolve_device", lambda device, backend: str(device))
    monkeypatch.setattr(api, "_graphcut_bins_device", lambda *args: calls.append(args) or "routed")
    assert graphcut_bins(np.ones((4, 2)), bins=2, device="cuda") == "routed"
    assert calls[0][5:7] == ("cuda", "auto")
    monkeypatch.undo()
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    x = rng.standard_normal((30, 4)).astype(np.float32)
    result = api._graphcut_bins_device(x, 3, None, "cosine", 1.0, _device(), "auto", "split", None, "auto", None, None)
    assert result.backend == "triton-persistent" and result.form == "gram"
    check_binning(result, x)


def test_form_and_memory_budget_are_honoured(rng):
    x = rng.standard_normal((40, 6))
    labels = np.arange(40) % 3
    gram = graphcut_bins(x, bins=3, labels=labels, backend="torch", device=_device())
    problems = torch_engine.Problems(torch.zeros((40, 6), dtype=torch.float64), None, np.array([0, 14, 27, 40]), np.zeros((3, 3), int))
    stream_bytes = torch_engine.engine_bytes(problems, "stream", padded=True)
    gram_bytes = torch_engine.engine_bytes(problems, "gram", padded=True)
    assert stream_bytes < gram_bytes
    tight = graphcut_bins(x, bins=3, labels=labels, backend="torch", device=_device(), memory_budget=stream_bytes)
    assert (gram.form, tight.form) == ("gram", "stream")
    np.testing.assert_array_equal(gram.order, tight.order)
    with pytest.raises(InputError, match="form='gram' needs"):
        graphcut_bins(x, bins=3, labels=labels, backend="torch", device=_device(), form="gram", memory_budget=stream_bytes)
    with pytest.raises(InputError, match="even the streaming form"):
        graphcut_bins(x, bins=3, labels=labels, backend="torch", device=_device(), memory_budget=stream_bytes - 1)
    with pytest.raises(InputError, match="memory_budget must be >= 1"):
        graphcut_bins(x, bins=3, backend="torch", device=_device(), memory_budget=0)


@needs_triton
def test_triton_budget_counts_the_packed_gram_not_the_padded_one(rng):
    # One class of 60 and twelve of 2: packed Σn² is a fraction of 13·60².
    labels = np.r_[np.zeros(60, int), np.repeat(np.arange(1, 13), 2)]
    x = rng.standard_normal((len(labels), 4)).astype(np.float32)
    problems = torch_engine.Problems(torch.zeros((84, 4)), None, np.r_[0, np.cumsum(np.bincount(labels))], np.zeros((13, 2), int))
    packed = torch_engine.engine_bytes(problems, "gram", padded=False)
    padded = torch_engine.engine_bytes(problems, "gram", padded=True)
    assert packed < padded / 4
    result = graphcut_bins(x, bins=2, labels=labels, backend="triton", device=_device(), memory_budget=packed)
    assert result.form == "gram"
    check_binning(result, x)


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_precision_is_honoured(monkeypatch, rng, backend):
    seen = []
    for name in ("run_torch", "run_triton"):
        original = getattr(torch_engine, name)

        def spy(problems, *args, original=original, **kwargs):
            seen.append(problems.x.dtype)
            return original(problems, *args, **kwargs)

        monkeypatch.setattr(torch_engine, name, spy)
    x = rng.standard_normal((30, 5)).astype(np.float32)
    wide = graphcut_bins(x, bins=3, backend=backend, device=_device(), precision="float64")
    narrow = graphcut_bins(x.astype(np.float64), bins=3, backend=backend, device=_device(), precision="float32")
    assert seen == [torch.float64, torch.float32]
    assert (wide.meta["precision"], narrow.meta["precision"]) == ("float64", "float32")
    np.testing.assert_array_equal(wide.order, graphcut_bins(x.astype(np.float64), bins=3, backend="reference").order)


def test_torch_products_ignore_and_keep_the_global_tf32_setting(rng):
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        with torch_engine.matmul_precision("tf32x3"):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
        with pytest.raises(InputError, match="'ieee' or 'tf32'"):
            with torch_engine.matmul_precision("bf16"):
                pass
    finally:
        matmul.fp32_precision = previous


def test_checksum_on_the_device_path_equals_the_cpu_engines(rng):
    x = rng.standard_normal((20, 3)).astype(np.float32)
    cpu = graphcut_bins(x, bins=2)
    from_numpy = graphcut_bins(x, bins=2, backend="torch")
    from_tensor = graphcut_bins(torch.from_numpy(x), bins=2, backend="torch")
    assert cpu.meta["checksum"] == from_numpy.meta["checksum"] == from_tensor.meta["checksum"]
    assert cpu.meta["checksum"] == features_checksum([x])
    half = torch.from_numpy(x).to(torch.bfloat16)
    assert graphcut_bins(half, bins=2, backend="torch").meta["checksum"] == graphcut_bins(half, bins=2).meta["checksum"]


def test_engine_self_check_and_assembly(rng):
    offsets = np.array([0, 3, 8])
    good = torch.tensor([2, 0, 1, 4, 3, 0, 1, 2])
    torch_engine.check_local_order(good, offsets, "torch")
    for bad in ([2, 0, 0, 4, 3, 0, 1, 2], [2, 0, 1, 5, 3, 0, 1, 2], [-1, 0, 1, 4, 3, 0, 1, 2]):
        with pytest.raises(EngineError, match="torch engine"):
            torch_engine.check_local_order(torch.tensor(bad), offsets, "torch")
    bin_sizes = np.array([[1, 0, 2], [2, 2, 1]])
    perm = torch.from_numpy(rng.permutation(8))
    order, bin_offsets = torch_engine.assemble(good, perm, offsets, bin_sizes)
    expected_order, expected_offsets = api._assemble(good.numpy(), perm.numpy(), offsets, bin_sizes)
    np.testing.assert_array_equal(order.numpy(), expected_order)
    np.testing.assert_array_equal(bin_offsets, expected_offsets)


def test_bad_device_input_is_refused_with_the_cpu_messages():
    x = torch.ones((5, 2))
    cases = [
        (dict(features=torch.ones((5, 2), dtype=torch.int32)), TypeError, "must be a floating tensor"),
        (dict(features=torch.ones(5)), ValueError, "must be a 2-D"),
        (dict(features=torch.ones((0, 2))), ValueError, "is empty"),
        (dict(features=torch.tensor([[1.0, 2.0], [float("nan"), 0.0]])), ValueError, "first at row 1"),
        (dict(features=torch.tensor([[1.0, 2.0], [0.0, 0.0]])), ValueError, "row 1 is all zeros"),
        (dict(features=x, labels=torch.zeros(4, dtype=torch.int64)), ValueError, "labels has 4 entries"),
        (dict(features=x, labels=torch.zeros(5)), TypeError, "labels must be integers"),
        (dict(features=x, labels=np.zeros((5, 1), int)), ValueError, "labels must be 1-D"),
        (dict(features=x, bins=6), ValueError, "bins=6 is more than"),
        (dict(features=x, lam=1e300), ValueError, "too large for these features"),
        (dict(features=x, threads=0), ValueError, "threads must be >= 1"),
        (dict(features=GradEmbedding(x, torch.ones((4, 2)))), ValueError, "features.delta has 5 rows"),
    ]
    for kwargs, error, words in cases:
        kwargs.setdefault("bins", 2)
        with pytest.raises(error, match=words):
            graphcut_bins(backend="torch", **kwargs)


# --------------------------------------------------------------------------- the front end


def _working(features, metric, labels=None, dtype=np.float32):
    """(device working copy, numpy working copy) of the same input, CPU tensors."""
    prepared = device_prepare.device_features(features, "cpu")
    label_tensor = None if labels is None else device_prepare.device_labels(labels, prepared.m, "cpu")
    perm, counts = device_prepare.group_by_label(label_tensor, prepared.m, "cpu")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    torch_dtype = torch.float32 if dtype == np.float32 else torch.float64
    x, embed = device_prepare.working_features(prepared, metric, perm, offsets, torch_dtype)
    host_perm = np.arange(prepared.m) if perm is None else perm.numpy()
    if isinstance(features, GradEmbedding):
        host = GradEmbedding(*(np.asarray(a.float() if isinstance(a, torch.Tensor) else a) for a in features))
    elif isinstance(features, torch.Tensor):
        host = features.float().numpy() if features.dtype == torch.bfloat16 else features.numpy()
    else:
        host = features
    x_np, embed_np = numpy_working_features(host, metric, host_perm, offsets, dtype)
    return (x, embed), (x_np, embed_np)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("source", ["float16", ">f4", "float32", "float64", "bfloat16-tensor", "float64-tensor"])
def test_front_end_matches_the_numpy_working_copy(rng, metric, source):
    values = rng.standard_normal((90, 7)) * 3.0 + 1.5
    if source == "bfloat16-tensor":
        features = torch.from_numpy(values).to(torch.bfloat16)
    elif source == "float64-tensor":
        features = torch.from_numpy(values)
    else:
        features = values.astype(source)
    labels = rng.integers(0, 4, size=90)
    for dtype in (np.float32, np.float64):
        for per_class in (None, labels):
            (x, _), (x_np, _) = _working(features, metric, per_class, dtype)
            assert x.dtype == (torch.float32 if dtype == np.float32 else torch.float64)
            tolerance = 4 * np.finfo(dtype).eps
            np.testing.assert_allclose(x.numpy(), x_np, rtol=0, atol=tolerance * np.abs(x_np).max())


@pytest.mark.parametrize("scale", [1e-40, 1e-310, 1e30, 1e300])
def test_front_end_keeps_its_digits_at_extreme_scales(rng, scale):
    values = rng.standard_normal((40, 5))
    for dtype in (np.float32, np.float64):
        features = values * scale
        if dtype == np.float32 and not 1e-44 < scale < 1e37:
            continue
        features = features.astype(dtype)
        for metric in ("cosine", "euclidean"):
            (x, _), (x_np, _) = _working(features, metric, None, np.float64)
            np.testing.assert_allclose(x.numpy(), x_np, rtol=0, atol=1e-12 * np.abs(x_np).max())


def test_front_end_sums_rows_near_the_float64_limit():
    signs = np.where(np.arange(60).reshape(30, 2) % 2, 1.0, -1.0)
    values = np.random.default_rng(3).standard_normal((30, 2)) * 1e306 + 1.5e308 * signs
    (x, _), (x_np, _) = _working(values, "euclidean", None, np.float64)
    assert np.isfinite(x.numpy()).all()
    np.testing.assert_allclose(x.numpy(), x_np, rtol=0, atol=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("k", [-90, -7, 5, 60])
def test_front_end_power_of_two_scaling_changes_no_bit(rng, metric, k):
    values = rng.standard_normal((50, 6)) + 0.25
    labels = rng.integers(0, 3, size=50)
    for dtype in (np.float32, np.float64):
        base = values.astype(dtype)
        scaled = np.ldexp(base, k).astype(dtype)
        (x, _), _ = _working(torch.from_numpy(base), metric, labels, dtype)
        (y, _), _ = _working(torch.from_numpy(scaled), metric, labels, dtype)
        assert torch.equal(x, y)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_front_end_gradient_embeddings_match_numpy(rng, metric):
    delta = rng.standard_normal((30, 4)) * 1e-3
    embed = rng.standard_normal((30, 5)) * 20.0
    labels = rng.integers(0, 2, size=30)
    for dtype in (np.float32, np.float64):
        (x, e), (x_np, e_np) = _working(GradEmbedding(delta, embed), metric, labels, dtype)
        tolerance = 4 * np.finfo(dtype).eps
        np.testing.assert_allclose(x.numpy(), x_np, rtol=tolerance, atol=tolerance * np.abs(x_np).max())
        np.testing.assert_array_equal(e.numpy(), e_np)


def test_front_end_refuses_what_the_numpy_one_refuses():
    with pytest.raises(InputError, match="gradient embedding of row 1 is zero"):
        _working(GradEmbedding(np.array([[1.0, 0.0], [0.0, 0.0]]), np.ones((2, 2))), "cosine")
    with pytest.raises(InputError, match="gradient embeddings e too large for float32"):
        _working(GradEmbedding(np.ones((2, 2)), np.full((2, 2), 1e30)), "cosine")
    with pytest.raises(InputError, match="row 1 is too small next to its e"):
        _working(GradEmbedding(np.array([[1.0, 1.0], [1e-50, 1e-50]]), np.ones((2, 2))), "euclidean")
    labels = np.array([1, 0, 1])
    with pytest.raises(InputError, match="row 2 is all zeros"):
        _working(np.array([[1.0, 1.0], [2.0, 1.0], [0.0, 0.0]]), "cosine", labels)


# --------------------------------------------------------------------------- on a GPU


def _cuda_features(m, d, dtype, generator):
    return torch.randn((m, d), device="cuda", dtype=dtype, generator=generator) + 0.3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_kernels_pass_replay_with_fresh_inputs_and_poisoned_buffers(poisoned, dtype):
    """Each kernel path at sizes where it is the one chosen, from CUDA tensors: persistent per
    class, fused Gram (50 000 samples), fused streaming (200 000 samples). The large global
    runs bin a few hundred picks (sizes=[k, rest]) so the float64 replay stays short."""
    generator = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    kind = getattr(torch, dtype)
    cases = [
        (_cuda_features(20000, 64, kind, generator), torch.randint(0, 12, (20000,), device="cuda", generator=generator), 10, "split", "triton-persistent"),
        (_cuda_features(50000, 128, kind, generator), None, 2, [400, 49600], "triton-fused"),
        (_cuda_features(200000, 64, kind, generator), None, 2, [200, 199800], "triton-fused"),
    ]
    for x, labels, bins, sizes, kernel in cases:
        form = "stream" if x.shape[0] == 200000 else "auto"
        result = graphcut_bins(x, bins=bins, labels=labels, sizes=sizes, form=form)
        assert result.backend == kernel and result.meta["checksum"] is None
        host = x.float().cpu().numpy()
        host_labels = None if labels is None else labels.cpu().numpy()
        check_binning(result, host, labels=host_labels, rtol=1e-4, expected_sizes=sizes)
        baseline = graphcut_bins(x, bins=bins, labels=labels, sizes=sizes, form=form, backend="torch")
        check_binning(baseline, host, labels=host_labels, rtol=1e-4, expected_sizes=sizes)


@pytest.mark.gpu
def test_gpu_graph_replay_equals_eager_launches(rng):
    x = torch.from_numpy(rng.standard_normal((30000, 32))).cuda()
    labels = torch.from_numpy(rng.integers(0, 3, size=30000)).cuda()
    prepared = device_prepare.device_features(x, "cuda")
    perm, counts = device_prepare.group_by_label(labels, 30000, "cuda")
    offsets = np.concatenate([[0], np.cumsum(counts)])
    from dqkernels.graphcut.sizes import bin_sizes_per_problem

    bin_sizes = bin_sizes_per_problem(counts, 4, "split")
    bin_sizes[:, :-1] = np.minimum(bin_sizes[:, :-1], 150)
    bin_sizes[:, -1] = counts - bin_sizes[:, :-1].sum(axis=1)
    working, _ = device_prepare.working_features(prepared, "cosine", perm, offsets, torch.float64)
    problems = torch_engine.Problems(working, None, offsets, bin_sizes)
    graph = torch_engine.run_triton(problems, 1.0, "stream", use_graph=True)
    eager = torch_engine.run_triton(problems, 1.0, "stream", use_graph=False)
    assert graph.kernel == eager.kernel == "triton-fused"
    assert torch.equal(graph.local_order, eager.local_order)


@pytest.mark.gpu
def test_gpu_features_never_visit_the_host(monkeypatch):
    x = torch.randn((5000, 64), device="cuda", dtype=torch.bfloat16)
    real_cpu, real_numpy = torch.Tensor.cpu, torch.Tensor.numpy

    def guarded_cpu(tensor, *args, **kwargs):
        assert tensor.numel() < x.numel() or tensor.dim() < 2, "features copied to the host"
        return real_cpu(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", guarded_cpu)
    monkeypatch.setattr(torch.Tensor, "numpy", lambda t, *a, **k: real_numpy(t, *a, **k) if t.dim() < 2 else pytest.fail("numpy() of a matrix"))
    result = graphcut_bins(x, bins=5, labels=torch.randint(0, 4, (5000,), device="cuda"))
    assert result.backend == "triton-persistent" and result.meta["dtype"] == "bfloat16"
    monkeypatch.undo()
    check_binning(result, x.float().cpu().numpy(), rtol=1e-4, expected_sizes="split")
