"""The standard benchmark matrix behind ``fastopt bench``.

Every number is a same-run comparison on this machine: fastopt's backends,
a straightforward NumPy step, PyTorch's fused and foreach optimizers (when
torch is installed) and a *streaming kernel* that moves the same bytes as
the step with trivial arithmetic, i.e. the memory roofline for that step,
measured in the same process. Report ratios, not absolute times: on a small
shared machine absolute times drift from run to run.

Timing: each implementation is warmed up first (so Numba compilation stays
out), then timed in blocks of calls long enough to dwarf timer overhead;
the reported time is the minimum block mean over several interleaved
rounds, the usual estimator of what the code can do on a noisy machine.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np

import fastopt

ADAM_BYTES = 7   # AdamW reads p, g, m, v and writes p, m, v: 7 arrays' worth


@dataclass
class Result:
    case: str
    impl: str
    elements: int
    tensors: int
    dtype: str
    seconds: float | None            # per step; None when not run
    bytes_per_step: int
    note: str = ""

    @property
    def gbps(self):
        return self.bytes_per_step / self.seconds / 1e9 if self.seconds else None


# -- baselines ---------------------------------------------------------------

def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


_STREAM = {}


def _stream_kernels():
    """Numba kernels that move a step's bytes with no real math: the roofline."""
    if not _STREAM:
        from numba import njit, prange

        @njit(parallel=True, cache=True)
        def rw4_3(p, g, m, v):  # reads 4 arrays, writes 3, like AdamW
            for i in prange(p.size):
                gi = g[i]
                p[i] += gi
                m[i] += gi
                v[i] += gi

        @njit(parallel=True, cache=True, fastmath=True)
        def read1(g):  # one read pass, like a norm (fastmath: vectorised sum)
            acc = 0.0
            for i in prange(g.size):
                acc += g[i]
            return acc

        _STREAM.update(rw4_3=rw4_3, read1=read1)
    return _STREAM


def numpy_adamw(p, g, m, v, step, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=1e-2):
    """A straightforward NumPy AdamW, as a NumPy user would write it."""
    p *= 1 - lr * wd
    m[:] = b1 * m + (1 - b1) * g
    v[:] = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** step)
    v_hat = v / (1 - b2 ** step)
    p -= lr * m_hat / (np.sqrt(v_hat) + eps)


# -- timing ------------------------------------------------------------------

