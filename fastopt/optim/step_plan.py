"""The step's fast path: what the next step needs, kept from the last one.

A small model's step is almost all fixed cost: checking the hyperparameters,
finding the state buffers and building the kernels' arguments took ~8 us of
Python around a 0.3 us native call. Between two steps of a training loop
none of that changes, so a full step (``Optimizer._host_step``) leaves a
:class:`StepPlan` behind: the checked hyperparameters, the state buffers in
kernel order, the table, and everything those were derived from. The next
step compares those sources by identity (a few pointer compares) and, when
all still hold, calls the kernels straight away; anything else (a changed
hyperparameter or option, a new schedule object, a new state buffer, grads
the compiled reader refuses) falls back to the full step, which checks it
all, raises where it must, and leaves a new plan.

Planned: compiled tables, float or compact state (its rounding keys made
for each step), a number for each group's lr (a scheduled group's is the
one the last step showed for this step), no loss scaler and no
``grad_stats`` hook for a norm to compute; either one table (the norm pass,
the skip decision and the update in one native call, with or without clipping
and the non-finite skip) or several groups or tables, without a norm to
compute or (every table small, the backend's list step: Cython) with one:
the list step then sums each table's squares as the full step does, in the
same call as the updates (32 groups of 4,866 elements clipped: 596 us a step
through the full step's 64 calls, one per table's norm and one per update).
Grads are a list (a dict by name is read into one), or the
FlatArrays the tables were bound to last step. A step with frozen groups
(their every gradient None, no schedule on them) is planned for the same
frozen groups: the others' tables step, each through the table step.
Where there is no norm and either every table is small or there is one
table, a backend's ``list_step`` (Cython) makes the whole step one native
call: every table's grads read and checked, then each updated (one large
table on the thread team when its
:class:`~fastopt.backends.threads.ThreadChoice` picks it).
Inside a training loop the step's Python runs cold, after the
forward/backward pass: there each call saved is worth about twice its hot
time. The plan runs the same code the full step runs for the per-step
work (``_element_step`` through ``_plan_element``, ``_fused_call``,
``_table_update``, ``_finish_step``; the list step sets ``_finish_step``'s
counters itself where the optimizer adds nothing to them, and tests compare
both), so the two cannot drift apart; it only skips re-deriving what did
not change.
"""

from __future__ import annotations

import math
import weakref

from ..backends.scalars import ElementStep
from ..backends.tables import element_maker
from ..backends.threads import SERIAL_MAX
from .interrupt import INTERRUPTS, Mark, held

#: returned by :meth:`StepPlan.run` when the plan no longer holds
STALE = object()

#: ``opt.state[i]`` without GroupStates' Python-level indexing (the hot path)
_group_state = list.__getitem__

_build = tuple.__new__


