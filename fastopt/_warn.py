"""Warnings that name the user's line, however deep inside fastopt they start."""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep

#: this thread's (or task's) held warnings, while :func:`held_warnings` holds them
_HELD = contextvars.ContextVar("fastopt_held_warnings", default=None)
#: what :func:`warn_user` puts before a held warning ("optimizer['G']: ")
_PREFIX = contextvars.ContextVar("fastopt_warning_prefix", default="")


@contextlib.contextmanager
def held_warnings():
    """Hold the warnings :func:`warn_user` gives in this thread in the
    list this yields, to be given (:func:`give`) once the work is done: a
    load of several optimizers applies them all before a warning turned
    into an error (``-W error``) could stop it halfway. Per thread, unlike
    ``warnings.catch_warnings``, which swaps process-wide state."""
    held = []
    token = _HELD.set(held)
    try:
        yield held
    finally:
        _HELD.reset(token)


def give(held) -> None:
    """The warnings :func:`held_warnings` held, given (called from fastopt's
    own code, so that each names the user's line)."""
    for message, category in held:
        warn_user(message, category)


@contextlib.contextmanager
def warning_prefix(prefix):
    """Put ``prefix`` before the warnings :func:`warn_user` gives in this block."""
    token = _PREFIX.set(prefix)
    try:
        yield
    finally:
        _PREFIX.reset(token)


def warn_user(message, category=UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside fastopt (a
    fixed stacklevel names a fastopt line when the same code is reached
    through another path: ``load_state_dict`` or ``fastopt.load``)."""
    message = _PREFIX.get() + message
    held = _HELD.get()
    if held is not None:
        held.append((message, category))
        return
    frame, level = sys._getframe(1), 2       # 1 would name this function
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
