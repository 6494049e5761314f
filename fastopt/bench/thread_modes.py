"""The serial/threaded choice against both fixed modes, where steps run.

A table above :data:`fastopt.backends.threads.SERIAL_MAX` elements picks
serial or threaded from the timings of its own steps
(:class:`fastopt.backends.threads.ThreadChoice`). The choice must never be
slower than its own serial kernel, wherever the step runs. This module
measures that: three copies of the same model and optimizer, one choosing
(``"auto"``), one always serial, one always threaded, each stepped in the
same settings, interleaved in one process:

* ``"hot"``: steps back to back on one gradient list;
* ``"pause"``: a short sleep before each step (the workers go to sleep);
* ``"loop"``: a NumPy training loop, the BLAS forward/backward pass (and
  new gradient arrays) before each step (:mod:`fastopt.bench.in_loop`).

:func:`thread_modes_matrix` runs that in new processes under each of
:data:`VARIANTS`: the default thread pools, OpenBLAS on one thread or two,
and torch imported before fastopt, with its own pool running.

``python -m fastopt.bench.thread_modes`` prints the matrix.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from fastopt import _openmp
from fastopt.backends.threads import FixedChoice

from . import isolated, timing
from .cases import IN_LOOP
from .in_loop import InLoopImpl, mlp_data

POLICIES = ("auto", "serial", "threaded")
SETTINGS = ("hot", "pause", "loop")
#: the process-wide variants: (name, environment additions, import torch first)
VARIANTS = (("default threads", {}, False),
            ("OPENBLAS_NUM_THREADS=1", {"OPENBLAS_NUM_THREADS": "1"}, False),
            ("OPENBLAS_NUM_THREADS=2", {"OPENBLAS_NUM_THREADS": "2"}, False),
            ("torch imported first", {}, True))


def _use_policy(copy, policy, autos):
    """Put every table of ``copy``'s optimizers on ``policy``: a fixed mode,
    or ``"auto"`` with the copy's own choices (``autos``, kept from one
    round to the next)."""
    for opt in _optimizers(copy):
        for table, auto in zip(opt._all_tables, autos[id(opt)]):
            table.threads = auto if policy == "auto" else FixedChoice(policy == "threaded")


def _optimizers(copy):
    """The optimizers of one model copy: one per setting."""
    return [copy["loop"].step.__self__, copy["hot"].hot_step.__self__,
            copy["pause"].hot_step.__self__]


def _copy(backend, sizes, batch, data):
    """One model copy: two :class:`InLoopImpl` give the three settings'
    optimizers (the loop trains one's model; the hot and paused steps use
    the second copies of both)."""
    first, second = (InLoopImpl(backend, tuple(sizes), batch, data) for _ in range(2))
    return {"loop": first, "hot": second, "pause": first}


def _paused(loop, n, pause):
    """Mean seconds of ``n`` steps, each after ``pause`` seconds of sleep."""
    step, grads = loop.hot_step, loop.hot_grads
    clock = time.perf_counter
    total = 0.0
    for _ in range(n):
        time.sleep(pause)
        t0 = clock()
        step(grads)
        total += clock() - t0
    return total / n


#: each setting's steps: on which of a copy's loops
SETTING_STEPS = {"hot": lambda copy, n, pause: copy["hot"].hot(n),
                 "pause": lambda copy, n, pause: _paused(copy["pause"], n, pause),
                 "loop": lambda copy, n, pause: copy["loop"].train(n)[0]}


def thread_modes_case(backend="cython", sizes=IN_LOOP.sizes, batch=IN_LOOP.batch,
                      settings=SETTINGS, steps=100, rounds=9, pause=0.003, settle=0.2,
                      warmup=200):
    """Mean step seconds of each policy (:data:`POLICIES`) in each setting.

    ``backend``'s Adam on a plain list (the MLP of
    :func:`fastopt.bench.in_loop.in_loop_case`), three copies of the model,
    each with its own optimizer per setting.

    * The copies take the three policies in turn, one round each (so
      ``rounds`` should be a multiple of 3). The same kernel with the same
      policy took from 115 to 179 us a step in one process, depending on
      which copy's arrays it ran on.
    * Each copy keeps its own choices for its auto rounds. Before the
      rounds, each copy runs ``warmup`` steps in each setting under each
      policy, so that most of the choice's learning is done before the
      rounds (a mode's tail builds up over about 128 of its steps; while it
      learns a loop, the choice can spend those steps on the mode that
      proves slower).
    * Each round waits ``settle`` seconds (OpenBLAS's workers stop
      spinning). Then it runs every setting, and in it ``steps`` steps of
      every policy.
    * Each figure is the median over ``rounds`` of the round's mean step.

    ``auto_vs_serial`` is auto's time over serial's; above 1, the choice
    lost to its serial kernel."""
    data = mlp_data(sizes, batch)
    copies, autos = [], {}
    for _ in POLICIES:
        copy = _copy(backend, sizes, batch, data)
        for loop in {id(v): v for v in copy.values()}.values():    # the tables exist now
            loop.train(1)
            loop.hot(1)
        for opt in _optimizers(copy):
            autos[id(opt)] = [table.threads for table in opt._all_tables]
        copies.append(copy)
    samples = {s: {p: [] for p in POLICIES} for s in settings}
    for copy in copies:                                # compile, fault in, learn
        for policy in POLICIES:
            _use_policy(copy, policy, autos)
            for setting in settings:
                SETTING_STEPS[setting](copy, warmup, pause)
    since = timing.load_snapshot()
    for r in range(rounds):
        time.sleep(settle)
        policies = POLICIES[r % 3:] + POLICIES[:r % 3]
        for copy, policy in zip(copies, policies):
            _use_policy(copy, policy, autos)
        for setting in settings:
            for copy, policy in zip(copies, policies):
                samples[setting][policy].append(SETTING_STEPS[setting](copy, steps, pause))
    results = {}
    for setting in settings:
        med = {p: float(np.median(samples[setting][p])) for p in POLICIES}
        results[setting] = {**{f"{p}_s": med[p] for p in POLICIES},
                            "auto_vs_serial": med["auto"] / med["serial"],
                            "auto_vs_threaded": med["auto"] / med["threaded"]}
    return {"backend": backend, "sizes": list(sizes), "batch": batch, "steps": steps,
            "rounds": rounds, "warmup": warmup, "pause_s": pause, "results": results,
            "environment": timing.load_since(since)}


def _start_torch():
    """Run one threaded torch op, so that its pool exists and has run."""
    import torch
    a = torch.ones(512, 512)
    (a @ a).sum().item()


def thread_modes_matrix(variants=VARIANTS, backend="cython", timeout=600, **case):
    """:func:`thread_modes_case` in a new process per variant (the thread
    environment is read when NumPy's BLAS and libgomp load): ``{variant
    name: report}``, or a ``{"note": ...}`` where the process failed. A
    torch variant's process imports torch before fastopt, as torch users
    do, so that torch's own libgomp is the one loaded; each report's
    ``libgomp`` lists the copies its process mapped, and ``openmp_wait``
    which one fastopt's kernels run on (:func:`fastopt._openmp.wait_policy`)."""
    out = {}
    for name, env_add, torch in variants:
        try:
            out[name] = isolated.run_once(
                "fastopt.bench.thread_modes:_one_process",
                {"start_torch": torch, "backend": backend, **case},
                preload=("torch",) if torch else (), env=env_add, timeout=timeout)
        except subprocess.TimeoutExpired:
            out[name] = {"note": f"took over {timeout} s"}
        except RuntimeError as e:
            out[name] = {"note": str(e)}
    return out


