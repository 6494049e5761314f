r"""Every fastopt optimizer on an elongated bowl and on Rosenbrock's banana: paths and losses.

Two classic 2-D test functions, both with minimum value 0:

* the bowl :math:`f = x^2 + 10 y^2` (condition number 10) from (-4, 1),
  1000 steps;
* Rosenbrock's :math:`f = (1 - x)^2 + 100 (y - x^2)^2` from (-1.2, 1), 5000
  steps: a curved, narrow valley whose floor falls gently to (1, 1), with
  curvature ~1000 across it and ~0.4 along it (at the minimum).

Each optimizer is a public fastopt class over ``params = [p]``, one NumPy
array holding the point, stepped the way a user writes the loop (the
gradient at ``p``, then ``opt.step([g])``; SAM's two-gradient step is
``perturb`` then ``step``). Every hyperparameter is the class default
except ``lr`` (SGD's momentum 0.9 for the momentum and Nesterov variants;
SAM wraps SGD with momentum 0.9, Foret et al.'s base, with its default
``rho = 0.05``; L-BFGS takes ``max_iter=1``, so that one ``step(closure)``
is one iteration on one gradient like the others' steps, and no line
search, so that its ``lr = 1`` step is the plain quasi-Newton step): ``lr`` is the best of the grid 1e-4, 3e-4, ..., 1 for
that optimizer on that problem (:data:`LRS`; :func:`tune` re-derives it),
best meaning fewest steps until the loss *stays* below ``tol = 1e-3`` to
the end of the budget (at least its last tenth: that is "settles"); if it
never does, the lowest "final loss", the largest over the last tenth. So
this is each method at its best constant step size, not at its defaults.

What it shows (the run prints the numbers): L-BFGS, which builds a
curvature model from the gradients it has seen, settles in 5 steps on the
bowl and 57 on Rosenbrock. On the bowl every other method but Lion keeps
the loss below ``tol`` within about 30-120 steps once ``lr`` is tuned
(RMSprop ~540); Lion, whose every step moves each coordinate by
exactly ``+-lr``, ends in a 2-cycle around the minimum whose top is set by
``lr``. Rosenbrock separates them: heavy-ball momentum settles in about 200
steps, Nesterov ~600, Adam ~1500, AdamW, Adamax, Adagrad, Lion and RMSprop
in 2600-4300; plain SGD (its stable ``lr`` is set by the valley's steep
walls, so it crawls along the floor), NAdam and RAdam (whose first steps
are un-normalised momentum steps, so a large ``lr`` diverges on the walls)
do not within 5000. Neither does LAMB: its trust ratio makes every step
``lr * ||p||`` long, which shrinks near the bowl's minimum at the origin
but not near (1, 1), where it keeps taking steps of ``lr * sqrt(2)``
across the narrow valley. Nor does SAM: it takes its gradient ``rho``
uphill, and across a valley of curvature 1000 that gradient is ~``1000
rho = 50`` even at the minimum, so it cannot rest on the floor (its loss
hovers near 0.1 at its best ``lr``). On the bowl, curvature 20 at most,
SAM settles like SGD with momentum.
"""

from __future__ import annotations

import math

import numpy as np

from ._paths import first_below, step_for, trajectory
from ._plot import contour_map, pyplot, report, save_palette

TOL = 1e-3
TAIL = 0.1       # the share of the budget a settled loss must stay below TOL
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def bowl(x, y):
    return x ** 2 + 10 * y ** 2


def rosenbrock(x, y):
    return (1 - x) ** 2 + 100 * (y - x ** 2) ** 2


#: name -> (f(x, y), its gradient at p, start, minimum, step budget)
PROBLEMS = {
    "bowl": (bowl, lambda p: np.array([2 * p[0], 20 * p[1]]), (-4.0, 1.0), (0.0, 0.0), 1000),
    "rosenbrock": (rosenbrock,
                   lambda p: np.array([-2 * (1 - p[0]) - 400 * p[0] * (p[1] - p[0] ** 2),
                                       200 * (p[1] - p[0] ** 2)]),
                   (-1.2, 1.0), (1.0, 1.0), 5000),
}


