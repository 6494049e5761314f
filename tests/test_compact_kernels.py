"""The compiled 8-bit state loops against the NumPy codecs, bit for bit, in
every Cython build this CPU runs (portable, x86-64-v3, x86-64-v4) and in
Numba.

The loops compute the codecs of fastopt/backends/compact.py in their own
forms (exponent bits, an integer clamp, the rounding hash split per block):
a step whose float32 math is exact in any order of operations, with or
without FMA contraction, must leave the reference's codes and absmax arrays
to the last bit, or a codec differs. Adam with betas of 1/2 and gradients of
12 significant bits is such a step: its three state buffers (AMSGrad) cover
both grids, every code from the linear range below the lowest binade to the
top, and a block per slot at a time; and again with NaN, infinities and an
overflowing square in the last step (IEEE-determined too).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import fastopt
from fastopt.backends import compact as C
from fastopt.backends import cython_cpu

from conftest import BACKENDS, assert_same_tree


def _cython_builds():
    """The Cython kernel modules this CPU runs, by name."""
    if "cython" not in BACKENDS:
        return []
    names = ["kernels"]
    names += [name for name, needs in (("kernels_v3", cython_cpu._V3),
                                       ("kernels_v4", cython_cpu._V4))
              if cython_cpu._cpu_has(*needs)]
    builds = []
    for name in names:
        try:
            importlib.import_module(f"fastopt.backends._cython.{name}")
        except ImportError:       # a build without this variant (not x86-64)
            continue
        builds.append(name)
    return builds


def exact_grads(rng, sizes, steps):
    """Gradients ``k * 2**e`` (``|k| < 2**12``, ``e`` in [-72, -12], some zero):
    their squares and halves are exact float32 values, and spread over 60
    binades they reach below each grid's lowest binade in every block."""
    def one(n):
        k = rng.integers(-(1 << 12) + 1, 1 << 12, n)
        k[rng.random(n) < 0.02] = 0
        return np.ldexp(k.astype(np.float64), rng.integers(-72, -11, n)).astype(np.float32)
    return [[one(n) for n in sizes] for _ in range(steps)]


def exact_adam(backend, grads, sizes):
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    opt = fastopt.Adam(params, lr=1e-3, betas=(0.5, 0.5), amsgrad=True, backend=backend,
                       state_dtype="int8")
    with np.errstate(over="ignore", invalid="ignore"):    # the non-finite step
        for g in grads:
            opt.step([x.copy() for x in g])
    return opt.state[0]["flat"]


SIZES = (300, 70000, 5)     # crosses blocks, a chunk and SERIAL_MAX; a short last block


def with_non_finite(grads):
    """The last step's gradients with NaN, +-inf and a value whose square
    overflows, each in a block of its own (a NaN block: absmax NaN, codes 0
    or the top code, as NumPy's codecs leave them; +-inf: their own codes)."""
    last = [g.copy() for g in grads[-1]]
    for i, v in zip((3, 300, 600, 1000), (np.nan, np.inf, -np.inf, 2.0 ** 100)):
        last[1][i] = v
    return grads[:-1] + [last]


@pytest.fixture(scope="module", params=["finite", "non-finite"])
def reference(request):
    grads = exact_grads(np.random.default_rng(4), SIZES, 3)
    if request.param == "non-finite":
        grads = with_non_finite(grads)
    return grads, exact_adam("numpy", grads, SIZES)


def test_the_exact_step_reaches_every_part_of_both_grids(reference):
    _, state = reference
    absmax = state["exp_avg_sq.absmax"]
    assert np.isfinite(absmax).sum() >= absmax.size - 4     # (non-finite: 4 blocks)
    m, v = state["exp_avg"].astype(np.int64), state["exp_avg_sq"].astype(np.int64)
    if absmax.size - np.isfinite(absmax).sum():       # the non-finite step: inf's own codes
        assert set(m[np.abs(m) > C.SIGNED_GRID[1]]) == {-C.SIGNED_INF, C.SIGNED_INF}
        assert set(v[v > C.UNSIGNED_GRID[1]]) == {C.UNSIGNED_INF}
        m, v = m[np.abs(m) != C.SIGNED_INF], v[v != C.UNSIGNED_INF]
    assert m.min() == -C.SIGNED_GRID[1] and m.max() == C.SIGNED_GRID[1]
    assert v.max() == C.UNSIGNED_GRID[1]
    # the linear codes below the lowest binade, and a positive v kept off 0
    assert np.count_nonzero((np.abs(m) > 0) & (np.abs(m) < 8)) > 100
    assert np.count_nonzero((v > 0) & (v < 8)) > 100 and np.count_nonzero(v == 1) > 10


@pytest.mark.parametrize("build", _cython_builds())
def test_every_cython_build_writes_the_reference_codes(build, reference, monkeypatch):
    grads, want = reference
    monkeypatch.setattr(cython_cpu, "_k",
                        importlib.import_module(f"fastopt.backends._cython.{build}"))
    assert_same_tree(exact_adam("cython", grads, SIZES), want, build)


@pytest.mark.skipif("numba" not in BACKENDS, reason="needs Numba")
def test_numba_writes_the_reference_codes(reference):
    grads, want = reference
    assert_same_tree(exact_adam("numba", grads, SIZES), want, "numba")
