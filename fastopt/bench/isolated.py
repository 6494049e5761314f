"""Time implementations each in its own process, interleaved round by round.

Several thread pools in one process do not share the cores fairly: NumPy's
OpenBLAS, SciPy's OpenBLAS (the cython nn backend), torch's OpenMP and MKL,
fastopt's OpenMP. A pool whose workers are still spinning after one
implementation's call slows the next implementation in the same process, so
in-process comparisons at each library's default thread count measure the
neighbours as much as the code (docs/performance.md shows a 2x artefact).
Here every implementation lives in a worker process that loads only what it
needs; the parent asks one worker at a time for a timed block, pausing
between blocks so the previous worker's threads have gone to sleep. Rounds
are interleaved, so the same-run ratios stay meaningful on a noisy machine.

A worker is ``python -c`` running :func:`_serve`: it imports the ``preload``
modules before anything else, fastopt included (torch for the torch
baselines, as a torch user's script does: torch then loads its own libgomp
at its defaults, where ``import fastopt`` first would have given it
fastopt's short-spin copy), with this process's environment, then calls
``factory(**kwargs)`` (``"module:function"``) for the function to time.
The protocol is one line per message on stdin/stdout, prefixed so that
library chatter on stdout is ignored. :func:`run_once` runs one function
the same way and returns its result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

_TAG = "@@fastopt-isolated "
# the preload modules first: nothing of fastopt's may load before them
_BOOT = ("import importlib, json, os\n"
         "for m in json.loads(os.environ['FASTOPT_ISOLATED_SPEC'])['preload']:\n"
         "    importlib.import_module(m)\n"
         "from fastopt.bench.isolated import _serve\n"
         "_serve()")
_ONCE = ("import importlib, json, sys\n"
         "for m in json.loads(sys.argv[1]):\n"
         "    importlib.import_module(m)\n"
         "from fastopt.bench.isolated import _run_once_child\n"
         "_run_once_child(sys.argv[2], sys.argv[3])")


def run_once(target, kwargs=None, preload=(), env=None, timeout=None):
    """``target(**kwargs)`` (``"module:function"``, a JSON-able result) in a
    new process that imports the ``preload`` modules before anything else,
    with this process's environment plus ``env``; its result. RuntimeError
    with the child's last error line when it fails;
    ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
    proc = subprocess.run(
        [sys.executable, "-c", _ONCE, json.dumps(list(preload)), target,
         json.dumps(kwargs or {})],
        env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_TAG)]
    if proc.returncode or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{target} in its own process failed (exit code "
                           f"{proc.returncode}): {last}")
    return json.loads(lines[-1][len(_TAG):])


def _run_once_child(target, kwargs_json):
    import importlib
    modname, fname = target.split(":")
    result = getattr(importlib.import_module(modname), fname)(**json.loads(kwargs_json))
    print(_TAG + json.dumps(result, default=float), flush=True)


@dataclass
class Impl:
    """One implementation to time: ``factory(**kwargs)`` returns the callable."""
    factory: str
    kwargs: dict = field(default_factory=dict)
    preload: tuple = ()


def _serve():
    spec = json.loads(os.environ["FASTOPT_ISOLATED_SPEC"])     # preload: done by _BOOT
    import importlib
    modname, fname = spec["factory"].split(":")
    fn = getattr(importlib.import_module(modname), fname)(**spec["kwargs"])
    for _ in range(3):                        # warm up: compile, fault pages in
        fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    print(_TAG + json.dumps({"ready": once}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        if "quit" in msg:
            break
        calls = max(1, int(msg["block_s"] / once))
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        once = (time.perf_counter() - t0) / calls
        print(_TAG + json.dumps({"seconds": once}), flush=True)


class _Worker:
    def __init__(self, name, impl: Impl):
        self.name = name
        spec = {"factory": impl.factory, "kwargs": impl.kwargs, "preload": list(impl.preload)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=dict(os.environ, FASTOPT_ISOLATED_SPEC=json.dumps(spec)), text=True)

    def read(self):
        for line in self.proc.stdout:
            if line.startswith(_TAG):
                return json.loads(line[len(_TAG):])
        code = self.proc.wait()
        raise RuntimeError(f"benchmark worker {self.name!r} exited with code {code} "
                           "before answering (its error is printed above)")

    def ask(self, msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": 1}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def time_isolated(impls: dict, rounds=5, block_s=0.2, pause_s=0.3) -> dict:
    """Minimum over ``rounds`` of the mean seconds per call of each
    implementation (``{name: Impl}``), each in its own process.

    Workers start and warm up one at a time, then each round asks every
    worker in turn for a block of calls lasting about ``block_s``, with
    ``pause_s`` of quiet before each block.
    """
    workers = {}
    try:
        for name, impl in impls.items():
            workers[name] = w = _Worker(name, impl)
            w.read()                                   # ready: built and warmed up
        best = dict.fromkeys(impls, float("inf"))
        for _ in range(rounds):
            for name, w in workers.items():
                time.sleep(pause_s)
                best[name] = min(best[name], w.ask({"block_s": block_s})["seconds"])
        return best
    finally:
        for w in workers.values():
            w.close()
