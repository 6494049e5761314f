"""The optimizer-family lessons (fastopt.examples: saddle, optimizer-zoo, sam): each
runs in its small configuration, draws its PNG, and the facts it claims are
asserted here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from test_examples import _run     # small run + PNG written: the facts


# -- saddle ------------------------------------------------------------------

def test_saddle_gd_stalls_and_momentum_noise_adam_escape(tmp_path):
    f = _run("saddle", tmp_path)
    quad, flat = f["saddles"]["x^2 - y^2"]["steps"], f["saddles"]["x^2 - y^4"]["steps"]
    # x^2 - y^2 from y = 1e-8: GD needs ln(1e8) / ln(1.02) = 931 steps
    assert quad["GD"] == 931
    assert quad["momentum"] <= 200          # growth 1.107 per step: ~180 + the start
    assert quad["Adam"] <= 100              # ~lr per step whatever the gradient's size
    assert quad["noisy GD"] <= 400
    assert all(quad[m] < quad["GD"] / 2 for m in ("momentum", "noisy GD", "Adam"))
    # the flat saddle x^2 - y^4 from y = 0.03: GD needs ~13,900 steps, over the small budget
    assert f["budget"] < f["saddles"]["x^2 - y^4"]["predicted_gd"] and flat["GD"] is None
    assert flat["momentum"] <= 1600         # like a 10x larger lr: ~1/10 of GD's time
    assert flat["Adam"] <= 100
    assert flat["noisy GD"] <= 1500
    noisy = f["saddles"]["x^2 - y^4"]["noisy_all"]
    assert len(noisy) == f["seeds"] and sum(t is not None for t in noisy) > len(noisy) / 2


def test_saddle_gd_escape_times_follow_the_closed_forms():
    from fastopt.examples.saddle import SADDLES, escape, predicted_gd_escape

    _, grad, _ = SADDLES["x^2 - y^2"]
    for y0 in (1e-4, 1e-6):
        _, t = escape("GD", grad, y0, 2000)
        assert t == predicted_gd_escape("x^2 - y^2", y0)
    _, grad, _ = SADDLES["x^2 - y^4"]
    _, t = escape("GD", grad, 0.1, 2000)        # (1/0.01 - 1) / 0.08 = 1237.5 steps
    assert t == pytest.approx(predicted_gd_escape("x^2 - y^4", 0.1), rel=0.01)
    path, t = escape("GD", grad, 0.0, 300)      # exactly on the ridge: never
    assert t is None and len(path) == 301 and not path[:, 1].any()


# -- optimizer zoo -----------------------------------------------------------

def test_optimizer_zoo_every_optimizer_runs_and_the_facts_hold(tmp_path):
    from fastopt.examples.optimizer_zoo import GRID, optimizers

    f = _run("optimizer-zoo", tmp_path)
    names = set(optimizers())
    assert {"SGD", "SGD momentum", "Nesterov", "Adam", "AdamW", "RMSprop", "Adagrad",
            "Adamax", "NAdam", "RAdam", "Lion", "LAMB", "SAM", "L-BFGS"} <= names
    bowl, ros = f["problems"]["bowl"], f["problems"]["rosenbrock"]
    for problem in (bowl, ros):
        assert set(problem["optimizers"]) == names
        for r in problem["optimizers"].values():
            assert r["lr"] in GRID and not r["diverged"]
            assert (r["steps_to_tol"] is not None) == (r["final_loss"] < f["tol"])
            if r["steps_to_tol"] is not None:
                assert r["first_below_tol"] <= r["steps_to_tol"]
    # SGD at lr 0.03 on x^2 + 10 y^2 from (-4, 1): x shrinks 0.94x per step, y 0.4x,
    # so x^2 = 16 * 0.94^(2t) < 1e-3 first at t = 79
    assert bowl["optimizers"]["SGD"]["steps_to_tol"] == 79
    assert set(bowl["settled"]) == names - {"Lion"}
    assert 1e-3 <= bowl["optimizers"]["Lion"]["final_loss"] < 2e-3    # its +-lr 2-cycle
    # Rosenbrock: of the first-order methods heavy ball settles first; plain SGD and RAdam
    # not within the budget, nor SAM: its gradient rho uphill across the valley is ~50
    # even at the minimum
    steps = {n: r["steps_to_tol"] for n, r in ros["optimizers"].items()}
    first_order = [n for n in ros["settled"] if n != "L-BFGS"]
    assert min(first_order, key=steps.get) == "SGD momentum" and steps["SGD momentum"] < 300
    assert steps["SGD"] is None and steps["RAdam"] is None
    assert steps["Adam"] < 2000
    assert steps["SAM"] is None and ros["optimizers"]["SAM"]["final_loss"] > 1e-2
    assert bowl["optimizers"]["SAM"]["steps_to_tol"] < 200
    # LAMB's steps are lr ||p|| long: they shrink at the bowl's minimum (0, 0), not at (1, 1)
    assert bowl["optimizers"]["LAMB"]["steps_to_tol"] < 100 and steps["LAMB"] is None
    # L-BFGS, one gradient per step, is first on both
    for problem in (bowl, ros):
        rows = problem["optimizers"]
        assert min(problem["settled"], key=lambda n: rows[n]["steps_to_tol"]) == "L-BFGS"
    assert bowl["optimizers"]["L-BFGS"]["steps_to_tol"] <= 10 and steps["L-BFGS"] < 100


def test_optimizer_zoo_lrs_are_what_tune_finds():
    from fastopt.examples.optimizer_zoo import LRS, tune

    assert tune(("bowl",), ("SGD", "Adam", "Lion")) == {
        "bowl": {n: LRS["bowl"][n] for n in ("SGD", "Adam", "Lion")}}


def test_optimizer_zoo_settled_and_resting_loss():
    from fastopt.examples.optimizer_zoo import resting_loss, settled

    down = 10.0 ** -np.arange(21)                      # 1, 0.1, ..., 1e-20
    assert settled(down) == 4                          # 1e-4 is the first below 1e-3
    cycle = np.r_[1.0, np.tile([1e-2, 1e-9], 10)]      # a 2-cycle that dips below
    assert settled(cycle) is None and resting_loss(cycle) == 1e-2
    late = np.r_[np.ones(20), 1e-6]                    # below only at the very end
    assert settled(late) is None and math.isclose(resting_loss(late), 1.0)


# -- SAM: sharp vs flat minimum ----------------------------------------------

def test_sam_leaves_the_sharp_minimum_sgd_settles_in(tmp_path):
    f = _run("sam", tmp_path)
    n = f["starts"]
    assert f["sharpness"]["sharp"] > 10 * f["sharpness"]["flat"]
    assert f["lr_times_sharpness"] < 2          # SGD is stable at the sharp minimum
    sgd, sam = f["sgd"], f["sam"]
    assert sum(sgd.values()) == sum(sam.values()) == n
    assert sgd["sharp"] >= 0.75 * n and sgd["neither"] == 0
    assert sam["flat"] == n
    assert all(t is not None and t < 60 for t in f["sam_steps_to_flat"])
    assert f["final_loss"]["SGD"] < 1e-12 and f["final_loss"]["SAM"] < 1e-3


def test_sam_landscape_minima_have_equal_depth_and_the_stated_curvatures():
    from fastopt.examples.sam_minima import MINIMA, grad, loss, valley_curvature

    for x, y in MINIMA.values():
        assert loss(x, y) == 0 and not grad(np.array([x, y])).any()
    assert valley_curvature(-1.0) == pytest.approx(29.47, abs=0.01)
    assert valley_curvature(1.0) == pytest.approx(0.834, abs=0.001)
    p, h = np.array([0.3, -0.7]), 1e-6             # the gradient is the loss's
    num = [(loss(*(p + d)) - loss(*(p - d))) / (2 * h) for d in np.eye(2) * h]
    assert grad(p) == pytest.approx(num, rel=1e-7)
