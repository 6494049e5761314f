"""skip_nonfinite: a NaN/inf gradient skips the step and writes nothing;
grad norm and lr are visible after every step."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import BACKENDS, LARGE, assert_same_tree, optimizer_snapshot, rng_array

import fastopt

OPTS = {
    "adamw": lambda p, **kw: fastopt.AdamW(p, lr=1e-2, amsgrad=True, **kw),
    "adam": lambda p, **kw: fastopt.Adam(p, lr=1e-2, weight_decay=0.1, **kw),
    "sgd": lambda p, **kw: fastopt.SGD(p, lr=1e-2, momentum=0.9, **kw),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", sorted(OPTS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_nonfinite_step_is_skipped(backend, opt_name, bad, clip):
    rng = np.random.default_rng(1)
    params = fastopt.pack([rng_array(rng, (LARGE,), np.float32), rng_array(rng, (3, 5), np.float32)])
    grads = params.zeros_like()
    opt = OPTS[opt_name](params, backend=backend, skip_nonfinite=True, max_grad_norm=clip)
    grads.data[:] = rng_array(rng, grads.data.shape, np.float32)
    norm = opt.step(grads)
    assert norm == pytest.approx(fastopt.global_norm(grads), rel=1e-12)
    before = optimizer_snapshot(opt, params)
    grads.data[LARGE + 7] = bad          # one bad value in the last, small tensor
    out = opt.step(grads)
    assert not np.isfinite(out) and not np.isfinite(opt.grad_norm)
    assert_same_tree(optimizer_snapshot(opt, params)["params"], before["params"])
    assert_same_tree(opt.state, before["state"])
    assert opt.skipped_steps == 1 and opt.iterations == 2
    assert all(s["step"] == 1 for s in opt.state)
    grads.data[LARGE + 7] = 0.5
    opt.step(grads)
    assert opt.skipped_steps == 1 and all(s["step"] == 2 for s in opt.state)
    assert np.isfinite(params.data).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_matches_a_run_without_the_bad_step(backend):
    """Skipping is exactly 'as if the bad step never happened' (schedules aside)."""
    rng = np.random.default_rng(2)
    w = rng_array(rng, (1000,), np.float32)
    gs = [rng_array(rng, (1000,), np.float32) for _ in range(4)]
    bad = gs[1].copy()
    bad[10] = np.nan
    a, b = w.copy(), w.copy()
    oa = fastopt.SGD(a, lr=0.1, momentum=0.9, backend=backend, skip_nonfinite=True)
    ob = fastopt.SGD(b, lr=0.1, momentum=0.9, backend=backend)
    for g in [bad, gs[0], bad, gs[2], gs[3]]:   # first step skipped: buf = g comes later
        oa.step(g)
    for g in [gs[0], gs[2], gs[3]]:
        ob.step(g)
    assert a.tobytes() == b.tobytes() and oa.skipped_steps == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_float64_sum_overflow_is_not_skipped(backend):
    p = np.zeros(4)
    opt = fastopt.SGD(p, lr=1e-300, skip_nonfinite=True, backend=backend)
    g = np.full(4, 1e200)       # finite, but the float64 sum of squares overflows
    assert opt.step(g) == 2e200           # the norm, computed with scaling
    assert opt.skipped_steps == 0 and (p == -1e-100).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("layout", ["one table", "two groups"])
def test_an_overflowing_float64_norm_clips_by_the_true_norm(backend, skip, layout):
    # squares past float64's range made the norm inf, and the clip then
    # scaled finite gradients to zero (as torch's clip_grad_norm_ does); the
    # norm is now computed again with scaling, and the step clips by it
    def make(dtype):
        p = [np.ones(3, dtype), np.ones(4, dtype)]
        groups = [{"params": [p[0]]}, {"params": [p[1]]}] if layout == "two groups" else p
        return p, fastopt.SGD(groups, lr=0.5, max_grad_norm=2.0, skip_nonfinite=skip,
                              backend=backend)

    huge = [np.array([3e200, 0.0, -4e200]), np.array([0.0, 12e200, 0.0, 0.0])]
    p, opt = make(np.float64)
    for _ in range(3):                              # full step, then the planned one
        assert opt.step([g.copy() for g in huge]) == pytest.approx(13e200, rel=1e-15)
    assert opt.skipped_steps == 0 and opt.iterations == 3
    for a, g in zip(p, huge):                       # 3 steps of lr 0.5 along g * 2 / 13e200
        np.testing.assert_allclose(a, 1.0 - 3 * 0.5 * g * (2.0 / 13e200), rtol=1e-14)
    assert fastopt.global_norm(huge, backend=backend) == pytest.approx(13e200, rel=1e-15)
    clipped = [g.copy() for g in huge]
    fastopt.clip_by_global_norm(clipped, 2.0, backend=backend)
    np.testing.assert_allclose(np.concatenate(clipped),
                               np.concatenate(huge) * (2.0 / 13e200), rtol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_gradient_clipped_without_a_skip_still_poisons_the_step(backend):
    # (a float64 clipped step is called as a skipping one, and stepped by
    # Python when the kernel skips: a NaN must still reach the params, as in torch)
    p = [np.zeros(3), np.zeros(2)]
    opt = fastopt.SGD(p, lr=0.1, max_grad_norm=1.0, backend=backend)
    # said, once: torch's step writes them as silently, and a run went on
    # with every param NaN without a word
    with pytest.warns(RuntimeWarning, match=r"global norm was nan.*skip_nonfinite=True") \
            as said:
        for _ in range(2):
            norm = opt.step([np.array([1.0, np.nan, 1.0]), np.ones(2)])
    assert len(said) == 1
    assert math.isnan(norm) and opt.skipped_steps == 0 and opt.iterations == 2
    assert np.isnan(p[0]).all() and np.isnan(p[1]).all()


def test_without_skip_nonfinite_nan_propagates_as_before():
    p = np.zeros(3, np.float32)
    opt = fastopt.AdamW(p, backend="numpy")
    assert opt.step(np.array([1, np.nan, 1], np.float32)) is None
    assert np.isnan(p[1]) and opt.skipped_steps == 0 and opt.grad_norm is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_watch_norm_and_lr_after_each_step(backend):
    p = np.ones(10, np.float32)
    sched = fastopt.schedules.exponential(0.1, 0.5)
    opt = fastopt.AdamW(p, lr=sched, max_grad_norm=1.0, backend=backend)
    assert opt.last_lr is None and opt.grad_norm is None
    for t in range(3):
        n = opt.step(np.full(10, float(t + 1), np.float32))
        assert n == opt.grad_norm == pytest.approx((t + 1) * np.sqrt(10), rel=1e-7)
        assert opt.last_lr == [0.1 * 0.5 ** t]


def test_skip_nonfinite_validated():
    with pytest.raises(TypeError, match="skip_nonfinite"):
        fastopt.SGD(np.zeros(2), lr=0.1, skip_nonfinite=1)
