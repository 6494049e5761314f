"""Compile every CUDA kernel to PTX for sm_80 and sm_90 and read the code.

The update kernels are generic over the optimizer (compiled once per
element function): here as Adam's and SGD's specializations, the two the
storage and register checks below were measured on; the other optimizers'
are compiled by tests/test_cuda_family.py. Also the device flat operations
(L-BFGS's vector kernels, SAM's perturbation: _flat_cuda_kernels.py), and
the update kernels with an offset (SAM's restore fused into the step),
whose code without one is the code they had before offsets existed.

``numba.cuda.compile_ptx`` needs no GPU (numba-cuda's cu13 extra brings
NVVM). The float32 kernels must contain no double-precision instruction at
all (a stray Python float literal would promote the math to float64 and
halve the throughput); the float64 accumulation of the global norm is
allowed only in its two reduction kernels. Division and sqrt must be the
IEEE ``.rn`` forms (no fastmath), and the reduction must not use warp
shuffles (the CUDA simulator has none).
"""

from __future__ import annotations

import importlib.util
import os
import re
import types

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                       reason="numba-cuda not installed (pip install 'fastopt[cuda]')"),
    pytest.mark.skipif(bool(os.environ.get("NUMBA_ENABLE_CUDASIM")),
                       reason="the CUDA simulator does not compile to PTX"),
]

CCS = [(8, 0), (9, 0)]
#: the update kernels' specializations checked here (test_cuda_family.py: the others)
UPDATES = ("adam", "sgd")
#: float32 math with each storage: float32, float16, bfloat16 bits (uint16)
F32_VARIANTS = [("float32", None), ("float32", "float16"), ("float32", "uint16")]


@pytest.fixture(scope="module")
def K():
    # compile_ptx compiles the kernel for the cc it is given, but numba-cuda
    # (0.30) compiles each *device function* a kernel calls (here the
    # @overload'ed 16-bit conversions) for the current device's cc, which
    # needs a GPU context. Without a GPU, tell it a device exists; the cc
    # only selects NVVM's target for that device function's IR.
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda
    real = dispatcher.get_current_device
    if not cuda.is_available():
        dispatcher.get_current_device = lambda: types.SimpleNamespace(
            compute_capability=(8, 0))
    try:
        from fastopt.backends import _cuda_kernels
        yield _cuda_kernels
    finally:
        dispatcher.get_current_device = real


_PTX: dict = {}


def checked(K) -> dict:
    """``K.KERNELS`` with the update kernels compiled for Adam and SGD only."""
    return {name: v for name, v in K.KERNELS.items()
            if name.removesuffix("_vec") not in K.ELEMENTS
            or name.removesuffix("_vec") in UPDATES}


def ptx_of(K, name, dtype, storage, cc):
    from numba import cuda
    key = (name, dtype, storage, cc)
    if key not in _PTX:
        kernel, _ = K.KERNELS[name]
        sig = K.ptx_signatures(dtype, storage)[name]
        _PTX[key], _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
    return _PTX[key]


def instructions(ptx):
    """PTX instruction lines (no directives, labels or comments)."""
    out = []
    for line in ptx.splitlines():
        s = line.strip()
        if not s or s.startswith(("//", ".", "{", "}", "$")):
            continue
        if s.startswith("@"):           # predicated: keep the instruction part
            s = s.split(None, 1)[1]
        out.append(s)
    return out


def f64_ops(ptx):
    """Opcodes that touch double precision (any ``.f64`` type suffix)."""
    return sorted({s.split()[0] for s in instructions(ptx) if ".f64" in s.split()[0]})


def test_checker_catches_a_promoted_kernel(K):
    """Positive control: a float literal in float32 code is float64 math.
    (``K``: fastopt's kernel module loads numba-cuda's typing first.)"""
    from numba import cuda

    def promoted(x):
        i = cuda.grid(1)
        if i < x.size:
            x[i] = x[i] * 0.1
    ptx, _ = cuda.compile_ptx(promoted, "(float32[::1],)", cc=(8, 0))
    assert "mul.f64" in f64_ops(ptx) or "mul.rn.f64" in f64_ops(ptx), f64_ops(ptx)


@pytest.mark.parametrize("cc", CCS, ids=lambda c: f"sm_{c[0]}{c[1]}")
@pytest.mark.parametrize("dtype,storage", F32_VARIANTS, ids=["f32", "f16", "bf16"])
def test_float32_kernels_have_no_double_precision(K, dtype, storage, cc):
    for name, (_, kind) in checked(K).items():
        ptx = ptx_of(K, name, dtype, storage, cc)
        assert f".target sm_{cc[0]}{cc[1]}" in ptx
        ops = f64_ops(ptx)
        if kind == "elementwise":
            assert not ops, f"{name} ({storage or dtype} storage) uses float64: {ops}"
        else:   # the norm: float64 accumulation on purpose, IEEE rounding
            assert any(o.startswith(("add.f64", "add.rn.f64", "fma.rn.f64")) for o in ops), ops


