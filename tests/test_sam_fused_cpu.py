"""SAM's restore fused into the base step on the compiled CPU backends.

``SAM.step`` hands its perturbation ``e`` to the base optimizer's step
tables as an offset (``StepTable.set_shift``): the kernels read each weight
as ``p - e`` and write the stepped weight, one pass and (one table) one
native call. Checked here against the two-pass path (``p -= e``, then the
base step; forced by turning the offset off), bit for bit, and against the
NumPy reference backend and the paper's update (test_sam.py), with SGD,
AdamW and LAMB as the base, with and without clipping, over plain lists and
packed buffers; and what a skipped or refused base step does with the offset.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from conftest import FAST_BACKENDS, LARGE, assert_same_tree, rng_array
from fastopt.backends import get_backend
from fastopt.backends.tables import StepTable
from fastopt.optim import step_plan
from fastopt.optim.sam import SAM
from test_sam import (RHO, STEPS, SHAPES, Layout, PaperAdamW, PaperSGD, assert_params,
                      grad_at, paper_run)

BASES = {
    "sgd": lambda p, be, **kw: fastopt.SGD(p, lr=0.05, momentum=0.9, backend=be, **kw),
    "adamw": lambda p, be, **kw: fastopt.AdamW(p, lr=0.01, weight_decay=0.1, backend=be, **kw),
    "lamb": lambda p, be, **kw: fastopt.LAMB(p, lr=0.01, weight_decay=0.05, backend=be, **kw),
}
PAPER = {"sgd": PaperSGD, "adamw": PaperAdamW}


def two_pass(monkeypatch):
    """Make SAM restore in a pass of its own (the path without offsets)."""
    monkeypatch.setattr(SAM, "_base_shifts", lambda self: None)


def fused_and_two_pass(monkeypatch, run_once):
    """``run_once()`` with the fused restore, then with two passes; their
    results must be the same bits."""
    results = []
    for fused in (True, False):
        with monkeypatch.context() as m:
            if not fused:
                two_pass(m)
            results.append(run_once())
    assert_same_tree(results[0], results[1])


def offsets_of(sam, params):
    """SAM's ``e`` (one group) split per param, a copy."""
    return np.split(sam.state[0]["e_w"].copy(), np.cumsum([p.size for p in params])[:-1])


def assert_restored(params, start, e):
    """Each param is exactly ``(start + e) - e``: what the two passes leave."""
    for p, s, x in zip(params, start, e):
        np.testing.assert_array_equal(p.reshape(-1), (s.reshape(-1) + x) - x)


def run(backend, dtype, layout, base, steps=STEPS, seed=0, shapes=SHAPES, adaptive=False,
        **kw):
    """A SAM run: the params as the user holds them (test_sam.Layout), and the SAM."""
    rng = np.random.default_rng(seed)
    side = Layout([rng_array(rng, s, dtype) for s in shapes], layout)
    sam = fastopt.SAM(BASES[base](side.params, backend, **kw), rho=RHO, adaptive=adaptive)
    for _ in range(steps):
        sam.perturb(side.grads())
        sam.step(side.grads())
    return side, sam


def state_of(sam, side):
    return {"params": [p.copy() for p in side.arrays], "sam": sam.state_dict()}


