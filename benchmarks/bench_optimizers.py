"""AdamW and SGD over one tensor by size and dtype: latency, memory, and
same-run ratios against NumPy, PyTorch and the memory roofline; AdamW with
each optimizer-state dtype (float32, and compact bfloat16 / int8 state) at
16M and 64M. (Every optimizer's named cases, plain lists included:
bench_cases.py.)"""

import itertools

from fastopt.bench import cases

from . import common


class AdamWStep:
    """Latency of one AdamW step over one tensor, for every implementation."""

    kind = "adamw"
    params = (common.SIZES, common.DTYPES, common.CPU_IMPLS)
    param_names = ["size", "dtype", "impl"]

    def setup(self, size, dtype, impl):
        self.step = common.build_step(impl, self.kind, [(size,)], dtype)

    def time_step(self, size, dtype, impl):
        self.step()


class SGDNesterovStep(AdamWStep):
    """Latency of one SGD step (Nesterov momentum 0.9), float32."""

    kind = "sgd"
    params = (common.SIZES, ["float32"], common.CPU_IMPLS)


class StepMemory:
    """Memory of one AdamW step over 4M float32 parameters (16 MB a copy)."""

    params = common.CPU_IMPLS
    param_names = ["impl"]

    def setup(self, impl):
        self.step = common.build_step(impl, "adamw", [(1 << 22,)])

    def peakmem_step(self, impl):
        # Whole-process peak RSS (asv's definition): params and state are the
        # same for every impl, but so is not what each imported (torch,
        # Numba's LLVM): the differences are mostly that, not the step's.
        # track_temporary_bytes below counts the step's own allocations.
        self.step()

    def track_temporary_bytes(self, impl):
        return common.temporary_bytes(self.step)

    track_temporary_bytes.unit = "bytes"


class _Ratios(common._RatioTracks):
    """Same-run ratios for the fastopt backends, measured once per run in
    setup_cache (all implementations interleaved in one process)."""

    kind = None
    params = (common.SIZES, common.DTYPES, common.FASTOPT_BACKENDS)
    param_names = ["size", "dtype", "backend"]

    def setup_cache(self):
        # Subclasses share this function's source line, which is asv's cache
        # key, so one cache holds every kind's matrix.
        rows = {(cls.kind, n, dt): cases.one_tensor(cls.kind, n, dt)
                for cls in (AdamWRatios, SGDNesterovRatios)
                for n, dt, _ in itertools.product(*cls.params)}
        return common.ratio_matrix(rows, common.FASTOPT_BACKENDS)

    setup_cache.timeout = common.CACHE_TIMEOUT

    def case_key(self, size, dtype):
        return (self.kind, size, dtype)


class AdamWRatios(_Ratios):
    kind = "adamw"


class SGDNesterovRatios(_Ratios):
    kind = "sgd"
    params = (common.SIZES, ["float32"], common.FASTOPT_BACKENDS)


#: AdamW with each optimizer-state dtype over 16M and 64M float32 params
#: (``fastopt bench``'s ``adamw <state> state 1 x <n>M`` rows, by name)
STATE_CASES = {r.case: r for r in cases.state_rows()}


class CompactStateRatios(common._RatioTracks):
    """Same-run ratios of AdamW with float32, bfloat16 or int8 state: against
    torch's fused AdamW (float32 state) and the streaming kernel that moves
    the step's own bytes (28, 20 and about 16 per element)."""

    params = (list(STATE_CASES), common.FASTOPT_BACKENDS)
    param_names = ["case", "backend"]

    def setup_cache(self):
        return common.ratio_matrix(STATE_CASES, common.FASTOPT_BACKENDS)

    setup_cache.timeout = common.CACHE_TIMEOUT

    def case_key(self, case):
        return case


class CompactStateStep:
    """Seconds per AdamW step with each state dtype, every implementation
    (the baselines keep float32 state)."""

    params = (list(STATE_CASES), [*common.CPU_IMPLS, "roofline"])
    param_names = ["case", "impl"]

    def setup(self, case, impl):
        row = STATE_CASES[case]
        self.step = common.build_step(impl, row.kind, row.shapes, row.dtype, state=row.state)

    def time_step(self, case, impl):
        self.step()
