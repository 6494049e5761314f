"""A fork waits for the steps in progress in other threads.

``os.fork`` copies memory but only the forking thread. An optimizer that
another thread was stepping at that moment would come into the child half
updated, with its step lock held by a thread the child does not have: the
child's first step, ``state_dict`` or save on it waited forever. So before a
fork every live optimizer's lock is taken (the steps in progress finish
first) and released again on both sides after it.

Locks are taken newest optimizer first: a wrapper (SAM) is made after the
optimizer it wraps and locks itself before it, so this order cannot
deadlock with a step. A lock still held after :data:`WAIT_S` (a thread
waiting, inside an L-BFGS closure, for something the forking thread does)
is left: the child then gets a new lock for it, and a warning that its copy
of that optimizer may be half updated.
"""

from __future__ import annotations

import itertools
import os
import threading
import warnings
import weakref

#: Longest a fork waits for one optimizer's step in progress, in seconds.
WAIT_S = 5.0

_live = weakref.WeakValueDictionary()   # creation number -> optimizer (has ``_lock``)
_numbers = itertools.count()
_held, _missed = [], []


def register(optimizer) -> None:
    """Make forks wait for ``optimizer``'s steps (at construction, and for a copy)."""
    _live[next(_numbers)] = optimizer


def _before_fork():
    for k in sorted(_live.keys(), reverse=True):
        opt = _live.get(k)
        lock = getattr(opt, "_lock", None)
        if lock is None:
            continue
        (_held if lock.acquire(timeout=WAIT_S) else _missed).append(opt)


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
