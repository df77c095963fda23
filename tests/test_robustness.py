"""Engines cannot be driven into wrong answers (docs/method.md §1–2): every input either raises
a clear ValueError/TypeError or gives bins that pass the float64 replay check.

Property tests draw shapes from M = 1 and d = 1, float16/32/64 in both byte orders, magnitudes
from subnormal to near overflow, duplicate and all-equal rows, λ over its range, labels with
tiny classes and explicit sizes lists, on every CPU backend and the Triton step (interpreter).
The regression tests below them are the cases that once crashed or returned wrong bins.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import dqkernels
from dqkernels.core.errors import InputError
from dqkernels.testing import check_binning

DTYPES = ("<f2", ">f2", "<f4", ">f4", "<f8", ">f8")


def _rtol(result) -> float:
    return 1e-9 if result.meta["precision"] == "float64" else 1e-4


@st.composite
def feature_cases(draw):
    m = draw(st.integers(1, 24))
    d = draw(st.integers(1, 5))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    info = np.finfo(dtype)
    # Magnitudes from the subnormal range to a margin below overflow, as a power of ten.
    low = np.log10(float(info.smallest_subnormal)) + 1
    high = np.log10(float(info.max)) - 1
    exponent = draw(st.floats(low, high))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(m, d))
    shape = draw(st.sampled_from(["random", "duplicates", "all-equal", "integers"]))
    if shape == "duplicates":
        values[rng.integers(0, m, size=m // 2)] = values[0]
    elif shape == "all-equal":
        values[:] = values[0]
    elif shape == "integers":
        values = rng.integers(-2, 3, size=(m, d)).astype(np.float64)
    with np.errstate(over="ignore", under="ignore"):
        features = (values * 10.0**exponent).astype(dtype)
    assume(np.isfinite(features).all())
    bins = draw(st.integers(1, max(1, m)))
    metric = draw(st.sampled_from(["cosine", "euclidean"]))
    lam = draw(st.sampled_from([1.0, 0.5, 2.0, 1e-8, 1e4, 3.7]))
    labels = None
    if draw(st.booleans()):
        n_classes = draw(st.integers(1, 4))
        labels = rng.integers(0, n_classes, size=m) * 7  # sparse class ids: some are absent
    return dict(features=features, bins=bins, metric=metric, lam=lam, labels=labels)


def _bin_or_refuse(case, **options):
    try:
        result = dqkernels.graphcut_bins(**case, **options)
    except (ValueError, TypeError) as error:
        assert str(error), "an error must say what is wrong"
        return None
    check_binning(result, case["features"], rtol=_rtol(result), expected_sizes=options.get("sizes", "split"))
    return result


@given(feature_cases(), st.sampled_from(["gram", "stream"]))
def test_cpu_engine_bins_any_input_correctly_or_refuses_it(case, form):
    _bin_or_refuse(case, backend="cpu", form=form)


@given(feature_cases())
def test_reference_backend_bins_any_input_correctly_or_refuses_it(case):
    _bin_or_refuse(case, backend="reference")


@given(feature_cases(), st.sampled_from(["torch", "triton"]))
def test_torch_and_triton_steps_bin_any_input_correctly_or_refuse_it(case, backend):
    pytest.importorskip("torch")
    if backend == "triton":
        pytest.importorskip("triton")
    _bin_or_refuse(case, backend=backend)


@given(feature_cases(), st.integers(-60, 60))
def test_features_scaled_by_a_power_of_two_give_the_same_bins(case, k):
    features = case["features"].astype(np.float64)
    scaled = np.ldexp(features, k)
    assume(np.isfinite(scaled).all() and (np.abs(scaled[features != 0]) >= np.finfo(np.float64).tiny).all())
    assume((np.abs(features[features != 0]) >= np.finfo(np.float64).tiny).all())
    # Within float64's normal range, away from the limit where a column sum could overflow.
    assume(np.abs(features).max() < 1e300 and np.abs(scaled).max() < 1e300)
    try:
        base = dqkernels.graphcut_bins(**{**case, "features": features})
    except ValueError:
        with pytest.raises(ValueError):
            dqkernels.graphcut_bins(**{**case, "features": scaled})
        return
    again = dqkernels.graphcut_bins(**{**case, "features": scaled})
    np.testing.assert_array_equal(base.order, again.order)


@given(
    st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=5),
    st.integers(1, 30),
)
def test_explicit_sizes_that_do_not_sum_to_m_are_refused_without_wrapping(sizes, m):
    features = np.random.default_rng(m).normal(size=(m, 3))
    if sum(sizes) == m and len(sizes) <= m:
        result = dqkernels.graphcut_bins(features, bins=len(sizes), sizes=sizes)
        assert result.bin_sizes.tolist() == sizes
        return
    with pytest.raises(ValueError):
        dqkernels.graphcut_bins(features, bins=len(sizes), sizes=sizes)


# --------------------------------------------------------------------------- regressions


def test_subnormal_float32_cosine_rows_give_correct_bins():
    x = np.random.default_rng(0).normal(size=(500, 16))
    tiny = x.astype(np.float32) * np.float32(1e-40)
    for form in ("gram", "stream"):
        result = dqkernels.graphcut_bins(tiny, bins=5, form=form)
        check_binning(result, tiny)
        np.testing.assert_array_equal(result.order, dqkernels.graphcut_bins(x.astype(np.float32), bins=5, form=form).order)


def test_reference_backend_is_right_on_subnormal_rows_too():
    x = np.random.default_rng(1).normal(size=(60, 4)).astype(np.float32) * np.float32(1e-40)
    result = dqkernels.graphcut_bins(x, bins=3, backend="reference")
    check_binning(result, x, rtol=1e-4)


def test_tiny_euclidean_float32_features_are_not_lost_to_underflow():
    x = np.random.default_rng(2).normal(size=(400, 8))
    tiny = (x * 1e-22).astype(np.float32)
    result = dqkernels.graphcut_bins(tiny, bins=4, metric="euclidean")
    report = check_binning(result, tiny)
    assert report.worst_gap <= 1e-4


def test_huge_values_are_binned_not_refused():
    x = np.random.default_rng(3).normal(size=(300, 8))
    for scale, dtype in ((1e30, np.float32), (1e300, np.float64)):
        big = (x * scale).astype(dtype)
        for metric in ("cosine", "euclidean"):
            result = dqkernels.graphcut_bins(big, bins=3, metric=metric)
            check_binning(result, big, rtol=_rtol(result))


def test_check_binning_handles_subnormal_float64_rows():
    x = np.random.default_rng(4).normal(size=(50, 3)) * 1e-310
    result = dqkernels.graphcut_bins(x, bins=3)
    report = check_binning(result, x, rtol=1e-9)
    assert np.isfinite(report.worst_gap)


def test_absurd_lam_is_refused_before_the_engine_runs():
    x = np.random.default_rng(5).normal(size=(100, 4))
    with pytest.raises(InputError, match="lam"):
        dqkernels.graphcut_bins(x, bins=3, lam=1e307, form="gram")


@pytest.mark.parametrize("lam", [np.float32(0.5), np.float64(1.5), np.int64(1), 2])
def test_numpy_scalars_are_accepted_for_lam(lam):
    x = np.random.default_rng(6).normal(size=(40, 3))
    assert dqkernels.graphcut_bins(x, bins=3, lam=lam).meta["lam"] == float(lam)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(lam=10**400), ValueError, "lam"),
        (dict(lam="1"), TypeError, "lam"),
        (dict(lam=True), TypeError, "lam"),
        (dict(memory_budget=-1), ValueError, "memory_budget"),
        (dict(memory_budget="big"), TypeError, "memory_budget"),
        (dict(threads=2**31), ValueError, "threads"),
        (dict(sizes=[2**62, 2**62, 2**62, 2**62 + 60], bins=4), ValueError, "sizes"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, words):
    x = np.random.default_rng(7).normal(size=(60, 3))
    kwargs.setdefault("bins", 3)
    with pytest.raises(error, match=words):
        dqkernels.graphcut_bins(x, **kwargs)


def test_big_endian_float32_keeps_float32_precision_and_the_same_bins():
    x = np.random.default_rng(8).normal(size=(200, 8)).astype(np.float32)
    native = dqkernels.graphcut_bins(x, bins=4)
    swapped = dqkernels.graphcut_bins(x.astype(">f4"), bins=4)
    assert swapped.meta["precision"] == "float32"
    np.testing.assert_array_equal(native.order, swapped.order)


def test_engine_output_that_is_not_a_partition_raises_naming_the_engine():
    from dqkernels.core.errors import EngineError
    from dqkernels.graphcut.api import check_engine_order

    offsets = np.array([0, 3, 5])
    check_engine_order(np.array([2, 0, 1, 1, 0]), offsets, "cpu")
    for bad in ([0, 0, 1, 1, 0], [-1, 0, 1, 1, 0], [0, 1, 3, 1, 0]):
        with pytest.raises(EngineError, match="cpu engine"):
            check_engine_order(np.array(bad), offsets, "cpu")


def test_native_engine_marks_nan_scores_instead_of_indexing_out_of_bounds():
    from dqkernels.graphcut import _C

    x = np.random.default_rng(9).normal(size=(200, 8)).astype(np.float32)
    x[5] = np.nan
    for use_gram in (True, False):
        order = _C.graphcut_cpu(x, None, np.array([0, 200]), np.array([[50, 50, 50, 50]]), 1.0, np.array([use_gram]), 0)
        assert (order == -1).all()


CRASH_CASES = {
    "subnormal-cosine": "x = rng.normal(size=(1000, 16)).astype(np.float32) * np.float32(1e-40)\n"
    "r = dqkernels.graphcut_bins(x, bins=5)\ncheck_binning(r, x)",
    "huge-lam-gram": "x = rng.normal(size=(300, 16))\n"
    "try:\n    dqkernels.graphcut_bins(x, bins=5, lam=1e307, form='gram')\n"
    "except ValueError:\n    pass\nelse:\n    raise SystemExit('accepted')",
    "nan-native": "from dqkernels.graphcut import _C\nx = rng.normal(size=(5000, 4))\nx[7] = np.nan\n"
    "o = _C.graphcut_cpu(x, None, np.array([0, 5000]), np.array([[1000] * 5]), 1.0, np.array([False]), 0)\n"
    "assert (o == -1).all()",
}


@pytest.mark.parametrize("name", sorted(CRASH_CASES))
def test_former_crashes_exit_cleanly_in_a_subprocess(name):
    program = "import numpy as np, dqkernels\nfrom dqkernels.testing import check_binning\n"
    program += "rng = np.random.default_rng(0)\n" + CRASH_CASES[name]
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(program)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_replay_of_exact_ties_is_not_failed_by_its_own_rounding():
    # d = 1 cosine: every row becomes ±1, so whole pools tie exactly and max|C2| is zero; the
    # replay's float64 noise (one row normalises to 1 − 2⁻⁵³) used to be read as a wrong pick.
    features = np.array(
        [-0.397, -0.868, 2.152, -0.397, -0.397, 0.3064, -0.4573, -0.12067, -1.092, -1.969, -0.397, -0.397, -1.182],
        dtype=np.float16,
    )[:, None]
    for backend in ("cpu", "reference"):
        check_binning(dqkernels.graphcut_bins(features, bins=2, lam=0.5, backend=backend), features)
    features = np.array(
        [0.993, 0.993, 0.721, 1.838, 0.5615, 0.1299, 0.993, 0.993, 0.536, 0.993, 0.3557, 0.2537, 0.993, 0.1895, 0.993],
        dtype=np.float16,
    )[:, None]
    labels = np.array([0, 0, 7, 7, 7, 7, 0, 7, 0, 0, 7, 0, 7, 7, 7])
    check_binning(dqkernels.graphcut_bins(features, bins=2, labels=labels, form="gram"), features)


def test_replay_still_catches_a_wrong_pick_among_near_ties():
    x = np.random.default_rng(10).normal(size=(80, 4))
    result = dqkernels.graphcut_bins(x, bins=4)
    swapped = result.order.copy()
    swapped[[0, 25]] = swapped[[25, 0]]  # the first pick of bin 0 replaced by a later one
    result.order[:] = swapped
    with pytest.raises(AssertionError, match="below the best"):
        check_binning(result, x)


@pytest.mark.parametrize(
    "arrays, meta, words",
    [
        (dict(order=np.arange(5.0), bin_offsets=np.array([0, 5])), {}, "integer"),
        (dict(order=np.arange(5) + 0j, bin_offsets=np.array([0, 5])), {}, "integer"),
        (dict(order=np.arange(5), bin_offsets=np.array([0, 5]), labels=np.zeros((5, 1), int)), {}, "labels"),
        (dict(order=np.arange(5), bin_offsets=np.array([0, 5])), [1], "JSON object"),
        (dict(bin_offsets=np.array([0, 5])), {}, "order"),
    ],
)
def test_bins_files_that_would_be_misread_are_refused(tmp_path, arrays, meta, words):
    import json

    path = tmp_path / "bins.npz"
    np.savez(path, meta=json.dumps(meta), **arrays)
    with pytest.raises(InputError, match=words):
        dqkernels.load_bins(path)


def test_sample_bins_rejects_what_is_not_a_binning():
    with pytest.raises(TypeError, match="result"):
        dqkernels.sample_bins(None, ratio=0.1)
