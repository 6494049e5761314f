"""The step's fast path: what the next step needs, kept from the last one.

A small model's step is almost all fixed cost: checking the hyperparameters,
finding the state buffers and building the kernels' arguments took ~8 us of
Python around a 0.3 us native call. Between two steps of a training loop
none of that changes, so a full step (``Optimizer._host_step``) leaves a
:class:`StepPlan` behind: the checked hyperparameters, the state buffers in
kernel order, the table, and everything those were derived from. The next
step compares those sources by identity (a few pointer compares) and, when
all still hold, calls the kernels straight away; anything else (a changed
hyperparameter or option, a schedule, a new state buffer, grads the compiled
reader refuses) falls back to the full step, which checks it all, raises
where it must, and leaves a new plan.

Only the common case is planned: one param group stepped by one compiled
table (the norm pass, the skip decision and the update in one native call),
float state, a number for lr, no loss scaler and no ``grad_stats`` hook.
The plan runs the same code the full step runs for the per-step work
(``_element_step``, ``_fused_call``, ``_finish_step``), so the two cannot
drift apart; it only skips re-deriving what did not change.
"""

from __future__ import annotations

import math

from ..backends.tables import element_of
from ..backends.threads import SERIAL_MAX

#: returned by :meth:`StepPlan.run` when the plan no longer holds
STALE = object()


class StepPlan:
    __slots__ = ("tables", "table", "group", "params", "nparams", "glen", "keys", "values",
                 "lr", "hypers", "state", "names", "buffers", "max_norm_given",
                 "skip_given", "max_norm", "norm_mode", "small", "nstate")

    @classmethod
    def make(cls, opt, hypers, max_norm, check, names):
        """The plan of the step that just ran (its checked ``hypers`` per group,
        ``max_norm`` and ``check`` as ``_step_options`` gave them, the first
        group's state buffer ``names`` in kernel order), or None where the
        fast path does not apply."""
        if (not opt._single or opt.grad_stats is not None or opt.loss_scaler is not None
                or opt._schedules or opt._state_format.compact or len(opt.param_groups) != 1):
            return None
        group, st = opt.param_groups[0], opt.state[0]
        h = hypers[0]
        if type(group["lr"]) is not float or group["lr"] != h["lr"]:
            return None
        flat = st["flat"]
        if any(n not in flat for n in names):
            return None
        plan = cls()
        plan.tables, plan.table = opt._tables, opt._all_tables[0]
        plan.group, plan.params, plan.nparams = group, group["params"], len(group["params"])
        plan.glen = len(group)
        plan.keys = tuple(k for k in group if k != "params" and k != "lr")
        # a copy of a list value sees in-place edits (tuple == compares it by value)
        plan.values = tuple(v[:] if type(v) is list else v for v in map(group.get, plan.keys))
        plan.lr, plan.hypers = group["lr"], h
        plan.state, plan.names = st, names
        plan.buffers = tuple(flat[n] for n in names)    # a tuple: the table caches its addresses
        plan.max_norm_given, plan.skip_given = opt.max_grad_norm, opt.skip_nonfinite
        plan.max_norm = max_norm
        plan.norm_mode = 2 if check else (1 if max_norm is not None else 0)
        # a table this small always runs serially (_fused_call); without a
        # norm to compute the plan calls the backend itself
        plan.small = plan.table.nelem <= SERIAL_MAX and plan.norm_mode == 0
        plan.nstate = len(names)
        return plan

    def run(self, opt, grads):
        """Step ``grads`` (a list) if nothing the plan was made from changed:
        the step's return value, or :data:`STALE` (nothing was written).

        What only the optimizer's own code replaces is checked through what
        replacing it always replaces too: a new param group, a checkpoint
        load or new state buffers come with new tables or a new state entry
        (a step that makes buffers is a full step, which drops the plan)."""
        group = self.group
        groups = opt.param_groups
        if (opt._tables is not self.tables or groups[0] is not group or len(groups) != 1
                or opt.state[0] is not self.state or len(group) != self.glen
                or group["params"] is not self.params or len(self.params) != self.nparams
                or opt.max_grad_norm is not self.max_norm_given
                or opt.skip_nonfinite is not self.skip_given
                or opt.loss_scaler is not None or opt._schedules or opt.grad_stats is not None
                or tuple(map(group.get, self.keys)) != self.values):
            return STALE
        lr = group["lr"]
        if lr is not self.lr:
            if type(lr) is not float or not 0.0 <= lr < math.inf:
                return STALE          # the full step checks it (and names the key)
            self.hypers = dict(self.hypers, lr=lr)
            self.lr = lr
        t = self.table
        t.grads = None
        opt._bound = None
        opt._bound_list = grads
        if not opt._backend.gather(t, grads):
            return STALE              # the full checks say why (or take it)
        s, names = opt._element_step(self.hypers, self.state)
        if names != self.names:
            return STALE              # a state buffer to make: the full step makes it
        if self.small:
            # serial, no norm: _fused_call's own call for such a table, made
            # here directly (a frame less of fixed cost)
            el = element_of(s, self.nstate)
            opt._backend.step(t, el, self.buffers, el.grad_scale, 0.0, 1.0, 0, False, None)
            return opt._finish_step(False, None, [self.hypers])
        norm, skip = opt._fused_call(opt._backend, t, s, self.buffers, self.max_norm, 1.0,
                                     self.norm_mode, None)
        return opt._finish_step(skip, norm, [self.hypers])