def optimizers():
    """``{name: make(params, lr) -> optimizer}``: the public classes as a user builds them."""
    import fastopt

    return {
        "SGD": lambda ps, lr: fastopt.SGD(ps, lr=lr),
        "SGD momentum": lambda ps, lr: fastopt.SGD(ps, lr=lr, momentum=0.9),
        "Nesterov": lambda ps, lr: fastopt.SGD(ps, lr=lr, momentum=0.9, nesterov=True),
        "Adam": lambda ps, lr: fastopt.Adam(ps, lr=lr),
        "AdamW": lambda ps, lr: fastopt.AdamW(ps, lr=lr),
        "RMSprop": lambda ps, lr: fastopt.RMSprop(ps, lr=lr),
        "Adagrad": lambda ps, lr: fastopt.Adagrad(ps, lr=lr),
        "Adamax": lambda ps, lr: fastopt.Adamax(ps, lr=lr),
        "NAdam": lambda ps, lr: fastopt.NAdam(ps, lr=lr),
        "RAdam": lambda ps, lr: fastopt.RAdam(ps, lr=lr),
        "Lion": lambda ps, lr: fastopt.Lion(ps, lr=lr),
        "LAMB": lambda ps, lr: fastopt.LAMB(ps, lr=lr),
        # SAM around SGD with momentum, as in Foret et al.'s experiments; rho its default
        "SAM": lambda ps, lr: fastopt.SAM(fastopt.SGD(ps, lr=lr, momentum=0.9)),
        # one iteration (one gradient) per step() like the rest, no line search
        "L-BFGS": lambda ps, lr: fastopt.LBFGS(ps, lr=lr, max_iter=1),
    }


#: the best lr of GRID per problem and optimizer, as tune() finds it
LRS = {
    "bowl": {"SGD": 3e-2, "SGD momentum": 3e-3, "Nesterov": 3e-2, "Adam": 1.0, "AdamW": 1.0,
             "RMSprop": 1e-2, "Adagrad": 1.0, "Adamax": 1.0, "NAdam": 1e-1, "RAdam": 3e-1,
             "Lion": 1e-2, "LAMB": 3e-1, "SAM": 3e-3, "L-BFGS": 1.0},
    "rosenbrock": {"SGD": 1e-3, "SGD momentum": 3e-3, "Nesterov": 1e-3, "Adam": 3e-2,
                   "AdamW": 3e-2, "RMSprop": 1e-3, "Adagrad": 1.0, "Adamax": 3e-2,
                   "NAdam": 3e-3, "RAdam": 3e-3, "Lion": 1e-3, "LAMB": 1e-2, "SAM": 1e-4,
                   "L-BFGS": 1.0},
}


def descend(problem, name, lr):
    """The path ``[steps + 1, 2]`` of optimizer ``name`` at ``lr`` on ``problem``
    (it stops early once the loss is no longer finite or passes 1e8)."""
    f, grad, start, _, steps = PROBLEMS[problem]
    p = np.array(start)
    opt = optimizers()[name]([p], lr)
    with np.errstate(over="ignore", invalid="ignore"):
        path, _ = trajectory(p, step_for(opt, p, f, grad), steps,
                             stop=lambda q: not abs(f(*q)) < 1e8)
    return path


def settled(losses, tol=TOL):
    """First step from which the loss stays below ``tol`` to the end of the run,
    if that includes at least its last :data:`TAIL` of steps; else None."""
    above = np.nonzero(~(np.asarray(losses) < tol))[0]
    first = int(above[-1]) + 1 if above.size else 0
    return first if first <= (1 - TAIL) * (len(losses) - 1) else None


def resting_loss(losses):
    """The largest loss over the run's last :data:`TAIL` of steps: where it has
    settled (a method that ends in a 2-cycle, as Lion does, is judged by the
    higher point of the cycle, not by which one the budget happened to end on)."""
    n = len(losses) - 1
    return float(np.max(losses[n - int(TAIL * n):]))


def _score(problem, losses):
    """Sort key for tune(): settled sooner is better; else a lower resting loss."""
    if len(losses) != PROBLEMS[problem][4] + 1:       # stopped early: it diverged
        return (2, 0)
    s = settled(losses)
    return (0, s) if s is not None else (1, resting_loss(losses))


