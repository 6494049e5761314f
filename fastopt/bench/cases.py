"""Every workload fastopt is measured on, defined once.

``fastopt bench``, the asv suite in ``benchmarks/``, the CI guard's floors,
the nn and distributed benchmarks and the pytest-benchmark hot paths all
take their cases from here, so a case name means the same arrays, layout,
hyperparameters, baselines and byte count in the table, on the dashboard
and in the guard.

* :data:`KIND`: each optimizer as the benchmarks run it (hyperparameters,
  its NumPy baseline, its memory passes, whether torch has it).
* :class:`Row`: one optimizer-step case (kind, tensors, dtype, clipping,
  layout); :func:`family_rows` (every optimizer's two cases), :func:`plan`
  (the ``fastopt bench`` matrix) and :func:`workloads` (every named case).
* :class:`MLPCase` and :class:`MNISTRecipe`: the network cases of
  :mod:`fastopt.bench.nn`, :mod:`fastopt.bench.in_loop` and
  :mod:`fastopt.bench.distributed`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import baselines


class Kind(NamedTuple):
    """An optimizer as the benchmarks run it: one entry of :data:`KIND`."""

    label: str          # how case names call it ("sgd nesterov 1 x 16M")
    optimizer: str      # the class in fastopt and in torch.optim
    hypers: dict        # given alike to fastopt, torch and the NumPy step
    numpy_step: object  # the NumPy step a user writes (fastopt.bench.baselines)
    # memory passes of one step over each element: (arrays read, arrays
    # written) of the parameter dtype; the roofline streams the same
    passes: tuple
    in_torch: bool = True   # False: torch.optim has no such class


def _one_pass(state):
    """A fused single-pass step with ``state`` buffers: reads p, g and the
    state, writes p and the state (AdamW: 4 read, 3 written)."""
    return ((2 + state, 1 + state),)


#: Every optimizer the benchmarks know, by kind. The hyperparameters are
#: torch's defaults (LAMB: fastopt's) except where a benchmark needs the
#: common setting (AdamW's, Lion's and LAMB's weight decay, SGD's Nesterov
#: momentum).
KIND = {
    "adamw": Kind("adamw", "AdamW", dict(lr=1e-3, weight_decay=1e-2),
                  baselines.adamw, _one_pass(2)),
    "sgd": Kind("sgd nesterov", "SGD", dict(lr=1e-2, momentum=0.9, nesterov=True),
                baselines.sgd, _one_pass(1)),
    "rmsprop": Kind("rmsprop", "RMSprop", dict(lr=1e-2), baselines.rmsprop, _one_pass(1)),
    "rmsprop-centered": Kind("rmsprop centered", "RMSprop", dict(lr=1e-2, centered=True),
                             baselines.rmsprop, _one_pass(2)),
    "adagrad": Kind("adagrad", "Adagrad", dict(lr=1e-2), baselines.adagrad, _one_pass(1)),
    "adamax": Kind("adamax", "Adamax", dict(lr=2e-3), baselines.adamax, _one_pass(2)),
    "nadam": Kind("nadam", "NAdam", dict(lr=2e-3), baselines.nadam, _one_pass(2)),
    "radam": Kind("radam", "RAdam", dict(lr=1e-3), baselines.radam, _one_pass(2)),
    "lion": Kind("lion", "Lion", dict(lr=1e-4, weight_decay=1e-2), baselines.lion,
                 _one_pass(1), in_torch=False),
    # two passes: the moments (and each array's ||p||^2, ||r||^2), then the
    # weights, recomputing r from p, m, v
    "lamb": Kind("lamb", "LAMB", dict(lr=1e-3, weight_decay=1e-2), baselines.lamb,
                 ((4, 2), (3, 1)), in_torch=False),
}
KINDS = tuple(KIND)
#: the optimizers beyond the original two (AdamW, SGD), each measured on
#: :func:`family_rows` (``fastopt bench --optimizers``)
FAMILY = tuple(k for k in KINDS if k not in ("adamw", "sgd"))
# Arrays of the parameter dtype each step moves per element (AdamW 7, SGD 5).
ARRAYS_MOVED = {k: sum(r + w for r, w in spec.passes) for k, spec in KIND.items()}
HYPERS = {k: spec.hypers for k, spec in KIND.items()}

# -- the implementations of a case ----------------------------------------------------

CPU_BACKENDS = ("numba", "cython")
TORCH_PATHS = ("torch-fused", "torch-foreach", "torch-forloop")
BASELINES = ("roofline", "numpy", *TORCH_PATHS)
GPU_IMPLS = ("cuda", "torch-cuda")

#: how fastopt gets the arrays: ``packed`` (one buffer, FlatArrays grads) or
#: ``list`` (separate arrays, and a new list of new gradient arrays every
#: step, as NumPy backprop code makes them)
LAYOUTS = ("packed", "list")


#: the optimizer's state dtypes (``state_dtype``: float32, or compact state)
STATE_DTYPES = ("float32", "bfloat16", "int8")
#: bytes of a compact state value: bfloat16 bits; an 8-bit code with its
#: share of its block's float32 absmax (fastopt.backends.compact.BLOCK = 256)
STATE_BYTES = {"bfloat16": 2.0, "int8": 1.0 + 4.0 / 256}


def step_bytes(kind, n, dtype, clip=False, state="float32"):
    """Bytes one step moves through memory (the roofline's byte count).
    Compact ``state``: the state buffers' passes at their own width (a
    one-pass kind: each buffer read and written once)."""
    item = np.dtype(dtype).itemsize
    moved = (ARRAYS_MOVED[kind] + (1 if clip else 0)) * n * item
    if state == "float32":
        return moved
    buffers = KIND[kind].passes[0][1] - 1          # written besides p
    return int(moved - 2 * buffers * n * (item - STATE_BYTES[state]))


# -- the optimizer-step cases -----------------------------------------------------------

class Row(NamedTuple):
    """One case of the matrix: its name and what it measures."""

    case: str
    kind: str                 # a key of KIND
    shapes: list              # the tensors
    dtype: str = "float32"
    clip: bool = False        # max_grad_norm=1 (fastopt) / clip_grad_norm_ (torch)
    layout: str = "packed"    # see LAYOUTS
    state: str = "float32"    # fastopt's state_dtype (see STATE_DTYPES); baselines: float32

    @property
    def elements(self):
        """Parameters in all the tensors together."""
        return sum(math.prod(s) for s in self.shapes)


SWEEP_CASE = "adamw sweep"
#: the sweep's sizes (one float32 tensor): the default run, and --full's
SWEEP_SIZES = (1 << 10, 1 << 15, 1 << 20, 1 << 24)
FULL_SWEEP_SIZES = (1 << 10, 1 << 13, 1 << 16, 1 << 19, 1 << 22, 1 << 24, 1 << 26)
QUICK_MAX = 1 << 15      # --quick: the one-tensor cases up to this size


def mlp_shapes(sizes):
    """The tensors of an MLP with layer ``sizes``: ``W`` (in, out), then ``b``, per layer."""
    return [s for a, b in zip(sizes, sizes[1:]) for s in ((a, b), (b,))]


def family_rows(kind):
    """The two workloads every optimizer is measured on, defined once for
    ``fastopt bench``, the asv suite and the CI guard:

    * ``"<label> 1 x 16M"``: one array of 16M float32 elements, far beyond
      the caches: the step is memory-bound, read it against the roofline
      (the streaming kernel moving the same bytes, same run);
    * ``"list <label> 1000 x 1k"``: 1000 arrays of 1000 as a plain list,
      new gradient arrays every step: the per-array overhead, read it
      against torch's fastest path (for an optimizer torch lacks, against
      the NumPy step).
    """
    label = KIND[kind].label
    return [Row(f"{label} 1 x 16M", kind, [(1 << 24,)]),
            Row(f"list {label} 1000 x 1k", kind, [(1000,)] * 1000, layout="list")]


#: the compact-state cases' sizes: 16M float32 params (64 MB a copy, past the
#: caches) and, in ``fastopt bench --full``, 64M
STATE_SIZES = (1 << 24, 1 << 26)


def state_rows(sizes=STATE_SIZES):
    """AdamW over one array of float32 params with each optimizer-state
    dtype: ``"adamw <state> state 1 x 16M"``. The baselines (torch fused,
    NumPy) keep float32 state; the roofline streams the step's own bytes
    (20 per element with bfloat16 state, about 16 with int8, 28 with
    float32: :func:`step_bytes`)."""
    return [Row(f"adamw {st} state 1 x {n >> 20}M", "adamw", [(n,)], state=st)
            for n in sizes for st in STATE_DTYPES]


def parse_optimizers(text):
    """The kinds a ``--optimizers`` value names: a comma-separated list of
    :data:`KINDS`, ``"family"`` (:data:`FAMILY`) or ``"all"``."""
    kinds = []
    for name in (s.strip() for s in text.split(",")):
        if name in ("all", "family"):
            kinds += KINDS if name == "all" else FAMILY
        elif name in KIND:
            kinds.append(name)
        else:
            raise ValueError(f"unknown optimizer {name!r}: use {', '.join(KINDS)}, "
                             "'family' or 'all', comma-separated")
    return tuple(dict.fromkeys(kinds))


def plan(full=False, optimizers=None, quick=False):
    """:class:`Row` s of the standard matrix, or with ``optimizers`` (kinds)
    only the :func:`family_rows` of those; ``quick``: only its one-tensor
    cases up to :data:`QUICK_MAX` elements (seconds, to check an install)."""
    if optimizers:
        rows = [row for kind in optimizers for row in family_rows(kind)]
    else:
        rows = _standard(full)
    if quick:
        rows = [r for r in rows if len(r.shapes) == 1 and r.elements <= QUICK_MAX]
    return rows


def _standard(full):
    rows = [Row(SWEEP_CASE, "adamw", [(n,)]) for n in (FULL_SWEEP_SIZES if full else
                                                       SWEEP_SIZES)]
    rows += [
        Row("adamw 1000 x 1k", "adamw", [(1000,)] * 1000),
        Row("clip+adamw 200 x 5k", "adamw", [(5000,)] * 200, clip=True),
        family_rows("sgd")[0],
    ]
    # Plain lists, as NumPy code holds them: separate arrays, new gradient
    # arrays every step.
    rows += [
        family_rows("adamw")[1],
        Row("list clip+adamw 200 x 5k", "adamw", [(5000,)] * 200, clip=True, layout="list"),
        Row("list adamw 10 x 1k", "adamw", [(1000,)] * 10, layout="list"),
        Row("list adamw mlp", "adamw", mlp_shapes(MLP_SIZES), layout="list"),
        Row("list adamw 1 x 1", "adamw", [(1,)], layout="list"),
        Row("list adamw 1 x 16M", "adamw", [(1 << 24,)], layout="list"),
    ]
    rows += state_rows(STATE_SIZES if full else STATE_SIZES[:1])
    if full:
        rows += [Row("adamw float64 1 x 16M", "adamw", [(1 << 24,)], "float64"),
                 Row("sgd nesterov 1000 x 1k", "sgd", [(1000,)] * 1000),
                 Row("list adamw float64 1000 x 1k", "adamw", [(1000,)] * 1000, "float64",
                     layout="list")]
    return rows


def workloads():
    """Every named case, by name: the standard matrix's (the sweep aside)
    and each optimizer's :func:`family_rows`. The asv suite and the CI
    guard's floors name their cases from here."""
    rows = [r for r in plan(full=True) if r.case != SWEEP_CASE]
    rows += [r for kind in KINDS for r in family_rows(kind)]
    return {r.case: r for r in rows}


