"""Every optimizer of the family on device arrays, against itself on the host.

One generic CUDA update kernel (and its four-wide twin) steps SGD,
Adam/AdamW, RMSprop, Adagrad, Adamax, NAdam, RAdam and Lion: it calls the
element function picked by the type of the step's scalars. LAMB's
two-phase step is three generic kernels (per-piece sums, per-array
factors, the weights) that call its phase functions the same way. This
file checks each optimizer through them, three ways:

* PTX (this process; no GPU needed, skipped under the simulator): each
  optimizer's update kernels compile for sm_90 in float32 (float32,
  float16 and bfloat16-bits storage) and float64, and the float32 ones
  contain no double-precision instruction outside LAMB's two float64
  reductions (Adam's and SGD's: in test_cuda_ptx.py);
* device steps (where the ``cuda`` backend is usable: a GPU, or the CUDA
  simulator): two or three hyperparameter settings per optimizer, 10 steps
  on the device equal to the same optimizer on the NumPy reference backend;
  fused clipping and the non-finite skip; bfloat16 params with a float32
  master; checkpoints from the device resumed on the host and back;
* ``test_device_steps_under_the_simulator`` runs this file again in a
  subprocess with ``NUMBA_ENABLE_CUDASIM=1`` (it must be set before numba
  is imported), so CI checks the device steps without a GPU.

Sizes are small: the simulator runs every CUDA thread in Python.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

import fastopt

from test_cuda_ptx import K, f64_ops, instructions, ptx_of  # noqa: F401 (K: a fixture)
from test_cuda_sim import run_under_simulator

SIMULATOR = bool(os.environ.get("NUMBA_ENABLE_CUDASIM"))
HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
ON_DEVICE = "cuda" in fastopt.available_backends()

needs_device = pytest.mark.skipif(not ON_DEVICE, reason="no usable GPU here (the simulator "
                                  "run is test_device_steps_under_the_simulator)")

#: each optimizer with two or three settings: its options, maximize and
#: weight decay, and the variants its element function switches on flags
SETTINGS = {
    "SGD": [dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
            dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)],
    "AdamW": [dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
              dict(lr=1e-2, maximize=True)],
    "RMSprop": [dict(lr=1e-2),
                dict(lr=1e-2, centered=True, momentum=0.9, weight_decay=0.01),
                dict(lr=5e-3, alpha=0.9, momentum=0.5, maximize=True)],
    "Adagrad": [dict(lr=5e-2),
                dict(lr=5e-2, lr_decay=0.01, initial_accumulator_value=0.5, weight_decay=0.01,
                     maximize=True)],
    "Lion": [dict(lr=1e-3),
             dict(lr=1e-3, betas=(0.95, 0.98), weight_decay=0.1, maximize=True)],
    "Adamax": [dict(lr=1e-2),
               dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.01, maximize=True)],
    "NAdam": [dict(lr=1e-2),
              dict(lr=1e-2, weight_decay=0.01, momentum_decay=0.01),
              dict(lr=1e-2, weight_decay=0.01, decoupled_weight_decay=True, maximize=True)],
    # beta2 0.999: rho_t > 5 from step 6, so 10 steps take both of RAdam's updates
    "RAdam": [dict(lr=1e-2),
              dict(lr=1e-2, weight_decay=0.01, decoupled_weight_decay=True),
              dict(lr=1e-2, weight_decay=0.1, maximize=True)],
    # (arrays spanning several pieces: tests/cuda_sim/test_cuda_lamb.py)
    "LAMB": [dict(lr=1e-2),
             dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, bias_correction=False,
                  maximize=True)],
}
CASES = [(name, k) for name, settings in SETTINGS.items() for k in range(len(settings))]
CASE_IDS = [f"{name}-{k}" for name, k in CASES]
#: the update kernels' names in _cuda_kernels.KERNELS, one per optimizer
KERNEL_OF = {"SGD": "sgd", "AdamW": "adam", "RMSprop": "rmsprop", "Adagrad": "adagrad",
             "Lion": "lion", "Adamax": "adamax", "NAdam": "nadam", "RAdam": "radam"}
#: the specializations compiled here (test_cuda_ptx.py checks Adam's and SGD's
#: on sm_80 and sm_90, their registers and vector loads)
NEW = [KERNEL_OF[n] for n in ("RMSprop", "Adagrad", "Lion", "Adamax", "NAdam", "RAdam")]
#: the two-phase steps' kernels' names in _cuda_kernels.KERNELS: name + _sums, ...
TWO_PHASE_OF = {"LAMB": "lamb"}

STEPS = 10
SHAPES = [(7, 11), (130,), (5,)]          # a few hundred elements; sizes not multiples of 4
#: device vs host (NumPy reference): relative, with an absolute floor of the
#: same size (params are ~1). A GPU contracts multiply-adds to FMA (the
#: simulator computes like NumPy), so float32 gets twice the room there.
TOL = {np.dtype(np.float32): 1e-6 if SIMULATOR else 2e-6, np.dtype(np.float64): 1e-12}


# -- PTX: every specialization compiles, no double precision in float32 ------------------
# The kernel-module fixture and the PTX readers are test_cuda_ptx.py's (the
# fixture lets numba-cuda compile device functions without a GPU).

ptx = pytest.mark.skipif(not HAVE_NUMBA_CUDA or SIMULATOR,
                         reason="needs numba-cuda; the simulator does not compile to PTX")
SM90 = (9, 0)


def _opcodes(text):
    return {s.split()[0] for s in instructions(text)}


@ptx
def test_every_optimizer_has_its_update_kernels(K):
    assert set(K.ELEMENTS) == set(KERNEL_OF.values())
    assert set(K.OVER_SLOTS) == set(K.ELEMENTS.values())
    assert set(K.TWO_PHASE_ELEMENTS) == set(TWO_PHASE_OF.values())
    assert set(K.TWO_PHASE) == set(K.TWO_PHASE_ELEMENTS.values())
    assert set(KERNEL_OF) | set(TWO_PHASE_OF) == set(SETTINGS)
    for name in K.ELEMENTS:
        assert K.KERNELS[name][0] is K._update_kernel
        assert K.KERNELS[name + "_vec"][0] is K._update_vec_kernel
    for name in K.TWO_PHASE_ELEMENTS:
        assert [K.KERNELS[name + k][0] for k in ("_sums", "_factors", "_finish")] == [
            K._sums_kernel, K._factors_kernel, K._finish_kernel]


@ptx
@pytest.mark.parametrize("storage", [None, "float16", "uint16"], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("name", list(TWO_PHASE_OF.values()))
def test_two_phase_kernels_float32(K, name, storage):
    """The weights' pass (with and without an offset) has no double
    precision; the sums and factors accumulate in float64 on purpose (the
    element math itself stays float32: its fma/sqrt/div are .f32)."""
    for kernel in (name + "_finish", name + "_finish_shifted"):
        text = ptx_of(K, kernel, "float32", storage, SM90)
        assert not f64_ops(text), (kernel, storage, f64_ops(text))
    for kernel in (name + "_sums", name + "_factors"):
        ops = _opcodes(ptx_of(K, kernel, "float32", storage, SM90))
        assert any(o.startswith(("add.f64", "add.rn.f64")) for o in ops), (kernel, sorted(ops))
        assert not any(".approx" in o or ".ftz" in o for o in ops), (kernel, sorted(ops))
    sums = _opcodes(ptx_of(K, name + "_sums", "float32", storage, SM90))
    assert {"sqrt.rn.f32", "div.rn.f32"} <= sums and ".shared" in ptx_of(
        K, name + "_sums", "float32", storage, SM90)


@ptx
@pytest.mark.parametrize("name", list(TWO_PHASE_OF.values()))
def test_two_phase_kernels_float64(K, name):
    for kernel in ("_sums", "_factors", "_finish", "_finish_shifted"):
        assert ".entry" in ptx_of(K, name + kernel, "float64", None, SM90)


@ptx
@pytest.mark.parametrize("storage", [None, "float16", "uint16"], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("name", NEW)
def test_float32_kernels_have_no_double_precision(K, name, storage):
    for kernel in (name, name + "_vec"):
        text = ptx_of(K, kernel, "float32", storage, SM90)
        assert not f64_ops(text), (kernel, storage, f64_ops(text))
        ops = _opcodes(text)
        assert not any(".approx" in o or ".ftz" in o for o in ops), (kernel, sorted(ops))
    vec = _opcodes(ptx_of(K, name + "_vec", "float32", storage, SM90))
    assert {"ld.global.v4.f32", "st.global.v4.f32"} <= vec, (name, sorted(vec))


@ptx
@pytest.mark.parametrize("name", NEW)
def test_float64_kernels_compile(K, name):
    for kernel in (name, name + "_vec"):
        assert ".entry" in ptx_of(K, kernel, "float64", None, SM90)


# -- device steps == host steps ------------------------------------------------------------

def _problem(dtype, seed, steps=STEPS, scale=1.0):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[(rng.standard_normal(s) * scale).astype(dtype) for s in SHAPES]
             for _ in range(steps)]
    return init, grads


class DeviceSide:
    """Device params as a user passes them: one packed buffer (one launch a
    step) or a list of arrays (one launch per array), and their grads."""

    def __init__(self, init, packed):
        from numba import cuda
        from fastopt import cuda as fc
        self.packed = packed
        if packed:
            self.params = fc.pack(init)
            self.grad_buf = self.params.zeros_like()
        else:
            self.params = [cuda.to_device(np.ascontiguousarray(a)) for a in init]

    def grads(self, g):
        from numba import cuda
        if self.packed:
            self.grad_buf.data.copy_to_device(np.concatenate([x.reshape(-1) for x in g]))
            return self.grad_buf
        return [cuda.to_device(np.ascontiguousarray(x)) for x in g]    # new arrays each step

    def host(self):
        if self.packed:
            return self.params.copy_to_host()
        return [p.copy_to_host() for p in self.params]


def _twins(name, device_params, host_params, k=-1, **options):
    """Optimizer ``name`` with its setting ``k`` over the device params, and
    the same over the host params on the NumPy reference backend."""
    cls, kw = getattr(fastopt, name), SETTINGS[name][k]
    return (cls(device_params, **kw, **options),
            cls(host_params, backend="numpy", **kw, **options))


def _same_params(device, host, what):
    for i, (a, b) in enumerate(zip(device, host)):
        _close(a, b, f"{what} params[{i}]")


def _close(actual, expected, what):
    expected = np.asarray(expected)
    tol = TOL[np.dtype(np.float32) if expected.dtype.itemsize < 8 else np.dtype(np.float64)]
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected.astype(np.float64),
                               rtol=tol, atol=tol, err_msg=what)


def _same_state(device_opt, host_opt):
    """Both optimizers' checkpoints hold the same buffers, counts and steps."""
    d, h = device_opt.state_dict(), host_opt.state_dict()
    assert (d["iterations"], d["skipped_steps"]) == (h["iterations"], h["skipped_steps"])
    for gd, gh in zip(d["state"], h["state"]):
        assert gd["step"] == gh["step"]
        assert sorted(gd["buffers"]) == sorted(gh["buffers"])
        for key, buf in gh["buffers"].items():
            _close(gd["buffers"][key], buf, key)
        if "mu_product" in gh:             # NAdam: host float64 on both sides
            assert gd["mu_product"] == gh["mu_product"]


