"""Dynamic loss scaling for float16/bfloat16 training (torch's GradScaler rules).

Multiply the loss by ``scaler.scale`` before backprop so small float16
gradients do not flush to zero; give the scaler to the optimizer, and the
step does the rest in its one pass::

    scaler = fastopt.LossScaler()
    opt = fastopt.AdamW(params16, lr=1e-3, loss_scaler=scaler)
    for batch in data:
        backward(params16, grads16, batch, loss_scale=scaler.scale)
        opt.step(grads16)        # unscale (folded into the update), check, step, update scale

Unscaling costs nothing extra: ``1 / scale`` is folded into the step's
gradient factor (with the clip coefficient, if any). The global-norm read
pass tells whether any gradient is NaN/inf; if so the step writes nothing
(params, master weights, moments and step counts untouched), the skip is
counted in ``opt.skipped_steps``, and the scale backs off. After
``growth_interval`` finite steps in a row it grows.

The update rule is torch's ``GradScaler.update`` (``_amp_update_scale_``),
with the scale kept in float32 as torch keeps it:

* non-finite step: ``scale *= backoff_factor``; the streak restarts at 0;
* finite step: the streak grows by one; at ``growth_interval`` the scale is
  multiplied by ``growth_factor`` (unless that overflows float32) and the
  streak restarts.

One addition: the scale never backs off below ``min_scale`` (``2**-24``).
torch has no floor, so gradients that are NaN on every step (a NaN in the
data, a diverged model) halve the scale to 0 after about 166 skips, and
from then on ``1 / scale`` is a division by zero. ``2**-24`` is 40 halvings
below the default start, far below any scale a healthy run reaches (so the
sequence is torch's wherever torch's is usable), and ``1 / 2**-24`` is
exact and finite. ``consecutive_skips`` counts the non-finite steps in a
row, so a training loop can notice that every step is being skipped.
"""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np

from .. import _validate as V


def _f32(x) -> float:
    # past float32's range: inf, quietly (the growth check reads it); NumPy's
    # overflow warning, made an error, would stop a step after its writes
    with np.errstate(over="ignore"):
        return float(np.float32(x))


MIN_SCALE = 2.0 ** -24

# each scaler's optimizer: the one whose steps update its scale
_users = weakref.WeakKeyDictionary()


def claim(scaler, optimizer) -> None:
    """Refuse ``scaler`` for ``optimizer`` if another live optimizer steps
    with it. Each step updates the scale, so a second optimizer would
    unscale its gradients by a scale they were not made with (its step twice
    too large after the first one backed off), and the scale would grow
    twice as fast. (One whose only references are a cycle is collected
    first: a notebook cell run again is no second user.)"""
    if not isinstance(scaler, LossScaler):
        raise TypeError("loss_scaler must be a fastopt.LossScaler or None, got "
                        f"{type(scaler).__name__}")
    ref = _users.get(scaler)
    other = None if ref is None else ref()
    if other is optimizer:
        return
    if other is not None and getattr(other, "loss_scaler", None) is scaler:
        other = None
        gc.collect()
        other = ref()
        if other is not None and getattr(other, "loss_scaler", None) is scaler:
            raise ValueError(
                f"this LossScaler is also the loss_scaler of another {type(other).__name__}; "
                "each step updates its scale, so the other optimizer's gradients would be "
                "unscaled by a scale they were not made with. Replacing that optimizer "
                "(a notebook cell run again)? `del` it first, or give this one a new "
                "LossScaler(). For one optimizer per layer with one scaled loss, make one "
                "optimizer with a param group per layer (each its own hyperparameters) "
                "and give it the scaler")
    _users[scaler] = weakref.ref(optimizer)


