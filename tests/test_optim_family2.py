"""Adamax, NAdam and RAdam on the kernel layer: every CPU backend, float32
and float64, packed and plain lists.

torch.optim's trajectories over 60 steps with several settings each (weight
decay, decoupled weight decay, maximize, momentum_decay), hand-computed
first steps, NAdam's running product of the momentum schedule (kept, not
recomputed: a change of momentum_decay mid-run is followed as torch does),
RAdam's switch between its two updates. What every optimizer of the family
must do besides its math is in test_optim_family_common.py.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest

import fastopt
from fastopt.backends.scalars import radam_scalars

from family_helpers import (FAMILY, STATE, check_against_torch, DTYPE_IDS, DTYPES, PATHS,
                            Side, problem)

from conftest import BACKENDS, assert_bit_identical, assert_same_tree, optimizer_snapshot

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
@pytest.mark.parametrize("name", ["Adamax", "NAdam", "RAdam"])
def test_nan_gradient_stays_visible(backend, name):
    p = np.linspace(-1, 1, 7, dtype=np.float32)
    opt = getattr(fastopt, name)([p], backend=backend, **FAMILY[name])
    g = np.ones(7, np.float32)
    g[2] = np.nan
    opt.step([g])
    assert np.isnan(p[2]) and np.isfinite(np.delete(p, 2)).all()
    assert all(np.isnan(opt.state[0]["flat"][n][2]) for n in STATE[name])


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