@pytest.mark.parametrize("cc", CCS, ids=lambda c: f"sm_{c[0]}{c[1]}")
def test_ieee_division_and_sqrt_no_fastmath(K, cc):
    ptx = ptx_of(K, "adam", "float32", None, cc)
    ops = {s.split()[0] for s in instructions(ptx)}
    assert "sqrt.rn.f32" in ops and "div.rn.f32" in ops, sorted(ops)
    assert not any(".approx" in o or ".ftz" in o for o in ops), sorted(ops)


@pytest.mark.parametrize("cc", CCS, ids=lambda c: f"sm_{c[0]}{c[1]}")
def test_reduction_uses_shared_memory_not_warp_shuffles(K, cc):
    for storage in (None, "float16", "uint16"):
        ptx = ptx_of(K, "sumsq_partial", "float32", storage, cc)
        assert ".shared" in ptx and "bar.sync" in ptx
        assert not re.search(r"\bshfl\.", ptx) and "vote." not in ptx


@pytest.mark.parametrize("cc", CCS, ids=lambda c: f"sm_{c[0]}{c[1]}")
def test_float64_kernels_compile(K, cc):
    for name in checked(K):
        assert ".entry" in ptx_of(K, name, "float64", None, cc)


def test_kernels_compile_with_numpy_2_5_namespace(K):
    """numba-cuda 0.30.4 registers ``np.row_stack``, which NumPy 2.5 removed:
    the first kernel compile failed on the GPU machine (numpy 2.5.2). With
    the namespace as NumPy 2.5 has it, every kernel still compiles (the
    update kernels as Adam's and SGD's), and ``np.row_stack`` is gone again
    afterwards."""
    import subprocess
    import sys
    code = """
import types
import numpy as np
if hasattr(np, "row_stack"):           # NumPy < 2.5: make its namespace 2.5's
    del np.row_stack
    np.__all__ = [x for x in np.__all__ if x != "row_stack"]
import numba.cuda.dispatcher as dispatcher
from numba import cuda
if not cuda.is_available():            # as in the K fixture above
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(8, 0))
from fastopt.backends import _cuda_kernels as K
names = [n for n in K.KERNELS if n.removesuffix("_vec") not in K.ELEMENTS] + ["adam", "sgd_vec"]
for name in names:
    kernel, _ = K.KERNELS[name]
    cuda.compile_ptx(kernel.py_func, K.ptx_signatures()[name], cc=(9, 0))
assert not hasattr(np, "row_stack")
print("compiled", len(names))
"""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"compiled {len(checked(K)) - 2 * len(UPDATES) + 2}" in out.stdout


@pytest.mark.parametrize("cc", CCS, ids=lambda c: f"sm_{c[0]}{c[1]}")
@pytest.mark.parametrize("dtype,storage", F32_VARIANTS, ids=["f32", "f16", "bf16"])
def test_update_kernels_have_vector_loads_and_stores(K, dtype, storage, cc):
    """The vector path moves four elements per instruction: 16-byte float32
    loads/stores, 8-byte ones for 16-bit grads and params (NVVM alone keeps
    four scalar loads: it cannot prove an array's alignment)."""
    for name in ("adam_vec", "sgd_vec"):
        ops = {s.split()[0] for s in instructions(ptx_of(K, name, dtype, storage, cc))}
        assert {"ld.global.v4.f32", "st.global.v4.f32"} <= ops, (name, sorted(ops))
        if storage:
            assert {"ld.global.v4.u16", "st.global.v4.u16"} <= ops, (name, sorted(ops))


def test_scalar_update_kernels_have_no_vector_ops(K):
    for name in ("adam", "sgd"):
        ptx = ptx_of(K, name, "float32", None, (9, 0))
        assert not re.search(r"\b(ld|st)\.global\.v\d", ptx), name


