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

import numpy as np

import fastopt

# Arrays of the parameter dtype each step reads or writes, per element:
# AdamW reads p, g, m, v and writes p, m, v; SGD with momentum reads p, g, buf
# and writes p, buf. Clipping adds one read of g for the norm.
ARRAYS_MOVED = {"adamw": 7, "sgd": 5}
KINDS = tuple(ARRAYS_MOVED)
HYPERS = {"adamw": dict(lr=1e-3, weight_decay=1e-2),
          "sgd": dict(lr=1e-2, momentum=0.9, nesterov=True)}
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
    """Numba kernels that move a step's bytes with no real math: ``rw4_3``
    and ``read1`` are threaded, ``*_serial`` the same loops on one thread
    (up to ``SERIAL_MAX`` elements a thread launch costs more than the loop, which is
    why fastopt's kernels run serially there too)."""
    if not _STREAM:
        from numba import njit, prange

        from ._openmp import start_numba_threads
        start_numba_threads()     # the same thread pool (and spin) as fastopt's kernels

        def rw4_3(p, g, m, v):  # reads 4 arrays, writes 3: AdamW's traffic
            for i in prange(p.size):
                gi = g[i]
                p[i] += gi
                m[i] += gi
                v[i] += gi

        def rw3_2(p, g, b):  # reads 3, writes 2: SGD with momentum's traffic
            for i in prange(p.size):
                gi = g[i]
                p[i] += gi
                b[i] += gi

        def read1(g):  # one read pass, like a norm (fastmath: vectorised sum)
            acc = 0.0
            for i in prange(g.size):
                acc += g[i]
            return acc

        # Only the threaded kernels are cached: Numba's on-disk cache is keyed
        # by the Python function, so a serial twin compiled from the same
        # function would share (and could load) the threaded one's entry.
        for parallel, suffix in ((True, ""), (False, "_serial")):
            jit = dict(parallel=parallel, cache=parallel)
            _STREAM["rw4_3" + suffix] = njit(**jit)(rw4_3)
            _STREAM["rw3_2" + suffix] = njit(**jit)(rw3_2)
            _STREAM["read1" + suffix] = njit(**jit, fastmath=True)(read1)
    return _STREAM


SERIAL_MAX = 1 << 15   # fastopt's kernels (numba_cpu, Cython) run serially up to this size


# -- implementations -----------------------------------------------------------

def _rand(shape_or_n, dtype, seed):
    # generated in the target dtype: 16M float64 normals cast down would take
    # longer than the steps they feed
    return np.random.default_rng(seed).standard_normal(shape_or_n, dtype=np.dtype(dtype))


def numpy_adamw(p, g, m, v, step, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2):
    """A straightforward NumPy AdamW, as a NumPy user would write it."""
    p *= 1 - lr * weight_decay
    m[:] = b1 * m + (1 - b1) * g
    v[:] = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** step)
    v_hat = v / (1 - b2 ** step)
    p -= lr * m_hat / (np.sqrt(v_hat) + eps)


def numpy_sgd(p, g, buf, step, lr=1e-2, momentum=0.9, nesterov=True):
    """A straightforward NumPy SGD with Nesterov momentum."""
    if step == 1:
        buf[:] = g
    else:
        buf *= momentum
        buf += g
    p -= lr * (g + momentum * buf if nesterov else buf)


def _numpy_step(kind, shapes, dt, clip):
    ps = [_rand(s, dt, 1) for s in shapes]
    gs = [_rand(s, dt, 2) for s in shapes]
    nstate = 2 if kind == "adamw" else 1
    states = [[np.zeros(s, dt) for _ in range(nstate)] for s in shapes]
    update = numpy_adamw if kind == "adamw" else numpy_sgd
    count = {"t": 0}

    def step():
        count["t"] += 1
        grads = gs
        if clip:
            norm = np.sqrt(sum(float(np.dot(x.ravel(), x.ravel())) for x in gs))
            c = min(1.0, 1.0 / (norm + 1e-6))
            grads = [x * c for x in gs]
        for p, g, st in zip(ps, grads, states):
            update(p, g, *st, count["t"], **HYPERS[kind])
    return step


