r"""Gradient descent vs momentum on an elongated bowl, and a step size that diverges.

:math:`f(x, y) = x^2 + 10 y^2` has curvatures 2 (along x) and 20 (along y),
a condition number of 10. Plain gradient descent with step ``lr``
multiplies the distance along each axis by ``1 - lr * curvature`` per
step:

* it is stable only while ``lr < 2 / 20 = 0.1`` (the steep direction
  decides); at ``lr = 0.105`` the y-coordinate grows by ``|1 - 2.1| = 1.1``
  per step and the run diverges;
* at a safe ``lr = 0.01`` the flat direction shrinks by only 0.98 per step,
  so it crawls along the valley floor.

Momentum (heavy ball, ``beta = 0.9``, ``fastopt.SGD(momentum=0.9)``:
``buf = beta * buf + g; p -= lr * buf``) accumulates the consistent
x-gradient into velocity, while the alternating y-gradients cancel in
``buf``. From the same start with the same ``lr`` it reaches the minimum to
the tolerance in far fewer steps (the run prints both counts).

An honest footnote: momentum wins *at the same step size*. Tuned for this
bowl, plain GD (``lr`` near ``2 / (2 + 20)``) is fast too, because the
problem is only mildly ill-conditioned; momentum's advantage grows with
the condition number.
"""

from __future__ import annotations

import numpy as np

from ._plot import pyplot, save, say

CURV = np.array([2.0, 20.0])     # the Hessian's diagonal: f = x^2 + 10 y^2
START = (-4.0, 1.0)


def f(x, y):
    return x ** 2 + 10 * y ** 2


def descend(lr, momentum=0.0, steps=1000, tol=1e-3, blowup=1e6):
    """Run ``fastopt.SGD`` on ``f`` from :data:`START`.

    Returns ``(path [n, 2], steps_to_tol)``: the iterates, and the first
    step whose distance to the minimum is below ``tol`` (``None`` if none).
    Stops early once the distance exceeds ``blowup``.
    """
    import fastopt

    p = np.array(START)
    g = np.empty(2)
    opt = fastopt.SGD([p], lr=lr, momentum=momentum)
    path, hit = [p.copy()], None
    for step in range(1, steps + 1):
        np.multiply(CURV, p, out=g)          # grad f = (2x, 20y)
        opt.step([g])
        path.append(p.copy())
        dist = float(np.hypot(*p))
        if hit is None and dist < tol:
            hit = step
        if not dist < blowup:
            break
    return np.array(path), hit


def run(output=None, small=False, verbose=True, lr=0.01, beta=0.9, lr_diverge=0.105,
        tol=1e-3) -> dict:
    steps = 500 if small else 1000
    gd, gd_hit = descend(lr, 0.0, steps, tol)
    mom, mom_hit = descend(lr, beta, steps, tol)
    div, _ = descend(lr_diverge, 0.0, 100, tol)
    hits = {"gd": gd_hit, "momentum": mom_hit}
    reached = {k: v for k, v in hits.items() if v is not None}
    winner = min(reached, key=reached.get) if reached else None
    growth = float(abs(div[-1, 1] / div[-2, 1]))
    far = float(np.hypot(*div[-1]))
    facts = {"lr": lr, "beta": beta, "tol": tol, "steps_gd": gd_hit, "steps_momentum": mom_hit,
             "winner": winner, "lr_diverge": lr_diverge,
             "diverged": far > 100 * float(np.hypot(*START)),   # 100x farther than the start
             "diverge_growth_per_step": growth, "diverge_final_distance": far,
             "stability_limit": float(2 / CURV.max())}

    def n(v):
        return f"{v} steps" if v is not None else f"not within {steps} steps"

    say(verbose,
        f"f(x, y) = x^2 + 10 y^2 from {START}, distance to the minimum < {tol}:",
        f"  gradient descent, lr={lr}:                {n(gd_hit)}",
        f"  momentum beta={beta}, lr={lr}:              {n(mom_hit)}",
        f"  -> {winner} reaches the minimum in fewer steps"
        + (f" ({gd_hit / mom_hit:.1f}x fewer)" if gd_hit and mom_hit and winner == "momentum"
           else ""),
        f"  gradient descent, lr={lr_diverge} (> 2/20 = {2 / CURV.max():g}): diverges, "
        f"|y| grows {growth:.2f}x per step, distance {far:.2e} after "
        f"{len(div) - 1} steps")
    if output is not None:
        _draw(output, gd, mom, div, facts)
        say(verbose, f"wrote {output}")
    return facts


def _draw(path, gd, mom, div, facts):
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1.5, 1]})
    xs, ys = np.meshgrid(np.linspace(-4.6, 4.6, 300), np.linspace(-2.3, 2.3, 200))
    ax1.contour(xs, ys, f(xs, ys), levels=np.geomspace(0.05, 60, 14), colors="0.7",
                linewidths=0.7)
    lr, beta = facts["lr"], facts["beta"]
    ax1.plot(gd[:, 0], gd[:, 1], ".-", ms=2, lw=1, color="C0", label=f"GD lr={lr}")
    ax1.plot(mom[:, 0], mom[:, 1], ".-", ms=2, lw=1, color="C1",
             label=f"momentum {beta}, lr={lr}")
    out = np.nonzero(np.abs(div[:, 1]) > 2.3)[0]
    k = int(out[0]) + 1 if out.size else len(div)     # up to the first point off the frame
    ax1.plot(div[:k, 0], div[:k, 1], "o-", ms=3, lw=1, color="C3",
             label=f"GD lr={facts['lr_diverge']} (diverges)")
    ax1.annotate("leaves the frame", (div[k - 1, 0], 2.3), xytext=(6, -12),
                 textcoords="offset points", color="C3", fontsize=8)
    ax1.plot(*START, "ks", ms=6)
    ax1.plot(0, 0, "k*", ms=10)
    ax1.set_xlim(-4.6, 4.6)
    ax1.set_ylim(-2.3, 2.3)
    ax1.set_xlabel("x")
    ax1.set_ylabel("y")
    ax1.set_title("f(x, y) = x$^2$ + 10 y$^2$: paths from the same start")
    ax1.legend(fontsize=8, loc="lower right")
    for arr, c, label in ((gd, "C0", "GD"), (mom, "C1", "momentum"),
                          (div, "C3", "GD, diverging lr")):
        ax2.semilogy(np.hypot(arr[:, 0], arr[:, 1]), color=c, label=label)
    ax2.axhline(facts["tol"], color="k", ls=":", lw=0.8)
    for key, c in (("steps_gd", "C0"), ("steps_momentum", "C1")):
        if facts[key] is not None:
            ax2.axvline(facts[key], color=c, ls="--", lw=0.8)
            ax2.annotate(f"{facts[key]}", (facts[key], facts["tol"]), color=c, fontsize=8,
                         xytext=(3, 6), textcoords="offset points")
    ax2.set_ylim(1e-5, 1e3)
    ax2.set_xlim(0, max(len(gd), len(mom)))
    ax2.set_xlabel("step")
    ax2.set_ylabel("distance to the minimum")
    ax2.set_title(f"tolerance {facts['tol']} (dotted)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)