@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("layout", ["list", "packed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fused_equals_two_pass_and_the_reference(monkeypatch, backend, dtype, layout, base,
                                                 clip):
    kw = {} if clip is None else {"max_grad_norm": clip}
    side, sam = run(backend, dtype, layout, base, **kw)
    assert not sam.perturbed and sam.iterations == STEPS
    if layout == "list":     # the base's planned step ran (the offset travels in its table)
        assert sam.base_optimizer._plan is not None
    ref_side, _ = run("numpy", dtype, layout, base, **kw)
    assert_params(side, ref_side.arrays, dtype, "vs the NumPy reference")
    if base in PAPER and clip is None:
        rng = np.random.default_rng(0)
        init = [rng_array(rng, s, dtype) for s in SHAPES]
        assert_params(side, paper_run(init, PAPER[base](), RHO, False), dtype, "vs the paper")
    with monkeypatch.context() as m:
        two_pass(m)
        side2, sam2 = run(backend, dtype, layout, base, **kw)
    assert_same_tree(state_of(sam, side), state_of(sam2, side2))


@pytest.mark.parametrize("base", ["sgd", "lamb"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_large_and_mixed_dtype_groups(monkeypatch, backend, base):
    """Past the serial size (threaded tasks, LAMB's sums over many pieces),
    adaptive: the same as two passes; and two param groups (two tables)."""
    shapes = [(LARGE,), (5, 3)]
    for kw in ({}, {"max_grad_norm": 0.1, "skip_nonfinite": True}):
        side, sam = run(backend, np.float64, "list", base, steps=3, shapes=shapes,
                        adaptive=True, **kw)
        with monkeypatch.context() as m:
            two_pass(m)
            side2, sam2 = run(backend, np.float64, "list", base, steps=3, shapes=shapes,
                              adaptive=True, **kw)
        assert_same_tree(state_of(sam, side), state_of(sam2, side2))
    # two param groups (float32, float64): a table each, the norm and the skip
    # decided outside the kernels; the middle step's gradients hold a NaN
    rng = np.random.default_rng(5)
    mine = [rng_array(rng, (7, 3), np.float32), rng_array(rng, (4,), np.float64)]
    ref = [a.copy() for a in mine]
    for params, be in ((mine, backend), (ref, "numpy")):
        groups = [{"params": params[:1]}, {"params": params[1:], "lr": 0.02}]
        sam = fastopt.SAM(BASES[base](groups, be, skip_nonfinite=True), rho=RHO)
        for k in range(3):
            sam.perturb(grad_at(params))
            g = grad_at(params)
            if k == 1:
                g[1][0] = np.nan
            sam.step(g)
        assert sam.base_optimizer.skipped_steps == 1
    for a, b in zip(mine, ref):
        tol = 2e-5 if a.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


class Counting:
    """Counts a backend's native step calls; fails on a separate restore pass."""

    def __init__(self, monkeypatch, backend):
        self.calls = 0
        be = get_backend(backend)
        real = be.step

        def step(*args, **kw):
            self.calls += 1
            return real(*args, **kw)
        monkeypatch.setattr(be, "step", step)
        from fastopt.backends import flat_numba

        def no_restore(*args):
            raise AssertionError("a separate restore pass ran")
        monkeypatch.setattr(flat_numba, "sam_restore", no_restore)


@pytest.mark.parametrize("clip", [1.0, None])      # None: a small table's one-call plan
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_restore_and_step_are_one_native_call(monkeypatch, backend, base, clip):
    rng = np.random.default_rng(1)
    params = [rng_array(rng, s, np.float32) for s in SHAPES]
    sam = fastopt.SAM(BASES[base](params, backend, max_grad_norm=clip), rho=RHO)
    planned = []
    real_run = step_plan.StepPlan.run

    def spy(self, opt, grads, bound=False):
        out = real_run(self, opt, grads, bound)
        planned.append(out is not step_plan.STALE)
        return out
    monkeypatch.setattr(step_plan.StepPlan, "run", spy)
    count = Counting(monkeypatch, backend)
    for k in range(4):
        sam.perturb(grad_at(params))
        before = count.calls
        sam.step(grad_at(params))
        assert count.calls == before + 1, f"step {k}"
    assert planned == [True] * 3          # steps 2-4 ran the base's plan
    assert sam.base_optimizer._tables[0][0].shift is None


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_a_skipped_step_still_restores(monkeypatch, backend, base):
    """Non-finite gradients at the perturbed point with ``skip_nonfinite``:
    the base step writes nothing, the params end at the unperturbed point
    ((p + e) - e, as two passes leave them), the base's state untouched,
    the skip counted, and the next pair runs normally."""
    def run_once():
        rng = np.random.default_rng(2)
        params = [rng_array(rng, s, np.float64) for s in SHAPES]
        sam = fastopt.SAM(BASES[base](params, backend, skip_nonfinite=True), rho=RHO)
        for _ in range(2):
            sam.perturb(grad_at(params))
            sam.step(grad_at(params))
        state = sam.base_optimizer.state_dict()["state"]
        start = [p.copy() for p in params]
        sam.perturb(grad_at(params))
        e = offsets_of(sam, params)
        bad = grad_at(params)
        bad[1][2] = np.nan
        sam.step(bad)
        assert sam.base_optimizer.skipped_steps == 1 and not sam.perturbed
        assert_restored(params, start, e)
        assert_same_tree(sam.base_optimizer.state_dict()["state"], state)
        sam.perturb(grad_at(params))
        sam.step(grad_at(params))
        return {"params": params, "sam": sam.state_dict()}
    fused_and_two_pass(monkeypatch, run_once)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_huge_finite_float64_grads_are_stepped(monkeypatch, backend):
    """float64 squares that overflow the norm while every gradient is finite:
    the base's exact re-check steps after all (a second native call, with
    the offset still pending from the skipped first): one restore, not two."""
    def run_once():
        rng = np.random.default_rng(3)
        params = [rng_array(rng, s, np.float64) for s in SHAPES]
        sam = fastopt.SAM(fastopt.SGD(params, lr=1e-200, backend=backend, skip_nonfinite=True),
                          rho=RHO)
        sam.perturb(grad_at(params))
        sam.step([g * 1e200 for g in grad_at(params)])
        assert sam.base_optimizer.skipped_steps == 0
        return params
    fused_and_two_pass(monkeypatch, run_once)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_a_refused_base_step_leaves_sam_as_it_was(backend):
    """A base step that raises before its kernels (a bad hyperparameter
    written into the group): nothing changed, the params still perturbed
    and flagged so, no offset pending; once the group is mended, the same
    step goes on as if never refused (it restored the params before, and
    the resumed run differed by the rounding of p + e - e)."""
    rng = np.random.default_rng(4)

    def run(refuse):
        params = [rng_array(np.random.default_rng(4), s, np.float64) for s in SHAPES]
        sam = fastopt.SAM(BASES["adamw"](params, backend), rho=RHO)
        for k in range(2):
            sam.perturb(grad_at(params))
            if refuse and k == 1:
                perturbed = [p.copy() for p in params]
                lr = sam.param_groups[0]["lr"]
                sam.param_groups[0]["lr"] = -1.0
                with pytest.raises(ValueError, match="lr"):
                    sam.step(grad_at(params))
                assert sam.perturbed
                assert all(t.shift is None for ts in sam.base_optimizer._tables for t in ts)
                for p, q in zip(params, perturbed):
                    assert p.tobytes() == q.tobytes()
                sam.param_groups[0]["lr"] = lr
            sam.step(grad_at(params))
        return params
    for a, b in zip(run(True), run(False)):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_compact_state_keeps_two_passes(monkeypatch, backend):
    """Compact optimizer state steps without an offset: SAM restores in a
    pass of its own, and the pair still lands where lr=0 says (back at p)."""
    rng = np.random.default_rng(6)
    params = [rng_array(rng, s, np.float32) for s in SHAPES]
    sam = fastopt.SAM(fastopt.AdamW(params, lr=0.0, backend=backend, state_dtype="bfloat16"),
                      rho=RHO)
    assert sam._base_shifts() is None
    start = [p.copy() for p in params]
    sam.perturb(grad_at(params))
    e = offsets_of(sam, params)
    sam.step(grad_at(params))
    assert_restored(params, start, e)


def test_table_offsets_are_checked_and_cleared():
    w = [np.arange(4.0), np.arange(3.0)]
    t = StepTable(w, None, w, [0, 1], [0, 4])
    for bad in ([np.ones(4), np.ones(3)],                      # not a tuple
                (np.ones(4),),                                   # one short
                (np.ones(4), np.ones(3, np.float32)),           # a dtype
                (np.ones(4), np.ones(4))):                      # a size
        with pytest.raises(ValueError, match="offsets"):
            t.set_shift(bad)
        assert t.shift is None and t.header[-1] == 0
    e = (np.full(4, 0.5), np.full(3, 2.0))
    t.set_shift(e)
    assert t.header[-1] == t.addrs["eaddr"] and t.eaddr[1] == e[1].ctypes.data
    t.clear_shift()                                 # the offset goes; the weights stay
    np.testing.assert_array_equal(w[0], np.arange(4.0))
    assert t.shift is None and t.header[-1] == 0


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_an_interrupt_before_the_restoring_step_leaves_sam_perturbed(backend, monkeypatch):
    """A Ctrl-C while the offsets are set (before the base step): the
    params still at p + e and flagged so (once it left them perturbed,
    flagged not), no offset pending, and the step can be taken again."""
    params = [np.ones(5), np.full(3, 2.0)]
    sam = fastopt.SAM(fastopt.SGD(params, lr=0.1, backend=backend), rho=0.5)
    grads = [np.ones(5), np.ones(3)]
    for _ in range(2):                    # the second one plans the fused restore
        sam.perturb(grads)
        sam.step(grads)
    sam.perturb(grads)
    before = [p.copy() for p in params]
    real, calls = StepTable.set_shift, []

    def interrupted(self, offsets):
        real(self, offsets)
        calls.append(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(StepTable, "set_shift", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sam.step(grads)
    monkeypatch.undo()
    assert calls and sam.perturbed
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p, b)
    assert all(t.shift is None for t in sam.base_optimizer._all_tables)
    sam.step(grads)
    assert not sam.perturbed
