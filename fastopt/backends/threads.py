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
in both modes and keeps the faster one (:class:`ThreadChoice`):

* It explores first: a few steps serial, then a few threaded.
* Then it runs the mode whose expected step time is lower. A mode's expected
  time is its typical time (the median of its last ``WINDOW`` counted
  steps) plus its tail: how far its steps ran past their typical time, on
  average over about its last ``TAIL_STEPS`` steps (a decaying sum that
  starts at zero, so that one slow step early on cannot rule a mode out).
  One step adds at most ``EXCESS_MAX`` typical times: a single 12 ms step
  (the host took the core) among 0.1 ms ones otherwise kept a back-to-back
  step serial for the next 2,000 steps, at 0.2 ms instead of 0.1 ms.
* Every ``RETRY`` steps it runs the other mode for ``RUN`` steps, so that a
  changed loop (a new phase, other threads) is noticed. Those steps replace
  that mode's typical time, which is stale by then; its tail is kept.
* It leaves the mode in use only for one at least ``MARGIN`` faster, since
  each switch costs a step. A retry that loses clearly (``LOSS`` times the
  kept mode) ends at its first counted step and doubles the wait before
  the next one, up to ``RETRY_MAX``.

The measurements behind these rules, all on this 2-core machine:

* **The first step after a switch is not counted.** It pays for the switch,
  not for its mode. A serial step of 1M AdamW elements right after threaded
  ones took 0.9 ms against 0.16 ms threaded, because each core's half had
  been in its own cache. In the training loop a lone serial retry took
  0.27 ms against 0.15 ms for serial steps that follow serial ones. Judged
  on such single retries, the loop stayed threaded 98% of the time.
* **The tail counts.** Inside that loop 1-2% of the threaded steps wait a
  whole scheduler tick (about 4 ms) for their worker, behind OpenBLAS's
  spinning thread. A median never sees those steps, but the user pays for
  them. In one run, threaded steps had a median of 86 us and a mean of
  209 us; serial steps had 122 us and 130 us. Such steps come one in
  fifty, so the tail needs a longer memory than the typical time:
  forgetting it at each retry put that loop on threads half the time, for
  a mean of 163 us. Steps a little slower than typical count too: an
  estimate that counted only the steps past twice the typical time kept
  a loop threaded at a mean of 230-280 us against 220-250 us serial.
* **Rare retries.** A retry of 1M elements every 50 steps cost 9% of the
  mean step while it kept losing; hence the doubling wait.

A simulation of these rules (step times drawn like the measured ones,
``tests/test_thread_choice.py``) keeps each case within 10% of the better
fixed mode.

Both modes compute bit-identical results (the norm's partial sums are per
task, added in task order), so the choice changes speed only.

