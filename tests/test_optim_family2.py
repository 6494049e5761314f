"""Adamax, NAdam and RAdam on the kernel layer: every CPU backend, float32
and float64, packed and plain lists.

torch.optim's trajectories over 60 steps with several settings each (weight
decay, decoupled weight decay, maximize, momentum_decay), hand-computed
first steps, NAdam's running product of the momentum schedule (kept, not
recomputed: a change of momentum_decay mid-run is followed as torch does),
RAdam's switch between its two updates; then, for each: fused clipping and
the non-finite skip, bad hyperparameters refused with nothing written,
checkpoints that resume bit for bit, one native call per group, device
params refused.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest

import fastopt
from fastopt.backends import get_backend
from fastopt.backends.scalars import clip_coefficient, radam_scalars

from family_helpers import (DTYPE_IDS, DTYPES, PATHS, SHAPES, STEPS, TORCH_TOL,
                            FakeDeviceArray, Side, assert_close, concat_state,
                            problem)

from conftest import (BACKENDS, assert_bit_identical, assert_same_tree, optimizer_snapshot,
                      rng_array)

ADAMAX_CONFIGS = [
    dict(),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=5e-3, betas=(0.8, 0.99), eps=1e-6, maximize=True),
]
NADAM_CONFIGS = [
    dict(),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    dict(lr=5e-3, betas=(0.8, 0.99), momentum_decay=0.1, maximize=True),
]
RADAM_CONFIGS = [
    dict(),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    dict(lr=5e-3, betas=(0.8, 0.9), eps=1e-6),
]
TORCH_CONFIGS = ([("Adamax", kw) for kw in ADAMAX_CONFIGS]
                 + [("NAdam", kw) for kw in NADAM_CONFIGS]
                 + [("RAdam", kw) for kw in RADAM_CONFIGS])
TORCH_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}"
             for n, kw in TORCH_CONFIGS]

# one configuration per optimizer for the generic checks (RAdam's beta2 puts
# its switch to the rectified update at step 6: inside every run below)
FAMILY = {
    "Adamax": dict(lr=1e-2, weight_decay=0.01),
    "NAdam": dict(lr=1e-2, weight_decay=0.01, momentum_decay=0.01),
    "RAdam": dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01,
                  decoupled_weight_decay=True),
}
STATE = {"Adamax": ["exp_avg", "exp_inf"], "NAdam": ["exp_avg", "exp_avg_sq"],
         "RAdam": ["exp_avg", "exp_avg_sq"]}


# -- torch.optim trajectories ------------------------------------------------------

@contextlib.contextmanager
def torch_default_dtype(torch, dtype):
    """torch keeps NAdam's mu_product in its default dtype: float64 models
    (where it matters at 1e-10) run with torch's default set to float64."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if dtype == np.float64 else torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@functools.lru_cache(maxsize=None)
def torch_run(name, items, dtype, changes=()):
    """torch's params, state buffers and NAdam's mu_product (or None) after
    STEPS steps (computed once per config); ``changes``: (step, key, value)
    group updates before that step."""
    torch = pytest.importorskip("torch")
    init, grads = problem(np.dtype(dtype).type)
    with torch_default_dtype(torch, dtype):
        tparams = [torch.tensor(a, requires_grad=True) for a in init]
        opt = getattr(torch.optim, name)(tparams, **dict(items))
        for t, g in enumerate(grads):
            for when, key, value in changes:
                if when == t:
                    opt.param_groups[0][key] = value
            for tp, x in zip(tparams, g):
                tp.grad = torch.from_numpy(x.copy())
            opt.step()
    params = [tp.detach().numpy().copy() for tp in tparams]
    keys = [k for k in opt.state[tparams[0]] if k not in ("step", "mu_product")]
    state = {k: np.concatenate([opt.state[tp][k].detach().numpy().ravel() for tp in tparams])
             for k in keys}
    mu = opt.state[tparams[0]].get("mu_product")
    return params, state, None if mu is None else float(mu)


