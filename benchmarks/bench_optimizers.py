"""asv benchmarks for the fused optimizer step (placeholder suite; the
benchmark-suite issue grows it into the full matrix)."""

import numpy as np

import fastopt


class AdamWStep:
    params = ([1 << 16, 1 << 22], ["numba", "cython", "numpy"])
    param_names = ["size", "backend"]

    def setup(self, size, backend):
        if backend not in fastopt.available_backends():
            raise NotImplementedError(f"{backend} not available")
        rng = np.random.default_rng(0)
        self.p = fastopt.pack([rng.standard_normal(size).astype(np.float32)])
        self.g = self.p.zeros_like()
        self.g.data[:] = rng.standard_normal(size)
        self.opt = fastopt.AdamW(self.p, backend=backend)
        self.opt.step(self.g)   # compile outside the timing

    def time_step(self, size, backend):
        self.opt.step(self.g)

    def track_gbps(self, size, backend):
        import time
        t0 = time.perf_counter()
        for _ in range(5):
            self.opt.step(self.g)
        return 7 * 4 * size * 5 / (time.perf_counter() - t0) / 1e9

    track_gbps.unit = "GB/s"
