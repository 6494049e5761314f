"""Same-run measurements of the optimizer step: ``fastopt bench``, the asv
suite and the CI regression guard all measure through this module.

Every number is a comparison taken in one process on one machine: fastopt's
backends, a straightforward NumPy step, PyTorch's fused, foreach and
for-loop optimizers (when torch is installed) and a *streaming kernel* that
moves the same bytes as the step with trivial arithmetic, i.e. the memory
roofline for that step. Report ratios, not absolute times: on a small
shared machine absolute times drift from run to run.

Timing: each implementation is warmed up first (so Numba compilation stays
out), then timed in blocks of calls long enough to dwarf timer overhead;
the reported time is the minimum block mean over several interleaved
rounds, the usual estimator of what the code can do on a noisy machine.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

import fastopt

from . import baselines as bench_numpy


class Kind(NamedTuple):
    """An optimizer as the benchmarks run it: one entry of :data:`KIND`."""

    label: str          # how case names call it ("sgd nesterov 1 x 16M")
    optimizer: str      # the class in fastopt and in torch.optim
    hypers: dict        # given alike to fastopt, torch and the NumPy step
    numpy_step: object  # the NumPy step a user writes (fastopt.bench_numpy)
    # memory passes of one step over each element: (arrays read, arrays
    # written) of the parameter dtype; the roofline streams the same
    passes: tuple
    in_torch: bool = True   # False: torch.optim has no such class


def _one_pass(state):
    """A fused single-pass step with ``state`` buffers: reads p, g and the
    state, writes p and the state (AdamW: 4 read, 3 written)."""
    return ((2 + state, 1 + state),)


#: Every optimizer the benchmarks know, by kind. The hyperparameters are
#: torch's defaults (LAMB: fastopt's) except where a benchmark needs the
#: common setting (AdamW's, Lion's and LAMB's weight decay, SGD's Nesterov
#: momentum).
KIND = {
    "adamw": Kind("adamw", "AdamW", dict(lr=1e-3, weight_decay=1e-2),
                  bench_numpy.adamw, _one_pass(2)),
    "sgd": Kind("sgd nesterov", "SGD", dict(lr=1e-2, momentum=0.9, nesterov=True),
                bench_numpy.sgd, _one_pass(1)),
    "rmsprop": Kind("rmsprop", "RMSprop", dict(lr=1e-2), bench_numpy.rmsprop, _one_pass(1)),
    "rmsprop-centered": Kind("rmsprop centered", "RMSprop", dict(lr=1e-2, centered=True),
                             bench_numpy.rmsprop, _one_pass(2)),
    "adagrad": Kind("adagrad", "Adagrad", dict(lr=1e-2), bench_numpy.adagrad, _one_pass(1)),
    "adamax": Kind("adamax", "Adamax", dict(lr=2e-3), bench_numpy.adamax, _one_pass(2)),
    "nadam": Kind("nadam", "NAdam", dict(lr=2e-3), bench_numpy.nadam, _one_pass(2)),
    "radam": Kind("radam", "RAdam", dict(lr=1e-3), bench_numpy.radam, _one_pass(2)),
    "lion": Kind("lion", "Lion", dict(lr=1e-4, weight_decay=1e-2), bench_numpy.lion,
                 _one_pass(1), in_torch=False),
    # two passes: the moments (and each array's ||p||^2, ||r||^2), then the
    # weights, recomputing r from p, m, v
    "lamb": Kind("lamb", "LAMB", dict(lr=1e-3, weight_decay=1e-2), bench_numpy.lamb,
                 ((4, 2), (3, 1)), in_torch=False),
}
KINDS = tuple(KIND)
#: the optimizers beyond the original two (AdamW, SGD), each measured on
#: :func:`family_rows` (``fastopt bench --optimizers``)
FAMILY = tuple(k for k in KINDS if k not in ("adamw", "sgd"))
# Arrays of the parameter dtype each step moves per element (AdamW 7, SGD 5).
ARRAYS_MOVED = {k: sum(r + w for r, w in spec.passes) for k, spec in KIND.items()}
HYPERS = {k: spec.hypers for k, spec in KIND.items()}

CPU_BACKENDS = ("numba", "cython")
BASELINES = ("roofline", "numpy", "torch-fused", "torch-foreach", "torch-forloop")
GPU_IMPLS = ("cuda", "torch-cuda")


def step_bytes(kind, n, dtype, clip=False):
    """Bytes one step moves through memory (the roofline's byte count)."""
    return (ARRAYS_MOVED[kind] + (1 if clip else 0)) * n * np.dtype(dtype).itemsize


def torch_or_none():
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


# -- the roofline ------------------------------------------------------------

_STREAM = {}


def _stream_kernels():
    """Numba kernels that move a step's bytes with no real math, keyed
    ``rw<read>_<written>`` by the arrays each reads and writes (``rw4_3``:
    AdamW's traffic, ``rw3_2``: SGD with momentum's), and ``read1``, one read
    pass like a norm. ``*_serial``: the same loops on one thread (up to
    ``SERIAL_MAX`` elements a thread launch costs more than the loop, which
    is why fastopt's kernels run serially there too)."""
    if not _STREAM:
        from numba import njit, prange

        from .._openmp import start_numba_threads
        start_numba_threads()     # the same thread pool (and spin) as fastopt's kernels

        def rw4_3(p, g, m, v):
            for i in prange(p.size):
                gi = g[i]
                p[i] += gi
                m[i] += gi
                v[i] += gi

        def rw3_2(p, g, b):
            for i in prange(p.size):
                gi = g[i]
                p[i] += gi
                b[i] += gi

        def rw4_2(p, g, m, v):   # a first pass that updates the state only
            for i in prange(p.size):
                gi = g[i]
                m[i] += gi
                v[i] += gi + p[i]

        def rw3_1(p, m, v):      # a second pass that writes the weights
            for i in prange(p.size):
                p[i] += m[i] + v[i]

        def read1(g):  # fastmath: a vectorised sum
            acc = 0.0
            for i in prange(g.size):
                acc += g[i]
            return acc

        # Only the threaded kernels are cached: Numba's on-disk cache is keyed
        # by the Python function, so a serial twin compiled from the same
        # function would share (and could load) the threaded one's entry.
        for parallel, suffix in ((True, ""), (False, "_serial")):
            jit = dict(parallel=parallel, cache=parallel)
            for fn in (rw4_3, rw3_2, rw4_2, rw3_1):
                _STREAM[fn.__name__ + suffix] = njit(**jit)(fn)
            _STREAM["read1" + suffix] = njit(**jit, fastmath=True)(read1)
    return _STREAM


SERIAL_MAX = 1 << 15   # fastopt's kernels (numba_cpu, Cython) run serially up to this size


# -- implementations -----------------------------------------------------------

def _rand(shape_or_n, dtype, seed):
    # generated in the target dtype: 16M float64 normals cast down would take
    # longer than the steps they feed
    return np.random.default_rng(seed).standard_normal(shape_or_n, dtype=np.dtype(dtype))


def _numpy_step(kind, shapes, dt, clip):
    ps = [_rand(s, dt, 1) for s in shapes]
    gs = [_rand(s, dt, 2) for s in shapes]
    states = [{} for _ in shapes]
    spec = KIND[kind]
    count = {"t": 0}

    def step():
        count["t"] += 1
        grads = gs
        if clip:
            norm = np.sqrt(sum(float(np.dot(x.ravel(), x.ravel())) for x in gs))
            c = min(1.0, 1.0 / (norm + 1e-6))
            grads = [x * c for x in gs]
        for p, g, st in zip(ps, grads, states):
            spec.numpy_step(p, g, st, count["t"], **spec.hypers)
    return step


#: how fastopt gets the arrays: ``packed`` (one buffer, FlatArrays grads) or
#: ``list`` (separate arrays, and a new list of new gradient arrays every
#: step, as NumPy backprop code makes them)
LAYOUTS = ("packed", "list")
_FRESH = 3     # gradient lists a list-layout step cycles through


def _fastopt_step(kind, shapes, dt, clip, backend, layout="packed"):
    n = sum(int(np.prod(s)) for s in shapes)
    cls = getattr(fastopt, KIND[kind].optimizer)
    hyper = dict(backend=backend, max_grad_norm=1.0 if clip else None, **HYPERS[kind])
    if layout == "list":
        opt = cls([_rand(s, dt, 1) for s in shapes], **hyper)
        fresh = itertools.cycle([[_rand(s, dt, 2 + i) for s in shapes]
                                 for i in range(_FRESH)]).__next__
        return lambda: opt.step(fresh())
    params = fastopt.pack([_rand(s, dt, 1) for s in shapes])
    grads = params.zeros_like()
    grads.data[:] = _rand(n, dt, 2)
    opt = cls(params, **hyper)
    return lambda: opt.step(grads)


def _roofline_step(kind, shapes, dt, clip):
    """The step's memory passes (:attr:`Kind.passes`) as streaming kernels
    over arrays of its size (one pool: a later pass reads what an earlier
    one wrote, as the step's passes do), after one read of g to clip."""
    n = sum(int(np.prod(s)) for s in shapes)
    k = _stream_kernels()
    suffix = "_serial" if n <= SERIAL_MAX else ""
    passes = KIND[kind].passes
    arrays = [_rand(n, dt, s) for s in range(max(r for r, _ in passes))]   # p, g, state
    kernels = [(k[f"rw{r}_{w}{suffix}"], arrays[:r]) for r, w in passes]
    if clip:
        kernels.insert(0, (k["read1" + suffix], arrays[1:2]))

    def step():
        for kernel, args in kernels:
            kernel(*args)
    if len(kernels) > 1:
        return step
    kernel, args = kernels[0]     # no loop around the one call: it times 1-element steps
    return lambda: kernel(*args)


TORCH_VARIANTS = {"fused": dict(fused=True), "foreach": dict(foreach=True),
                  "forloop": dict(foreach=False)}


def _torch_step(kind, shapes, dt, clip, variant):
    torch = torch_or_none()
    if torch is None:
        return None, "torch not installed"
    spec = KIND[kind]
    if not spec.in_torch:
        return None, f"torch.optim has no {spec.optimizer}: numpy is its baseline"
    cls = getattr(torch.optim, spec.optimizer)
    flag = TORCH_VARIANTS[variant]
    if next(iter(flag)) not in inspect.signature(cls).parameters:
        return None, f"torch.optim.{spec.optimizer} has no {variant} path"
    tps = [torch.from_numpy(_rand(s, dt, 1)) for s in shapes]
    for tp in tps:
        tp.grad = torch.from_numpy(_rand(tp.shape, dt, 2))
    try:
        topt = cls(tps, **spec.hypers, **flag)
    except (RuntimeError, TypeError, ValueError) as e:   # variant not in this torch
        return None, f"torch {torch.__version__}: {e}"
    if not clip:
        return topt.step, ""

    def step():
        torch.nn.utils.clip_grad_norm_(tps, 1.0, foreach=variant != "forloop")
        topt.step()
    return step, ""


def make_step(impl, kind, shapes, dtype="float32", clip=False, layout="packed"):
    """A zero-argument callable doing one step of ``impl``, and a note.

    ``impl`` is a fastopt backend name, ``"roofline"``, ``"numpy"``,
    ``"torch-fused"``, ``"torch-foreach"`` or ``"torch-forloop"``; ``kind``
    one of :data:`KINDS` (the optimizer and its hyperparameters, see
    :data:`KIND`); ``shapes`` the tensors; ``layout`` how fastopt holds
    them (see :data:`LAYOUTS`; the baselines always take separate arrays).
    The callable is None when the implementation cannot run here (no torch,
    a torch path or optimizer torch lacks, no GPU), and the note says why.
    """
    if kind not in KIND:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    dt = np.dtype(dtype)
    if impl == "roofline":
        return _roofline_step(kind, shapes, dt, clip), "streaming kernel, same bytes"
    if impl == "numpy":
        return _numpy_step(kind, shapes, dt, clip), "straightforward NumPy"
    if impl.startswith("torch-") and impl != "torch-cuda":
        return _torch_step(kind, shapes, dt, clip, impl.split("-", 1)[1])
    if impl in GPU_IMPLS:
        gpu = gpu_name()
        if gpu is None:
            return None, "no GPU"
        return None, f"{gpu}: GPU runs are recorded by the CUDA issue's script"
    if impl in fastopt.available_backends():
        return _fastopt_step(kind, shapes, dt, clip, impl, layout), ""
    return None, f"backend {impl!r} not available"


# -- timing ------------------------------------------------------------------

def time_all(fns, rounds, min_block=0.02, medians=None):
    """Minimum mean seconds per call of each function (and, into the dict
    ``medians`` when given, the median over the rounds: with the minimum,
    the spread of the repeats).

    Rounds are interleaved (every implementation once per round) so that a
    slow spell of a shared machine hits all of them alike and the same-run
    ratios stay meaningful.
    """
    calls = {}
    for name, fn in fns.items():
        fn()                                 # warm up: compile, fault pages in
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(min_block / max(time.perf_counter() - t0, 1e-7)))
    seen = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            seen[name].append((time.perf_counter() - t0) / calls[name])
    if medians is not None:
        medians.update({name: float(np.median(v)) for name, v in seen.items()})
    return {name: min(v) for name, v in seen.items()}


