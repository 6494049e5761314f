r"""Adam from scratch in NumPy, next to SGD on an ill-conditioned quadratic.

The problem: :math:`f(x) = \tfrac12 \sum_i \lambda_i x_i^2` in 10 dimensions
with curvatures :math:`\lambda_i` spread log-uniformly over 1..100 (condition
number 100), from :math:`x = (1, \dots, 1)`.

SGD (here full-batch gradient descent) needs ``lr < 2 / lambda_max`` to be
stable, and even the best constant step, ``2 / (lambda_min + lambda_max)``,
shrinks the flattest coordinate only by ``(kappa - 1) / (kappa + 1) = 0.98``
per step. Adam (Kingma & Ba, 2015) divides each coordinate's step by a
running RMS of its own gradient, so every coordinate moves at a similar
speed whatever its curvature: on a diagonal quadratic the conditioning
largely disappears. :func:`adam` below is the whole algorithm::

    m = b1 m + (1 - b1) g            # first moment (momentum)
    v = b2 v + (1 - b2) g^2          # second moment
    x -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

and the example checks that ``fastopt.Adam`` (one fused kernel) takes the
same iterates to float rounding (it computes the same formula in torch's
arrangement, bias corrections folded into scalars, so not bit for bit), and
that Adam reaches the tolerance in fewer steps than SGD.
"""

from __future__ import annotations

import numpy as np

from ._plot import pyplot, save, say

DIM = 10
LAM = np.logspace(0, 2, DIM)     # curvatures 1..100


def loss(x):
    return 0.5 * float(np.sum(LAM * x * x))


def adam(x0, grad, lr, steps, b1=0.9, b2=0.999, eps=1e-8):
    """Adam from scratch: the iterates ``[steps + 1, dim]``."""
    x = np.array(x0, dtype=np.float64)
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    path = [x.copy()]
    for t in range(1, steps + 1):
        g = grad(x)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        x = x - lr * m_hat / (np.sqrt(v_hat) + eps)
        path.append(x.copy())
    return np.array(path)


def fastopt_path(x0, grad, steps, optimizer):
    """The iterates of a fastopt optimizer class, e.g. ``fastopt.Adam``
    (``optimizer(params)`` builds it)."""
    x = np.array(x0, dtype=np.float64)
    g = np.empty_like(x)
    opt = optimizer([x])
    path = [x.copy()]
    for _ in range(steps):
        g[:] = grad(x)
        opt.step([g])
        path.append(x.copy())
    return np.array(path)


def steps_to(losses, tol):
    """First step whose loss is below ``tol * losses[0]``, or None."""
    hit = np.nonzero(np.asarray(losses) < tol * losses[0])[0]
    return int(hit[0]) if hit.size else None


def run(output=None, small=False, verbose=True, lr_adam=0.03, tol=1e-6) -> dict:
    import fastopt

    steps = 200 if small else 500
    x0 = np.ones(DIM)

    def grad(x):
        return LAM * x

    lr_sgd = float(2.0 / (LAM.min() + LAM.max()))   # the best constant step for GD
    scratch = adam(x0, grad, lr_adam, steps)
    fused = fastopt_path(x0, grad, steps, lambda p: fastopt.Adam(p, lr=lr_adam))
    sgd = fastopt_path(x0, grad, steps, lambda p: fastopt.SGD(p, lr=lr_sgd))
    diff = float(np.abs(scratch - fused).max())
    la = [loss(x) for x in scratch]
    lf = [loss(x) for x in fused]
    ls = [loss(x) for x in sgd]
    n_adam, n_sgd = steps_to(la, tol), steps_to(ls, tol)
    faster = n_adam is not None and (n_sgd is None or n_adam < n_sgd)
    facts = {"dim": DIM, "condition": float(LAM.max() / LAM.min()), "steps": steps,
             "lr_adam": lr_adam, "lr_sgd": lr_sgd, "tol": tol,
             "max_abs_diff_fused_vs_scratch": diff,
             "bitwise_equal": bool(np.array_equal(scratch, fused)),
             "steps_adam": n_adam, "steps_sgd": n_sgd, "adam_faster": faster,
             "final_loss_adam": la[-1], "final_loss_fastopt_adam": lf[-1],
             "final_loss_sgd": ls[-1]}

    def n(v):
        return f"{v} steps" if v is not None else f"not within {steps} steps"

    say(verbose,
        f"f(x) = 1/2 sum lambda_i x_i^2, {DIM} dims, lambda in 1..100 (condition "
        f"{facts['condition']:.0f}), loss down to {tol:g} x its start:",
        f"  Adam from scratch, lr={lr_adam}:       {n(n_adam)} (final loss {la[-1]:.2e})",
        f"  SGD, best constant lr=2/(1+100)={lr_sgd:.4f}: {n(n_sgd)} (final loss {ls[-1]:.2e})",
        f"  -> {'Adam' if faster else 'SGD'} converges faster here",
        f"  fastopt.Adam vs from scratch over {steps} steps: max |dx| = {diff:.1e} with x "
        f"starting at 1 ({'bit-identical' if facts['bitwise_equal'] else 'float rounding'})")
    if output is not None:
        _draw(output, la, lf, ls, facts)
        say(verbose, f"wrote {output}")
    return facts


def _draw(path, la, lf, ls, facts):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.semilogy(la, lw=2.5, color="C1", alpha=0.5,
                label=f"Adam from scratch, lr={facts['lr_adam']}")
    ax.semilogy(lf, "--", lw=1, color="k", label="fastopt.Adam (same iterates)")
    ax.semilogy(ls, color="C0", label=f"SGD, lr=2/(1+100)={facts['lr_sgd']:.3f}")
    ax.axhline(facts["tol"] * la[0], color="0.5", ls=":", lw=0.8)
    for key, c in (("steps_adam", "C1"), ("steps_sgd", "C0")):
        if facts[key] is not None:
            ax.axvline(facts[key], color=c, ls=":", lw=0.8)
            ax.text(facts[key] + 3, 0.97, f"{facts[key]} steps", color=c, fontsize=8,
                    va="top", transform=ax.get_xaxis_transform())
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"ill-conditioned quadratic (condition {facts['condition']:.0f}); "
                 f"dotted: {facts['tol']:g} x start")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)
