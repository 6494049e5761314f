"""Every backend's four functions against the NumPy reference.

The backend interface (``fastopt/backends/__init__.py``): ``adam_update``,
``sgd_update``, ``sumsq`` and ``scale`` over 1-D contiguous arrays, updated
in place, with per-step scalars from :mod:`fastopt.backends.scalars`.

Tolerances are relative to the size of the terms that went into each
result (see ``adam_magnitudes``): float64 to 1e-12, float32 to 1e-5.
"""

from __future__ import annotations

import math
import platform
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import (BACKENDS, CHUNK, FAST_BACKENDS, LARGE, SERIAL_MAX, STEP_RTOL,
                      assert_bit_identical, assert_close, rng_array)
from fastopt.backends import get_backend, reference
from fastopt.backends.scalars import adam_scalars, sgd_scalars

# Mostly small sizes (the serial kernels, including empty arrays), sometimes
# one that spans several parallel chunks and ends in a partial one.
sizes = st.one_of(st.integers(0, 200), st.integers(0, 200), st.integers(0, 200),
                  st.sampled_from([CHUNK, SERIAL_MAX, SERIAL_MAX + 1, LARGE]))
dtypes = st.sampled_from([np.float32, np.float64]).map(np.dtype)
seeds = st.integers(0, 2**32 - 1)
unit = st.floats(0.0, 1.0, allow_nan=False)
lrs = st.one_of(st.just(0.0), st.floats(1e-5, 1.0))
weight_decays = st.one_of(st.just(0.0), st.floats(1e-4, 0.5))
grad_scales = st.one_of(st.just(1.0), st.floats(1e-3, 2.0))


# -- Adam ----------------------------------------------------------------------

def adam_inputs(rng, n, dtype, amsgrad):
    p = rng_array(rng, n, dtype)
    g = rng_array(rng, n, dtype, scale=rng.choice([1e-3, 1.0, 1e2]))
    m = rng_array(rng, n, dtype, scale=0.1)
    v = np.abs(rng_array(rng, n, dtype, scale=0.05))
    vmax = np.abs(rng_array(rng, n, dtype, scale=0.05)) if amsgrad else None
    return p, g, m, v, vmax


def adam_magnitudes(p, g, m, v, vmax, s, m_new, vhat_new):
    """Size of the terms behind each Adam output, in float64.

    Additions that can cancel (the L2 term, the momentum update, the final
    ``p * decay - update``) are bounded by the sum of absolute values of
    their terms; the error of the denominator's square root is bounded by
    the size of the effective gradient that went into ``v``.
    """
    p, g, m, v = (np.asarray(x, np.float64) for x in (p, g, m, v))
    g_mag = np.abs(g * s.grad_scale) + (s.l2 * np.abs(p) if s.use_l2 else 0.0)
    m_mag = s.beta1 * np.abs(m) + s.one_minus_beta1 * g_mag
    v_mag = s.beta2 * v + s.one_minus_beta2 * g_mag * g_mag
    vhat = np.asarray(vhat_new, np.float64)
    denom = np.sqrt(vhat) / s.bc2_sqrt + s.eps
    denom_mag = (np.sqrt(vhat) + math.sqrt(s.one_minus_beta2) * g_mag) / s.bc2_sqrt + s.eps
    m_abs = np.abs(np.asarray(m_new, np.float64))
    upd_mag = s.step_size * (m_mag + m_abs * denom_mag / denom) / denom
    p_mag = np.abs(p * s.decay) + upd_mag
    vmax_mag = v_mag if vmax is None else np.maximum(np.asarray(vmax, np.float64), v_mag)
    return p_mag, m_mag, v_mag, vmax_mag


def run_adam(backend, p, g, m, v, vmax, s):
    """Copies of the inputs stepped by ``backend``; ``g`` must stay untouched."""
    p, m, v = p.copy(), m.copy(), v.copy()
    vmax = None if vmax is None else vmax.copy()
    g_before = g.copy()
    get_backend(backend).adam_update(p, g, m, v, vmax, s)
    assert_bit_identical(g, g_before, "gradient")
    return p, m, v, vmax


