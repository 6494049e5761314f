"""Bad input gets a clear error, and nothing is lost.

Every rejected call must raise ValueError/TypeError naming the offending
argument, and leave parameters and optimizer state bit-identical to what
they were (checked after a few valid steps, so that state exists). After a
rejected step the optimizer must carry on exactly like a twin that never
saw the bad call.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastopt
from conftest import (BACKENDS, assert_bit_identical, assert_same_tree,
                      optimizer_snapshot, rng_array)

# Two params share a shape, so a gradient can alias a *different* param.
SHAPES = [(4, 3), (3,), (4, 3)]
OPTIMIZERS = {
    "Adam": lambda p, **kw: fastopt.Adam(p, lr=1e-2, amsgrad=True, weight_decay=0.1, **kw),
    "AdamW": lambda p, **kw: fastopt.AdamW(p, lr=1e-2, **kw),
    "SGD": lambda p, **kw: fastopt.SGD(p, lr=0.1, momentum=0.9, **kw),
}
LAYOUTS = ["flat", "list"]


def make_params(layout, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng_array(rng, s, dtype) for s in SHAPES]
    return fastopt.pack(arrays) if layout == "flat" else arrays


def good_grads(params, seed):
    """Valid gradients for ``params``: FlatArrays for a FlatArrays, else a list."""
    rng = np.random.default_rng(seed)
    if isinstance(params, fastopt.FlatArrays):
        g = params.zeros_like()
        for view in g:
            view[...] = rng_array(rng, view.shape, view.dtype)
        return g
    return [rng_array(rng, p.shape, p.dtype) for p in params]


def trained_pair(name, layout, backend, groups=False, **kw):
    """Two identical optimizers (and their params), 3 valid steps in."""
    pair = []
    for _ in range(2):
        params = make_params(layout)
        spec = ([{"params": list(params[:2])}, {"params": [params[2]], "lr": 0.05}]
                if groups else params)
        opt = OPTIMIZERS[name](spec, backend=backend, **kw)
        for t in range(3):
            opt.step(good_grads(params, seed=t))
        pair.append((opt, params))
    return pair


def assert_rejected_then_unchanged(pair, call, exc, match):
    """``call(opt, params)`` raises; state is untouched; the optimizer goes on
    bit for bit like its twin."""
    (opt, params), (twin, twin_params) = pair
    before = optimizer_snapshot(opt, params)
    with pytest.raises(exc, match=match):
        call(opt, params)
    assert_same_tree(optimizer_snapshot(opt, params), before)
    opt.step(good_grads(params, seed=99))
    twin.step(good_grads(twin_params, seed=99))
    assert_same_tree(optimizer_snapshot(opt, params), optimizer_snapshot(twin, twin_params))


def as_list(grads):
    return [np.array(g, copy=True) for g in grads]


def _replace(grads, i, new):
    grads = as_list(grads)
    grads[i] = new
    return grads


def _overlapping_view(params):
    """A gradient for params[1] that straddles params[0]/params[1] in memory
    (FlatArrays) or shares memory with params[0] (separate arrays)."""
    if isinstance(params, fastopt.FlatArrays):
        n = params[1].size
        return params.data[params.offsets[1] - 1:params.offsets[1] - 1 + n]
    return params[0].reshape(-1)[:3]


# (id, grads builder, exception, message pattern)
BAD_GRADS = [
    ("too-few", lambda p, g: as_list(g)[:-1], ValueError, r"grads has 2 arrays but params has 3"),
    ("too-many", lambda p, g: as_list(g) + [as_list(g)[0]], ValueError, r"grads has 4 arrays"),
    ("shape", lambda p, g: _replace(g, 1, np.zeros(4, p[1].dtype)), ValueError,
     r"grads\[1\] has shape \(4,\) but params\[1\] has shape \(3,\)"),
    ("dtype", lambda p, g: _replace(g, 0, np.asarray(g[0], np.float64)), TypeError,
     r"grads\[0\] has dtype float64 but params\[0\] has dtype float32"),
    ("int-dtype", lambda p, g: _replace(g, 2, np.ones(SHAPES[2], np.int32)), TypeError,
     r"grads\[2\] must be float32 or float64"),
    ("float16", lambda p, g: _replace(g, 1, np.ones(3, np.float16)), TypeError,
     r"grads\[1\] must be float32 or float64"),
    ("not-an-array", lambda p, g: _replace(g, 1, [0.0, 0.0, 0.0]), TypeError,
     r"grads\[1\] must be an ndarray"),
    ("not-a-list", lambda p, g: 3.0, TypeError, r"grads must be an ndarray or a list"),
    ("dict", lambda p, g: {"a": g[0]}, TypeError, r"grads must be"),
    ("params-themselves", lambda p, g: list(p), ValueError, r"overlaps"),
    ("other-param", lambda p, g: _replace(g, 0, p[2]), ValueError,
     r"grads\[0\] overlaps params\[2\]|params\[2\] overlaps grads\[0\]"),
    ("overlapping-view", lambda p, g: _replace(g, 1, _overlapping_view(p)), ValueError,
     r"overlaps"),
    # read through a copy, but a param's own view given as its gradient is the
    # same mistake as the param itself
    ("strided-view-of-a-param", lambda p, g: _replace(g, 0, p[0][::-1]), ValueError,
     r"grads\[0\] overlaps params\[0\]"),
    ("flat-wrong-shapes", lambda p, g: fastopt.flat_zeros([(3, 4), (3,), (4, 3)], np.float32),
     ValueError, r"grads\[0\] has shape \(3, 4\)"),
    ("flat-wrong-count", lambda p, g: fastopt.flat_zeros(SHAPES[:2], np.float32),
     ValueError, r"grads has 2 arrays but params has 3"),
    ("flat-wrong-dtype", lambda p, g: fastopt.flat_zeros(SHAPES, np.float64), TypeError,
     r"grads\[0\] has dtype float64"),
    ("flat-int", lambda p, g: fastopt.flat_zeros(SHAPES, np.int64), TypeError,
     r"grads\[0\] must be float32 or float64"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("build,exc,match", [c[1:] for c in BAD_GRADS],
                         ids=[c[0] for c in BAD_GRADS])
def test_bad_grads_rejected_without_writing(name, layout, backend, build, exc, match):
    pair = trained_pair(name, layout, backend)

    def call(opt, params):
        opt.step(build(params, good_grads(params, seed=5)))

    assert_rejected_then_unchanged(pair, call, exc, match)


def _strided_like(g, how):
    """``g``'s values in a layout that is not C-contiguous."""
    if how == "fortran":
        return np.asfortranarray(g)
    if how == "transposed":                      # (dY.T @ X).T of hand-written backprop
        return np.ascontiguousarray(g.T).T
    wide = np.zeros(g.shape + (2,), g.dtype)     # a strided view: every other element
    wide[..., 0] = g
    return wide[..., 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("how", ["fortran", "transposed", "strided"])
def test_strided_grads_step_as_their_contiguous_copies(name, backend, how):
    """torch steps any strided gradient; ours were refused ("must be
    C-contiguous"), so a hand-written backward pass's ``(dY.T @ X).T``
    broke the one-line swap. Read through a C-ordered copy: the same step,
    bit for bit, and the next step takes contiguous grads again."""
    (opt, params), (twin, twin_params) = trained_pair(name, "list", backend)
    plan = opt._plan
    for seed in (5, 6):
        g = good_grads(params, seed)
        odd = [_strided_like(a, how) if a.ndim == 2 or how == "strided" else a for a in g]
        assert not all(a.flags.c_contiguous for a in odd)
        opt.step(odd)
        # the copies took the step's fast path (a full step makes the plan again)
        assert opt._plan is plan
        twin.step(g)
        assert_same_tree(optimizer_snapshot(opt, params),
                         optimizer_snapshot(twin, twin_params))
    opt.step(good_grads(params, 7))
    twin.step(good_grads(twin_params, 7))
    assert_same_tree(optimizer_snapshot(opt, params), optimizer_snapshot(twin, twin_params))


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalar_grad_of_a_0d_param_steps_as_its_array(backend):
    """``(x * s).sum()`` is a NumPy scalar, not a 0-d array: torch takes a
    0-d tensor there, and a list or dict of grads with one was refused."""
    params = {"W": np.ones((3, 2)), "s": np.array(0.5)}
    twin = {k: v.copy() for k, v in params.items()}
    opt = fastopt.Adam(params, lr=0.1, backend=backend)
    ref = fastopt.Adam(twin, lr=0.1, backend=backend)
    for t in range(4):
        # a NumPy scalar, or a Python float (a hand-written formula, .item())
        s = np.float64(0.3 - t) if t % 2 else float(0.3 - t)
        opt.step({"W": np.full((3, 2), 0.1 * t), "s": s})
        ref.step({"W": np.full((3, 2), 0.1 * t), "s": np.array(0.3 - t)})
        assert_same_tree(optimizer_snapshot(opt, list(params.values())),
                         optimizer_snapshot(ref, list(twin.values())))
    assert params["s"] != 0.5
    p32 = [np.array(1.0, np.float32)]
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype float64 but params\[0\] "
                                        r"has dtype float32"):
        fastopt.SGD(p32, lr=0.1, backend=backend).step([np.float64(1.0)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_a_python_number_for_a_0d_param_takes_its_dtype(backend, dtype):
    """A hand-written 0-d gradient as a Python float or int (a student's
    ``opt.step([1])``): as torch's ``torch.tensor(1.0)`` takes the default
    float type, it takes the param's dtype (an int said "must be an
    ndarray", a float for a float32 param "has dtype float64")."""
    p, twin = [np.array(0.5, dtype), np.ones(2, dtype)], [np.array(0.5, dtype), np.ones(2, dtype)]
    opt = fastopt.Adam(p, lr=0.1, backend=backend)
    ref = fastopt.Adam(twin, lr=0.1, backend=backend)
    for g in (1, 2.5, -3, 0.25):
        opt.step([g, np.ones(2, dtype)])
        ref.step([np.array(g, dtype), np.ones(2, dtype)])
        assert_same_tree(optimizer_snapshot(opt, p), optimizer_snapshot(ref, twin))
    assert p[0].dtype == dtype and p[0] != 0.5
    with pytest.raises(TypeError, match=r"grads\[0\] must be an ndarray, got bool"):
        opt.step([True, np.ones(2, dtype)])
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(\) but params\[1\]"):
        opt.step([1.0, 1.0])        # only a 0-d param's: not broadcast over an array


def test_sam_and_functional_take_strided_grads():
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal((4, 3)), rng.standard_normal(3)]
    odd = [np.asfortranarray(grads[0]), np.stack([grads[1], grads[1]], axis=1)[:, 0]]
    p1, p2 = [np.ones((4, 3)), np.zeros(3)], [np.ones((4, 3)), np.zeros(3)]
    s1 = fastopt.SAM(fastopt.SGD(p1, lr=0.1), rho=0.05)
    s2 = fastopt.SAM(fastopt.SGD(p2, lr=0.1), rho=0.05)
    s1.perturb(odd)
    s2.perturb(grads)
    s1.step(odd)
    s2.step(grads)
    for a, b in zip(p1, p2):
        assert_bit_identical(a, b)
    q1, q2 = [np.ones((4, 3)), np.zeros(3)], [np.ones((4, 3)), np.zeros(3)]
    m1, m2 = [np.zeros_like(a) for a in q1], [np.zeros_like(a) for a in q2]
    v1, v2 = [np.zeros_like(a) for a in q1], [np.zeros_like(a) for a in q2]
    fastopt.functional.adam(q1, odd, m1, v1, step=1, lr=0.1)
    fastopt.functional.adam(q2, grads, m2, v2, step=1, lr=0.1)
    for a, b in zip(q1 + m1 + v1, q2 + m2 + v2):
        assert_bit_identical(a, b)
    with pytest.raises(ValueError, match=r"params\[0\] must be C-contiguous"):
        fastopt.functional.adam([np.ones((3, 4)).T], [np.ones((4, 3))], [np.zeros((4, 3))],
                                [np.zeros((4, 3))], step=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_flat_grads_aliasing_flat_params(name, backend):
    pair = trained_pair(name, "flat", backend)
    assert_rejected_then_unchanged(pair, lambda opt, params: opt.step(params),
                                   ValueError, r"overlaps")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_flat_grads_partially_overlapping_flat_params(name):
    """Gradient buffer and parameter buffer are shifted windows of one array."""
    n = sum(math.prod(s) for s in SHAPES)
    big = np.zeros(2 * n, np.float32)
    params = fastopt.FlatArrays(big[:n], SHAPES)
    params.data[:] = 1.0
    grads = fastopt.FlatArrays(big[n - 1:2 * n - 1], SHAPES)
    opt = OPTIMIZERS[name](params)
    opt.step(good_grads(params, 0))
    before = optimizer_snapshot(opt, params)
    big_before = big.copy()
    with pytest.raises(ValueError, match="overlaps"):
        opt.step(grads)
    assert_same_tree(optimizer_snapshot(opt, params), before)
    assert_bit_identical(big, big_before)


# Group edits between steps: re-validated at every step, before any write.
BAD_GROUP_EDITS = {
    "Adam": [
        ("lr", -1e-3, ValueError, r"param_groups\[{g}\]\['lr'\] must be >= 0"),
        ("lr", float("nan"), ValueError, r"param_groups\[{g}\]\['lr'\] must be finite"),
        ("lr", float("inf"), ValueError, r"param_groups\[{g}\]\['lr'\] must be finite"),
        ("lr", "0.1", TypeError, r"param_groups\[{g}\]\['lr'\] must be a real number"),
        ("betas", (1.0, 0.999), ValueError, r"param_groups\[{g}\]\['betas'\]\[0\] must be < 1.0"),
        ("betas", (0.9, -0.1), ValueError, r"param_groups\[{g}\]\['betas'\]\[1\] must be >= 0"),
        ("betas", 0.9, TypeError, r"param_groups\[{g}\]\['betas'\] must be a pair"),
        ("eps", 0.0, ValueError, r"param_groups\[{g}\]\['eps'\] must be > 0"),
        ("weight_decay", -0.1, ValueError, r"param_groups\[{g}\]\['weight_decay'\]"),
        ("amsgrad", "yes", TypeError, r"param_groups\[{g}\]\['amsgrad'\] must be a bool"),
        ("maximize", 1, TypeError, r"param_groups\[{g}\]\['maximize'\] must be a bool"),
    ],
    "SGD": [
        ("lr", -0.1, ValueError, r"param_groups\[{g}\]\['lr'\]"),
        ("momentum", -0.5, ValueError, r"param_groups\[{g}\]\['momentum'\]"),
        ("weight_decay", -1.0, ValueError, r"param_groups\[{g}\]\['weight_decay'\]"),
        ("nesterov", None, TypeError, r"param_groups\[{g}\]\['nesterov'\] must be a bool"),
    ],
}
BAD_GROUP_CASES = [(name, g, *case) for name, cases in BAD_GROUP_EDITS.items()
                   for case in cases for g in (0, 1)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,group,key,value,exc,match", BAD_GROUP_CASES,
                         ids=[f"{c[0]}-g{c[1]}-{c[2]}={c[3]!r}" for c in BAD_GROUP_CASES])
def test_bad_group_edit_rejected_at_step(name, group, key, value, exc, match, layout):
    """An invalid value in group 1 must not let group 0 be stepped first."""
    pair = trained_pair(name, layout, "auto", groups=True)

    def call(opt, params):
        good = opt.param_groups[group][key]
        opt.param_groups[group][key] = value
        try:
            opt.step(good_grads(params, seed=7))
        finally:
            opt.param_groups[group][key] = good

    assert_rejected_then_unchanged(pair, call, exc, match.format(g=group))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("edit", [dict(nesterov=True, momentum=0.0),
                                  dict(nesterov=True, dampening=0.1)])
def test_sgd_nesterov_edit_rejected_at_step(layout, edit):
    pair = trained_pair("SGD", layout, "auto", groups=True)

    def call(opt, params):
        saved = dict(opt.param_groups[1])
        opt.param_groups[1].update(edit)
        try:
            opt.step(good_grads(params, seed=7))
        finally:
            opt.param_groups[1].clear()
            opt.param_groups[1].update(saved)

    assert_rejected_then_unchanged(pair, call, ValueError,
                                   r"param_groups\[1\].*nesterov needs momentum > 0")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("value,exc", [(0.0, ValueError), (-1.0, ValueError),
                                       (float("nan"), ValueError), ("1", TypeError)])
def test_bad_max_grad_norm_attribute_rejected_at_step(name, value, exc):
    pair = trained_pair(name, "flat", "auto", max_grad_norm=1.0)

    def call(opt, params):
        opt.max_grad_norm = value
        try:
            opt.step(good_grads(params, seed=7))
        finally:
            opt.max_grad_norm = 1.0

    assert_rejected_then_unchanged(pair, call, exc, r"max_grad_norm")


# -- construction ----------------------------------------------------------------

def _params(dtype=np.float32):
    return [np.ones((4, 3), dtype), np.ones(3, dtype)]


def _readonly():
    p = _params()
    p[1].flags.writeable = False
    return p


def _overlapping():
    buf = np.zeros(20, np.float32)
    return [buf[:10], buf[5:15]]


def _noncontiguous():
    return [np.ones((4, 3), np.float32), np.ones((3, 2), np.float32)[:, 0]]


_shared = np.ones(5, np.float32)

BAD_CONSTRUCTION = [
    ("noncontiguous", "SGD", dict(params=_noncontiguous()), ValueError,
     r"params\[1\] must be C-contiguous"),
    ("fortran", "Adam", dict(params=[np.asfortranarray(np.ones((4, 3), np.float32))]),
     ValueError, r"params\[0\] must be C-contiguous"),
    ("readonly", "Adam", dict(params=_readonly()), ValueError,
     r"params\[1\] is read-only"),
    ("int", "SGD", dict(params=[np.ones(3, np.int64)]), TypeError,
     r"params\[0\] must be float32 or float64"),
    # float16/bfloat16 params are supported since mixed precision (issue #4)
    ("longdouble", "Adam", dict(params=[np.ones(3, np.longdouble)]), TypeError,
     r"must be float32 or float64"),
    ("duplicate", "Adam", dict(params=[_shared, np.ones(2), _shared]), ValueError,
     r"params\[2\] overlaps params\[0\]|params\[0\] overlaps params\[2\]"),
    ("duplicate-across-groups", "SGD",
     dict(params=[{"params": [_shared]}, {"params": [_shared], "lr": 0.1}]), ValueError,
     r"overlaps"),
    ("overlapping-views", "AdamW", dict(params=_overlapping()), ValueError, r"overlaps"),
    ("not-an-array", "SGD", dict(params=[np.ones(3), [1.0, 2.0]]), TypeError,
     r"params\[1\] must be an ndarray"),
    ("scalar", "SGD", dict(params=3.0), TypeError, r"params must be"),
    ("empty", "Adam", dict(params=[]), ValueError, r"params is empty"),
    ("empty-group", "Adam", dict(params=[{"params": []}]), ValueError,
     r"param group 0 has no parameters"),
    ("group-without-params", "Adam", dict(params=[{"lr": 0.1}]), ValueError,
     r"param group 0 has no 'params' key"),
    ("unknown-group-key", "Adam", dict(params=[{"params": _params(), "lrr": 0.1}]),
     ValueError, r"param group 0 has unknown keys \['lrr'\]"),
    ("unknown-group-key-2", "SGD",
     dict(params=[{"params": _params()[:1]}, {"params": _params()[1:], "betas": (0.9, 0.9)}]),
     ValueError, r"param group 1 has unknown keys \['betas'\]"),
    ("lr<0", "Adam", dict(lr=-1e-3), ValueError, r"^lr must be >= 0"),
    ("lr-nan", "SGD", dict(lr=float("nan")), ValueError, r"^lr must be finite"),
    ("lr-str", "AdamW", dict(lr="1e-3"), TypeError, r"^lr must be a real number"),
    ("lr-bool", "AdamW", dict(lr=True), TypeError, r"^lr must be a real number"),
    ("beta1=1", "Adam", dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be < 1.0"),
    ("beta1<0", "Adam", dict(betas=(-0.1, 0.999)), ValueError, r"betas\[0\] must be >= 0"),
    ("beta2=1", "AdamW", dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be < 1.0"),
    ("beta2>1", "AdamW", dict(betas=(0.9, 1.5)), ValueError, r"betas\[1\]"),
    ("betas-scalar", "Adam", dict(betas=0.9), TypeError, r"betas must be a pair"),
    ("betas-triple", "Adam", dict(betas=(0.9, 0.99, 0.999)), TypeError, r"betas must be a pair"),
    ("eps=0", "Adam", dict(eps=0.0), ValueError, r"^eps must be > 0"),
    ("eps<0", "AdamW", dict(eps=-1e-8), ValueError, r"^eps must be > 0"),
    ("wd<0", "AdamW", dict(weight_decay=-0.01), ValueError, r"^weight_decay must be >= 0"),
    ("sgd-wd<0", "SGD", dict(weight_decay=-0.01), ValueError, r"^weight_decay must be >= 0"),
    ("amsgrad-int", "Adam", dict(amsgrad=1), TypeError, r"^amsgrad must be a bool"),
    ("maximize-str", "SGD", dict(maximize="no"), TypeError, r"^maximize must be a bool"),
    ("momentum<0", "SGD", dict(momentum=-0.9), ValueError, r"^momentum must be >= 0"),
    ("nesterov-no-momentum", "SGD", dict(nesterov=True), ValueError,
     r"nesterov needs momentum > 0"),
    ("nesterov-dampening", "SGD", dict(nesterov=True, momentum=0.9, dampening=0.5),
     ValueError, r"nesterov needs momentum > 0 and dampening == 0"),
    ("group-lr<0", "Adam", dict(params=[{"params": _params(), "lr": -1.0}]), ValueError,
     r"param_groups\[0\]\['lr'\] must be >= 0"),
    ("group-nesterov", "SGD",
     dict(params=[{"params": _params()[:1]}, {"params": _params()[1:], "nesterov": True}]),
     ValueError, r"param_groups\[1\]: nesterov needs momentum"),
    ("backend-name", "Adam", dict(backend="cuda9"), ValueError,
     r"backend must be one of \['auto', 'cython', 'numba', 'numpy', 'cuda'\], got 'cuda9'"),
    ("backend-type", "SGD", dict(backend=None), TypeError, r"backend must be a string"),
    ("max_grad_norm=0", "Adam", dict(max_grad_norm=0.0), ValueError,
     r"^max_grad_norm must be > 0"),
    ("max_grad_norm<0", "SGD", dict(max_grad_norm=-1.0), ValueError,
     r"^max_grad_norm must be > 0"),
    ("max_grad_norm-inf", "SGD", dict(max_grad_norm=float("inf")), ValueError,
     r"^max_grad_norm must be finite"),
    ("max_grad_norm-str", "AdamW", dict(max_grad_norm="1"), TypeError, r"^max_grad_norm"),
    # an unknown keyword is named with the optimizer's class (it was the
    # base's "Optimizer.__init__()"), with a hint or the closest name taken
    ("typo", "SGD", dict(momentun=0.9), TypeError,
     r"^SGD\(\) got an unexpected keyword argument 'momentun': did you mean 'momentum'\?"),
    ("unknown", "AdamW", dict(foo=1), TypeError,
     r"^AdamW\(\) got .* 'foo': it takes lr, betas, .*state_seed$"),
    ("torch-adam-decoupled", "Adam", dict(decoupled_weight_decay=True), TypeError,
     r"^Adam\(\) got .*'decoupled_weight_decay': fastopt.AdamW is Adam with decoupled"),
    ("by-name-dtype", "Adam",
     dict(params={"enc": {"W": np.ones(2, np.float32), "b": np.ones(2, np.int64)}}), TypeError,
     r"^params\['enc'\]\['b'\] must be float32"),   # was [1]
    ("lbfgs-state-dtype", "LBFGS", dict(state_dtype="int8"), TypeError,
     r"^LBFGS\(\) got .*'state_dtype': L-BFGS is stepped with a closure"),
]


@pytest.mark.parametrize("name,kwargs,exc,match", [c[1:] for c in BAD_CONSTRUCTION],
                         ids=[c[0] for c in BAD_CONSTRUCTION])
def test_bad_construction(name, kwargs, exc, match):
    kwargs = dict(kwargs)
    params = kwargs.pop("params", None)
    if params is None:
        params = _params()
    kwargs.setdefault("lr", 0.1)
    arrays = [a for spec in (params if isinstance(params, list) else [params])
              for a in (spec.get("params", []) if isinstance(spec, dict) else [spec])
              if isinstance(a, np.ndarray)]
    before = [a.copy() for a in arrays]
    with pytest.raises(exc, match=match):
        getattr(fastopt, name)(params, **kwargs)
    for a, b in zip(arrays, before):
        assert_bit_identical(a, b)


def test_valid_edge_hyperparameters_are_accepted():
    """The bounds themselves: lr=0, beta=0, wd=0 are valid and do what they say."""
    p = np.ones(3)
    fastopt.Adam([p], lr=0.0, betas=(0.0, 0.0)).step([np.ones(3)])
    np.testing.assert_array_equal(p, np.ones(3))   # lr = 0 leaves p alone
    fastopt.SGD([p], lr=0.5, momentum=0.0, nesterov=False).step([np.ones(3)])
    np.testing.assert_array_equal(p, np.full(3, 0.5))
    fastopt.SGD(p, lr=np.float32(0.5), maximize=np.bool_(True)).step(np.ones(3))
    np.testing.assert_array_equal(p, np.ones(3))



def test_zero_d_arrays_count_as_their_numbers():
    """A scalar read back with np.load is a 0-d array: it was refused as
    lr ("must be a real number, got ndarray"), in betas, max_grad_norm and
    schedules; set in a group between steps it is stored as its number, so
    that the next steps stay on the fast path."""
    p, q = np.ones(3), np.ones(3)
    cfg = {k: np.array(v) for k, v in dict(lr=0.1, b1=0.9, b2=0.99, eps=1e-8, mgn=1.0).items()}
    a = fastopt.AdamW([p], lr=cfg["lr"], betas=(cfg["b1"], cfg["b2"]), eps=cfg["eps"],
                      max_grad_norm=cfg["mgn"])
    b = fastopt.AdamW([q], lr=0.1, betas=(0.9, 0.99), eps=1e-8, max_grad_norm=1.0)
    for opt, x in ((a, p), (b, q)):
        opt.step([np.ones(3)])
        opt.param_groups[0]["lr"] = np.array(0.05) if opt is a else 0.05
        opt.step([np.ones(3)])
        opt.step([np.ones(3)])
    np.testing.assert_array_equal(p, q)
    assert type(a.param_groups[0]["lr"]) is float and a._plan is not None
    assert fastopt.schedules.cosine_decay(np.array(0.1), 10)(5) == \
        fastopt.schedules.cosine_decay(0.1, 10)(5)
    # counts and flags saved with np.savez come back 0-d too
    sgd = fastopt.SGD([np.ones(3)], lr=np.array(0.1), momentum=np.array(0.9),
                      nesterov=np.array(True))
    sgd.step([np.ones(3)])
    assert sgd.param_groups[0]["nesterov"] is True
    assert fastopt.schedules.warmup_cosine(1e-3, np.array(10), np.array(100))(np.array(5)) == \
        fastopt.schedules.warmup_cosine(1e-3, 10, 100)(5)
    with pytest.raises(TypeError, match=r"lr must be a real number, got ndarray"):
        fastopt.AdamW([p], lr=np.array([0.1]))
    with pytest.raises(TypeError, match=r"lr must be a real number"):
        fastopt.AdamW([p], lr=np.array(True))

# -- functional API --------------------------------------------------------------

def functional_state(dtype=np.float64, n=(5, 3)):
    rng = np.random.default_rng(0)
    p = [rng_array(rng, s, dtype) for s in ((n[0],), (n[1],))]
    g = [rng_array(rng, x.shape, dtype) for x in p]
    m = [rng_array(rng, x.shape, dtype, 0.1) for x in p]
    v = [np.abs(rng_array(rng, x.shape, dtype, 0.1)) for x in p]
    vmax = [x.copy() for x in v]
    return p, g, m, v, vmax


def assert_functional_rejected(arrays, call, exc, match):
    before = [[a.copy() for a in group] for group in arrays]
    with pytest.raises(exc, match=match):
        call()
    for group, group_before in zip(arrays, before):
        for a, b in zip(group, group_before):
            assert_bit_identical(a, b)


@pytest.mark.parametrize("fn", ["adam", "adamw"])
@pytest.mark.parametrize("step, error, message", [
    (0, ValueError, r"must be >= 1"), (-1, ValueError, r"must be >= 1"),
    (1.5, TypeError, r"must be an int"), (True, TypeError, r"must be an int"),
    ("3", TypeError, r"must be an int"), (None, TypeError, r"must be an int"),
    (2.0, TypeError, r"must be an int")])
def test_functional_adam_bad_step(fn, step, error, message):
    p, g, m, v, vmax = functional_state()
    assert_functional_rejected(
        [p, m, v, vmax],
        lambda: getattr(fastopt.functional, fn)(p, g, m, v, vmax, step=step),
        error, r"^step \(the 1-based step count\) " + message)


def test_functional_accepts_numpy_int_step():
    p, g, m, v, vmax = functional_state()
    fastopt.functional.adam(p, g, m, v, vmax, step=np.int64(3))


def _shifted(a):
    return a[1:]


FUNCTIONAL_BAD = [
    ("grads-shape", lambda p, g, m, v, x: dict(grads=[g[0], np.zeros(4)]), ValueError,
     r"grads\[1\] has shape \(4,\) but params\[1\] has shape \(3,\)"),
    ("exp_avgs-count", lambda p, g, m, v, x: dict(exp_avgs=m[:1]), ValueError,
     r"exp_avgs has 1 array but params has 2"),
    ("exp_avg_sqs-dtype", lambda p, g, m, v, x: dict(exp_avg_sqs=[v[0], v[1].astype(np.float32)]),
     TypeError, r"exp_avg_sqs\[1\] has dtype float32"),
    ("max-readonly", lambda p, g, m, v, x: dict(max_exp_avg_sqs=[x[0], _ro(x[1])]), ValueError,
     r"max_exp_avg_sqs\[1\] is read-only"),
    ("exp_avgs-is-params", lambda p, g, m, v, x: dict(exp_avgs=p), ValueError, r"overlaps"),
    ("m-is-v", lambda p, g, m, v, x: dict(exp_avgs=v), ValueError, r"overlaps"),
    ("grads-alias-m", lambda p, g, m, v, x: dict(grads=[m[0].copy(), m[1]]), ValueError,
     r"overlaps"),
    ("grads-strided-view-of-m", lambda p, g, m, v, x: dict(grads=[g[0], m[1][::-1]]),
     ValueError, r"grads\[1\] overlaps exp_avgs\[1\]"),
    ("params-noncontiguous", lambda p, g, m, v, x: dict(params=[np.zeros(10)[::2], p[1]]),
     ValueError, r"params\[0\] must be C-contiguous"),
    ("lr<0", lambda p, g, m, v, x: dict(lr=-1.0), ValueError, r"^lr must be >= 0"),
    ("eps=0", lambda p, g, m, v, x: dict(eps=0.0), ValueError, r"^eps"),
    ("betas", lambda p, g, m, v, x: dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
    ("grad_scale-nan", lambda p, g, m, v, x: dict(grad_scale=float("nan")), ValueError,
     r"grad_scale must be finite"),
    ("backend", lambda p, g, m, v, x: dict(backend="gpu"), ValueError, r"backend must be"),
]


def _ro(a):
    a = a.copy()
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in FUNCTIONAL_BAD],
                         ids=[c[0] for c in FUNCTIONAL_BAD])
def test_functional_adam_rejects(make, exc, match):
    p, g, m, v, vmax = functional_state()
    args = dict(params=p, grads=g, exp_avgs=m, exp_avg_sqs=v, max_exp_avg_sqs=vmax)
    args.update(make(p, g, m, v, vmax))
    assert_functional_rejected([p, m, v, vmax],
                               lambda: fastopt.functional.adam(**args, step=3), exc, match)


def test_functional_adam_rejects_mismatched_flat_layout():
    params = fastopt.pack([np.ones(5), np.ones(3)])
    m = fastopt.flat_zeros([(3,), (5,)], np.float64)
    v = params.zeros_like()
    assert_functional_rejected(
        [[params.data, m.data, v.data]],
        lambda: fastopt.functional.adam(params, params.zeros_like(), m, v, step=1),
        ValueError, r"exp_avgs\[0\] has shape \(3,\) but params\[0\] has shape \(5,\)")


@pytest.mark.parametrize("kwargs,buffers,match", [
    (dict(nesterov=True), False, r"nesterov needs momentum > 0"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), True, r"nesterov needs"),
    (dict(momentum=0.9), False, r"momentum != 0 needs momentum_buffers"),
    (dict(momentum=-0.9), True, r"^momentum must be >= 0"),
    (dict(weight_decay=-1.0), False, r"^weight_decay must be >= 0"),
    (dict(lr=float("inf")), False, r"^lr must be finite"),
    (dict(momentum=0.9, first_step="yes"), True, r"^first_step must be a bool"),
])
def test_functional_sgd_rejects(kwargs, buffers, match):
    p, g, m, _, _ = functional_state()
    kwargs = {"lr": 0.1, **kwargs}
    exc = TypeError if "first_step" in kwargs else ValueError
    assert_functional_rejected(
        [p, m],
        lambda: fastopt.functional.sgd(p, g, m if buffers else None, **kwargs), exc, match)


def test_functional_sgd_rejects_bad_buffers():
    p, g, m, _, _ = functional_state()
    assert_functional_rejected(
        [p, m], lambda: fastopt.functional.sgd(p, g, [m[0], np.zeros(7)], lr=0.1, momentum=0.9),
        ValueError, r"momentum_buffers\[1\] has shape \(7,\)")
    assert_functional_rejected(
        [p, m], lambda: fastopt.functional.sgd(p, g, p, lr=0.1, momentum=0.9),
        ValueError, r"overlaps")


# -- clipping ----------------------------------------------------------------------

@pytest.mark.parametrize("max_norm,exc,match", [
    (0.0, ValueError, r"^max_norm must be > 0"), (-1.0, ValueError, r"^max_norm must be > 0"),
    (float("nan"), ValueError, r"^max_norm must be finite"),
    (None, TypeError, r"^max_norm must be a real number")])
def test_clip_rejects_bad_max_norm(max_norm, exc, match):
    grads = [np.full(3, 10.0), np.full(2, 10.0)]
    assert_functional_rejected([grads], lambda: fastopt.clip_by_global_norm(grads, max_norm),
                               exc, match)


def test_clip_rejects_readonly_and_aliased_grads():
    g = np.full(4, 10.0)
    ro = _ro(np.full(3, 10.0))
    assert_functional_rejected([[g, ro]], lambda: fastopt.clip_by_global_norm([g, ro], 1.0),
                               ValueError, r"grads\[1\] is read-only")
    # The same array twice (or overlapping views) would be scaled twice.
    assert_functional_rejected([[g]], lambda: fastopt.clip_by_global_norm([g, g], 1.0),
                               ValueError, r"overlaps")
    buf = np.full(10, 10.0)
    assert_functional_rejected([[buf]],
                               lambda: fastopt.clip_by_global_norm([buf[:6], buf[4:]], 1.0),
                               ValueError, r"overlaps")
    assert_functional_rejected([[g]], lambda: fastopt.clip_by_global_norm(
        [g, np.ones(3, np.int32)], 1.0), TypeError, r"grads\[1\] must be float32 or float64")
    flat = fastopt.pack([np.full(3, 10.0)])
    flat.data.flags.writeable = False
    with pytest.raises(ValueError, match=r"grads is read-only"):
        fastopt.clip_by_global_norm(flat, 1.0)


def test_norm_and_clip_name_grads_by_key_and_read_numpy_scalars():
    """A 0-d param's gradient as a NumPy scalar: the step takes it, and so
    does global_norm; clip_by_global_norm cannot scale it in place and
    says so, naming it by its key (it said grads[1], by position)."""
    grads = {"l1": {"W": np.full(3, 2.0)}, "temp": np.float64(4.0)}
    assert fastopt.global_norm(grads) == pytest.approx(math.sqrt(12.0 + 16.0), rel=1e-15)
    with pytest.raises(TypeError, match=r"grads\['temp'\] is a NumPy scalar \(float64\), "
                                        r"which cannot be scaled in place.*np.asarray"):
        fastopt.clip_by_global_norm(grads, 1.0)
    np.testing.assert_array_equal(grads["l1"]["W"], 2.0)        # nothing scaled
    with pytest.raises(TypeError, match=r"grads\['l1'\]\['W'\] must be an ndarray, got list"):
        fastopt.clip_by_global_norm({"l1": {"W": [1.0]}, "b": np.ones(2)}, 1.0)


def test_clip_scales_strided_views_in_place():
    """``(dh.T @ X).T`` and slices were refused ("must be C-contiguous")
    by global_norm and clip_by_global_norm, which need no contiguity:
    clipped where they are, as contiguous copies of them are."""
    rng = np.random.default_rng(0)
    views = [rng.standard_normal((6, 8)).T, rng.standard_normal((6, 8))[:, ::2],
             np.asfortranarray(rng.standard_normal((3, 5)))]
    copies = [np.ascontiguousarray(v) for v in views]
    assert fastopt.global_norm(views) == fastopt.global_norm(copies)
    n1 = fastopt.clip_by_global_norm(views, 1.0)
    n2 = fastopt.clip_by_global_norm(copies, 1.0)
    assert n1 == n2 > 1.0
    for v, c in zip(views, copies):
        np.testing.assert_array_equal(v, c)
    with pytest.raises(ValueError, match=r"grads\[0\] is read-only"):
        fastopt.clip_by_global_norm([_ro(np.ones((3, 4))).T], 1.0)
    # views that share elements are scaled once each: refused; views of one
    # matrix that share none (its columns) are fine
    A = np.ones((4, 4))
    for overlapping in ([A[:, ::2], A[3]], [A[2:][::-1], A[3]]):
        with pytest.raises(ValueError, match=r"grads\[1\] overlaps grads\[0\]"):
            fastopt.clip_by_global_norm(overlapping, 0.1)
        np.testing.assert_array_equal(A, np.ones((4, 4)))
    fastopt.clip_by_global_norm([A[:, 0], A[:, 1], A[:, 2:]], 0.1)
    np.testing.assert_allclose(A, np.full((4, 4), 0.1 / (4 + 1e-6)), rtol=1e-12)

def test_global_norm_checks_but_accepts_readonly():
    ro = _ro(np.full(4, 2.0))
    assert fastopt.global_norm([ro]) == 4.0
    # Reading the same array twice is fine for a norm (nothing is written).
    assert fastopt.global_norm([ro, ro]) == pytest.approx(math.sqrt(32.0), rel=1e-15)
    with pytest.raises(TypeError, match=r"grads\[0\] must be float32 or float64"):
        fastopt.global_norm([np.ones(3, np.int64)])
    # a strided view (a transposed matmul's result, a slice) is read as it is
    assert fastopt.global_norm([ro, np.ones((3, 4)).T, np.ones((4, 6))[:, ::2]]) == \
        pytest.approx(math.sqrt(16 + 12 + 12), rel=1e-15)
    with pytest.raises(TypeError, match=r"grads must be"):
        fastopt.global_norm(1.0)
    with pytest.raises(ValueError, match=r"backend must be"):
        fastopt.global_norm([ro], backend="nope")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_arrays_are_refused_and_other_subclasses_step(backend, tmp_path):
    """A masked param or gradient: the NumPy backend's arithmetic honoured
    the mask and the compiled kernels stepped the data under it, so the
    backends disagreed without a word. Refused on every backend, also once
    the step's fast path runs; a memmap (another subclass) still steps."""
    masked = np.ma.array(np.ones(3), mask=[0, 1, 0])
    with pytest.raises(TypeError, match=r"^params\[0\] is a masked array"):
        fastopt.SGD([masked], lr=0.5, backend=backend)
    p = np.ones(3)
    opt = fastopt.SGD([p], lr=0.5, backend=backend)
    for _ in range(3):
        opt.step([np.ones(3)])
    with pytest.raises(TypeError, match=r"grads\[0\] is a masked array.*g.filled\(0\)"):
        opt.step([np.ma.array(np.ones(3), mask=[0, 1, 0])])
    np.testing.assert_array_equal(p, -0.5)
    with pytest.raises(TypeError, match="masked array"):
        fastopt.clip_by_global_norm([np.ma.array(np.ones(3))], 1.0)
    g = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float64, shape=(3,))
    g[...] = 1.0
    opt.step([g])
    opt.step([g])
    np.testing.assert_array_equal(p, -1.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_whose_dtype_or_size_changed_in_place_is_refused(backend):
    """``a.dtype = np.float32``, ``a.resize(n, refcheck=False)`` or
    ``a.strides = ...`` after the optimizer was made: the compiled step went
    on addressing the memory as given, with the state sized for it (garbage
    in the param, or writes to freed memory). Refused at the next step,
    whichever grads come (shaped as the param was or as it is), also once
    the step's fast path runs; an in-place reshape (the same memory) steps
    with grads of its new shape, and refuses the old one on every backend."""
    def planned(params, **kw):
        opt = fastopt.SGD(params, lr=0.5, momentum=0.9, backend=backend, **kw)
        for _ in range(3):
            opt.step([np.ones(a.shape) for a in params] if isinstance(params, list)
                     else {k: np.ones(a.shape) for k, a in params.items()})
        return opt

    a = np.ones(6)
    opt = planned([a])
    a.dtype = np.float32
    for g in (np.ones(12, np.float32), np.ones(6)):
        with pytest.raises((ValueError, TypeError), match=r"params\[0\]"):
            opt.step([g])
    a.dtype = np.float64
    before = a.copy()
    b = np.ones(6)
    opt = planned({"b": b})
    b.resize(10, refcheck=False)
    for g in (np.ones(10), np.ones(6)):
        with pytest.raises(ValueError, match=r"params\['b'\]"):
            opt.step({"b": g})
    c = np.ones((3, 2))
    opt = planned([c])
    with pytest.warns(DeprecationWarning):
        c.strides = (8, 24)
    with pytest.raises(ValueError, match=r"params\[0\] was given as float64\[3, 2\] and is "
                                         r"now a strided view"):
        opt.step([np.ones((3, 2))])
    d = np.ones((3, 2))
    opt = planned([d])
    d.shape = (2, 3)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(3, 2\) but params\[0\] has "
                                         r"shape \(2, 3\)"):
        opt.step([np.ones((3, 2))])
    after_three = d.copy()
    opt.step([np.ones((2, 3))])
    opt.step([np.ones((2, 3))])
    assert (d < after_three).all()
    np.testing.assert_array_equal(a, before)        # nothing written by the refused steps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["int32", "float16", "resize"])
def test_a_param_changed_in_place_before_the_first_step_is_refused(backend, how):
    # the tables, built at the first step, recorded the params as they were
    # then: a retyped param counted a step with nothing updated (cython), or
    # raised an internal error; a resized one was trained at its new size
    a = np.ones(8, np.float32)
    opt = fastopt.SGD([a], lr=0.1, backend=backend)
    if how == "int32":
        a.dtype = np.int32
        g = np.ones(8, np.int32)
    elif how == "float16":
        a.dtype = np.float16
        g = np.ones(16, np.float16)
    else:
        a.resize(4, refcheck=False)
        g = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=r"params\[0\] was given as float32\[8\] and is now"):
        opt.step([g])
    assert opt.iterations == 0 and opt.state[0]["step"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheduled", [False, True])
def test_a_param_changed_in_place_is_refused_with_flat_grads_and_by_state_dict(backend,
                                                                            scheduled):
    """The same FlatArrays of grads step after step reads no gradient
    array, so no reader saw the param: a param retyped in place was
    stepped (float32 writes read as float64), and state_dict wrote a
    checkpoint no optimizer could load. Refused by the planned step, the
    full step (a schedule runs it every time), state_dict, L-BFGS and SAM."""
    W, b = np.ones(8, np.float32), np.ones(4, np.float32)
    lr = fastopt.schedules.cosine_decay(0.1, 100) if scheduled else 0.1
    opt = fastopt.Adam([W, b], lr=lr, backend=backend)
    g = fastopt.flat_zeros([(8,), (4,)], np.float32)
    g.data[:] = 1
    for _ in range(3):
        opt.step(g)
    W.dtype = np.float64
    before = W.copy()
    with pytest.raises(ValueError, match=r"params\[0\] was given as float32\[8\] and is now "
                                         r"float64\[4\]"):
        opt.step(g)
    with pytest.raises(ValueError, match=r"params\[0\] was given as float32\[8\]"):
        opt.state_dict()
    np.testing.assert_array_equal(W, before)
    W.dtype = np.float32
    opt.step(g)                                   # as given again: steps

    X = np.ones(8, np.float32)
    lb = fastopt.LBFGS([X], max_iter=2, backend=backend)
    flat = fastopt.flat_zeros([(8,)], np.float32)

    def closure():
        flat.data[:] = 2 * (X.view(np.float32) - 3)
        return float(((X.view(np.float32) - 3) ** 2).sum()), flat
    lb.step(closure)
    X.dtype = np.float64
    with pytest.raises(ValueError, match=r"params\[0\] was given as float32\[8\]"):
        lb.step(closure)
    X.dtype = np.float32

    # SAM: the param retyped before the first perturb built its tables
    P = [np.ones(4, np.float32), np.ones(4, np.float32)]
    sam = fastopt.SAM(fastopt.SGD(P, lr=0.1, backend=backend), rho=0.1)
    P[0].dtype = np.float64
    with pytest.raises(ValueError, match=r"params\[0\] was given as float32\[4\]"):
        sam.perturb([np.ones(2), np.ones(4, np.float32)])
    assert not sam.perturbed


def test_a_value_in_params_by_name_that_is_no_array_is_named_by_its_keys():
    with pytest.raises(TypeError, match=r"^params\[.scale.\] must be an ndarray, got a float"):
        fastopt.Adam({"W": np.ones((2, 2)), "scale": 1.0})
    # numbers where an array was meant, in a list inside the dict: named by its key
    # (a list of arrays there is walked, as JAX's pytrees: test_layer_lists.py)
    with pytest.raises(TypeError, match=r"^params\['layer1'\]\['b'\] must be an ndarray, "
                                        r"got list"):
        fastopt.Adam({"layer1": {"W": np.ones((2, 2)), "b": [0.0, 0.0]}})


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_native_byte_order_is_said_as_such(backend):
    """A big-endian float64 (FITS, network order) was refused as 'must be
    float32 or float64, got >f8', which it is."""
    with pytest.raises(TypeError, match=r"\['W'\] is float32 in non-native byte order \(>f4\)"):
        fastopt.SGD({"W": np.zeros(3, ">f4")}, lr=0.1, backend=backend)
    p = np.zeros(3)
    opt = fastopt.SGD([p], lr=0.1, backend=backend)
    opt.step([np.ones(3)])
    with pytest.raises(TypeError, match=r"grads\[0\] is float64 in non-native byte order.*"
                                        r"astype\(np.float64\)"):
        opt.step([np.ones(3, ">f8")])
    np.testing.assert_array_equal(p, -0.1)


def test_a_closure_or_a_loss_given_to_step_is_said_to_be_one():
    opt = fastopt.Adam({"W": np.zeros((2, 2))})
    with pytest.raises(TypeError, match=r"or a dict of them by the params' names\), got "
                                        r"function: a closure is for LBFGS.step"):
        opt.step(lambda: 0.5)
    with pytest.raises(TypeError, match=r"got float: the step takes the gradients.*not the loss"):
        opt.step(0.5)
    with pytest.raises(TypeError, match=r"got float64; np.asarray\(g\) if it is a 0-d"):
        fastopt.SGD([np.zeros(())], lr=0.1).step(np.float64(1.0))


def test_load_state_dict_raises_checkpoint_error_as_load_does():
    """Code that catches fastopt.CheckpointError around a resume missed the
    plain ValueError load_state_dict raised for the same mismatch."""
    a = {"W": np.zeros(3)}
    src = fastopt.Adam(a)
    src.step({"W": np.ones(3)})
    b = {"W": np.zeros(4)}
    dst = fastopt.Adam(b)
    dst.step({"W": np.ones(4)})
    before = dst.state_dict()
    for sd in (src.state_dict(), {"x": 1}, None, fastopt.SGD(b).state_dict()):
        with pytest.raises(fastopt.CheckpointError):
            dst.load_state_dict(sd)
    assert_same_tree(dst.state_dict(), before)
    sam = fastopt.SAM(fastopt.SGD(b, lr=0.1))
    with pytest.raises(fastopt.CheckpointError, match="SAM state_dict is missing keys"):
        sam.load_state_dict({"x": 1})


def test_overlapping_params_in_two_groups_are_named_by_group():
    # "params[2] overlaps params[1]": an index across groups that the user never wrote
    b = np.zeros(10)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] overlaps "
                                         r"param_groups\[0\]\['params'\]\[1\]"):
        fastopt.AdamW([{"params": [np.zeros(3), b[:6]]}, {"params": [b[4:]]}])