Tables that are small, or a team of one thread, never go threaded.
"""

from __future__ import annotations

import time

#: at most this many elements: serial always (a launch costs more than it saves)
SERIAL_MAX = 1 << 15
#: counted steps per mode whose median is its typical time
WINDOW = 8
#: about how many steps of a mode its tail is averaged over
TAIL_STEPS = 128
#: one step adds at most this many typical times to its mode's tail
EXCESS_MAX = 40
#: steps a retry (and each mode's turn in the exploration) runs; the first is not counted
RUN = 3
#: steps between retries of the mode not in use
RETRY = 50
#: the longest wait between retries that keep losing
RETRY_MAX = 800
#: a retry this many times slower than the kept mode lost clearly
LOSS = 1.5
#: the mode in use is left only for one this much faster (each switch costs a step)
MARGIN = 0.1


class ThreadChoice:
    """The serial/threaded decision of one table (see the module doc)."""

    __slots__ = ("times", "typical", "excess", "steps", "mode", "prev", "kept", "last",
                 "wait", "next_retry", "run_left", "run_start", "in_run")

    def __init__(self):
        self.times = ([], [])      # recent counted seconds per step: serial, threaded
        # each mode's typical time, the median of its times (None: none), kept
        # up to date as they change: one sort a step, not three (pick and
        # record are Python on every large step, and cold inside a loop)
        self.typical = [None, None]
        self.excess = [0.0, 0.0]   # each mode's decayed sum of (step - typical time)
        self.steps = 0             # timed steps so far
        self.mode = None           # the mode of the step pick opened (None: not timed)
        self.prev = None           # the mode of the step before it
        self.kept = None           # the mode in use between retries (None: exploring)
        self.last = None           # perf_counter() when that step started
        self.wait = RETRY          # steps from one retry of the other mode to the next
        self.next_retry = RETRY
        self.run_left = 0          # steps left in the retry run under way
        self.run_start = 0         # the step the last retry run started at
        self.in_run = False        # a retry run is under way

    def pick(self, nelem, threads) -> bool:
        """Whether the next step runs threaded."""
        if nelem <= SERIAL_MAX or threads < 2:
            # untimed: a retry under way is dropped, and the next timed step
            # counts as the first after a switch
            self.mode = self.prev = None
            self.run_left, self.in_run = 0, False
            return False
        if self.in_run and not self.run_left:
            # the run's last step raised (never recorded): no verdict, same wait
            self.in_run = False
            self.next_retry = self.run_start + self.wait
        if self.run_left:                                 # a retry run goes on
            self.run_left -= 1
            mode = self.mode
        elif self.kept is None and min(len(self.times[0]), len(self.times[1])) < RUN - 1:
            # explore: RUN steps of each mode, serial first
            prev = self.prev
            mode = (prev if prev is not None and len(self.times[prev]) < RUN - 1
                    else len(self.times[1]) < len(self.times[0]))
        elif self.kept is not None and self.steps >= self.next_retry:    # retry the other
            mode = not self.kept
            self.times[mode].clear()      # its typical time is RETRY steps stale
            self.typical[mode] = None
            self.run_left, self.run_start, self.in_run = RUN - 1, self.steps, True
            self.next_retry = self.steps + self.wait
        else:
            mode = self.kept = self._keep()
        self.mode = mode
        self.last = time.perf_counter()
        return mode

    def again(self, nelem, threads) -> bool:
        """:meth:`pick` for a step tried again after its compiled reader
        refused the gradients (strided ones, then read through copies)
        before anything ran: the same mode, timed from now, and counted
        once (a second pick ended retry runs early and left them without a
        verdict)."""
        if self.mode is None:       # untimed (serial always), or no pick yet
            return False if nelem <= SERIAL_MAX or threads < 2 else self.pick(nelem, threads)
        self.last = time.perf_counter()
        return self.mode

    def record(self):
        """Close the step :meth:`pick` opened (no-op for the always-serial case)."""
        mode = self.mode
        if mode is None:
            return
        seconds = time.perf_counter() - self.last
        self.steps += 1
        switched, self.prev = mode != self.prev, mode
        if not switched:                 # the step after a switch pays for the switch
            times = self.times[mode]
            typical = self.typical[mode]
            if typical is not None:      # measured against the typical time before it
                keep = 1.0 - 1.0 / TAIL_STEPS
                excess = min(seconds - typical, EXCESS_MAX * typical)
                self.excess[mode] = keep * self.excess[mode] + excess
            times.append(seconds)
            if len(times) > WINDOW:
                del times[0]
            self.typical[mode] = _median(times)
            if self.in_run and seconds > LOSS * self.expected(not mode):
                self.run_left = 0        # lost clearly already: end the run here
        if self.in_run and not self.run_left:       # the retry run ended
            lost = not self.times[mode] or self.expected(mode) > LOSS * self.expected(not mode)
            self.wait = min(2 * self.wait, RETRY_MAX) if lost else RETRY
            self.next_retry = self.run_start + self.wait
            self.in_run = False

    def tail(self, mode) -> float:
        """How far ``mode``'s steps ran past its typical time, on average over
        about its last ``TAIL_STEPS`` steps (seconds; 0 before any)."""
        return self.excess[mode] / TAIL_STEPS

    def expected(self, mode) -> float:
        """Seconds a step of ``mode`` is expected to take: typical plus tail
        (infinite with no counted step since its last retry began)."""
        typical = self.typical[mode]
        return float("inf") if typical is None else typical + self.tail(mode)

    def _keep(self) -> bool:
        """The mode to use now: the one expected to be faster, except that the
        mode in use is kept unless the other beats it by ``MARGIN``."""
        serial, threaded = self.expected(False), self.expected(True)
        faster = threaded < serial
        kept = self.kept
        if kept is None or faster == kept:
            return faster
        return faster if min(serial, threaded) < (1 - MARGIN) * max(serial, threaded) else kept

    def describe(self) -> str:
        """What it chose and why, for ``fastopt info`` and reports."""
        serial, threaded = self.times
        if not serial and not threaded:
            return "serial (small, or one thread)"
        # (a tail below 0, steps a little quicker than typical of late, is shown as 0)
        parts = [f"{name} {_us(None if typical is None else typical * 1e6)} + tail "
                 f"{_us(max(self.tail(mode), 0.0) * 1e6)}"
                 for mode, (name, typical) in enumerate(zip(("serial", "threaded"),
                                                            self.typical))]
        now = self.kept if self.kept is not None else self.mode     # not a retry's mode
        return f"{'threaded' if now else 'serial'}; typical step + tail: {', '.join(parts)}"


class FixedChoice:
    """Always serial or always threaded: the fixed modes the benchmarks
    compare :class:`ThreadChoice` with (``fastopt.bench.thread_modes``).
    Small tables and a team of one thread stay serial, as with the choice."""

    __slots__ = ("threaded",)

    def __init__(self, threaded):
        self.threaded = bool(threaded)

    def pick(self, nelem, threads) -> bool:
        return self.threaded and nelem > SERIAL_MAX and threads >= 2

    again = pick

    def record(self):
        pass

    def describe(self) -> str:
        return "threaded (fixed)" if self.threaded else "serial (fixed)"


def _median(xs):
    s = sorted(xs)
    half = len(s) // 2
    return s[half] if len(s) % 2 else (s[half - 1] + s[half]) / 2


def _us(x):
    return "-" if x is None else f"{x:.0f} us"
