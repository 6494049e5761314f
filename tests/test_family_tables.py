"""Every optimizer in every hand-kept table that gives it coverage.

A new optimizer reaches its tests, benchmarks, `fastopt train` and `fastopt
info` through lists kept by hand (docs/adding-an-optimizer.md, the
checklist). Missing one gave no error, only no coverage: this test names
the list it is missing from. The test modules' tables are read from their
source (importing the CUDA ones would start the simulator)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import fastopt
from fastopt.optim.base import Optimizer

ROOT = Path(__file__).resolve().parent.parent
CLASSES = sorted(n for n, c in vars(fastopt).items()
                 if inspect.isclass(c) and issubclass(c, Optimizer) and c is not Optimizer)
#: stepped with gradients, one element function each (L-BFGS takes a closure)
ELEMENTWISE = [n for n in CLASSES if n != "LBFGS"]
COMPACT = [n for n in ELEMENTWISE if getattr(fastopt, n)._nonnegative_state is not None]


def _names_in(path, target):
    """The identifiers and strings in the value assigned to ``target`` at the
    top of ``path``, lower-cased."""
    tree = ast.parse((ROOT / path).read_text())
    for node in tree.body:
        names = [t.id for t in getattr(node, "targets", [getattr(node, "target", None)])
                 if isinstance(t, ast.Name)]
        if target in names and node.value is not None:
            found = set()
            for sub in ast.walk(node.value):
                if isinstance(sub, ast.Name):
                    found.add(sub.id.lower())
                elif isinstance(sub, ast.Attribute):
                    found.add(sub.attr.lower())
                elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    found.update(part.lower() for part in sub.value.split("-"))
            return found
    raise AssertionError(f"{path} has no top-level {target} =")


# (file, table, the optimizers it must name, what it gives them)
TABLES = [
    ("tests/family_helpers.py", "FAMILY",
     [n for n in ELEMENTWISE if n not in ("Adam", "AdamW", "SGD")],
     "clipping, the skip, validation, checkpoints, one call per group"),
    ("tests/test_step_plan.py", "OPTIMIZERS", ELEMENTWISE, "planned = full step, bit for bit"),
    ("tests/test_compact_state.py", "FAMILY", COMPACT, "compact state on every backend"),
    ("tests/cuda_sim/test_cuda_compact.py", "FAMILY",
     [n for n in COMPACT if n not in ("Adam", "AdamW")],       # (their own test there)
     "compact state on the device"),
    ("tests/test_cuda_family.py", "SETTINGS", [n for n in ELEMENTWISE if n != "Adam"],
     "device steps under the simulator"),
    ("tests/test_cuda_gpu_check.py", "FAMILY",
     [n for n in ELEMENTWISE if n not in ("Adam", "AdamW")], "the GPU check's family rows"),
    ("benchmarks/gpu_check.py", "FAMILY", [n for n in ELEMENTWISE if n not in ("Adam", "AdamW")],
     "the one-call GPU check and timings"),
    ("fastopt/nn/training.py", "OPTIMIZERS", CLASSES, "fastopt train --optimizer"),
    ("fastopt/cli/info.py", "_STATE_ROWS", ELEMENTWISE, "fastopt info's state table"),
]


@pytest.mark.parametrize("path, table, required, gives", TABLES,
                         ids=[f"{p}:{t}" for p, t, *_ in TABLES])
def test_every_optimizer_is_in_the_table(path, table, required, gives):
    assert "AdamW" in ELEMENTWISE and "Lion" in COMPACT and "LAMB" not in COMPACT
    found = _names_in(path, table)
    missing = [n for n in required if n.lower() not in found]
    assert not missing, (f"{path}'s {table} lacks {missing} ({gives}); see "
                         "docs/adding-an-optimizer.md, the checklist")


def test_every_optimizer_has_a_floor_in_the_ci_guard():
    """Only AdamW and SGD had floors: the Cython Lion step ran at 8% of the
    roofline on the AVX2 build with every check passing."""
    import json

    from fastopt.bench import cases
    floors = json.loads((ROOT / "fastopt/bench/floors.json").read_text())
    floored = {c["case"]: c["floors"] for c in floors["cases"] if "simd" not in c}
    missing = [k for k in cases.FAMILY
               if set(floored.get(cases.family_rows(k)[0].case, {})) != {"numba", "cython"}]
    assert not missing, (f"fastopt/bench/floors.json lacks numba and cython floors for the "
                         f"'1 x 16M' cases of {missing}; see docs/adding-an-optimizer.md")


def test_every_compact_state_and_the_avx2_build_have_floors_in_the_ci_guard():
    """The 8-bit state step ran scalar on every non-AVX-512 CPU (0.10x torch
    fused at 16M) with every check passing: no compact-state case had a
    floor, and the CI host loads the AVX-512 build. Each compact state's 16M
    case is floored for both backends, and it and each optimizer's 16M case
    on the x86-64-v3 build too."""
    import json

    from fastopt.bench import cases
    floors = json.loads((ROOT / "fastopt/bench/floors.json").read_text())
    floored = {(c["case"], c.get("simd")): c["floors"] for c in floors["cases"]}
    rows = [r.case for r in cases.state_rows(sizes=(1 << 24,)) if r.state != "float32"]
    missing = [r for r in rows if set(floored.get((r, None), {})) != {"numba", "cython"}]
    family = [cases.family_rows(k)[0].case for k in cases.FAMILY]
    family += ["adamw 1 x 16M", "sgd nesterov 1 x 16M"]
    missing += [f"{r} [x86-64-v3]" for r in (*rows, *family)
                if set(floored.get((r, "x86-64-v3"), {})) != {"cython"}]
    assert not missing, f"fastopt/bench/floors.json lacks floors for {missing}"


def test_every_optimizer_has_benchmark_cases():
    from fastopt.bench import cases
    have = {k.optimizer for k in cases.KIND.values()}
    missing = [n for n in ELEMENTWISE if n != "Adam" and n not in have]
    assert not missing, f"fastopt/bench/cases.py's KIND lacks {missing}"


def test_each_optimizers_help_names_the_keyword_options():
    """help(fastopt.AdamW) showed ``**options`` and nowhere said what they
    are (state_dtype, max_grad_norm, ...): each docstring ends with them."""
    lacking = [n for n in ELEMENTWISE if "state_dtype" not in
               (getattr(fastopt, n).__doc__ or "")]
    assert not lacking, f"{lacking}: their docstrings lack the keyword options"