@dataclass
class Result:
    case: str
    impl: str
    kind: str
    elements: int
    tensors: int
    dtype: str
    seconds: float | None            # per step; None when not run
    bytes_per_step: int
    note: str = ""
    layout: str = "packed"
    median_seconds: float | None = None   # median over the rounds (seconds: the minimum)

    @property
    def gbps(self):
        return self.bytes_per_step / self.seconds / 1e9 if self.seconds else None


def compare(case, kind, shapes, dtype="float32", clip=False, impls=None, rounds=4,
            layout="packed"):
    """Time ``impls`` (default: every CPU backend and baseline) on one case,
    interleaved; one :class:`Result` per implementation."""
    impls = impls or (*CPU_BACKENDS, *BASELINES)
    n = sum(int(np.prod(s)) for s in shapes)
    built = {impl: make_step(impl, kind, shapes, dtype, clip, layout) for impl in impls}
    medians = {}
    times = time_all({k: fn for k, (fn, _) in built.items() if fn is not None}, rounds,
                     medians=medians)
    nbytes = step_bytes(kind, n, dtype, clip)
    return [Result(case, impl, kind, n, len(shapes), np.dtype(dtype).name,
                   times.get(impl), nbytes, note, layout, medians.get(impl))
            for impl, (_, note) in built.items()]


