"""Timers for same-run comparisons, and whether the machine was busy.

Every implementation is warmed up first (so Numba compilation stays out),
then timed in blocks of calls long enough to dwarf timer overhead, in
rounds that interleave the implementations (every one once per round), so
that a slow spell of a shared machine hits all of them alike and their
ratios stay meaningful. The reported time is the minimum block mean, the
usual estimator of what the code can do on a noisy machine; the median
over the rounds beside it shows the spread.

Another process on one of two cores can slow a threaded step tenfold (it
waits for a descheduled thread), so a measurement also records the load
and what other processes took of the CPUs while it ran.
"""

from __future__ import annotations

import os
import time

import numpy as np


#: calls that take a step past its start: the first compiles (Numba),
#: faults pages in and makes fastopt's step plan, which the second runs
#: (its first call reads the plan's arguments), as every later one does
WARMUP_CALLS = 3


def warm_up(fn) -> None:
    """``fn`` called :data:`WARMUP_CALLS` times, outside any timing."""
    for _ in range(WARMUP_CALLS):
        fn()


def time_all(fns, rounds, min_block=0.02, medians=None):
    """Minimum mean seconds per call of each function (and, into the dict
    ``medians`` when given, the median over the rounds: with the minimum,
    the spread of the repeats).

    Rounds are interleaved (every implementation once per round) so that a
    slow spell of a shared machine hits all of them alike and the same-run
    ratios stay meaningful.
    """
    calls = {}
    for name, fn in fns.items():
        warm_up(fn)
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(min_block / max(time.perf_counter() - t0, 1e-7)))
    seen = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            seen[name].append((time.perf_counter() - t0) / calls[name])
    if medians is not None:
        medians.update({name: float(np.median(v)) for name, v in seen.items()})
    return {name: min(v) for name, v in seen.items()}


def _cpu_ticks():
    """``(busy, steal, this process's)`` CPU clock ticks so far, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            s = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return user + nice + system + irq + softirq, steal, sum(int(x) for x in s[11:15])


def _loadavg():
    """``os.getloadavg()``, or None where there is none (Windows)."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def load_snapshot():
    """Where the machine's load stands now, for :func:`load_since`."""
    return time.perf_counter(), _loadavg(), _cpu_ticks()


def load_since(snapshot) -> dict:
    """Load averages and other processes' CPU use since ``snapshot``: a
    benchmark on a machine something else was using says so."""
    t0, load0, ticks0 = snapshot
    return {"loadavg_before": load0, "loadavg_after": _loadavg(),
            "other_processes": _other_cpu(ticks0, _cpu_ticks(), time.perf_counter() - t0)}


def _other_cpu(before, after, wall):
    """What other processes took of the CPUs between two :func:`_cpu_ticks`."""
    if before is None or after is None:
        return {"note": "no /proc/stat: other processes' CPU use not measured"}
    hz = os.sysconf("SC_CLK_TCK")
    busy, steal, mine = ((a - b) / hz for a, b in zip(after, before))
    other = max(busy - mine, 0.0)
    frac = other / (wall * (os.cpu_count() or 1))
    verdict = ("quiet: no other process used the CPUs to speak of" if frac < 0.02 else
               f"shared: other processes used {100 * frac:.0f}% of the CPUs")
    return {"other_cpu_s": other, "other_cpu_fraction": frac, "own_cpu_s": mine,
            "steal_s": steal,
            "note": (f"{verdict} (other {other:.2f} CPU-s, this process {mine:.2f} CPU-s, "
                     f"steal {steal:.2f} s, in {wall:.1f} s on {os.cpu_count()} CPUs)")}