def tune(problems=tuple(PROBLEMS), names=None, grid=GRID):
    """``{problem: {name: best lr of grid}}``, the rule that made :data:`LRS` (seconds)."""
    names = names or list(optimizers())
    out = {}
    for problem in problems:
        f = PROBLEMS[problem][0]
        out[problem] = {n: min(grid, key=lambda lr: _score(problem, f(*descend(problem, n, lr).T)))
                        for n in names}
    return out


def run(output=None, small=False, verbose=True) -> dict:
    """``small`` changes nothing: the whole zoo takes a few seconds."""
    facts = {"tol": TOL, "problems": {}}
    curves = {}
    lines = [f"each optimizer at its best lr of {GRID[0]:g}..{GRID[-1]:g}; 'settles': steps "
             f"until the loss stays below {TOL:g} (the minimum is 0); final loss: the largest "
             f"over the last {TAIL:.0%} of the steps"]
    for problem, (f, _, start, _, steps) in PROBLEMS.items():
        rows, curves[problem] = {}, {}
        for name in optimizers():
            lr = LRS[problem][name]
            path = descend(problem, name, lr)
            losses = f(*path.T)
            complete = len(path) == steps + 1
            rows[name] = {"lr": lr, "final_loss": resting_loss(losses) if complete else math.inf,
                          "first_below_tol": first_below(losses, TOL),
                          "steps_to_tol": settled(losses) if complete else None,
                          "diverged": not complete}
            curves[problem][name] = (path, losses)
        facts["problems"][problem] = {"start": start, "budget": steps, "optimizers": rows,
                                      "settled": [n for n, r in rows.items()
                                                  if r["steps_to_tol"] is not None]}
        lines.append(f"  {problem} from {start}, {steps} steps:")
        best_first = sorted(rows, key=lambda n: _score(problem, curves[problem][n][1]))
        for name, r in ((n, rows[n]) for n in best_first):
            lines.append(f"    {name:<13} lr {r['lr']:<6g} settles "
                         f"{_steps(r['steps_to_tol']):>9}   final loss {r['final_loss']:.1e}")
    report(verbose, lines, output, lambda path: _draw(path, curves, facts))
    return facts


def _steps(s):
    return "never" if s is None else f"in {s}"


def _draw(path, curves, facts):
    plt = pyplot()
    names = list(optimizers())
    style = {n: {"color": f"C{i % 10}", "ls": "-" if i < 10 else "--"}
             for i, n in enumerate(names)}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), gridspec_kw={"width_ratios": [1.2, 1]})
    frames = {"bowl": ((-4.6, 4.6), (-2.3, 2.3), np.geomspace(0.05, 60, 12)),
              "rosenbrock": ((-2.0, 2.0), (-1.0, 3.0), np.geomspace(0.01, 2000, 14))}
    for (ax1, ax2), (problem, (f, _, start, minimum, steps)) in zip(axes, PROBLEMS.items()):
        title = {"bowl": "x$^2$ + 10 y$^2$",
                 "rosenbrock": "Rosenbrock (1 - x)$^2$ + 100 (y - x$^2$)$^2$"}[problem]
        contour_map(ax1, f, *frames[problem], f"{title}: paths from the square to the star")
        rows = facts["problems"][problem]["optimizers"]
        for name in names:
            p, losses = curves[problem][name]
            ax1.plot(p[:, 0], p[:, 1], lw=1, **style[name])
            # the larger of each two consecutive losses: a 2-cycle (Lion's) shows as its top
            top = np.maximum(losses[1:], losses[:-1])
            ax2.loglog(np.arange(1, len(losses)), top, lw=1.2,
                       label=f"{name} ({rows[name]['lr']:g}): "
                             f"{_steps(rows[name]['steps_to_tol'])}", **style[name])
        ax1.plot(*start, "ks", ms=6)
        ax1.plot(*minimum, "k*", ms=11)
        ax2.axhline(facts["tol"], color="k", ls=":", lw=0.8)
        ax2.set_xlim(1, steps)
        ax2.set_ylim(1e-12, 1e4)
        ax2.set_xlabel("step")
        ax2.set_ylabel("loss (max of this step and the last)")
        ax2.set_title(f"{problem}: loss; dotted {facts['tol']:g}; legend: lr, steps until it "
                      "stays below", fontsize=9)
        ax2.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    save_palette(fig, path)
