"""A Ctrl-C in the middle of a step's writes: the step is completed, then
the KeyboardInterrupt goes on. The same for a SystemExit (a signal handler
that calls ``sys.exit``, as preemption handlers for SIGTERM do): both are
:data:`INTERRUPTS`.

Python raises a KeyboardInterrupt only between bytecodes, so a compiled
kernel (one native call, which checks no signals) runs to its end; the
interrupt is raised as it returns, or in the Python between two kernels or
after the last. A step checks and allocates everything before its first
kernel, so an interrupt before that leaves the optimizer as it was
(``Optimizer._host_step``); what one after it could leave half done is the
rest of the step: later tables' kernels, and the counters
(``state[i]["step"]``, ``iterations``, ``skipped_steps``, a loss scaler's
scale, the scheduled lr shown in a group, what ``_finish_step`` of a
subclass keeps).

Each native step writes its table's ``outcome`` (calls, norm, skipped) as
its last act, in the same call (``StepTable.outcome``). A :class:`Mark`
taken before the first kernel holds the tables' call counts and the
counters, so after an interrupt the step knows exactly which tables it
has written: it writes the others, sets the counters from the mark as an
uninterrupted step sets them, and re-raises. A further Ctrl-C while it
completes is held the same way (:func:`held`): the completion is
idempotent and takes at most one step's time.

Covered: the compiled host backends (Cython, Numba) through
``Optimizer.step``, and SAM's ``step`` and ``perturb`` there (each of
SAM's passes counts itself in its table's outcome too). Not covered
(docs/training.md, "All or nothing"): the NumPy reference backend (it writes array
by array), device steps, and the steps of L-BFGS and the distributed
optimizers.
"""

from __future__ import annotations

import operator

#: what a signal handler raises between two bytecodes of a step: Python's
#: default SIGINT handler, and ``sys.exit`` in a handler of one's own
INTERRUPTS = (KeyboardInterrupt, SystemExit)

#: a state entry's step count (the counters a mark holds for the base counting)
_step_of = operator.itemgetter("step")


class Mark:
    """An optimizer's counters before a step's first kernel, and the call
    counts of the tables the step writes: what an interrupted step is
    completed from."""

    __slots__ = ("tables", "calls", "state", "iterations", "skipped", "scaler", "shown")

    def __init__(self, opt, tables):
        self.tables = tables
        self.calls = [t.outcome[0] for t in tables]
        # the step counts, or where the optimizer's _finish_step keeps more
        # (NAdam: its momentum product) shallow copies of the state entries
        self.state = (list(map(_step_of, opt.state)) if opt._plain_finish()
                      else [dict(st) for st in opt.state])
        self.iterations = opt.iterations
        self.skipped = opt.skipped_steps
        scaler = opt.loss_scaler
        self.scaler = None if scaler is None else dict(vars(scaler))
        # scheduled lrs: the values shown in the groups and which ones they
        # are (_finish_step writes the next ones; half written, a number
        # unlike the one shown reads as the user's own and drops the schedule)
        self.shown = None if not opt._schedules else opt._lr_snapshot(opt.param_groups)

    @classmethod
    def taken(cls, tables, calls, steps, iterations, skipped):
        """The mark of what a fast path read itself before its first kernel
        (one table, the base counting, no loss scaler), made only if an
        interrupt comes: ``Mark(opt, tables)`` costs about 1 us a step."""
        mark = cls.__new__(cls)
        mark.tables, mark.calls, mark.state = tables, calls, steps
        mark.iterations, mark.skipped, mark.scaler, mark.shown = iterations, skipped, None, None
        return mark

    def called(self, k) -> bool:
        """Whether table ``k``'s kernel has run since the mark."""
        return self.tables[k].outcome[0] != self.calls[k]

    def any_called(self) -> bool:
        return any(self.called(k) for k in range(len(self.tables)))

    def clear_applied_shifts(self) -> None:
        """A table offset (SAM's restore) is cleared by the backend once the
        call that applied it returns: done here where the interrupt came
        first (a skipped call leaves it pending, as ever)."""
        for k, t in enumerate(self.tables):
            if t.shift is not None and self.called(k) and not t.outcome[2]:
                t.clear_shift()

    def recount(self, opt, skip, norm, hypers) -> None:
        """Count a step whose writes are all done once, whatever part of
        its own counting ran: the counters as they were at the mark, then
        the step's ``_finish_step`` (idempotent, for :func:`held`)."""
        self._reset_counters(opt)
        opt._finish_step(skip, norm, hypers)

    def _reset_counters(self, opt) -> None:
        for st, saved in zip(opt.state, self.state):
            if type(saved) is dict:
                st.clear()
                st.update(saved)
            else:
                st["step"] = saved
        opt.iterations = self.iterations
        opt.skipped_steps = self.skipped
        if self.scaler is not None:
            vars(opt.loss_scaler).update(self.scaler)
        if self.shown is not None:
            opt._lr_restore(self.shown, opt.param_groups)


def finished(work, *args):
    """``work(*args)`` (idempotent) run to its end; an interrupt that came
    during it is raised once it is done, not lost."""
    try:
        return work(*args)
    except INTERRUPTS:
        held(work, *args)
        raise


def held(complete, *args):
    """``complete(*args)`` run to its end through any further interrupt (it
    must be idempotent: run again from the start after each)."""
    while True:
        try:
            return complete(*args)
        except INTERRUPTS:
            continue