TORCH_PATHS = ("torch-fused", "torch-foreach", "torch-forloop")


def fastest_torch(results):
    """``(impl, seconds)`` of torch's fastest path in this case, or ``(None, None)``."""
    timed = [(r.seconds, r.impl) for r in results if r.impl in TORCH_PATHS and r.seconds]
    return (min(timed)[1], min(timed)[0]) if timed else (None, None)


def speedups(results):
    """Ratios within each case, keyed by impl: ``roofline`` (fraction of the
    streaming kernel's speed), ``numpy``, ``torch`` (fused) and
    ``torch_best`` (torch's fastest path in this case, whichever it was)
    speedups."""
    by_impl = {r.impl: r.seconds for r in results}
    best_impl, best = fastest_torch(results)
    out = {}
    for r in results:
        s = r.seconds
        out[r.impl] = {
            name: (by_impl[ref] / s if s and by_impl.get(ref) else None)
            for name, ref in (("roofline", "roofline"), ("numpy", "numpy"),
                              ("torch", "torch-fused"))}
        out[r.impl]["torch_best"] = best / s if s and best else None
        out[r.impl]["torch_best_impl"] = best_impl
    return out


# -- the `fastopt bench` matrix -------------------------------------------------

SWEEP_CASE = "adamw sweep"


MLP_SHAPES = [(784, 256), (256,), (256, 256), (256,), (256, 10), (10,)]


class Row(NamedTuple):
    """One case of the matrix: its name and what it measures."""

    case: str
    kind: str                 # a key of KIND
    shapes: list              # the tensors
    dtype: str = "float32"
    clip: bool = False        # max_grad_norm=1 (fastopt) / clip_grad_norm_ (torch)
    layout: str = "packed"    # see LAYOUTS


def family_rows(kind):
    """The two workloads every optimizer is measured on, defined once for
    ``fastopt bench``, the asv suite and the CI guard:

    * ``"<label> 1 x 16M"``: one array of 16M float32 elements, far beyond
      the caches: the step is memory-bound, read it against the roofline
      (the streaming kernel moving the same bytes, same run);
    * ``"list <label> 1000 x 1k"``: 1000 arrays of 1000 as a plain list,
      new gradient arrays every step: the per-array overhead, read it
      against torch's fastest path (for an optimizer torch lacks, against
      the NumPy step).
    """
    label = KIND[kind].label
    return [Row(f"{label} 1 x 16M", kind, [(1 << 24,)]),
            Row(f"list {label} 1000 x 1k", kind, [(1000,)] * 1000, layout="list")]


def parse_optimizers(text):
    """The kinds a ``--optimizers`` value names: a comma-separated list of
    :data:`KINDS`, ``"family"`` (:data:`FAMILY`) or ``"all"``."""
    kinds = []
    for name in (s.strip() for s in text.split(",")):
        if name in ("all", "family"):
            kinds += KINDS if name == "all" else FAMILY
        elif name in KIND:
            kinds.append(name)
        else:
            raise ValueError(f"unknown optimizer {name!r}: use {', '.join(KINDS)}, "
                             "'family' or 'all', comma-separated")
    return tuple(dict.fromkeys(kinds))


def plan(full=False, optimizers=None):
    """:class:`Row` s of the standard matrix, or with ``optimizers`` (kinds)
    only the :func:`family_rows` of those."""
    if optimizers:
        return [row for kind in optimizers for row in family_rows(kind)]
    sizes = ([1 << 10, 1 << 13, 1 << 16, 1 << 19, 1 << 22, 1 << 24, 1 << 26] if full
             else [1 << 10, 1 << 15, 1 << 20, 1 << 24])
    rows = [Row(SWEEP_CASE, "adamw", [(n,)]) for n in sizes]
    rows += [
        Row("adamw 1000 x 1k", "adamw", [(1000,)] * 1000),
        Row("clip+adamw 200 x 5k", "adamw", [(5000,)] * 200, clip=True),
        family_rows("sgd")[0],
    ]
    # Plain lists, as NumPy code holds them: separate arrays, new gradient
    # arrays every step.
    rows += [
        family_rows("adamw")[1],
        Row("list clip+adamw 200 x 5k", "adamw", [(5000,)] * 200, clip=True, layout="list"),
        Row("list adamw 10 x 1k", "adamw", [(1000,)] * 10, layout="list"),
        Row("list adamw mlp", "adamw", MLP_SHAPES, layout="list"),
        Row("list adamw 1 x 1", "adamw", [(1,)], layout="list"),
        Row("list adamw 1 x 16M", "adamw", [(1 << 24,)], layout="list"),
    ]
    if full:
        rows += [Row("adamw float64 1 x 16M", "adamw", [(1 << 24,)], "float64"),
                 Row("sgd nesterov 1000 x 1k", "sgd", [(1000,)] * 1000),
                 Row("list adamw float64 1000 x 1k", "adamw", [(1000,)] * 1000, "float64",
                     layout="list")]
    return rows


