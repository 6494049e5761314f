"""LAMB on the kernel layer: every CPU backend, float32 and float64, packed,
list and dict layouts, 16-bit params with a float32 master copy.

torch has no LAMB: the trajectories follow the paper's Algorithm 2 (You et
al. 2020), written out here in NumPy, and a hand-computed first step. The
per-tensor reduction between LAMB's two passes is checked where it can go
wrong: arrays of several pieces (more than the kernels' 16k-element piece),
serial against threaded steps (bit for bit), zero-norm tensors (trust ratio
1). What every optimizer of the family must do besides its math (fused
clipping, the non-finite skip, bad hyperparameters, checkpoints, one native
call per group, device refusal) is in test_optim_family_common.py.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import fastopt
from fastopt.backends import get_backend
from fastopt.backends.threads import ThreadChoice

from family_helpers import (DTYPE_IDS, DTYPES, STEPS, Side, assert_close, concat_state,
                            problem)

from conftest import BACKENDS, CHUNK, FAST_BACKENDS, SERIAL_MAX, assert_same_tree, rng_array


# -- the paper's Algorithm 2 ----------------------------------------------------------

def lamb_paper(params, m, v, grads, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
               weight_decay=0.0, bias_correction=True, maximize=False):
    """Step ``t`` (1-based) of Algorithm 2 of You et al. (2020), per tensor,
    with the scaling function the identity; the arrays' dtype, float64 norms."""
    b1, b2 = betas
    for p, mi, vi, g in zip(params, m, v, grads):
        dt = p.dtype.type
        g = -g if maximize else g
        mi[...] = dt(b1) * mi + dt(1 - b1) * g
        vi[...] = dt(b2) * vi + dt(1 - b2) * g * g
        m_hat = mi / dt(1 - b1 ** t) if bias_correction else mi
        v_hat = vi / dt(1 - b2 ** t) if bias_correction else vi
        r = m_hat / (np.sqrt(v_hat) + dt(eps)) + dt(weight_decay) * p
        p_norm = np.linalg.norm(p.astype(np.float64))
        r_norm = np.linalg.norm(r.astype(np.float64))
        trust = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
        p[...] = p - dt(lr * trust) * r


def run_paper(init, grads, **kwargs):
    """Params and moments after every gradient list of ``grads``."""
    params = [a.copy() for a in init]
    m = [np.zeros_like(a) for a in init]
    v = [np.zeros_like(a) for a in init]
    for t, g in enumerate(grads, 1):
        lamb_paper(params, m, v, g, t, **kwargs)
    return params, m, v


#: tolerance against the paper (relative, with an absolute floor of the same size)
PAPER_TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}

CONFIGS = [
    dict(lr=1e-2),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=5e-3, betas=(0.8, 0.99), eps=1e-8, bias_correction=False),
    dict(lr=1e-2, weight_decay=0.05, maximize=True),
]
CONFIG_IDS = ["default", "weight_decay", "no_bias_correction", "maximize"]


def check_against_paper(opt, arrays, want, dtype):
    want_params, want_m, want_v = want
    tol = PAPER_TOL[np.dtype(dtype)]
    for i, (p, w) in enumerate(zip(arrays, want_params)):
        assert p.dtype == w.dtype
        assert_close(p, w, tol, f"param {i}")
    flat = lambda xs: np.concatenate([x.ravel() for x in xs])   # noqa: E731
    assert sorted(opt.state[0]["flat"]) == ["exp_avg", "exp_avg_sq"]
    assert_close(concat_state(opt, "exp_avg"), flat(want_m), tol, "exp_avg")
    assert_close(concat_state(opt, "exp_avg_sq"), flat(want_v), tol, "exp_avg_sq")


