"""What the measuring machine has: torch, a GPU, the BLAS and OpenMP thread
pools, and the description every report carries.

The other modules call these through the module (``machine.torch_or_none()``),
so a test can stand in for a machine without torch or a GPU by patching one
name here.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess

import numpy as np

import fastopt
from fastopt._cpuinfo import cpuinfo_field


def torch_or_none():
    """The torch module, or None when it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def gpu_name():
    """The GPU's name, or None when this machine has none (checked without
    initialising CUDA in this process when torch is absent)."""
    if not (os.path.exists("/proc/driver/nvidia") or shutil.which("nvidia-smi")):
        return None       # no NVIDIA driver: skip importing torch just to ask
    torch = torch_or_none()
    if torch is not None:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True)
        names = out.stdout.strip().splitlines()
        return names[0] if out.returncode == 0 and names else None
    return None


def thread_pools():
    """threadpoolctl's view of the loaded BLAS and OpenMP libraries (library,
    version, threads, threading layer and the kernel architecture OpenBLAS
    picked), or None without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    keys = ("user_api", "internal_api", "prefix", "version", "num_threads",
            "threading_layer", "architecture")
    return [dict({k: i.get(k) for k in keys if i.get(k) is not None},
                 file=os.path.basename(i.get("filepath") or ""))
            for i in threadpool_info()]


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."):
    platform.processor() is empty on Linux, and ratios mean little without
    knowing the host (the shipped floors name theirs)."""
    return cpuinfo_field("model name") or platform.processor()


def _version(module) -> str:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_entry(started, options) -> dict:
    """The ``run`` entry of a report: when it started (UTC, ISO 8601), the
    command's options, and the fastopt commit where it runs from a git
    checkout (None elsewhere; "+dirty" with uncommitted changes): what a
    dashboard plots runs against."""
    return {"started": started, "options": dict(options), "fastopt": fastopt.__version__,
            "commit": _commit()}


def _commit():
    """fastopt's own commit: the package folder's parent must be the top of
    the git checkout (a wheel installed inside a user's repository would
    report theirs)."""
    import subprocess
    here = os.path.dirname(os.path.abspath(fastopt.__file__))

    def git(*args):
        return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                              timeout=5)
    try:
        top = git("rev-parse", "--show-toplevel", "HEAD")
        if top.returncode != 0:
            return None
        root, head = top.stdout.splitlines()[:2]
        if not os.path.samefile(root, os.path.dirname(here)):
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", here)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty.stdout.strip() else "")


def describe():
    """The ``machine`` entry of a ``fastopt bench`` report: platform, CPUs,
    library versions, the GPU, thread counts and fastopt's backends."""
    torch = torch_or_none()
    return {"platform": platform.platform(), "processor": cpu_model(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "numba": _version("numba"),
            "torch": torch.__version__ if torch else "not installed",
            "gpu": gpu_name() or "no GPU",
            "fastopt": fastopt.__version__,
            "fastopt_threads": fastopt.get_num_threads(),
            "torch_threads": torch.get_num_threads() if torch else None,
            "backends": fastopt.backend_info()}