def workloads():
    """Every named case, by name: the standard matrix's (the sweep aside)
    and each optimizer's :func:`family_rows`. The asv suite and the CI
    guard's floors name their cases from here."""
    rows = [r for r in plan(full=True) if r.case != SWEEP_CASE]
    rows += [r for kind in KINDS for r in family_rows(kind)]
    return {r.case: r for r in rows}


def run(full=False, progress=None, rows=None, cold=True):
    """Run the matrix; returns a JSON-able report (results and metadata)."""
    rounds = 7 if full else 4
    rows = plan(full) if rows is None else rows
    since = load_snapshot()
    impls = (*CPU_BACKENDS, *BASELINES, *GPU_IMPLS)
    results = []
    total = len(rows) + (1 if cold else 0)
    for i, (case, kind, shapes, dtype, clip, *layout) in enumerate(rows):
        if progress:
            progress(i, total, f"{case} {sum(int(np.prod(s)) for s in shapes)}")
        res = compare(case, kind, shapes, dtype, clip, impls, rounds, *layout)
        ratio = speedups(res)
        results += [dict(asdict(r), gbps=r.gbps, **{f"vs_{k}": v for k, v in
                                                    ratio[r.impl].items()})
                    for r in res]
    load = load_since(since)    # before the cold starts: their processes are ours
    cold_starts = {}
    if cold:
        if progress:
            progress(len(rows), total, "cold start")
        cold_starts = {be: cold_start(be) for be in CPU_BACKENDS
                       if be in fastopt.available_backends()}
    if progress:
        progress(total, total, "done")
    torch = torch_or_none()
    return {
        "load": load,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__,
                    "torch": torch.__version__ if torch else "not installed",
                    "gpu": gpu_name() or "no GPU",
                    "fastopt": fastopt.__version__,
                    "fastopt_threads": fastopt.get_num_threads(),
                    "torch_threads": torch.get_num_threads() if torch else None,
                    "backends": fastopt.backend_info()},
        "results": results,
        "cold_start": cold_starts,
    }


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


# -- report -----------------------------------------------------------------------

def format_table(report) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    def t(s):
        if s is None:
            return "-"
        return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"

    width = max([26] + [len(r["case"]) for r in report["results"]])
    head = (f"{'case':<{width}} {'impl':<13} {'elements':>10} {'time':>10} {'spread':>6} "
            f"{'GB/s':>7} {'%roof':>6} {'vs numpy':>9} {'vs torch':>9} {'vs best':>8}  note")
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        roof = r["vs_roofline"]
        best = r.get("vs_torch_best")
        note = r["note"]
        if r["impl"] not in TORCH_PATHS and r["seconds"]:
            spec = KIND.get(r.get("kind"))
            peer = (f"best torch: {r.get('vs_torch_best_impl')}" if best is not None else
                    f"no torch {spec.optimizer}: its baseline is numpy"
                    if spec and not spec.in_torch and r["impl"] in CPU_BACKENDS else "")
            note = "; ".join(x for x in (peer, note) if x)
        med = r.get("median_seconds")
        spread = med / r["seconds"] if med and r["seconds"] else None
        lines.append(
            f"{r['case']:<{width}} {r['impl']:<13} {r['elements']:>10} {t(r['seconds']):>10} "
            f"{f(spread, '.2f'):>6} {f(r['gbps'], '.1f'):>7} {f(roof and 100 * roof, '.0f'):>6} "
            f"{f(r['vs_numpy'], '.2f'):>9} {f(r['vs_torch'], '.2f'):>9} "
            f"{f(best, '.2f'):>8}  {note}")
    lines.append("")
    lines.append("%roof = streaming kernel moving the same bytes / this time; "
                 "vs torch = torch.optim.<opt>(fused=True) time / this time; "
                 "vs best = torch's fastest path in the same case (fused, foreach or "
                 "for-loop) / this time; 'list' cases: separate arrays and new gradient "
                 "arrays every step; time = the fastest round's mean, spread = median round "
                 "/ fastest round")
    kinds = [k for k in KIND if any(r.get("kind") == k for r in report["results"])]
    lines.append("bytes per element and step (what GB/s and the roofline count): " + ", ".join(
        f"{k} {step_bytes(k, 1, 'float32')}" for k in kinds) + " (float32; +4 with clipping)")
    for be, c in report.get("cold_start", {}).items():
        cold, warm = c["cold"]["to_first_step"], c["warm"]["to_first_step"]
        lines.append(f"cold start ({be}): first AdamW step done {cold:.2f} s after start "
                     f"with Numba's cache cold, {warm:.2f} s warm" if be == "numba" else
                     f"cold start ({be}): first AdamW step done {warm:.2f} s after start "
                     "(compiled ahead of time)")
    m = report["machine"]
    lines.append(f"machine: {m['processor'] or m['platform']}, {m['cpus']} CPUs, "
                 f"torch {m['torch']}, GPU: {m['gpu']}; threads: fastopt "
                 f"{m.get('fastopt_threads')}, torch {m.get('torch_threads')}")
    load = report.get("load")
    if load:
        other = load["other_processes"]
        lines.append(f"load average {load['loadavg_before'][0]:.2f} before, "
                     f"{load['loadavg_after'][0]:.2f} after; {other['note']}")
        if other.get("other_cpu_fraction", 0) >= 0.02:
            lines.append("WARNING: another process used the CPUs during this run; threaded "
                         "steps (fastopt's and torch's) wait for descheduled threads, so "
                         "these ratios are not those of an idle machine: rerun when idle")
    return "\n".join(lines)


def save(report, path):
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


IMPL_STYLE = {   # colour, marker: fastopt solid, baselines dashed
    "numba": ("C0", "o", "-"), "cython": ("C1", "s", "-"),
    "numpy": ("C2", "^", "--"), "torch-fused": ("C3", "v", "--"),
    "torch-foreach": ("C4", "<", "--"), "torch-forloop": ("C5", ">", "--"),
}


