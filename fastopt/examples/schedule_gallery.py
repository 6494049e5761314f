r"""A gallery of learning-rate schedules, as the optimizer sees them.

Three recipes from :mod:`fastopt.schedules`, over 1000 steps with a peak lr
of 1e-3:

* ``warmup_cosine(1e-3, warmup_steps=100, total_steps=1000, alpha=0.1)``:
  linear warmup from 0 (large early steps on random weights are what
  warmup avoids), then a half cosine down to 10% of the peak;
* ``step_decay(1e-3, gamma=0.1, milestones=[500, 800])``: the classic
  "divide by 10 at fixed epochs";
* ``one_cycle(1e-3, 1000)``: up from peak/25 over the first 30%, then down
  to peak/25/1e4 (Smith & Topin's 1cycle, torch's OneCycleLR formula).

Each schedule is handed to a real ``fastopt.SGD`` as its ``lr``; the curves
drawn are the optimizer's ``last_lr`` after every step, which the example
checks equals the closed-form ``schedule(step)``. The printed landmarks
(peak, where it is reached, the last value) are asserted by the tests.
"""

from __future__ import annotations

import numpy as np

from ._plot import pyplot, save, say

PEAK = 1e-3


def gallery(total=1000):
    """``{title: schedule}`` for the three recipes."""
    from fastopt import schedules as S

    return {
        "warmup + cosine": S.warmup_cosine(PEAK, warmup_steps=total // 10, total_steps=total,
                                           alpha=0.1),
        "step decay": S.step_decay(PEAK, gamma=0.1, milestones=[total // 2, 4 * total // 5]),
        "one-cycle": S.one_cycle(PEAK, total),
    }


def optimizer_lrs(schedule, steps):
    """The lr a ``fastopt.SGD`` used at each of ``steps`` steps (``opt.last_lr``)."""
    import fastopt

    p = np.zeros(4)
    g = np.zeros(4)
    opt = fastopt.SGD([p], lr=schedule)
    out = []
    for _ in range(steps):
        opt.step([g])
        out.append(opt.last_lr[0])
    return np.array(out)


def run(output=None, small=False, verbose=True, total=1000) -> dict:
    """``small`` changes nothing (milliseconds); returns the landmarks per schedule."""
    facts = {"total_steps": total, "peak": PEAK, "schedules": {}}
    lines = [f"{total} steps, peak lr {PEAK:g}; values are the lr fastopt.SGD used at each step"]
    curves = {}
    for title, s in gallery(total).items():
        lrs = optimizer_lrs(s, total)
        closed = np.array([s(t) for t in range(total)])
        curves[title] = lrs
        info = {"spec": s.to_dict(), "max": float(lrs.max()), "argmax": int(lrs.argmax()),
                "first": float(lrs[0]), "last": float(lrs[-1]),
                # steps where the lr jumps down by more than 5% of the peak at once
                "drops": [int(t) for t in
                          np.nonzero(lrs[:-1] - lrs[1:] > 0.05 * lrs.max())[0] + 1],
                "matches_closed_form": bool(np.array_equal(lrs, closed))}
        facts["schedules"][title] = info
        lines.append(f"  {title:<16} {s!r}")
        lines.append(f"  {'':<16} starts {info['first']:.3g}, peak {info['max']:.3g} at step "
                     f"{info['argmax']}, ends {info['last']:.3g}"
                     + (f", drops at steps {info['drops']}" if info["drops"] else "")
                     + "; optimizer lr == "
                     f"schedule(step): {info['matches_closed_form']}")
    say(verbose, *lines)
    if output is not None:
        _draw(output, curves, facts)
        say(verbose, f"wrote {output}")
    return facts


def _draw(path, curves, facts):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharey=True)
    for i, (ax, (title, lrs)) in enumerate(zip(axes, curves.items())):
        info = facts["schedules"][title]
        ax.plot(np.arange(len(lrs)), lrs * 1e3, color=f"C{i}", lw=1.8)
        if info["drops"]:
            for t in info["drops"]:
                ax.annotate(f"x{lrs[t] / lrs[t - 1]:.2g} at step {t}", (t, lrs[t] * 1e3),
                            xytext=(5, 4), textcoords="offset points", fontsize=8)
        else:
            ax.plot(info["argmax"], info["max"] * 1e3, "o", color="k", ms=4)
            ax.annotate(f"peak at step {info['argmax']}", (info["argmax"], info["max"] * 1e3),
                        xytext=(6, -12), textcoords="offset points", fontsize=8)
        ax.annotate(f"ends at {info['last']:.2g}", (len(lrs) - 1, info["last"] * 1e3),
                    xytext=(-4, 45 if info["drops"] else 26), textcoords="offset points",
                    fontsize=8, ha="right")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("learning rate (x 1e-3)")
    fig.suptitle("the lr fastopt.SGD used at each step (peak 1e-3)", fontsize=10)
    fig.tight_layout()
    save(fig, path)
