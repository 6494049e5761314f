"""Compact optimizer state on the GPU (issue #18): AdamW with
``state_dtype="bfloat16"`` and ``"int8"`` against float32 state, timed and
checked, as a section of ``benchmarks/gpu_check.py``'s run
(:func:`compact_checks`; ``report["compact"]``).

1. correctness: 10 AdamW steps over 1M float32 params (three arrays, so the
   8-bit layout pads between them) on the device and on the CPU Numba
   backend with the same ``state_seed``: the share of codes that are equal,
   the decoded state and the params within a code step (a GPU contracts
   multiply-adds into FMAs, so a value may differ in its last bit and a
   stochastic rounding, now and then, go the other way; under the CUDA
   simulator they are equal bit for bit, tested in
   ``tests/cuda_sim/test_cuda_compact.py``); then a checkpoint round trip:
   ``state_dict`` of the device optimizer (host codes), loaded into a new
   device optimizer, two more steps each, bit for bit;
2. speed: AdamW's step at 16M and 64M elements with each state dtype,
   achieved GB/s for the step's own bytes (28, 20 and ~16 per element:
   ``fastopt.bench.cases.step_bytes``), the fraction of the copy roofline,
   and the ratio to the float32-state step and to torch's fused AdamW
   (float32 state) where torch has CUDA.

Run on its own by ``gpu_check.py`` only (it shares that run's time budget
and roofline); ``--simulate`` there runs this path with tiny sizes.
"""

from __future__ import annotations

import numpy as np

STATE_DTYPES = ("float32", "bfloat16", "int8")
SIZES = {"16M": 1 << 24, "64M": 1 << 26}
SIMULATED_SIZES = {"16M": 1 << 9, "64M": 1 << 10}
CHECK_SIZES, CHECK_STEPS = (1 << 19, (1 << 19) + 77, 1000), 10
SIMULATED_CHECK = (300, 40, 5), 3
ADAMW = dict(lr=1e-3, weight_decay=1e-2)
SEED = 18
#: a decoded state value or param agrees within this relative error (a code
#: step of the 8-bit map is 1/16 to 1/8 of its value; bfloat16 keeps 8 bits)
CHECK_RTOL = {"bfloat16": 1e-2, "int8": 0.13}
#: the share of elements allowed outside it (roundings the FMAs flipped)
CHECK_MAX_OFF = 1e-3


def _problem(sizes, steps, seed=0):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(n, dtype=np.float32) for n in sizes]
    grads = [[rng.standard_normal(n, dtype=np.float32) for n in sizes] for _ in range(steps)]
    return init, grads


def _state_on_host(opt):
    return {n: (b if isinstance(b, np.ndarray) else b.copy_to_host())
            for n, b in opt.state[0]["flat"].items()}


def _decoded(opt):
    return opt._state_format.decoded(_state_on_host(opt),
                                     [a.size for a in opt.param_groups[0]["params"]])


def _off(got, want, rtol):
    """Share of elements of ``got`` farther than ``rtol`` (relative, floor
    1e-6 in the divisor) from ``want``; NaN counts as off."""
    err = np.abs(got.astype(np.float64) - want) / np.maximum(np.abs(want), 1e-6)
    return float(np.mean(~(err <= rtol)))


def check_against_cpu(fastopt, cuda, state_dtype, sizes, steps):
    """AdamW with compact state on the device vs the CPU Numba backend."""
    init, grads = _problem(sizes, steps)
    kw = dict(ADAMW, state_dtype=state_dtype, state_seed=SEED)
    dp = [cuda.to_device(a) for a in init]
    hp = [a.copy() for a in init]
    gpu = fastopt.AdamW(dp, backend="cuda", **kw)
    cpu = fastopt.AdamW(hp, backend="numba", **kw)
    for g in grads:
        gpu.step([cuda.to_device(x) for x in g])
        cpu.step(g)
    got, want = _state_on_host(gpu), _state_on_host(cpu)
    codes = {n: float(np.mean(got[n] == want[n])) for n in want if not n.endswith(".absmax")}
    rtol = CHECK_RTOL[state_dtype]
    dec_gpu, dec_cpu = _decoded(gpu), _decoded(cpu)
    off = {n: _off(dec_gpu[n], dec_cpu[n], rtol) for n in dec_cpu}
    params = np.concatenate([d.copy_to_host() for d in dp])
    off["params"] = _off(params, np.concatenate(hp), 1e-4)
    out = {"sizes": list(sizes), "steps": steps, "codes_equal_share": codes,
           "fraction_off": off, "rtol": rtol,
           "state_nbytes": gpu.state_nbytes(), "state_nbytes_cpu": cpu.state_nbytes(),
           "bit_identical": all(np.array_equal(got[n], want[n]) for n in want)}
    out["ok"] = (max(off.values()) <= CHECK_MAX_OFF
                 and out["state_nbytes"] == out["state_nbytes_cpu"])
    return out


