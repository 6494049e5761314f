"""Compact optimizer state (``state_dtype="bfloat16"`` / ``"int8"``) on the
``cuda`` backend: the device kernel against the CPU Numba backend and the
NumPy reference, packed buffers and 16-bit params, the skip, checkpoints.

Under the CUDA simulator the device kernel runs as Python on NumPy float32
scalars: the element math is the same IEEE sequence as the CPU Numba
drivers' (they do not contract to FMA either) and the codecs are the same
integer operations, so params, codes and absmax arrays must be equal **bit
for bit**. On a GPU, NVVM contracts multiply-adds into FMAs, so a float
value may differ in its last bit and, now and then, a stochastic rounding
go the other way: there the comparisons take the tolerance in
:func:`same_run` (benchmarks/gpu_check.py checks the same on the GPU).
"""

from __future__ import annotations

import numpy as np
import pytest
from cuda_helpers import dev, host  # skips the module where CUDA is unusable

import fastopt
from fastopt.backends import numba_cuda as C

# the CPU side of the comparisons, as the host compact-state tests run it
from test_compact_state import problem as host_problem, run as run_host  # noqa: E402

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

FORMATS = ["bfloat16", "int8"]
#: an 8-bit layout of 2 + 1 + 1 absmax blocks (padded between arrays), more
#: blocks than the simulator's grid, short last blocks
SIZES = (300, 40, 5)


def problem(steps):
    """Params and ``steps`` gradients over SIZES (float32, seeded)."""
    return host_problem(steps, SIZES)


#: exact on the simulator; a GPU's FMAs move a value by an ulp and, rarely,
#: a rounding by one code
EXACT = C.SIMULATOR


def run_device(cls, init, grads, packed=False, opt=None, params=None, **kw):
    """``cls`` over device copies of ``init`` (one packed buffer when
    ``packed``), stepped with ``grads``; returns (host params, optimizer)."""
    if params is None:
        params = C.pack([dev(a) for a in init]) if packed else [dev(a) for a in init]
    opt = opt or cls(params, backend="cuda", **kw)
    for g in grads:
        opt.step([dev(x) for x in g])
    views = list(params)
    return [host(v) for v in views], opt


def host_state(opt, gi=0):
    """Group ``gi``'s compact buffers as host arrays (codes and absmax)."""
    return {n: (b if isinstance(b, np.ndarray) else host(b))
            for n, b in opt.state[gi]["flat"].items()}


def decoded(opt, gi=0):
    return opt._state_format.decoded(host_state(opt, gi),
                                     [a.size for a in opt.param_groups[gi]["params"]])


def same_run(got, want, what=""):
    """``got`` and ``want``: (params, optimizer). Bit for bit on the simulator
    (see the module doc); on a GPU the decoded state and params within a
    code step in all but a few elements."""
    (gp, gopt), (wp, wopt) = got, want
    if EXACT:
        for i, (a, b) in enumerate(zip(gp, wp)):
            np.testing.assert_array_equal(np.asarray(a).view(np.uint32 if a.itemsize == 4
                                                              else np.uint16),
                                          np.asarray(b).view(np.uint32 if b.itemsize == 4
                                                             else np.uint16),
                                          err_msg=f"{what} params[{i}]")
        gs, ws = host_state(gopt), host_state(wopt)
        assert sorted(gs) == sorted(ws), what
        for n in ws:
            assert gs[n].dtype == ws[n].dtype, (what, n)
            np.testing.assert_array_equal(gs[n], ws[n], err_msg=f"{what} {n}")
        return
    for n, w in decoded(wopt).items():
        ok = np.isclose(decoded(gopt)[n], w, rtol=0.07, atol=1e-6)
        assert ok.mean() > 0.99, (what, n)
    for a, b in zip(gp, wp):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   rtol=1e-3, atol=1e-4, err_msg=what)


# one setting per optimizer with compact state (test_compact_state.py's),
# each under one format (the simulator is slow; Adam/AdamW take both below)
FAMILY = [
    (fastopt.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), "int8"),
    (fastopt.RMSprop, dict(lr=1e-3, momentum=0.9), "bfloat16"),
    (fastopt.Adagrad, dict(lr=1e-2, lr_decay=0.01, initial_accumulator_value=0.1), "int8"),
    (fastopt.Adamax, dict(lr=1e-2), "bfloat16"),
    (fastopt.NAdam, dict(lr=1e-2), "int8"),
    (fastopt.RAdam, dict(lr=1e-2), "bfloat16"),
    (fastopt.Lion, dict(lr=1e-3, weight_decay=0.1), "int8"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cls, kw", [(fastopt.AdamW, dict(lr=1e-2, weight_decay=0.01)),
                                     (fastopt.Adam, dict(lr=1e-2, amsgrad=True,
                                                         maximize=True))],
                         ids=["AdamW", "Adam-amsgrad"])
