"""SAM (Foret et al. 2021) and ASAM (Kwon et al. 2021) around fastopt's optimizers.

Each step is checked against the paper's two-step update written out in
NumPy below (the perturbation, the gradient there, the restore, the base
optimizer's step), on every host backend, for the layouts users hold
params in, and for SGD with momentum and AdamW as the base.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastopt
from conftest import BACKENDS, FAST_BACKENDS, LARGE, assert_same_tree, rng_array

SHAPES = [(6, 4), (4,), (3, 1, 5), (7,)]
STEPS = 8
RHO = 0.05
TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}
LAYOUTS = ["list", "dict", "packed"]


def grad_at(params):
    """A smooth gradient field, so the gradient at the perturbed point differs."""
    return [np.sin(3 * p) + p * p * p * p.dtype.type(0.2) - p.dtype.type(0.1) for p in params]


# -- the paper's update, in NumPy ------------------------------------------------------

def paper_perturbation(params, grads, rho, adaptive):
    r"""Algorithm 1 of Foret et al.: :math:`\hat e = \rho g / \lVert g \rVert`; ASAM
    (Kwon et al., eq. 5 with :math:`T_w = |w|`): :math:`\rho T_w^2 g / \lVert T_w g \rVert`."""
    t = [np.abs(p.astype(np.float64)) if adaptive else 1.0 for p in params]
    norm = np.sqrt(sum(np.sum((tw * g.astype(np.float64)) ** 2) for tw, g in zip(t, grads)))
    return [(rho / norm * tw * tw * g.astype(np.float64)).astype(p.dtype)
            for tw, g, p in zip(t, grads, params)]


class PaperSGD:
    """torch.optim.SGD with momentum: b = mu b + g (b_1 = g), p -= lr b."""

    def __init__(self, lr=0.05, momentum=0.9):
        self.lr, self.mu, self.buf = lr, momentum, None

    def make(self, params, backend):
        return fastopt.SGD(params, lr=self.lr, momentum=self.mu, backend=backend)

    def step(self, params, grads):
        self.buf = ([g.copy() for g in grads] if self.buf is None else
                    [self.mu * b + g for b, g in zip(self.buf, grads)])
        return [p - self.lr * b for p, b in zip(params, self.buf)]


class PaperAdamW:
    """torch.optim.AdamW (Loshchilov & Hutter, Algorithm 2)."""

    def __init__(self, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.m = self.v = None
        self.t = 0

    def make(self, params, backend):
        return fastopt.AdamW(params, lr=self.lr, betas=(self.b1, self.b2), eps=self.eps,
                             weight_decay=self.wd, backend=backend)

    def step(self, params, grads):
        self.t += 1
        if self.m is None:
            self.m = [np.zeros_like(g, np.float64) for g in grads]
            self.v = [np.zeros_like(g, np.float64) for g in grads]
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.astype(np.float64)
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            mhat = self.m[i] / (1 - self.b1 ** self.t)
            vhat = self.v[i] / (1 - self.b2 ** self.t)
            q = p.astype(np.float64) * (1 - self.lr * self.wd)
            out.append((q - self.lr * mhat / (np.sqrt(vhat) + self.eps)).astype(p.dtype))
        return out


def paper_run(init, base, rho, adaptive, steps=STEPS):
    params = [a.copy() for a in init]
    for _ in range(steps):
        e = paper_perturbation(params, grad_at(params), rho, adaptive)
        g = grad_at([p + ei for p, ei in zip(params, e)])
        params = base.step(params, g)
    return params


# -- fastopt's side: params and grads as the user holds them -----------------------------

class Layout:
    def __init__(self, init, layout):
        self.layout = layout
        if layout == "packed":
            self.params = fastopt.pack([a.copy() for a in init])
            self.arrays = list(self.params)
            self.buf = self.params.zeros_like()
        elif layout == "dict":
            self.arrays = [a.copy() for a in init]
            self.params = {f"w{i}": a for i, a in enumerate(self.arrays)}
        else:
            self.params = self.arrays = [a.copy() for a in init]

    def grads(self):
        g = grad_at(self.arrays)
        if self.layout == "packed":
            for view, x in zip(self.buf, g):
                view[...] = x
            return self.buf
        if self.layout == "dict":
            return {f"w{i}": x for i, x in enumerate(g)}
        return g


def sam_step(sam, side):
    sam.perturb(side.grads())
    return sam.step(side.grads())


def make(dtype, layout="list", backend="numpy", base=PaperSGD, seed=0, **kw):
    rng = np.random.default_rng(seed)
    init = [rng_array(rng, s, dtype) for s in SHAPES]
    side = Layout(init, layout)
    sam = fastopt.SAM(base().make(side.params, backend), **{"rho": RHO, **kw})
    return init, side, sam


def assert_params(side, want, dtype, what=""):
    tol = TOL[np.dtype(dtype)]
    for i, (p, w) in enumerate(zip(side.arrays, want)):
        assert p.dtype == w.dtype
        np.testing.assert_allclose(p, w, rtol=tol, atol=tol, err_msg=f"{what} param {i}")


@pytest.mark.parametrize("base", [PaperSGD, PaperAdamW], ids=["sgd", "adamw"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_matches_the_paper(backend, dtype, layout, adaptive, base):
    init, side, sam = make(dtype, layout, backend, base, adaptive=adaptive)
    for _ in range(STEPS):
        sam_step(sam, side)
    assert not sam.perturbed and sam.iterations == STEPS
    assert_params(side, paper_run(init, base(), RHO, adaptive), dtype)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_large_arrays_take_the_threaded_path(backend, adaptive):
    """A group past the serial size: the tasks' partial norms are added in
    order, so the threaded result is the reference's to rounding."""
    rng = np.random.default_rng(1)
    init = [rng_array(rng, (LARGE,), np.float64), rng_array(rng, (5, 3), np.float64)]
    mine = [a.copy() for a in init]
    sam = fastopt.SAM(fastopt.SGD(mine, lr=0.1, backend=backend), rho=0.5, adaptive=adaptive)
    ref = [a.copy() for a in init]
    ref_sam = fastopt.SAM(fastopt.SGD(ref, lr=0.1, backend="numpy"), rho=0.5,
                          adaptive=adaptive)
    for _ in range(3):
        for s, ps in ((sam, mine), (ref_sam, ref)):
            s.perturb(grad_at(ps))
            s.step(grad_at(ps))
        assert sam.grad_norm == pytest.approx(ref_sam.grad_norm, rel=1e-12)
    for a, b in zip(mine, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_the_perturbation_is_rho_along_the_gradient():
    """After perturb: p moved by exactly e = rho g / ||g|| (||e|| = rho), and
    step restores p before the base step (SGD lr=0: back where it started)."""
    init, side, sam = make(np.float64)
    sam.base_optimizer.param_groups[0].update(lr=0.0, momentum=0.0)
    g = side.grads()
    norm = sam.perturb(g)
    assert norm == pytest.approx(np.sqrt(sum(np.sum(x * x) for x in g)), rel=1e-14)
    moved = [p - a for p, a in zip(side.arrays, init)]
    assert np.sqrt(sum(np.sum(d * d) for d in moved)) == pytest.approx(RHO, rel=1e-12)
    e = np.concatenate([x.reshape(-1) for x in g]) * (RHO / norm)
    np.testing.assert_allclose(sam.state[0]["e_w"], e, rtol=1e-15)
    sam.step(side.grads())
    for p, a in zip(side.arrays, init):
        np.testing.assert_allclose(p, a, rtol=0, atol=1e-16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_groups_share_one_global_norm(backend):
    """The norm runs over every group (here float32 and float64, two lrs)."""
    rng = np.random.default_rng(2)
    a32 = [rng_array(rng, s, np.float32) for s in SHAPES[:2]]
    a64 = [rng_array(rng, s, np.float64) for s in SHAPES[2:]]
    mine = [a.copy() for a in a32 + a64]
    opt = fastopt.SGD([{"params": mine[:2], "lr": 0.1}, {"params": mine[2:], "lr": 0.02}],
                      backend=backend)
    sam = fastopt.SAM(opt, rho=RHO)
    ref = [a.copy() for a in a32 + a64]
    for _ in range(4):
        sam.perturb(grad_at(mine))
        sam.step(grad_at(mine))
        e = paper_perturbation(ref, grad_at(ref), RHO, False)
        g = grad_at([p + x for p, x in zip(ref, e)])
        ref = [p - p.dtype.type(lr) * x for p, x, lr in zip(ref, g, [0.1, 0.1, 0.02, 0.02])]
    for i, (p, w) in enumerate(zip(mine, ref)):
        tol = TOL[p.dtype]
        np.testing.assert_allclose(p, w, rtol=tol, atol=tol, err_msg=f"param {i}")


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradient_gives_no_perturbation(backend, adaptive):
    init, side, sam = make(np.float32, backend=backend, adaptive=adaptive)
    zeros = [np.zeros_like(a) for a in side.arrays]
    assert sam.perturb(zeros) == 0.0
    assert sam.perturbed
    assert not np.any(sam.state[0]["e_w"]) and np.isfinite(sam.state[0]["e_w"]).all()
    for p, a in zip(side.arrays, init):
        np.testing.assert_array_equal(p, a)


# -- errors leave everything as it was ---------------------------------------------------

def _snapshot(sam, side):
    return {"params": [p.copy() for p in side.arrays],
            "sam": sam.state_dict()}


def assert_refused(sam, side, call, exc, match=None):
    """``call()`` raises ``exc`` and leaves params and state as they were."""
    before = _snapshot(sam, side)
    with pytest.raises(exc, match=match):
        call()
    assert_same_tree(_snapshot(sam, side), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_without_perturb_is_refused(backend):
    _, side, sam = make(np.float64, backend=backend)
    assert_refused(sam, side, lambda: sam.step(side.grads()), RuntimeError, "without perturb")


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturb_twice_is_refused(backend):
    _, side, sam = make(np.float64, backend=backend)
    sam.perturb(side.grads())
    assert_refused(sam, side, lambda: sam.perturb(side.grads()), RuntimeError, "twice")
    sam.step(side.grads())        # and the pair still completes
    assert not sam.perturbed


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_grads_are_refused_before_writing(backend, layout):
    _, side, sam = make(np.float32, layout, backend)
    good = grad_at(side.arrays)
    bad = {
        "too few": (good[:-1], ValueError),
        "a shape": (good[:1] + [np.zeros((2, 2), np.float32)] + good[2:], ValueError),
        "a dtype": ([g.astype(np.float64) for g in good], TypeError),
        "integers": ([np.ones(s, np.int32) for s in SHAPES], TypeError),
        "a param itself": ([side.arrays[0]] + good[1:], ValueError),
    }
    if layout == "dict":
        bad = {k: ({f"w{i}": x for i, x in enumerate(v)}, exc) for k, (v, exc) in bad.items()}
        bad["a missing key"] = ({"w0": good[0]}, (KeyError, ValueError))
    for half in ("perturb", "step"):
        if half == "step":
            sam.perturb(side.grads())     # the step's checks come while perturbed
        for what, (grads, exc) in bad.items():
            assert_refused(sam, side, lambda: getattr(sam, half)(grads), exc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_grads_skip_the_perturbation(backend):
    """NaN/inf: nothing written, a warning, and the step is the base's plain step."""
    init, side, sam = make(np.float64, backend=backend)
    before = _snapshot(sam, side)
    grads = grad_at(side.arrays)
    grads[2][0, 0, 3] = np.nan
    with pytest.warns(RuntimeWarning, match="not perturbed"):
        norm = sam.perturb(grads)
    assert np.isnan(norm) and not sam.perturbed and sam.skipped_perturbs == 1
    assert_same_tree(_snapshot(sam, side)["params"], before["params"])
    sam.step(side.grads())            # the base optimizer's step at p
    plain = [a.copy() for a in init]
    fastopt.SGD(plain, lr=0.05, momentum=0.9, backend="numpy").step(grad_at(plain))
    for p, w in zip(side.arrays, plain):
        np.testing.assert_allclose(p, w, rtol=1e-12)
    with pytest.raises(RuntimeError, match="without perturb"):
        sam.step(side.grads())        # the skip covered one step only
    grads[2][0, 0, 3] = np.inf
    with pytest.warns(RuntimeWarning):
        sam.perturb(grads)
    assert sam.skipped_perturbs == 2


def test_constructor_checks():
    p = [np.zeros(3, np.float32)]
    opt = fastopt.SGD(p, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        fastopt.SAM(opt, rho=-0.1)
    with pytest.raises(TypeError, match="adaptive"):
        fastopt.SAM(opt, adaptive="yes")
    with pytest.raises(TypeError, match="base_optimizer"):
        fastopt.SAM(object())
    with pytest.raises(TypeError, match="not another SAM"):
        fastopt.SAM(fastopt.SAM(opt))
    with pytest.raises(ValueError, match="no params yet"):
        fastopt.SAM(fastopt.AdamW(lr=1e-3))
    ml_dtypes = pytest.importorskip("ml_dtypes")
    low = fastopt.AdamW([np.zeros(3, ml_dtypes.bfloat16)], lr=1e-3)
    with pytest.raises(TypeError, match="float32 or float64"):
        fastopt.SAM(low)


# -- state: param groups shared, checkpoints resume exactly ---------------------------------

def test_param_groups_and_schedules_are_the_base_optimizers():
    rng = np.random.default_rng(3)
    params = [rng_array(rng, s, np.float64) for s in SHAPES]
    sched = fastopt.schedules.warmup_cosine(0.1, 2, 10)
    sam = fastopt.SAM(fastopt.SGD(params, lr=sched), rho=RHO)
    assert sam.param_groups is sam.base_optimizer.param_groups
    assert sam.lr_schedule(0) is sched
    lrs = []
    for _ in range(4):
        sam.perturb(grad_at(params))
        sam.step(grad_at(params))
        lrs.append(sam.last_lr[0])
    assert lrs == pytest.approx([sched(k) for k in range(4)])
    sam.param_groups[0]["lr"] = 0.0          # a number written over it: no schedule, no move
    before = [p.copy() for p in params]
    sam.perturb(grad_at(params))
    sam.step(grad_at(params))
    assert sam.lr_schedule(0) is None and sam.last_lr == [0.0]
    for p, b in zip(params, before):          # back to p, to the rounding of (p + e) - e
        np.testing.assert_allclose(p, b, rtol=1e-15, atol=1e-16)


@pytest.mark.parametrize("mid", ["between", "after"])
@pytest.mark.parametrize("layout", ["list", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_resumes_bit_exactly(tmp_path, backend, layout, mid):
    """Save after 3 steps (and, "between", after the 4th perturb), load into a
    new SAM over new arrays: the rest of the run is bit for bit the same."""
    _, side, sam = make(np.float32, layout, backend, PaperAdamW, adaptive=True)
    for _ in range(3):
        sam_step(sam, side)
    if mid == "between":
        sam.perturb(side.grads())
    path = tmp_path / "ckpt.npz"
    fastopt.save(path, params=side.arrays, optimizer=sam)
    # the uninterrupted run
    if mid == "between":
        sam.step(side.grads())
    for _ in range(3):
        sam_step(sam, side)
    # a fresh SAM, other starting values, resumed from the file
    _, side2, sam2 = make(np.float32, layout, backend, PaperAdamW, seed=9, adaptive=True)
    fastopt.load(path, params=side2.arrays, optimizer=sam2)
    assert sam2.perturbed == (mid == "between")
    if mid == "between":
        sam2.step(side2.grads())
    for _ in range(3):
        sam_step(sam2, side2)
    assert_same_tree(_snapshot(sam2, side2), _snapshot(sam, side))


def test_checkpoint_mismatch_changes_nothing():
    _, side, sam = make(np.float64)
    sam.perturb(side.grads())
    sd = sam.state_dict()
    _, side2, sam2 = make(np.float64, seed=4)
    for bad, match in ((dict(sd, type="SGD"), "type"),
                       (dict(sd, e_w=[sd["e_w"][0][:-1]]), "e_w"),
                       (dict(sd, e_w=None), "e_w"),
                       (dict(sd, base=dict(sd["base"], type="AdamW")), "type"),
                       ({k: v for k, v in sd.items() if k != "rho"}, "missing")):
        assert_refused(sam2, side2, lambda: sam2.load_state_dict(bad), ValueError, match)
    with pytest.warns(UserWarning, match="rho"):
        sam2.load_state_dict(dict(sd, rho=0.1))
    assert sam2.rho == 0.1 and sam2.perturbed


def test_no_warning_in_a_plain_run():
    _, side, sam = make(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            sam_step(sam, side)


def test_a_maximizing_base_is_refused_and_nothing_moves():
    # e ascends the loss; for a maximizer that is the best nearby point, so
    # SAM took maximize=True silently the wrong way
    with pytest.raises(ValueError, match="maximize=True"):
        fastopt.SAM(fastopt.SGD([np.ones(2)], lr=0.1, maximize=True))
    p = [np.ones(2), np.ones(3)]
    sam = fastopt.SAM(fastopt.SGD([{"params": [p[0]]}, {"params": [p[1]]}], lr=0.1))
    sam.param_groups[1]["maximize"] = True
    with pytest.raises(ValueError, match=r"param_groups\[1\] has maximize=True"):
        sam.perturb([np.ones(2), np.ones(3)])
    assert not sam.perturbed
    np.testing.assert_array_equal(p[0], 1.0)
    np.testing.assert_array_equal(p[1], 1.0)


def test_a_none_gradient_by_name_is_named_by_its_keys():
    params = {"bb": {"W": np.ones(2)}, "h0": {"W": np.ones(2)}}
    sam = fastopt.SAM(fastopt.Adam(fastopt.group_params(
        params, lambda n, a: {"lr": 0.1} if n.startswith("h0") else None)))
    with pytest.raises(TypeError, match=r"^grads\['h0'\]\['W'\] is None: SAM steps every param"):
        sam.perturb({"bb": {"W": np.ones(2)}, "h0": None})
