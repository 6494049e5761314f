"""skip_nonfinite: a NaN/inf gradient skips the step and writes nothing;
grad norm and lr are visible after every step."""

from __future__ import annotations

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


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_finite_float64_sum_overflow_is_not_skipped():
    p = np.zeros(4)
    opt = fastopt.SGD(p, lr=1e-300, skip_nonfinite=True, backend="numpy")
    g = np.full(4, 1e200)       # finite, but the float64 sum of squares overflows
    assert opt.step(g) == np.inf
    assert opt.skipped_steps == 0 and (p == -1e-100).all()


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
