"""Hardening of ``fastopt.LossScaler`` (issue 19): gradients that are never
finite must not drive the scale to 0 (then every step divided by zero), and
the run of skipped steps is visible and survives a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt


def test_scale_stops_at_a_floor_under_endless_nan_gradients():
    w = np.ones(8, np.float32)
    scaler = fastopt.LossScaler()
    opt = fastopt.AdamW(w, lr=1e-2, loss_scaler=scaler, backend="numpy")
    nan = np.full(8, np.nan, np.float32)
    for _ in range(400):      # torch's rules alone reach 0.0 after about 166 of these
        opt.step(nan)
    assert scaler.scale == scaler.min_scale == 2.0 ** -24
    assert scaler.consecutive_skips == 400 and opt.skipped_steps == 400
    assert (w == 1).all()
    opt.step(np.ones(8, np.float32))          # a finite step still works from the floor
    assert scaler.consecutive_skips == 0 and scaler.scale == 2.0 ** -24
    assert not (w == 1).any()


def test_backoff_is_torchs_above_the_floor():
    scaler = fastopt.LossScaler(init_scale=8.0, min_scale=1.0)
    seen = []
    for _ in range(5):
        scaler.update(found_inf=True)
        seen.append(scaler.scale)
    assert seen == [4.0, 2.0, 1.0, 1.0, 1.0]
    assert scaler.consecutive_skips == 5 and scaler.growth_tracker == 0


@pytest.mark.parametrize("kw, match", [
    ({"min_scale": 0.0}, "min_scale must be > 0"),
    ({"min_scale": float("inf")}, "finite"),
    ({"min_scale": 1e-50}, "underflows float32"),
    ({"min_scale": 4.0, "init_scale": 2.0}, "above init_scale"),
])
def test_bad_min_scale(kw, match):
    with pytest.raises(ValueError, match=match):
        fastopt.LossScaler(**kw)


def test_state_dict_keeps_the_floor_and_the_skip_count():
    scaler = fastopt.LossScaler(init_scale=4.0, min_scale=0.5)
    for _ in range(4):
        scaler.update(found_inf=True)
    sd = scaler.state_dict()
    assert sd["min_scale"] == 0.5 and sd["consecutive_skips"] == 4
    back = fastopt.LossScaler.from_state_dict(sd)
    assert (back.scale, back.min_scale, back.consecutive_skips) == (0.5, 0.5, 4)


def test_state_dict_from_before_the_floor_still_loads():
    old = {"scale": 1e-30, "growth_tracker": 3, "init_scale": 65536.0,
           "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
    back = fastopt.LossScaler.from_state_dict(old)
    assert back.min_scale == 2.0 ** -24 and back.consecutive_skips == 0
    assert back.scale == 2.0 ** -24          # a scale on its way to 0 is raised to the floor
    assert back.growth_tracker == 3


def test_skip_count_survives_a_checkpoint(tmp_path):
    w = np.ones(4, np.float32)
    opt = fastopt.AdamW(w, loss_scaler=fastopt.LossScaler(min_scale=1.0), backend="numpy")
    for _ in range(20):
        opt.step(np.full(4, np.inf, np.float32))
    fastopt.save(tmp_path / "c.npz", params=w, optimizer=opt)
    w2 = np.zeros(4, np.float32)
    mine = fastopt.LossScaler()
    opt2 = fastopt.AdamW(w2, loss_scaler=mine, backend="numpy")
    fastopt.load(tmp_path / "c.npz", params=w2, optimizer=opt2)
    assert opt2.loss_scaler is mine              # the user's object, updated in place
    assert (mine.scale, mine.min_scale, mine.consecutive_skips) == (1.0, 1.0, 20)


def test_one_scaler_for_two_optimizers_is_refused():
    # each step updates the scale: the second optimizer unscaled its
    # gradients by a scale the first had just changed (a step twice too large
    # after a backoff), and the scale grew twice as fast
    scaler = fastopt.LossScaler()
    first = fastopt.SGD([np.ones(3, np.float32)], lr=0.1, loss_scaler=scaler)
    with pytest.raises(ValueError, match="also the loss_scaler of another SGD.*param group"):
        fastopt.SGD([np.ones(3, np.float32)], lr=0.1, loss_scaler=scaler)
    w = np.ones(3, np.float32)
    second = fastopt.SGD([w], lr=0.1)
    second.loss_scaler = scaler                    # assigned: refused at the step
    with pytest.raises(ValueError, match="also the loss_scaler"):
        second.step([np.ones(3, np.float32)])
    assert (w == 1).all() and second.iterations == 0
    first.loss_scaler = None                       # the first gives it up: fine
    second.step([np.full(3, 65536.0, np.float32)])
    np.testing.assert_allclose(w, 0.9)


def test_a_scaler_held_only_by_a_collected_optimizer_is_free():
    # a notebook cell run again: the old optimizer lingers in a reference
    # cycle until the collector runs, and is no second user
    scaler = fastopt.LossScaler()
    old = fastopt.SGD([np.ones(3, np.float32)], lr=0.1, loss_scaler=scaler)
    old.step([np.ones(3, np.float32)])
    old.cycle = old
    del old
    new = fastopt.SGD([np.ones(3, np.float32)], lr=0.1, loss_scaler=scaler)
    new.step([np.ones(3, np.float32)])
    assert new.iterations == 1


def test_a_loss_scaler_attribute_that_is_not_one_is_named():
    w = np.ones(3, np.float32)
    opt = fastopt.SGD([w], lr=0.1)
    opt.loss_scaler = 1024.0
    with pytest.raises(TypeError, match="loss_scaler must be a fastopt.LossScaler"):
        opt.step([np.ones(3, np.float32)])
    assert (w == 1).all() and opt.iterations == 0


@pytest.mark.parametrize("saved,given", [(True, False), (False, True), (True, True)])
def test_a_checkpoint_that_changes_the_loss_scaler_says_so(saved, given):
    # the checkpoint's scaler wins (a resume steps as the saved run did), but
    # dropping or installing one changes what the loop must multiply the
    # loss by: it was done silently
    def make(with_scaler, interval=2000):
        scaler = fastopt.LossScaler(init_scale=1024.0, growth_interval=interval) \
            if with_scaler else None
        return fastopt.SGD([np.ones(3, np.float32)], lr=0.1, loss_scaler=scaler)

    src = make(saved, interval=7)
    src.step([np.ones(3, np.float32)])
    dst = make(given)
    with pytest.warns(UserWarning) as seen:
        dst.load_state_dict(src.state_dict())
    text = " ".join(str(w.message) for w in seen)
    if saved and given:
        assert "growth_interval=7 (was 2000)" in text
        assert dst.loss_scaler.growth_interval == 7
    elif saved:
        assert "installed as opt.loss_scaler" in text and dst.loss_scaler is not None
    else:
        assert "no loss_scaler" in text and dst.loss_scaler is None
