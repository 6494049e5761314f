"""Mixed precision: 16-bit params and grads with a float32 master copy, one
fused pass (28 bytes per element, as float32), against torch's fused AdamW
on bf16 params (no master copy: 14 bytes per element, updates rounded to
bf16 every step)."""

import numpy as np

import fastopt
from fastopt.bench import cases, mixed_precision, timing

from . import common

SIZES = [1 << 20, 1 << 24]
DTYPES = ["bfloat16", "float16", "float32"]


class MixedPrecisionAdamWStep:
    params = (SIZES, DTYPES, common.FASTOPT_BACKENDS + ["torch-fused"])
    param_names = ["size", "dtype", "impl"]

    def setup(self, size, dtype, impl):
        self.step = mixed_precision.adamw_step(impl, dtype, *mixed_precision.data(size))

    def time_step(self, size, dtype, impl):
        self.step()


class LossScaledStep:
    """bf16 AdamW with dynamic loss scaling: unscale folded into the step,
    plus the non-finite check's read of the grads."""

    params = ([cases.MIXED_PRECISION_ELEMENTS], ["none", "loss_scaler"],
              common.FASTOPT_BACKENDS)
    param_names = ["size", "scaling", "backend"]

    def setup(self, size, scaling, backend):
        common.require_backend(backend)
        dt = mixed_precision.dtype("bfloat16")
        rng = np.random.default_rng(0)
        params = fastopt.pack([rng.standard_normal(size, dtype=np.float32).astype(dt)])
        grads = params.zeros_like()
        grads.data[:] = rng.standard_normal(size, dtype=np.float32).astype(dt)
        scaler = fastopt.LossScaler(init_scale=1.0) if scaling == "loss_scaler" else None
        opt = fastopt.AdamW(params, lr=1e-3, backend=backend, loss_scaler=scaler)
        self.step = lambda: opt.step(grads)
        timing.warm_up(self.step)

    def time_step(self, size, scaling, backend):
        self.step()


class MixedPrecisionRatios:
    """Same-run speedups over torch fused AdamW on bf16 params
    (``cases.MIXED_PRECISION_ELEMENTS``, 4M elements)."""

    params = [common.FASTOPT_BACKENDS]
    param_names = ["backend"]

    def setup_cache(self):
        mixed_precision.dtype("bfloat16")
        return mixed_precision.mixed_precision_case(rounds=3, block=0.05)

    setup_cache.timeout = common.CACHE_TIMEOUT

    def setup(self, cache, backend):
        common.require_backend(backend)
        if cache["results"].get("torch-fused bf16") is None:
            raise NotImplementedError(cache["notes"].get("torch", "torch bf16 not run"))

    def track_speedup_vs_torch_fused_bf16(self, cache, backend):
        return cache["results"][f"fastopt-{backend} bf16+master"]["vs_torch_fused_bf16"]

    track_speedup_vs_torch_fused_bf16.unit = "x torch fused bf16"

    def track_gbps_bf16_master(self, cache, backend):
        return cache["results"][f"fastopt-{backend} bf16+master"]["gbps"]

    track_gbps_bf16_master.unit = "GB/s"