def _one_process(start_torch=False, **case):
    """One variant's part of :func:`thread_modes_matrix`, in its process."""
    if start_torch:
        _start_torch()
    return {**thread_modes_case(**case), "libgomp": _openmp._loaded_libgomps(),
            "openmp_wait": _openmp.wait_policy()}


def format_matrix(matrix) -> str:
    """The matrix as a table: one row per variant and setting."""
    lines = [f"{'variant':<24} {'setting':<7} {'auto':>8} {'serial':>8} {'threaded':>9} "
             f"{'auto/serial':>12}"]
    for name, report in matrix.items():
        if "note" in report:
            lines.append(f"{name:<24} {report['note']}")
            continue
        for setting, r in report["results"].items():
            lines.append(f"{name:<24} {setting:<7} {r['auto_s'] * 1e6:7.0f}us "
                         f"{r['serial_s'] * 1e6:7.0f}us {r['threaded_s'] * 1e6:8.0f}us "
                         f"{r['auto_vs_serial']:11.2f}x")
    return "\n".join(lines)


def main(argv=None):
    """``python -m fastopt.bench.thread_modes``: the matrix as a table
    (about 2 minutes; no options but ``--help``)."""
    import argparse
    argparse.ArgumentParser(
        prog="python -m fastopt.bench.thread_modes",
        description="The serial/threaded choice against both fixed modes (hot, after a "
                    "pause, in a NumPy training loop) under four thread environments, each "
                    "in its own process; about 2 minutes. FASTOPT_THREAD_POOL=openmp runs "
                    "it on the OpenMP pool.").parse_args(argv)
    print(format_matrix(thread_modes_matrix()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
