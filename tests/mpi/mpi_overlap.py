"""Overlapped gradient averaging (DataParallel.backward_hook), on every rank.

Run by tests/test_distributed.py as ``mpiexec -n 2|3 python -m pytest
tests/mpi/mpi_overlap.py``. Every test also arms a watchdog (faulthandler:
after WATCHDOG_S seconds it prints every thread's stack and exits the rank,
which ends the job), so a collective that never matches is a failure with a
traceback, not a hang; the launcher's own timeout backs it up.
"""

from __future__ import annotations

import faulthandler
import os

import numpy as np
import pytest

import fastopt
from fastopt import distributed as dist
from fastopt.distributed.optim import OVERLAP_BUCKET_ELEMS
from fastopt.nn import MLP
from fastopt.distributed.training import DataParallelTraining
from fastopt.nn.training import fit, make_optimizer

MPI = pytest.importorskip("mpi4py.MPI")
COMM = MPI.COMM_WORLD
RANK, N = COMM.Get_rank(), COMM.Get_size()
WATCHDOG_S = float(os.environ.get("FASTOPT_MPI_WATCHDOG_S", "60"))
SIZES = (12, 40, 24, 4)          # 1,620 parameters in 6 arrays
GLOBAL_B = 30


@pytest.fixture(autouse=True)
def watchdog():
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
    COMM.Barrier()        # the next test starts together (and a stray request would show here)


def batch(step, dtype):
    """The global batch of ``step`` (the same on every rank) and this rank's slice."""
    rng = np.random.default_rng(100 + step)
    X = rng.standard_normal((GLOBAL_B, SIZES[0])).astype(dtype)
    y = rng.integers(0, SIZES[-1], GLOBAL_B)
    lo, hi = GLOBAL_B * RANK // N, GLOBAL_B * (RANK + 1) // N
    return X, y, X[lo:hi], y[lo:hi], (hi - lo) / GLOBAL_B


def nets_and_opts(dtype, clip, bucket_elems=None, **hyp):
    def make(comm):
        net = MLP(SIZES, seed=1, dtype=dtype, backend="numpy")
        opt = fastopt.AdamW(net.params, lr=1e-2, weight_decay=0.1, max_grad_norm=clip, **hyp)
        if comm is not None:
            opt = dist.DataParallel(opt, bucket_elems=bucket_elems)
        return net, opt
    return make(None), make(COMM), make(COMM)   # one process, blocking, overlapped


def overlapped_step(net, opt, xb, yb, weight, watch=None):
    hook = opt.backward_hook(net.grads, weight=weight)
    error = None
    try:
        net.loss_and_grad(xb, yb, on_grads_ready=hook if watch is None else watch(hook))
    except Exception as exc:     # noqa: BLE001 - as fit() does
        error = exc
    return opt.step(net.grads, weight=weight, error=error)


def assert_same_sum(a, b):
    """Overlapped vs blocking: each element is one MPI_SUM over the ranks
    either way; with two ranks that is ``a + b`` whatever the algorithm, so
    the bits agree. With more, the library may add the ranks in another
    order for another message size (MPICH 5 does not, Open MPI 5 does), so
    allow a few roundings at the scale of the buffer (a cancelling sum can
    be off by far more than its own last bit)."""
    eps = {8: 2.0 ** -52, 4: 2.0 ** -23, 2: 2.0 ** -7}[a.dtype.itemsize]
    a, b = a.astype(np.float64), b.astype(np.float64)
    if N == 2:
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=16 * eps, atol=16 * eps * np.abs(b).max())


def same_on_every_rank(a):
    ref = a.copy()
    COMM.Bcast(ref, root=0)
    np.testing.assert_array_equal(a, ref)


def tol(dtype):
    # one process sums the batch inside one matmul, the ranks per slice:
    # equal to rounding, which AdamW's normalisation amplifies a little
    return dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("bucket_elems", [None, 1, 700])
