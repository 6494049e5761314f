r"""Backprop by hand: the four gradients of a 1-1-1 sigmoid network, checked two ways.

The network and loss:

.. math::
    z = w_1 x + b_1,\quad h = \sigma(z),\quad y = w_2 h + b_2,\quad
    L = (y - t)^2

The chain rule, one factor per arrow of the forward pass:

.. math::
    \frac{\partial L}{\partial y} = 2(y - t),\quad
    \frac{\partial L}{\partial w_2} = 2(y - t)\,h,\quad
    \frac{\partial L}{\partial b_2} = 2(y - t),

    \frac{\partial L}{\partial w_1} = 2(y - t)\,w_2\,\sigma(z)(1 - \sigma(z))\,x,\quad
    \frac{\partial L}{\partial b_1} = 2(y - t)\,w_2\,\sigma(z)(1 - \sigma(z))

(:math:`\sigma' = \sigma(1 - \sigma)`). The lesson: backprop is this chain
rule, evaluated from the loss backwards, reusing the forward pass's ``h``.

Two independent checks:

* centred finite differences, ``(L(w + e) - L(w - e)) / 2e``, whose error
  is O(e^2) (here about 1e-11 at e = 1e-5 in float64);
* :class:`fastopt.nn.MLP` ``((1, 1, 1), "sigmoid", "mse")`` with the same
  weights: its ``loss_and_grad`` writes the same four numbers into
  ``net.grads`` (``W0, b0, W1, b1``).

Normalisation: fastopt's MSE is torch's ``MSELoss``, the *mean* over batch
and outputs. For one sample and one output that is exactly ``(y - t)^2``;
for a batch of B samples the MLP's gradient is the mean of the per-sample
hand gradients (checked too), so a sum-of-squares loss would be B times it.
"""

from __future__ import annotations

import numpy as np

from ._plot import pyplot, save, say

NAMES = ("w1", "b1", "w2", "b2")
#: the point the example differentiates at: input, target and weights
POINT = {"x": 1.5, "t": 0.5, "w1": 0.8, "b1": -0.3, "w2": 1.2, "b2": 0.1}


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def loss(x, t, w1, b1, w2, b2):
    """``(w2 * sigmoid(w1 * x + b1) + b2 - t)^2``."""
    return (w2 * sigmoid(w1 * x + b1) + b2 - t) ** 2


def grads_by_hand(x, t, w1, b1, w2, b2):
    """The closed-form gradients ``{"w1": dL/dw1, ...}`` (see the module docstring)."""
    h = sigmoid(w1 * x + b1)
    dy = 2.0 * (h * w2 + b2 - t)        # dL/dy
    dz = dy * w2 * h * (1.0 - h)         # dL/dz = dL/dy * dy/dh * dh/dz
    return {"w1": dz * x, "b1": dz, "w2": dy * h, "b2": dy}


def grads_finite_difference(x, t, eps=1e-5, **weights):
    """Centred differences of :func:`loss` in each weight."""
    out = {}
    for name in NAMES:
        up, down = dict(weights), dict(weights)
        up[name] += eps
        down[name] -= eps
        out[name] = (loss(x, t, **up) - loss(x, t, **down)) / (2 * eps)
    return out


def grads_mlp(x, t, w1, b1, w2, b2):
    """fastopt's MLP backward on the same network: ``(loss, {"w1": ..., ...})``.

    ``x`` and ``t`` may be arrays (a batch); the MLP's loss is then the mean.
    """
    from fastopt.nn import MLP

    net = MLP((1, 1, 1), activation="sigmoid", loss="mse", dtype=np.float64)
    net.W[0][0, 0], net.b[0][0], net.W[1][0, 0], net.b[1][0] = w1, b1, w2, b2
    X = np.asarray(x, np.float64).reshape(-1, 1)
    T = np.asarray(t, np.float64).reshape(-1, 1)
    value = net.loss_and_grad(X, T)
    gW0, gb0, gW1, gb1 = (np.asarray(g).item() for g in net.grads)
    return value, {"w1": gW0, "b1": gb0, "w2": gW1, "b2": gb1}


