"""GPU: the AdamW step on device arrays against torch on CUDA and the
card's copy bandwidth. Every combination skips ("n/a") on a machine without
an NVIDIA GPU, so the suite runs unchanged everywhere.

The "cuda" rows are fastopt's own backend (numba-cuda): one AdamW step of
a float32 device array, through the optimizer as a user calls it. They skip
where ``"cuda" not in fastopt.available_backends()`` (no numba-cuda, or no
GPU). ``benchmarks/gpu_check.py`` is the one-shot check that also runs the
CUDA tests and writes ``benchmarks/results/gpu.json``; docs/gpu.md says
what has and has not been measured. ``CudaMLPStep``/``CudaEnsembleStep``:
the MLP's training step on the GPU (``fastopt.nn`` with ``backend="cuda"``)
against torch, the cases of ``benchmarks/gpu_check_nn.py``.
"""

import fastopt
from fastopt.bench import cases, machine

SIZES = [1 << 20, 1 << 26]
IMPLS = ["cuda", "torch-cuda-fused", "torch-cuda-foreach", "roofline-d2d-copy"]


def _torch_cuda():
    torch = machine.torch_or_none()
    if torch is None or not torch.cuda.is_available():
        raise NotImplementedError("no GPU (or torch without CUDA)")
    return torch


class CudaAdamWStep:
    params = (SIZES, IMPLS)
    param_names = ["size", "impl"]
    timeout = 300

    def setup(self, size, impl):
        if machine.gpu_name() is None:
            raise NotImplementedError("no GPU")
        if impl == "cuda":
            if "cuda" not in fastopt.available_backends():
                raise NotImplementedError("fastopt's CUDA backend is unavailable here "
                                          "(pip install 'fastopt[cuda]' on a GPU machine)")
            import numpy as np
            from numba import cuda
            rng = np.random.default_rng(0)
            p = cuda.to_device(rng.standard_normal(size, dtype=np.float32))
            g = cuda.to_device(rng.standard_normal(size, dtype=np.float32))
            opt = fastopt.AdamW(p, lr=1e-3, backend="cuda")
            self.sync = cuda.synchronize
            self.step = lambda: opt.step(g)
            self.step()
            self.sync()
            return
        torch = _torch_cuda()
        self.sync = torch.cuda.synchronize
        p = torch.randn(size, device="cuda")
        if impl == "roofline-d2d-copy":
            # 28 bytes/element moved as 3.5 float32 copies' worth (read + write)
            src = torch.randn(size * 7 // 2, device="cuda")
            dst = torch.empty_like(src)
            self.step = lambda: dst.copy_(src)
        else:
            p.grad = torch.randn_like(p)
            opt = torch.optim.AdamW([p], lr=1e-3, **{"fused": True} if impl.endswith("fused")
                                    else {"foreach": True})
            self.step = opt.step
        self.step()
        self.sync()

    def time_step(self, size, impl):
        self.step()
        self.sync()

    def track_gbps(self, size, impl):
        import time
        reps = 20
        self.sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            self.step()
        self.sync()
        return cases.step_bytes("adamw", size, "float32") * reps / (time.perf_counter() - t0) / 1e9

    track_gbps.unit = "GB/s"


class CudaMLPStep:
    """One AdamW training step of an MLP 784-256-256-10 at batch 256 on the
    GPU: fastopt's ``backend="cuda"`` with its products on the numba kernels
    or on cuBLAS (where CuPy or nvmath-python imports), against torch on CUDA
    (Linear/ReLU, fused AdamW, eager). ``CudaEnsembleStep``: 64 such models
    at once (one shared batch), torch as ``baddbmm`` over stacked weights.
    The cases are ``benchmarks/gpu_check_nn.py``'s; they skip without a GPU."""

    params = (["fastopt-numba", "fastopt-cublas", "torch-cuda-eager"],)
    param_names = ["impl"]
    timeout = 300
    models = 1

    def setup(self, impl):
        if machine.gpu_name() is None:
            raise NotImplementedError("no GPU")
        from . import gpu_check_nn as G
        sizes, B = G.SIZES["mlp"], G.SIZES["batch"]
        if impl.startswith("fastopt"):
            if "cuda" not in fastopt.available_backends():
                raise NotImplementedError("fastopt's CUDA backend is unavailable here")
            from numba import cuda

            from fastopt.nn import _cuda
            found = _cuda.engines()
            engine = "numba" if impl == "fastopt-numba" else (found[1:] or [None])[0]
            if engine is None:
                raise NotImplementedError("neither CuPy nor nvmath-python imports here")
            self.step, _ = G.fastopt_step(sizes, B, self.models, engine)
            self.sync = cuda.synchronize
        else:
            torch = _torch_cuda()
            self.step = (G.torch_mlp_step(torch, sizes, B) if self.models == 1 else
                         G.torch_ensemble_step(torch, self.models, sizes, B))
            self.sync = torch.cuda.synchronize
        self.step()
        self.sync()

    def time_step(self, impl):
        self.step()
        self.sync()


class CudaEnsembleStep(CudaMLPStep):
    __doc__ = CudaMLPStep.__doc__
    params = (["fastopt-numba", "fastopt-cublas", "torch-cuda-bmm"],)
    models = 64
