"""Run the CUDA backend tests (tests/cuda_sim) under the CUDA simulator.

``NUMBA_ENABLE_CUDASIM=1`` must be set before numba is imported, so the
folder runs in its own pytest process. Needs the ``cuda`` extra
(numba-cuda); skips cleanly without it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                                reason="numba-cuda not installed (pip install 'fastopt[cuda]')")


def run_under_simulator(*pytest_args, timeout=900):
    """``pytest *pytest_args`` in a subprocess with ``NUMBA_ENABLE_CUDASIM=1``
    (it must be set before numba is imported), which must pass: ``(its
    output, the count of each outcome of its summary line)``. The timeout
    turns a hang into a failure; the suite alone takes about 280 s on a
    2-core VM, and more beside other work."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *pytest_args, "-q", "-p", "no:cacheprovider",
         "-p", "no:randomly"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    last = out.strip().splitlines()[-1]
    return out, {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last)}


def test_cuda_backend_under_the_simulator():
    out, counts = run_under_simulator("tests/cuda_sim")
    assert counts.get("passed", 0) >= 30, out[-2000:]
    # only the real-GPU torch interop test may skip under the simulator
    assert counts.get("skipped", 0) <= 1, out[-2000:]