def _plot_cases(ax, report):
    """The headline cases (everything but the sweep): each fastopt backend's
    speedup over torch's fastest path in that case (over NumPy for an
    optimizer torch lacks, said in the label), as horizontal bars."""
    cases = list(dict.fromkeys(r["case"] for r in report["results"]
                               if r["case"] != SWEEP_CASE))
    by = {(r["case"], r["impl"]): r for r in report["results"]}
    no_torch = {r["case"] for r in report["results"]
                if r.get("kind") in KIND and not KIND[r["kind"]].in_torch}
    backends = [b for b in CPU_BACKENDS if any((c, b) in by for c in cases)]
    height = 0.8 / max(len(backends), 1)
    for k, be in enumerate(backends):
        vals = [(by.get((c, be)) or {}).get("vs_numpy" if c in no_torch else "vs_torch_best")
                or 0.0 for c in cases]
        c, _, _ = IMPL_STYLE.get(be, ("C7", "x", "-"))
        ys = [i + k * height for i in range(len(cases))]
        ax.barh(ys, vals, height=height, color=c, label=be)
        for y, v in zip(ys, vals):
            if v:
                ax.text(v, y, f" {v:.1f}x", va="center", fontsize=7)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))])
    ax.set_yticklabels([f"{c} (vs numpy)" if c in no_torch else c for c in cases],
                       fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speedup over torch's fastest path (same run)")
    ax.set_title("headline cases ('list': new gradient arrays every step)")
    if cases:
        ax.legend(fontsize=8, loc="best")


def plot(report, path):
    """Throughput and time per step vs size, per implementation, with the
    same-run roofline drawn. Needs matplotlib; returns False without it."""
    from .._plotting import agg_pyplot
    plt = agg_pyplot()
    if plt is None:
        return False
    rows = [r for r in report["results"] if r["case"] == SWEEP_CASE and r["seconds"]]
    if not rows:       # no size sweep (--optimizers): the cases alone
        n_cases = len({r["case"] for r in report["results"]})
        fig, ax_cases = plt.subplots(figsize=(9, 1.5 + 0.35 * n_cases))
        _plot_cases(ax_cases, report)
        return _save_figure(fig, plt, report, path)
    fig, (ax_bw, ax_t, ax_cases) = plt.subplots(1, 3, figsize=(18, 4.8),
                                                gridspec_kw={"width_ratios": [1, 1, 1.2]})
    _plot_cases(ax_cases, report)
    series = {}
    for r in rows:
        series.setdefault(r["impl"], []).append((r["elements"], r["gbps"], r["seconds"]))
    for impl, pts in series.items():
        pts.sort()
        x = [p[0] for p in pts]
        if impl == "roofline":
            kw = dict(color="black", linestyle=":", linewidth=2.2,
                      label="roofline (streaming kernel, same bytes)")
        else:
            c, mk, ls = IMPL_STYLE.get(impl, ("C7", "x", "-"))
            kw = dict(color=c, marker=mk, linestyle=ls, label=impl)
        ax_bw.plot(x, [p[1] for p in pts], **kw)
        ax_t.plot(x, [p[2] * 1e6 for p in pts], **kw)
    for ax in (ax_bw, ax_t):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("parameters (float32, one tensor)")
        ax.grid(True, which="both", alpha=0.3)
    ax_bw.set_ylabel("effective GB/s (28 bytes per element)")
    ax_bw.set_title("AdamW step throughput")
    ax_t.set_yscale("log")
    ax_t.set_ylabel("time per step (us)")
    ax_t.set_title("AdamW step latency")
    ax_t.legend(fontsize=8)
    return _save_figure(fig, plt, report, path)


def _save_figure(fig, plt, report, path):
    m = report["machine"]
    fig.suptitle(f"fastopt {m.get('fastopt', '')} on {m['cpus']} CPUs "
                 f"({m['processor'] or m['platform']}); torch {m['torch']}; "
                 f"GPU: {m['gpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- mixed precision (issue #4) --------------------------------------------------
# Uses fastopt's public API, NumPy, torch and time_all above.

def mixed_precision_case(n=1 << 22, rounds=5, block=0.2, backends=None):
    """bf16 params + float32 master AdamW step vs torch's fused AdamW on bf16.

    Implementations, all AdamW with the same hyperparameters, ``n`` elements
    in one tensor:

    * ``fastopt-<backend> bf16+master``: bf16 params and grads, float32
      master weights and moments. One pass reads g (2 B), master, m, v
      (4 B each) and writes master, m, v (4 B each) and the rounded params
      (2 B): **28 bytes per element**, as many as a float32 step.
    * ``fastopt-<backend> float32``: the plain float32 step (28 B/element).
    * ``torch-fused bf16``: ``torch.optim.AdamW(fused=True)`` on bf16 params.
      torch keeps no master copy: params, m and v are all bf16 and updated in
      place, reading p, g, m, v (2 B each) and writing p, m, v (2 B each):
      **14 bytes per element**, with the update rounded to bf16 every step.
    * ``torch-fused float32``: the float32 fused step (28 B/element).

    Rounds are interleaved (every implementation once per round) and each
    time is the minimum over rounds of the mean over a block of calls, so a
    slow spell of a shared machine hits all alike; compare the ratios.
    Returns ``{"elements", "results": {impl: {"seconds", "bytes_per_element",
    "gbps", "vs_torch_fused_bf16"}}, "notes"}``.
    """
    import ml_dtypes

    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(n).astype(np.float32)
    g0 = rng.standard_normal(n).astype(np.float32) * np.float32(1e-2)
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    fns, nbytes, notes = {}, {}, {}
    for be in backends or [b for b in ("numba", "cython") if b in fastopt.available_backends()]:
        for dt, label in ((bf16, "bf16+master"), (np.dtype(np.float32), "float32")):
            p = fastopt.pack([w0.astype(dt)])
            g = p.zeros_like()
            g.data[:] = g0.astype(dt)
            opt = fastopt.AdamW(p, backend=be, **hyper)
            fns[f"fastopt-{be} {label}"] = (lambda o, gr: lambda: o.step(gr))(opt, g)
            nbytes[f"fastopt-{be} {label}"] = 28
    try:
        import torch
    except ImportError:
        torch = None
        notes["torch"] = "torch not installed"
    if torch is not None:
        for tdt, label, nb in ((torch.bfloat16, "bf16", 14), (torch.float32, "float32", 28)):
            tp = torch.from_numpy(w0.copy()).to(tdt)
            tp.grad = torch.from_numpy(g0.copy()).to(tdt)
            try:
                topt = torch.optim.AdamW([tp], fused=True, **hyper)
                topt.step()
            except (RuntimeError, TypeError, ValueError) as exc:
                notes[f"torch-fused {label}"] = f"not supported: {exc}"
                continue
            fns[f"torch-fused {label}"] = topt.step
            nbytes[f"torch-fused {label}"] = nb
        notes["torch_threads"] = torch.get_num_threads()
    notes["fastopt_threads"] = fastopt.get_num_threads()

    best = time_all(fns, rounds, min_block=block)
    ref = best.get("torch-fused bf16")
    results = {name: {"seconds": s, "bytes_per_element": nbytes[name],
                      "gbps": nbytes[name] * n / s / 1e9,
                      "vs_torch_fused_bf16": ref / s if ref else None}
               for name, s in best.items()}
    return {"elements": n, "results": results, "notes": notes}


# -- the step inside a training loop ------------------------------------------------
# Every figure above times the step hot: back to back, caches warm, nothing
# else running. In a NumPy training loop the step runs right after the
# forward/backward matmuls, which go through NumPy's BLAS (OpenBLAS: its
# threads spin a while after each call), and then the optimizer's own threads
# (OpenMP, or torch's) wake up and compete with them for the cores.
# ``in_loop_case`` times the step there, in a small MLP trained the way a
# NumPy user writes it, next to the same step hot.

IN_LOOP_IMPLS = ("cython", "numba", "numpy", "torch-fused")
IN_LOOP_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
               "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def mlp_init(sizes, seed=0):
    """Float32 weights of an MLP in a plain list ``[W0, b0, W1, b1, ...]``
    (He-initialised ``W`` of shape (in, out), zero biases)."""
    rng = np.random.default_rng(seed)
    ws = []
    for a, b in zip(sizes, sizes[1:]):
        ws.append((rng.standard_normal((a, b), dtype=np.float32)
                   * np.float32(np.sqrt(2.0 / a))))
        ws.append(np.zeros(b, np.float32))
    return ws


def mlp_data(sizes, batch, batches=4, seed=1):
    """``batches`` random mini-batches ``(X, y)``, generated once."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, sizes[0]), dtype=np.float32),
             rng.integers(0, sizes[-1], batch)) for _ in range(batches)]


def mlp_forward_backward(ws, X, y):
    """Loss and gradients of a ReLU MLP with softmax cross-entropy, written
    the way a NumPy user writes it: ``@`` matmuls through NumPy's BLAS and a
    new list of new gradient arrays, in the order of ``ws``."""
    n_layers = len(ws) // 2
    acts = [X]
    z = X
    for l in range(n_layers):
        z = acts[-1] @ ws[2 * l] + ws[2 * l + 1]
        if l < n_layers - 1:
            acts.append(np.maximum(z, 0))
    rows = np.arange(len(y))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    loss = float(np.mean(np.log(s[:, 0]) - z[rows, y]))
    d = e / s
    d[rows, y] -= 1
    d /= len(y)
    grads = [None] * len(ws)
    for l in range(n_layers - 1, -1, -1):
        grads[2 * l] = acts[l].T @ d
        grads[2 * l + 1] = d.sum(axis=0)
        if l:
            d = (d @ ws[2 * l].T) * (acts[l] > 0)
    return loss, grads


class NumpyAdam:
    """Adam written the obvious way in NumPy, one array at a time (state
    rebuilt as new arrays every step, temporaries and all)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        for i, (p, g) in enumerate(zip(self.params, grads)):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            m_hat = self.m[i] / (1 - b1 ** self.t)
            v_hat = self.v[i] / (1 - b2 ** self.t)
            p -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def _loop_optimizer(impl, ws, lr):
    """``(weights the model uses, step(grads))`` for ``impl`` on ``ws``, or
    ``(None, note)`` when it cannot run here. The step callable includes
    what a user must do to hand a fresh gradient list over: copy it into the
    FlatArrays (packed), set each tensor's ``.grad`` (torch)."""
    if impl == "numpy":
        return ws, NumpyAdam(ws, lr=lr).step
    if impl == "torch-fused":
        torch = torch_or_none()
        if torch is None:
            return None, "torch not installed"
        tps = [torch.from_numpy(w) for w in ws]        # shares the NumPy arrays
        try:
            topt = torch.optim.Adam(tps, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError) as e:
            return None, f"torch {torch.__version__}: {e}"
        from_numpy = torch.from_numpy

        def torch_step(grads):
            for t, g in zip(tps, grads):
                t.grad = from_numpy(g)
            topt.step()
        return ws, torch_step
    backend, packed = impl, False
    if impl.endswith("-packed"):
        backend, packed = impl[:-len("-packed")], True
    if backend not in fastopt.available_backends():
        return None, f"backend {backend!r} not available"
    if not packed:
        return ws, fastopt.Adam(ws, lr=lr, backend=backend).step
    flat = fastopt.pack(ws)
    gflat = flat.zeros_like()
    opt = fastopt.Adam(flat, lr=lr, backend=backend)

    def packed_step(grads):
        for dst, g in zip(gflat, grads):
            dst[...] = g
        opt.step(gflat)
    return list(flat), packed_step


class InLoopImpl:
    """One implementation in the training loop of :func:`in_loop_case`: a
    model trained with it (``train``) and a second copy whose optimizer
    steps back to back on one fixed gradient list (``hot``)."""

    def __init__(self, impl, sizes, batch, data=None, lr=1e-3, seed=0):
        self.impl = impl
        self.data = data if data is not None else mlp_data(sizes, batch)
        self.ws, self.step = _loop_optimizer(impl, mlp_init(sizes, seed), lr)
        if self.ws is None:
            raise NotImplementedError(self.step)
        hot_ws, self.hot_step = _loop_optimizer(impl, mlp_init(sizes, seed), lr)
        self.hot_grads = mlp_forward_backward(hot_ws, *self.data[0])[1]
        self.iterations = 0
        self.loss_first = self.loss_last = None

    def forward_backward(self):
        X, y = self.data[self.iterations % len(self.data)]
        self.iterations += 1
        loss, grads = mlp_forward_backward(self.ws, X, y)
        if self.loss_first is None:
            self.loss_first = loss
        self.loss_last = loss
        return grads

    def train(self, n):
        """``n`` training iterations; mean seconds of the optimizer step alone
        (only the ``step(grads)`` call) and of the whole iteration."""
        clock = time.perf_counter
        step_s = total_s = 0.0
        for _ in range(n):
            t0 = clock()
            grads = self.forward_backward()
            t1 = clock()
            self.step(grads)
            t2 = clock()
            step_s += t2 - t1
            total_s += t2 - t0
        return step_s / n, total_s / n

    def hot(self, n):
        """Mean seconds of ``n`` steps back to back on the same gradients."""
        step, grads = self.hot_step, self.hot_grads
        t0 = time.perf_counter()
        for _ in range(n):
            step(grads)
        return (time.perf_counter() - t0) / n


def make_in_loop_impl(impl, sizes=(784, 256, 256, 10), batch=128, data=None, lr=1e-3,
                      seed=0):
    """An :class:`InLoopImpl`, and a note: ``(None, note)`` when ``impl``
    cannot run here. ``impl``: a fastopt backend (plain list of arrays),
    ``"<backend>-packed"`` (:func:`fastopt.pack`, grads copied in),
    ``"numpy"`` (:class:`NumpyAdam`) or ``"torch-fused"``."""
    try:
        return InLoopImpl(impl, tuple(sizes), batch, data, lr, seed), ""
    except NotImplementedError as e:
        return None, str(e)


def _cpu_ticks():
    """``(busy, steal, this process's)`` CPU clock ticks so far, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            s = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return user + nice + system + irq + softirq, steal, sum(int(x) for x in s[11:15])


def load_snapshot():
    """Where the machine's load stands now, for :func:`load_since`."""
    return time.perf_counter(), os.getloadavg(), _cpu_ticks()


def load_since(snapshot) -> dict:
    """Load averages and other processes' CPU use since ``snapshot``: a
    benchmark on a machine something else was using says so."""
    t0, load0, ticks0 = snapshot
    return {"loadavg_before": load0, "loadavg_after": os.getloadavg(),
            "other_processes": _other_cpu(ticks0, _cpu_ticks(), time.perf_counter() - t0)}


def _other_cpu(before, after, wall):
    """What other processes took of the CPUs between two :func:`_cpu_ticks`."""
    if before is None or after is None:
        return {"note": "no /proc/stat: other processes' CPU use not measured"}
    hz = os.sysconf("SC_CLK_TCK")
    busy, steal, mine = ((a - b) / hz for a, b in zip(after, before))
    other = max(busy - mine, 0.0)
    frac = other / (wall * (os.cpu_count() or 1))
    verdict = ("quiet: no other process used the CPUs to speak of" if frac < 0.02 else
               f"shared: other processes used {100 * frac:.0f}% of the CPUs")
    return {"other_cpu_s": other, "other_cpu_fraction": frac, "own_cpu_s": mine,
            "steal_s": steal,
            "note": (f"{verdict} (other {other:.2f} CPU-s, this process {mine:.2f} CPU-s, "
                     f"steal {steal:.2f} s, in {wall:.1f} s on {os.cpu_count()} CPUs)")}


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


def _fastest_backend(candidates, sizes, batch, data, lr):
    """The fastopt backend of ``candidates`` with the fastest hot list step."""
    if len(candidates) == 1:
        return candidates[0]
    hots = {c: make_in_loop_impl(c, sizes, batch, data, lr)[0] for c in candidates}
    fns = {c: (lambda h: lambda: h.hot_step(h.hot_grads))(h) for c, h in hots.items()}
    best = time_all(fns, rounds=3, min_block=0.01)
    return min(best, key=best.get)


def in_loop_case(impls=IN_LOOP_IMPLS, sizes=(784, 256, 256, 10), batch=128, steps=50,
                 rounds=9, packed="fastest", lr=1e-3, seed=0, warmup=5, settle=0.2):
    """The Adam step inside a NumPy training loop, next to the same step hot.

    A ReLU MLP (``sizes``, float32, softmax cross-entropy, weights in a plain
    list) is trained with :func:`mlp_forward_backward` on a few random
    mini-batches generated once: ``@`` matmuls through NumPy's BLAS and new
    gradient arrays every step. Implementations (``impls``, each with its own
    copy of the same initial weights, all Adam with ``lr``): fastopt backends
    given the plain list (``fastopt.Adam(params, backend=...)``,
    ``opt.step(grads)``); ``"<backend>-packed"``, the params in one
    :func:`fastopt.pack` buffer and each step's gradients copied into a
    FlatArrays (``packed="fastest"`` adds it for the fastest fastopt backend
    in ``impls``, a backend name for that one, None for none); ``"numpy"``,
    :class:`NumpyAdam`; ``"torch-fused"``, ``torch.optim.Adam(fused=True)``
    over ``torch.from_numpy`` views of the weights, each ``.grad`` set to
    ``torch.from_numpy(g)`` every step (skipped with a note without torch).

    Three times per implementation, all in this process:

    * ``step_in_loop_s``: the optimizer step alone (the ``step(grads)``
      call, the grads hand-over included) with the forward/backward pass
      before it every iteration;
    * ``train_step_s``: the whole iteration, forward, backward and step;
    * ``step_hot_s``: the step back to back on one fixed gradient list (a
      second copy of the model), no BLAS in between.

    Each round first waits ``settle`` seconds (OpenBLAS's idle workers
    busy-wait ~0.1 s after a call before they sleep), runs ``steps`` hot
    steps of every implementation, then ``steps`` training iterations of
    every implementation, one after the other (the order rotates each round,
    so a slow spell hits all alike); each time is the median over ``rounds``
    of the round's mean. Ratios (same run): ``in_loop_vs_hot`` =
    step_in_loop_s / step_hot_s; ``vs_numpy`` and ``vs_torch_fused`` = that
    implementation's time / this one's, for each of the three times.
    ``loss_first``/``loss_last``: the training loss at the first and the
    last iteration (the same for every implementation up to rounding: they
    train the same model). ``environment``: load averages, whether another
    process used the CPUs during the run, the BLAS/OpenMP libraries as
    threadpoolctl sees them, fastopt's and torch's thread counts and the
    thread-related environment variables that are set.
    """
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    ticks_before = _cpu_ticks()
    sizes = tuple(sizes)
    data = mlp_data(sizes, batch)
    impls = list(dict.fromkeys(impls))
    notes = {}
    if packed:
        listed = [i for i in impls if i in fastopt.available_backends() and i != "numpy"]
        if packed != "fastest":
            be = packed
        elif listed:
            be = _fastest_backend(listed, sizes, batch, data, lr)
        else:
            be = None
            notes["packed"] = "no fastopt backend among impls to pack for"
        if be and f"{be}-packed" not in impls:
            at = max((impls.index(i) + 1 for i in listed), default=0)
            impls.insert(at, f"{be}-packed")
    loops = {}
    for impl in impls:
        loop, note = make_in_loop_impl(impl, sizes, batch, data, lr, seed)
        if loop is None:
            notes[impl] = note
        else:
            loops[impl] = loop
    for loop in loops.values():              # compile, fault pages in, start pools
        loop.train(warmup)
        loop.hot(warmup)
    samples = {impl: {"step_in_loop": [], "train_step": [], "step_hot": []}
               for impl in loops}
    order = list(loops)
    for r in range(rounds):
        rotated = order[r % len(order):] + order[:r % len(order)]
        time.sleep(settle)                   # BLAS workers stop spinning, then sleep
        for impl in rotated:
            samples[impl]["step_hot"].append(loops[impl].hot(steps))
        for impl in rotated:
            step_s, total_s = loops[impl].train(steps)
            samples[impl]["step_in_loop"].append(step_s)
            samples[impl]["train_step"].append(total_s)
    med = {impl: {k: float(np.median(v)) for k, v in s.items()} for impl, s in samples.items()}
    results = {}
    for impl in impls:
        if impl not in loops:
            results[impl] = {"step_in_loop_s": None, "train_step_s": None,
                             "step_hot_s": None, "in_loop_vs_hot": None,
                             "vs_numpy": None, "vs_torch_fused": None, "note": notes[impl]}
            continue
        m = med[impl]
        row = {"step_in_loop_s": m["step_in_loop"], "train_step_s": m["train_step"],
               "step_hot_s": m["step_hot"],
               "in_loop_vs_hot": m["step_in_loop"] / m["step_hot"]}
        for key, ref in (("vs_numpy", "numpy"), ("vs_torch_fused", "torch-fused")):
            row[key] = ({k: med[ref][k] / m[k] for k in m} if ref in med else None)
        loop = loops[impl]
        row.update(loss_first=loop.loss_first, loss_last=loop.loss_last,
                   iterations=loop.iterations, rounds_s=samples[impl], note="")
        if impl.endswith("-packed"):
            row["note"] = "fastopt.pack; grads copied into a FlatArrays each step"
        elif impl == "torch-fused":
            row["note"] = "torch.from_numpy views; .grad set each step"
        elif impl == "numpy":
            row["note"] = "naive NumPy Adam, per array"
        else:
            row["note"] = "plain list of arrays"
        results[impl] = row
    wall = time.perf_counter() - t_start
    torch = sys.modules.get("torch")
    env = {
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "other_processes": _other_cpu(ticks_before, _cpu_ticks(), wall),
        "thread_pools": thread_pools(),
        "fastopt_threads": fastopt.get_num_threads(),
        "torch_threads": torch.get_num_threads() if torch is not None and hasattr(
            torch, "get_num_threads") else None,
        "threads_env": {k: os.environ[k] for k in IN_LOOP_ENV if k in os.environ},
        "cpus": os.cpu_count(),
    }
    if env["thread_pools"] is None:
        notes["thread_pools"] = "threadpoolctl not installed: BLAS details unknown"
    n_params = sum(w.size for w in mlp_init(sizes))
    return {"case": (f"NumPy MLP {'-'.join(map(str, sizes))}, batch {batch}, float32, "
                     f"Adam lr={lr:g}"),
            "sizes": list(sizes), "batch": batch, "params": int(n_params),
            "steps": steps, "rounds": rounds, "impls": impls,
            "results": results, "notes": notes, "environment": env, "wall_s": wall}


def format_in_loop(report) -> str:
    """A small table of :func:`in_loop_case`'s report."""
    def t(s):
        if s is None:
            return "-"
        return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"

    def x(r):
        return "-" if r is None else f"{r:.2f}"

    def vs(row, key, which):
        return x(row[key][which]) if row.get(key) else "-"

    head = (f"{'impl':<15} {'step in loop':>12} {'train step':>11} {'step hot':>9} "
            f"{'loop/hot':>8} {'vs numpy':>9} {'vs torch':>9} {'train vs numpy':>14} "
            f"{'train vs torch':>14}  note")
    lines = [report["case"] + f" ({report['params']} params); medians of "
             f"{report['rounds']} rounds x {report['steps']} steps", head, "-" * len(head)]
    for impl, r in report["results"].items():
        lines.append(
            f"{impl:<15} {t(r['step_in_loop_s']):>12} {t(r['train_step_s']):>11} "
            f"{t(r['step_hot_s']):>9} {x(r['in_loop_vs_hot']):>8} "
            f"{vs(r, 'vs_numpy', 'step_in_loop'):>9} "
            f"{vs(r, 'vs_torch_fused', 'step_in_loop'):>9} "
            f"{vs(r, 'vs_numpy', 'train_step'):>14} "
            f"{vs(r, 'vs_torch_fused', 'train_step'):>14}  {r['note']}")
    lines.append("")
    lines.append("step in loop: the optimizer step alone, right after the forward/backward "
                 "matmuls; train step: forward + backward + step; step hot: the step back "
                 "to back on the same grads; vs numpy / vs torch: naive NumPy Adam's / "
                 "torch fused Adam's time / this one's (step in loop, or train step), "
                 "same run")
    env = report["environment"]
    for p in env["thread_pools"] or []:
        lines.append(
            f"{p.get('user_api', '?')}: {p.get('internal_api', '?')} {p.get('version') or ''} "
            f"({p.get('file')}), {p.get('num_threads')} threads"
            + (f", {p['threading_layer']}" if p.get("threading_layer") else "")
            + (f", kernel {p['architecture']}" if p.get("architecture") else ""))
    te = env["threads_env"]
    lines.append(f"threads: fastopt {env['fastopt_threads']}, torch "
                 f"{env['torch_threads'] if env['torch_threads'] is not None else '-'}; "
                 f"OPENBLAS_NUM_THREADS={te.get('OPENBLAS_NUM_THREADS', 'unset')}"
                 + "".join(f", {k}={v}" for k, v in te.items()
                           if k != "OPENBLAS_NUM_THREADS"))
    lb, la = env["loadavg_before"], env["loadavg_after"]
    lines.append(f"load average {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f} before, "
                 f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f} after ({env['cpus']} CPUs); "
                 f"{env['other_processes']['note']}")
    lines.append(f"run took {report['wall_s']:.1f} s")
    for k, v in report["notes"].items():
        if k not in report["results"]:
            lines.append(f"note ({k}): {v}")
    return "\n".join(lines)