#: how fastopt gets the arrays: ``packed`` (one buffer, FlatArrays grads) or
#: ``list`` (separate arrays, and a new list of new gradient arrays every
#: step, as NumPy backprop code makes them)
LAYOUTS = ("packed", "list")
_FRESH = 3     # gradient lists a list-layout step cycles through


def _fastopt_step(kind, shapes, dt, clip, backend, layout="packed"):
    n = sum(int(np.prod(s)) for s in shapes)
    cls = fastopt.AdamW if kind == "adamw" else fastopt.SGD
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
    n = sum(int(np.prod(s)) for s in shapes)
    k = _stream_kernels()
    suffix = "_serial" if n <= SERIAL_MAX else ""
    read = k["read1" + suffix]
    name, nread = ("rw4_3", 4) if kind == "adamw" else ("rw3_2", 3)
    rw = k[name + suffix]
    arrays = [_rand(n, dt, s) for s in range(nread)]    # p, g, then the state
    g = arrays[1]
    if clip:
        return lambda: (read(g), rw(*arrays))
    return lambda: rw(*arrays)


def _torch_step(kind, shapes, dt, clip, variant):
    torch = torch_or_none()
    if torch is None:
        return None, "torch not installed"
    tps = [torch.from_numpy(_rand(s, dt, 1)) for s in shapes]
    for tp in tps:
        tp.grad = torch.from_numpy(_rand(tp.shape, dt, 2))
    flag = {"fused": dict(fused=True), "foreach": dict(foreach=True),
            "forloop": dict(foreach=False)}[variant]
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.SGD
    try:
        topt = cls(tps, **HYPERS[kind], **flag)
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
    is ``"adamw"`` or ``"sgd"`` (Nesterov momentum); ``shapes`` the tensors;
    ``layout`` how fastopt holds them (see :data:`LAYOUTS`; the baselines
    always take separate arrays). The callable is None when the
    implementation cannot run here, and the note says why.
    """
    if kind not in ARRAYS_MOVED:
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

def time_all(fns, rounds, min_block=0.02):
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
    times = time_all({k: fn for k, (fn, _) in built.items() if fn is not None}, rounds)
    nbytes = step_bytes(kind, n, dtype, clip)
    return [Result(case, impl, kind, n, len(shapes), np.dtype(dtype).name,
                   times.get(impl), nbytes, note, layout)
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


def plan(full=False):
    """``(case, kind, shapes, dtype, clip, layout)`` rows of the standard matrix."""
    sizes = ([1 << 10, 1 << 13, 1 << 16, 1 << 19, 1 << 22, 1 << 24, 1 << 26] if full
             else [1 << 10, 1 << 15, 1 << 20, 1 << 24])
    rows = [(SWEEP_CASE, "adamw", [(n,)], "float32", False, "packed") for n in sizes]
    rows += [
        ("adamw 1000 x 1k", "adamw", [(1000,)] * 1000, "float32", False, "packed"),
        ("clip+adamw 200 x 5k", "adamw", [(5000,)] * 200, "float32", True, "packed"),
        ("sgd nesterov 1 x 16M", "sgd", [(1 << 24,)], "float32", False, "packed"),
    ]
    # Plain lists, as NumPy code holds them: separate arrays, new gradient
    # arrays every step.
    rows += [
        ("list adamw 1000 x 1k", "adamw", [(1000,)] * 1000, "float32", False, "list"),
        ("list clip+adamw 200 x 5k", "adamw", [(5000,)] * 200, "float32", True, "list"),
        ("list adamw 10 x 1k", "adamw", [(1000,)] * 10, "float32", False, "list"),
        ("list adamw mlp", "adamw", MLP_SHAPES, "float32", False, "list"),
        ("list adamw 1 x 1", "adamw", [(1,)], "float32", False, "list"),
        ("list adamw 1 x 16M", "adamw", [(1 << 24,)], "float32", False, "list"),
    ]
    if full:
        rows += [("adamw float64 1 x 16M", "adamw", [(1 << 24,)], "float64", False, "packed"),
                 ("sgd nesterov 1000 x 1k", "sgd", [(1000,)] * 1000, "float32", False, "packed"),
                 ("list adamw float64 1000 x 1k", "adamw", [(1000,)] * 1000, "float64",
                  False, "list")]
    return rows


def run(full=False, progress=None, rows=None, cold=True):
    """Run the matrix; returns a JSON-able report (results and metadata)."""
    rounds = 7 if full else 4
    rows = plan(full) if rows is None else rows
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
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__,
                    "torch": torch.__version__ if torch else "not installed",
                    "gpu": gpu_name() or "no GPU",
                    "fastopt": fastopt.__version__,
                    "fastopt_threads": fastopt.get_num_threads(),
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

    head = (f"{'case':<26} {'impl':<13} {'elements':>10} {'time':>10} {'GB/s':>7} "
            f"{'%roof':>6} {'vs numpy':>9} {'vs torch':>9} {'vs best':>8}  note")
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        roof = r["vs_roofline"]
        best = r.get("vs_torch_best")
        note = r["note"]
        if best is not None and r["impl"] not in TORCH_PATHS:
            note = f"best torch: {r.get('vs_torch_best_impl')}" + (f"; {note}" if note else "")
        lines.append(
            f"{r['case']:<26} {r['impl']:<13} {r['elements']:>10} {t(r['seconds']):>10} "
            f"{f(r['gbps'], '.1f'):>7} {f(roof and 100 * roof, '.0f'):>6} "
            f"{f(r['vs_numpy'], '.2f'):>9} {f(r['vs_torch'], '.2f'):>9} "
            f"{f(best, '.2f'):>8}  {note}")
    lines.append("")
    lines.append("%roof = streaming kernel moving the same bytes / this time; "
                 "vs torch = torch.optim.<opt>(fused=True) time / this time; "
                 "vs best = torch's fastest path in the same case (fused, foreach or "
                 "for-loop) / this time; 'list' cases: separate arrays and new gradient "
                 "arrays every step")
    for be, c in report.get("cold_start", {}).items():
        cold, warm = c["cold"]["to_first_step"], c["warm"]["to_first_step"]
        lines.append(f"cold start ({be}): first AdamW step done {cold:.2f} s after start "
                     f"with Numba's cache cold, {warm:.2f} s warm" if be == "numba" else
                     f"cold start ({be}): first AdamW step done {warm:.2f} s after start "
                     "(compiled ahead of time)")
    m = report["machine"]
    lines.append(f"machine: {m['processor'] or m['platform']}, {m['cpus']} CPUs, "
                 f"torch {m['torch']}, GPU: {m['gpu']}")
    return "\n".join(lines)


def save(report, path):
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


IMPL_STYLE = {   # colour, marker: fastopt solid, baselines dashed
    "numba": ("C0", "o", "-"), "cython": ("C1", "s", "-"),
    "numpy": ("C2", "^", "--"), "torch-fused": ("C3", "v", "--"),
    "torch-foreach": ("C4", "<", "--"), "torch-forloop": ("C5", ">", "--"),
}


def plot(report, path):
    """Throughput and time per step vs size, per implementation, with the
    same-run roofline drawn. Needs matplotlib; returns False without it."""
    from ._plotting import agg_pyplot
    plt = agg_pyplot()
    if plt is None:
        return False
    rows = [r for r in report["results"] if r["case"] == SWEEP_CASE and r["seconds"]]
    fig, (ax_bw, ax_t) = plt.subplots(1, 2, figsize=(12, 4.6))
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
