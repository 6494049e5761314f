"""The MLP and ensemble checks of the ``cuda`` nn backend on a GPU.

Run on a machine with an NVIDIA GPU and numba-cuda (``pip install
'fastopt[cuda]'``; CuPy or nvmath-python too for cuBLAS, torch with CUDA
for the baselines)::

    python benchmarks/gpu_check_nn.py            # writes benchmarks/results/gpu_nn.json
    python benchmarks/gpu_check_nn.py --quick    # fewer repetitions

or from ``benchmarks/gpu_check.py``: :func:`nn_checks` returns the same
section as a dict. It installs nothing and needs no network. In one process,
on one card, for every product engine that runs here (the numba kernels
always; cuBLAS through CuPy / nvmath-python where they import):

1. equality with the CPU path: an MLP 784-256-256-10 and an ensemble of 8
   of them (a learning rate and a batch per model), forward, backward and
   3 AdamW steps on the device against ``backend="numpy"`` in float32;
2. the MLP's AdamW step at batch 256 against torch on CUDA (eager, fused
   AdamW) and ``torch.compile`` where it works;
3. an ensemble of 64 such models (one shared batch of 256) against torch
   ``baddbmm`` eager with fused AdamW;
4. an MLP 4096-4096-4096 at batch 1024: the TFLOP/s of the step's five
   products against torch's float32 GEMM (cuBLAS sgemm, TF32 off) on one
   1024 x 4096 x 4096 product alone.

Times are wall clock around ``reps`` steps between two synchronisations,
best of several trials (host cost per step included). fastopt's steps are
timed with ``sync=False`` (no read-back per step, like torch's); the MLP is
also timed reading its loss every step, as a loop that prints it would.
Without a GPU it exits with status 2, writing nothing. ``--simulate`` (with
``NUMBA_ENABLE_CUDASIM=1``) runs the whole path with tiny sizes and the torch
baselines on the CPU, to test this script (tests/test_nn_cuda.py); its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "gpu_nn.json"
#: the sizes of the measured cases; SIMULATED: the same path, tiny
SIZES = {"mlp": (784, 256, 256, 10), "batch": 256, "ensemble": 64, "ensemble_check": 8,
         "wide": (4096, 4096, 4096), "wide_batch": 1024}
SIMULATED = {"mlp": (6, 5, 3), "batch": 4, "ensemble": 2, "ensemble_check": 2,
             "wide": (5, 4), "wide_batch": 3}
#: equality with the CPU path: loss and gradients within this of each array's
#: largest magnitude. Params after AdamW steps get more room (PARAMS_*): an
#: element whose gradient is near AdamW's eps moves by lr * g / (|g| + eps), so
#: a rounding difference in g is magnified up to lr / eps times there; two
#: CPU backends (numba vs numpy, 784-256-256-10, batch 256) already differ
#: by 2.1e-5 of the scale in 2 of 270k elements after one step.
RTOL = 1e-5
PARAMS_RTOL, PARAMS_OUTLIERS = 1e-3, 1e-4


def _gpu_check():
    """benchmarks/gpu_check.py as a module: its GPU probe and timing helpers."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import gpu_check
    return gpu_check


# -- what the cases run ----------------------------------------------------------------------

def batch(sizes, B, k=None, seed=0, dtype=np.float32):
    """A seeded batch ``[B, n_in]`` (``[k, B, n_in]`` when ``k``) and its labels."""
    rng = np.random.default_rng(seed)
    shape = (B,) if k is None else (k, B)
    return (rng.standard_normal(shape + (sizes[0],)).astype(dtype),
            rng.integers(0, sizes[-1], shape))


def step_flops(sizes, B) -> float:
    """FLOPs of one training step's products: forward and weight gradient
    of every layer, the upstream gradient of all but the first."""
    pairs = [a * b for a, b in zip(sizes, sizes[1:])]
    return 2.0 * B * (2 * sum(pairs) + sum(pairs[1:]))