def _registers(ptx, cc):
    """Registers per thread ptxas gives the kernel (nvJitLink, no GPU needed)."""
    nvjitlink = pytest.importorskip("cuda.bindings.nvjitlink")
    h = nvjitlink.create(2, [f"-arch=sm_{cc[0]}{cc[1]}", "-verbose"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(h, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
        nvjitlink.complete(h)
        log = bytearray(nvjitlink.get_info_log_size(h))
        nvjitlink.get_info_log(h, log)
    finally:
        nvjitlink.destroy(h)
    found = re.search(r"Used (\d+) registers", log.decode(errors="replace"))
    assert found, log.decode(errors="replace")
    return int(found.group(1))


@pytest.mark.parametrize("storage", [None, "uint16"], ids=["f32", "bf16"])
def test_scalar_kernels_keep_their_registers_apart_from_the_vector_loop(K, storage):
    """Why the vector loop is a kernel of its own: its registers would lower
    the scalar loop's occupancy (unaligned views ran at 0.58 of the copy
    roofline on the H200 when both shared one kernel)."""
    for name in ("adam", "sgd"):
        scalar = _registers(ptx_of(K, name, "float32", storage, (9, 0)), (9, 0))
        vector = _registers(ptx_of(K, name + "_vec", "float32", storage, (9, 0)), (9, 0))
        assert scalar <= vector, (name, scalar, vector)
        if name == "adam":   # 8-register allocation units: 40 vs 64 per thread today
            assert -(-scalar // 8) < -(-vector // 8), (scalar, vector)


# -- the flat operations' kernels (L-BFGS, SAM) ----------------------------------------------

@pytest.fixture(scope="module")
def FK(K):
    from fastopt.backends import _flat_cuda_kernels
    return _flat_cuda_kernels


def flat_ptx_of(FK, name, dtype, cc=(9, 0)):
    key = ("flat", name, dtype, cc)
    if key not in _PTX:
        kernel, _ = FK.KERNELS[name]
        _PTX[key], _ = cuda_compile(kernel.py_func, FK.ptx_signatures(dtype)[name], cc)
    return _PTX[key]


def cuda_compile(fn, sig, cc):
    from numba import cuda
    return cuda.compile_ptx(fn, sig, cc=cc)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_flat_kernels_compile(FK, dtype):
    for name, (_, kind) in FK.KERNELS.items():
        ptx = flat_ptx_of(FK, name, dtype)
        assert ".entry" in ptx
        if dtype == "float32" and kind == "elementwise":
            assert not f64_ops(ptx), (name, f64_ops(ptx))


def test_flat_vector_kernel_float32(FK):
    """The vector kernel's elementwise math is float32 (its axpy a fused or
    plain float32 multiply-add); its sums are float64, in shared memory,
    without warp shuffles; IEEE forms only."""
    ptx = flat_ptx_of(FK, "vector", "float32")
    ops = {s.split()[0] for s in instructions(ptx)}
    assert ops & {"fma.rn.f32", "mul.rn.f32", "mul.f32"}, sorted(ops)
    assert any(o.startswith(("add.f64", "add.rn.f64", "fma.rn.f64")) for o in ops), sorted(ops)
    assert ".shared" in ptx and "bar.sync" in ptx and not re.search(r"\bshfl\.", ptx)
    assert not any(".approx" in o or ".ftz" in o for o in ops), sorted(ops)


def test_offset_adds_one_load_per_element(K):
    """With an offset the four-wide kernel reads one more vector per group
    of four (``p - e``), and without one exactly Adam's arrays: g, p and
    its three state slots (the offset's code is compiled out)."""
    def v4_loads(name):
        return sum(1 for s in instructions(ptx_of(K, name, "float32", None, (9, 0)))
                   if s.split()[0] == "ld.global.v4.f32")
    assert v4_loads("adam_vec") == 5
    assert v4_loads("adam_vec_shifted") == 6


# -- compact optimizer state (state_dtype bfloat16 / int8: _cuda_compact.py) ----------------

@pytest.fixture(scope="module")
def CK(K):
    from fastopt.backends import _cuda_compact
    return _cuda_compact


#: the compact kernel's specializations checked here: Adam (three slots, both
#: signednesses under int8, the offset) and SGD (one slot), each code format
COMPACT_CHECKED = ("adam_bf16", "adam_q8", "adam_q8_shifted", "sgd_bf16", "sgd_q8")


def compact_ptx_of(CK, name, storage=None, cc=(9, 0)):
    key = ("compact", name, storage, cc)
    if key not in _PTX:
        kernel, _ = CK.KERNELS[name]
        _PTX[key], _ = cuda_compile(kernel.py_func, CK.ptx_signatures("float32", storage)[name],
                                    cc)
    return _PTX[key]


@pytest.mark.parametrize("storage", [None, "float16", "uint16"], ids=["f32", "f16", "bf16"])
def test_compact_kernels_are_float32_with_integer_codecs(CK, storage):
    """No double precision anywhere (the codecs are integer and bit
    operations on float32 values), IEEE division and sqrt; 8-bit codes take
    the block's absmax through shared memory (bar.sync, no warp shuffles),
    bfloat16 codes need no block-wide step at all (compiled out)."""
    for name in COMPACT_CHECKED:
        ptx = compact_ptx_of(CK, name, storage)
        ops = {s.split()[0] for s in instructions(ptx)}
        assert not f64_ops(ptx), (name, f64_ops(ptx))
        assert not any(".approx" in o or ".ftz" in o for o in ops), (name, sorted(ops))
        assert not re.search(r"\bshfl\.", ptx), name
        assert ("bar.sync" in ptx) == ("_q8" in name), name
        if name.startswith("adam"):
            assert "sqrt.rn.f32" in ops and "div.rn.f32" in ops, (name, sorted(ops))


def test_compact_kernels_compile_for_the_whole_family(CK):
    """Every optimizer the compact kernel steps, each code format, sm_80."""
    for name in CK.KERNELS:
        assert ".entry" in compact_ptx_of(CK, name, cc=(8, 0)), name