def test_overlapped_equals_blocking_and_one_process(dtype, clip, bucket_elems):
    (n1, o1), (nb, ob), (no, oo) = nets_and_opts(dtype, clip, bucket_elems)
    for step in range(4):
        X, y, xb, yb, w = batch(step, dtype)
        n1.train_step(o1, X, y)
        nb.loss_and_grad(xb, yb)
        norm_b = ob.step(nb.grads, weight=w)
        norm_o = overlapped_step(no, oo, xb, yb, w)
        # the same sums in the same buffers: identical to the blocking path
        assert_same_sum(no.grads.data, nb.grads.data)
        assert_same_sum(no.params.data, nb.params.data)
        if clip is not None:
            eps = float(np.finfo(dtype).eps)
            assert norm_o == pytest.approx(norm_b, rel=0 if N == 2 else 16 * eps)
    np.testing.assert_allclose(no.params.data, n1.params.data, **tol(dtype))
    assert not np.allclose(no.params.data, MLP(SIZES, seed=1, dtype=dtype).params.data)
    same_on_every_rank(no.params.data)
    assert oo.iterations == 4


def test_default_weights_and_low_precision():
    """``weight=None`` (1/N after the sum) and 16-bit grads (reduced in a
    float32 copy) give the blocking path's result."""
    import ml_dtypes

    for dtype in (np.float64, np.dtype(ml_dtypes.bfloat16), np.float16):
        p1 = fastopt.pack([np.linspace(-1, 1, 300).reshape(20, 15).astype(dtype),
                           np.ones(15, dtype), np.zeros((15, 3), dtype), np.ones(3, dtype)])
        p2 = fastopt.pack([a.copy() for a in p1])
        o1 = dist.DataParallel(fastopt.AdamW(p1, lr=1e-2))
        o2 = dist.DataParallel(fastopt.AdamW(p2, lr=1e-2), bucket_elems=16)
        g1, g2 = p1.zeros_like(), p2.zeros_like()
        for step in range(3):
            rank_g = np.random.default_rng(10 * step + RANK).standard_normal(
                g1.data.size).astype(dtype)
            g1.data[:] = rank_g
            o1.step(g1)
            hook = o2.backward_hook(g2)
            offs = o2._inner._elem_offsets
            for k in range(len(offs) - 2, -1, -1):     # array by array, last first
                g2.data[offs[k]:offs[k + 1]] = rank_g[offs[k]:offs[k + 1]]
                hook(offs[k], offs[k + 1])
            o2.step(g2)
            assert_same_sum(g2.data, g1.data)
        assert_same_sum(p2.data, p1.data)


def test_buckets_go_out_during_the_backward_pass():
    """With small buckets, the last layers' reductions are posted (and may be
    done) before the backward pass reaches the first layer."""
    _, _, (net, opt) = nets_and_opts(np.float64, None, bucket_elems=1)
    X, y, xb, yb, w = batch(0, np.float64)
    seen = []

    def watch(hook):
        def wrapped(lo, hi):
            seen.append((lo, hi, opt._round.posted))
            hook(lo, hi)
        return wrapped

    overlapped_step(net, opt, xb, yb, w, watch)
    # ranges arrive last layer first; when layer 0 is reported, the layers
    # above are already in flight
    assert [s[:2] for s in seen] == sorted([s[:2] for s in seen], reverse=True)
    assert len(seen) == len(SIZES) - 1
    assert seen[0][2] == 0 and seen[-1][2] == 2 * (len(SIZES) - 2)   # W and b per layer
    buckets = opt._buckets()
    assert len(buckets) == 2 * (len(SIZES) - 1)
    assert OVERLAP_BUCKET_ELEMS > net.params.data.size    # default: one bucket here
    assert len(dist.DataParallel(fastopt.SGD(net.params), broadcast=False)._buckets()) == 1