def _time_all(fns, rounds, min_block=0.02):
    """Minimum mean seconds per call of each function.

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
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls[name])
    return best


def _rand(shape_or_n, dtype, seed):
    return np.random.default_rng(seed).standard_normal(shape_or_n).astype(dtype)


# -- cases ---------------------------------------------------------------------

def _adamw_case(case, shapes, dtype, rounds, backends, clip=False):
    """AdamW over ``shapes`` packed in one buffer, against every baseline."""
    dt = np.dtype(dtype)
    n = sum(int(np.prod(s)) for s in shapes)
    step_bytes = (ADAM_BYTES + (1 if clip else 0)) * n * dt.itemsize
    kw = dict(lr=1e-3, weight_decay=1e-2)
    clip_kw = dict(max_grad_norm=1.0) if clip else {}
    fns, notes = {}, {"roofline": "streaming kernel, same bytes",
                      "numpy": "straightforward NumPy"}

    # roofline: the same bytes with no math (+ a read pass for the norm)
    stream = _stream_kernels()
    p, g, m, v = (_rand(n, dt, s) for s in range(4))
    if clip:
        fns["roofline"] = lambda: (stream["read1"](g), stream["rw4_3"](p, g, m, v))
    else:
        fns["roofline"] = lambda: stream["rw4_3"](p, g, m, v)

    def fastopt_step(be):
        params = fastopt.pack([_rand(s, dt, 1) for s in shapes])
        grads = params.zeros_like()
        grads.data[:] = _rand(n, dt, 2)
        opt = fastopt.AdamW(params, backend=be, **kw, **clip_kw)
        return lambda: opt.step(grads)

    for be in backends:
        fns[be] = fastopt_step(be)

    # straightforward NumPy: one tensor at a time, as a user's loop would
    ps = [_rand(s, dt, 1) for s in shapes]
    gs = [_rand(s, dt, 2) for s in shapes]
    ms = [np.zeros(s, dt) for s in shapes]
    vs = [np.zeros(s, dt) for s in shapes]
    state = {"t": 0}

    def numpy_step():
        state["t"] += 1
        if clip:
            norm = np.sqrt(sum(float(np.dot(x.ravel(), x.ravel())) for x in gs))
            c = min(1.0, 1.0 / (norm + 1e-6))
            gs_eff = [x * c for x in gs]
        else:
            gs_eff = gs
        for a, b, c_, d in zip(ps, gs_eff, ms, vs):
            numpy_adamw(a, b, c_, d, state["t"])
    fns["numpy"] = numpy_step

    torch = _torch()
    for variant in ("fused", "foreach"):
        impl = f"torch-{variant}"
        if torch is None:
            fns[impl], notes[impl] = None, "torch not installed"
            continue
        tps = [torch.from_numpy(_rand(s, dt, 1)) for s in shapes]
        for tp in tps:
            tp.grad = torch.from_numpy(_rand(tp.shape, dt, 2))
        topt = torch.optim.AdamW(tps, **kw, **{variant: True})
        if clip:
            def tstep(tps=tps, topt=topt):
                torch.nn.utils.clip_grad_norm_(tps, 1.0, foreach=True)
                topt.step()
            fns[impl] = tstep
        else:
            fns[impl] = topt.step

    times = _time_all({k: f for k, f in fns.items() if f is not None}, rounds)
    return [Result(case, impl, n, len(shapes), dt.name, times.get(impl), step_bytes,
                   notes.get(impl, "")) for impl in fns]


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


def run(full=False, progress=None):
    """Run the matrix; returns a JSON-able dict with results and metadata."""
    rounds = 7 if full else 4
    backends = [b for b in ("numba", "cython") if b in fastopt.available_backends()]
    plan = [
        ("adamw 1 x 16M", [(1 << 24,)], False),
        ("adamw 1000 x 1k", [(1000,)] * 1000, False),
        ("clip+adamw 200 x 5k", [(5000,)] * 200, True),
        ("adamw 1 x 1k (overhead)", [(1000,)], False),
    ]
    if full:
        plan += [("adamw 1 x 1M", [(1 << 20,)], False),
                 ("adamw 1 x 64M", [(1 << 26,)], False)]
    results = []
    for i, (case, shapes, clip) in enumerate(plan):
        if progress:
            progress(i, len(plan) + 1, case)
        results += _adamw_case(case, shapes, np.float32, rounds, backends, clip=clip)
    if progress:
        progress(len(plan), len(plan) + 1, "cold start")
    cold = {be: cold_start(be) for be in backends}
    torch = _torch()
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__,
                    "torch": torch.__version__ if torch else "not installed",
                    "gpu": "no GPU" if not _has_gpu() else "GPU present",
                    "fastopt_threads": fastopt.get_num_threads(),
                    "backends": fastopt.backend_info()},
        "results": [dict(asdict(r), gbps=r.gbps) for r in results],
        "cold_start": cold,
    }


def _has_gpu():
    torch = _torch()
    return bool(torch is not None and torch.cuda.is_available())


# -- report -----------------------------------------------------------------------

def ratios(results):
    """Per row: fraction of roofline, speedup vs NumPy and vs torch fused."""
    by_case = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    rows = []
    for case, impls in by_case.items():
        base = {k: impls.get(k, {}).get("seconds") for k in ("roofline", "numpy", "torch-fused")}
        for impl, r in impls.items():
            s = r["seconds"]
            rows.append(dict(r,
                             roof=base["roofline"] / s if s and base["roofline"] else None,
                             vs_numpy=base["numpy"] / s if s and base["numpy"] else None,
                             vs_torch=base["torch-fused"] / s if s and base["torch-fused"] else None))
    return rows


def format_table(report) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    def t(s):
        if s is None:
            return "-"
        return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"

    head = (f"{'case':<24} {'impl':<12} {'elements':>10} {'time':>10} {'GB/s':>7} "
            f"{'%roof':>6} {'vs numpy':>9} {'vs torch':>9}  note")
    lines = [head, "-" * len(head)]
    for r in ratios(report["results"]):
        lines.append(
            f"{r['case']:<24} {r['impl']:<12} {r['elements']:>10} {t(r['seconds']):>10} "
            f"{f(r['gbps'], '.1f'):>7} {f(r['roof'] and 100 * r['roof'], '.0f'):>6} "
            f"{f(r['vs_numpy'], '.2f'):>9} {f(r['vs_torch'], '.2f'):>9}  {r['note']}")
    lines.append("")
    lines.append("vs torch = torch.optim.AdamW(fused=True) time / this time "
                 "(clip case: clip_grad_norm_(foreach=True) + fused AdamW)")
    for be, c in report.get("cold_start", {}).items():
        lines.append(f"cold start ({be}): first AdamW step done "
                     f"{c['cold']['to_first_step']:.2f} s after start with Numba's cache "
                     f"cold, {c['warm']['to_first_step']:.2f} s warm")
    m = report["machine"]
    lines.append(f"machine: {m['processor'] or m['platform']}, {m['cpus']} CPUs, "
                 f"torch {m['torch']}, {m['gpu']}")
    return "\n".join(lines)


def save(report, path):
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