def test_adam_on_the_device_is_the_cpu_numba_step(cls, kw, fmt):
    """Params, codes and absmax arrays after 3 steps: the device's are the
    CPU Numba backend's (three slots with amsgrad: exp_avg signed, the two
    second moments unsigned under int8)."""
    init, grads = problem(3)
    kw = dict(kw, state_dtype=fmt, state_seed=7)
    got = run_device(cls, init, grads, **kw)
    same_run(got, run_host(cls, init, grads, backend="numba", **kw), cls.__name__)
    assert all(not isinstance(b, np.ndarray) for b in got[1].state[0]["flat"].values())


@pytest.mark.parametrize("cls, kw, fmt", FAMILY,
                         ids=[f"{c.__name__}-{f}" for c, _, f in FAMILY])
def test_the_family_on_the_device_is_the_cpu_numba_step(cls, kw, fmt):
    init, grads = problem(2)
    kw = dict(kw, state_dtype=fmt)
    same_run(run_device(cls, init, grads, **kw), run_host(cls, init, grads, backend="numba",
                                                          **kw), cls.__name__)


@pytest.mark.parametrize("fmt", FORMATS)
def test_exact_math_writes_the_reference_codes(fmt):
    """SGD with momentum 0.5 and lr 2**-4 (every product exact): the device
    writes the NumPy reference's codes and params bit for bit, on a GPU too."""
    init, grads = problem(3)
    kw = dict(lr=2.0 ** -4, momentum=0.5, state_dtype=fmt)
    got = run_device(fastopt.SGD, init, grads, **kw)
    want = run_host(fastopt.SGD, init, grads, backend="numpy", **kw)
    for a, b in zip(got[0], want[0]):
        np.testing.assert_array_equal(a, b)
    gs, ws = host_state(got[1]), host_state(want[1])
    for n in ws:
        np.testing.assert_array_equal(gs[n], ws[n], err_msg=n)


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_buffer_and_bf16_params_with_a_master(fmt):
    """A DeviceFlatArrays of three arrays (one run: 8-bit state padded
    between them), grads as a list and as one buffer; and bfloat16 params
    (uint16 bits on the device) with a float32 master: the CPU's steps."""
    init, grads = problem(2)
    kw = dict(lr=1e-2, weight_decay=0.01, state_dtype=fmt)
    want = run_host(fastopt.AdamW, init, grads, backend="numba", **kw)
    same_run(run_device(fastopt.AdamW, init, grads, packed=True, **kw), want, "packed")
    params = C.pack([dev(a) for a in init])
    opt = fastopt.AdamW(params, backend="cuda", **kw)
    for g in grads:
        flat = params.zeros_like()
        flat.data.copy_to_device(np.concatenate(g))
        opt.step(flat)
    same_run(([host(v) for v in params], opt), want, "packed grads")

    low = [a.astype(BF16) for a in init]
    low_grads = [[x.astype(BF16) for x in g] for g in grads]
    want = run_host(fastopt.AdamW, low, low_grads, backend="numba", **kw)
    got = run_device(fastopt.AdamW, [a.view(np.uint16) for a in low],
                     [[x.view(np.uint16) for x in g] for g in low_grads], **kw)
    same_run(got, ([p.view(np.uint16) for p in want[0]], want[1]), "bf16 params")
    np.testing.assert_array_equal(
        np.concatenate([host(r["master"]) for r in got[1].state[0]["runs"]]),
        np.concatenate([r["master"] for r in want[1].state[0]["runs"]]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_skipped_step_leaves_codes_and_absmax_untouched(fmt):
    """A NaN gradient with skip_nonfinite: no code, absmax or param moves on
    the device, the step count stays, and the run goes on as if the bad
    step had never come (the same rounding keys)."""
    init, grads = problem(3)
    bad = [g.copy() for g in grads[1]]
    bad[0][123] = np.nan
    kw = dict(lr=1e-2, skip_nonfinite=True, state_dtype=fmt)
    params, opt = run_device(fastopt.AdamW, init, grads[:1], **kw)
    before = host_state(opt)
    dparams = opt.param_groups[0]["params"]
    opt.step([dev(x) for x in bad])
    assert opt.skipped_steps == 1 and opt.state[0]["step"] == 1
    for n, b in host_state(opt).items():
        np.testing.assert_array_equal(b, before[n], err_msg=n)
    for a, b in zip(dparams, params):
        np.testing.assert_array_equal(host(a), b)
    got = run_device(fastopt.AdamW, init, grads[1:], opt=opt, params=dparams)
    same_run(got, run_device(fastopt.AdamW, init, grads, **kw), "after the skip")


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoints_move_codes_between_host_and_device_unchanged(fmt):
    """2 steps on the device, state_dict (host codes, no float32 copy),
    loaded into a new device optimizer and into a CPU one: 2 more steps on
    each are the uninterrupted device run's and the CPU's; a CPU checkpoint
    resumes on the device the same way."""
    init, grads = problem(4)
    kw = dict(lr=1e-2, state_dtype=fmt, state_seed=3)
    straight = run_device(fastopt.AdamW, init, grads, **kw)
    half, opt = run_device(fastopt.AdamW, init, grads[:2], **kw)
    sd = opt.state_dict()
    bufs = sd["state"][0]["buffers"]
    for n, b in host_state(opt).items():
        assert isinstance(bufs[n], np.ndarray) and bufs[n].dtype == b.dtype
        np.testing.assert_array_equal(bufs[n], b)
    assert bufs["exp_avg"].dtype == (np.uint16 if fmt == "bfloat16" else np.int8)

    params = [dev(a) for a in half]
    resumed = fastopt.AdamW(params, backend="cuda", **kw)
    resumed.load_state_dict(sd)
    same_run(run_device(fastopt.AdamW, half, grads[2:], opt=resumed, params=params),
             straight, "device -> device")

    cpu_params = [a.copy() for a in half]
    cpu = fastopt.AdamW(cpu_params, backend="numba", **kw)
    cpu.load_state_dict(sd)
    for g in grads[2:]:
        cpu.step([x.copy() for x in g])
    same_run(straight, (cpu_params, cpu), "device -> host")

    cpu_half, cpu_opt = run_host(fastopt.AdamW, init, grads[:2], backend="numba", **kw)
    params = [dev(a) for a in cpu_half]
    on_device = fastopt.AdamW(params, backend="cuda", **kw)
    on_device.load_state_dict(cpu_opt.state_dict())
    same_run(run_device(fastopt.AdamW, cpu_half, grads[2:], opt=on_device, params=params),
             run_host(fastopt.AdamW, init, grads, backend="numba", **kw), "host -> device")


def test_device_state_is_as_compact_as_on_the_host():
    init, grads = problem(1)
    for fmt in FORMATS:
        got = run_device(fastopt.AdamW, init, grads, lr=1e-2, state_dtype=fmt)[1]
        want = run_host(fastopt.AdamW, init, grads, lr=1e-2, state_dtype=fmt)[1]
        assert got.state_nbytes() == want.state_nbytes() > 0
        assert {n: b.dtype for n, b in got.state[0]["flat"].items()} == \
            {n: b.dtype for n, b in want.state[0]["flat"].items()}


def test_float64_device_params_are_refused_with_compact_state():
    p = [dev(np.zeros(8))]
    with pytest.raises(TypeError, match=r"params\[0\] is float64"):
        fastopt.AdamW(p, backend="cuda", state_dtype="int8")


def test_state_dict_of_device_codes_works_without_a_copy_method(monkeypatch):
    """The simulator's device arrays forward ``.copy()`` to NumPy, a GPU's
    have none: without it, as on a GPU, ``state_dict`` still hands back
    host codes (copied through the placement's ``to_host``)."""
    if C.SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        forward = FakeCUDAArray.__getattr__

        def as_on_a_gpu(self, name):
            if name == "copy":
                raise AttributeError("a numba device array has no copy()")
            return forward(self, name)
        monkeypatch.setattr(FakeCUDAArray, "__getattr__", as_on_a_gpu)
    init, grads = problem(1)
    opt = run_device(fastopt.AdamW, init, grads, lr=1e-2, state_dtype="int8")[1]
    bufs = opt.state_dict()["state"][0]["buffers"]
    for n, b in host_state(opt).items():
        np.testing.assert_array_equal(bufs[n], b)