def test_a_read_only_memory_map_says_how_joblib_made_it(tmp_path):
    """joblib hands a worker each array over 1 MB as a read-only np.memmap:
    the refusal said only "read-only", and the way out is joblib's."""
    np.save(tmp_path / "w.npy", np.ones(10))
    mapped = np.load(tmp_path / "w.npy", mmap_mode="r")
    with pytest.raises(ValueError, match=r"\['W'\] is read-only, and is written in place; it "
                                         r"is a read-only memory map.*max_nbytes=None"):
        fastopt.Adam({"W": mapped})
    with pytest.raises(ValueError, match=r"is read-only, and is written in place$"):
        fastopt.Adam({"W": _ro(np.ones(10))})


def test_refusals_of_a_scientists_structures_say_what_to_do_instead():
    import dataclasses

    from fastopt import functional as F

    @dataclasses.dataclass
    class Phys:
        k: np.ndarray
        T: np.ndarray
    with pytest.raises(TypeError, match=r"\['T'\] must be an ndarray, got a float: .*"
                                        r"np\.array\(0\.5\)"):
        fastopt.Adam({"w": np.ones(2), "T": 0.5})
    with pytest.raises(TypeError, match=r"got Phys; its arrays by name are vars\(obj\)"):
        fastopt.Adam(Phys(np.ones(3), np.array(1.0)))
    w = np.ones(3)
    opt = fastopt.SGD({"w": w}, lr=0.1)
    with pytest.raises(ValueError, match=r"overlaps params\['w'\].*pass a copy, w\.copy\(\)"):
        opt.step({"w": w})
    assert np.array_equal(w, np.ones(3))
    with pytest.raises(ValueError, match=r"grads\['bb'\] is no param's: a misspelt key"):
        opt.step({"bb": np.ones(3)})
    with pytest.raises(TypeError, match=r"grads\['T'\] is a Python number \(float\), which "
                                        "cannot be scaled in place"):
        fastopt.clip_by_global_norm({"a": np.array([3.0]), "T": 4.0}, 1.0)
    with pytest.raises(TypeError, match=r"got dict; a dict's arrays in a list: "
                                        r"list\(d\.values\(\)\)"):
        F.sgd({"w": w}, {"w": np.ones(3)}, lr=0.1)
    with pytest.raises(TypeError, match=r"a\.reshape\(1\)\.view\(np\.float64\) for a 0-d"):
        fastopt.Adam([np.array(1j)])


