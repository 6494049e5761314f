"""Ctrl-C held while Numba imports or compiles for fastopt.

A KeyboardInterrupt in the middle of ``import numba``, of Numba loading a
kernel from its cache, or of a compile leaves Numba broken for the rest of
the process: an interrupted import is dropped from ``sys.modules`` but what
it registered in Numba's typing registries stays, so the next try raises
``KeyError: duplicate registration`` (Numba imports most of its registries
lazily, at the first kernel it loads); a half-built llvmlite object can
even abort the process (``double free``). Pressing Ctrl-C during the first
step, cold, is the ordinary case: Numba takes about 2 s there.

So while a backend imports (:func:`interrupts_held`, used by the lazy
registries) and while Numba holds its compiler lock for one of fastopt's
kernels (:func:`hold_numba_compiles`), a Ctrl-C is kept and raised as soon
as that ends. Only with Python's default SIGINT handler in place, on the
main thread (the one that gets signals): a handler of the user's own, and
the user's own Numba compiles, are left alone. A second Ctrl-C during a
hold of more than ``PATIENCE_S`` (a long cold compile) is raised at once.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time


#: a hold older than this gives way to a second Ctrl-C (a long cold
#: compile, not a cache load: that is the user's call to make)
PATIENCE_S = 5.0


class _SigintHold:
    """The default SIGINT handler swapped for one that only notes the
    signal, and swapped back (the noted Ctrl-C raised) when the outermost
    hold ends. Main thread only."""

    def __init__(self):
        self.depth = 0
        self.pending = False
        self.since = 0.0

    def _note(self, signum, frame):
        if self.pending and time.monotonic() - self.since > PATIENCE_S:
            self.pending = False        # (raised now, not again as the hold ends)
            raise KeyboardInterrupt     # pressed again during a long hold
        self.pending = True

    def enter(self) -> bool:
        """Hold; False (nothing held) off the main thread, or where the
        SIGINT handler is not Python's default one."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if self.depth == 0:
            if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                return False
            signal.signal(signal.SIGINT, self._note)
            self.since = time.monotonic()
        self.depth += 1
        return True

    def leave(self) -> None:
        """End one :meth:`enter` that returned True."""
        self.depth -= 1
        if self.depth == 0:
            pending, self.pending = self.pending, False
            if signal.getsignal(signal.SIGINT) != self._note:
                # a handler set during the hold stays, and gets the Ctrl-C
                if pending:
                    signal.raise_signal(signal.SIGINT)
                return
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if pending:
                raise KeyboardInterrupt


_HOLD = _SigintHold()


@contextlib.contextmanager
def interrupts_held():
    """A Ctrl-C that comes while the block runs is raised when it ends."""
    held = _HOLD.enter()
    try:
        yield
    finally:
        if held:
            _HOLD.leave()


def _called_from_fastopt(frame) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("fastopt."):
            return True
        frame = frame.f_back
    return False


_listener = None


def hold_numba_compiles() -> None:
    """Hold Ctrl-C while Numba's compiler lock is held for a compile or a
    cache load that one of fastopt's calls started (Numba's
    ``numba:compiler_lock`` event, which wraps both). Idempotent."""
    global _listener
    if _listener is not None:
        return
    from numba.core import event

    class HoldDuringFastoptCompiles(event.Listener):
        # the lock is re-entrant: one entry per start event, True where held
        def __init__(self):
            self.held = []

        def on_start(self, ev):
            if threading.current_thread() is not threading.main_thread():
                return
            mine = _HOLD.depth > 0 or _called_from_fastopt(sys._getframe(1))
            self.held.append(mine and _HOLD.enter())

        def on_end(self, ev):
            if threading.current_thread() is not threading.main_thread() or not self.held:
                return
            if self.held.pop():
                # a noted Ctrl-C is raised here, the lock released: Numba is
                # whole again, as after a Ctrl-C that came just after
                _HOLD.leave()

    _listener = HoldDuringFastoptCompiles()
    event.register("numba:compiler_lock", _listener)
