"""The serial/threaded choice of a step table (fastopt.backends.threads)."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.backends import get_backend
from fastopt.backends import threads
from fastopt.backends.threads import RETRY, RETRY_MAX, SERIAL_MAX, ThreadChoice

from conftest import assert_bit_identical

COMPILED = [b for b in ("cython", "numba") if b in fastopt.available_backends()]


def feed(choice, nelem, serial_s, threaded_s, steps):
    """Run ``steps`` picks, recording a fixed time per mode; the modes used."""
    used = []
    for _ in range(steps):
        mode = choice.pick(nelem, threads=2)
        used.append(mode)
        choice.mode = mode
        choice.times[mode].append(threaded_s if mode else serial_s)
        del choice.times[mode][:-5]
        choice.steps += 1
    return used


def test_small_tables_and_one_thread_stay_serial():
    c = ThreadChoice()
    assert c.pick(SERIAL_MAX, threads=2) is False
    assert c.pick(1 << 24, threads=1) is False
    c.record()                                 # nothing opened: nothing recorded
    assert c.times == ([], [])


@pytest.mark.parametrize("serial_s,threaded_s,winner", [(2e-4, 6e-4, False),
                                                        (1.1e-4, 0.6e-4, True)])
def test_explores_then_keeps_the_faster_mode_and_retries_the_other(serial_s, threaded_s,
                                                                   winner):
    c = ThreadChoice()
    used = feed(c, 1 << 20, serial_s, threaded_s, 4 + 2 * RETRY)
    assert sorted(used[:4]) == [False, False, True, True]       # both tried, twice
    later = used[4:]
    losers = [i for i, m in enumerate(later) if m != winner]
    # the loser only on retries: every RETRY steps, once
    assert len(losers) == 2 and all((4 + i) % RETRY == 0 for i in losers)
    assert "median serial" in c.describe()


def timed_steps(monkeypatch, choice, serial_s, threaded_s, steps):
    """``steps`` steps through pick and record, each mode taking a fixed
    time on a fake clock; the step numbers that ran the slower mode."""
    now = [0.0]
    monkeypatch.setattr(threads.time, "perf_counter", lambda: now[0])
    slower = threaded_s > serial_s          # the mode (True: threaded) that loses
    losers = []
    for k in range(steps):
        mode = choice.pick(1 << 20, threads=2)
        now[0] += threaded_s if mode else serial_s
        choice.record()
        if mode == slower:
            losers.append(k)
    return losers


@pytest.mark.parametrize("serial_s,threaded_s", [(9e-4, 1.6e-4), (1e-4, 4e-4)])
def test_retries_that_lose_clearly_come_less_often(monkeypatch, serial_s, threaded_s):
    c = ThreadChoice()
    retries = [k for k in timed_steps(monkeypatch, c, serial_s, threaded_s, 5000) if k > 8]
    assert retries[0] == RETRY                 # the first retry, after the exploration
    gaps = [b - a for a, b in zip(retries, retries[1:])]
    assert gaps[:4] == [2 * RETRY, 4 * RETRY, 8 * RETRY, RETRY_MAX]
    assert set(gaps[3:]) == {RETRY_MAX}


def test_a_retry_that_is_close_keeps_the_short_wait(monkeypatch):
    c = ThreadChoice()
    retries = [k for k in timed_steps(monkeypatch, c, 1.2e-4, 1e-4, 400) if k > 8]
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