def fastopt_step(sizes, B, k=1, engine="numba", sync=False):
    """``(step, net)``: one AdamW training step of a ``backend="cuda"`` MLP
    (``k`` = 1) or ensemble on a device batch (shared by the models)."""
    from numba import cuda

    import fastopt
    from fastopt.nn import MLP, Ensemble, _cuda
    _cuda.select(engine)
    net = (MLP(sizes, seed=0, backend="cuda") if k == 1 else
           Ensemble(k, sizes, seed=0, backend="cuda"))
    opt = fastopt.AdamW(net.param_groups(), lr=1e-3)
    X, y = batch(sizes, B)
    Xd, yd = cuda.to_device(X), cuda.to_device(y)
    return (lambda: net.train_step(opt, Xd, yd, sync=sync)), net


def torch_mlp_step(torch, sizes, B, device="cuda", compiled=False):
    """torch's step for the same MLP: Linear/ReLU, cross-entropy, fused AdamW."""
    layers = []
    for n_in, n_out in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    X = torch.randn(B, sizes[0], device=device)
    y = torch.randint(0, sizes[-1], (B,), device=device)

    def loss():
        return torch.nn.functional.cross_entropy(model(X), y)
    loss_fn = torch.compile(loss) if compiled else loss

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
    return step


def torch_ensemble_step(torch, k, sizes, B, device="cuda"):
    """K MLPs in torch as stacked weights: ``baddbmm`` per layer, the sum of
    the K mean cross-entropies (each model's gradient is its own), fused AdamW."""
    Ws = [(torch.randn(k, a, b, device=device) * math.sqrt(2.0 / a)).requires_grad_()
          for a, b in zip(sizes, sizes[1:])]
    bs = [torch.zeros(k, 1, b, device=device, requires_grad=True) for b in sizes[1:]]
    opt = torch.optim.AdamW(Ws + bs, lr=1e-3, fused=True)
    X = torch.randn(B, sizes[0], device=device).expand(k, B, sizes[0])
    y = torch.randint(0, sizes[-1], (k * B,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        h = X
        for l, (W, b) in enumerate(zip(Ws, bs)):
            h = torch.baddbmm(b, h, W)
            if l < len(Ws) - 1:
                h = torch.relu(h)
        loss = torch.nn.functional.cross_entropy(h.reshape(k * B, -1), y, reduction="sum") / B
        loss.backward()
        opt.step()
    return step


# -- 1. equality with the CPU path -------------------------------------------------------------

def _rel(a, b) -> float:
    """max |a - b| over the largest magnitude of b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def equality(sizes, B, k=1, engine="numba", steps=3, per_model=False) -> dict:
    """Forward, backward and ``steps`` AdamW steps on the device against
    ``backend="numpy"`` in float32: the largest differences relative to each
    array's scale, and whether they are within the tolerances above."""
    import fastopt
    from fastopt.nn import Ensemble, _cuda
    _cuda.select(engine)
    lrs = [1e-3 * (i + 1) for i in range(k)] if per_model else None
    nets = [Ensemble(k, sizes, seed=0, backend=b) for b in ("numpy", "cuda")]
    opts = [fastopt.AdamW(n.param_groups(lr=lrs), lr=1e-3) for n in nets]
    X, y = batch(sizes, B, k if per_model else None, seed=1)
    out = {"init": _rel(nets[1].params.data.copy_to_host(), nets[0].params.data)}
    ref_loss, dev_loss = (n.loss_and_grad(X, y) for n in nets)
    out["loss"] = _rel(dev_loss, ref_loss)
    out["grads"] = _rel(nets[1].grads.data.copy_to_host(), nets[0].grads.data)
    out["forward"] = _rel(nets[1].forward(X), nets[0].forward(X))
    for _ in range(steps):
        ref_loss, dev_loss = (n.train_step(o, X, y) for n, o in zip(nets, opts))
    out["loss_after_steps"] = _rel(dev_loss, ref_loss)
    ref, dev = nets[0].params.data, nets[1].params.data.copy_to_host()
    out["params_after_steps"] = _rel(dev, ref)
    beyond = np.abs(dev.astype(np.float64) - ref) > RTOL * np.abs(ref).max()
    out["params_beyond_rtol"] = int(beyond.sum())
    out["ok"] = bool(out["init"] == 0.0
                     and max(out["loss"], out["grads"], out["forward"],
                             out["loss_after_steps"]) <= RTOL
                     and out["params_after_steps"] <= PARAMS_RTOL
                     and beyond.mean() <= PARAMS_OUTLIERS)
    return {"sizes": list(sizes), "batch": B, "models": k, "engine": engine, "steps": steps,
            **out}


# -- the whole check ----------------------------------------------------------------------------

def nn_checks(*, simulate=False, quick=False, measure=None, best_time=None, torch=None,
              torch_note=None) -> dict:
    """Every check above; returns ``{"engines", "equality", "results",
    "reported", "all_equal"}``. ``measure(results, key, fn)`` and
    ``best_time(step, sync, reps, trials)`` default to gpu_check.py's; give
    them to share its time budget. ``torch``: torch with CUDA, or None
    (``torch_note`` says why) to skip the baselines."""
    from numba import cuda
    gc = _gpu_check()
    measure = measure or gc.measure
    if best_time is None:     # the simulator: one step each, no warm-up
        best_time = ((lambda *a: gc.best_time(*a, warmup=0)) if simulate else gc.best_time)
    S = SIMULATED if simulate else SIZES
    trials, reps = (1, 1) if simulate else ((3, 10) if quick else (5, 30))
    steps = 1 if simulate else 3
    sync = cuda.synchronize
    device = "cpu" if simulate else "cuda"      # the simulator has no torch CUDA
    tsync = (lambda: None) if simulate or torch is None else torch.cuda.synchronize

    def timed(step, flops=None, syncer=sync):
        t = best_time(step, syncer, reps, trials)
        out = {"seconds": t}
        if flops:
            out["tflops"] = flops / t / 1e12
        return out

    from fastopt.nn import _cuda
    found = _cuda.engines()
    E, R = {}, {}
    for eng in found:
        measure(E, f"mlp_{eng}", lambda e=eng: equality(S["mlp"], S["batch"], engine=e,
                                                        steps=steps))
        measure(E, f"ensemble_{eng}", lambda e=eng: equality(
            S["mlp"], S["batch"], S["ensemble_check"], engine=e, steps=steps, per_model=True))
    for eng in found:
        measure(R, f"fastopt_mlp_step_{eng}", lambda e=eng: timed(
            fastopt_step(S["mlp"], S["batch"], engine=e)[0], step_flops(S["mlp"], S["batch"])))
        measure(R, f"fastopt_ensemble{S['ensemble']}_step_{eng}", lambda e=eng: timed(
            fastopt_step(S["mlp"], S["batch"], S["ensemble"], engine=e)[0],
            S["ensemble"] * step_flops(S["mlp"], S["batch"])))
        measure(R, f"fastopt_wide_step_{eng}", lambda e=eng: timed(
            fastopt_step(S["wide"], S["wide_batch"], engine=e)[0],
            step_flops(S["wide"], S["wide_batch"])))
    best = found[-1]     # cuBLAS where it runs: what "auto" picks
    measure(R, f"fastopt_mlp_step_{best}_reading_the_loss", lambda: timed(
        fastopt_step(S["mlp"], S["batch"], engine=best, sync=True)[0]))
    if torch is None:
        for key in ("torch_mlp_step_eager", "torch_ensemble_step_bmm_eager", "torch_sgemm"):
            R[key] = {"skipped": torch_note or "torch with CUDA not importable"}
    else:
        measure(R, "torch_mlp_step_eager", lambda: timed(
            torch_mlp_step(torch, S["mlp"], S["batch"], device), syncer=tsync))
        if simulate:
            R["torch_mlp_step_compiled"] = {"skipped": "not under the simulator"}
        else:
            measure(R, "torch_mlp_step_compiled", lambda: timed(
                torch_mlp_step(torch, S["mlp"], S["batch"], device, compiled=True),
                syncer=tsync))
        measure(R, "torch_ensemble_step_bmm_eager", lambda: timed(
            torch_ensemble_step(torch, S["ensemble"], S["mlp"], S["batch"], device),
            syncer=tsync))
        measure(R, "torch_sgemm", lambda: _torch_sgemm(torch, S["wide_batch"], S["wide"][1],
                                                      device, timed, tsync))

    def ratio(fast, slow):       # how many times faster `fast` ran than `slow`
        a, b = R.get(fast, {}).get("seconds"), R.get(slow, {}).get("seconds")
        return b / a if a and b else None

    wide_tflops = R.get(f"fastopt_wide_step_{best}", {}).get("tflops")
    sgemm_tflops = R.get("torch_sgemm", {}).get("tflops")
    reported = {
        "mlp_vs_torch_eager": ratio(f"fastopt_mlp_step_{best}", "torch_mlp_step_eager"),
        "mlp_vs_torch_compiled": ratio(f"fastopt_mlp_step_{best}", "torch_mlp_step_compiled"),
        "ensemble_vs_torch_bmm_eager": ratio(f"fastopt_ensemble{S['ensemble']}_step_{best}",
                                             "torch_ensemble_step_bmm_eager"),
        "wide_step_fraction_of_sgemm_tflops": (wide_tflops / sgemm_tflops
                                               if wide_tflops and sgemm_tflops else None)}
    return {"engines": found, "sizes": S, "equality": E, "results": R, "reported": reported,
            "all_equal": all(e.get("ok") is True for e in E.values())}


def _torch_sgemm(torch, M, N, device, timed, tsync):
    """torch's float32 GEMM (cuBLAS sgemm on CUDA, TF32 off) for one
    ``[M, N] @ [N, N]`` product: the throughput the wide MLP is held to."""
    a = torch.randn(M, N, device=device)
    b = torch.randn(N, N, device=device)
    c = torch.empty(M, N, device=device)
    was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return timed(lambda: torch.mm(a, b, out=c), 2.0 * M * N * N, tsync)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was


def summary(section) -> str:
    lines = [f"nn engines: {', '.join(section['engines'])}"]
    for key, e in section["equality"].items():
        if "error" in e or "skipped" in e:
            lines.append(f"equality {key}: {e.get('error') or e.get('skipped')}")
            continue
        lines.append(f"equality {key}: {'ok' if e['ok'] else 'DIFFERS'} (loss {e['loss']:.1e}, "
                     f"grads {e['grads']:.1e}, params after {e['steps']} steps "
                     f"{e['params_after_steps']:.1e})")
    for key, r in section["results"].items():
        if "seconds" in r:
            tf = f"  {r['tflops']:7.2f} TFLOP/s" if "tflops" in r else ""
            lines.append(f"{key:48s} {r['seconds'] * 1e3:9.3f} ms{tf}")
        else:
            lines.append(f"{key:48s} {r.get('error') or r.get('skipped')}")
    for key, val in section["reported"].items():
        lines.append(f"reported {key}: {'n/a' if val is None else f'{val:.2f}'}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON path")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--simulate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.simulate and not os.environ.get("NUMBA_ENABLE_CUDASIM"):
        ap.error("--simulate needs NUMBA_ENABLE_CUDASIM=1 in the environment")
    gc = _gpu_check()
    try:
        cuda, _ = gc.require_gpu(simulate=args.simulate)
    except gc.NoGPU as exc:
        print(f"gpu_check_nn: no GPU run possible: {exc}", file=sys.stderr)
        return 2
    if args.simulate:      # the baselines' code runs on the CPU
        try:
            import torch
            why = None
        except ImportError:
            torch, why = None, "torch not installed"
    else:
        torch, why = gc.torch_cuda()
    t0 = time.perf_counter()
    report = {"card": gc.card_info(cuda), "versions": gc.versions(),
              "simulated": bool(args.simulate),
              "method": "wall clock over reps steps between synchronisations, best of trials",
              **nn_checks(simulate=args.simulate, quick=args.quick, torch=torch,
                          torch_note=why)}
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(summary(report))
    print(f"wrote {args.out}")
    return 0 if report["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
