"""global_norm and clip_by_global_norm: accuracy, determinism, non-finite input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastopt
from conftest import BACKENDS, CHUNK, FAST_BACKENDS, LARGE, assert_bit_identical, rng_array
from fastopt.backends import get_backend

shape_lists = st.lists(
    st.one_of(st.integers(0, 300).map(lambda n: (n,)),
              st.tuples(st.integers(0, 12), st.integers(0, 12)),
              st.sampled_from([(CHUNK + 1,), (LARGE,)])),
    min_size=1, max_size=6)


def reference_norm(arrays):
    flat = np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in arrays])
    return float(np.linalg.norm(flat))


@pytest.mark.parametrize("backend", BACKENDS)
@given(shapes=shape_lists, dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**32 - 1), log_scale=st.integers(-10, 10),
       flat=st.booleans())
def test_global_norm_matches_float64_reference(backend, shapes, dtype, seed, log_scale,
                                               flat):
    rng = np.random.default_rng(seed)
    arrays = [rng_array(rng, s, dtype, scale=10.0 ** log_scale) for s in shapes]
    grads = fastopt.pack(arrays) if flat else arrays
    got = fastopt.global_norm(grads, backend=backend)
    assert isinstance(got, float)
    assert got == pytest.approx(reference_norm(arrays), rel=1e-12, abs=0.0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_global_norm_independent_of_thread_count(backend, dtype, restore_threads):
    """Fixed chunks summed in a fixed order: bit-identical for 1 and 2 threads."""
    rng = np.random.default_rng(11)
    # Wide dynamic range, so that any change of summation order shows.
    x = (rng.standard_normal(1_000_003) * np.exp(rng.uniform(-12, 12, 1_000_003))).astype(dtype)
    grads = [x[:400_000], x[400_000:], np.ones(7, dtype)]
    results = {}
    for n in (1, 2, 1, 2):
        fastopt.set_num_threads(n)
        assert fastopt.get_num_threads() == n
        assert get_backend(backend).get_num_threads() == n
        results.setdefault(n, []).append(fastopt.global_norm(grads, backend=backend))
        results.setdefault(f"sumsq{n}", []).append(get_backend(backend).sumsq(x))
    assert len(set(results[1] + results[2])) == 1, results
    assert len(set(results["sumsq1"] + results["sumsq2"])) == 1, results
    assert results[1][0] == pytest.approx(reference_norm(grads), rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [10, LARGE])
def test_global_norm_non_finite(backend, dtype, n):
    rng = np.random.default_rng(0)
    arrays = [rng_array(rng, n, dtype), rng_array(rng, (3, 4), dtype)]
    assert math.isfinite(fastopt.global_norm(arrays, backend=backend))
    for where, value, check in [(0, np.nan, math.isnan), (1, np.inf, math.isinf),
                                (0, -np.inf, math.isinf)]:
        bad = [a.copy() for a in arrays]
        bad[where].reshape(-1)[-1] = value
        assert check(fastopt.global_norm(bad, backend=backend))
        assert check(fastopt.global_norm(fastopt.pack(bad), backend=backend))
    bad = [a.copy() for a in arrays]
    bad[0].reshape(-1)[0] = np.inf
    bad[1][2, 3] = np.nan
    assert math.isnan(fastopt.global_norm(bad, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("n", [20, LARGE])
def test_clip_by_global_norm_scales_in_place(backend, dtype, flat, n):
    rng = np.random.default_rng(n)
    arrays = [rng_array(rng, n, dtype), rng_array(rng, (5, 3), dtype)]
    grads = fastopt.pack(arrays) if flat else [a.copy() for a in arrays]
    views = list(grads)
    norm_before = reference_norm(arrays)
    same_sum = fastopt.global_norm(grads, backend=backend)   # same layout, same order
    max_norm = norm_before / 3
    norm = fastopt.clip_by_global_norm(grads, max_norm, backend=backend)
    # Returns the norm before clipping ...
    assert norm == pytest.approx(norm_before, rel=1e-12)
    assert norm == same_sum
    # ... and multiplies, in place, by torch's min(1, max_norm / (norm + 1e-6)).
    coef = dtype(max_norm / (norm + 1e-6))
    for i, (g, a) in enumerate(zip(grads, arrays)):
        assert g is views[i]
        assert_bit_identical(g, a * coef, f"grads[{i}]")
    assert reference_norm(grads) == pytest.approx(max_norm, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", [False, True])
def test_no_clipping_under_max_norm(backend, flat):
    rng = np.random.default_rng(2)
    arrays = [rng_array(rng, 50, np.float32), rng_array(rng, (4, 4), np.float32)]
    grads = fastopt.pack(arrays) if flat else [a.copy() for a in arrays]
    norm = fastopt.global_norm(arrays)
    for max_norm in (norm * 1.01, norm + 1e-6, 1e9):
        assert fastopt.clip_by_global_norm(grads, max_norm, backend=backend) == pytest.approx(
            norm, rel=1e-12)
        for g, a in zip(grads, arrays):
            assert_bit_identical(g, a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_nan_gradient_poisons_everything(backend):
    """torch semantics: a NaN norm gives a NaN coefficient, not a skipped clip."""
    grads = [np.ones(10), np.ones((2, 3))]
    grads[1][1, 1] = np.nan
    norm = fastopt.clip_by_global_norm(grads, 1.0, backend=backend)
    assert math.isnan(norm)
    assert all(np.isnan(g).all() for g in grads)


def test_clip_zero_gradients():
    grads = [np.zeros(5, np.float32), np.zeros(0, np.float32)]
    assert fastopt.clip_by_global_norm(grads, 1.0) == 0.0
    assert fastopt.global_norm([np.zeros(0)]) == 0.0
    assert not grads[0].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_by_name_are_clipped_as_the_list_of_their_arrays(backend):
    """The README's dict grads work with the clipping functions too (nested
    dicts read in key order, as an optimizer reads them)."""
    rng = np.random.default_rng(3)
    named = {"W1": rng.standard_normal((4, 3)), "head": {"W": rng.standard_normal(5),
                                                         "b": rng.standard_normal(2)}}
    arrays = [named["W1"].copy(), named["head"]["W"].copy(), named["head"]["b"].copy()]
    assert fastopt.global_norm(named, backend=backend) == fastopt.global_norm(arrays,
                                                                              backend=backend)
    norm = fastopt.clip_by_global_norm(named, 0.5, backend=backend)
    assert norm == fastopt.clip_by_global_norm(arrays, 0.5, backend=backend)
    for a, b in zip([named["W1"], named["head"]["W"], named["head"]["b"]], arrays):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_norm_reads_16_bit_gradients(backend):
    """The optimizers step float16/bfloat16 gradients; global_norm read them
    as a TypeError. It reads them as float32 (exact); clip_by_global_norm,
    which scales in place, refuses them with the way to clip them."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(3)
    grads = {"a": rng.standard_normal(300).astype(np.float16),
             "b": rng.standard_normal((7, 5)).astype(ml_dtypes.bfloat16)}
    want = reference_norm([g.astype(np.float32) for g in grads.values()])
    assert fastopt.global_norm(grads, backend=backend) == pytest.approx(want, rel=1e-12)
    with pytest.raises(TypeError, match=r"grads\['a'\] is float16: .*max_grad_norm="):
        fastopt.clip_by_global_norm(grads, 1.0, backend=backend)


