"""A fork waits for the steps in progress in other threads.

``os.fork`` copies memory but only the forking thread. An optimizer that
another thread was stepping at that moment would come into the child half
updated, with its step lock held by a thread the child does not have: the
child's first step, ``state_dict`` or save on it waited forever. So before a
fork every live optimizer's lock is taken (the steps in progress finish
first) and released again on both sides after it.

The locks are taken without waiting, all or none: where one is busy,
those taken are let go, the fork waits for the busy one to come free, and
tries again. (Holding some while waiting for another could wait on a thread
that holds that one and wants one already held: a step of one optimizer
inside another's, as in an L-BFGS closure.) Past :data:`WAIT_S` in all it
forks with the locks it can take at once; the child gets a new lock for each
of the others, and a warning that its copy of that optimizer may be half
updated (also where a thread waits, inside a step, for the forking thread).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import warnings
import weakref

#: Longest a fork waits for the steps in progress, in seconds: short, as
#: a wait inside a fork's handlers can wait on them. A step that imports a
#: module for the first time needs the logging lock (scipy imports logging),
#: which logging's own handler, registered after this one, holds by then.
WAIT_S = 0.2

_live = weakref.WeakValueDictionary()   # creation number -> optimizer (has ``_lock``)
_numbers = itertools.count()
_held, _missed = [], []


def register(optimizer) -> None:
    """Make forks wait for ``optimizer``'s steps (at construction, and for a copy)."""
    _live[next(_numbers)] = optimizer


def _take_all(opts):
    """Every lock of ``opts`` taken without waiting, or none: the busy one."""
    for i, opt in enumerate(opts):
        if not opt._lock.acquire(blocking=False):
            for taken in reversed(opts[:i]):
                taken._lock.release()
            return opt
        _held.append(opt)
    return None


def _before_fork():
    opts = [opt for opt in _live.values() if getattr(opt, "_lock", None) is not None]
    deadline = time.monotonic() + WAIT_S
    while True:
        busy = _take_all(opts)
        if busy is None:
            return
        _held.clear()
        left = deadline - time.monotonic()
        if left <= 0 or not busy._lock.acquire(timeout=left):
            break
        busy._lock.release()      # free now: try them all again
    for opt in opts:              # out of time: those free now, and the rest missed
        (_held if opt._lock.acquire(blocking=False) else _missed).append(opt)


def _release_held():
    while _held:
        _held.pop()._lock.release()


def _after_fork_in_parent():
    _release_held()
    _missed.clear()


def _after_fork_in_child():
    _release_held()
    while _missed:
        opt = _missed.pop()
        opt._lock = threading.RLock()    # its owner is not in this process
        warnings.warn(f"fastopt: this process was forked while another thread was inside "
                      f"a step of {type(opt).__name__} (for more than {WAIT_S:g} s); this "
                      "process's copy of its params and state may be half updated",
                      RuntimeWarning, stacklevel=2)


if hasattr(os, "register_at_fork"):       # POSIX
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