class GroupPlan:
    """One param group's part of a plan: its dict and what was checked of it,
    its state entry and buffers, its tables."""

    __slots__ = ("group", "params", "glen", "keys", "values", "snapshot", "lr",
                 "hypers", "state", "names", "buffers", "nstate", "tables", "grad_index",
                 "make", "fixed", "at", "opt", "index", "compact", "lists")

    def __init__(self, opt, index, group, hypers, state, names, tables, kind):
        # weakly: the optimizer holds its plans, and a cycle kept a re-run
        # notebook cell's optimizer (and its state) until the cyclic collector ran
        self.opt, self.index = weakref.ref(opt), index
        # compact state: the step's rounding keys are the step's own (made per step)
        self.compact = opt._state_format if opt._state_format.compact else None
        self.group, self.params = group, group["params"]
        self.glen = len(group)
        self.keys = tuple(k for k in group if k != "params" and k != "lr")
        # a copy of a list value sees in-place edits (tuple == compares it by value)
        self.values = tuple(v[:] if type(v) is list else v for v in map(group.get, self.keys))
        self.lr, self.hypers = hypers["lr"], hypers
        self.state, self.names, self.nstate = state, names, len(names)
        flat = state["flat"]
        self.buffers = tuple(flat[n] for n in names)  # a tuple: a table caches its addresses
        self.tables = tables
        self.grad_index = [t.index_global for t in tables]
        self.make = element_maker(kind)      # scalars -> the kernels' element step
        self.fixed, self.at = opt._plan_element(hypers, state, names, self.make)
        self._snap()

    def _snap(self, values=None):
        # The group's values as this plan took them, in the dict's order: one
        # tuple compare checks them all (the same objects compare by identity;
        # the params list is kept itself, other lists as copies). ``values``:
        # tuple(group.values()) just compared with the plan's own, kept as
        # the snapshot when no value is a list (a scheduled lr's every step)
        if values is not None and not self.lists:
            self.snapshot = values
            return
        snapshot = tuple(v[:] if type(v) is list and v is not self.params else v
                         for v in self.group.values())
        self.lists = any(a is not b for a, b in zip(snapshot, self.group.values()))
        self.snapshot = snapshot

    def holds(self, group, state) -> bool:
        """Whether this group's part of the plan still holds (a new plain lr
        is taken up)."""
        if (state is not self.state or group is not self.group
                or group["params"] is not self.params or self.params.edited):
            return False
        try:
            values = tuple(group.values())
            if values == self.snapshot:
                return True
            # something changed: a new lr (taken up) or anything else (stale)
            if len(group) != self.glen or tuple(map(group.get, self.keys)) != self.values:
                return False
        except Exception:      # a value that does not compare as one (an array): the
            return False       # full step's checks name it
        lr = group["lr"]
        if lr is not self.lr and not self.take_lr(lr):
            return False
        self._snap(values)
        return True

    def next_element(self, group, state):
        """``(element step, values)`` of the group's next step when this part
        of the plan holds (a new plain lr taken up), else None."""
        # holds()'s checks, inline: calling it, and routing one table through
        # _run_list_steps, measured 1.77 -> 2.43 us for a 1-element step
        try:
            changed = (tuple(group.values()) != self.snapshot or state is not self.state
                       or group is not self.group or group["params"] is not self.params
                       or self.params.edited)
        except Exception:      # a value that does not compare as one: the full checks
            return None
        if changed and not self.holds(group, state):
            return None
        el = self.fixed
        if el is not None:
            return el, self.at()      # the element step's other fields hold
        el = self.at()
        return None if el is None else (el, el[1])     # None: a buffer to make

    def element(self):
        """The kernels' element step for the group's next step, or None when
        it needs a state buffer the plan does not have."""
        fixed = self.fixed
        if fixed is None:
            return self.at()
        return _build(ElementStep, (fixed[0], self.at()) + fixed[2:])

    def compact_args(self):
        """The backends' ``compact`` argument of the group's next step (None
        for float state): its rounding keys depend on the step count."""
        fmt = self.compact
        return None if fmt is None else fmt.step_args(self.index, self.names, self.state)

    def take_lr(self, lr):
        """Take up a new plain value of lr; False when it is anything else
        (the full step checks it and names the key)."""
        if type(lr) is not float or not 0.0 <= lr < math.inf:
            return False
        hypers = dict(self.hypers, lr=lr)
        fixed = self.fixed
        at = None if fixed is None else self.opt()._plan_lr(fixed, hypers, self.state)
        if at is None:
            fixed, at = self.opt()._plan_element(hypers, self.state, self.names, self.make)
        # stored together, lr last: a Ctrl-C before leaves the old lr, taken
        # up again at the next step (lr first kept the old element step for good)
        self.hypers, self.fixed, self.at, self.lr = hypers, fixed, at, lr
        return True