@needs_device
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,k", CASES, ids=CASE_IDS)
def test_device_steps_equal_host_steps(name, k, dtype):
    """10 steps of one packed device buffer (one launch a step, the four-wide
    kernel: a fresh buffer is aligned) == the NumPy reference on the host."""
    init, grads = _problem(dtype, seed=k)
    dev, host = DeviceSide(init, packed=True), [a.copy() for a in init]
    gpu, ref = _twins(name, dev.params, host, k)
    assert gpu.backend == "cuda"
    for g in grads:
        assert gpu.step(dev.grads(g)) is None
        ref.step(g)
    _same_params(dev.host(), host, name)
    _same_state(gpu, ref)


@needs_device
@pytest.mark.parametrize("name", list(SETTINGS))
def test_clipping_and_the_nonfinite_skip_on_device(name):
    """Fused global-norm clipping and the skip: a NaN first step, a clipped
    step, an inf step with state, an unclipped step. The norms the steps
    return, the skipped steps (nothing written, not even a first step's new
    buffers: Adagrad's and SGD's next step is still their first) and the
    trajectory equal the host's. (Four steps: the simulator runs the norm
    pass's shared-memory reduction at ~0.4 s a step.)"""
    init, grads = _problem(np.float32, seed=3, steps=4, scale=0.03)
    grads[1] = [x * 100.0 for x in grads[1]]           # clipped; the others are not
    for t, bad in ((0, np.nan), (2, np.inf)):
        grads[t][1][7] = bad
    dev, host = DeviceSide(init, packed=True), [a.copy() for a in init]
    gpu, ref = _twins(name, dev.params, host, max_grad_norm=1.0, skip_nonfinite=True)
    clipped = 0
    for t, g in enumerate(grads):
        before = dev.host()
        norm = gpu.step(dev.grads(g))
        want = ref.step(g)
        if t in (0, 2):
            assert not np.isfinite(float(norm))
            for a, b in zip(dev.host(), before):
                np.testing.assert_array_equal(a, b)
        else:
            assert float(norm) == pytest.approx(want, rel=1e-12)
            clipped += want > 1.0
    assert clipped == 1
    assert gpu.skipped_steps == ref.skipped_steps == 2
    _same_params(dev.host(), host, name)
    _same_state(gpu, ref)


