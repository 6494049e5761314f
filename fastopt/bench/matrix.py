"""The ``fastopt bench`` run: every case of the matrix compared in turn, the
load over the run, and how long a new process takes to its first step."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import fastopt

from . import cases, machine, ratios, timing


def _case_results(row, rounds):
    """The JSON rows of one case: each implementation's result and ratios."""
    impls = (*cases.CPU_BACKENDS, *cases.BASELINES, *cases.GPU_IMPLS)
    res = ratios.compare(row, impls, rounds)
    ratio = ratios.speedups(res)
    return [dict(asdict(r), gbps=r.gbps, **{f"vs_{k}": v for k, v in ratio[r.impl].items()})
            for r in res]


def run(full=False, progress=None, rows=None, cold=True, interruptible=False):
    """Run the matrix (``rows``, default :func:`cases.plan`); returns a
    JSON-able report: ``load``, ``machine``, ``results``, ``cold_start``.

    ``progress(i, total, label)`` is called before each case, before the
    cold start and at the end. ``interruptible``: a Ctrl-C
    (KeyboardInterrupt) stops at once and the report holds the cases that
    finished, with ``"interrupted": True`` (None when none had); the case
    being measured is dropped, its timings incomplete.
    """
    rounds = 7 if full else 4
    rows = cases.plan(full) if rows is None else [cases.Row(*r) for r in rows]
    total = len(rows) + (1 if cold else 0)
    since = timing.load_snapshot()
    report = {"load": None, "machine": machine.describe(), "results": [], "cold_start": {}}
    try:
        for i, row in enumerate(rows):
            if progress:
                progress(i, total, f"{row.case} {row.elements}")
            report["results"] += _case_results(row, rounds)
            report["load"] = timing.load_since(since)
        # before the cold starts: their processes are ours
        report["load"] = timing.load_since(since)
        if cold:
            if progress:
                progress(len(rows), total, "cold start")
            report["cold_start"] = {be: cold_start(be) for be in cases.CPU_BACKENDS
                                    if be in fastopt.available_backends()}
        if progress:
            progress(total, total, "done")
    except KeyboardInterrupt:
        if not interruptible:
            raise
        if not report["results"]:
            return None
        report["interrupted"] = True
    return report


def cold_start(backend="numba", dtype="float32"):
    """Seconds from a new process to the first AdamW step done, Numba's
    on-disk cache cold (empty cache dir) and warm (second run, same dir)."""
    code = ("import time; t0 = time.perf_counter(); import numpy as np, fastopt; "
            f"p = fastopt.pack([np.ones(1 << 20, '{dtype}')]); g = p.zeros_like(); "
            f"fastopt.AdamW(p, backend='{backend}').step(g); "
            "print(time.perf_counter() - t0)")
    times = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                 capture_output=True, text=True)
            wall = time.perf_counter() - t0
            times[label] = {"to_first_step": float(out.stdout.strip()), "process": wall}
    return times