def check_adam(backend, p, g, m, v, vmax, s):
    dtype = p.dtype
    rtol = STEP_RTOL[dtype]
    want = run_adam("numpy", p, g, m, v, vmax, s)
    got = run_adam(backend, p, g, m, v, vmax, s)
    for x in got:
        assert x is None or (x.dtype == dtype and x.shape == p.shape)
    vhat = want[3] if vmax is not None else want[2]
    p_mag, m_mag, v_mag, vmax_mag = adam_magnitudes(p, g, m, v, vmax, s, want[1], vhat)
    assert_close(got[1], want[1], m_mag, rtol, "exp_avg")
    assert_close(got[2], want[2], v_mag, rtol, "exp_avg_sq")
    if vmax is not None:
        assert_close(got[3], want[3], vmax_mag, rtol, "max_exp_avg_sq")
    assert_close(got[0], want[0], p_mag, rtol, "param")


@pytest.mark.parametrize("backend", BACKENDS)
@given(n=sizes, dtype=dtypes, seed=seeds, lr=lrs, beta1=st.floats(0.0, 0.999),
       beta2=st.floats(0.0, 0.9999), eps=st.floats(1e-10, 1e-2),
       weight_decay=weight_decays, decoupled=st.booleans(), amsgrad=st.booleans(),
       maximize=st.booleans(), grad_scale=grad_scales, step=st.integers(1, 10_000))
def test_adam_update_matches_reference(backend, n, dtype, seed, lr, beta1, beta2, eps,
                                       weight_decay, decoupled, amsgrad, maximize,
                                       grad_scale, step):
    rng = np.random.default_rng(seed)
    p, g, m, v, vmax = adam_inputs(rng, n, dtype, amsgrad)
    s = adam_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                     decoupled=decoupled, step=step, grad_scale=grad_scale,
                     maximize=maximize)
    check_adam(backend, p, g, m, v, vmax, s)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [SERIAL_MAX, SERIAL_MAX + 1, LARGE])
@pytest.mark.parametrize("decoupled,amsgrad,maximize", [
    (False, False, False), (True, True, False), (False, True, True)])
def test_adam_update_parallel_path(backend, dtype, n, decoupled, amsgrad, maximize):
    """Sizes around SERIAL_MAX and several chunks: the prange drivers."""
    rng = np.random.default_rng(n + 7 * amsgrad)
    p, g, m, v, vmax = adam_inputs(rng, n, np.dtype(dtype), amsgrad)
    s = adam_scalars(lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05,
                     decoupled=decoupled, step=5, grad_scale=0.7, maximize=maximize)
    check_adam(backend, p, g, m, v, vmax, s)


def test_adam_reference_is_torch_formula():
    """The reference itself against the textbook equations, in float64."""
    rng = np.random.default_rng(0)
    p, g, m, v, vmax = adam_inputs(rng, 50, np.dtype(np.float64), amsgrad=True)
    lr, b1, b2, eps, wd, t = 1e-2, 0.8, 0.95, 1e-6, 0.1, 3
    s = adam_scalars(lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                     decoupled=False, step=t, maximize=True, grad_scale=0.5)
    got = run_adam("numpy", p, g, m, v, vmax, s)
    gg = -0.5 * g + wd * p
    m1 = b1 * m + (1 - b1) * gg
    v1 = b2 * v + (1 - b2) * gg ** 2
    vm1 = np.maximum(vmax, v1)
    p1 = p - lr / (1 - b1 ** t) * m1 / (np.sqrt(vm1) / np.sqrt(1 - b2 ** t) + eps)
    for x, y in zip(got, (p1, m1, v1, vm1)):
        np.testing.assert_allclose(x, y, rtol=1e-13, atol=1e-15)
    # AdamW: decay the parameter, no L2 term in the gradient.
    s = adam_scalars(lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                     decoupled=True, step=t)
    got = run_adam("numpy", p, g, m, v, None, s)
    m1 = b1 * m + (1 - b1) * g
    v1 = b2 * v + (1 - b2) * g ** 2
    p1 = p * (1 - lr * wd) - lr / (1 - b1 ** t) * m1 / (np.sqrt(v1) / np.sqrt(1 - b2 ** t)
                                                        + eps)
    np.testing.assert_allclose(got[0], p1, rtol=1e-13, atol=1e-15)


# -- SGD -----------------------------------------------------------------------

def sgd_magnitudes(p, g, buf, s):
    p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
    g_mag = np.abs(g * s.grad_scale) + (s.l2 * np.abs(p) if s.use_l2 else 0.0)
    if buf is None:
        return np.abs(p) + s.lr * g_mag, None
    buf_mag = s.buf_decay * np.abs(np.asarray(buf, np.float64)) + abs(s.grad_coef) * g_mag
    d_mag = g_mag + s.momentum * buf_mag if s.nesterov else buf_mag
    return np.abs(p) + s.lr * d_mag, buf_mag