@pytest.mark.parametrize("bucket_elems", [None, 1])
@pytest.mark.parametrize("failing", [0, -1])
def test_failure_mid_backward_raises_everywhere(bucket_elems, failing):
    """One rank's backward pass fails after its first layer was reported
    (some buckets posted), the others post them all: no hang, every rank
    raises DistributedError naming it, nobody steps, and the next step works."""
    failing = failing % N
    _, (nb, ob), (no, oo) = nets_and_opts(np.float64, 1.0, bucket_elems)
    X, y, xb, yb, w = batch(0, np.float64)
    before = no.params.data.copy()

    def watch(hook):
        def wrapped(lo, hi):
            hook(lo, hi)
            if RANK == failing:
                raise RuntimeError("backward died")
        return wrapped

    with pytest.raises(dist.DistributedError,
                       match=f"failed on 1 of {N} ranks \\(rank {failing}: RuntimeError: "
                             "backward died\\)"):
        overlapped_step(no, oo, xb, yb, w, watch)
    np.testing.assert_array_equal(no.params.data, before)
    assert oo.iterations == 0 and oo._round is None
    # still in step with the others: the next steps equal the blocking path
    for step in range(1, 3):
        X, y, xb, yb, w = batch(step, np.float64)
        nb.loss_and_grad(xb, yb)
        ob.step(nb.grads, weight=w)
        overlapped_step(no, oo, xb, yb, w)
    assert_same_sum(no.params.data, nb.params.data)
    assert oo.iterations == 2


def test_failure_before_backward_bad_input():
    """Bad input on the last rank: its backward never reports anything."""
    _, _, (net, opt) = nets_and_opts(np.float32, None, bucket_elems=1)
    X, y, xb, yb, w = batch(0, np.float32)
    if RANK == N - 1:
        xb = xb.copy()
        xb[0, 0] = np.nan
    before = net.params.data.copy()
    with pytest.raises(dist.DistributedError, match=f"rank {N - 1}: ValueError: X contains"):
        overlapped_step(net, opt, xb, yb, w)
    np.testing.assert_array_equal(net.params.data, before)


@pytest.mark.parametrize("what", ["grads", "weight", "step-weight", "step-grads", "twice"])
def test_bad_arguments_on_one_rank(what):
    """Problems found by backward_hook, the hook or step on rank 0 only are
    shared like any error, after every bucket has been reduced."""
    _, _, (net, opt) = nets_and_opts(np.float64, None, bucket_elems=1)
    X, y, xb, yb, w = batch(0, np.float64)
    bad = RANK == 0
    grads = net.grads
    hook_grads = fastopt.flat_zeros([(3,)], np.float64) if bad and what == "grads" else grads
    hook_w = -1.0 if bad and what == "weight" else w
    step_w = w / 2 if bad and what == "step-weight" else w
    step_grads = net.grads.zeros_like() if bad and what == "step-grads" else grads
    hook = opt.backward_hook(hook_grads, weight=hook_w)
    error = None
    try:
        net.loss_and_grad(xb, yb, on_grads_ready=hook)
        if bad and what == "twice":
            hook(0, 5)
    except Exception as exc:    # noqa: BLE001
        error = exc
    with pytest.raises(dist.DistributedError, match="rank 0: (ValueError|TypeError)"):
        opt.step(step_grads, weight=step_w, error=error)
    assert opt.iterations == 0
    with pytest.raises(RuntimeError, match="already finished"):
        hook(0, 1)
    overlapped_step(net, opt, xb, yb, w)      # usable again, on every rank
    assert opt.iterations == 1
    same_on_every_rank(net.params.data)


def test_a_second_hook_before_step_is_refused():
    _, _, (net, opt) = nets_and_opts(np.float64, None)
    opt.backward_hook(net.grads)
    with pytest.raises(RuntimeError, match="in progress"):
        opt.backward_hook(net.grads)
    opt.step(net.grads)      # finishes the first (all zeros: reported by nobody, posted here)
    assert opt.iterations == 1


