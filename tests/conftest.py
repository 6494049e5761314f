"""Shared test configuration: hypothesis profiles, backend lists, helpers.

Hypothesis runs the CI-sized profile by default (the suite must finish in a
couple of minutes on a 2-core machine); ``HYPOTHESIS_PROFILE=thorough`` runs
many more examples locally.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import fastopt

settings.register_profile(
    "ci", max_examples=30, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=10, deadline=None)
settings.register_profile(
    "thorough", max_examples=500, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Every host-array backend that imports here (the reference "numpy" is always
#: there). The device backend ("cuda") has its own tests: tests/test_cuda*.py.
BACKENDS = [b for b in fastopt.available_backends() if b != "cuda"]
#: The compiled, threaded backends (everything but the reference).
FAST_BACKENDS = [b for b in BACKENDS if b != "numpy"]

#: Chunking constants shared by the Numba and Cython kernels.
CHUNK = 1 << 14
SERIAL_MAX = 1 << 15
#: A size that takes the parallel path and ends in a partial chunk.
LARGE = 5 * CHUNK + 123

#: Relative tolerance of one fast-backend step against the reference.
STEP_RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each available backend name (tests may also parametrize over BACKENDS)."""
    return request.param


@pytest.fixture
def restore_threads():
    """Put the thread count back after a test that changes it."""
    before = fastopt.get_num_threads()
    yield
    fastopt.set_num_threads(before)


def rng_array(rng, shape, dtype, scale=1.0):
    """Normal random values of ``dtype`` (generated in float64, then cast)."""
    return (rng.standard_normal(shape) * scale).astype(dtype)


def count_native_steps(monkeypatch, module):
    """The sizes (``table.nelem``) of ``module``'s native step calls from
    now on: its ``step``, and the one-call list steps it binds for the step
    plan (``list_step``, made after this is called)."""
    calls = []
    real_step = module.step
    monkeypatch.setattr(module, "step", lambda t, *a, **k: (calls.append(t.nelem),
                                                            real_step(t, *a, **k))[1])
    count_list_steps(monkeypatch, module, calls)
    return calls


def count_list_steps(monkeypatch, module, sizes):
    """Record each table's size into ``sizes`` whenever a list step that
    ``module.list_step`` binds from now on runs (one native call stepping
    those tables, as ``step`` would one by one)."""
    bind = getattr(module, "list_step", None)
    if bind is None:
        return

    def counted_bind(tables, buffers, nparams):
        run = bind(tables, buffers, nparams)
        return lambda grads, els, values, *rest: (sizes.extend(t.nelem for t in tables),
                                                  run(grads, els, values, *rest))[1]
    monkeypatch.setattr(module, "list_step", counted_bind)


def assert_close(actual, expected, mag, rtol, what=""):
    """``|actual - expected| <= rtol * mag`` elementwise, NaN/inf where expected.

    ``mag`` is the size of the terms that went into ``expected`` (the same
    expression evaluated on absolute values), so the bound is relative to
    the rounding error the formula can have, even where it cancels to ~0.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected),
                                  err_msg=f"{what}: NaN positions differ")
    np.testing.assert_array_equal(actual[~finite & ~np.isnan(expected)],
                                  expected[~finite & ~np.isnan(expected)],
                                  err_msg=f"{what}: inf entries differ")
    mag = np.broadcast_to(np.asarray(mag, dtype=np.float64), expected.shape)
    # A tiny absolute floor so exact zeros compare equal to exact zeros.
    bound = rtol * mag + 1e-300
    with np.errstate(invalid="ignore"):   # inf - inf where both are inf
        err = np.abs(actual - expected)
    bad = finite & ~(err <= bound)
    if bad.any():
        i = np.flatnonzero(bad.reshape(-1))[0]
        raise AssertionError(
            f"{what}: {bad.sum()} of {bad.size} elements differ beyond rtol={rtol}; "
            f"first at flat index {i}: actual={actual.reshape(-1)[i]!r} "
            f"expected={expected.reshape(-1)[i]!r} bound={bound.reshape(-1)[i]!r}")


def assert_bit_identical(a, b, what=""):
    """Same dtype, shape and bytes (so also NaN payloads and signed zeros)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert a.tobytes() == b.tobytes(), f"{what}: contents changed"


def snapshot(obj):
    """A deep copy of params / optimizer state for a later bit comparison."""
    return copy.deepcopy(obj)


def assert_same_tree(a, b, path="root"):
    """Recursively compare nested dict/list/tuple trees; arrays bit for bit."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), path
        assert_bit_identical(a, b, path)
        assert np.array_equal(a, b, equal_nan=True), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, a.keys(), b.keys())
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def optimizer_snapshot(opt, params):
    """Params (copied), optimizer state and step counts, for assert_same_tree."""
    return {"params": [np.array(p, copy=True) for p in params],
            "state": snapshot(opt.state),
            "grad_norm": opt.grad_norm}
