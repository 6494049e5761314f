"""Ctrl-C while Numba imports, loads or compiles a kernel for a step
(fastopt._held): the interrupt comes once that is over, and Numba keeps
working. Interrupted there, Numba broke for the rest of the process
(``KeyError: duplicate registration`` at every later step, or an abort)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from fastopt._held import interrupts_held

pytest.importorskip("numba")


def test_a_ctrl_c_inside_the_block_is_raised_as_it_ends():
    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            with interrupts_held():         # nested: raised by the outermost only
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):       # bytecodes where it would be raised
                    pass
            reached_end = True
    assert reached_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_block_without_ctrl_c_raises_nothing_and_restores_the_handler():
    with interrupts_held():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_of_the_users_own_is_left_in_place():
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    old = signal.signal(signal.SIGINT, mine)
    try:
        with interrupts_held():
            assert signal.getsignal(signal.SIGINT) is mine
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, old)


def test_off_the_main_thread_nothing_is_swapped():
    seen = []

    def work():
        with interrupts_held():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [signal.default_int_handler]


# a user's first step, Ctrl-C pressed every 20 ms while it runs (Numba's
# import and its first kernels: about 2 s cold), then the same process steps
# on, as in a notebook
PRESSED_DURING_FIRST_STEP = textwrap.dedent("""
    import os, signal, threading, time
    import numpy as np
    import fastopt
    params, grads = [np.ones(1000, np.float32)], [np.ones(1000, np.float32)]
    stop = threading.Event()
    def press():
        while not stop.wait(0.02):
            os.kill(os.getpid(), signal.SIGINT)
    presser = threading.Thread(target=press)
    presser.start()
    interrupts, t0 = 0, time.monotonic()
    try:
        while time.monotonic() - t0 < 60:
            try:
                fastopt.Adam(params, lr=0.1, backend="numba").step(grads)
                break
            except KeyboardInterrupt:
                interrupts += 1
    finally:
        stop.set()
        while presser.is_alive():
            try:
                presser.join()
            except KeyboardInterrupt:
                pass
    q = [np.ones(1000, np.float32)]
    fastopt.Adam(q, lr=0.1, backend="numba").step(grads)
    assert np.all(q[0] < 1), q[0][:3]
    print("interrupted", interrupts, "times, then stepped")
""")


def test_ctrl_c_pressed_again_and_again_during_the_first_numba_step():
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", PRESSED_DURING_FIRST_STEP], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "then stepped" in out.stdout
    assert int(out.stdout.split()[1]) > 0      # the interrupts did come


def test_a_second_ctrl_c_during_a_long_hold_is_raised_at_once(monkeypatch):
    from fastopt import _held
    monkeypatch.setattr(_held, "PATIENCE_S", 0.0)
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
            reached.append("after the first")
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
            reached.append("after the second")
    assert reached == ["after the first"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_set_during_the_hold_stays_and_gets_the_ctrl_c():
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    try:
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            signal.signal(signal.SIGINT, mine)
        for _ in range(1000):
            pass
        assert seen == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