class StepPlan:
    __slots__ = ("tables", "groups", "single", "max_norm_given", "skip_given", "max_norm",
                 "norm_mode", "small", "list_step", "list_outcome", "owner", "list_tables",
                 "plain_finish", "timed", "num_threads", "ngroups", "frozen", "frozen_set",
                 "frozen_at")

    @classmethod
    def make(cls, opt, hypers, max_norm, check, steps, frozen=frozenset()):
        """The plan of the step that just ran (its checked ``hypers`` and per
        stepped group ``(type of its step scalars, state buffer names)``,
        ``max_norm`` and ``check`` as ``_step_options`` gave them, the
        ``frozen`` groups it left), or None where the fast path does not
        apply."""
        norm_mode = 2 if check else (1 if max_norm is not None else 0)
        # (a grad_stats hook computes the norm: without one to compute, the
        # hook is never called, and a sharded optimizer's shard steps fast)
        # (several groups with a norm: their list step computes it, where
        # the backend has one and every table is small; else the full step)
        several_small = not opt._single and all(t.nelem <= SERIAL_MAX for t in opt._all_tables)
        if ((opt.grad_stats is not None and norm_mode) or opt.loss_scaler is not None
                or (norm_mode and not opt._single and not (
                    several_small and not frozen and not opt._state_format.compact
                    and getattr(opt._backend, "list_step", None) is not None))):
            return None
        # frozen groups: each kept as its values were (a scheduled one's lr
        # moves every step: the full step evaluates it), and a group to step
        held_still = []
        for gi in sorted(frozen):
            group = opt.param_groups[gi]
            if gi in opt._schedules or len(frozen) == len(opt.param_groups):
                return None
            # (a list value copied, as GroupPlan._snap does: one edited in place
            # compares unequal to its copy)
            params = group["params"]
            values = tuple(v[:] if type(v) is list and v is not params else v
                           for v in group.values())
            held_still.append((gi, group, params, values, hypers[gi]))
        steps = iter(steps)
        groups = []
        for gi, (group, h, st, ts) in enumerate(zip(opt.param_groups, hypers, opt.state,
                                                    opt._tables)):
            if gi in frozen:
                continue
            kind, ns = next(steps)
            # a scheduled group shows the next step's lr already (_show_lr)
            if (type(group["lr"]) is not float
                    or (group["lr"] != h["lr"] and gi not in opt._schedules)
                    or any(n not in st["flat"] for n in ns)):
                return None
            g = GroupPlan(opt, gi, group, h, st, ns, ts, kind)
            if g.lr is not group["lr"] and not g.take_lr(group["lr"]):
                return None
            groups.append(g)
        plan = cls()
        plan.tables, plan.groups, plan.single = opt._tables, groups, opt._single
        plan.ngroups = len(opt.param_groups)
        plan.frozen = tuple(held_still) if frozen else None
        plan.frozen_set = frozen
        # the frozen groups' params: their gradients must be None to step by the plan
        plan.frozen_at = tuple(i for ts in (opt._tables[gi] for gi in frozen)
                               for t in ts for i in t.index_global)
        plan.max_norm_given, plan.skip_given = opt.max_grad_norm, opt.skip_nonfinite
        plan.max_norm, plan.norm_mode = max_norm, norm_mode
        # a table this small always runs serially (_fused_call); without a
        # norm to compute the plan calls the backend itself
        plan.small = opt._single and opt._all_tables[0].nelem <= SERIAL_MAX and not norm_mode
        # Every table small, or one table, and no norm: the whole step as one
        # native call, where the backend has one (each table's grads read and
        # checked before any is written)
        # (compact state goes through the table step, which takes its keys)
        # (frozen groups: the table step, which reads only the stepped groups' grads)
        # (with a norm: several small tables, the norm in the same call; one
        # table's step computes its own, _fused_call)
        bind = (getattr(opt._backend, "list_step", None)
                if not opt._state_format.compact and not frozen
                and (several_small or opt._single and not norm_mode)
                else None)
        # one large table: serial or threaded as its timings say (_table_update)
        plan.timed = opt._single and opt._all_tables[0].nelem > SERIAL_MAX
        plan.num_threads = opt._backend.get_num_threads
        plan.list_step = plan.list_outcome = plan.owner = plan.list_tables = None
        if bind is not None:
            tables = [(gi, t, g.buffers) for gi, g in enumerate(groups) for t in g.tables]
            plan.list_tables = [t for _, t, _ in tables]
            # table k's group, or None where group k has table k alone
            owner = [gi for gi, _, _ in tables]
            plan.owner = None if owner == list(range(len(groups))) else owner
            plan.list_step = bind(plan.list_tables, [b for _, _, b in tables],
                                  len(opt._params))
            # the list step writes all its tables in one native call or none:
            # the first one's call count says whether a call that a Ctrl-C
            # interrupted as it returned wrote (fastopt.optim.interrupt)
            plan.list_outcome = plan.list_tables[0].outcome
        # the counters need no call where the optimizer keeps nothing of its
        # own at the end of a step (NAdam does: its momentum product), and no
        # schedule shows the next lr (_finish_step does)
        plan.plain_finish = opt._plain_finish() and not opt._schedules and not frozen
        return plan

    def run(self, opt, grads, bound=False, again=False):
        """Step ``grads`` (a list) if nothing the plan was made from changed:
        the step's return value, or :data:`STALE` (nothing was written).
        ``bound``: ``grads`` is the FlatArrays the tables read already (a
        full step checked and bound it), so there is nothing to read.
        ``again``: the same step tried again with ``grads`` read through
        copies, the first refused (its thread choice stays the one made).

        What only the optimizer's own code replaces is checked through what
        replacing it always replaces too: a new param group, a checkpoint
        load or new state buffers come with new tables or a new state entry
        (a step that makes buffers is a full step, which drops the plan)."""
        groups, plans = opt.param_groups, self.groups
        if (opt._tables is not self.tables or len(groups) != self.ngroups
                or opt.max_grad_norm is not self.max_norm_given
                or opt.skip_nonfinite is not self.skip_given
                or opt.loss_scaler is not None
                or (opt.grad_stats is not None and self.norm_mode)
                # scheduled: the shown lr is this step's (else the full step
                # evaluates the schedule, and names its failure)
                or (opt._schedules and (opt._lr_shown_at != opt.iterations
                                        or self.plain_finish))):
            return STALE
        if self.frozen is not None:
            return self._run_frozen(opt, grads, groups)
        if self.list_step is None or bound:
            if self.norm_mode and not self.single:
                return STALE    # (a norm over several tables: the list step's, or the full step's)
            return self._run_tables(opt, grads, bound)
        if not self.single:
            return self._run_list_steps(opt, grads, groups)
        # One table whose backend steps the list of grads in one native call:
        # a small model's whole step, so every call and lookup saved here is
        # its speed; a large one's Python runs cold in a training loop.
        g = plans[0]
        state = _group_state(opt.state, 0)   # (GroupStates' own indexing: +0.5 us)
        step = g.next_element(groups[0], state)
        if step is None:
            return STALE
        t = g.tables[0]
        if t.shift is not None:       # SAM's offset: the table step applies it
            return self._run_tables(opt, grads, False)
        opt._bound = None
        opt._bound_list = grads
        t.grads = None
        # The list step counts the step itself, in the same native call as
        # its writes, where the base counting applies; else a Mark
        # (fastopt.optim.interrupt)
        if self.plain_finish:
            mark, counted = None, opt
        else:
            mark, counted, calls = Mark(opt, [t]), None, self.list_outcome[0]
        try:
            if self.timed:
                # _table_update's pick and record around the one call. A refused
                # call leaves its pick open, as a step that raised does: the
                # native reader refuses exactly what the full step's checks
                # reject (_check_grad_list), so the full step raises before it
                # picks again (tests/test_step_plan.py checks both)
                choice = t.threads
                pick = choice.again if again else choice.pick
                if not self.list_step(grads, (step[0],), (step[1],),
                                      pick(t.nelem, self.num_threads()), counted,
                                      [g.lr]):
                    return STALE
                choice.record()
            elif not self.list_step(grads, (step[0],), (step[1],), False, counted, [g.lr]):
                return STALE         # the full checks say why (or take the grads)
            if mark is not None:
                return opt._finish_step(False, None, [g.hypers])
            return None
        except INTERRUPTS:
            # counted with the writes, or nothing written: as it is
            if mark is not None and self.list_outcome[0] != calls:
                held(mark.recount, opt, False, None, [g.hypers])
            raise

    def _run_frozen(self, opt, grads, groups):
        """:meth:`run` with the plan's frozen groups left as they are: their
        gradients all None (any other gradient None, or a frozen one given,
        is the full step's to sort out), their values as the plan took them."""
        if type(grads) is not list or len(grads) != len(opt._params):
            return STALE
        for i in self.frozen_at:
            if grads[i] is not None:
                return STALE
        hypers = [None] * self.ngroups
        try:
            for gi, group, params, values, h in self.frozen:
                if (groups[gi] is not group or group["params"] is not params
                        or params.edited or tuple(group.values()) != values):
                    return STALE
                hypers[gi] = h
        except Exception:      # a value that does not compare as one: the full checks
            return STALE
        # (read by _finish_step, also when an interrupt's completion counts the step)
        opt._frozen_now = self.frozen_set
        try:
            return self._run_tables(opt, grads, False, hypers)
        finally:
            del opt._frozen_now

    def _run_tables(self, opt, grads, bound, hypers=None):
        """:meth:`run` through the backend's table step (after its own checks).
        ``hypers``: every group's, each stepped group's as its GroupPlan
        (frozen groups: the plan's own)."""
        groups, plans, state = opt.param_groups, self.groups, opt.state
        for g in plans:
            if not g.holds(groups[g.index], _group_state(state, g.index)):
                return STALE
        be = opt._backend
        if not bound:
            opt._bound = None
            opt._bound_list = grads
        if self.single:
            g = plans[0]
            t = g.tables[0]
            el = g.element()
            if el is None:
                return STALE          # a state buffer to make: the full step makes it
            if not bound:
                t.grads = None
                if not be.gather(t, grads):
                    return STALE      # the full checks say why (or take it)
            elif not be.params_as_given(t):
                return STALE          # a param changed in place: the full checks refuse it
            cs = g.compact_args()
            if self.plain_finish:     # what a Mark holds, read inline (a Mark costs ~1 us)
                mark, calls, steps = None, t.outcome[0], g.state["step"]
                iterations, skipped = opt.iterations, opt.skipped_steps
            else:
                mark = Mark(opt, [t])
            try:
                if self.small:
                    # serial, no norm: _table_update's own call for such a table,
                    # made here directly (a frame less of fixed cost)
                    be.step(t, el, g.buffers, el.grad_scale, 0.0, 1.0, 0, False, cs)
                    return opt._finish_step(False, None, [g.hypers])
                norm, skip = opt._fused_call(be, t, el, g.buffers, self.max_norm, 1.0,
                                             self.norm_mode, cs)
                return opt._finish_step(skip, norm, [g.hypers])
            except INTERRUPTS:
                if mark is None:
                    mark = Mark.taken([t], [calls], [steps], iterations, skipped)
                if not mark.any_called():
                    raise             # nothing written
                # written: completed and counted once (fastopt.optim.interrupt)
                held(opt._complete_step, mark, be, [(t, el, g.buffers, 1.0, cs)], True, (),
                     [g.hypers], None, False, (self.max_norm, 1.0, self.norm_mode))
                raise
        if not bound:
            if type(grads) is not list or len(grads) != len(opt._params):
                return STALE
            for g in plans:                     # every table reads its grads first
                for t, index in zip(g.tables, g.grad_index):
                    t.grads = None
                    if not be.gather(t, [grads[i] for i in index]):
                        return STALE
        elif not all(be.params_as_given(t) for g in plans for t in g.tables):
            return STALE                        # (the gather checks the params, else here)
        if hypers is None:
            hypers = [g.hypers for g in plans]
        else:
            for g in plans:          # (after holds(): a new plain lr taken up)
                hypers[g.index] = g.hypers
        elements = []
        for g in plans:
            el = g.element()
            if el is None:
                return STALE
            elements.append(el)
        # nothing has been written before here
        work = [(t, el, g.buffers, 1.0, cs)
                for g, el, cs in zip(plans, elements, map(GroupPlan.compact_args, plans))
                for t in g.tables]
        mark = Mark(opt, [w[0] for w in work])
        try:
            for t, el, bufs, scale, cs in work:
                opt._table_update(be, t, el, bufs, scale, cs)
            return opt._finish_step(False, None, hypers)
        except INTERRUPTS:
            if not mark.any_called():
                raise
            held(opt._complete_step, mark, be, work, False, (), hypers,
                 None, False, None)
            raise

    def _run_list_steps(self, opt, grads, groups):
        """:meth:`run`'s one native call for several small groups or tables."""
        plans = self.groups
        els, values = [], []
        for g, group, state in zip(plans, groups, opt.state):
            step = g.next_element(group, state)
            if step is None:
                return STALE
            els.append(step[0])
            values.append(step[1])
        tables = self.list_tables
        norm_mode = self.norm_mode
        for t in tables:
            if t.shift is not None:       # SAM's offset: the table step applies it
                return STALE if norm_mode else self._run_tables(opt, grads, False)
        opt._bound = None
        opt._bound_list = grads
        for t in tables:
            t.grads = None
        owner = self.owner
        if owner is not None:             # a group with several tables
            els, values = [els[gi] for gi in owner], [values[gi] for gi in owner]
        if self.plain_finish:        # counted by the list step (as in run())
            mark, counted = None, opt
        else:
            mark, counted, calls = Mark(opt, tables), None, self.list_outcome[0]
        step, norm = self.list_step, None
        try:
            if norm_mode:
                # the global norm first, then each table clipped by it, in
                # the same native call (its return value: False where it wrote
                # nothing, a norm that is not finite included: the full step's)
                max_norm = self.max_norm
                norm = step(grads, tuple(els), tuple(values), False, counted,
                            [g.lr for g in plans], -1.0 if max_norm is None else max_norm,
                            norm_mode)
                if norm is False:
                    return STALE
            elif not step(grads, tuple(els), tuple(values), False, counted,
                          [g.lr for g in plans]):
                return STALE
            if mark is not None:
                return opt._finish_step(False, norm, [g.hypers for g in plans])
            return norm
        except INTERRUPTS:
            # counted with the writes, or nothing written: as it is
            if mark is not None and self.list_outcome[0] != calls:
                # (the call ran: its norm, where the Ctrl-C came as it returned)
                if norm_mode and norm is None:
                    norm = opt._table_stats(opt._backend, self.list_tables, True, False)[0]
                held(mark.recount, opt, False, norm, [g.hypers for g in plans])
            raise
