"""How long idle OpenMP worker threads busy-wait: a short spin for fastopt's own.

fastopt's threaded kernels (Numba's ``omp`` threading layer and the Cython
extension) run on GNU OpenMP. After a parallel region, libgomp's workers
spin for ``GOMP_SPINCOUNT`` iterations (300,000 by default, milliseconds
here) before they sleep. In a training loop the optimizer step alternates
with BLAS matmuls, whose worker threads then find the cores taken by
spinning OpenMP threads: on this 2-core machine a 784-256-256-10 MLP step
(2 ms of matmuls, 0.07 ms of AdamW) took 8 ms instead of 2.1 ms. With a
short spin back-to-back optimizer steps are as fast as before (measured at
1k-16M elements) and BLAS gets the cores. How short: the step took 2.0-2.1 ms
at 1,000-5,000 iterations, 2.2-2.7 ms at 10,000, 3.1 ms at 30,000. But a
library that shares this libgomp (torch does when fastopt's kernels load
first: its libgomp has the same soname) pays for wake-ups below ~3,000:
torch's fused AdamW on 1k elements took 57-67 us at 1,000-2,000 against 31
us at its default. 5,000 keeps both (measured 2.1 ms and 32-40 us).

libgomp reads the variable once, when it is loaded. So the variable is set
only while fastopt loads its OpenMP code (:func:`short_spin`) and removed
right after: a library that loads its own libgomp copy later reads its own
default (with 1,000 left in the environment, torch's fused AdamW ran 3-4x
slower).
A value the user set (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``) is left
alone, and a libgomp that was loaded before fastopt's keeps what it read
then. That includes torch's bundled copy: it has the same soname, so when
torch is imported first, fastopt's kernels run on torch's libgomp, at its
default spin. Its workers then busy-wait about 8 ms after each parallel
region (0.7 ms at fastopt's setting, measured here). Inside a NumPy
training loop that made a threaded MLP step take 2.9 ms against 0.18 ms
(medians): the spinning worker is preempted by OpenBLAS's threads and
waits out their time slice. The serial/threaded choice (:mod:`fastopt.backends.threads`)
keeps such a loop serial. To avoid the case, ``import fastopt`` loads
libgomp at once (:func:`preload`), so that torch imported after it shares
that copy. :func:`fastopt.backend_info` reports which case applies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

SPINCOUNT = "5000"
_USER_VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
_decided = {}        # filled by the first load: what applies in this process


def _loaded_libgomps() -> list:
    """The paths of the copies of ``libgomp.so*`` mapped into this process
    (the soname our extension and Numba link; a wheel's renamed copy, such
    as ``libgomp-<hash>.so.1``, is another library). None where there is no
    /proc/self/maps to read."""
    try:
        with open("/proc/self/maps") as f:
            paths = [line.split()[-1] for line in f]
    except OSError:          # not Linux: nothing to check
        return []
    return list(dict.fromkeys(p for p in paths if p.rsplit("/", 1)[-1].startswith("libgomp.so")))


@contextlib.contextmanager
def short_spin():
    """Run a block that may load libgomp with ``GOMP_SPINCOUNT`` set to
    :data:`SPINCOUNT` (unless the user chose), then restore the environment
    and record which libgomp the block ended up with."""
    if _decided:                              # decided at the first load
        yield
        return
    user = {v: os.environ[v] for v in _USER_VARS if v in os.environ}
    if user:
        _decided.update(user, set_by="user")
        yield
        return
    before = _loaded_libgomps()
    os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
    try:
        yield
    finally:
        os.environ.pop("GOMP_SPINCOUNT", None)
        after = _loaded_libgomps()
        if not before or [p for p in after if p not in before]:
            _decided.update(GOMP_SPINCOUNT=SPINCOUNT, set_by="fastopt")
        else:     # a copy with the same soname was there already: the block uses it
            torch = [p for p in before if "/torch/" in p]
            path = (torch or before)[0]
            _decided.update(
                set_by=("default (torch's libgomp was loaded before fastopt's kernels: "
                        "import fastopt before torch, or set GOMP_SPINCOUNT)" if torch else
                        "default (libgomp was loaded before fastopt's kernels)"),
                libgomp=path)


def preload():
    """Load libgomp now, with the short spin, if nothing has loaded one yet.

    ``import fastopt`` calls this (a ``dlopen`` of about a millisecond; no
    thread starts). torch imported afterwards then finds a libgomp with the
    soname it needs and uses it, instead of loading its bundled copy at the
    default spin: after ``import fastopt, torch`` both run at the short spin.
    Nothing can change a libgomp that was loaded before (``import torch``
    first); :func:`wait_policy` says so.

    libgomp reads all of its environment when it loads, so from ``import
    fastopt`` on, ``OMP_NUM_THREADS`` and the other OpenMP variables set
    later in the process have no effect on it (torch's OpenMP included).
    ``FASTOPT_PRELOAD_OPENMP=0`` turns the preload off: libgomp then loads
    with fastopt's first threaded kernel, as before."""
    if (_decided or not sys.platform.startswith("linux")
            or os.environ.get("FASTOPT_PRELOAD_OPENMP", "1") == "0" or _loaded_libgomps()):
        return
    try:
        with short_spin():
            ctypes.CDLL("libgomp.so.1")
    except OSError:          # no system libgomp: the kernels' own load decides
        _decided.clear()


# -- fork --------------------------------------------------------------------------
# GNU OpenMP is not fork-safe: a child of a process that has run a parallel
# region hangs (the Cython kernels) or is killed by Numba ("fork() called from
# a process already using GNU OpenMP") at its first parallel region, because
# the parent's worker threads do not exist in the child. NumPy's OpenBLAS
# handles the same problem with pthread_atfork. Here a forked child (os.fork,
# multiprocessing's "fork" start method) steps with serial kernels: every
# threaded backend is set to one thread, which runs no OpenMP region at all.
# Processes started with "spawn" or "forkserver" are new and thread as usual.

_in_forked_child = False
_at_fork_hooks = []      # backends' "one thread from now on" setters


def env_threads():
    """``OMP_NUM_THREADS``'s first value where it is a positive int (``"4"``,
    ``"4,2"``), else None: the Cython team's default, read here rather than
    from the OpenMP runtime, whose count Numba's threading layer resets when
    it starts (the team then took 2 threads with ``OMP_NUM_THREADS=1``
    where anything had loaded Numba first)."""
    text = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def in_forked_child() -> bool:
    """Whether this process is a fork of one that may have run OpenMP."""
    return _in_forked_child


def on_fork_serial(setter):
    """Register ``setter(1)`` to run in every forked child."""
    _at_fork_hooks.append(setter)


def _after_fork_in_child():
    global _in_forked_child
    _in_forked_child = True
    for setter in _at_fork_hooks:
        setter(1)


if hasattr(os, "register_at_fork"):       # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def start_numba_threads():
    """Start Numba's thread pool now, inside :func:`short_spin` (it loads
    libgomp for the ``omp`` layer); later parallel calls reuse it. Not in a
    forked child: it steps serially (see above)."""
    if _in_forked_child:
        return
    with short_spin():
        from numba.np.ufunc.parallel import _launch_threads
        _launch_threads()


def wait_policy() -> dict:
    """What the OpenMP wait setting of fastopt's kernels is, and who chose it."""
    return dict(_decided) if _decided else {"set_by": "not loaded yet"}
