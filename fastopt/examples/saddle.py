r"""Escaping a saddle: plain GD stalls near the ridge; momentum, gradient noise and Adam escape.

Two saddles, both with their minimum-direction along x and the way down
along y, started at ``x = 1`` a hair off the ridge ``y = 0``:

* :math:`f = x^2 - y^2`, from ``y = 1e-8``. Gradient descent multiplies
  ``y`` by ``1 + 2 lr`` per step, so it leaves (``|y| > 1``) after
  ``ln(1 / y0) / ln(1 + 2 lr)`` steps: 931 at ``lr = 0.01``, nearly all of
  them spent where the gradient is too small to see. Exactly on the ridge
  it would never leave.
* :math:`f = x^2 - y^4`, from ``y = 0.03``: no curvature at all along y
  (a flat saddle), the pull away is ``4 y^3``. GD's escape time grows as
  ``1 / y0^2``, about ``(1 / y0^2 - 1) / (8 lr)`` = 13,876 steps, from a
  start 3 million times farther from the ridge than on the first saddle.

What escapes faster, from the same start with the same ``lr = 0.01``:

* **momentum** (``fastopt.SGD(momentum=0.9)``) keeps adding up the small,
  consistent push: on the quadratic saddle ``y`` grows by the root of
  ``r^2 - (1 + beta + 2 lr) r + beta = 0``, 1.107 per step instead of 1.02;
  on the flat one it acts like a 10x larger lr;
* **gradient noise** (``fastopt.SGD`` on the gradient plus N(0, 1) noise,
  what minibatches add) kicks ``y`` off the ridge in a few steps, so the
  unstable direction has something to amplify; the run reports the median
  over several seeds;
* **Adam** (``fastopt.Adam``) divides the gradient by its own running RMS,
  so a tiny consistent gradient still moves ``y`` by about ``lr`` per step.

The facts are the escape times (steps until ``|y| > 1``) per saddle and
method; ``None`` means not within the step budget.
"""

from __future__ import annotations

import math

import numpy as np

from ._paths import gradient_step, trajectory
from ._plot import contour_map, pyplot, report, save_palette

LR = 0.01
BETA = 0.9
SIGMA = 1.0          # the gradient noise's standard deviation, per coordinate
START_X = 1.0
ESCAPE = 1.0         # |y| beyond which the run has left the saddle


def quadratic_saddle(x, y):
    return x ** 2 - y ** 2


def flat_saddle(x, y):
    return x ** 2 - y ** 4


#: title -> (f, gradient of f at p, starting y)
SADDLES = {
    "x^2 - y^2": (quadratic_saddle, lambda p: np.array([2 * p[0], -2 * p[1]]), 1e-8),
    "x^2 - y^4": (flat_saddle, lambda p: np.array([2 * p[0], -4 * p[1] ** 3]), 0.03),
}

METHODS = ("GD", "momentum", "noisy GD", "Adam")


def predicted_gd_escape(title, y0, lr=LR):
    """GD's escape time from the closed forms in the module docstring."""
    if title == "x^2 - y^2":
        return math.ceil(math.log(ESCAPE / y0) / math.log(1 + 2 * lr))
    return (1 / y0 ** 2 - 1 / ESCAPE ** 2) / (8 * lr)    # dy/dt = 4 lr y^3


def _optimizer(method, p):
    import fastopt

    if method == "Adam":
        return fastopt.Adam([p], lr=LR)
    return fastopt.SGD([p], lr=LR, momentum=BETA if method == "momentum" else 0.0)


def escape(method, grad, y0, steps, seed=0):
    """``(path, steps until |y| > ESCAPE or None)`` for one method."""
    p = np.array([START_X, y0])
    noise = None
    if method == "noisy GD":
        rng = np.random.default_rng(seed)
        noise = lambda: SIGMA * rng.standard_normal(2)    # noqa: E731
    return trajectory(p, gradient_step(_optimizer(method, p), p, grad, noise), steps,
                      stop=lambda q: abs(q[1]) > ESCAPE)


def _slowness(t):
    """An escape time for sorting: a run that never escaped is infinitely slow."""
    return math.inf if t is None else t


def _median(times):
    m = float(np.median([_slowness(t) for t in times]))
    return None if math.isinf(m) else m