def run_sgd(backend, p, g, buf, s):
    p = p.copy()
    buf = None if buf is None else buf.copy()
    g_before = g.copy()
    get_backend(backend).sgd_update(p, g, buf, s)
    assert_bit_identical(g, g_before, "gradient")
    return p, buf


def check_sgd(backend, p, g, buf, s):
    rtol = STEP_RTOL[p.dtype]
    want = run_sgd("numpy", p, g, buf, s)
    got = run_sgd(backend, p, g, buf, s)
    p_mag, buf_mag = sgd_magnitudes(p, g, buf, s)
    if buf is not None:
        assert_close(got[1], want[1], buf_mag, rtol, "momentum_buffer")
    else:
        assert got[1] is None
    assert_close(got[0], want[0], p_mag, rtol, "param")


@st.composite
def sgd_hypers(draw):
    momentum = draw(st.one_of(st.just(0.0), st.floats(0.01, 0.99)))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov else draw(st.one_of(st.just(0.0), unit))
    return dict(lr=draw(lrs), momentum=momentum, dampening=dampening, nesterov=nesterov,
                weight_decay=draw(weight_decays), first_step=draw(st.booleans()),
                grad_scale=draw(grad_scales), maximize=draw(st.booleans()))


@pytest.mark.parametrize("backend", BACKENDS)
@given(n=sizes, dtype=dtypes, seed=seeds, hypers=sgd_hypers())
def test_sgd_update_matches_reference(backend, n, dtype, seed, hypers):
    rng = np.random.default_rng(seed)
    p = rng_array(rng, n, dtype)
    g = rng_array(rng, n, dtype, scale=rng.choice([1e-3, 1.0, 1e2]))
    buf = rng_array(rng, n, dtype, scale=0.5) if hypers["momentum"] else None
    check_sgd(backend, p, g, buf, sgd_scalars(**hypers))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [SERIAL_MAX, SERIAL_MAX + 1, LARGE])
@pytest.mark.parametrize("momentum,nesterov,first_step", [
    (0.0, False, False), (0.9, False, True), (0.9, True, False)])
def test_sgd_update_parallel_path(backend, dtype, n, momentum, nesterov, first_step):
    rng = np.random.default_rng(n)
    p = rng_array(rng, n, dtype)
    g = rng_array(rng, n, dtype)
    buf = rng_array(rng, n, dtype) if momentum else None
    s = sgd_scalars(lr=0.05, momentum=momentum, dampening=0.0, nesterov=nesterov,
                    weight_decay=0.01, first_step=first_step, grad_scale=0.9,
                    maximize=False)
    check_sgd(backend, p, g, buf, s)


def test_sgd_first_step_sets_buffer_to_gradient():
    """torch's ``buf = g`` on the first momentum step, from a zero buffer."""
    rng = np.random.default_rng(1)
    p, g = rng_array(rng, 30, np.float64), rng_array(rng, 30, np.float64)
    for backend in BACKENDS:
        s = sgd_scalars(lr=0.1, momentum=0.9, dampening=0.3, nesterov=False,
                        weight_decay=0.0, first_step=True)
        p1, buf = run_sgd(backend, p, g, np.zeros_like(p), s)
        np.testing.assert_array_equal(buf, g)
        np.testing.assert_allclose(p1, p - 0.1 * g, rtol=1e-15)


# -- sumsq and scale ---------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@given(n=sizes, dtype=dtypes, seed=seeds, log_scale=st.integers(-8, 8))
def test_sumsq_matches_float64_reference(backend, n, dtype, seed, log_scale):
    x = rng_array(np.random.default_rng(seed), n, dtype, scale=10.0 ** log_scale)
    x64 = x.astype(np.float64)
    want = float(np.dot(x64, x64))
    got = get_backend(backend).sumsq(x)
    assert isinstance(got, float)
    # Accumulated in float64 whatever the dtype: a float32 accumulator
    # would miss 1e-12 by orders of magnitude.
    assert got == pytest.approx(want, rel=1e-12, abs=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@given(n=sizes, dtype=dtypes, seed=seeds, c=st.floats(-4.0, 4.0))
def test_scale_matches_reference_exactly(backend, n, dtype, seed, c):
    x = rng_array(np.random.default_rng(seed), n, dtype)
    want = x.copy()
    reference.scale(want, c)
    np.testing.assert_array_equal(want, x * dtype.type(c))
    got = x.copy()
    assert get_backend(backend).scale(got, c) is None
    # One multiplication in the array's dtype: exactly the reference.
    assert_bit_identical(got, want, "scaled")


def test_readonly_gradient_is_accepted(backend):
    """Gradients are only read: a read-only array must work (and stay as is)."""
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        p, g, m, v, _ = adam_inputs(rng, 64, np.dtype(dtype), amsgrad=False)
        g.flags.writeable = False
        s = adam_scalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                         decoupled=True, step=1)
        check_adam(backend, p, g, m, v, None, s)
        check_sgd(backend, p, g, None,
                  sgd_scalars(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False,
                              weight_decay=0.0, first_step=False))
        assert get_backend(backend).sumsq(g) == pytest.approx(
            float(np.sum(g.astype(np.float64) ** 2)), rel=1e-12)