def test_disjointness_is_settled_by_owners_only_where_they_differ():
    """Arrays of different owners cannot overlap (no addresses read); views
    of one owner, or of memory no array owns, go through the address sweep."""
    from fastopt._validate import _distinct_owners, check_disjoint
    a, b = np.zeros(8), np.zeros(8)
    assert _distinct_owners([("a", a.reshape(-1)), ("b", b)], [("g", np.ones(8))])
    check_disjoint([("a", a[:4]), ("b", b)], [("g", a[4:])])      # one owner, apart: swept
    assert not _distinct_owners([("a", a[:4])], [("g", a[4:])])
    with pytest.raises(ValueError, match=r"g overlaps a"):
        check_disjoint([("a", a[:5])], [("g", a[4:])])
    buf = bytearray(64)
    x, y = np.frombuffer(buf, np.float64), np.frombuffer(buf, np.float64)[3:]
    assert not _distinct_owners([("x", x)], [("y", y)])
    with pytest.raises(ValueError, match=r"overlaps x"):
        check_disjoint([("x", x)], [("y", y)])


def test_a_weight_tied_between_two_layers_is_told_to_be_given_once():
    W = np.ones((3, 3))
    with pytest.raises(ValueError, match=r"params\['dec'\]\['W'\] overlaps params\['enc'\]"
                                         r"\['W'\] .*one array given twice.*Give it once, and "
                                         r"add its gradients together"):
        fastopt.SGD({"enc": {"W": W, "b": np.zeros(3)}, "dec": {"W": W}}, lr=0.1)
    with pytest.raises(ValueError, match=r"overlaps.*one array given twice"):
        fastopt.SGD([W, W.reshape(-1)], lr=0.1)
    with pytest.raises(ValueError) as info:       # two views overlapping in part: no such hint
        fastopt.SGD([W.reshape(-1)[:5], W.reshape(-1)[3:]], lr=0.1)
    assert "given twice" not in str(info.value)


def test_one_gradient_given_twice_gets_no_tied_weight_hint():
    g = np.ones(3)
    with pytest.raises(ValueError) as info:
        fastopt.clip_by_global_norm([g, g], 1.0)
    assert "overlaps" in str(info.value) and "tied" not in str(info.value)
