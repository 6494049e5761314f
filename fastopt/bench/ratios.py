"""One case, every implementation, timed interleaved in one process; and the
same-run ratios the table, asv and the CI guard report from it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import cases, steps, timing


@dataclass
class Result:
    case: str
    impl: str
    kind: str
    elements: int
    tensors: int
    dtype: str
    seconds: float | None            # per step; None when not run
    bytes_per_step: int
    note: str = ""
    layout: str = "packed"
    median_seconds: float | None = None   # median over the rounds (seconds: the minimum)

    @property
    def gbps(self):
        return self.bytes_per_step / self.seconds / 1e9 if self.seconds else None


def compare(row, impls=None, rounds=4):
    """Time ``impls`` (default: every CPU backend and baseline) on the case
    ``row`` (a :class:`cases.Row`), interleaved; one :class:`Result` per
    implementation, in the order of ``impls``."""
    impls = impls or (*cases.CPU_BACKENDS, *cases.BASELINES)
    built = {impl: steps.make_step(impl, row.kind, row.shapes, row.dtype, row.clip,
                                   row.layout, row.state)
             for impl in impls}
    medians = {}
    times = timing.time_all({k: fn for k, (fn, _) in built.items() if fn is not None},
                            rounds, medians=medians)
    return [Result(row.case, impl, row.kind, row.elements, len(row.shapes),
                   np.dtype(row.dtype).name, times.get(impl), impl_bytes(row, impl), note,
                   row.layout, medians.get(impl))
            for impl, (_, note) in built.items()]


def impl_bytes(row, impl) -> int:
    """Bytes ``impl`` moves a step in ``row``: the row's own (its state
    dtype's) for fastopt and the roofline, which streams them; float32
    state's for torch and NumPy, which keep no other (a compact-state row
    credited them with the compact count, so their GB/s read 20/28 or
    16/28 of what they moved)."""
    state = "float32" if impl in cases.BASELINES and impl != "roofline" else row.state
    return cases.step_bytes(row.kind, row.elements, row.dtype, row.clip, state)


def fastest_torch(results):
    """``(impl, seconds)`` of torch's fastest path in this case, or ``(None, None)``."""
    timed = [(r.seconds, r.impl) for r in results if r.impl in cases.TORCH_PATHS and r.seconds]
    return (min(timed)[1], min(timed)[0]) if timed else (None, None)


def speedups(results):
    """Ratios within each case, keyed by impl: ``roofline`` (fraction of the
    streaming kernel's speed), ``numpy``, ``torch`` (fused) and
    ``torch_best`` (torch's fastest path in this case, whichever it was)
    speedups."""
    by_impl = {r.impl: r.seconds for r in results}
    best_impl, best = fastest_torch(results)
    out = {}
    for r in results:
        s = r.seconds
        out[r.impl] = {
            name: (by_impl[ref] / s if s and by_impl.get(ref) else None)
            for name, ref in (("roofline", "roofline"), ("numpy", "numpy"),
                              ("torch", "torch-fused"))}
        out[r.impl]["torch_best"] = best / s if s and best else None
        out[r.impl]["torch_best_impl"] = best_impl
    return out
