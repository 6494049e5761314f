"""100-step trajectories against torch.optim and torch.nn.utils.clip_grad_norm_.

Every backend, float32 and float64, through both ways of passing
parameters: a packed :class:`fastopt.FlatArrays` with FlatArrays gradients
(one kernel call per group) and plain lists of separate arrays (one call per
array). Parameters and optimizer state are compared along the way.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt  # noqa: E402
from conftest import BACKENDS, assert_bit_identical, rng_array  # noqa: E402

STEPS = 100
# A small "model": weights and biases, interleaved as a network would list them.
SHAPES = [(6, 4), (4,), (4, 5), (5,), (3, 1, 2)]
# Relative tolerance with an absolute floor of rtol * (size of the parameters).
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
PATHS = ["flat", "list"]

ADAM_CONFIGS = [
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, maximize=True, weight_decay=0.05)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True, betas=(0.5, 0.9))),
    ("AdamW", dict(lr=5e-3, weight_decay=0.2, maximize=True, amsgrad=True, eps=1e-4)),
]
SGD_CONFIGS = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, weight_decay=0.1)),
    ("SGD", dict(lr=0.02, momentum=0.9)),
    ("SGD", dict(lr=0.02, momentum=0.9, dampening=0.5)),
    ("SGD", dict(lr=0.02, momentum=0.8, nesterov=True)),
    ("SGD", dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("SGD", dict(lr=0.02, momentum=0.5, dampening=0.1, weight_decay=0.05, maximize=True)),
]
CONFIGS = ADAM_CONFIGS + SGD_CONFIGS
CONFIG_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
              for name, kw in CONFIGS]


def make_problem(dtype, seed=0, shapes=SHAPES, grad_scales=(1.0,)):
    """Initial parameters and STEPS gradient lists (fixed, independent of p)."""
    rng = np.random.default_rng(seed)
    init = [rng_array(rng, s, dtype) for s in shapes]
    grads = []
    for _ in range(STEPS):
        scale = rng.choice(grad_scales)
        grads.append([rng_array(rng, s, dtype, scale=scale) for s in shapes])
    return init, grads


class FastoptSide:
    """Parameters and gradients the way a user would pass them."""

    def __init__(self, init, path):
        self.path = path
        if path == "flat":
            self.params = fastopt.pack(init)
            self.grads = self.params.zeros_like()
            assert isinstance(self.grads, fastopt.FlatArrays)
        else:
            self.params = [a.copy() for a in init]
            self.grads = None

    def load(self, grads):
        """The gradients to pass to step() for this path."""
        if self.path == "flat":
            for view, g in zip(self.grads, grads):
                view[...] = g
            return self.grads
        return grads


def torch_params(init):
    return [torch.tensor(a, requires_grad=True) for a in init]


def set_torch_grads(tparams, grads):
    for tp, g in zip(tparams, grads):
        tp.grad = torch.from_numpy(g.copy())


def assert_params_close(params, tparams, dtype, what):
    rtol = RTOL[np.dtype(dtype)]
    for i, (p, tp) in enumerate(zip(params, tparams)):
        want = tp.detach().numpy()
        assert p.dtype == want.dtype
        np.testing.assert_allclose(p, want, rtol=rtol, atol=rtol * 3.0,
                                   err_msg=f"{what}: param {i}")


def run_pair(name, kwargs, backend, dtype, path, *, max_grad_norm=None, seed=0,
             grad_scales=(1.0,), lr_schedule=None):
    init, grads = make_problem(dtype, seed, grad_scales=grad_scales)
    side = FastoptSide(init, path)
    opt = getattr(fastopt, name)(side.params, backend=backend,
                                 max_grad_norm=max_grad_norm, **kwargs)
    assert opt.backend == backend
    tparams = torch_params(init)
    topt = getattr(torch.optim, name)(tparams, **kwargs)
    for t, g in enumerate(grads):
        if lr_schedule is not None:
            opt.param_groups[0]["lr"] = topt.param_groups[0]["lr"] = lr_schedule(t)
        gs = side.load(g)
        before = [np.array(x, copy=True) for x in gs]
        norm = opt.step(gs)
        # The step never writes the gradients, clipped or not.
        for i, (x, b) in enumerate(zip(gs, before)):
            assert_bit_identical(x, b, f"grads[{i}] at step {t + 1}")
        set_torch_grads(tparams, g)
        if max_grad_norm is not None:
            tnorm = torch.nn.utils.clip_grad_norm_(tparams, max_grad_norm)
            # The pre-clip norm, as torch returns it (torch sums float32
            # grads in float32; fastopt always in float64).
            assert norm == pytest.approx(float(tnorm), rel=1e-5 if dtype == np.float32
                                         else 1e-12)
            assert opt.grad_norm == norm
        else:
            assert norm is None and opt.grad_norm is None
        topt.step()
        if t == 0 or (t + 1) % 20 == 0:
            assert_params_close(side.params, tparams, dtype, f"step {t + 1}")
    return opt, side, topt, tparams


def torch_state_concat(topt, tparams, key):
    return np.concatenate([topt.state[tp][key].detach().numpy().ravel() for tp in tparams])


def fastopt_state_concat(opt, key, group=0):
    return np.concatenate([run[key] for run in opt.state[group]["runs"]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_trajectory_matches_torch(name, kwargs, backend, dtype, path):
    opt, side, topt, tparams = run_pair(name, kwargs, backend, dtype, path)
    assert_params_close(side.params, tparams, dtype, "final")
    assert opt.state[0]["step"] == STEPS
    n_runs = 1 if path == "flat" else len(SHAPES)
    assert len(opt.state[0]["runs"]) == n_runs
    rtol = RTOL[np.dtype(dtype)]
    if name.startswith("Adam"):
        keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"]
                                            if kwargs.get("amsgrad") else [])
        for key in keys:
            np.testing.assert_allclose(fastopt_state_concat(opt, key),
                                       torch_state_concat(topt, tparams, key),
                                       rtol=rtol, atol=rtol * 1e-2, err_msg=key)
        if not kwargs.get("amsgrad"):
            assert "max_exp_avg_sq" not in opt.state[0]["runs"][0]
    elif kwargs.get("momentum"):
        np.testing.assert_allclose(fastopt_state_concat(opt, "momentum_buffer"),
                                   torch_state_concat(topt, tparams, "momentum_buffer"),
                                   rtol=rtol, atol=rtol)
    else:
        assert "momentum_buffer" not in opt.state[0]["runs"][0]


CLIP_CONFIGS = [
    ("Adam", dict(lr=1e-2, weight_decay=0.01)),
    ("AdamW", dict(lr=1e-2, amsgrad=True, maximize=True)),
    ("SGD", dict(lr=0.02, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.05)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name,kwargs", CLIP_CONFIGS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(CLIP_CONFIGS)])
def test_max_grad_norm_matches_clip_grad_norm(name, kwargs, backend, dtype, path):
    """``max_grad_norm=`` inside the step == clip_grad_norm_ then step.

    The gradient norms (about 7 * scale here) fall both below and above
    max_norm=4, so some steps clip and some do not.
    """
    opt, side, _, tparams = run_pair(name, kwargs, backend, dtype, path,
                                     max_grad_norm=4.0, seed=1,
                                     grad_scales=(0.1, 0.5, 1.0, 10.0))
    assert_params_close(side.params, tparams, dtype, "final")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name,kwargs", [("AdamW", dict(lr=1e-2, weight_decay=0.1)),
                                         ("SGD", dict(lr=0.1, momentum=0.9))])
def test_changing_lr_between_steps(name, kwargs, backend, dtype):
    def schedule(t):   # warmup then decay, as an lr_scheduler would set it
        return kwargs["lr"] * min(1.0, (t + 1) / 10) * 0.97 ** t

    opt, side, _, tparams = run_pair(name, kwargs, backend, dtype, "flat",
                                     lr_schedule=schedule)
    assert_params_close(side.params, tparams, dtype, "final")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_lr_scheduler_parity(backend, dtype):
    """A torch lr_scheduler drives torch; fastopt's group lr follows its value."""
    init, grads = make_problem(dtype, seed=4)
    side = FastoptSide(init, "flat")
    opt = fastopt.Adam(side.params, lr=0.02, backend=backend)
    tparams = torch_params(init)
    topt = torch.optim.Adam(tparams, lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=STEPS)
    for g in grads:
        opt.param_groups[0]["lr"] = topt.param_groups[0]["lr"]
        opt.step(side.load(g))
        set_torch_grads(tparams, g)
        topt.step()
        sched.step()
    assert_params_close(side.params, tparams, dtype, "final")