def run(output=None, small=False, verbose=True) -> dict:
    """Compute, compare and (with ``output``) draw; returns the facts.

    ``small`` changes nothing here: the example takes milliseconds.
    """
    p = dict(POINT)
    x, t = p.pop("x"), p.pop("t")
    hand = grads_by_hand(x, t, **p)
    fd = grads_finite_difference(x, t, **p)
    mlp_loss, mlp = grads_mlp(x, t, **p)
    err_fd = max(abs(hand[n] - fd[n]) for n in NAMES)
    err_mlp = max(abs(hand[n] - mlp[n]) for n in NAMES)
    loss_err = abs(mlp_loss - loss(x, t, **p))

    # a batch: the MLP's MSE is the mean, so its gradient is the mean of the hand ones
    xs = np.array([-2.0, -0.5, 0.7, 1.5, 3.0])
    ts = np.array([0.0, 0.4, 0.2, 0.5, 1.1])
    per = grads_by_hand(xs, ts, **p)
    _, batch = grads_mlp(xs, ts, **p)
    err_batch = max(abs(per[n].mean() - batch[n]) for n in NAMES)
    sum_ratio = per["w1"].sum() / batch["w1"]

    facts = {"loss": float(loss(x, t, **p)), "grads": {n: float(hand[n]) for n in NAMES},
             "max_err_finite_difference": float(err_fd), "max_err_mlp": float(err_mlp),
             "loss_err_mlp": float(loss_err), "max_err_batch_mean": float(err_batch),
             "batch_size": xs.size, "sum_over_mean_ratio": float(sum_ratio)}
    say(verbose,
        f"network y = w2*sigmoid(w1*x + b1) + b2 at x={x}, target={t}, "
        + ", ".join(f"{k}={v}" for k, v in p.items()) + f"; L = {facts['loss']:.6f}",
        "gradient   by hand          finite diff.     fastopt MLP",
        *(f"dL/d{n:<4} {hand[n]: .12f}  {fd[n]: .12f}  {mlp[n]: .12f}" for n in NAMES),
        f"max |hand - finite difference| = {err_fd:.1e} (centred, eps=1e-5: O(eps^2))",
        f"max |hand - MLP backward|      = {err_mlp:.1e} (same math, float64 rounding)",
        f"batch of {xs.size}: MLP gradient = mean of the per-sample hand gradients "
        f"(max err {err_batch:.1e}); MSE is a mean, a sum of squares would be "
        f"{sum_ratio:.0f}x larger")
    if output is not None:
        _draw(output, x, t, p, hand, fd, mlp, err_fd, err_mlp)
        say(verbose, f"wrote {output}")
    return facts


def _draw(path, x, t, p, hand, fd, mlp, err_fd, err_mlp):
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    w = np.linspace(p["w1"] - 3, p["w1"] + 3, 200)
    ax1.plot(w, loss(x, t, **{**p, "w1": w}), label="L(w1), other weights fixed")
    L0 = loss(x, t, **p)
    tw = np.linspace(p["w1"] - 1, p["w1"] + 1, 2)
    ax1.plot(tw, L0 + hand["w1"] * (tw - p["w1"]), "--", color="C3",
             label=f"tangent, slope dL/dw1 = {hand['w1']:.4f}")
    ax1.plot([p["w1"]], [L0], "o", color="C3")
    ax1.set_xlabel("w1")
    ax1.set_ylabel("L = (y - target)$^2$")
    ax1.set_title("the hand gradient is the slope")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    pos = np.arange(len(NAMES))
    for i, (label, g) in enumerate((("by hand", hand), ("finite differences", fd),
                                    ("fastopt MLP backward", mlp))):
        ax2.bar(pos + (i - 1) * 0.27, [g[n] for n in NAMES], 0.27, label=label)
    ax2.set_xticks(pos, [f"dL/d{n}" for n in NAMES])
    ax2.axhline(0, color="k", lw=0.6)
    ax2.set_title("three ways, one answer")
    ax2.text(0.02, 0.62, f"max |hand - fin. diff.| = {err_fd:.0e}\n"
             f"max |hand - MLP| = {err_mlp:.0e}", transform=ax2.transAxes, fontsize=8, va="top")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)