@needs_device
@pytest.mark.parametrize("name", list(SETTINGS))
def test_bfloat16_params_with_a_float32_master(name):
    """bfloat16 params and grads on the device (uint16 bits, a launch per
    array), a float32 master updated by the step, the 16-bit params its
    rounding: the master equals the host's."""
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    from numba import cuda
    init, grads = _problem(np.float32, seed=4, steps=3)
    host = [a.astype(bf16) for a in init]
    dev = [cuda.to_device(a.view(np.uint16)) for a in host]
    gpu, ref = _twins(name, dev, host)
    for g in grads:
        g16 = [x.astype(bf16) for x in g]
        gpu.step([cuda.to_device(x.view(np.uint16)) for x in g16])
        ref.step(g16)
    masters = [r["master"] for r in gpu.state[0]["runs"]]
    for i, (d, m, want) in enumerate(zip(dev, masters, ref.state[0]["runs"])):
        master = m.copy_to_host()
        _close(master, want["master"], f"{name} master[{i}]")
        np.testing.assert_array_equal(d.copy_to_host().reshape(-1),
                                      master.astype(bf16).view(np.uint16))


@needs_device
@pytest.mark.parametrize("name", list(SETTINGS))
def test_checkpoints_move_between_device_and_host(name):
    """3 steps on the device, saved and resumed on the host for 3, saved and
    resumed on the device for 3 more == 9 steps on the host (float64)."""
    init, grads = _problem(np.float64, seed=5, steps=9)
    cls, kw = getattr(fastopt, name), SETTINGS[name][-1]
    dev, straight = DeviceSide(init, packed=False), [a.copy() for a in init]
    first, ref = _twins(name, dev.params, straight)
    for g in grads:
        ref.step(g)
    for g in grads[:3]:
        first.step(dev.grads(g))
    on_host = dev.host()
    second = cls(on_host, backend="numpy", **kw)
    second.load_state_dict(first.state_dict())
    for g in grads[3:6]:
        second.step(g)
    back = DeviceSide(on_host, packed=False)
    third = cls(back.params, **kw)
    third.load_state_dict(second.state_dict())
    assert third.state[0]["flat"] and not any(     # the state is on the device
        isinstance(b, np.ndarray) for b in third.state[0]["flat"].values())
    for g in grads[6:]:
        third.step(back.grads(g))
    _same_params(back.host(), straight, name)
    _same_state(third, ref)


