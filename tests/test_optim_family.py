"""RMSprop, Adagrad and Lion on the kernel layer: every CPU backend, float32
and float64, packed and plain lists.

RMSprop and Adagrad follow torch.optim's trajectories; Lion follows the
paper's Algorithm 2 (written out here in NumPy), a hand-computed first step
and keeps NaN visible. What every optimizer of the family must do besides
its math is in test_optim_family_common.py.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import fastopt

from family_helpers import (FAMILY, check_against_torch, DTYPE_IDS, DTYPES, PATHS, Side,
                            assert_close, concat_state, problem)

from conftest import BACKENDS, rng_array

RMSPROP_CONFIGS = [
    dict(lr=1e-2),
    dict(lr=1e-2, momentum=0.9),
    dict(lr=1e-2, centered=True, alpha=0.9),
    dict(lr=1e-2, centered=True, momentum=0.9, weight_decay=0.1),
    dict(lr=5e-3, momentum=0.5, maximize=True, weight_decay=0.05, eps=1e-6),
]
ADAGRAD_CONFIGS = [
    dict(lr=1e-1),
    dict(lr=1e-1, lr_decay=0.01),
    dict(lr=5e-2, initial_accumulator_value=0.3, weight_decay=0.05),
    dict(lr=5e-2, lr_decay=0.05, initial_accumulator_value=1.0, maximize=True, eps=1e-6),
    dict(lr=5e-2, initial_accumulator_value=0.5, eps=0.0),   # a sum from > 0: eps=0 is safe
]
TORCH_CONFIGS = ([("RMSprop", kw) for kw in RMSPROP_CONFIGS]
                 + [("Adagrad", kw) for kw in ADAGRAD_CONFIGS])
TORCH_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in TORCH_CONFIGS]

# one configuration per optimizer for the generic checks


# -- torch.optim trajectories ------------------------------------------------------

@functools.lru_cache(maxsize=None)
def torch_run(name, items, dtype):
    """torch's params and state after STEPS steps (computed once per config)."""
    torch = pytest.importorskip("torch")
    init, grads = problem(np.dtype(dtype).type)
    tparams = [torch.tensor(a, requires_grad=True) for a in init]
    opt = getattr(torch.optim, name)(tparams, **dict(items))
    for g in grads:
        for tp, x in zip(tparams, g):
            tp.grad = torch.from_numpy(x.copy())
        opt.step()
    params = [tp.detach().numpy().copy() for tp in tparams]
    keys = [k for k in opt.state[tparams[0]] if k != "step"]
    state = {k: np.concatenate([opt.state[tp][k].detach().numpy().ravel() for tp in tparams])
             for k in keys}
    return params, state


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", TORCH_CONFIGS, ids=TORCH_IDS)
def test_trajectory_matches_torch(name, kwargs, backend, dtype, path):
    pytest.importorskip("torch")
    want_params, want_state = torch_run(name, tuple(sorted(kwargs.items())), np.dtype(dtype))
    init, grads = problem(dtype)
    side = Side(init, path)
    opt = getattr(fastopt, name)(side.params, backend=backend, **kwargs)
    assert opt.backend == backend
    for g in grads:
        assert opt.step(side.grads(g)) is None
    check_against_torch(opt, side, (want_params, want_state), dtype)


# -- Lion: the paper's Algorithm 2 ---------------------------------------------------

def lion_paper(params, m, grads, lr, betas, weight_decay, maximize=False):
    """One step of Algorithm 2 (Chen et al. 2023), in the arrays' dtype."""
    b1, b2 = betas
    for p, mi, g in zip(params, m, grads):
        t = p.dtype.type
        g = -g if maximize else g
        c = t(b1) * mi + t(1 - b1) * g
        p[...] = p * t(1 - lr * weight_decay) - t(lr) * np.sign(c)
        mi[...] = t(b2) * mi + t(1 - b2) * g


LION_CONFIGS = [dict(lr=1e-3), dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.5),
                dict(lr=1e-3, weight_decay=0.1, maximize=True)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", LION_CONFIGS, ids=["default", "betas-wd", "maximize"])
