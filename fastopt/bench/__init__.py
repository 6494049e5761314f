"""Same-run measurements of fastopt: ``fastopt bench``, ``fastopt
check-perf`` (the CI guard), the asv suite in ``benchmarks/``, and the nn
and distributed benchmarks all measure through this package.

Every number is a comparison taken in one process on one machine: fastopt's
backends, a straightforward NumPy step, PyTorch's fused, foreach and
for-loop optimizers (when torch is installed) and a *streaming kernel* that
moves the same bytes as the step with trivial arithmetic, i.e. the memory
roofline for that step. Report ratios, not absolute times: on a small
shared machine absolute times drift from run to run.

The modules, from the bottom up:

==================  =========================================================
``machine``         torch, the GPU, thread pools: what the machine has
``baselines``       what NumPy and torch users write (optimizer steps, an MLP)
``cases``           every workload, defined once (optimizers, cases, networks)
``roofline``        streaming kernels moving a step's bytes
``steps``           one step of any implementation of a case (``make_step``)
``timing``          interleaved timers, spreads, whether the machine was busy
``ratios``          one case's implementations compared, same-run ratios
``matrix``          the ``fastopt bench`` run, cold starts
``report``          the table, JSON and chart
``in_loop``         the step inside a NumPy training loop
``mixed_precision`` bf16 params with a float32 master copy vs torch
``isolated``        one process per implementation, interleaved
``guard``           the CI guard: ratios against the floors in floors.json
``nn``, ``mnist``   the MLP train step, ensembles, the MNIST race
``distributed``     the MPI step and epoch, 1 vs N ranks
==================  =========================================================

The names below are this package's everyday API (``from fastopt import
bench; bench.make_step(...)``); the nn, MNIST, distributed, isolated and
guard modules are imported by name, as they pull in more.
"""

from .baselines import NumpyAdam, mlp_forward_backward, mlp_init
from .cases import (ARRAYS_MOVED, BASELINES, CPU_BACKENDS, FAMILY, GPU_IMPLS, HYPERS, KIND,
                    KINDS, LAYOUTS, SWEEP_CASE, TORCH_PATHS, Kind, Row, family_rows,
                    parse_optimizers, plan, step_bytes, workloads)
from .in_loop import InLoopImpl, in_loop_case, make_in_loop_impl, mlp_data
from .machine import gpu_name, thread_pools, torch_or_none
from .matrix import cold_start, run
from .mixed_precision import mixed_precision_case
from .ratios import Result, compare, fastest_torch, speedups
from .report import format_in_loop, format_table, plot, save
from .steps import make_step
from .timing import load_since, load_snapshot, time_all

__all__ = [
    "ARRAYS_MOVED", "BASELINES", "CPU_BACKENDS", "FAMILY", "GPU_IMPLS", "HYPERS", "KIND",
    "KINDS", "LAYOUTS", "SWEEP_CASE", "TORCH_PATHS", "InLoopImpl", "Kind", "NumpyAdam",
    "Result", "Row", "cold_start", "compare", "family_rows", "fastest_torch",
    "format_in_loop", "format_table", "gpu_name", "in_loop_case", "load_since",
    "load_snapshot", "make_in_loop_impl", "make_step", "mixed_precision_case",
    "mlp_data", "mlp_forward_backward", "mlp_init", "parse_optimizers", "plan", "plot",
    "run", "save", "speedups", "step_bytes", "thread_pools", "time_all", "torch_or_none",
    "workloads",
]
