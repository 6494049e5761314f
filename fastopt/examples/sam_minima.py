r"""SAM leaves a sharp minimum that plain SGD settles in, for a flat one of the same depth.

The loss has two minima of depth exactly 0, at (-1, 0) and (1, 0):

.. math::
    f(x, y) = b\,(x^2 - 1)^2 + \tfrac12\, s(x)\, y^2,\qquad
    s(x) = s_f + \frac{s_s - s_f}{1 + e^{k x}}

with ``b = 0.3``, ``s_s = 30``, ``s_f = 0.3``, ``k = 4``: a double well in
``x`` whose valley is narrow across (curvature ``s(-1) = 29.5`` in ``y``)
at the left minimum and wide (``s(1) = 0.83``) at the right one. The
largest Hessian eigenvalue, the usual "sharpness", is 29.5 at the sharp
minimum and 2.4 (``8 b``, along x) at the flat one.

Starts: a grid over ``x`` in [-1.8, -0.2], ``y`` in {-1, -1/3, 1/3, 1}, all
left of the barrier at ``x = 0``. From each, ``fastopt.SGD(lr=0.05)`` and
``fastopt.SAM(fastopt.SGD(lr=0.05), rho=0.2)`` (Foret et al. 2021:
gradient at ``p + rho g / ||g||``, applied at ``p``) run the same number of
steps; the facts count where each ends (within 0.5 of a minimum).

Why they part: ``lr * 29.5 = 1.47 < 2``, so SGD is stable at the sharp
minimum and settles there from nearly every start (those nearest the
barrier are carried over it by the ``y^2 s'(x)`` term while ``y`` decays).
SAM evaluates the gradient ``rho`` uphill, across the narrow valley: near
its floor that adds ``s * rho`` to the ``y`` gradient, so SAM cannot come
to rest there but bounces from wall to wall (for a curvature ``c`` with
``lr * c < 2`` the bounce settles at an amplitude ``lr c rho / (2 - lr c)``,
here ~3 ``rho``). At the bounce's far points ``x``'s gradient includes
``s'(x) y^2 / 2``, which pushes toward where the valley widens: SAM drifts
over the barrier and comes to rest in the flat minimum, where its bounce is
small (about 0.013 along x, that minimum's steepest direction: a loss
under 1e-3). This is the drift along a ravine that Bartlett, Long &
Bousquet (2022) describe. Same lr, same starts, no noise: the
difference is SAM's perturbation alone.
"""

from __future__ import annotations

import numpy as np

from ._paths import gradient_step, sam_step, trajectory
from ._plot import contour_map, pyplot, report, save_palette

B, S_SHARP, S_FLAT, K = 0.3, 30.0, 0.3, 4.0
LR, RHO = 0.05, 0.2
MINIMA = {"sharp": (-1.0, 0.0), "flat": (1.0, 0.0)}
NEAR = 0.5           # an end point within this distance of a minimum has landed there
STEPS = 500


def valley_curvature(x):
    """s(x), the curvature across the valley (in y) at ``x``."""
    return S_FLAT + (S_SHARP - S_FLAT) / (1 + np.exp(K * x))


def loss(x, y):
    return B * (x * x - 1) ** 2 + 0.5 * valley_curvature(x) * y * y


def grad(p):
    x, y = p
    e = np.exp(K * x)
    ds = -(S_SHARP - S_FLAT) * K * e / (1 + e) ** 2          # s'(x)
    return np.array([4 * B * x * (x * x - 1) + 0.5 * ds * y * y, valley_curvature(x) * y])


def sharpness(name):
    """The largest Hessian eigenvalue at a minimum (the Hessian is diagonal there)."""
    x, _ = MINIMA[name]
    return float(max(8 * B, valley_curvature(x)))


def starts(small=False):
    xs = np.linspace(-1.8, -0.2, 3 if small else 9)
    return [(float(x), y) for x in xs for y in (-1.0, -1 / 3, 1 / 3, 1.0)]


def descend(method, start, steps):
    """The path ``[steps + 1, 2]`` of ``"SGD"`` or ``"SAM"`` from ``start``."""
    import fastopt

    p = np.array(start)
    base = fastopt.SGD([p], lr=LR)
    advance = (gradient_step(base, p, grad) if method == "SGD"
               else sam_step(fastopt.SAM(base, rho=RHO), p, grad))
    return trajectory(p, advance, steps)[0]


def method_label(method):
    return "SGD" if method == "SGD" else f"SAM rho={RHO}"


def landed(point):
    """``"sharp"``, ``"flat"`` or ``"neither"``: where an end point rests."""
    for name, m in MINIMA.items():
        if np.hypot(*(np.asarray(point) - m)) < NEAR:
            return name
    return "neither"