class LossScaler:
    """Dynamic loss scale with torch.amp.GradScaler's defaults and rules.

    Parameters
    ----------
    init_scale : float
        Starting scale (``2**16``).
    growth_factor : float
        Multiplier after ``growth_interval`` finite steps in a row (2.0).
    backoff_factor : float
        Multiplier after a step with non-finite gradients (0.5).
    growth_interval : int
        Finite steps in a row before growing (2000).
    min_scale : float or None
        The scale never backs off below this (finite, > 0; default ``2**-24``,
        or ``init_scale`` if that is smaller). Not in torch, whose scale
        reaches 0 under endless non-finite gradients.

    Attributes
    ----------
    scale : float
        The current scale (float32 value).
    growth_tracker : int
        Finite steps in a row since the scale last changed.
    consecutive_skips : int
        Non-finite (skipped) steps in a row; 0 after a finite step. A large
        value means the gradients are never finite, whatever the scale.
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, min_scale=None):
        self.init_scale = V.check_real("init_scale", init_scale, low=0.0, low_open=True)
        self.growth_factor = V.check_real("growth_factor", growth_factor, low=1.0,
                                          low_open=True)
        self.backoff_factor = V.check_real("backoff_factor", backoff_factor, low=0.0,
                                           high=1.0, low_open=True, high_open=True)
        self.growth_interval = V.check_int("growth_interval", growth_interval, low=1)
        self.scale = _f32(self.init_scale)
        if not math.isfinite(self.scale) or self.scale == 0.0:
            raise ValueError(f"init_scale {init_scale} "
                             f"{'underflows' if self.scale == 0.0 else 'overflows'} float32")
        self.min_scale = self._check_min_scale(min_scale)
        self.growth_tracker = 0     # finite steps in a row since the last change
        self.consecutive_skips = 0  # non-finite steps in a row

    def _check_min_scale(self, min_scale):
        if min_scale is None:
            return min(MIN_SCALE, self.scale)
        value = V.check_real("min_scale", min_scale, low=0.0, low_open=True)
        if _f32(value) == 0.0:   # the scale is a float32: the floor must be one too
            raise ValueError(f"min_scale {min_scale} underflows float32")
        if value > self.init_scale:
            raise ValueError(f"min_scale {min_scale} is above init_scale {self.init_scale}")
        return _f32(value)

    def update(self, found_inf: bool) -> None:
        """Back off after a non-finite step (not below ``min_scale``); grow
        after a streak of finite ones."""
        if found_inf:
            self.scale = max(_f32(self.scale * self.backoff_factor), self.min_scale)
            self.growth_tracker = 0
            self.consecutive_skips += 1
            return
        self.consecutive_skips = 0
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            grown = _f32(self.scale * self.growth_factor)
            if math.isfinite(grown):
                self.scale = grown
            self.growth_tracker = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "init_scale": self.init_scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "min_scale": self.min_scale,
                "consecutive_skips": self.consecutive_skips}

    @classmethod
    def from_state_dict(cls, sd) -> "LossScaler":
        """A scaler restored from :meth:`state_dict`; checks every field.

        State saved before ``min_scale`` and ``consecutive_skips`` existed
        loads with the default floor and 0; a saved scale below the floor
        (on its way to 0) is raised to it."""
        if not isinstance(sd, dict):
            raise TypeError("loss scaler state must be a dict")
        keys = ("scale", "growth_tracker", "init_scale", "growth_factor",
                "backoff_factor", "growth_interval")
        missing = [k for k in keys if k not in sd]
        if missing:
            raise ValueError(f"loss scaler state is missing keys {missing}")
        new = cls(sd["init_scale"], sd["growth_factor"], sd["backoff_factor"],
                  sd["growth_interval"], sd.get("min_scale"))
        scale = V.check_real("loss scaler scale", sd["scale"], low=0.0, low_open=True)
        new.scale = max(scale, new.min_scale)
        new.growth_tracker = V.check_int("loss scaler growth_tracker", sd["growth_tracker"],
                                         low=0)
        new.consecutive_skips = V.check_int("loss scaler consecutive_skips",
                                            sd.get("consecutive_skips", 0), low=0)
        return new

    def __repr__(self):
        return (f"LossScaler(scale={self.scale}, growth_tracker={self.growth_tracker}, "
                f"consecutive_skips={self.consecutive_skips}, "
                f"growth_factor={self.growth_factor}, backoff_factor={self.backoff_factor}, "
                f"growth_interval={self.growth_interval}, min_scale={self.min_scale})")
