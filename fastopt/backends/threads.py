"""Serial or threaded: chosen per table from the timings of its own steps.

A threaded step is only faster when its worker threads are awake and the
cores are free. Back to back (a benchmark, or a loop of steps with nothing
between) they are: 266k AdamW elements took 0.06 ms on two threads against
0.11 ms on one. Inside a NumPy training loop they are not: the step comes
right after the forward and backward matmuls, OpenBLAS's threads still spin
on the cores, and fastopt's OpenMP workers have gone to sleep (waking one
costs about 0.3 ms here). Measured on that loop (MLP 784-256-256-10,
batch 128, 2 cores): 0.55-0.60 ms threaded against 0.19-0.21 ms serial.

No fixed size threshold serves both, and the right answer depends on the
user's loop, which the step cannot see. So each table times its own steps
in both modes and keeps the faster one: :class:`ThreadChoice` runs the
first steps alternately serial and threaded (each mode's first step, which
may compile or fault pages in, is not counted), then the mode with the lower
median of its recent times, and retries the other mode every
``RETRY`` steps so that a changed loop (a new phase, other threads) is
noticed. A retry that loses clearly (``LOSS`` times the kept mode's median)
doubles the wait before the next one, up to ``RETRY_MAX`` steps: on this
machine a serial step of 1M AdamW elements right after threaded ones took
0.9 ms against 0.16 ms threaded (each core's half had been in its own
cache), so a retry every 50 steps cost 9% of the mean step. Both modes
compute bit-identical results (the norm's partial sums are per task, added
in task order), so the choice changes speed only.

Tables that are small, or a team of one thread, never go threaded.
"""

from __future__ import annotations

import time

#: at most this many elements: serial always (a launch costs more than it saves)
SERIAL_MAX = 1 << 15
#: recent timings kept per mode
WINDOW = 5
#: steps between retries of the mode not in use
RETRY = 50
#: the longest wait between retries that keep losing
RETRY_MAX = 800
#: a retry this many times slower than the kept mode's median lost clearly
LOSS = 1.5


class ThreadChoice:
    """The serial/threaded decision of one table (see the module doc)."""

    __slots__ = ("times", "steps", "mode", "last", "warm", "wait", "next_retry", "retrying")

    def __init__(self):
        self.times = ([], [])      # recent seconds per step: serial, threaded
        self.warm = [False, False]  # a mode's first step (compiling, faulting pages in) is not timed
        self.steps = 0
        self.mode = None           # the mode the last step used
        self.last = None           # perf_counter() when that step started
        self.wait = RETRY          # steps from one retry of the other mode to the next
        self.next_retry = RETRY
        self.retrying = False      # the last step was a retry

    def pick(self, nelem, threads) -> bool:
        """Whether the next step runs threaded."""
        if nelem <= SERIAL_MAX or threads < 2:
            self.mode = None
            return False
        serial, threaded = self.times
        self.retrying = False
        if len(serial) < 2 or len(threaded) < 2:       # explore both, alternately
            mode = len(threaded) < len(serial)
        elif self.steps >= self.next_retry:             # retry the other mode
            mode = not _faster(serial, threaded)
            self.retrying = True
            self.next_retry = self.steps + self.wait
        else:
            mode = _faster(serial, threaded)
        self.mode = mode
        self.last = time.perf_counter()
        return mode

    def record(self):
        """Close the step :meth:`pick` opened (no-op for the always-serial case)."""
        if self.mode is None:
            return
        seconds = time.perf_counter() - self.last
        self.steps += 1
        if not self.warm[self.mode]:
            self.warm[self.mode] = True
            return
        if self.retrying:      # wait longer for the next retry after a clear loss
            kept = self.times[not self.mode]
            self.wait = (min(2 * self.wait, RETRY_MAX) if seconds > LOSS * _median(kept)
                         else RETRY)
            self.next_retry = self.steps - 1 + self.wait      # the retry was step steps - 1
        times = self.times[self.mode]
        times.append(seconds)
        if len(times) > WINDOW:
            del times[0]

    def describe(self) -> str:
        """What it chose and why, for ``fastopt info`` and reports."""
        serial, threaded = self.times
        if not serial and not threaded:
            return "serial (small, or one thread)"
        med = [_median(t) * 1e6 if t else None for t in self.times]
        now = "threaded" if self.mode else "serial"
        return (f"{now}; median serial {_us(med[0])}, threaded {_us(med[1])} "
                f"over the last {WINDOW} steps of each")


def _median(xs):
    s = sorted(xs)
    return s[len(s) // 2]


def _faster(serial, threaded) -> bool:
    """True when threaded is the faster mode."""
    return _median(threaded) < _median(serial)


def _us(x):
    return "-" if x is None else f"{x:.0f} us"
