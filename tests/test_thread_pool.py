"""The Cython backend's own thread team (``_cython/pool_impl.pxi``): tasks
claimed from per-thread ranges, the master never waiting for a worker to
wake. Checked: the same bits as a serial step and as OpenMP's team, for
every kind of pass (norm, update, LAMB's three passes, compact state);
workers that sleep between jobs (no spin) and wake late; two Python threads
stepping at once; a forked child; Ctrl-C reaching the Python thread."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastopt
from fastopt.backends.threads import FixedChoice

from conftest import assert_bit_identical

cython_cpu = pytest.importorskip("fastopt.backends.cython_cpu")
_k = cython_cpu._k

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(70000,), (3, 5), (40000,), (1 << 17,)]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="fastopt's own team needs Linux (futex)")


@pytest.fixture
def team():
    """Two threads, the team restored afterwards."""
    threads, (kind, _, spin) = _k.get_num_threads(), _k.thread_pool()
    cython_cpu.set_num_threads(2)
    yield
    cython_cpu.set_num_threads(threads)
    _k.set_thread_pool(kind == "fastopt", spin)


def _run(make, mode, steps=3, shapes=SHAPES):
    """Params, state and norms after ``steps`` steps of ``make(params)``,
    every table fixed on ``mode``: "serial", "own" or "openmp"."""
    if mode != "serial":
        _k.set_thread_pool(mode == "own", 0)     # no spin: every job wakes the worker
    ps = [np.full(s, 0.5, np.float32) for s in shapes]
    opt = make(ps)
    rng = np.random.default_rng(1)
    norms = []
    for i in range(steps):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        if i == 1:      # the tables exist after the first step
            for t in opt._all_tables:
                t.threads = FixedChoice(mode != "serial")
        norms.append(opt.step(grads))
    state = {f"{i} {k}": v.copy() for i, g in enumerate(opt.state)
             for k, v in g["flat"].items()}
    return ps, state, norms


OPTIMIZERS = {
    "adamw, clipped": lambda ps: fastopt.AdamW(ps, lr=1e-2, backend="cython",
                                               max_grad_norm=0.5),
    "adam, non-finite skip": lambda ps: fastopt.Adam(ps, lr=1e-2, backend="cython",
                                                     skip_nonfinite=True),
    "lamb (three passes)": lambda ps: fastopt.LAMB(ps, lr=1e-2, backend="cython",
                                                   max_grad_norm=1.0),
    "sgd nesterov": lambda ps: fastopt.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                           backend="cython"),
    "adamw bfloat16 state": lambda ps: fastopt.AdamW(ps, lr=1e-2, backend="cython",
                                                     state_dtype="bfloat16"),
    "adamw int8 state": lambda ps: fastopt.AdamW(ps, lr=1e-2, backend="cython",
                                                 state_dtype="int8", max_grad_norm=0.5),
}


@linux_only
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_team_steps_the_same_bits_as_serial_and_openmp(name, team):
    runs = {mode: _run(OPTIMIZERS[name], mode) for mode in ("serial", "own", "openmp")}
    p0, s0, n0 = runs["serial"]
    for mode in ("own", "openmp"):
        p1, s1, n1 = runs[mode]
        assert n0 == n1, mode
        for a, b in zip(p0, p1):
            assert_bit_identical(a, b, mode)
        assert s0.keys() == s1.keys()
        for k in s0:
            assert_bit_identical(s0[k], s1[k], f"{mode} {k}")
    assert _k.thread_pool()[1] >= 1         # the worker was started


@linux_only
def test_workers_that_sleep_between_jobs_and_wake_late(team):
    """No spin: each job wakes the worker with a futex, and after a pause
    it may find the job done. Many small threaded steps of varied sizes,
    each against a serial twin."""
    rng = np.random.default_rng(2)
    for trial in range(40):
        shapes = [(int(rng.integers(1, 5)) * 16384 + int(rng.integers(0, 999)),)
                  for _ in range(int(rng.integers(2, 4)))]
        make = OPTIMIZERS["adamw, clipped"]
        p0, s0, n0 = _run(make, "serial", steps=2, shapes=shapes)
        if trial % 4 == 0:
            threading.Event().wait(0.002)       # the worker falls asleep
        p1, s1, n1 = _run(make, "own", steps=2, shapes=shapes)
        assert n0 == n1
        for a, b in zip(p0, p1):
            assert_bit_identical(a, b)


@linux_only
def test_two_python_threads_stepping_at_once(team):
    """The second thread finds the team busy and runs its step serially:
    each optimizer ends as it would alone."""
    _k.set_thread_pool(True, 50)
    make = OPTIMIZERS["adamw, clipped"]
    expected = _run(make, "serial", steps=20)[0]
    results, errors = {}, []

    def worker(i):
        try:
            results[i] = _run(make, "own", steps=20)[0]
        except Exception as e:   # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 3
    for ps in results.values():
        for a, b in zip(expected, ps):
            assert_bit_identical(a, b)


CHILD = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np
    import fastopt
    from fastopt.backends import cython_cpu
    from fastopt.backends.threads import FixedChoice
    cython_cpu.set_num_threads(2)
    ps = [np.ones(1 << 18, np.float32)]
    opt = fastopt.AdamW(ps, backend="cython")
    g = [np.ones(1 << 18, np.float32)]
    opt.step(g)
    opt._all_tables[0].threads = FixedChoice(True)
    opt.step(g)
    assert cython_cpu._k.thread_pool()[1] == 1
    pid = os.fork()
    if pid == 0:            # the child: no workers; it steps all the same
        cython_cpu.set_num_threads(2)
        for _ in range(5):
            opt.step(g)
        os._exit(0 if np.isfinite(ps[0]).all() else 3)
    assert os.waitpid(pid, 0)[1] == 0
    main = os.getpid()
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != main:        # every worker blocks SIGINT (bit 1 of SigBlk)
            with open(f"/proc/self/task/{tid}/status") as f:
                blk = [l for l in f if l.startswith("SigBlk:")][0].split()[1]
            assert int(blk, 16) & (1 << (signal.SIGINT - 1)), (tid, blk)
    # Ctrl-C while steps run: the Python thread gets it, not a worker
    try:
        signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGINT))
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        t0 = time.time()
        while time.time() - t0 < 30:
            opt.step(g)
        print("no interrupt")
    except KeyboardInterrupt:
        print("interrupted")
""")