GROUP_CONFIGS = [
    ("Adam", dict(lr=1e-2, weight_decay=0.1), dict(weight_decay=0.0, lr=3e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
     dict(weight_decay=0.0, betas=(0.5, 0.99), amsgrad=False)),
    ("SGD", dict(lr=0.02, momentum=0.9, weight_decay=0.05),
     dict(weight_decay=0.0, momentum=0.5, nesterov=True, lr=0.05)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["flat", "interleaved", "list"])
@pytest.mark.parametrize("name,defaults,bias_group", GROUP_CONFIGS,
                         ids=[c[0] for c in GROUP_CONFIGS])
def test_param_groups_match_torch(name, defaults, bias_group, backend, dtype, layout):
    """Weights with the defaults, biases with their own hyperparameters.

    ``flat``: packed in group order, FlatArrays gradients (one call per
    group); ``interleaved``: packed as the model lists them (w, b, w, b), so
    each group is several runs, list gradients in group order; ``list``:
    separate arrays.
    """
    init, grads = make_problem(dtype, seed=2)
    weights, biases = [0, 2, 4], [1, 3]
    order = weights + biases
    if layout == "flat":
        packed = fastopt.pack([init[i] for i in order])
        views = dict(zip(order, packed))
        grad_buf = packed.zeros_like()
    elif layout == "interleaved":
        views = dict(enumerate(fastopt.pack(init)))
    else:
        views = {i: a.copy() for i, a in enumerate(init)}
    groups = [{"params": [views[i] for i in weights]},
              {"params": [views[i] for i in biases], **bias_group}]
    opt = getattr(fastopt, name)(groups, backend=backend, **defaults)
    tparams = torch_params(init)
    topt = getattr(torch.optim, name)(
        [{"params": [tparams[i] for i in weights]},
         {"params": [tparams[i] for i in biases], **bias_group}], **defaults)
    for g in grads:
        if layout == "flat":
            for view, i in zip(grad_buf, order):
                view[...] = g[i]
            opt.step(grad_buf)
        else:
            opt.step([g[i] for i in order])
        set_torch_grads(tparams, g)
        topt.step()
    assert_params_close([views[i] for i in range(len(SHAPES))], tparams, dtype, "final")
    assert [s["step"] for s in opt.state] == [STEPS, STEPS]
    if layout == "flat":
        assert [len(s["runs"]) for s in opt.state] == [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", [0.05, 1.0, 30.0])
def test_clip_by_global_norm_matches_torch(backend, dtype, path, scale):
    rng = np.random.default_rng(int(scale * 100))
    arrays = [rng_array(rng, s, dtype, scale=scale) for s in SHAPES]
    grads = fastopt.pack(arrays) if path == "flat" else [a.copy() for a in arrays]
    tgrads = [torch.tensor(a) for a in arrays]
    max_norm = 2.5
    norm = fastopt.clip_by_global_norm(grads, max_norm, backend=backend)
    tnorm = torch.nn.utils.clip_grad_norm_(tgrads_as_params(tgrads), max_norm)
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    assert norm == pytest.approx(float(tnorm), rel=rtol)
    for g, tg in zip(grads, tgrads):
        np.testing.assert_allclose(g, tg.numpy(), rtol=rtol, atol=0)
    clipped = norm > max_norm
    assert clipped == (scale > 0.05)
    if clipped:
        after = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads))
        assert after == pytest.approx(max_norm, rel=1e-5)
        if dtype == np.float64:   # torch's + 1e-6 keeps it a hair under max_norm
            assert after < max_norm


def tgrads_as_params(tgrads):
    """Parameters whose .grad are ``tgrads`` (clip_grad_norm_ takes params)."""
    params = []
    for tg in tgrads:
        p = torch.zeros_like(tg, requires_grad=True)
        p.grad = tg
        params.append(p)
    return params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_clip_non_finite_matches_torch(backend, dtype, bad):
    """NaN norm: everything becomes NaN; inf norm: coefficient 0 (inf * 0 = NaN)."""
    rng = np.random.default_rng(0)
    arrays = [rng_array(rng, s, dtype) for s in SHAPES]
    arrays[2][1, 3] = bad
    grads = [a.copy() for a in arrays]
    tgrads = [torch.tensor(a) for a in arrays]
    with np.errstate(invalid="ignore"):   # inf * 0 in the reference backend
        norm = fastopt.clip_by_global_norm(grads, 1.0, backend=backend)
    tnorm = torch.nn.utils.clip_grad_norm_(tgrads_as_params(tgrads), 1.0)
    if np.isnan(bad):
        assert np.isnan(norm) and np.isnan(float(tnorm))
        assert all(np.isnan(g).all() for g in grads)
    else:
        assert norm == float(tnorm) == np.inf
    for g, tg in zip(grads, tgrads):
        np.testing.assert_array_equal(g, tg.numpy())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_nan_gradient_with_max_grad_norm_poisons_step(backend, name):
    """A NaN gradient under max_grad_norm gives NaN parameters, as
    clip_grad_norm_ + step does in torch (the coefficient is NaN, not 1)."""
    init, grads = make_problem(np.float64, seed=3)
    g = [x.copy() for x in grads[0]]
    g[1][2] = np.nan
    params = [a.copy() for a in init]
    opt = getattr(fastopt, name)(params, lr=0.01, backend=backend, max_grad_norm=1.0)
    with pytest.warns(RuntimeWarning, match="global norm was nan"):
        norm = opt.step(g)
    assert np.isnan(norm)
    tparams = torch_params(init)
    set_torch_grads(tparams, g)
    torch.nn.utils.clip_grad_norm_(tparams, 1.0)
    getattr(torch.optim, name)(tparams, lr=0.01).step()
    for p, tp in zip(params, tparams):
        assert np.isnan(p).all()
        np.testing.assert_array_equal(p, tp.detach().numpy())