def check_against_torch(opt, side, want, dtype):
    want_params, want_state, want_mu = want
    tol = TORCH_TOL[np.dtype(dtype)]
    for i, (p, w) in enumerate(zip(side.params, want_params)):
        assert p.dtype == w.dtype
        assert_close(p, w, tol, f"param {i}")
    # the same state buffers as torch, by torch's names
    assert sorted(opt.state[0]["flat"]) == sorted(want_state)
    for key, w in want_state.items():
        assert_close(concat_state(opt, key), w, tol, key)
    assert opt.state[0]["step"] == STEPS
    if want_mu is not None:     # torch's is float32 under its float32 default
        assert opt.state[0]["mu_product"] == pytest.approx(
            want_mu, rel=1e-14 if dtype == np.float64 else 1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", TORCH_CONFIGS, ids=TORCH_IDS)
def test_trajectory_matches_torch(name, kwargs, backend, dtype, path):
    pytest.importorskip("torch")
    want = torch_run(name, tuple(sorted(kwargs.items())), np.dtype(dtype))
    init, grads = problem(dtype)
    side = Side(init, path)
    opt = getattr(fastopt, name)(side.params, backend=backend, **kwargs)
    assert opt.backend == backend
    for g in grads:
        assert opt.step(side.grads(g)) is None
    check_against_torch(opt, side, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nadam_product_follows_a_changed_momentum_decay(backend):
    """torch multiplies its running product step by step: a momentum_decay
    (or beta1) changed mid-run changes the factors from then on, not the
    product so far. fastopt keeps the product too (it is not recomputed
    from the step count)."""
    pytest.importorskip("torch")
    kwargs = dict(lr=1e-2, momentum_decay=0.05)
    changes = ((20, "momentum_decay", 0.5), (40, "betas", (0.8, 0.999)))
    want = torch_run("NAdam", tuple(sorted(kwargs.items())), np.dtype(np.float64), changes)
    init, grads = problem(np.float64)
    side = Side(init, "list")
    opt = fastopt.NAdam(side.params, backend=backend, **kwargs)
    for t, g in enumerate(grads):
        for when, key, value in changes:
            if when == t:
                opt.param_groups[0][key] = value
        opt.step(side.grads(g))
    check_against_torch(opt, side, want, np.float64)


# -- hand-computed first steps and RAdam's switch ---------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_first_steps_by_hand(backend):
    """Step 1 from zero state: Adamax moves by lr g / (|g| + eps); RAdam
    (rho_1 = 1, not rectified) by lr g; NAdam by
    lr [(1 - mu1)/(1 - mu1) + mu2 (1 - beta1)/(1 - mu1 mu2)] g / (|g| + eps)."""
    g = np.array([0.5, -0.25, 0.0, 4.0])
    p0 = np.array([1.0, -2.0, 0.5, 3.0])
    lr, eps = 0.1, 1e-8

    p = p0.copy()
    opt = fastopt.Adamax([p], lr=lr, backend=backend)
    opt.step([g])
    np.testing.assert_allclose(p, p0 - lr * g / (np.abs(g) + eps), rtol=1e-15, atol=1e-16)
    np.testing.assert_allclose(opt.state[0]["flat"]["exp_inf"], np.abs(g) + eps, rtol=1e-15)

    p = p0.copy()
    opt = fastopt.RAdam([p], lr=lr, backend=backend)
    opt.step([g])
    np.testing.assert_allclose(p, p0 - lr * g, rtol=1e-15, atol=1e-16)

    p = p0.copy()
    opt = fastopt.NAdam([p], lr=lr, backend=backend)
    opt.step([g])
    mu1 = 0.9 * (1 - 0.5 * 0.96 ** 0.004)
    mu2 = 0.9 * (1 - 0.5 * 0.96 ** 0.008)
    denom = np.abs(g) + eps                     # sqrt(v / (1 - beta2)) = |g|
    want = p0 - lr * g / denom - lr * mu2 / (1 - mu1 * mu2) * 0.1 * g / denom
    np.testing.assert_allclose(p, want, rtol=1e-14, atol=1e-15)
    assert opt.state[0]["mu_product"] == mu1


def test_radam_switch_and_rectification():
    """rho_t > 5 switches on the rectified update (torch's condition), and
    r_t is torch's formula."""
    for beta2, first in ((0.999, 6), (0.99, 6), (0.9, 6), (0.5, None)):
        flags = []
        for t in range(1, 40):
            s = radam_scalars(lr=1.0, beta1=0.9, beta2=beta2, eps=1e-8, weight_decay=0.0,
                              decoupled=False, step=t)
            rho_inf = 2 / (1 - beta2) - 1
            rho = rho_inf - 2 * t * beta2 ** t / (1 - beta2 ** t)
            assert s.rectified == (rho > 5.0)
            if s.rectified:
                r = ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5
                assert s.adaptive_lr == pytest.approx(
                    r * (1 - beta2 ** t) ** 0.5 / (1 - 0.9 ** t), rel=1e-15)
            assert s.sgd_lr == pytest.approx(1 / (1 - 0.9 ** t), rel=1e-15)
            flags.append(s.rectified)
        assert (flags.index(True) + 1 if True in flags else None) == first


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FAMILY))
def test_nan_gradient_stays_visible(backend, name):
    p = np.linspace(-1, 1, 7, dtype=np.float32)
    opt = getattr(fastopt, name)([p], backend=backend, **FAMILY[name])
    g = np.ones(7, np.float32)
    g[2] = np.nan
    opt.step([g])
    assert np.isnan(p[2]) and np.isfinite(np.delete(p, 2)).all()
    assert all(np.isnan(opt.state[0]["flat"][n][2]) for n in STATE[name])


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
    unclipped step: bit for bit where the compiler keeps IEEE order, to an
    ulp or so with gcc's FMA builds (test_optim_family explains)."""
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
    """A NaN/inf gradient with skip_nonfinite writes nothing (NAdam's
    mu_product included) and the run goes on bit for bit like one that
    never saw it."""
    init, grads = problem(np.float32, seed=2, steps=8)
    a, b = Side(init, path), Side(init, path)
    opt = make(name, a.params, backend, skip_nonfinite=True)
    twin = make(name, b.params, backend, skip_nonfinite=True)
    for t, g in enumerate(grads):
        if t in (0, 2, 6):      # a bad first step, and ones with state (both RAdam phases)
            bad = [x.copy() for x in g]
            bad[1][2] = np.inf if t else np.nan
            before = optimizer_snapshot(opt, list(a.params))
            assert not np.isfinite(opt.step(a.grads(bad)))
            after = optimizer_snapshot(opt, list(a.params))
            assert_same_tree(dict(after, grad_norm=None), dict(before, grad_norm=None))
        opt.step(a.grads(g))
        twin.step(b.grads(g))
    assert opt.skipped_steps == 3 and twin.skipped_steps == 0
    assert opt.state[0]["step"] == twin.state[0]["step"] == len(grads)
    assert_same_tree(optimizer_snapshot(opt, list(a.params)),
                     optimizer_snapshot(twin, list(b.params)))
    if name == "NAdam":
        assert opt.state[0]["mu_product"] == twin.state[0]["mu_product"] < 1.0