def test_grads_by_name_are_named_by_their_keys():
    """As an optimizer names them (they were named by position)."""
    bad = {"W": np.ones(3), "b": {"x": np.ones(2, np.int64)}}
    with pytest.raises(TypeError, match=r"grads\['b'\]\['x'\] must be float32"):
        fastopt.global_norm(bad)
    with pytest.raises(TypeError, match=r"grads\['b'\]\['x'\] must be float32"):
        fastopt.clip_by_global_norm(bad, 1.0)
    w = np.ones(4)
    with pytest.raises(ValueError, match=r"grads\['a'\].*grads\['b'\]|grads\['b'\].*grads\['a'\]"):
        fastopt.clip_by_global_norm({"a": w, "b": w}, 1.0)


def test_grads_of_several_optimizers_are_clipped_together():
    """One optimizer per layer: clip_by_global_norm([[gW1, gb1], [gW2, gb2]])
    was refused (grads[0] must be an ndarray); their one global norm now."""
    layers = [[np.full(3, 2.0), np.full(2, 1.0)], (np.full(4, 1.0),)]
    flat = [g.copy() for layer in layers for g in layer]
    assert fastopt.global_norm(layers) == fastopt.global_norm(flat) == math.sqrt(18.0)
    norm = fastopt.clip_by_global_norm(layers, 1.0)
    fastopt.clip_by_global_norm(flat, 1.0)
    assert norm == math.sqrt(18.0)
    for a, b in zip([g for layer in layers for g in layer], flat):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match=r"grads\[1\]\[0\] must be float32"):
        fastopt.global_norm([[np.ones(3)], [np.ones(2, np.int64)]])
    # packed or named per-optimizer grads too
    packed, named = fastopt.pack([np.full(3, 2.0)]), {"W": np.full(2, 1.0), "b": {"x": np.ones(4)}}
    assert fastopt.global_norm([packed, named]) == math.sqrt(18.0)
    fastopt.clip_by_global_norm([packed, named], 1.0)
    assert fastopt.global_norm([packed, named]) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(TypeError, match=r"grads\[1\]\['b'\]\['x'\] must be float32"):
        fastopt.global_norm([packed, {"W": np.ones(2), "b": {"x": np.ones(2, np.int64)}}])