@pytest.mark.parametrize("layout", ["packed", "list", "dict"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", CONFIGS, ids=CONFIG_IDS)
def test_matches_the_paper(kwargs, backend, dtype, layout):
    init, grads = problem(dtype)
    side = Side(init, layout)
    opt = fastopt.LAMB(side.params, backend=backend, **kwargs)
    assert opt.backend == backend
    for g in grads:
        assert opt.step(side.grads(g)) is None
    assert opt.state[0]["step"] == STEPS
    check_against_paper(opt, side.arrays, run_paper(init, grads, **kwargs), dtype)


# -- a first step by hand -------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_by_hand(backend):
    """t = 1 with bias correction: m_hat = g and v_hat = g^2, so
    r = g / (|g| + eps) + wd p; then p -= lr ||p|| / ||r|| r per tensor.
    A zero tensor has trust ratio 1 (it moves by lr r); a tensor with a zero
    gradient has r = wd p, trust ratio 1 / wd, and shrinks by (1 - lr)."""
    lr, wd, eps = 0.1, 0.5, 1e-6
    p = np.array([3.0, 4.0])                 # ||p|| = 5
    bias = np.zeros(3)
    still = np.array([1.0, -2.0, 2.0])
    g = [np.array([1.0, -2.0]), np.array([1.0, -2.0, 0.5]), np.zeros(3)]
    opt = fastopt.LAMB([p, bias, still], lr=lr, weight_decay=wd, eps=eps, backend=backend)
    opt.step(g)
    r = np.array([1.0 / (1.0 + eps) + wd * 3.0, -2.0 / (2.0 + eps) + wd * 4.0])
    want = np.array([3.0, 4.0]) - lr * 5.0 / np.sqrt(r @ r) * r
    np.testing.assert_allclose(p, want, rtol=1e-13, atol=0)
    np.testing.assert_allclose(bias, -lr * g[1] / (np.abs(g[1]) + eps), rtol=1e-13, atol=0)
    np.testing.assert_allclose(still, [0.9, -1.8, 1.8], rtol=1e-14, atol=0)
    flat = opt.state[0]["flat"]
    gs = np.concatenate(g)
    np.testing.assert_allclose(flat["exp_avg"], 0.1 * gs, rtol=1e-14, atol=0)
    np.testing.assert_allclose(flat["exp_avg_sq"], 0.001 * gs * gs, rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tensor_with_zero_gradient_stays(backend):
    """Both norms 0: trust ratio 1 and r = 0, so nothing moves (no 0/0)."""
    p, q = np.zeros(4, np.float32), np.ones(3, np.float32)
    opt = fastopt.LAMB([p, q], lr=0.1, weight_decay=0.1, backend=backend)
    for _ in range(3):
        opt.step([np.zeros(4, np.float32), np.ones(3, np.float32)])
    assert (p == 0).all() and np.isfinite(q).all() and (q != 1).all()


# -- the per-tensor reduction across pieces and threads ----------------------------------

#: arrays of several pieces (CHUNK elements each) next to small ones and a zero tensor
BIG_SHAPES = [(2 * CHUNK + 77,), (3, 5), (CHUNK,), (7,), (CHUNK + 1,)]


def big_problem(dtype, steps, seed=4):
    rng = np.random.default_rng(seed)
    init = [rng_array(rng, s, dtype) for s in BIG_SHAPES]
    init[3][:] = 0                             # a zero-initialised "bias": trust ratio 1
    grads = [[rng_array(rng, s, dtype, scale=sc) for s in BIG_SHAPES]
             for sc in rng.choice([0.1, 1.0, 10.0], steps)]
    return init, grads


@pytest.mark.parametrize("layout", ["packed", "list"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_piece_arrays_match_the_paper(backend, dtype, layout):
    """Each array's norms are summed over its pieces (several tasks, several
    threads): the trajectory is the paper's."""
    init, grads = big_problem(dtype, steps=8)
    side = Side(init, layout)
    kwargs = dict(lr=1e-2, weight_decay=0.01)
    opt = fastopt.LAMB(side.params, backend=backend, **kwargs)
    for g in grads:
        opt.step(side.grads(g))
    check_against_paper(opt, side.arrays, run_paper(init, grads, **kwargs), dtype)


@pytest.mark.parametrize("layout", ["packed", "list"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_serial_and_threaded_steps_are_bit_identical(backend, layout, monkeypatch):
    """The pieces' sums are added per array in piece order, whichever thread
    ran each piece: serial and threaded steps give the same bits (params,
    moments, the clipped norm)."""
    module = get_backend(backend)
    if module.get_num_threads() < 2:
        pytest.skip("one thread: nothing runs threaded")
    calls = []
    real = module.step
    signature = inspect.signature(real)

    def step(*args, **kw):       # positional or by keyword, as the callers pass them
        bound = signature.bind(*args, **kw)
        bound.apply_defaults()
        k = bound.arguments
        t = k["table"]
        calls.append((k["el"].phases, k["parallel"], t.ntasks > 1, t.nelem > SERIAL_MAX))
        return real(*args, **kw)
    monkeypatch.setattr(module, "step", step)
    init, grads = big_problem(np.float32, steps=4)
    results = []
    for threaded in (False, True):
        monkeypatch.setattr(ThreadChoice, "pick", lambda self, n, t, f=threaded: f)
        side = Side(init, layout)
        opt = fastopt.LAMB(side.params, lr=1e-2, weight_decay=0.01, max_grad_norm=50.0,
                           backend=backend)
        norms = [opt.step(side.grads(g)) for g in grads]
        results.append((side.arrays, opt.state[0]["flat"], norms))
    # one call per step, the second run's asking for (and big enough for) threads
    assert calls == [(2, False, True, True)] * 4 + [(2, True, True, True)] * 4
    assert_same_tree(results[0], results[1])      # arrays bit for bit


# -- 16-bit params with a float32 master copy -----------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low", ["bfloat16", "float16"])
def test_mixed_precision_is_the_float32_step_rounded(backend, low):
    """The master weights follow the float32 LAMB fed the widened gradients
    (their norms are the master's); the 16-bit params are exactly the
    rounded master."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = np.dtype(ml_dtypes.bfloat16) if low == "bfloat16" else np.dtype(np.float16)
    init, grads = big_problem(np.float32, steps=3, seed=6)
    p16 = fastopt.pack([a.astype(dtype) for a in init])
    p32 = fastopt.pack([np.asarray(a, np.float32) for a in p16])
    o16 = fastopt.LAMB(p16, lr=1e-2, weight_decay=0.01, backend=backend, max_grad_norm=50.0)
    o32 = fastopt.LAMB(p32, lr=1e-2, weight_decay=0.01, backend=backend, max_grad_norm=50.0)
    for g in grads:
        g16 = [x.astype(dtype) for x in g]
        assert o16.step(g16) == o32.step([x.astype(np.float32) for x in g16])
    master = o16.state[0]["runs"][0]["master"]
    assert p16.data.tobytes() == master.astype(dtype).tobytes()
    for name, want in [("master", p32.data), *o32.state[0]["runs"][0].items()]:
        got = o16.state[0]["runs"][0][name]
        if backend == "numpy":
            assert got.tobytes() == want.tobytes(), name
        else:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)


# -- non-finite gradients -----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_gradient_poisons_its_tensor(backend):
    """A NaN gradient makes its tensor's norm NaN, so its whole tensor NaN
    (never a silent step); the other tensors step normally."""
    rng = np.random.default_rng(3)
    ps = [rng_array(rng, 9, np.float32), rng_array(rng, 5, np.float32)]
    before = [p.copy() for p in ps]
    opt = fastopt.LAMB(ps, lr=1e-2, backend=backend)
    g = [rng_array(rng, 9, np.float32), rng_array(rng, 5, np.float32)]
    g[0][4] = np.nan
    opt.step(g)
    assert np.isnan(ps[0]).all()
    assert np.isfinite(ps[1]).all() and (ps[1] != before[1]).all()


# -- where LAMB is offered -----------------------------------------------------------------

def test_sharded_optimizer_refuses_lamb():
    """A shard holds parts of tensors, so its norms are not the tensors':
    refused with a clear error rather than stepped with wrong trust ratios."""
    pytest.importorskip("mpi4py")
    from fastopt.distributed import DistributedError, ShardedOptimizer
    with pytest.raises(DistributedError, match="does not shard LAMB"):
        ShardedOptimizer(fastopt.LAMB, [np.ones(4)], lr=1e-3)


def test_train_command_takes_lamb(tmp_path):
    """``fastopt train --optimizer lamb``: one epoch on the fake digits learns them."""
    import json

    from fastopt.cli import main
    from test_train import _fake_mnist
    data = _fake_mnist(tmp_path / "mnist", n=10000)
    out = tmp_path / "out"
    rc = main(["train", "--data-dir", str(data), "--hidden", "32", "--epochs", "1",
               "--optimizer", "lamb", "--lr", "2e-2", "--batch-size", "128", "--quiet",
               "--no-plot", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["final_val_acc"][0] > 0.8, m["final_val_acc"]