@linux_only
def test_a_forked_child_steps_and_ctrl_c_reaches_the_python_thread():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "interrupted", out.stdout + out.stderr


def test_thread_pool_reports_its_kind():
    kind, workers, spin = _k.thread_pool()
    assert kind in ("fastopt", "openmp") and workers >= 0 and spin >= 0
    if cython_cpu.threaded:
        team = fastopt.backend_info()["cython"]["thread_team"]
        assert team == {"kind": kind, "workers_started": _k.thread_pool()[1],
                        "spin_us": spin}
    if sys.platform.startswith("linux"):
        assert kind == "fastopt" or os.environ.get("FASTOPT_THREAD_POOL") == "openmp"


@pytest.mark.parametrize("env, expected, warned", [
    ({"FASTOPT_THREAD_POOL": "openmp", "FASTOPT_POOL_SPIN_US": "0"}, ["openmp", 0], False),
    ({"FASTOPT_POOL_SPIN_US": "120"}, ["fastopt", 120], False),
    ({"FASTOPT_THREAD_POOL": "bogus", "FASTOPT_POOL_SPIN_US": "-3"}, ["fastopt", 50], True),
])
def test_the_environment_picks_the_team(env, expected, warned):
    code = ("import json, warnings\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    from fastopt.backends import cython_cpu as be\n"
            "kind, _, spin = be.thread_pool()\n"
            "print(json.dumps([kind, spin, [str(x.message) for x in w]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=ROOT, **env), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    kind, spin, warnings = json.loads(out.stdout.strip().splitlines()[-1])
    if not sys.platform.startswith("linux"):
        expected[0] = "openmp"
    assert [kind, spin] == expected
    assert bool([m for m in warnings if "FASTOPT_" in m]) == warned, warnings