@needs_device
def test_state_of_a_list_is_aligned_for_the_four_wide_kernel(monkeypatch):
    """Params as a list of arrays whose sizes are not multiples of four:
    each array's view of a state buffer (one per name over the group) starts
    at a multiple of four elements, so every update launch takes the
    four-wide kernel, after a checkpoint load too."""
    from fastopt.backends import numba_cuda as C
    init, grads = _problem(np.float32, seed=7, steps=2)
    dev = DeviceSide(init, packed=False)
    opt = fastopt.RMSprop(dev.params, lr=1e-2, centered=True, momentum=0.9)
    launches, real = [], C._launch
    monkeypatch.setattr(C, "_launch", lambda kernel, *a: (launches.append(kernel),
                                                          real(kernel, *a))[1])
    opt.step(dev.grads(grads[0]))
    opt.load_state_dict(opt.state_dict())
    opt.step(dev.grads(grads[1]))
    assert launches == [C._update_vec_kernel] * (2 * len(SHAPES))
    for run in opt.state[0]["runs"]:
        assert len(run) == 3 and C.vector_ok(*run.values())


@needs_device
def test_add_param_group_on_device():
    """A group added after some steps gets its own state; the first group
    keeps its own (the device placement runs the base class's bookkeeping)."""
    from numba import cuda
    init, grads = _problem(np.float32, seed=6, steps=4)
    dev = [cuda.to_device(a) for a in init]
    host = [a.copy() for a in init]
    gpu = fastopt.RMSprop(dev[:2], lr=1e-2, momentum=0.9)
    ref = fastopt.RMSprop(host[:2], lr=1e-2, momentum=0.9, backend="numpy")
    for t, g in enumerate(grads):
        if t == 2:
            gpu.add_param_group({"params": [dev[2]], "lr": 1e-3})
            ref.add_param_group({"params": [host[2]], "lr": 1e-3})
        n = 2 if t < 2 else 3
        gpu.step([cuda.to_device(x) for x in g[:n]])
        ref.step(g[:n])
    assert [st["step"] for st in gpu.state] == [4, 2]
    _same_params([a.copy_to_host() for a in dev], host, "RMSprop")
    _same_state(gpu, ref)


# -- the simulator run --------------------------------------------------------------------

@pytest.mark.skipif(ON_DEVICE or not HAVE_NUMBA_CUDA,
                    reason="the device tests run in this process (a GPU, or the simulator "
                           "already), or numba-cuda is not installed")
def test_device_steps_under_the_simulator():
    out, counts = run_under_simulator(str(Path(__file__)), timeout=600)
    per_optimizer = 3 if importlib.util.find_spec("ml_dtypes") else 2   # bfloat16 needs it
    device_tests = 2 * len(CASES) + per_optimizer * len(SETTINGS) + 2
    assert counts.get("passed") == device_tests, out[-2000:]