def checkpoint_round_trip(fastopt, cuda, state_dtype, sizes):
    """2 steps, ``state_dict`` (host codes), load into a new device
    optimizer, 2 more steps each: the same bits as the uninterrupted run."""
    init, grads = _problem(sizes, 4, seed=1)
    kw = dict(ADAMW, state_dtype=state_dtype, state_seed=SEED)
    dp = [cuda.to_device(a) for a in init]
    opt = fastopt.AdamW(dp, backend="cuda", **kw)
    for g in grads[:2]:
        opt.step([cuda.to_device(x) for x in g])
    sd = opt.state_dict()
    host_codes = all(isinstance(b, np.ndarray) and b.dtype.kind in "iuf"
                     for b in sd["state"][0]["buffers"].values())
    twin_p = [cuda.to_device(d.copy_to_host()) for d in dp]
    twin = fastopt.AdamW(twin_p, backend="cuda", **kw)
    twin.load_state_dict(sd)
    for g in grads[2:]:
        opt.step([cuda.to_device(x) for x in g])
        twin.step([cuda.to_device(x) for x in g])
    same_state = all(np.array_equal(a, b) for a, b in
                     zip(_state_on_host(opt).values(), _state_on_host(twin).values()))
    same_params = all(np.array_equal(a.copy_to_host(), b.copy_to_host())
                      for a, b in zip(dp, twin_p))
    return {"host_codes_in_state_dict": host_codes, "same_state": same_state,
            "same_params": same_params, "ok": host_codes and same_state and same_params}


def compact_checks(*, fastopt, cuda, measure, best_time, simulate=False, quick=False,
                   torch=None, tdev="cuda", torch_note=None, roof=None) -> dict:
    """Every check above; returns ``{"results", "ratios", "all_ok"}``.
    ``measure``/``best_time``: gpu_check.py's (its time budget); ``roof``
    its copy roofline in GB/s (None: not measured); ``torch`` with CUDA (or
    on ``tdev="cpu"`` in the dry run), or None (``torch_note`` says why)."""
    from fastopt.bench.cases import step_bytes
    sizes = SIMULATED_SIZES if simulate else SIZES
    check_sizes, check_steps = SIMULATED_CHECK if simulate else (CHECK_SIZES, CHECK_STEPS)
    trials, reps = (1, 1) if simulate else ((3, 10) if quick else (5, 30))
    sync = cuda.synchronize
    R = {}
    rng = np.random.default_rng(0)
    for sd in STATE_DTYPES[1:]:
        measure(R, f"check_adamw_{sd}_vs_cpu_numba",
                lambda sd=sd: check_against_cpu(fastopt, cuda, sd, check_sizes, check_steps))
        measure(R, f"checkpoint_adamw_{sd}_device_round_trip",
                lambda sd=sd: checkpoint_round_trip(fastopt, cuda, sd, check_sizes))

    def step(n, sd):
        p = cuda.to_device(rng.standard_normal(n, dtype=np.float32))
        g = cuda.to_device(rng.standard_normal(n, dtype=np.float32))
        opt = fastopt.AdamW(p, backend="cuda", state_dtype=sd, **ADAMW)
        opt.step(g)          # compiles (or loads) the kernel, makes the state
        t = best_time(lambda: opt.step(g), sync, reps, trials)
        moved = step_bytes("adamw", n, np.float32, state=sd)
        out = {"elements": n, "state_dtype": sd, "bytes_per_element": moved / n,
               "state_nbytes": opt.state_nbytes(), "seconds": t, "gbps": moved / t / 1e9}
        if roof:
            out["roofline_fraction"] = out["gbps"] / roof
        return out

    def torch_fused(n):
        q = torch.randn(n, device=tdev, requires_grad=True)
        q.grad = torch.randn_like(q)
        opt = torch.optim.AdamW([q], fused=True, **ADAMW)
        tsync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
        t = best_time(opt.step, tsync, reps, trials)
        return {"elements": n, "seconds": t, "gbps": step_bytes("adamw", n, np.float32) / t / 1e9}

    ratios = {}
    for label, n in sizes.items():
        for sd in STATE_DTYPES:
            measure(R, f"fastopt_adamw_{sd}_state_{label}", lambda n=n, sd=sd: step(n, sd))
        if torch is not None:
            measure(R, f"torch_fused_adamw_fp32_{label}", lambda n=n: torch_fused(n))
        else:
            R[f"torch_fused_adamw_fp32_{label}"] = {"skipped": torch_note}
        base = R[f"fastopt_adamw_float32_state_{label}"].get("seconds")
        tt = R[f"torch_fused_adamw_fp32_{label}"].get("seconds")
        for sd in STATE_DTYPES[1:]:
            t = R[f"fastopt_adamw_{sd}_state_{label}"].get("seconds")
            ratios[f"{sd}_{label}_vs_float32_state"] = base / t if t and base else None
            ratios[f"{sd}_{label}_vs_torch_fused_fp32"] = tt / t if t and tt else None
    # a check that failed or raised fails the run; one the time budget skipped does not
    failed = [k for k, v in R.items() if k.startswith(("check_", "checkpoint_"))
              and (v.get("ok") is False or "error" in v)]
    return {"results": R, "ratios": ratios, "failed": failed, "all_ok": not failed}


def summary(section) -> str:
    lines = []
    for k, v in section["results"].items():
        if "gbps" in v:
            lines.append(f"compact {k:36s} {v['seconds'] * 1e3:9.3f} ms  {v['gbps']:8.1f} GB/s")
        elif "ok" in v:
            lines.append(f"compact {k:36s} {'ok' if v['ok'] else 'FAILED'}")
        else:
            lines.append(f"compact {k:36s} {v.get('error') or v.get('skipped')}")
    for k, val in section["ratios"].items():
        lines.append(f"compact {k}: {'n/a' if val is None else f'{val:.2f}x'}")
    return "\n".join(lines)