def run(output=None, small=False, verbose=True) -> dict:
    grid = starts(small)
    steps = 200 if small else STEPS       # SAM leaves within ~40 steps; SGD settles by ~100
    paths = {m: [descend(m, s, steps) for s in grid] for m in ("SGD", "SAM")}
    counts = {m: {k: sum(landed(p[-1]) == k for p in ps) for k in ("sharp", "flat", "neither")}
              for m, ps in paths.items()}
    # how long SAM takes to leave: steps until it is first within NEAR of the flat minimum
    leave = [next((i for i, q in enumerate(p) if landed(q) == "flat"), None)
             for p in paths["SAM"]]
    facts = {"lr": LR, "rho": RHO, "steps": steps, "starts": len(grid),
             "sharpness": {k: sharpness(k) for k in MINIMA},
             "lr_times_sharpness": LR * sharpness("sharp"),
             "sgd": counts["SGD"], "sam": counts["SAM"],
             "sam_steps_to_flat": leave,
             "final_loss": {m: float(max(loss(*p[-1]) for p in ps)) for m, ps in paths.items()}}
    done = [t for t in leave if t is not None]
    lines = [f"two minima of depth 0: sharp (-1, 0), largest curvature "
             f"{facts['sharpness']['sharp']:.1f}; flat (1, 0), {facts['sharpness']['flat']:.1f}",
             f"{len(grid)} starts left of the barrier, {steps} steps, lr {LR} "
             f"(lr x sharpness = {facts['lr_times_sharpness']:.2f} < 2: SGD is stable in the "
             "sharp one)"]
    for m, c in counts.items():
        lines.append(f"  {method_label(m):<11} ends in the sharp "
                     f"minimum {c['sharp']:>3}x, the flat one {c['flat']:>3}x, neither "
                     f"{c['neither']}x")
    if done:
        lines.append(f"  SAM reaches the flat minimum in {min(done)}..{max(done)} steps")
    report(verbose, lines, output, lambda path: _draw(path, grid, paths, facts))
    return facts


def _draw(path, grid, paths, facts):
    plt = pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 4.2),
                                        gridspec_kw={"width_ratios": [1.5, 0.8, 1]})
    contour_map(ax1, loss, (-2, 2), (-1.3, 1.3), np.geomspace(0.01, 20, 14),
                f"where {facts['starts']} starts end after {facts['steps']} steps, "
                f"lr {facts['lr']}")
    colors = {"SGD": "C0", "SAM": "C1"}
    show = min(range(len(grid)), key=lambda i: abs(grid[i][0] + 1.4) + abs(grid[i][1] - 1))
    for m in ("SAM", "SGD"):     # SGD's short path on top
        p = paths[m][show]
        ax1.plot(p[:, 0], p[:, 1], ".-", ms=3 if m == "SGD" else 2,
                 lw=1.6 if m == "SGD" else 0.8, color=colors[m],
                 label=f"{method_label(m)}, one start")
    ax1.plot(*np.array(grid).T, "o", mfc="none", mec="0.4", ms=4, label="starts")
    for name, (mx, my) in MINIMA.items():
        c = {m: facts[m.lower()][name] for m in paths}
        ax1.plot(mx, my, "k*", ms=11)
        ax1.annotate(f"{name}: SGD {c['SGD']}, SAM {c['SAM']} of {facts['starts']}",
                     (mx, my), xytext=(mx, -0.67), textcoords="data", ha="center",
                     va="center",
                     fontsize=8, bbox={"fc": "w", "ec": "0.6", "lw": 0.5})
    ax1.legend(fontsize=8, loc="upper right")

    y = np.linspace(-1, 1, 201)
    for name, ls in (("sharp", "-"), ("flat", "--")):
        mx = MINIMA[name][0]
        ax2.plot(y, loss(mx, y), ls, color="k",
                 label=f"{name}: x = {mx:g}, curvature {valley_curvature(mx):.2f}")
    ax2.set_ylim(0, 3)
    ax2.set_xlabel("y (across the valley)")
    ax2.set_ylabel("loss")
    ax2.set_title("the two minima, cut across", fontsize=10)
    ax2.legend(fontsize=8, loc="upper center")

    n = 150
    for m, ps in paths.items():
        for i, p in enumerate(ps):
            ax3.plot(p[:n + 1, 0], color=colors[m], lw=0.7, alpha=0.6,
                     label=method_label(m) if i == 0 else None)
    for name, (mx, _) in MINIMA.items():
        ax3.axhline(mx, color="k", ls=":", lw=0.8)
        ax3.text(n, mx, f" {name}", va="center", fontsize=8)
    ax3.set_xlim(0, n)
    ax3.set_xlabel("step")
    ax3.set_ylabel("x")
    ax3.set_title(f"x over the first {n} steps, every start", fontsize=10)
    ax3.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    save_palette(fig, path)