def test_nonfinite_on_one_rank_skips_everywhere():
    _, _, (net, opt) = nets_and_opts(np.float32, None, bucket_elems=1, skip_nonfinite=True)
    X, y, xb, yb, w = batch(0, np.float32)
    before = net.params.data.copy()

    def watch(hook):
        def wrapped(lo, hi):
            if RANK == N - 1 and lo == 0:
                net.grads.data[lo] = np.inf      # the first layer, the last bucket
            hook(lo, hi)
        return wrapped

    overlapped_step(net, opt, xb, yb, w, watch)
    assert opt.skipped_steps == 1
    np.testing.assert_array_equal(net.params.data, before)
    overlapped_step(net, opt, xb, yb, w)
    assert opt.skipped_steps == 1 and opt.iterations == 2
    assert not np.array_equal(net.params.data, before)


def _fit_runs(X, y, batch_size, configs, **kw):
    out = []
    for comm, shard, overlap in configs:
        net = MLP((X.shape[1], 16, 4), seed=1, dtype="float64", backend="numpy")
        par = (None if comm is None else
               DataParallelTraining(comm, shard_state=shard, overlap=overlap))
        opt = make_optimizer(net, "adamw", 1e-2, max_grad_norm=1.0, parallel=par)
        hist = fit(net, opt, X, y, epochs=2, batch_size=batch_size, seed=3, parallel=par,
                   **kw)
        out.append((net.params.data.copy(), hist))
    return out


CONFIGS = [(None, False, True), (COMM, False, False), (COMM, False, True), (COMM, True, True)]


def test_fit_overlapped_matches_one_process_with_a_rank_without_samples():
    """2 x 16 + 1 samples, batch 16: the last batch has one sample, so every
    rank but the last computes nothing for it (grads zeroed, no hook call)
    and must still post every bucket."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((33, 7))
    y = rng.integers(0, 4, 33)
    (p1, h1), (pb, hb), (po, ho), (ps, hs) = _fit_runs(X, y, 16, CONFIGS)
    assert_same_sum(po, pb)                          # overlapped == blocking
    np.testing.assert_allclose(po, p1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ps, p1, rtol=1e-10, atol=1e-12)
    for a, b in zip(ho["epochs"], h1["epochs"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-10)
    same_on_every_rank(po)


def test_fit_bad_input_on_one_rank_raises_everywhere():
    X = np.ones((40, 6))
    if RANK == N - 1:
        X[:] = np.nan
    y = np.zeros(40, dtype=np.int64)
    net = MLP((6, 8, 3), seed=1, dtype="float64", backend="numpy")
    par = DataParallelTraining(COMM, overlap=True)
    opt = make_optimizer(net, "adamw", 1e-2, parallel=par)
    opt.bucket_elems = 1
    before = net.params.data.copy()
    with pytest.raises(dist.DistributedError, match=f"rank {N - 1}: ValueError"):
        fit(net, opt, X, y, epochs=1, batch_size=8, parallel=par)
    np.testing.assert_array_equal(net.params.data, before)
    assert opt._round is None


@pytest.mark.parametrize("order", ["model", "layer"])
def test_ensemble_ranges_out_of_buffer_order(order):
    """An ensemble reports layer l of every model before layer l-1 of any
    ("layer" order), so ranges arrive out of buffer order: buckets still go
    out in their fixed order, and the result equals the blocking path."""
    from fastopt.nn import Ensemble

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 7))
    y = rng.integers(0, 4, 40)
    params = []
    for overlap in (False, True):
        ens = Ensemble(3, (7, 16, 4), seed=1, dtype="float64", backend="numpy")
        ens.order = order
        par = DataParallelTraining(COMM, overlap=overlap)
        opt = make_optimizer(ens, "adamw", 1e-2, lrs=[1e-2, 3e-3, 1e-3], parallel=par)
        opt.bucket_elems = 1
        fit(ens, opt, X, y, epochs=1, batch_size=16, seed=3, parallel=par)
        params.append(ens.params.data.copy())
    assert_same_sum(params[1], params[0])
