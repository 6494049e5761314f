"""RMSprop, Adagrad and Lion on the kernel layer: every CPU backend, float32
and float64, packed and plain lists.

RMSprop and Adagrad follow torch.optim's trajectories; Lion follows the
paper's Algorithm 2 (written out here in NumPy), a hand-computed first step
and keeps NaN visible. Then, for each: fused clipping and the non-finite
skip, bad hyperparameters refused with nothing written, checkpoints that
resume bit for bit, one native call per group, device params refused.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import fastopt
from fastopt.backends import get_backend
from fastopt.backends.scalars import clip_coefficient

from family_helpers import (DTYPE_IDS, DTYPES, PATHS, SHAPES, STEPS, TORCH_TOL,
                            FakeDeviceArray, Side, assert_close, concat_state,
                            problem)

from conftest import (BACKENDS, assert_bit_identical, assert_same_tree, optimizer_snapshot,
                      rng_array)

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
]
TORCH_CONFIGS = ([("RMSprop", kw) for kw in RMSPROP_CONFIGS]
                 + [("Adagrad", kw) for kw in ADAGRAD_CONFIGS])
TORCH_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in TORCH_CONFIGS]

# one configuration per optimizer for the generic checks
FAMILY = {
    "RMSprop": dict(lr=1e-2, centered=True, momentum=0.9, weight_decay=0.01),
    "Adagrad": dict(lr=5e-2, lr_decay=0.01, initial_accumulator_value=0.5),
    "Lion": dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
}
STATE = {"RMSprop": ["square_avg", "grad_avg", "momentum_buffer"], "Adagrad": ["sum"],
         "Lion": ["exp_avg"]}


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
    tol = TORCH_TOL[np.dtype(dtype)]
    for i, (p, want) in enumerate(zip(side.params, want_params)):
        assert p.dtype == want.dtype
        assert_close(p, want, tol, f"param {i}")
    # the same state buffers as torch, by torch's names
    assert sorted(opt.state[0]["flat"]) == sorted(want_state)
    for key, want in want_state.items():
        assert_close(concat_state(opt, key), want, tol, key)
    assert opt.state[0]["step"] == STEPS


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["RMSprop", "Adagrad"])
def test_nan_gradient_stays_visible(backend, name):
    p = np.linspace(-1, 1, 7, dtype=np.float32)
    opt = getattr(fastopt, name)([p], backend=backend, **FAMILY[name])
    g = np.ones(7, np.float32)
    g[2] = np.nan
    opt.step([g])
    assert np.isnan(p[2]) and np.isfinite(np.delete(p, 2)).all()


# -- fused clipping and the non-finite skip -------------------------------------------

def make(name, params, backend, **kw):
    return getattr(fastopt, name)(params, backend=backend, **FAMILY[name], **kw)


@pytest.mark.parametrize("layout", ["packed", "list", "groups"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FAMILY))
def test_fused_clipping_is_clip_then_step(name, backend, dtype, layout):
    """max_grad_norm inside the step == the gradients scaled by torch's
    clip_grad_norm_ factor (from the norm the step returns), then an
    unclipped step. Bit for bit where the compiler keeps IEEE order (the
    NumPy reference, Numba's update loops); gcc may fuse the gradient's
    scaling into a multiply-add (FMA builds of the Cython kernels), so
    there to an ulp or so. Norms fall on both sides of max_norm."""
    init, grads = problem(dtype, seed=1, steps=12, scales=(0.1, 1.0, 10.0))
    a, b = Side(init, "packed" if layout == "packed" else "list"), Side(init, "list")

    def spec(params):
        return ([{"params": list(params[:3])}, {"params": list(params[3:]), "lr": 1e-3}]
                if layout == "groups" else params)

    clipped = make(name, spec(a.params), backend, max_grad_norm=4.0)
    plain = make(name, spec(b.params), backend)
    clips = 0
    for g in grads:
        norm = clipped.step(a.grads(g))
        want = float(np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in g)))
        assert norm == pytest.approx(want, rel=1e-12)
        coef = clip_coefficient(norm, 4.0)
        clips += coef < 1.0
        plain.step([x * dtype(coef) for x in g])
    assert 0 < clips < len(grads)
    for x, y in zip(a.params, b.params):
        if backend == "cython":
            tol = 1e-5 if dtype == np.float32 else 1e-13
            assert_close(x, y, tol, "clipped")
        else:
            assert_bit_identical(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(FAMILY))
def test_nonfinite_step_is_skipped(name, backend, path):
    """A NaN/inf gradient with skip_nonfinite writes nothing (Adagrad's first
    step stays its first: the sum still starts at initial_accumulator_value),
    and the run goes on bit for bit like one that never saw it."""
    init, grads = problem(np.float32, seed=2, steps=4)
    a, b = Side(init, path), Side(init, path)
    opt = make(name, a.params, backend, skip_nonfinite=True)
    twin = make(name, b.params, backend, skip_nonfinite=True)
    for t, g in enumerate(grads):
        if t in (0, 2):      # a bad step first, and one with state
            bad = [x.copy() for x in g]
            bad[1][2] = np.inf if t else np.nan
            before = optimizer_snapshot(opt, list(a.params))
            assert not np.isfinite(opt.step(a.grads(bad)))
            after = optimizer_snapshot(opt, list(a.params))
            assert_same_tree(dict(after, grad_norm=None), dict(before, grad_norm=None))
        opt.step(a.grads(g))
        twin.step(b.grads(g))
    assert opt.skipped_steps == 2 and twin.skipped_steps == 0
    assert opt.state[0]["step"] == twin.state[0]["step"] == len(grads)
    assert_same_tree(optimizer_snapshot(opt, list(a.params)),
                     optimizer_snapshot(twin, list(b.params)))


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


# -- bad hyperparameters ------------------------------------------------------------

BAD = [
    ("RMSprop", dict(lr=-1.0), ValueError, "lr"),
    ("RMSprop", dict(alpha=-0.1), ValueError, "alpha"),
    ("RMSprop", dict(eps=-1e-8), ValueError, "eps"),
    ("RMSprop", dict(momentum=-0.9), ValueError, "momentum"),
    ("RMSprop", dict(weight_decay=float("nan")), ValueError, "weight_decay"),
    ("RMSprop", dict(centered="yes"), TypeError, "centered"),
    ("RMSprop", dict(maximize=1), TypeError, "maximize"),
    ("Adagrad", dict(lr_decay=-0.1), ValueError, "lr_decay"),
    ("Adagrad", dict(initial_accumulator_value=-1.0), ValueError, "initial_accumulator"),
    ("Adagrad", dict(eps=-1.0), ValueError, "eps"),
    ("Adagrad", dict(weight_decay="0.1"), TypeError, "weight_decay"),
    ("Lion", dict(betas=(1.0, 0.99)), ValueError, r"betas\[0\]"),
    ("Lion", dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    ("Lion", dict(betas=0.9), TypeError, "betas"),
    ("Lion", dict(lr=float("inf")), ValueError, "lr"),
    ("Lion", dict(weight_decay=-1.0), ValueError, "weight_decay"),
]


@pytest.mark.parametrize("name,kwargs,exc,match", BAD,
                         ids=[f"{n}-{next(iter(kw))}-{i}" for i, (n, kw, _, _) in
                              enumerate(BAD)])
def test_bad_hyperparameters_refused(name, kwargs, exc, match):
    p = np.ones(5, np.float32)
    with pytest.raises(exc, match=match):
        getattr(fastopt, name)([p], **kwargs)
    assert (p == 1).all()
    # the same value put in a param group between steps: refused at the step,
    # nothing written, and the run goes on like a twin's
    runs = []
    for _ in range(2):
        q = np.linspace(-1, 1, 5, dtype=np.float32)
        opt = getattr(fastopt, name)([q], backend="numpy")
        opt.step([np.ones(5, np.float32)])
        runs.append((opt, q))
    (opt, q), (twin, tq) = runs
    before = optimizer_snapshot(opt, [q])
    saved = {k: opt.param_groups[0][k] for k in kwargs}
    opt.param_groups[0].update(kwargs)
    with pytest.raises(exc, match=r"param_groups\[0\]\['" + next(iter(kwargs))):
        opt.step([np.full(5, 2, np.float32)])
    assert_same_tree(optimizer_snapshot(opt, [q]), before)
    opt.param_groups[0].update(saved)
    opt.step([np.full(5, 2, np.float32)])
    twin.step([np.full(5, 2, np.float32)])
    assert_same_tree(optimizer_snapshot(opt, [q]), optimizer_snapshot(twin, [tq]))


# -- checkpoints ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FAMILY))
def test_state_dict_resumes_bit_exactly(name, backend, dtype):
    init, grads = problem(dtype, seed=5, steps=8)
    a = Side(init, "packed")
    opt = make(name, a.params, backend)
    for g in grads[:4]:
        opt.step(a.grads(g))
    sd = opt.state_dict()
    assert sorted(sd["state"][0]["buffers"]) == sorted(STATE[name])
    b = Side([np.array(x) for x in a.params], "list")   # resumed in another layout
    resumed = make(name, b.params, backend)
    resumed.load_state_dict(sd)
    for g in grads[4:]:
        opt.step(a.grads(g))
        resumed.step(b.grads(g))
    for x, y in zip(a.params, b.params):
        assert_bit_identical(x, y)
    assert_same_tree(opt.state_dict()["state"], resumed.state_dict()["state"])
    # a checkpoint without its buffers is refused, nothing changed
    bad = resumed.state_dict()
    bad["state"][0]["buffers"].pop(STATE[name][0])
    before = optimizer_snapshot(resumed, list(b.params))
    with pytest.raises(ValueError, match="missing"):
        resumed.load_state_dict(bad)
    assert_same_tree(optimizer_snapshot(resumed, list(b.params)), before)


# -- one native call per group ----------------------------------------------------------

@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
@pytest.mark.parametrize("name", list(FAMILY))
def test_one_native_call_per_group(monkeypatch, name, backend):
    module = get_backend(backend)
    calls = []
    real = module.step
    monkeypatch.setattr(module, "step", lambda t, *a, **k: (calls.append(t.nelem),
                                                            real(t, *a, **k))[1])
    rng = np.random.default_rng(0)
    params = [rng_array(rng, s, np.float32) for s in SHAPES]
    ref = [p.copy() for p in params]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 1e-3}]
    ref_groups = [{"params": ref[:2]}, {"params": ref[2:], "lr": 1e-3}]
    opt = make(name, groups, backend, max_grad_norm=1.0)
    ref_opt = make(name, ref_groups, "numpy", max_grad_norm=1.0)
    sizes = [params[0].size + params[1].size, sum(p.size for p in params[2:])]
    for t in range(3):
        g = [rng_array(rng, s, np.float32) for s in SHAPES]
        opt.step(g)
        ref_opt.step(g)
    assert calls == sizes * 3
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p, r, rtol=1e-5, atol=1e-6)


# -- device arrays ----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FAMILY))
def test_device_params_refused_up_front(name):
    cls = getattr(fastopt, name)
    with pytest.raises(TypeError, match=f"{name} has no CUDA kernel"):
        cls([FakeDeviceArray()])
    with pytest.raises(TypeError, match="no CUDA kernel"):
        cls([{"params": [FakeDeviceArray()]}])
    with pytest.raises(ValueError, match="no CUDA kernel"):
        cls([np.ones(4, np.float32)], backend="cuda")
    lazy = cls()                      # made before its params: refused at bind
    with pytest.raises(TypeError, match="no CUDA kernel"):
        lazy.step([FakeDeviceArray()], params=[FakeDeviceArray()])
    assert lazy.param_groups == []
    p = np.ones(4, np.float32)
    lazy.step([np.ones(4, np.float32)], params=[p])   # host arrays still bind
    assert (p != 1).all()
