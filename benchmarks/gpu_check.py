"""One prepared GPU check for the ``cuda`` backend: tests + measurements.

Run on a machine with an NVIDIA GPU, numba-cuda (``pip install
'fastopt[cuda]'``) and, for the baselines, torch with CUDA::

    python benchmarks/gpu_check.py                 # ~2-4 minutes on an H100/H200
    python benchmarks/gpu_check.py --skip-tests    # measurements only
    python benchmarks/gpu_check.py --quick         # fewer repetitions

It installs nothing and needs no network. In one process, on one card:

1. runs the CUDA tests for real (``tests/cuda_sim``, ``tests/test_cuda_ptx.py``)
   in a subprocess and records the outcome;
2. measures the device-to-device copy bandwidth (``cuMemcpyDtoD`` of as many
   bytes as one AdamW step at 64M elements moves): the roofline;
3. fastopt AdamW float32 at 64M elements, achieved GB/s for its 28
   bytes/element, and the fraction of the copy roofline (target >= 0.80);
4. torch ``AdamW(fused=True)`` on the same tensors, if torch with CUDA is
   importable (target: fastopt >= 1.0x torch);
5. 1000 tensors x 1000 elements: fastopt stepping one packed device buffer
   (one launch) vs torch fused over 1000 tensors (target >= 5x);
6. bfloat16 params and grads with a float32 master (fastopt; torch fused
   AdamW on bfloat16 params, no master, as the nearest torch row);
7. the rest of the family on the device (SGD, RMSprop, Adagrad, Adamax,
   NAdam, RAdam, Lion: one generic update kernel; LAMB: its two-phase
   kernels): for each, a check (10 steps at 1M elements against the NumPy
   reference on the host and, where torch has the optimizer, torch on
   CUDA) and the float32 step at 64M elements against torch's fastest path
   (foreach or fused, whichever torch offers and wins; named in the
   results);
8. SAM (around SGD with momentum) and L-BFGS on device params: a check
   each against the same on the host (L-BFGS also against torch's LBFGS on
   CUDA, float64), SAM's perturb + step round at 64M elements, and
   L-BFGS's two-loop recursion (10 pairs, 64M elements) against the same
   recursion in torch tensor operations;
9. the MLP and ensemble checks of ``gpu_check_nn.py`` (report["nn"]);
10. compact optimizer state (``gpu_check_compact.py``, report["compact"]):
    AdamW with bfloat16 and int8 state checked against the CPU Numba
    backend, a device checkpoint round trip, and the step at 16M and 64M
    elements with each state dtype against float32 state and torch fused.

Every measurement shares one time budget (``--budget-s``, counted from
the start, the tests included): once spent, the rest are recorded as
skipped. The default run takes about 5 to 8 minutes: the tests (a few
minutes, at most ``--test-timeout``), then measurements until the budget
(400 s) is spent, plus the one running then (each well under a minute).

Times are wall clock around ``reps`` steps between two synchronisations,
best of several trials (so host-side overhead per step is included, as a
user sees it). Results go to ``benchmarks/results/gpu.json`` (card, driver,
versions, date, every number, which targets were met) and a summary is
printed. Without a GPU it exits with status 2 and a clear message, writing
nothing. Every measurement is guarded: one that fails is recorded with its
error and the others still run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu.json"
ADAMW_BYTES = 28            # float32 AdamW: read p, g, m, v; write p, m, v
BIG = 1 << 26               # 64M elements
MANY, EACH = 1000, 1000     # the many-small-tensors case
#: the family on the device: each optimizer's settings (torch's names and
#: meanings; torch.optim has all but Lion). AdamW is measured above.
FAMILY = {"SGD": dict(lr=1e-2, momentum=0.9), "RMSprop": dict(lr=1e-3, momentum=0.9),
          "Adagrad": dict(lr=1e-2), "Adamax": dict(lr=2e-3), "NAdam": dict(lr=2e-3),
          "RAdam": dict(lr=1e-3), "Lion": dict(lr=1e-4, weight_decay=0.1),
          "LAMB": dict(lr=1e-3, weight_decay=0.01)}
#: optimizers whose step is two passes (per-array sums, then the weights)
TWO_PASS = {"LAMB"}
CHECK_N, CHECK_STEPS = 1 << 20, 10
#: SAM: its base optimizer and radius; L-BFGS: its check's options and step
#: calls, and the pairs of the timed two-loop recursion
SAM_BASE, SAM_RHO = dict(lr=1e-2, momentum=0.9), 0.05
LBFGS_CHECK, LBFGS_CALLS, LBFGS_PAIRS = dict(max_iter=10, history_size=5), 2, 10
#: a checked element agrees to this relative error (floor 1 in the divisor:
#: params are ~1); a few may not (Lion's sign of a value within rounding of 0)
CHECK_RTOL, CHECK_MAX_OFF = 1e-5, 1e-5
TARGETS = {"adamw_fp32_64M_roofline_fraction": 0.80,
           "adamw_fp32_64M_vs_torch_fused": 1.0,
           "many_1000x1000_vs_torch_fused": 5.0}


class NoGPU(RuntimeError):
    pass


def _import_fastopt():
    sys.path.insert(0, str(ROOT))
    import fastopt
    return fastopt


def require_gpu(simulate=False):
    """numba.cuda with a usable GPU, or NoGPU saying what is missing."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") and not simulate:
        raise NoGPU("NUMBA_ENABLE_CUDASIM is set: this check measures real hardware; "
                    "unset it")
    try:
        from numba import cuda
    except ImportError as exc:
        raise NoGPU(f"numba.cuda is not importable ({exc}); pip install 'fastopt[cuda]'")
    try:
        import numba_cuda  # noqa: F401  (the maintained CUDA target)
    except ImportError:
        raise NoGPU("numba-cuda is not installed; pip install 'fastopt[cuda]'") from None
    if not cuda.is_available():
        raise NoGPU("no usable CUDA GPU here (numba.cuda.is_available() is False)")
    fastopt = _import_fastopt()
    if "cuda" not in fastopt.available_backends():
        info = fastopt.backend_info()["cuda"]
        raise NoGPU(f"fastopt's cuda backend is unavailable: {info.get('reason')}")
    return cuda, fastopt