def one_tensor(kind, n, dtype="float32"):
    """The unnamed case of ``kind`` over one packed tensor of ``n`` elements
    (the sweep's and the asv suite's by-size cases)."""
    return Row(f"{KIND[kind].label} 1 x {n}", kind, [(n,)], dtype)


#: asv's by-size cases (bench_optimizers: one tensor, by size and dtype)
ASV_SIZES = [1 << 10, 1 << 16, 1 << 20, 1 << 24]
ASV_DTYPES = ["float32", "float64"]
#: elements of the mixed-precision cases (bf16 params with a float32 master copy)
MIXED_PRECISION_ELEMENTS = 1 << 22


# -- the network cases ------------------------------------------------------------------

#: the MLP the nn benchmarks, the training-loop case and ``list adamw mlp``
#: train: MNIST's 784 inputs, two hidden layers of 256, 10 classes
MLP_SIZES = (784, 256, 256, 10)


class MLPCase(NamedTuple):
    """A network case: layer sizes, samples per batch, and how many models
    train side by side (an ensemble, each model its own batch)."""

    sizes: tuple
    batch: int
    models: int = 1


#: one training step (forward, backward, AdamW): fastopt.bench.nn, asv bench_mlp
TRAIN_STEP = MLPCase(MLP_SIZES, 256)
#: the Adam step inside a NumPy training loop: fastopt.bench.in_loop, asv bench_in_loop
IN_LOOP = MLPCase(MLP_SIZES, 128)
#: K small models at once: fastopt.bench.nn, asv bench_ensembles
ENSEMBLE = MLPCase((784, 64, 10), 128, models=16)


class MNISTRecipe(NamedTuple):
    """The MNIST training recipe (8k/2k split, AdamW, warmup-cosine lr):
    the race to ``target`` held-out accuracy (fastopt.bench.mnist) and the
    distributed epoch (fastopt.bench.distributed) train it."""

    hidden: tuple = (256, 256)
    batch: int = 128
    lr: float = 1e-3
    epochs: int = 15
    target: float = 0.94


MNIST = MNISTRecipe()

#: float32 elements of the distributed step's AdamW (fastopt.bench.distributed step)
DISTRIBUTED_STEP_ELEMENTS = 1 << 22
