"""What every optimizer of the family (RMSprop, Adagrad, Lion, Adamax, NAdam,
RAdam, LAMB) must do on the kernel layer, whatever its math: fused clipping and
the non-finite skip, bad hyperparameters refused with nothing written,
checkpoints that resume bit for bit, one native call per group, device
params refused. Their update math is tested in test_optim_family*.py."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.backends import get_backend
from fastopt.backends.scalars import clip_coefficient

from family_helpers import (DTYPE_IDS, DTYPES, FAMILY, PATHS, SHAPES, STATE, FakeDeviceArray,
                            Side, assert_close, problem)

from conftest import (BACKENDS, assert_bit_identical, assert_same_tree, count_native_steps,
                      optimizer_snapshot, rng_array)


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
    ("RMSprop", dict(lr=-1.0), ValueError, "lr"),
    ("RMSprop", dict(alpha=-0.1), ValueError, "alpha"),
    ("RMSprop", dict(alpha=1.5), ValueError, "alpha must be <= 1"),   # a NaN step (torch: too)
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
    ("LAMB", dict(lr=-1e-3), ValueError, "lr"),
    ("LAMB", dict(eps=0.0), ValueError, "eps"),
    # eps divides every one of these: 0 would step a zero gradient on zero state to 0/0
    ("Adamax", dict(eps=0.0), ValueError, r"^eps must be > 0.*0/0 = NaN"),
    ("NAdam", dict(eps=0.0), ValueError, r"^eps must be > 0.*0/0 = NaN"),
    ("RAdam", dict(eps=0.0), ValueError, r"^eps must be > 0.*0/0 = NaN"),
    ("RMSprop", dict(eps=0.0), ValueError, r"^eps must be > 0.*0/0 = NaN"),
    ("Adagrad", dict(eps=0.0), ValueError, r"^eps must be > 0 when initial_accumulator_value"),
    # a start that float32 state rounds to 0 is no start
    ("Adagrad", dict(eps=0.0, initial_accumulator_value=1e-46), ValueError, r"below 1\.2e-38"),
    # below the bound: no 0/0 reason (torch refuses a negative eps too)
    ("Adam", dict(eps=-1.0), ValueError, r"^eps must be > 0\.0, got -1\.0$"),
    ("LAMB", dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
    ("LAMB", dict(weight_decay=float("nan")), ValueError, "weight_decay"),
    ("LAMB", dict(bias_correction="no"), TypeError, "bias_correction"),
    ("LAMB", dict(maximize=1), TypeError, "maximize"),
]


@pytest.mark.parametrize("name", ["RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam"])
def test_a_checkpoint_saved_with_eps_0_says_how_to_load_it(name):
    """fastopt took eps=0 for these until it was refused: such a run's
    checkpoint is refused naming the edit that loads it, and loads after it."""
    p = np.ones(5)
    opt = getattr(fastopt, name)([p], backend="numpy")
    opt.step([np.ones(5)])
    sd = opt.state_dict()
    sd["param_groups"][0]["eps"] = 0.0      # as the earlier fastopt saved it
    other = getattr(fastopt, name)([np.ones(5)], backend="numpy", eps=1e-8)
    before = optimizer_snapshot(other, [])
    with pytest.raises(fastopt.CheckpointError,
                       match=r"0/0 = NaN.*earlier fastopt.*\['param_groups'\]\[0\]\['eps'\]"):
        other.load_state_dict(sd)
    assert_same_tree(optimizer_snapshot(other, []), before)
    sd["param_groups"][0]["eps"] = 1e-8
    other.load_state_dict(sd)
    assert other.state_dict()["param_groups"][0]["eps"] == 1e-8
    sd["param_groups"][0].update(eps=0.0, lr=-1.0)      # another refusal: no eps hint
    with pytest.raises(fastopt.CheckpointError, match=r"\['lr'\] must be >= 0") as refused:
        other.load_state_dict(sd)
    assert "earlier fastopt" not in str(refused.value)


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


# -- one native call per group ----------------------------------------------------------

@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
@pytest.mark.parametrize("name", list(FAMILY))
def test_one_native_call_per_group(monkeypatch, name, backend):
    module = get_backend(backend)
    calls = count_native_steps(monkeypatch, module)
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

def _outcome(make, cls):
    """``None``, or the type and message of what ``make(cls)`` raised."""
    try:
        make(cls)
    except Exception as exc:     # noqa: BLE001 - compared, not hidden
        return type(exc), str(exc)
    return None


@pytest.mark.parametrize("name", list(FAMILY))
def test_device_params_go_to_cuda_as_adams_do(name):
    """Every optimizer of the family takes device params as Adam does:
    backend "cuda" (tests/test_cuda_family.py and tests/cuda_sim step them
    under the simulator); here, without a usable GPU, it fails exactly as
    Adam does."""
    cls = getattr(fastopt, name)
    for make in (lambda c: c([FakeDeviceArray()]),
                 lambda c: c([np.ones(4, np.float32)], backend="cuda"),
                 lambda c: c().step([FakeDeviceArray()], params=[FakeDeviceArray()])):
        assert _outcome(make, cls) == _outcome(make, fastopt.Adam)
