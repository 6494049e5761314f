r"""A learning-rate sweep on MNIST in one batched run: where training fails, where it crawls.

Five copies of one MLP (784-128-10, ReLU, the same initial weights) are
trained with Adam at ``lr = 1e-1, 1e-2, 1e-3, 1e-4, 1e-5`` as **one**
:class:`fastopt.nn.Ensemble`: every step is one batched forward/backward
for all five and one optimizer call with a param group (an lr) per model.
Data: :func:`fastopt.data.mnist_split`, the seeded 8k/2k split of the MNIST
test set; every model sees the same batches, so the lr is the only
difference.

The verdicts are measured, not eyeballed. With ``L0`` the held-out loss
before training (the same for all five) and ``L`` after:

* **fails** (too large): the loss is non-finite, or the training loss rose
  above ``2 x L0`` at some step (the run blew up; with Adam at 1e-1 the
  first steps overshoot to several times the starting loss and the model
  never catches up with the good rates);
* **crawls** (too small): no blow-up, but ``L0 - L`` is less than a quarter
  of the best model's improvement (it is still near where it started; a
  run that ends no better than it started, without a blow-up, crawls too);
* **good** otherwise. The best lr is the one with the lowest ``L``.

The lesson: the usable range is about two decades wide, and you find it by
looking at the loss curve's first steps (blow-up) and its slope (crawl).
"""

from __future__ import annotations

import numpy as np

from ._plot import pyplot, save, say

LRS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
BLOWUP = 2.0     # fails: training loss above BLOWUP * L0 at some step (or non-finite)
CRAWL = 0.25     # crawls: improvement below CRAWL * the best improvement


def verdicts(initial, final, peak, crawl=CRAWL, blowup=BLOWUP):
    """``"fails"``, ``"crawls"`` or ``"good"`` per model (see the module docstring).

    ``initial``: the loss before training; ``final``: the losses after;
    ``peak``: the largest training loss seen per model.
    """
    final = np.asarray(final, np.float64)
    peak = np.asarray(peak, np.float64)
    with np.errstate(invalid="ignore"):
        failed = ~np.isfinite(final) | ~np.isfinite(peak) | (peak > blowup * initial)
    ok = ~failed
    best_gain = (initial - final[ok]).max() if ok.any() else 0.0
    out = []
    for i in range(final.size):
        if failed[i]:
            out.append("fails")
        elif initial - final[i] < crawl * best_gain:
            out.append("crawls")
        else:
            out.append("good")
    return out


def run(output=None, small=False, verbose=True, data_dir=None, lrs=LRS) -> dict:
    """Train the sweep (``small``: 2000 images, hidden 64, one epoch); returns the facts.

    Raises FileNotFoundError when the MNIST test set is not found (see
    :func:`fastopt.data.find_mnist` for where it looks).
    """
    import fastopt
    from fastopt.data import mnist_split
    from fastopt.nn import Ensemble

    hidden, epochs, n_train = (64, 1, 2000) if small else (128, 2, 8000)
    batch = 64
    X, y, Xv, yv = mnist_split(data_dir)
    X, y = X[:n_train], y[:n_train]
    k = len(lrs)
    model = Ensemble(k, (784, hidden, 10), "relu", seed=[0] * k)   # same init for all
    opt = fastopt.Adam(model.param_groups(lr=list(lrs)))
    initial = float(model.evaluate(Xv, yv)[0][0])
    rng = np.random.default_rng(0)
    curves = []
    with np.errstate(all="ignore"):
        for _ in range(epochs):
            order = rng.permutation(n_train)
            for s in range(0, n_train - batch + 1, batch):
                idx = order[s:s + batch]
                curves.append(model.train_step(opt, X[idx], y[idx]).copy())
        final, acc = model.evaluate(Xv, yv)
    curves = np.array(curves)                      # [steps, k]
    peak = np.where(np.isfinite(curves), curves, np.inf).max(axis=0)
    v = verdicts(initial, final, peak)
    ok = [i for i in range(k) if v[i] != "fails" and np.isfinite(final[i])]
    best = min(ok, key=lambda i: final[i]) if ok else None
    facts = {"lrs": list(lrs), "steps": len(curves), "hidden": hidden, "n_train": n_train,
             "initial_loss": initial, "final_loss": [float(a) for a in final],
             "peak_train_loss": [float(a) for a in peak], "accuracy": [float(a) for a in acc],
             "verdicts": v, "best_lr": lrs[best] if best is not None else None,
             "fails": [lr for lr, s in zip(lrs, v) if s == "fails"],
             "crawls": [lr for lr, s in zip(lrs, v) if s == "crawls"]}
    say(verbose,
        f"Adam, {k} x MLP 784-{hidden}-10 (same init) in one Ensemble run: {n_train} MNIST "
        f"images, {epochs} epoch{'s' * (epochs != 1)}, {len(curves)} steps of batch {batch}; held-out loss "
        f"before training {initial:.3f}",
        "  lr       peak train loss  held-out loss  accuracy  verdict",
        *(f"  {lr:<8g} {peak[i]:>15.3f}  {final[i]:>13.3f}  {100 * acc[i]:>7.1f}%  {v[i]}"
          for i, lr in enumerate(lrs)),
        f"  fails (training loss above {BLOWUP:g} x {initial:.3f} at some step, even if "
        "it partly recovered after, or non-finite): "
        f"{', '.join(f'lr={lr:g}' for lr in facts['fails']) or 'none'}",
        f"  crawls (improvement < {CRAWL:g} x the best one's): "
        f"{', '.join(f'lr={lr:g}' for lr in facts['crawls']) or 'none'}",
        f"  best: lr={facts['best_lr']:g}" if best is not None else "  best: none")
    if output is not None:
        _draw(output, curves, facts)
        say(verbose, f"wrote {output}")
    return facts


def _draw(path, curves, facts):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    steps = np.arange(1, len(curves) + 1)
    w = max(1, len(curves) // 40)                  # running mean over w steps
    kernel = np.ones(w) / w
    for i, lr in enumerate(facts["lrs"]):
        c = curves[:, i]
        c = np.where(np.isfinite(c), c, np.nan)
        smooth = np.convolve(c, kernel, mode="valid")
        ax.plot(steps, c, color=f"C{i}", alpha=0.25, lw=0.7)
        ax.plot(steps[w - 1:], smooth, color=f"C{i}", lw=1.6,
                label=f"lr={lr:g}: {facts['verdicts'][i]}, held-out {facts['final_loss'][i]:.2f}")
    ax.axhline(facts["initial_loss"], color="k", ls=":", lw=0.8)
    ax.text(len(curves), facts["initial_loss"], "held-out loss before training",
            ha="right", va="bottom", fontsize=7)
    ax.axhline(BLOWUP * facts["initial_loss"], color="C3", ls=":", lw=0.8)
    ax.text(len(curves), BLOWUP * facts["initial_loss"], "blow-up line (2 x start)",
            ha="right", va="bottom", fontsize=7, color="C3")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"Adam lr sweep, {len(facts['lrs'])} MLPs in one batched Ensemble run (MNIST)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save(fig, path)
