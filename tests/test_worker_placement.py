"""The Cython backend keeps its OpenMP workers off the master thread's core
(kernels_impl.pxi: fo_place_workers): a worker queued behind the master made
a threaded step 5-10x slower next to OpenBLAS's spinning threads. Checked in
a fresh process: which cores each thread may run on, after threaded steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import json, os, time
    import numpy as np
    import fastopt
    from fastopt.backends import cython_cpu as be
    before = sorted(os.sched_getaffinity(0))
    p = [np.zeros(1 << 17, np.float32)]
    opt = fastopt.AdamW(p, backend="cython")
    opt.step([np.ones_like(p[0])])
    t = opt._all_tables[0]
    el = fastopt.backends.tables.element_of(
        opt._element_step(opt.param_groups[0], opt.state[0])[0], 2)
    bufs = [opt.state[0]["flat"][n] for n in ("exp_avg", "exp_avg_sq")]
    for _ in range(20):
        be.step(t, el, bufs, 1.0, parallel=True)     # threaded, whatever the timings
        # a worker started by the first step is placed by a later one once
        # it has said who it is: on a busy host it may not yet have run
        # within 20 back-to-back steps (the test failed then)
        time.sleep(0.002)
    main = os.getpid()
    others = [int(x) for x in os.listdir("/proc/self/task") if int(x) != main]
    print(json.dumps({"placement": be.worker_placement, "before": before,
                      "main": sorted(os.sched_getaffinity(0)),
                      "threads": [sorted(os.sched_getaffinity(t)) for t in others]}))
""")


def _run(**env):
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=ROOT, **env), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_two = pytest.mark.skipif(
    not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and at least 2 usable cores")


@needs_two
def test_workers_avoid_the_masters_core_and_the_users_thread_stays_free():
    r = _run(OMP_NUM_THREADS="2")
    assert r["placement"].startswith("on")
    assert r["main"] == r["before"]             # the user's thread is never pinned
    allowed = set(r["before"])
    placed = [set(t) for t in r["threads"] if len(t) == len(allowed) - 1 and set(t) < allowed]
    assert placed, r                            # the OpenMP worker: every core but one


@needs_two
@pytest.mark.parametrize("env", [{"FASTOPT_PLACE_WORKERS": "0"}, {"OMP_PROC_BIND": "false"}])
def test_placement_is_off_when_asked_or_when_the_user_binds_threads(env):
    r = _run(OMP_NUM_THREADS="2", **env)
    assert r["placement"].startswith("off")
    assert all(sorted(t) == r["before"] for t in r["threads"]), r
