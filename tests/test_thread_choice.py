"""The serial/threaded choice of a step table (fastopt.backends.threads)."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.backends import get_backend
from fastopt.backends import threads
from fastopt.backends.threads import RETRY, RETRY_MAX, RUN, SERIAL_MAX, ThreadChoice

from conftest import assert_bit_identical

COMPILED = [b for b in ("cython", "numba") if b in fastopt.available_backends()]


def drive(monkeypatch, choice, step_us, steps, nelem=1 << 20):
    """``steps`` steps through pick and record on a fake clock, each taking
    ``step_us(threaded, previous mode)`` microseconds; the modes used and the
    mean step time in microseconds."""
    now = [0.0]
    monkeypatch.setattr(threads.time, "perf_counter", lambda: now[0])
    used, prev, total = [], None, 0.0
    for _ in range(steps):
        mode = choice.pick(nelem, threads=2)
        us = step_us(mode, prev)
        now[0] += us * 1e-6
        choice.record()
        used.append(mode)
        prev, total = mode, total + us
    return used, total / steps


def fixed(serial_us, threaded_us):
    return lambda mode, prev: threaded_us if mode else serial_us


def run_starts(used, mode):
    """The steps at which a run of ``mode`` starts."""
    return [k for k, m in enumerate(used) if m == mode and (k == 0 or used[k - 1] != mode)]


def test_typical_times_follow_the_times_whatever_the_sequence(monkeypatch):
    """Each mode's cached typical time is the median of its counted times
    (None with none) after every pick and record, through random step times,
    picks left open (a step that raised) and untimed picks."""
    now = [0.0]
    monkeypatch.setattr(threads.time, "perf_counter", lambda: now[0])
    rng = np.random.default_rng(5)
    for _ in range(20):
        c = ThreadChoice()
        for _ in range(1500):
            threaded = c.pick(1 << 20, threads=1 if rng.random() < 0.02 else 2)
            now[0] += (60 if threaded else 100) * rng.lognormal(0, 0.3) * 1e-6
            if rng.random() > 0.03:            # else: the step raised, never recorded
                c.record()
            for mode in (0, 1):
                times = c.times[mode]
                assert c.typical[mode] == (threads._median(times) if times else None)
        assert c.kept is not None


def test_small_tables_and_one_thread_stay_serial():
    c = ThreadChoice()
    assert c.pick(SERIAL_MAX, threads=2) is False
    assert c.pick(1 << 24, threads=1) is False
    c.record()                                 # nothing opened: nothing recorded
    assert c.times == ([], [])


@pytest.mark.parametrize("serial_us,threaded_us", [(100, 120), (110, 90)])
def test_explores_then_keeps_the_faster_mode_and_retries_the_other(monkeypatch, serial_us,
                                                                   threaded_us):
    c = ThreadChoice()
    used, _ = drive(monkeypatch, c, fixed(serial_us, threaded_us), 2 * RUN + 2 * RETRY)
    # (close times: a retry that loses clearly would put the next one off)
    # each mode's turn: RUN steps, the first (after the switch) not counted
    assert used[:2 * RUN] == [False] * RUN + [True] * RUN
    winner = threaded_us < serial_us
    later = used[2 * RUN:]
    # the loser only in retry runs of RUN steps, every RETRY steps
    assert run_starts(used, not winner)[-2:] == [RETRY, 2 * RETRY]
    assert later.count(not winner) == 2 * RUN
    assert "typical step + tail" in c.describe()


def test_the_step_after_a_switch_is_not_counted(monkeypatch):
    """A serial step right after threaded ones pays for the switch (each
    core's half was in its own cache): judged on it, serial would lose."""
    def step_us(mode, prev):
        if mode:
            return 200
        return 1000 if prev else 100
    c = ThreadChoice()
    used, mean = drive(monkeypatch, c, step_us, 1000)
    assert used.count(False) > 0.9 * len(used)
    assert mean < 1.1 * 100
    assert abs(c.tail(False)) < 1e-9 and max(c.times[False]) < 101e-6   # not charged to serial


def test_a_rare_slow_step_counts_against_its_mode(monkeypatch):
    """Threaded is faster on most steps, but one in fifty waits 4 ms for its
    worker: on average serial is faster, and the choice keeps serial."""
    rng = np.random.default_rng(0)

    def step_us(mode, prev):
        if mode:
            return 90 + (4000 if rng.random() < 0.02 else 0)
        return 130
    used, mean = drive(monkeypatch, ThreadChoice(), step_us, 4000)
    assert used.count(False) > 0.8 * len(used)
    assert mean < 1.1 * 130


def test_one_very_slow_step_does_not_rule_its_mode_out(monkeypatch):
    """The host takes the core once: one 12 ms threaded step among 0.1 ms
    ones. The choice stays on threads (or goes back at the next retries)."""
    count = [0]

    def step_us(mode, prev):
        count[0] += 1
        if mode:
            return 12000 if count[0] == 20 else 100
        return 170
    used, mean = drive(monkeypatch, ThreadChoice(), step_us, 2000)
    assert used[-RETRY:].count(True) >= RETRY - RUN - 1
    assert mean < 1.2 * 100


# Step times drawn like those measured (docs/performance.md): a training loop
# whose threaded steps are faster on most steps but sometimes wait a 4 ms
# scheduler tick, one where threaded wins outright, back-to-back steps where
# serial after threaded pays the cache split, and a tie where each switch costs.
def loop_us(rng):
    return lambda mode, prev: (86 + rng.exponential(15) + (3900 if rng.random() < 0.015 else 0)
                               if mode else 122 + rng.exponential(8))


def loop_threads_win_us(rng):
    return lambda mode, prev: (165 + rng.exponential(15) + (3900 if rng.random() < 0.005 else 0)
                               if mode else 270 + rng.exponential(15))


def back_to_back_us(rng):
    return lambda mode, prev: (60 + rng.exponential(3) if mode
                               else (220 if prev else 110) + rng.exponential(5))


def tie_us(rng):
    return lambda mode, prev: 230 + rng.exponential(20) + (100 if mode != prev else 0)


@pytest.mark.parametrize("case", [loop_us, loop_threads_win_us, back_to_back_us, tie_us])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_mean_step_is_within_10_percent_of_the_better_fixed_mode(monkeypatch, case, seed):
    steps = 3000
    rng = np.random.default_rng(seed)
    step_us = case(rng)
    best = min(np.mean([step_us(mode, mode) for _ in range(steps)]) for mode in (False, True))
    _, mean = drive(monkeypatch, ThreadChoice(), step_us, steps)
    assert mean < 1.1 * best


def test_a_retry_replaces_the_stale_typical_time(monkeypatch):
    """The loop changes: threaded, slow at first, becomes fast. The first
    retry run after the change switches to it."""
    phase = [0]

    def step_us(mode, prev):
        return (500 if phase[0] == 0 else 50) if mode else 100
    c = ThreadChoice()
    used, _ = drive(monkeypatch, c, step_us, 2 * RETRY)
    assert not c.kept
    phase[0] = 1
    used, _ = drive(monkeypatch, c, step_us, 4 * RETRY)
    assert c.kept and all(used[-RETRY:-RUN - 1])


@pytest.mark.parametrize("serial_us,threaded_us", [(900, 160), (100, 400)])
def test_retries_that_lose_clearly_come_less_often(monkeypatch, serial_us, threaded_us):
    c = ThreadChoice()
    used, _ = drive(monkeypatch, c, fixed(serial_us, threaded_us), 5000)
    retries = run_starts(used, threaded_us > serial_us)[1:]     # after the exploration's
    assert retries[0] == RETRY
    gaps = [b - a for a, b in zip(retries, retries[1:])]
    assert gaps[:4] == [2 * RETRY, 4 * RETRY, 8 * RETRY, RETRY_MAX]
    assert set(gaps[3:]) == {RETRY_MAX}
    # each ends at its first counted step: the switch, then one more
    loser = threaded_us > serial_us
    assert all(used[k:k + 3] == [loser, loser, not loser] for k in retries)


def test_a_retry_that_is_close_keeps_the_short_wait(monkeypatch):
    c = ThreadChoice()
    used, _ = drive(monkeypatch, c, fixed(120, 100), 400)
    retries = run_starts(used, False)[1:]
    assert retries[0] == RETRY
    assert {b - a for a, b in zip(retries, retries[1:])} == {RETRY}


@pytest.mark.parametrize("backend", COMPILED)
def test_both_modes_step_bit_identically(backend, monkeypatch):
    """Serial or threaded only changes speed: params, state and the clipped
    norm are the same bits (the norm's partial sums are per task, added in
    task order)."""
    rng = np.random.default_rng(0)
    shapes = [(70000,), (3, 5), (40000,)]
    results = []
    for force in (False, True):
        monkeypatch.setattr(ThreadChoice, "pick", lambda self, n, t, f=force: f)
        ps = [rng.standard_normal(s).astype(np.float32) * 0 + 1 for s in shapes]
        opt = fastopt.AdamW(ps, lr=1e-2, backend=backend, max_grad_norm=0.5)
        g_rng = np.random.default_rng(1)
        norms = [opt.step([g_rng.standard_normal(s).astype(np.float32) for s in shapes])
                 for _ in range(3)]
        results.append((ps, opt.state[0]["flat"], norms))
    (p0, s0, n0), (p1, s1, n1) = results
    assert n0 == n1
    for a, b in zip(p0, p1):
        assert_bit_identical(a, b)
    for k in s0:
        assert_bit_identical(s0[k], s1[k], k)


@pytest.mark.parametrize("backend", COMPILED)
def test_the_step_records_its_timings(backend):
    ps = [np.ones(1 << 16, np.float32)]
    opt = fastopt.SGD(ps, lr=0.1, backend=backend)
    for _ in range(6):
        opt.step([np.ones(1 << 16, np.float32)])
    choice = opt._tables[0][0].threads
    if get_backend(backend).get_num_threads() > 1:
        assert len(choice.times[0]) >= 2 and len(choice.times[1]) >= 2
        assert all(t > 0 for t in choice.times[0] + choice.times[1])


def test_steps_that_raise_inside_a_retry_leave_the_choice_working(monkeypatch):
    """A step that raises never reaches ``record``: a retry whose steps all
    raised has no time for its mode, and the choice goes on."""
    c = ThreadChoice()
    drive(monkeypatch, c, fixed(100, 60), RETRY)      # threaded kept, a retry next
    for _ in range(RUN):
        assert c.pick(1 << 20, threads=2) is False     # the serial retry, never recorded
    wait = c.wait
    used, _ = drive(monkeypatch, c, fixed(100, 60), 1)
    assert used == [True] and not c.in_run
    assert c.wait == wait and c.next_retry == c.run_start + wait     # no verdict
    used, mean = drive(monkeypatch, c, fixed(100, 60), 3 * RETRY)
    assert mean < 1.1 * 60


def test_an_untimed_step_drops_the_retry_under_way(monkeypatch):
    """A step taken with one thread (set_num_threads(1) for a while) is
    serial and untimed: a retry under way ends there, with no verdict, and
    no later step is judged against it."""
    c = ThreadChoice()
    drive(monkeypatch, c, fixed(100, 60), RETRY)
    assert c.pick(1 << 20, threads=2) is False               # the retry starts
    assert c.pick(1 << 20, threads=1) is False               # one thread: untimed
    assert not c.in_run and c.run_left == 0 and c.prev is None
    used, mean = drive(monkeypatch, c, fixed(100, 60), 2 * RETRY)
    assert all(m in (True, False) for m in used) and mean < 1.1 * 60


def test_a_retry_does_not_measure_against_a_stale_typical_time(monkeypatch):
    """The retried mode's old typical time is dropped with its old steps:
    a mode that got ten times faster meanwhile gets no negative tail."""
    phase = [0]

    def step_us(mode, prev):
        return (500 if phase[0] == 0 else 50) if mode else 100
    c = ThreadChoice()
    drive(monkeypatch, c, step_us, 2 * RETRY)
    phase[0] = 1
    drive(monkeypatch, c, step_us, 2 * RETRY)
    assert c.tail(True) >= -1e-9