# -- non-finite values ---------------------------------------------------------------

def poisoned_gradient(rng, n, dtype):
    """A gradient with NaN and inf spread over the chunks (first, middle, last)."""
    g = rng_array(rng, n, dtype)
    nan_at = sorted({0, n // 2, n - 1})
    inf_at = [i + 1 for i in nan_at if i + 1 < n and i + 1 not in nan_at][:1]
    g[nan_at] = np.nan
    g[inf_at] = -np.inf
    return g, nan_at, inf_at


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [40, LARGE])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_nan_gradient_reaches_adam_params_and_state(backend, dtype, n, amsgrad):
    rng = np.random.default_rng(n)
    p, _, m, v, vmax = adam_inputs(rng, n, np.dtype(dtype), amsgrad)
    g, nan_at, inf_at = poisoned_gradient(rng, n, dtype)
    s = adam_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                     decoupled=True, step=2)
    with np.errstate(invalid="ignore"):
        got_p, got_m, got_v, got_vmax = run_adam(backend, p, g, m, v, vmax, s)
    bad = np.zeros(n, bool)
    bad[nan_at + inf_at] = True
    # NaN is not hidden: every poisoned element's parameter is NaN (inf/inf
    # for the inf gradient), in every chunk, and the state is poisoned too.
    assert np.isnan(got_p[bad]).all()
    assert np.isfinite(got_p[~bad]).all()
    assert np.isnan(got_m[nan_at]).all() and np.isnan(got_v[nan_at]).all()
    assert np.isinf(got_m[inf_at]).all() and np.isposinf(got_v[inf_at]).all()
    if amsgrad:
        assert np.isnan(got_vmax[nan_at]).all(), "amsgrad state hides a NaN gradient"
        assert np.isposinf(got_vmax[inf_at]).all()
    with np.errstate(invalid="ignore"):
        check_adam(backend, p, g, m, v, vmax, s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_in_amsgrad_state_propagates(backend, dtype):
    """A NaN already in ``max_exp_avg_sq`` stays NaN and poisons the step,
    as with the reference's (and torch's) ``maximum``."""
    rng = np.random.default_rng(5)
    p, g, m, v, vmax = adam_inputs(rng, 40, np.dtype(dtype), amsgrad=True)
    vmax[[3, 17]] = np.nan
    s = adam_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                     decoupled=False, step=4)
    got_p, _, _, got_vmax = run_adam(backend, p, g, m, v, vmax, s)
    assert np.isnan(got_vmax[[3, 17]]).all()
    assert np.isnan(got_p[[3, 17]]).all()
    assert np.isfinite(np.delete(got_p, [3, 17])).all()
    check_adam(backend, p, g, m, v, vmax, s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [40, LARGE])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_nan_gradient_reaches_sgd_params(backend, dtype, n, momentum, nesterov):
    rng = np.random.default_rng(n)
    p = rng_array(rng, n, dtype)
    g, nan_at, inf_at = poisoned_gradient(rng, n, dtype)
    buf = rng_array(rng, n, dtype) if momentum else None
    s = sgd_scalars(lr=0.1, momentum=momentum, dampening=0.0, nesterov=nesterov,
                    weight_decay=0.0, first_step=False)
    got_p, got_buf = run_sgd(backend, p, g, buf, s)
    assert np.isnan(got_p[nan_at]).all()
    assert np.isposinf(got_p[inf_at]).all()   # p - lr * (-inf)
    assert np.isfinite(np.delete(got_p, nan_at + inf_at)).all()
    if momentum:
        assert np.isnan(got_buf[nan_at]).all()
    check_sgd(backend, p, g, buf, s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 100, CHUNK + 1, LARGE])