def _steps(t):
    return "never" if t is None else f"{t:.0f}"


def run(output=None, small=False, verbose=True, seeds=None) -> dict:
    steps = 3000 if small else 20000
    seeds = seeds if seeds is not None else (8 if small else 20)
    facts = {"lr": LR, "beta": BETA, "sigma": SIGMA, "budget": steps, "seeds": seeds,
             "escape": ESCAPE, "saddles": {}}
    paths = {}
    lines = [f"steps until |y| > {ESCAPE} from x = {START_X}, lr = {LR} "
             f"(budget {steps} steps; noisy GD: median over {seeds} seeds)"]
    for title, (_, grad, y0) in SADDLES.items():
        runs = {m: escape(m, grad, y0, steps) for m in METHODS if m != "noisy GD"}
        noisy = [escape("noisy GD", grad, y0, steps, seed=s) for s in range(seeds)]
        times = [t for _, t in noisy]
        typical = int(np.argsort([_slowness(t) for t in times])[seeds // 2])
        runs["noisy GD"] = noisy[typical]     # the run drawn: the median seed
        info = {"y0": y0, "predicted_gd": predicted_gd_escape(title, y0),
                "steps": {m: runs[m][1] for m in METHODS}, "noisy_all": times}
        info["steps"]["noisy GD"] = _median(times)
        facts["saddles"][title] = info
        paths[title] = (runs, noisy)
        lines.append(f"  f = {title}, start y = {y0:g} (GD predicted: "
                     f"{info['predicted_gd']:.0f}):")
        for m in METHODS:
            lines.append(f"    {m:<9} {_steps(info['steps'][m]):>6}"
                         + (f"  (over the seeds: {_steps(min(times, key=_slowness))} .. "
                            f"{_steps(max(times, key=_slowness))})" if m == "noisy GD" else ""))
    report(verbose, lines, output, lambda path: _draw(path, paths, facts))
    return facts


def _from_step_1(path):
    """(steps, |y|) after each step, for a log step axis."""
    return np.arange(1, len(path)), np.abs(path[1:, 1])


COLORS = {"GD": "C0", "momentum": "C1", "noisy GD": "C2", "Adam": "C3"}


def _draw(path, paths, facts):
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), gridspec_kw={"width_ratios": [1, 1.4]})
    for row, (title, (f, _, y0)) in zip(axes, SADDLES.items()):
        runs, noisy = paths[title]
        info = facts["saddles"][title]
        ax1, ax2 = row
        name = title.replace("^2", "$^2$").replace("^4", "$^4$")
        contour_map(ax1, f, (-1.2, 1.2), (-1.2, 1.2), np.linspace(-1.2, 1.2, 13),
                    f"f = {name}, start (1, {y0:g})")
        for m in METHODS:     # GD wide and pale: momentum's path runs on top of it
            arr = runs[m][0]
            wide = m == "GD"
            ax1.plot(arr[:, 0], arr[:, 1], lw=4 if wide else 1.2, alpha=0.45 if wide else 1,
                     color=COLORS[m], label=m)
        ax1.plot(START_X, y0, "ks", ms=5)
        ax1.plot(0, 0, "kx", ms=7)
        for arr, _ in noisy:
            ax2.loglog(*_from_step_1(arr), color=COLORS["noisy GD"], lw=0.5, alpha=0.25)
        for m in METHODS:
            label = f"{m}: {_steps(info['steps'][m])} steps"
            if m == "noisy GD":
                label = f"noisy GD, median of {len(noisy)} seeds (faint): " + label[10:]
            ax2.loglog(*_from_step_1(runs[m][0]), color=COLORS[m], lw=1.5, label=label)
        ax2.axhline(ESCAPE, color="k", ls=":", lw=0.8)
        ax2.set_xlim(1, facts["budget"])
        ax2.set_ylim(min(y0, 1e-3) / 3, 3)
        ax2.set_xlabel("step")
        ax2.set_ylabel("|y|  (escaped above the dotted line)")
        ax2.set_title(f"lr {facts['lr']}: steps until |y| > {ESCAPE:g}", fontsize=10)
        ax2.legend(fontsize=8, loc="lower right")
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_palette(fig, path)
