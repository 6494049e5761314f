"""Global-norm gradient clipping: the norm alone, and clipping folded into
the AdamW step (fastopt) vs clip_grad_norm_ + step (torch) vs NumPy."""

import numpy as np

import fastopt
from fastopt.bench import cases, machine

from . import common

NORM_IMPLS = ["numba", "cython", "numpy", "torch"]
# a model of 200 tensors, 1M parameters, clipped to global norm 1
CLIP = cases.workloads()["clip+adamw 200 x 5k"]


class GlobalNorm:
    """Float64-accumulated L2 norm of a packed gradient buffer."""

    params = ([1 << 16, 1 << 20, 1 << 24], NORM_IMPLS)
    param_names = ["size", "impl"]

    def setup(self, size, impl):
        g = np.random.default_rng(0).standard_normal(size).astype(np.float32)
        if impl == "numpy":
            # what a NumPy user writes: accumulate in float64 for accuracy
            self.norm = lambda: np.sqrt(np.dot(g.astype(np.float64), g.astype(np.float64)))
        elif impl == "torch":
            torch = machine.torch_or_none()
            if torch is None:
                raise NotImplementedError("torch not installed")
            t = torch.from_numpy(g)
            self.norm = lambda: torch.linalg.vector_norm(t, dtype=torch.float64)
        else:
            common.require_backend(impl)
            flat = fastopt.pack([g])
            self.norm = lambda: fastopt.global_norm(flat, backend=impl)
        self.norm()

    def time_global_norm(self, size, impl):
        self.norm()


class ClipAdamW:
    """AdamW with max_grad_norm=1 over 200 tensors of 5k elements."""

    params = common.CPU_IMPLS
    param_names = ["impl"]

    def setup(self, impl):
        self.step = common.build_step(impl, CLIP.kind, CLIP.shapes, CLIP.dtype, CLIP.clip)

    def time_step(self, impl):
        self.step()

    def track_temporary_bytes(self, impl):
        return common.temporary_bytes(self.step)

    track_temporary_bytes.unit = "bytes"


class ClipAdamWRatios(common._RatioTracks):
    """Same-run ratios of the clipped step (roofline: one read + AdamW's bytes)."""

    params = [common.FASTOPT_BACKENDS]
    param_names = ["backend"]

    def setup_cache(self):
        return common.ratio_matrix({"clip": CLIP}, common.FASTOPT_BACKENDS)

    setup_cache.timeout = common.CACHE_TIMEOUT

    def case_key(self):
        return "clip"