def test_lion_matches_the_paper(kwargs, backend, dtype, path):
    init, grads = problem(dtype, steps=30)
    side = Side(init, path)
    opt = fastopt.Lion(side.params, backend=backend, **kwargs)
    ref = [a.copy() for a in init]
    m = [np.zeros_like(a) for a in init]
    hyper = dict(dict(betas=(0.9, 0.99), weight_decay=0.0), **kwargs)
    for g in grads:
        opt.step(side.grads(g))
        lion_paper(ref, m, g, **hyper)
    tol = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-14}[np.dtype(dtype)]
    for i, (p, want) in enumerate(zip(side.params, ref)):
        assert_close(p, want, tol, f"param {i}")
    assert_close(concat_state(opt, "exp_avg"), np.concatenate([x.ravel() for x in m]), tol,
                 "exp_avg")
    assert list(opt.state[0]["flat"]) == ["exp_avg"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lion_first_step_by_hand(backend):
    """m0 = 0: p1 = p0 (1 - lr wd) - lr sign(g), m1 = (1 - beta2) g; sign(0) = 0."""
    p = np.array([1.0, -2.0, 0.5, 3.0])
    g = np.array([0.5, -0.25, 0.0, 4.0])
    opt = fastopt.Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5, backend=backend)
    opt.step([g])
    # decay 1 - 0.1 * 0.5 = 0.95; the zero gradient moves the weight by decay only
    np.testing.assert_allclose(p, [0.95 - 0.1, -1.9 + 0.1, 0.475, 2.85 - 0.1],
                               rtol=1e-15, atol=0)
    np.testing.assert_allclose(opt.state[0]["flat"]["exp_avg"],
                               [0.005, -0.0025, 0.0, 0.04], rtol=1e-14, atol=0)
    assert p[2] == 0.475


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_lion_nan_gradient_stays_visible(backend, dtype):
    """sign(NaN) is NaN: a NaN gradient poisons its weight, never a zero step."""
    rng = np.random.default_rng(3)
    p = rng_array(rng, 9, dtype)
    opt = fastopt.Lion([p], lr=1e-2, weight_decay=0.1, backend=backend)
    for t in range(3):
        opt.step([rng_array(rng, 9, dtype)])
    before = p.copy()
    g = rng_array(rng, 9, dtype)
    g[4] = np.nan
    opt.step([g])
    assert np.isnan(p[4]) and np.isnan(opt.state[0]["flat"]["exp_avg"][4])
    ok = np.arange(9) != 4
    assert np.isfinite(p[ok]).all() and (p[ok] != before[ok]).all()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_lion_sign_matches_the_reference_on_every_kind_of_value(backend, dtype):
    """The compiled kernels take lr * sign(u) from u's bits (branch-free, so
    that the x86-64-v3 and portable builds vectorise it): +-0, subnormals,
    infinities and NaN as the NumPy reference has them, over enough
    elements to run the vector loop, random signs included. (To the ulp:
    the AVX2 and AVX-512 builds fuse multiply-adds, NumPy does not.)"""
    _check_lion_signs(backend, dtype)


def _check_lion_signs(backend, dtype):
    tiny = np.finfo(dtype).smallest_subnormal
    special = np.array([0.0, -0.0, tiny, -tiny, np.inf, -np.inf, np.nan, 1.0, -1.0,
                        np.finfo(dtype).max, -np.finfo(dtype).max], dtype)
    rng = np.random.default_rng(0)
    g = np.concatenate([special, rng.standard_normal(1000).astype(dtype), special])
    out = {}
    for be in ("numpy", backend):
        p = np.linspace(-1.0, 1.0, g.size).astype(dtype)
        p[:special.size] = -0.0       # -0 - (+-0): the sign of a zero step shows
        with np.errstate(all="ignore"):
            opt = fastopt.Lion([p], lr=1e-2, weight_decay=0.1, backend=be)
            opt.step([g.copy()])
        out[be] = (p, opt.state[0]["flat"]["exp_avg"])
    eps = np.finfo(dtype).eps
    for got, want in zip(out[backend], out["numpy"]):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
        np.testing.assert_allclose(got, want, rtol=8 * eps, atol=8 * eps)   # (values ~1)


@pytest.mark.skipif("cython" not in fastopt.available_backends(), reason="needs the Cython build")
@pytest.mark.parametrize("simd", ["baseline", "x86-64-v3", "x86-64-v4"])
def test_lion_sign_on_each_cython_simd_build(simd):
    """Each build of the kernels the CPU can run, not only the one it
    picks (FASTOPT_CYTHON_SIMD caps it): the sign's bit select was written
    for the portable and AVX2 builds, which the CI host (AVX-512) never loads."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path
    code = textwrap.dedent(f"""
        import sys, numpy as np
        from fastopt.backends import cython_cpu
        if cython_cpu.simd != {simd!r}:
            print("SKIP", cython_cpu.simd)
            sys.exit(0)
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_optim_family import _check_lion_signs
        for dtype in (np.float32, np.float64):
            _check_lion_signs("cython", dtype)
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, FASTOPT_CYTHON_SIMD=simd))
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(f"this CPU cannot run the {simd} build ({out.stdout.strip()})")
    assert out.stdout.strip() == "OK"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["RMSprop", "Adagrad"])
def test_nan_gradient_stays_visible(backend, name):
    p = np.linspace(-1, 1, 7, dtype=np.float32)
    opt = getattr(fastopt, name)([p], backend=backend, **FAMILY[name])
    g = np.ones(7, np.float32)
    g[2] = np.nan
    opt.step([g])
    assert np.isnan(p[2]) and np.isfinite(np.delete(p, 2)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_adagrad_initial_accumulator(backend):
    """torch's sum starts at initial_accumulator_value: after one step it is
    init + g^2 (and the step divides by its root)."""
    p = np.array([1.0, 2.0, -1.0])
    g = np.array([0.5, 0.0, -2.0])
    opt = fastopt.Adagrad([p], lr=0.1, initial_accumulator_value=0.75, backend=backend)
    opt.step([g])
    s = 0.75 + g * g
    np.testing.assert_array_equal(opt.state[0]["flat"]["sum"], s)
    np.testing.assert_allclose(p, [1.0, 2.0, -1.0] - 0.1 * g / (np.sqrt(s) + 1e-10),
                               rtol=1e-15)
    opt.step([g])                      # later steps accumulate on it
    np.testing.assert_array_equal(opt.state[0]["flat"]["sum"], s + g * g)
