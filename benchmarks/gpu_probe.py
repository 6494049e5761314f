"""Diagnostics for the ``cuda`` backend on a real GPU (companion of gpu_check.py).

``gpu_check.py`` answers "are the targets met"; this script answers "why":

* per kernel: registers per thread, local memory, resident blocks per SM
  (the occupancy API), so the launch grid can be checked against it;
* AdamW fp32 at 64M elements, device time by CUDA events, over a sweep of
  grid sizes (1 .. 32 blocks per SM and one thread per element), next to the
  driver's device-to-device copy and a plain Numba copy kernel (the
  bandwidth a simple grid-stride kernel reaches);
* host cost per step: an empty launch, the Adam kernel through the
  dispatcher and through the compiled kernel's ``launch``, and
  ``opt.step`` on 1000 packed tensors, with a cProfile of the latter;
* torch fused / foreach AdamW on 1000 x 1000 and fused on 64M by events;
* fastopt stepping torch CUDA tensors and CuPy arrays (the interop path).

Usage: ``python benchmarks/gpu_probe.py --out DIR`` (writes ``probe.json``
and ``profile_packed.txt`` there; about a minute). Numbers are medians.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BIG = 1 << 26
MANY, EACH = 1000, 1000


def event_seconds(cuda, fn, reps=10, warmup=3, inner=1):
    """Median device seconds per call over ``inner`` calls of ``fn`` between two
    CUDA events (several calls, so the host's launch cost hides behind the
    queued work, as in a training loop)."""
    for _ in range(warmup):
        fn()
    cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = cuda.event(), cuda.event()
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3 / inner)
    return statistics.median(out)


def wall_seconds(sync, fn, calls=300, trials=5):
    """Best wall seconds per call over ``trials`` runs of ``calls`` calls
    (one synchronisation per run: the host cost when it exceeds the GPU's)."""
    from benchmarks.gpu_check import best_time
    return best_time(fn, sync, calls, trials, warmup=10)


def guarded(out, key, fn):
    t0 = time.perf_counter()
    try:
        out[key] = fn()
    except Exception as exc:   # noqa: BLE001 - keep the other probes
        out[key] = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"{key} ({time.perf_counter() - t0:.1f} s): {json.dumps(out[key], default=float)}",
          flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from numba import cuda

    import fastopt
    from fastopt.backends import _cuda_kernels as K
    from fastopt.backends import numba_cuda as C
    from fastopt.backends.scalars import adam_scalars, sgd_scalars
    try:
        import torch
        if not torch.cuda.is_available():
            torch = None
    except ImportError:
        torch = None

    dev = cuda.get_current_device()
    sms = int(getattr(dev, "MULTIPROCESSOR_COUNT", 1))   # 1 under the simulator (dry runs)
    name = getattr(dev, "name", "CUDA simulator")
    R = {"card": name.decode() if isinstance(name, bytes) else str(name), "sms": sms}
    rng = np.random.default_rng(1)
    s = adam_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2,
                     decoupled=True, step=3)
    f32 = np.float32

    def adam_args(p, g, m, v, out=None, ctrl=None):
        return C.adam_args(p, g, m, v, None, s, out, ctrl)

    # -- big fp32 buffers ------------------------------------------------------------
    p = cuda.to_device(rng.standard_normal(BIG, dtype=f32))
    g = cuda.to_device(rng.standard_normal(BIG, dtype=f32))
    m, v = C.zeros(BIG, f32), C.zeros(BIG, f32)
    big_args = adam_args(p, g, m, v)

    def occupancy():
        out = {}
        p16 = C.zeros(1024, np.uint16)
        small = [C.zeros(1024, f32) for _ in range(4)]
        cases = {
            "adam_fp32": (K._update_kernel, big_args),
            "adam_vec_fp32": (K._update_vec_kernel, big_args),
            "adam_bf16_master": (K._update_kernel, adam_args(*small[:1], p16, *small[2:],
                                                             out=p16)),
            "adam_vec_bf16_master": (K._update_vec_kernel, adam_args(*small[:1], p16,
                                                                     *small[2:], out=p16)),
            "sgd_fp32": (K._update_kernel, C.sgd_args(p, g, m, sgd_scalars(
                lr=0.1, momentum=0.1, dampening=0.9, nesterov=True, weight_decay=0.0,
                first_step=False))),
            "sumsq_fp32": (K._sumsq_partial_kernel,
                           (g, *C._scratch(1), 0)),
            "convert_bf16_to_fp32": (K._convert_kernel, (p16, small[0])),
        }
        for name, (kern, a) in cases.items():
            k = kern.compile(tuple(kern.typeof_pyval(x) for x in a))
            out[name] = {"regs_per_thread": int(k.regs_per_thread),
                         "local_mem_per_thread": int(k.local_mem_per_thread),
                         "shared_mem_per_block": int(k.shared_mem_per_block),
                         "resident_blocks_per_sm": int(k.max_cooperative_grid_blocks(
                             K.THREADS)) // sms}
        return out

    guarded(R, "occupancy", occupancy)

    def sweep():
        out = {}
        nbytes = 28 * BIG
        src = cuda.device_array(nbytes // 8, f32)
        dst = cuda.device_array_like(src)
        t = event_seconds(cuda, lambda: dst.copy_to_device(src), inner=10)
        out["d2d_copy"] = {"seconds": t, "gbps": 2 * src.nbytes / t / 1e9}

        @cuda.jit
        def copy_kernel(x, y):
            for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
                y[i] = x[i]
        blocks = C.resident_blocks(copy_kernel, "probe", (src, dst))
        t = event_seconds(cuda, lambda: copy_kernel[blocks, K.THREADS](src, dst), inner=10)
        out["numba_copy_kernel"] = {"blocks": blocks, "seconds": t,
                                    "gbps": 2 * src.nbytes / t / 1e9}
        del src, dst
        grids = {f"{k}_per_sm": k * sms for k in (1, 2, 3, 4, 6, 8, 12, 16, 32)}
        grids["n_over_256"] = (BIG + K.THREADS - 1) // K.THREADS   # 4x the vector path's need
        grids["fastopt_default"] = C.resident_blocks(K._update_vec_kernel, "probe", big_args)
        for name, nb in grids.items():
            t = event_seconds(cuda, lambda: K._update_vec_kernel[nb, K.THREADS](*big_args),
                              inner=10)
            out[f"adam_vec_{name}"] = {"blocks": nb, "seconds": t, "gbps": nbytes / t / 1e9}
        nb = C.resident_blocks(K._update_kernel, "probe", big_args)
        t = event_seconds(cuda, lambda: K._update_kernel[nb, K.THREADS](*big_args), inner=10)
        out["adam_scalar_kernel"] = {"blocks": nb, "seconds": t, "gbps": nbytes / t / 1e9}
        opt = fastopt.AdamW(p, lr=1e-3, weight_decay=1e-2)
        t = event_seconds(cuda, lambda: opt.step(g), inner=10)
        out["opt_step_adamw_fp32"] = {"seconds": t, "gbps": nbytes / t / 1e9}
        opt = fastopt.AdamW(p, lr=1e-3, max_grad_norm=1.0)
        t = event_seconds(cuda, lambda: opt.step(g), inner=10)
        out["opt_step_clip_adamw_fp32"] = {"seconds": t, "gbps": (nbytes + 4 * BIG) / t / 1e9}
        t = event_seconds(cuda, lambda: C.norm_control([g]), inner=10)
        out["norm_only"] = {"seconds": t, "gbps": 4 * BIG / t / 1e9}
        return out

    guarded(R, "bandwidth_64M", sweep)

    def host_costs():
        out = {}
        n = MANY * EACH
        params = C.pack([rng.standard_normal(EACH, dtype=f32) for _ in range(MANY)])
        grads = params.zeros_like()
        grads.data.copy_to_device(rng.standard_normal(n, dtype=f32))
        opt = fastopt.AdamW(params, lr=1e-3, weight_decay=1e-2)

        @cuda.jit
        def empty(x):
            pass
        one = C.zeros(1, f32)
        out["empty_launch_1_array"] = wall_seconds(cuda.synchronize,
                                                   lambda: empty[1, 32](one))
        pm, gm = params.data, grads.data
        mm, vm = C.zeros(n, f32), C.zeros(n, f32)
        a = adam_args(pm, gm, mm, vm)
        nb = C.resident_blocks(K._update_kernel, "probe", a)
        out["adam_1M_device"] = event_seconds(cuda, lambda: K._update_kernel[nb, K.THREADS](*a),
                                              inner=50)
        out["adam_1M_dispatcher_launch"] = wall_seconds(
            cuda.synchronize, lambda: K._update_kernel[nb, K.THREADS](*a))
        # the pieces of a backend call, each alone (host seconds per call)
        out["get_current_device"] = wall_seconds(cuda.synchronize, cuda.get_current_device)
        out["unit_control"] = wall_seconds(cuda.synchronize, lambda: C._unit_control(f32))
        out["resident_blocks_cached"] = wall_seconds(
            cuda.synchronize, lambda: C.resident_blocks(K._update_kernel, "probe", a))
        out["configure"] = wall_seconds(cuda.synchronize, lambda: K._update_kernel[nb, K.THREADS])
        out["scalars"] = wall_seconds(cuda.synchronize, lambda: adam_scalars(
            lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled=True,
            step=3))
        out["device_array_2x"] = wall_seconds(
            cuda.synchronize, lambda: (cuda.device_array(4, np.float64),
                                       cuda.device_array(2, np.float32)))
        out["adam_1M_backend_call"] = wall_seconds(
            cuda.synchronize, lambda: C.adam_update(pm, gm, mm, vm, None, s))
        out["opt_step_packed_1000x1000"] = wall_seconds(cuda.synchronize,
                                                        lambda: opt.step(grads))
        clip = fastopt.AdamW(params, lr=1e-3, max_grad_norm=1.0)
        out["opt_step_packed_clip_1000x1000"] = wall_seconds(cuda.synchronize,
                                                             lambda: clip.step(grads))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            opt.step(grads)
        cuda.synchronize()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        (args.out / "profile_packed.txt").write_text(buf.getvalue())
        return out

    guarded(R, "host_seconds", host_costs)

    if torch is not None:
        def torch_probe():
            out = {}
            for label, n, count in (("1000x1000", EACH, MANY), ("64M", BIG, 1)):
                ps = [torch.randn(n, device="cuda", requires_grad=True) for _ in range(count)]
                for q in ps:
                    q.grad = torch.randn_like(q)
                for mode in ("fused", "foreach"):
                    o = torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, **{mode: True})
                    out[f"{mode}_{label}_wall"] = wall_seconds(
                        torch.cuda.synchronize, o.step, calls=100 if count > 1 else 30)
                    out[f"{mode}_{label}_device"] = event_seconds(cuda, o.step, inner=10)
                del ps, o
            # fastopt stepping torch tensors (interop path, one 64M tensor)
            tp = torch.randn(BIG, device="cuda")
            tg = torch.randn(BIG, device="cuda")
            o = fastopt.AdamW(tp, lr=1e-3, weight_decay=1e-2)
            out["fastopt_on_torch_64M_device"] = event_seconds(cuda, lambda: o.step(tg), inner=10)
            small = [torch.randn(EACH, device="cuda") for _ in range(10)]
            sg = [torch.randn_like(x) for x in small]
            o = fastopt.AdamW(small, lr=1e-3)
            out["fastopt_on_10_torch_tensors_wall"] = wall_seconds(
                torch.cuda.synchronize, lambda: o.step(sg), calls=100)
            return out

        guarded(R, "torch", torch_probe)

    def cupy_probe():
        import cupy
        x = cupy.random.standard_normal(1 << 20, dtype=cupy.float32)
        gx = cupy.random.standard_normal(1 << 20, dtype=cupy.float32)
        o = fastopt.AdamW(x, lr=1e-3)
        before = cupy.asnumpy(x)
        o.step(gx)
        cupy.cuda.Device().synchronize()
        changed = float(abs(cupy.asnumpy(x) - before).max())
        return {"step_wall": wall_seconds(cupy.cuda.Device().synchronize,
                                          lambda: o.step(gx), calls=100),
                "max_change_after_one_step": changed}

    guarded(R, "cupy", cupy_probe)

    (args.out / "probe.json").write_text(json.dumps(R, indent=2, default=float) + "\n")
    print(f"wrote {args.out / 'probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