def _section(name):
    """A benchmarks/gpu_check_*.py module: its checks join this run's."""
    here = str(ROOT / "benchmarks")
    if here not in sys.path:
        sys.path.insert(0, here)
    import importlib
    return importlib.import_module(name)


def _gpu_check_nn():
    return _section("gpu_check_nn")


def torch_cuda():
    try:
        import torch
    except ImportError:
        return None, "torch not installed"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} has no CUDA here"
    return torch, None


def card_info(cuda):
    dev = cuda.get_current_device()
    name = getattr(dev, "name", "CUDA simulator")
    info = {"name": name.decode() if isinstance(name, bytes) else str(name),
            "compute_capability": ".".join(map(str, getattr(dev, "compute_capability", ()))),
            "multiprocessors": int(getattr(dev, "MULTIPROCESSOR_COUNT", 0))}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            drv, mem = [s.strip() for s in out.stdout.strip().splitlines()[0].split(",")]
            info["driver"], info["memory"] = drv, mem
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from numba.cuda.cudadrv import driver
        info.setdefault("driver_cuda_version", ".".join(map(str, driver.driver.get_version())))
    except Exception:   # noqa: BLE001 - informational only
        pass
    return info


def versions():
    out = {"python": platform.python_version()}
    for mod in ("numpy", "numba", "numba_cuda", "torch"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:   # noqa: BLE001
            out[mod] = None
    try:
        out["fastopt_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
            timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["fastopt_commit"] = None
    return out


def best_time(step, sync, reps, trials, warmup=2):
    """Best wall-clock seconds per ``step()`` over ``trials`` runs of ``reps``."""
    for _ in range(warmup):
        step()
    sync()
    best = float("inf")
    for _ in range(trials):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        sync()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def run_tests(timeout):
    """The CUDA tests, for real, in a subprocess (simulator off)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    # (test_cuda_family.py runs its device tests for real here; its simulator
    # run is for machines without a GPU)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/cuda_sim", "tests/test_cuda_ptx.py", "tests/test_cuda_family.py",
           "tests/test_nn_cuda.py"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "summary": f"timed out after {timeout} s", "seconds": timeout}
    lines = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines() if ln.strip()]
    return {"ok": proc.returncode == 0, "returncode": proc.returncode,
            "summary": lines[-1] if lines else "", "seconds": round(time.perf_counter() - t0, 1),
            "tail": "\n".join(lines[-30:]) if proc.returncode else None}


_DEADLINE = [float("inf")]


def measure(results, key, fn):
    """Run one measurement; record its numbers or its error (or that the
    time budget ran out before it)."""
    t0 = time.perf_counter()
    if t0 > _DEADLINE[0]:
        results[key] = {"skipped": "time budget (--budget-s) spent", "wall_s": 0.0}
        print(f"  {key}: skipped, time budget spent", flush=True)
        return
    try:
        results[key] = fn()
    except Exception as exc:   # noqa: BLE001 - keep the other measurements
        results[key] = {"error": f"{type(exc).__name__}: {exc}"}
    results[key]["wall_s"] = round(time.perf_counter() - t0, 2)
    print(f"  {key}: {json.dumps({k: v for k, v in results[key].items() if k != 'wall_s'})}",
          flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON path")
    ap.add_argument("--skip-tests", action="store_true", help="measurements only")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--test-timeout", type=int, default=300)
    ap.add_argument("--budget-s", type=float, default=400.0,
                    help="stop starting measurements after this many seconds from the "
                         "start, tests included (default 400: the whole run fits a "
                         "10-minute device call)")
    # a dry run of this script's own code under the CUDA simulator, with tiny
    # sizes (tests/test_cuda_gpu_check.py); its numbers mean nothing
    ap.add_argument("--simulate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global BIG, MANY, EACH, CHECK_N, CHECK_STEPS, LBFGS_CHECK, LBFGS_CALLS, LBFGS_PAIRS
    if args.simulate:
        if not os.environ.get("NUMBA_ENABLE_CUDASIM"):
            ap.error("--simulate needs NUMBA_ENABLE_CUDASIM=1 in the environment")
        BIG, MANY, EACH = 1 << 10, 4, 100
        CHECK_N, CHECK_STEPS = 300, 3
        LBFGS_CHECK, LBFGS_CALLS, LBFGS_PAIRS = dict(max_iter=3, history_size=2), 1, 2
        args.skip_tests, args.quick = True, True

    try:
        cuda, fastopt = require_gpu(simulate=args.simulate)
    except NoGPU as exc:
        print(f"gpu_check: no GPU run possible: {exc}", file=sys.stderr)
        return 2

    from fastopt.backends import numba_cuda as C

    torch, torch_why = torch_cuda()
    tdev = "cuda"
    if args.simulate and torch is None:
        # the dry run takes the torch rows too, on CPU tensors (its numbers
        # mean nothing), so their code runs before a GPU run depends on it
        try:
            import torch
            tdev, torch_why = "cpu", None
        except ImportError:
            pass
    trials, reps = (3, 10) if args.quick else (5, 30)
    if args.simulate:
        trials, reps = 1, 1
    sync = cuda.synchronize
    tsync = (torch.cuda.synchronize if tdev == "cuda" else lambda: None) if torch is not None \
        else None
    t_start = time.perf_counter()
    _DEADLINE[0] = t_start + args.budget_s
    report = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "card": card_info(cuda), "versions": versions(),
              "torch_cuda": torch is not None and tdev == "cuda", "torch_note": torch_why,
              "simulated": bool(args.simulate),
              "method": "wall clock over reps steps between synchronisations, best of "
                        f"{trials} trials of {reps}; GB/s = bytes moved / time",
              "targets": TARGETS, "results": {}}
    print(f"gpu_check on {report['card']['name']} (cc {report['card']['compute_capability']}, "
          f"driver {report['card'].get('driver', '?')})", flush=True)

    if not args.skip_tests:
        print("running the CUDA tests on the GPU ...", flush=True)
        report["tests"] = run_tests(args.test_timeout)
        print(f"  tests: {report['tests']['summary']}", flush=True)

    R = report["results"]
    rng = np.random.default_rng(0)

    def roofline():
        n = BIG * ADAMW_BYTES // 8          # float32 elements: read + write = 28 B x 64M
        src = cuda.device_array(n, np.float32)   # contents do not matter to a copy
        dst = cuda.device_array_like(src)
        t = best_time(lambda: dst.copy_to_device(src), sync, reps, trials)
        moved = 2 * src.nbytes
        del src, dst
        return {"bytes_per_copy": moved, "seconds": t, "gbps": moved / t / 1e9}

    measure(R, "d2d_copy_roofline", roofline)
    roof = R["d2d_copy_roofline"].get("gbps")

    def step_rate(opt, g, moved=ADAMW_BYTES * BIG):
        """Time ``opt.step(g)``; GB/s for ``moved`` bytes a step."""
        t = best_time(lambda: opt.step(g), sync, reps, trials)
        out = {"elements": BIG, "seconds": t, "gbps": moved / t / 1e9}
        if roof:
            out["roofline_fraction"] = out["gbps"] / roof
        return out

    def adamw_fp32():
        p = cuda.to_device(rng.standard_normal(BIG, dtype=np.float32))
        g = cuda.to_device(rng.standard_normal(BIG, dtype=np.float32))
        opt = fastopt.AdamW(p, lr=1e-3, weight_decay=1e-2)
        sync()
        t0 = time.perf_counter()
        opt.step(g)          # the first step: kernel compile or on-disk cache load
        sync()
        first = time.perf_counter() - t0
        return step_rate(opt, g) | {"first_step_seconds": first}

    measure(R, "fastopt_adamw_fp32_64M", adamw_fp32)

    def adamw_fp32_scalar_path():
        # the same step on arrays one element past an aligned start: no
        # four-element vector loads there, every element takes the scalar loop
        p = cuda.to_device(rng.standard_normal(BIG + 1, dtype=np.float32))[1:]
        g = cuda.to_device(rng.standard_normal(BIG + 1, dtype=np.float32))[1:]
        assert not C.vector_ok(p, g)
        return step_rate(fastopt.AdamW(p, lr=1e-3, weight_decay=1e-2), g)

    measure(R, "fastopt_adamw_fp32_64M_unaligned_scalar_path", adamw_fp32_scalar_path)

    def adamw_fp32_clip():
        p = cuda.to_device(rng.standard_normal(BIG, dtype=np.float32))
        g = cuda.to_device(rng.standard_normal(BIG, dtype=np.float32))
        # + one read pass for the norm
        return step_rate(fastopt.AdamW(p, lr=1e-3, max_grad_norm=1.0), g,
                         moved=(ADAMW_BYTES + 4) * BIG)

    measure(R, "fastopt_clip_adamw_fp32_64M", adamw_fp32_clip)

    def torch_adamw(n, count, dtype="float32", clip=False):
        dt = getattr(torch, dtype)
        ps = [torch.randn(n, device=tdev, dtype=dt, requires_grad=True)
              for _ in range(count)]
        for q in ps:
            q.grad = torch.randn_like(q)
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True)

        def step():
            if clip:   # torch's usual pairing: clip_grad_norm_, then the fused step
                torch.nn.utils.clip_grad_norm_(ps, 1.0)
            opt.step()
        t = best_time(step, tsync, reps, trials)
        # clip: read the grads for the norm, then read and write them to scale
        moved = (ADAMW_BYTES + (12 if clip else 0)) * n * count
        return {"elements": n * count, "tensors": count, "seconds": t,
                "gbps": moved / t / 1e9}

    if torch is not None:
        measure(R, "torch_fused_adamw_fp32_64M", lambda: torch_adamw(BIG, 1))
        measure(R, "torch_clip_then_fused_adamw_fp32_64M",
                lambda: torch_adamw(BIG, 1, clip=True))
    else:
        R["torch_fused_adamw_fp32_64M"] = {"skipped": torch_why}

    def many_fastopt():
        n = MANY * EACH
        # 1000 tensors packed in one device buffer (the device twin of fastopt.pack)
        params = C.pack([rng.standard_normal(EACH, dtype=np.float32) for _ in range(MANY)])
        grads = params.zeros_like()
        grads.data.copy_to_device(rng.standard_normal(n, dtype=np.float32))
        opt = fastopt.AdamW(params, lr=1e-3, weight_decay=1e-2)
        t = best_time(lambda: opt.step(grads), sync, reps * 3, trials)
        p, g = params.data, grads.data
        # the kernel alone, without the optimizer's per-step host checks
        m, v = cuda.to_device(np.zeros(n, np.float32)), cuda.to_device(np.zeros(n, np.float32))
        from fastopt.backends.scalars import adam_scalars
        s = adam_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2,
                         decoupled=True, step=1)
        tk = best_time(lambda: C.adam_update(p, g, m, v, None, s), sync, reps * 3, trials)
        return {"tensors": MANY, "elements": n, "seconds": t, "kernel_call_seconds": tk,
                "gbps": ADAMW_BYTES * n / t / 1e9}

    measure(R, "fastopt_adamw_1000x1000_packed", many_fastopt)
    if torch is not None:
        measure(R, "torch_fused_adamw_1000x1000", lambda: torch_adamw(EACH, MANY))
    else:
        R["torch_fused_adamw_1000x1000"] = {"skipped": torch_why}

    def bf16_master():
        import ml_dtypes
        p16 = rng.standard_normal(BIG, dtype=np.float32).astype(ml_dtypes.bfloat16)
        p = cuda.to_device(p16.view(np.uint16))            # bfloat16 bits on the device
        g = cuda.to_device(p16.view(np.uint16))
        # float32 master inside; bytes: p16 write 2, g16 read 2, master, m, v rw 8 each
        return step_rate(fastopt.AdamW(p, lr=1e-3, weight_decay=1e-2), g)

    measure(R, "fastopt_adamw_bf16_master_64M", bf16_master)
    if torch is not None:
        measure(R, "torch_fused_adamw_bf16_64M_no_master",
                lambda: torch_adamw(BIG, 1, "bfloat16"))

    # -- compact optimizer state (gpu_check_compact.py), on the same budget -------------
    report["compact"] = _section("gpu_check_compact").compact_checks(
        fastopt=fastopt, cuda=cuda, measure=measure,
        best_time=(lambda *a: best_time(*a, warmup=0)) if args.simulate else best_time,
        simulate=args.simulate, quick=args.quick, torch=torch, tdev=tdev,
        torch_note=torch_why, roof=roof)

    def ratio(a, b):
        """How many times faster ``a`` ran than ``b`` (None: either missing)."""
        ta, tb = R.get(a, {}).get("seconds"), R.get(b, {}).get("seconds")
        return tb / ta if ta and tb else None

    # -- the family: a check each, and the step against torch's fastest path ----------
    def family_check(name):
        cls, kw = getattr(fastopt, name), FAMILY[name]
        init = rng.standard_normal(CHECK_N, dtype=np.float32)
        grads = [rng.standard_normal(CHECK_N, dtype=np.float32) for _ in range(CHECK_STEPS)]
        p, host = cuda.to_device(init), init.copy()
        opt, ref = cls(p, **kw), cls([host], backend="numpy", **kw)
        for g in grads:
            opt.step(cuda.to_device(g))
            ref.step([g])
        got = p.copy_to_host()
        out = {"elements": CHECK_N, "steps": CHECK_STEPS,
               "vs_reference": agreement(got, host)}
        tcls = None if torch is None else getattr(torch.optim, name, None)
        if tcls is not None:
            tp = torch.tensor(init, device=tdev, requires_grad=True)
            topt = tcls([tp], **kw)
            for g in grads:
                tp.grad = torch.tensor(g, device=tdev)
                topt.step()
            out["vs_torch"] = agreement(got, tp.detach().cpu().numpy())
        out["ok"] = all(v["ok"] for k, v in out.items() if k.startswith("vs_"))
        return out

    def family_step(name):
        p = cuda.to_device(rng.standard_normal(BIG, dtype=np.float32))
        g = cuda.to_device(rng.standard_normal(BIG, dtype=np.float32))
        opt = getattr(fastopt, name)(p, **FAMILY[name])
        opt.step(g)          # compiles (or loads) this optimizer's kernel, makes its state
        states = len(opt.state[0]["flat"])
        moved = family_bytes(states, two_pass=name in TWO_PASS)
        return step_rate(opt, g, moved=moved) | {"state_buffers": states}

    def torch_family_step(name, impl, states):
        q = torch.randn(BIG, device=tdev, requires_grad=True)
        q.grad = torch.randn_like(q)
        opt = getattr(torch.optim, name)([q], **FAMILY[name], **{impl: True})
        t = best_time(opt.step, tsync, reps, trials)
        return {"elements": BIG, "impl": impl, "seconds": t,
                "gbps": family_bytes(states) / t / 1e9}

    family = {}
    for name in FAMILY:
        key = name.lower()
        measure(R, f"check_{key}_vs_reference_and_torch", lambda: family_check(name))
        measure(R, f"fastopt_{key}_fp32_64M", lambda: family_step(name))
        states = R[f"fastopt_{key}_fp32_64M"].get("state_buffers")
        rows = {}
        if torch is None or not hasattr(torch.optim, name):
            why = torch_why or f"torch {torch.__version__} has no {name}"
        elif states is None:
            why = "fastopt's step did not run"
        else:
            why = None
            for impl in torch_impls(getattr(torch.optim, name)):
                rows[impl] = f"torch_{impl}_{key}_fp32_64M"
                measure(R, rows[impl], lambda: torch_family_step(name, impl, states))
        if why:
            R[f"torch_{key}_fp32_64M"] = {"skipped": why}
        timed = [i for i in rows if R[rows[i]].get("seconds")]
        best = min(timed, key=lambda i: R[rows[i]]["seconds"], default=None)
        family[name] = {
            "checked_ok": R[f"check_{key}_vs_reference_and_torch"].get("ok"),
            "torch_fastest": best,
            "vs_torch_fastest": None if best is None else ratio(f"fastopt_{key}_fp32_64M",
                                                                rows[best])}

    # -- SAM and L-BFGS on device params ----------------------------------------------------
    def sam_pair(n, dtype=np.float32):
        """SAM around SGD on ``n`` device params, and (n small) on the host."""
        init = rng.standard_normal(n).astype(dtype)
        p = cuda.to_device(init)
        return p, init.copy(), fastopt.SAM(fastopt.SGD(p, **SAM_BASE), rho=SAM_RHO)

    def sam_check():
        p, host, sam = sam_pair(CHECK_N)
        ref = fastopt.SAM(fastopt.SGD([host], backend="numpy", **SAM_BASE), rho=SAM_RHO)
        for _ in range(CHECK_STEPS):
            for method in ("perturb", "step"):
                g = rng.standard_normal(CHECK_N, dtype=np.float32)
                getattr(sam, method)(cuda.to_device(g))
                getattr(ref, method)([g])
        out = {"elements": CHECK_N, "rounds": CHECK_STEPS,
               "vs_reference": agreement(p.copy_to_host(), host)}
        return out | {"ok": out["vs_reference"]["ok"]}

    def sam_round():
        p, _, sam = sam_pair(BIG)
        g = cuda.to_device(rng.standard_normal(BIG, dtype=np.float32))

        def one_round():
            sam.perturb(g)    # reads its norm back (whether to skip is decided by it)
            sam.step(g)       # the restore fused into SGD's step
        # perturb: the norm pass reads g, then p, g read and e, p written; the
        # step: SGD with momentum (p, buf read and written, g read) reading e too
        t = best_time(one_round, sync, reps, trials)
        moved = (4 + 16 + 24) * BIG
        out = {"elements": BIG, "seconds": t, "gbps": moved / t / 1e9}
        if roof:
            out["roofline_fraction"] = out["gbps"] / roof
        return out

    def quadratic(n, seed=1):
        """A separable quadratic, 0.5 sum a (x - b)^2, a in [1, 10]: (loss, grad)."""
        q = np.random.default_rng(seed)
        a, b = q.uniform(1.0, 10.0, n), q.standard_normal(n)
        return lambda x: (0.5 * float(np.sum(a * (x - b) ** 2)), a * (x - b))

    def lbfgs_check():
        problem = quadratic(CHECK_N)
        init = np.zeros(CHECK_N)
        p, host = cuda.to_device(init), init.copy()
        opt = fastopt.LBFGS(p, **LBFGS_CHECK)
        ref = fastopt.LBFGS([host], backend="numpy", **LBFGS_CHECK)

        def on_device():
            f, g = problem(p.copy_to_host())
            return f, cuda.to_device(g)
        for _ in range(LBFGS_CALLS):
            opt.step(on_device)
            ref.step(lambda: (lambda f, g: (f, [g]))(*problem(host)))
        got = p.copy_to_host()
        out = {"elements": CHECK_N, "step_calls": LBFGS_CALLS, **LBFGS_CHECK,
               "vs_reference": agreement(got, host)}
        if torch is not None:
            tp = torch.tensor(init, device=tdev, requires_grad=True)
            topt = torch.optim.LBFGS([tp], **LBFGS_CHECK)

            def closure():
                f, g = problem(tp.detach().cpu().numpy())
                tp.grad = torch.tensor(g, device=tdev)
                return torch.tensor(f, dtype=torch.float64)
            for _ in range(LBFGS_CALLS):
                topt.step(closure)
            out["vs_torch"] = agreement(got, tp.detach().cpu().numpy())
        out["ok"] = all(v["ok"] for k, v in out.items() if k.startswith("vs_"))
        return out

    def lbfgs_vectors(m):
        """A history of ``m`` pairs, a gradient and the direction, on the device."""
        from fastopt.backends import flat_cuda
        from fastopt.optim.lbfgs import History
        hist = History(m, BIG, np.float32, flat_cuda)
        for _ in range(m):
            s = rng.standard_normal(BIG, dtype=np.float32)
            hist.S[hist.spare] = cuda.to_device(s)
            hist.Y[hist.spare] = cuda.to_device(s * np.float32(2.0))   # y . s > 0
            hist.keep(1.0 / (2.0 * float(s @ s)))
        g = cuda.to_device(rng.standard_normal(BIG, dtype=np.float32))
        return flat_cuda, hist, g, cuda.device_array(BIG, np.float32)

    def two_loop_bytes(m):
        """Bytes the two-loop recursion over ``m`` pairs moves per element:
        q = -g (8), the first dot (8), m - 1 fused axpy + dot (16) and an
        axpy (12) each way, the scaling fused with a dot (12)."""
        return 8 + 8 + 2 * (16 * (m - 1) + 12) + 12

    def lbfgs_two_loop():
        from fastopt.optim.lbfgs import two_loop
        ops, hist, g, q = lbfgs_vectors(LBFGS_PAIRS)
        t = best_time(lambda: two_loop(ops, hist, g, 0.5, q), sync, reps, trials)
        moved = two_loop_bytes(LBFGS_PAIRS) * BIG
        out = {"elements": BIG, "pairs": LBFGS_PAIRS, "seconds": t, "gbps": moved / t / 1e9}
        if roof:
            out["roofline_fraction"] = out["gbps"] / roof
        return out

    def torch_two_loop():
        """The same recursion in torch tensor operations on CUDA (what
        torch.optim.LBFGS's direction costs), each dot read by the host;
        its GB/s count the bytes fastopt's fused recursion moves."""
        m = LBFGS_PAIRS
        S = [torch.randn(BIG, device=tdev) for _ in range(m)]
        Y = [2 * s for s in S]
        ro = [1.0 / float(y.dot(s)) for s, y in zip(S, Y)]
        g = torch.randn(BIG, device=tdev)

        def recursion():
            q = g.neg()
            alpha = [0.0] * m
            for i in range(m - 1, -1, -1):
                alpha[i] = float(S[i].dot(q)) * ro[i]
                q.add_(Y[i], alpha=-alpha[i])
            q.mul_(0.5)
            for i in range(m):
                q.add_(S[i], alpha=alpha[i] - float(Y[i].dot(q)) * ro[i])
            return q
        t = best_time(recursion, tsync, reps, trials)
        return {"elements": BIG, "pairs": m, "impl": "tensor_ops", "seconds": t,
                "gbps": two_loop_bytes(m) * BIG / t / 1e9}

    measure(R, "check_sam_vs_reference", sam_check)
    measure(R, "fastopt_sam_sgd_round_fp32_64M", sam_round)
    family["SAM"] = {"checked_ok": R["check_sam_vs_reference"].get("ok"),
                     "torch_fastest": None, "vs_torch_fastest": None}
    measure(R, "check_lbfgs_vs_reference_and_torch", lbfgs_check)
    measure(R, "fastopt_lbfgs_two_loop_fp32_64M", lbfgs_two_loop)
    if torch is not None:
        measure(R, "torch_lbfgs_two_loop_fp32_64M", torch_two_loop)
    else:
        R["torch_lbfgs_two_loop_fp32_64M"] = {"skipped": torch_why}
    vs = ratio("fastopt_lbfgs_two_loop_fp32_64M", "torch_lbfgs_two_loop_fp32_64M")
    family["LBFGS"] = {"checked_ok": R["check_lbfgs_vs_reference_and_torch"].get("ok"),
                       "torch_fastest": None if vs is None else "tensor_ops",
                       "vs_torch_fastest": vs}
    report["family"] = family

    # -- the MLP and ensemble checks (gpu_check_nn.py), on the same budget ----------------------
    report["nn"] = _gpu_check_nn().nn_checks(simulate=args.simulate, quick=args.quick,
                                          measure=measure, torch=torch, torch_note=torch_why)

    # -- targets ---------------------------------------------------------------------
    met = {}
    frac = R.get("fastopt_adamw_fp32_64M", {}).get("roofline_fraction")
    met["adamw_fp32_64M_roofline_fraction"] = frac
    met["adamw_fp32_64M_vs_torch_fused"] = ratio("fastopt_adamw_fp32_64M",
                                                 "torch_fused_adamw_fp32_64M")
    met["many_1000x1000_vs_torch_fused"] = ratio("fastopt_adamw_1000x1000_packed",
                                                 "torch_fused_adamw_1000x1000")
    report["measured"] = met
    report["reported"] = {   # no target: recorded for the record
        "vector_path_vs_unaligned_scalar_path_fp32_64M": ratio(
            "fastopt_adamw_fp32_64M", "fastopt_adamw_fp32_64M_unaligned_scalar_path"),
        "clip_adamw_fp32_64M_vs_torch_clip_then_fused": ratio(
            "fastopt_clip_adamw_fp32_64M", "torch_clip_then_fused_adamw_fp32_64M"),
        "bf16_master_64M_vs_torch_fused_bf16_no_master": ratio(
            "fastopt_adamw_bf16_master_64M", "torch_fused_adamw_bf16_64M_no_master")}
    report["targets_met"] = {k: (None if met[k] is None else bool(met[k] >= TARGETS[k]))
                             for k in TARGETS}
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(summary(report))
    print(f"wrote {args.out}")
    tests_ok = args.skip_tests or report["tests"]["ok"]
    checks_ok = (all(f["checked_ok"] is not False for f in family.values())
                 and report["nn"]["all_equal"] and report["compact"]["all_ok"])
    return 0 if tests_ok and checks_ok else 1


def family_bytes(states, two_pass=False):
    """Bytes a float32 step moves: p read and written, g read, each state
    buffer read and written; a two-pass step (LAMB) reads p, g and its
    state and writes its state, then reads p and its state and writes p."""
    if two_pass:
        return 4 * ((2 + 2 * states) + (2 + states)) * BIG
    return 4 * (3 + 2 * states) * BIG


def agreement(got, want):
    """How closely ``got`` follows ``want`` elementwise (see CHECK_RTOL)."""
    err = np.abs(got.astype(np.float64) - want) / np.maximum(np.abs(want), 1.0)
    off = float(np.mean(~(err <= CHECK_RTOL)))       # NaN counts as off
    return {"max_rel_err": float(np.max(err)), "fraction_off": off,
            "ok": off <= CHECK_MAX_OFF}


def torch_impls(tcls):
    """torch's multi-tensor paths for ``tcls``: foreach, and fused where its
    signature has it (a fused path CUDA lacks fails its measurement, said)."""
    import inspect
    params = inspect.signature(tcls).parameters
    return [impl for impl in ("foreach", "fused") if impl in params]


def summary(report) -> str:
    m, t = report["measured"], report["targets_met"]
    lines = [f"card: {report['card']['name']}  driver: {report['card'].get('driver', '?')}"]
    if "tests" in report:
        lines.append(f"tests: {'ok' if report['tests']['ok'] else 'FAILED'} "
                     f"({report['tests']['summary']})")
    for k, v in report["results"].items():
        if "gbps" in v:
            lines.append(f"{k:40s} {v['seconds'] * 1e3:9.3f} ms  {v['gbps']:8.1f} GB/s")
        elif "ok" in v:      # a family check
            errs = ", ".join(f"{w[3:]} {v[w]['max_rel_err']:.1e}" for w in v if w[:3] == "vs_")
            lines.append(f"{k:40s} {'ok' if v['ok'] else 'FAILED'} (max rel err: {errs})")
        else:
            lines.append(f"{k:40s} {v.get('error') or v.get('skipped')}")
    for k, val in report.get("reported", {}).items():
        lines.append(f"reported {k}: {'n/a' if val is None else f'{val:.2f}'}")
    for name, f in report.get("family", {}).items():
        vs = f["vs_torch_fastest"]
        lines.append(f"family {name}: check {'ok' if f['checked_ok'] else 'FAILED'}, "
                     f"vs torch {f['torch_fastest'] or '-'}: "
                     f"{'n/a' if vs is None else f'{vs:.2f}x'}")
    if "nn" in report:
        lines.append(_gpu_check_nn().summary(report["nn"]))
    if "compact" in report:
        lines.append(_section("gpu_check_compact").summary(report["compact"]))
    for k, target in TARGETS.items():
        val = m.get(k)
        shown = "n/a" if val is None else f"{val:.2f}"
        verdict = {True: "met", False: "MISSED", None: "unmeasured"}[t.get(k)]
        lines.append(f"target {k}: {shown} (>= {target}) {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
