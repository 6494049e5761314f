"""The baselines: what a NumPy or a PyTorch user writes, timed beside fastopt.

* The optimizer steps a NumPy user would write (the "numpy" implementation
  of every case): each function updates one parameter array in place from
  its gradient, the way the textbook formula reads: whole-array
  expressions, temporaries and all, one array at a time. ``state`` is that
  array's dict (empty before its first step, filled here as torch.optim
  fills its per-parameter state) and ``t`` the 1-based step.
  Hyperparameters are named as in fastopt and torch.optim, so one dict
  configures all three (:data:`fastopt.bench.cases.KIND`).
* :func:`torch_optimizer_step`: ``torch.optim`` over the same arrays, by
  path (fused, foreach, for-loop).
* A NumPy user's MLP (:func:`mlp_init`, :func:`mlp_forward_backward`) and
  Adam written the obvious way (:class:`NumpyAdam`), for the training-loop
  and train-step cases; :func:`torch_mlp`, the same network in torch.

These are baselines, not specifications: fastopt's spec is its reference
backend. tests/test_bench.py checks that each optimizer step computes the
same step as fastopt, since a speedup over a different optimizer means
nothing.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np

from . import machine

# A benchmark feeds the same gradients every step, which drives centered
# RMSprop's v - avg**2 down to rounding noise; a negative one gives NaN, as
# in torch and fastopt (silently there). Say nothing in the middle of a
# table; an errstate block per call would cost the baseline time instead.
warnings.filterwarnings("ignore", "invalid value encountered in sqrt", RuntimeWarning,
                        module=__name__)


def _zeros(state, p, *names):
    if not state:
        state.update({name: np.zeros_like(p) for name in names})
    return [state[name] for name in names]


def adamw(p, g, state, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    b1, b2 = betas
    m, v = _zeros(state, p, "m", "v")
    p *= 1 - lr * weight_decay
    m[:] = b1 * m + (1 - b1) * g
    v[:] = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    p -= lr * m_hat / (np.sqrt(v_hat) + eps)


def sgd(p, g, state, t, lr=1e-2, momentum=0.9, nesterov=True):
    """SGD with (Nesterov) momentum; the buffer starts as the first gradient."""
    if "buf" not in state:
        state["buf"] = g.copy()
    else:
        state["buf"] *= momentum
        state["buf"] += g
    buf = state["buf"]
    p -= lr * (g + momentum * buf if nesterov else buf)


def rmsprop(p, g, state, t, lr=1e-2, alpha=0.99, eps=1e-8, centered=False):
    names = ("square_avg", "grad_avg") if centered else ("square_avg",)
    v, *avg = _zeros(state, p, *names)
    v[:] = alpha * v + (1 - alpha) * g * g
    if centered:
        avg[0][:] = alpha * avg[0] + (1 - alpha) * g
        v = v - avg[0] * avg[0]
    p -= lr * g / (np.sqrt(v) + eps)


def adagrad(p, g, state, t, lr=1e-2, lr_decay=0.0, eps=1e-10):
    (total,) = _zeros(state, p, "sum")
    total += g * g
    p -= lr / (1 + (t - 1) * lr_decay) * g / (np.sqrt(total) + eps)


def adamax(p, g, state, t, lr=2e-3, betas=(0.9, 0.999), eps=1e-8):
    b1, b2 = betas
    m, u = _zeros(state, p, "m", "u")
    m[:] = b1 * m + (1 - b1) * g
    u[:] = np.maximum(b2 * u, np.abs(g) + eps)
    p -= lr / (1 - b1 ** t) * m / u


def nadam(p, g, state, t, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, momentum_decay=4e-3):
    b1, b2 = betas
    m, v = _zeros(state, p, "m", "v")
    mu = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
    state["mu_product"] = state.get("mu_product", 1.0) * mu
    m[:] = b1 * m + (1 - b1) * g
    v[:] = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v / (1 - b2 ** t)) + eps
    p -= lr * (1 - mu) / (1 - state["mu_product"]) * g / denom
    p -= lr * mu_next / (1 - state["mu_product"] * mu_next) * m / denom


def radam(p, g, state, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    b1, b2 = betas
    m, v = _zeros(state, p, "m", "v")
    m[:] = b1 * m + (1 - b1) * g
    v[:] = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * t * b2 ** t / (1 - b2 ** t)
    if rho > 5:
        rect = np.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
        p -= lr * rect * m_hat * np.sqrt(1 - b2 ** t) / (np.sqrt(v) + eps)
    else:
        p -= lr * m_hat


def lion(p, g, state, t, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
    b1, b2 = betas
    (m,) = _zeros(state, p, "m")
    p *= 1 - lr * weight_decay
    p -= lr * np.sign(b1 * m + (1 - b1) * g)
    m[:] = b2 * m + (1 - b2) * g


def lamb(p, g, state, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
    """Adam's direction plus decoupled decay, scaled per array by the trust
    ratio ||p|| / ||r|| (1 where either norm is 0)."""
    b1, b2 = betas
    m, v = _zeros(state, p, "m", "v")
    m[:] = b1 * m + (1 - b1) * g
    v[:] = b2 * v + (1 - b2) * g * g
    r = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + weight_decay * p
    p_norm, r_norm = np.linalg.norm(p), np.linalg.norm(r)
    trust = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
    p -= lr * trust * r


# -- a case's step, as NumPy and torch users write it ---------------------------------

def numpy_optimizer_step(numpy_step, hypers, ps, gs, clip):
    """A callable stepping every array of ``ps`` with ``numpy_step`` (one of
    the functions above) and gradients ``gs``; with ``clip``, the gradients
    scaled to global norm 1 first, as a user clips in NumPy."""
    states = [{} for _ in ps]
    count = {"t": 0}

    def step():
        count["t"] += 1
        grads = gs
        if clip:
            norm = np.sqrt(sum(float(np.dot(x.ravel(), x.ravel())) for x in gs))
            c = min(1.0, 1.0 / (norm + 1e-6))
            grads = [x * c for x in gs]
        for p, g, st in zip(ps, grads, states):
            numpy_step(p, g, st, count["t"], **hypers)
    return step


#: torch.optim's paths over many tensors, and the flag that selects each
TORCH_VARIANTS = {"fused": dict(fused=True), "foreach": dict(foreach=True),
                  "forloop": dict(foreach=False)}


def torch_optimizer_step(spec, ps, gs, clip, variant):
    """``(callable, note)``: ``torch.optim.<spec.optimizer>`` on the path
    ``variant`` (:data:`TORCH_VARIANTS`) over ``torch.from_numpy`` views of
    ``ps`` (the step updates those arrays) with gradients ``gs``; with
    ``clip``, ``clip_grad_norm_`` first. The callable is None where torch
    cannot run it (not installed, no such optimizer or path), and the note
    says why."""
    torch = machine.torch_or_none()
    if torch is None:
        return None, "torch not installed"
    if not spec.in_torch:
        return None, f"torch.optim has no {spec.optimizer}: numpy is its baseline"
    cls = getattr(torch.optim, spec.optimizer)
    flag = TORCH_VARIANTS[variant]
    if next(iter(flag)) not in inspect.signature(cls).parameters:
        return None, f"torch.optim.{spec.optimizer} has no {variant} path"
    tps = [torch.from_numpy(p) for p in ps]
    for tp, g in zip(tps, gs):
        tp.grad = torch.from_numpy(g)
    try:
        topt = cls(tps, **spec.hypers, **flag)
    except (RuntimeError, TypeError, ValueError) as e:   # variant not in this torch
        return None, f"torch {torch.__version__}: {e}"
    opt_step = topt.step
    if variant == "foreach" and spec.hypers.get("nesterov"):
        opt_step = _fresh_grads_now_and_then(torch, topt, tps, opt_step)
    if not clip:
        return opt_step, ""

    def step():
        torch.nn.utils.clip_grad_norm_(tps, 1.0, foreach=variant != "forloop")
        opt_step()
    return step, ""


def _fresh_grads_now_and_then(torch, topt, tps, opt_step, every=64):
    """torch's foreach SGD with nesterov adds the momentum into the grads in
    place; fed the same grads step after step, as a benchmark feeds them,
    grads and momentum grow about 1.9x a step, to inf within a few hundred
    steps (the timed step then ran on inf, and a finiteness check failed).
    A training loop's backward pass writes fresh grads every step; here
    every ``every`` steps the grads are restored and the momentum zeroed:
    1/64 of a copy a step."""
    grads = [p.grad for p in tps]
    fresh = [g.clone() for g in grads]
    count = [0]

    def step():
        opt_step()
        count[0] += 1
        if count[0] % every == 0:
            torch._foreach_copy_(grads, fresh)
            for p in tps:
                buf = topt.state[p].get("momentum_buffer")
                if buf is not None:
                    buf.zero_()
    return step


# -- a NumPy user's MLP ------------------------------------------------------------------

def mlp_init(sizes, seed=0):
    """Float32 weights of an MLP in a plain list ``[W0, b0, W1, b1, ...]``
    (He-initialised ``W`` of shape (in, out), zero biases)."""
    rng = np.random.default_rng(seed)
    ws = []
    for a, b in zip(sizes, sizes[1:]):
        ws.append((rng.standard_normal((a, b), dtype=np.float32)
                   * np.float32(np.sqrt(2.0 / a))))
        ws.append(np.zeros(b, np.float32))
    return ws


def mlp_forward_backward(ws, X, y):
    """Loss and gradients of a ReLU MLP with softmax cross-entropy, written
    the way a NumPy user writes it: ``@`` matmuls through NumPy's BLAS and a
    new list of new gradient arrays, in the order of ``ws``."""
    n_layers = len(ws) // 2
    acts = [X]
    z = X
    for l in range(n_layers):
        z = acts[-1] @ ws[2 * l] + ws[2 * l + 1]
        if l < n_layers - 1:
            acts.append(np.maximum(z, 0))
    rows = np.arange(len(y))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    loss = float(np.mean(np.log(s[:, 0]) - z[rows, y]))
    d = e / s
    d[rows, y] -= 1
    d /= len(y)
    grads = [None] * len(ws)
    for l in range(n_layers - 1, -1, -1):
        grads[2 * l] = acts[l].T @ d
        grads[2 * l + 1] = d.sum(axis=0)
        if l:
            d = (d @ ws[2 * l].T) * (acts[l] > 0)
    return loss, grads


class NumpyAdam:
    """Adam written the obvious way in NumPy, one array at a time (state
    rebuilt as new arrays every step, temporaries and all)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        for i, (p, g) in enumerate(zip(self.params, grads)):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            m_hat = self.m[i] / (1 - b1 ** self.t)
            v_hat = self.v[i] / (1 - b2 ** self.t)
            p -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def torch_mlp(torch, sizes):
    """The same ReLU MLP as a ``torch.nn.Sequential`` of Linear layers."""
    layers = []
    for l, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if l < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def torch_train_step(torch, model, opt, X, y):
    """One training step in torch, as its users write it: gradients zeroed
    (kept allocated), cross-entropy of ``model(X)`` against ``y`` backward,
    ``opt.step()``."""
    opt.zero_grad(set_to_none=False)
    torch.nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
