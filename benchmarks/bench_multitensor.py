"""Many small tensors: a packed model stepped in one kernel call vs one call
per array (fastopt's list path, NumPy, torch's for-loop) and torch's
multi-tensor foreach/fused paths."""

import numpy as np

import fastopt
from fastopt.bench import cases, timing

from . import common

TENSOR_COUNTS = [10, 1000]
ELEMENTS = 1000
#: the 1000 x 1k case, packed, as fastopt bench names it
MANY = cases.workloads()["adamw 1000 x 1k"]


class ManyTensorsAdamW:
    params = (TENSOR_COUNTS, common.CPU_IMPLS + ["numba-list", "cython-list"])
    param_names = ["tensors", "impl"]

    def setup(self, tensors, impl):
        shapes = [(ELEMENTS,)] * tensors
        if impl.endswith("-list"):
            backend = impl[:-len("-list")]
            common.require_backend(backend)
            rng = np.random.default_rng(0)
            params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
            grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
            opt = fastopt.AdamW(params, backend=backend)
            self.step = lambda: opt.step(grads)   # unpacked arrays: a call per array
            timing.warm_up(self.step)
        else:
            self.step = common.build_step(impl, "adamw", shapes)

    def time_step(self, tensors, impl):
        self.step()


class ManyTensorsRatios(common._RatioTracks):
    """Same-run ratios of the packed step at 1000 tensors x 1k."""

    params = [common.FASTOPT_BACKENDS]
    param_names = ["backend"]

    def setup_cache(self):
        return common.ratio_matrix({"1000x1k": MANY}, common.FASTOPT_BACKENDS)

    setup_cache.timeout = common.CACHE_TIMEOUT

    def case_key(self):
        return "1000x1k"