def test_sumsq_non_finite(backend, dtype, n):
    sumsq = get_backend(backend).sumsq
    rng = np.random.default_rng(n)
    x = rng_array(rng, n, dtype)
    assert math.isfinite(sumsq(x))
    for where in {0, n // 2, n - 1}:
        y = x.copy()
        y[where] = np.nan
        assert math.isnan(sumsq(y)), where
        y[where] = np.inf
        assert sumsq(y) == math.inf, where
        y[where] = -np.inf
        assert sumsq(y) == math.inf, where
    if n > 1:
        y = x.copy()
        y[0], y[-1] = np.inf, np.nan
        assert math.isnan(sumsq(y))
    # Overflow of the float32 square is not an inf: the sum is in float64.
    big = np.full(n, 1e30, dtype)
    assert sumsq(big) == pytest.approx(n * float(dtype(1e30)) ** 2, rel=1e-12)


def test_empty_arrays_are_a_no_op(backend):
    be = get_backend(backend)
    for dtype in (np.float32, np.float64):
        e = np.zeros(0, dtype)
        be.adam_update(e, e.copy(), e.copy(), e.copy(), e.copy(),
                       adam_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                    weight_decay=0.0, decoupled=False, step=1))
        be.sgd_update(e, e.copy(), None,
                      sgd_scalars(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False,
                                  weight_decay=0.0, first_step=False))
        be.scale(e, 2.0)
        assert be.sumsq(e) == 0.0


def test_chunk_constants_match_the_kernels():
    """The sizes used above straddle the kernels' real thresholds."""
    if "numba" in BACKENDS:
        mod = get_backend("numba")
        assert (mod.CHUNK, mod.SERIAL_MAX) == (CHUNK, SERIAL_MAX)
    assert SERIAL_MAX < LARGE and LARGE % CHUNK


def test_a_cython_build_that_predates_an_optimizer_does_not_load():
    """Its dispatch ran an op it did not know as SGD: a new optimizer (or a
    checkout updated without a rebuild) trained silently wrong."""
    pytest.importorskip("fastopt.backends.cython_cpu")
    import types

    from fastopt.backends import cython_cpu, scalars
    built = cython_cpu._k
    assert set(built.KNOWN_OPS) == {v for k, v in vars(scalars).items() if k.startswith("OP_")}
    stale = types.SimpleNamespace(__file__="kernels_v4.so",
                                  KNOWN_OPS=tuple(o for o in built.KNOWN_OPS
                                                  if o != scalars.OP_LAMB))
    with pytest.raises(ImportError, match=r"kernels_v4.so\) predate OP_LAMB of "
                                          r"fastopt.backends.scalars: rebuild"):
        cython_cpu._refuse_a_stale_build(stale)


def test_the_simd_builds_are_found_with_an_older_numpy(monkeypatch):
    """NumPy before 2.4 lists neither X86_V3/V4 nor BMI, BMI2, LZCNT, MOVBE:
    the AVX2 and AVX-512 builds were never loaded there. /proc/cpuinfo
    answers for those four; a feature NumPy checked and found absent stays
    absent."""
    pytest.importorskip("fastopt.backends.cython_cpu")
    from fastopt.backends import cython_cpu as c
    v3 = ("AVX", "AVX2", "FMA3", "F16C", "BMI", "BMI2", "LZCNT", "MOVBE")
    old = {"AVX": True, "AVX2": True, "FMA3": True, "F16C": True, "AVX512F": False}
    monkeypatch.setattr(c, "_numpy_cpu_features", lambda: old)
    monkeypatch.setattr(c, "_cpuinfo_flags", lambda: frozenset({"bmi1", "bmi2", "abm", "movbe"}))
    assert c._cpu_has(*v3) and not c._cpu_has("X86_V3")
    assert not c._cpu_has(*v3, "AVX512F")               # NumPy's own no
    monkeypatch.setattr(c, "_cpuinfo_flags", lambda: frozenset({"bmi1", "abm", "movbe"}))
    assert not c._cpu_has(*v3)                           # no BMI2


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.machine() != "x86_64",
                    reason="reads Linux's /proc/cpuinfo of an x86-64 CPU")
def test_cpuinfo_fields_as_the_loader_and_the_bench_report_read_them():
    from fastopt._cpuinfo import cpuinfo_field
    assert "sse2" in cpuinfo_field("flags").split()      # every x86-64 CPU has it
    assert cpuinfo_field("model name")                   # (the report's CPU model)
    assert cpuinfo_field("no such field") is None
