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


def test_cuda_backend_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/cuda_sim", "-q", "-p", "no:cacheprovider",
         "-p", "no:randomly"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    last = out.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", last)
    assert passed and int(passed.group(1)) >= 30, out[-2000:]
    # only the real-GPU torch interop test may skip under the simulator
    skipped = re.search(r"(\d+) skipped", last)
    assert not skipped or int(skipped.group(1)) <= 1, out[-2000:]
