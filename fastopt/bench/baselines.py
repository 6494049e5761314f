"""The optimizer steps a NumPy user would write: the "numpy" baseline of
``fastopt bench``, the asv suite and the CI guard.

Each function updates one parameter array in place from its gradient, the
way the textbook formula reads: whole-array expressions, temporaries and
all, one array at a time. ``state`` is that array's dict (empty before its
first step, filled here as torch.optim fills its per-parameter state) and
``t`` the 1-based step. Hyperparameters are named as in fastopt and
torch.optim, so one dict configures all three (``fastopt.bench.KIND``).

These are baselines, not specifications: fastopt's spec is its reference
backend. tests/test_bench.py checks that each one computes the same step as
fastopt, since a speedup over a different optimizer means nothing.
"""

from __future__ import annotations

import warnings

import numpy as np

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
