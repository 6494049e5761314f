"""The Adam step inside a NumPy training loop (``cases.IN_LOOP``: a
784-256-256-10 MLP, batch 128, float32): right after the forward/backward
matmuls, whose BLAS threads are still spinning, rather than back to back;
and the whole training step. Against naive NumPy Adam and torch's fused
Adam (see ``fastopt.bench.in_loop.in_loop_case``)."""

from fastopt.bench import cases, in_loop

from . import common

ARCH, BATCH = cases.IN_LOOP.sizes, cases.IN_LOOP.batch
ITERS = 5   # training iterations per timed call
# fastopt on a plain list and packed (grads copied in), naive NumPy Adam,
# torch fused Adam, and the roofline: Adam's bytes streamed on one thread in
# the same loop (its loop/hot is what the data's place costs any step there;
# it has no speedup ratios)
IMPLS = ["cython", "numba", "cython-packed", "numba-packed", "numpy", "torch-fused",
         "roofline"]

# Seconds per training iteration of what a benchmark times, summed over the
# calls: the ``timer`` of the time_* benchmarks below, so that asv's samples
# are the optimizer step alone (the forward/backward pass runs before it,
# untimed) or the whole iteration, per iteration.
_elapsed = [0.0]


def _per_iteration_clock():
    return _elapsed[0]


def _warmed_up(impl, warmup=3):
    """A warmed-up :class:`fastopt.bench.in_loop.InLoopImpl`, or
    NotImplementedError (asv: skipped)."""
    loop, note = in_loop.make_in_loop_impl(impl, ARCH, BATCH)
    if loop is None:
        raise NotImplementedError(note)
    loop.train(warmup)      # compile (Numba), fault pages in, start the pools
    loop.hot(warmup)
    return loop


class InLoopAdamStep:
    """Per training iteration: ``time_step_in_loop`` the optimizer step alone
    (``opt.step(grads)``, grads new from the backward pass), ``time_train_step``
    forward + backward + step. impl: fastopt on a plain list, fastopt packed
    (grads copied into a FlatArrays each step), naive NumPy Adam, torch fused
    Adam over ``torch.from_numpy`` views."""

    params = [IMPLS]
    param_names = ["impl"]

    def setup(self, impl):
        self.loop = _warmed_up(impl)

    def time_step_in_loop(self, impl):
        _elapsed[0] += self.loop.train(ITERS)[0]

    time_step_in_loop.timer = _per_iteration_clock

    def time_train_step(self, impl):
        _elapsed[0] += self.loop.train(ITERS)[1]

    time_train_step.timer = _per_iteration_clock


class _InLoopCase:
    """Same-run ratios from one ``in_loop_case`` run (every implementation
    interleaved in one process), measured once per asv run."""

    params = [IMPLS]
    param_names = ["impl"]

    def setup_cache(self):
        # Subclasses share this function's source line (asv's cache key): one
        # measurement feeds every ratio.
        return in_loop.in_loop_case(impls=IMPLS + [in_loop.TORCH_ALONE], sizes=ARCH,
                                    batch=BATCH, steps=20, rounds=5, packed=None)

    setup_cache.timeout = common.CACHE_TIMEOUT

    def setup(self, cache, impl):
        row = cache["results"][impl]
        if row["step_in_loop_s"] is None:
            raise NotImplementedError(row["note"])


class InLoopRatios(_InLoopCase):
    def track_in_loop_vs_hot(self, cache, impl):
        return common.lookup(cache, "results", impl, "in_loop_vs_hot")

    track_in_loop_vs_hot.unit = "step in loop / step hot"

    def track_step_speedup_vs_numpy(self, cache, impl):
        return common.lookup(cache, "results", impl, "vs_numpy", "step_in_loop")

    track_step_speedup_vs_numpy.unit = "x NumPy (step in loop)"

    def track_train_step_speedup_vs_numpy(self, cache, impl):
        return common.lookup(cache, "results", impl, "vs_numpy", "train_step")

    track_train_step_speedup_vs_numpy.unit = "x NumPy (train step)"


class InLoopTorchRatios(_InLoopCase):
    def setup(self, cache, impl):
        super().setup(cache, impl)
        if cache["results"]["torch-fused"]["step_in_loop_s"] is None:
            raise NotImplementedError(cache["results"]["torch-fused"]["note"])

    def track_step_speedup_vs_torch_fused(self, cache, impl):
        return common.lookup(cache, "results", impl, "vs_torch_fused", "step_in_loop")

    track_step_speedup_vs_torch_fused.unit = "x torch fused (step in loop)"

    def track_train_step_speedup_vs_torch_fused(self, cache, impl):
        return common.lookup(cache, "results", impl, "vs_torch_fused", "train_step")

    track_train_step_speedup_vs_torch_fused.unit = "x torch fused (train step)"


class InLoopTorchAloneRatios(_InLoopCase):
    """Against torch fused as its users run it: in a process of its own that
    imports torch first (its own OpenMP runtime at its defaults)."""

    def setup(self, cache, impl):
        super().setup(cache, impl)
        alone = cache["results"][in_loop.TORCH_ALONE]
        if alone["step_in_loop_s"] is None:
            raise NotImplementedError(alone["note"])

    def track_step_speedup_vs_torch_alone(self, cache, impl):
        return common.lookup(cache, "results", impl, "vs_torch_alone", "step_in_loop")

    track_step_speedup_vs_torch_alone.unit = "x torch fused alone (step in loop)"

    def track_train_step_speedup_vs_torch_alone(self, cache, impl):
        return common.lookup(cache, "results", impl, "vs_torch_alone", "train_step")

    track_train_step_speedup_vs_torch_alone.unit = "x torch fused alone (train step)"