# -- bad hyperparameters ------------------------------------------------------------

BAD = [
    ("Adamax", dict(lr=-1.0), ValueError, "lr"),
    ("Adamax", dict(eps=-1e-8), ValueError, "eps"),
    ("Adamax", dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    ("Adamax", dict(weight_decay=float("nan")), ValueError, "weight_decay"),
    ("Adamax", dict(maximize=1), TypeError, "maximize"),
    ("NAdam", dict(momentum_decay=-0.1), ValueError, "momentum_decay"),
    ("NAdam", dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
    ("NAdam", dict(decoupled_weight_decay="yes"), TypeError, "decoupled_weight_decay"),
    ("NAdam", dict(weight_decay=-0.1), ValueError, "weight_decay"),
    ("NAdam", dict(lr=float("inf")), ValueError, "lr"),
    ("RAdam", dict(eps=-1.0), ValueError, "eps"),
    ("RAdam", dict(betas=0.9), TypeError, "betas"),
    ("RAdam", dict(decoupled_weight_decay=1), TypeError, "decoupled_weight_decay"),
    ("RAdam", dict(weight_decay="0.1"), TypeError, "weight_decay"),
    ("RAdam", dict(lr=-1e-3), ValueError, "lr"),
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
    # nothing written (NAdam's product included), and the run goes on like a twin's
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
    init, grads = problem(dtype, seed=5, steps=10)
    a = Side(init, "packed")
    opt = make(name, a.params, backend)
    for g in grads[:4]:            # RAdam: resumed before its switch (step 6)
        opt.step(a.grads(g))
    sd = opt.state_dict()
    assert sorted(sd["state"][0]["buffers"]) == sorted(STATE[name])
    if name == "NAdam":
        assert sd["state"][0]["mu_product"] == opt.state[0]["mu_product"] < 1.0
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


def test_nadam_checkpoint_carries_mu_product(tmp_path):
    """Through fastopt.save/load (JSON + npz) the product comes back
    exactly; one without it (after steps) or out of range is refused with
    nothing changed; at step 0 it may be absent."""
    init, grads = problem(np.float64, seed=6, steps=6)
    params = [a.copy() for a in init]
    opt = fastopt.NAdam(params, lr=1e-2, backend="numpy")
    for g in grads[:3]:
        opt.step(g)
    path = tmp_path / "ckpt.npz"
    fastopt.save(path, params=params, optimizer=opt)
    params2 = [np.zeros_like(a) for a in init]
    other = fastopt.NAdam(params2, lr=1e-2, backend="numpy")
    fastopt.load(path, params=params2, optimizer=other)
    assert other.state[0]["mu_product"] == opt.state[0]["mu_product"]
    for g in grads[3:]:
        opt.step(g)
        other.step(g)
    for x, y in zip(params, params2):
        assert_bit_identical(x, y)
    before = optimizer_snapshot(other, params2)
    for bad, exc in ((None, ValueError), (1.5, ValueError), ("0.5", TypeError)):
        sd = other.state_dict()
        if bad is None:
            del sd["state"][0]["mu_product"]
        else:
            sd["state"][0]["mu_product"] = bad
        with pytest.raises(exc, match="mu_product"):
            other.load_state_dict(sd)
        assert_same_tree(optimizer_snapshot(other, params2), before)
    fresh = fastopt.NAdam([np.zeros(3)], backend="numpy")
    sd = fresh.state_dict()
    del sd["state"][0]["mu_product"]
    fresh.load_state_dict(sd)
    assert fresh.state[0]["mu_product"] == 1.0


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
    for t in range(7):      # RAdam: both of its updates
        g = [rng_array(rng, s, np.float32) for s in SHAPES]
        opt.step(g)
        ref_opt.step(g)
    assert calls == sizes * 7
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p, r, rtol=1e-5, atol=1e-6)


# -- device arrays ----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FAMILY))
def test_device_params_refused_up_front(name):
    cls = getattr(fastopt, name)
    with pytest.raises(TypeError, match=f"{name} has no CUDA kernel"):
        cls([FakeDeviceArray()])
    with pytest.raises(ValueError, match="no CUDA kernel"):
        cls([np.ones(4, np.float32)], backend="cuda")
    lazy = cls()                      # made before its params: refused at bind
    with pytest.raises(TypeError, match="no CUDA kernel"):
        lazy.step([FakeDeviceArray()], params=[FakeDeviceArray()])
    assert lazy.param_groups == []
    p = np.ones(4, np.float32)
    lazy.step([np.ones(4, np.float32)], params=[p])   # host arrays still bind
    assert (p != 1).all()
