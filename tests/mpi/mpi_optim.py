"""Distributed optimizer tests, run on every rank under ``mpiexec -n K``.

Not collected by the normal run (no ``test_`` prefix): tests/test_distributed.py
launches ``mpiexec -n 2`` and ``-n 3 python -m pytest tests/mpi/mpi_optim.py``.
Every rank runs the same tests in the same order, so collectives match;
the launcher's timeout turns a hang into a failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest

import fastopt
from fastopt import distributed as dist

MPI = pytest.importorskip("mpi4py.MPI")
COMM = MPI.COMM_WORLD
RANK, N = COMM.Get_rank(), COMM.Get_size()
SHAPES = [(37, 5), (11,), (64, 3), (1,), (29,)]   # 418 elements: shards split tensors


def make_params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return fastopt.pack([rng.standard_normal(s).astype(dtype) for s in SHAPES])


def rank_grads(step, r, dtype, scale=1.0):
    """What rank r's backward pass produced at ``step`` (reproducible anywhere)."""
    rng = np.random.default_rng(1000 * step + r)
    return [(scale * rng.standard_normal(s)).astype(dtype) for s in SHAPES]


def load_rank_grads(g, step, dtype):
    """Write this rank's ``rank_grads(step)`` into the packed grads ``g``."""
    for view, a in zip(g, rank_grads(step, RANK, dtype)):
        view[...] = a


def mean_grads(step, dtype, weights=None):
    """The global gradient a single process would see: the ranks' sum in rank
    order, then the 1/N average (or the ranks' own weights first)."""
    parts = [rank_grads(step, r, dtype) for r in range(N)]
    out = []
    for k in range(len(SHAPES)):
        if weights is None:
            acc = parts[0][k].copy()
            for r in range(1, N):
                acc += parts[r][k]
            acc *= dtype(1.0 / N)
        else:
            acc = parts[0][k] * dtype(weights[0])
            for r in range(1, N):
                acc += parts[r][k] * dtype(weights[r])
        out.append(acc)
    return out


def tol(dtype):
    return dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)


OPTIMIZERS = {
    "adamw": (fastopt.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "sgd-nesterov": (fastopt.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
}


def wrapped(mode, cls, params, **hyp):
    """``cls`` over ``params`` replicated (``"dp"``) or sharded (``"shard"``)."""
    if mode == "dp":
        return dist.DataParallel(cls(params, **hyp))
    return dist.ShardedOptimizer(cls, params, **hyp)


def run_both(mode, name, dtype, clip, steps=4, weights=None, groups=None):
    cls, hyp = OPTIMIZERS[name]
    hyp = dict(hyp, max_grad_norm=clip)
    ref_p = make_params(dtype)
    ref = cls(groups(ref_p) if groups else ref_p, **hyp)
    # the reference takes its grads as a list in param-group order
    order = [next(k for k, v in enumerate(ref_p) if v is a)
             for g in ref.param_groups for a in g["params"]]
    p = make_params(dtype)
    if mode == "dp":
        opt = dist.DataParallel(cls(groups(p) if groups else p, **hyp))
    else:
        opt = dist.ShardedOptimizer(cls, groups(p) if groups else p, **hyp)
    g = p.zeros_like()
    for step in range(steps):
        load_rank_grads(g, step, dtype)
        norm = opt.step(g, weight=None if weights is None else weights[RANK])
        mg = mean_grads(step, dtype, weights)
        ref_norm = ref.step([mg[k] for k in order])
        if clip is not None:
            assert norm == pytest.approx(ref_norm, rel=1e-6)
    return ref_p, p, opt


@pytest.mark.parametrize("mode", ["dp", "shard"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_matches_single_process(mode, name, dtype, clip):
    ref_p, p, opt = run_both(mode, name, dtype, clip)
    for a, b in zip(p, ref_p):
        np.testing.assert_allclose(a, b, **tol(dtype))
    # every rank holds the same parameters
    data = p.data.copy()
    COMM.Bcast(data, root=0)
    np.testing.assert_array_equal(data, p.data)


@pytest.mark.parametrize("backend", [b for b in fastopt.available_backends() if b != "cuda"])
def test_every_cpu_backend(backend):
    OPTIMIZERS["adamw-" + backend] = (fastopt.AdamW, dict(lr=1e-2, backend=backend))
    for mode in ("dp", "shard"):
        ref_p, p, opt = run_both(mode, "adamw-" + backend, np.float32, 0.5, steps=2)
        assert opt.backend == backend
        np.testing.assert_allclose(p.data, ref_p.data, **tol(np.float32))


@pytest.mark.parametrize("mode", ["dp", "shard"])
def test_uneven_weights_and_groups(mode):
    weights = [(r + 1) / (N * (N + 1) / 2) for r in range(N)]   # sums to 1

    def groups(p):
        if mode == "dp":   # a replicated optimizer takes FlatArrays grads in memory order
            return [{"params": [p[0], p[1]], "weight_decay": 0.0}, {"params": list(p[2:])}]
        # sharded: biases in their own group, listed before the weights
        return [{"params": [p[1], p[3], p[4]], "weight_decay": 0.0},
                {"params": [p[0], p[2]]}]

    ref_p, p, _ = run_both(mode, "adamw", np.float64, 0.5, weights=weights, groups=groups)
    for a, b in zip(p, ref_p):
        np.testing.assert_allclose(a, b, **tol(np.float64))


def test_bucketed_allreduce_equals_one():
    p1, p2 = make_params(np.float32), make_params(np.float32)
    o1 = dist.DataParallel(fastopt.AdamW(p1, lr=1e-2))
    o2 = dist.DataParallel(fastopt.AdamW(p2, lr=1e-2), bucket_elems=50)
    g1, g2 = p1.zeros_like(), p2.zeros_like()
    for step in range(3):
        for v1, v2, a in zip(g1, g2, rank_grads(step, RANK, np.float32)):
            v1[...] = a
            v2[...] = a
        o1.step(g1)
        o2.step(g2)
    np.testing.assert_array_equal(p1.data, p2.data)


def test_sharded_state_is_one_nth():
    p = make_params(np.float32)
    opt = dist.ShardedOptimizer(fastopt.AdamW, p, lr=1e-3)
    g = p.zeros_like()
    opt.step(g)
    lo, hi = opt.shard
    assert opt.state_nbytes() == 2 * 4 * (hi - lo)      # exp_avg + exp_avg_sq, shard only
    sizes = COMM.allgather(hi - lo)
    assert sum(sizes) == p.data.size and max(sizes) - min(sizes) <= 33   # starts rounded to 16 elements


@pytest.mark.parametrize("mode", ["dp", "shard"])
def test_nonfinite_on_one_rank_skips_everywhere(mode):
    p = make_params(np.float32)
    before = p.data.copy()
    opt = (dist.DataParallel(fastopt.AdamW(p, lr=1e-2, skip_nonfinite=True)) if mode == "dp"
           else dist.ShardedOptimizer(fastopt.AdamW, p, lr=1e-2, skip_nonfinite=True))
    g = p.zeros_like()
    g.data[:] = 0.1
    if RANK == N - 1:
        g.data[3] = np.nan        # an element that rank 0 owns when sharded
    opt.step(g)
    assert opt.skipped_steps == 1 and opt.iterations == 1
    np.testing.assert_array_equal(p.data, before)
    g.data[:] = 0.1
    if RANK == 0:
        g.data[-1] = np.inf       # owned by the last rank
    opt.step(g)
    assert opt.skipped_steps == 2
    np.testing.assert_array_equal(p.data, before)
    g.data[:] = 0.1
    opt.step(g)
    assert opt.skipped_steps == 2
    assert not np.array_equal(p.data, before)


@pytest.mark.parametrize("mode", ["dp", "shard"])
def test_error_on_one_rank_raises_everywhere(mode):
    p = make_params(np.float32)
    opt = wrapped(mode, fastopt.AdamW, p, lr=1e-2)
    before = p.data.copy()
    good = p.zeros_like()
    bad = fastopt.flat_zeros([(3,)], np.float32) if RANK == N - 1 else good
    with pytest.raises(dist.DistributedError, match=f"rank {N - 1}: .*Error"):
        opt.step(bad)
    with pytest.raises(dist.DistributedError, match="rank 0: ValueError: bad input"):
        opt.step(good, error=ValueError("bad input") if RANK == 0 else None)
    np.testing.assert_array_equal(p.data, before)
    assert opt.iterations == 0
    opt.step(good)                # still usable afterwards
    assert opt.iterations == 1


@pytest.mark.parametrize("mode", ["dp", "shard"])
def test_layout_mismatch_detected_at_setup(mode):
    shapes = [(10, 3), (7 + (RANK == N - 1),)]
    p = fastopt.flat_zeros(shapes, np.float32)
    with pytest.raises(dist.DistributedError, match="layouts differ"):
        if mode == "dp":
            dist.DataParallel(fastopt.AdamW(p))
        else:
            dist.ShardedOptimizer(fastopt.AdamW, p)


def test_setup_error_on_one_rank():
    p = make_params(np.float32)
    with pytest.raises(dist.DistributedError, match=f"rank {N - 1}: ValueError"):
        dist.ShardedOptimizer(fastopt.AdamW, p, lr=-1.0 if RANK == N - 1 else 1e-3)


@pytest.fixture
def shared_dir():
    """A directory every rank sees, removed once all ranks are done with it."""
    path = COMM.bcast(tempfile.mkdtemp(prefix="fastopt-mpi-") if RANK == 0 else None, root=0)
    yield path
    COMM.Barrier()
    if RANK == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_sharded_checkpoint_loads_in_one_process_and_back(clip, shared_dir):
    d = shared_dir
    sched = fastopt.schedules.warmup_cosine(1e-2, 2, 10)
    p = make_params(np.float32)
    opt = dist.ShardedOptimizer(fastopt.AdamW, p, lr=sched, max_grad_norm=clip)
    g = p.zeros_like()
    for step in range(3):
        load_rank_grads(g, step, np.float32)
        opt.step(g)
    path = os.path.join(d, "sharded.npz")
    fastopt.save(path, params=p, optimizer=opt, extra={"step": 3})
    # a single process (each rank on its own, no communication) resumes it
    q = make_params(np.float32, seed=9)
    single = fastopt.AdamW(q, lr=sched, max_grad_norm=clip)
    fastopt.load(path, params=q, optimizer=single)
    np.testing.assert_array_equal(q.data, p.data)
    sd_sharded = opt.state_dict()
    sd_single = single.state_dict()
    for k in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(sd_sharded["state"][0]["buffers"][k],
                                      sd_single["state"][0]["buffers"][k])
    # both go on with the same global gradients
    for step in range(3, 5):
        load_rank_grads(g, step, np.float32)
        opt.step(g)
        single.step(mean_grads(step, np.float32))
    np.testing.assert_allclose(p.data, q.data, **tol(np.float32))
    # and a single-process checkpoint loads into a sharded optimizer
    path2 = os.path.join(d, "single.npz")
    if RANK == 0:
        fastopt.save(path2, params=q, optimizer=single)
    COMM.Barrier()
    r = make_params(np.float32, seed=5)
    opt2 = dist.ShardedOptimizer(fastopt.AdamW, r, lr=sched, max_grad_norm=clip)
    fastopt.load(path2, params=r, optimizer=opt2)
    assert opt2.iterations == 5
    np.testing.assert_array_equal(r.data, q.data)
    sd2 = opt2.state_dict()
    for k in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(sd2["state"][0]["buffers"][k],
                                      single.state_dict()["state"][0]["buffers"][k])


def test_mismatched_checkpoint_changes_nothing(shared_dir):
    d = shared_dir
    p = make_params(np.float32)
    opt = dist.ShardedOptimizer(fastopt.AdamW, p, lr=1e-2)
    path = os.path.join(d, "other.npz")
    if RANK == 0:
        other = fastopt.flat_zeros([(5,)], np.float32)
        fastopt.save(path, params=other, optimizer=fastopt.AdamW(other))
    COMM.Barrier()
    with pytest.raises(fastopt.CheckpointError):
        fastopt.load(path, optimizer=opt)
    assert opt.iterations == 0


def test_fit_matches_single_process():
    from fastopt.nn import MLP
    from fastopt.distributed.training import DataParallelTraining
    from fastopt.nn.training import fit, make_optimizer

    rng = np.random.default_rng(0)
    X = rng.standard_normal((203, 12))
    y = rng.integers(0, 4, 203)
    results = []
    for comm, shard in ((None, False), (COMM, False), (COMM, True)):
        net = MLP((12, 16, 4), seed=1, dtype="float64", backend="numpy")
        par = None if comm is None else DataParallelTraining(comm, shard_state=shard)
        opt = make_optimizer(net, "adamw", 1e-2, max_grad_norm=1.0, parallel=par)
        hist = fit(net, opt, X, y, epochs=2, batch_size=32, seed=3, X_val=X[:50],
                   y_val=y[:50], parallel=par)
        results.append((net.params.data.copy(), hist))
    for params, hist in results[1:]:
        np.testing.assert_allclose(params, results[0][0], rtol=1e-10, atol=1e-12)
        for a, b in zip(hist["epochs"], results[0][1]["epochs"]):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-10)
            assert a["val_acc"] == pytest.approx(b["val_acc"], rel=1e-12)


def test_fit_bad_input_on_one_rank_raises_everywhere():
    from fastopt.nn import MLP
    from fastopt.distributed.training import DataParallelTraining
    from fastopt.nn.training import fit, make_optimizer

    X = np.ones((40, 6))
    if RANK == N - 1:
        X[:] = np.nan             # only this rank's data is bad
    y = np.zeros(40, dtype=np.int64)
    net = MLP((6, 8, 3), seed=1, dtype="float64", backend="numpy")
    par = DataParallelTraining(COMM, shard_state=True)
    opt = make_optimizer(net, "adamw", 1e-2, parallel=par)
    before = net.params.data.copy()
    with pytest.raises(dist.DistributedError, match=f"rank {N - 1}: ValueError"):
        fit(net, opt, X, y, epochs=1, batch_size=8, parallel=par)
    np.testing.assert_array_equal(net.params.data, before)


def test_replicated_checkpoint_resumes_sharded(shared_dir):
    d = shared_dir
    p = make_params(np.float64)
    dp = dist.DataParallel(fastopt.SGD(p, lr=1e-2, momentum=0.9))
    g = p.zeros_like()
    for step in range(2):
        load_rank_grads(g, step, np.float64)
        dp.step(g)
    path = os.path.join(d, "replicated.npz")
    fastopt.save(path, params=p, optimizer=dp)
    q = make_params(np.float64, seed=4)
    zero = dist.ShardedOptimizer(fastopt.SGD, q, lr=1e-2, momentum=0.9)
    fastopt.load(path, params=q, optimizer=zero)
    gq = q.zeros_like()
    for step in range(2, 4):
        for view, view_q, a in zip(g, gq, rank_grads(step, RANK, np.float64)):
            view[...] = a
            view_q[...] = a
        dp.step(g)
        zero.step(gq)
    np.testing.assert_allclose(q.data, p.data, **tol(np.float64))
    assert zero.iterations == dp.iterations == 4


@pytest.mark.parametrize("mode", ["dp", "shard"])
@pytest.mark.parametrize("low", ["float16", "bfloat16"])
def test_mixed_precision_matches_single_process(mode, low, shared_dir):
    import ml_dtypes

    dtype = np.dtype(ml_dtypes.bfloat16 if low == "bfloat16" else np.float16)
    # each rank starts from its own values: the broadcast makes them rank
    # 0's, master copies included (they were each rank's own, and the first
    # step brought them back)
    ref_p, p = make_params(dtype), make_params(dtype, seed=RANK)
    ref = fastopt.AdamW(ref_p, lr=1e-2, max_grad_norm=0.5)
    opt = (dist.DataParallel(fastopt.AdamW(p, lr=1e-2, max_grad_norm=0.5)) if mode == "dp"
           else dist.ShardedOptimizer(fastopt.AdamW, p, lr=1e-2, max_grad_norm=0.5))
    g = p.zeros_like()
    for step in range(3):
        load_rank_grads(g, step, dtype)
        opt.step(g)
        # one process: the float32 mean of the ranks' 16-bit grads, rounded
        parts = [[a.astype(np.float32) for a in rank_grads(step, r, dtype)] for r in range(N)]
        mean = []
        for k in range(len(SHAPES)):
            acc = parts[0][k].copy()
            for r in range(1, N):
                acc += parts[r][k]
            mean.append((acc * np.float32(1.0 / N)).astype(dtype))
        ref.step(mean)
    ref_master = ref.state_dict()["state"][0]["buffers"]["master"]
    master = opt.state_dict()["state"][0]["buffers"]["master"]
    np.testing.assert_allclose(master, ref_master, rtol=2e-5, atol=2e-6)
    if mode == "dp":
        assert opt.state_nbytes() == ref.state_nbytes()    # moments, not master copies
    same = np.mean(p.data.astype(np.float32) == ref_p.data.astype(np.float32))
    assert same > 0.99     # the 16-bit params are the rounded masters
    # a sharded checkpoint (with its master copy) loads in one process
    d = shared_dir
    path = os.path.join(d, "lowp.npz")
    fastopt.save(path, params=p, optimizer=opt)
    q = make_params(dtype, seed=3)
    single = fastopt.AdamW(q, lr=1e-2, max_grad_norm=0.5)
    fastopt.load(path, params=q, optimizer=single)
    np.testing.assert_array_equal(single.state_dict()["state"][0]["buffers"]["master"], master)


@pytest.mark.parametrize("mode", ["dp", "shard"])
def test_scheduled_lr_shows_the_number_and_keeps_the_schedule(mode):
    """As an unsharded optimizer's: ``param_groups[0]["lr"]`` is the lr the
    next step uses, ``lr_schedule()`` the schedule, a number written over
    it replaces the schedule, and the steps equal one process's."""
    sched = fastopt.schedules.step_decay(1e-2, milestones=[2], gamma=0.1)
    ref_p, p = make_params(np.float64), make_params(np.float64)
    ref = fastopt.AdamW(ref_p, lr=sched)
    opt = (dist.DataParallel(fastopt.AdamW(p, lr=sched)) if mode == "dp"
           else dist.ShardedOptimizer(fastopt.AdamW, p, lr=sched))
    assert opt.lr_schedule(0) is sched
    g = p.zeros_like()
    for step in range(4):
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == sched(step)
        if step == 3:     # the user's number replaces the schedule
            opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 5e-3
        load_rank_grads(g, step, np.float64)
        opt.step(g)
        ref.step(mean_grads(step, np.float64))
    assert opt.lr_schedule(0) is None and opt.param_groups[0]["lr"] == 5e-3
    np.testing.assert_allclose(p.data, ref_p.data, **tol(np.float64))


@pytest.mark.parametrize("mode", ["dp", "shard"])
def test_zero_grad_and_what_a_wrapper_refuses(mode):
    p = make_params(np.float32)
    opt = (dist.DataParallel(fastopt.SGD(p, lr=1e-2)) if mode == "dp"
           else dist.ShardedOptimizer(fastopt.SGD, p, lr=1e-2))
    g = p.zeros_like()
    g.data[...] = 1.0
    opt.zero_grad(g)
    assert not g.data.any()
    with pytest.raises(ValueError):      # not shaped like the params: untouched
        bad = fastopt.flat_zeros([(3,)])
        bad.data[...] = 1.0
        opt.zero_grad(bad)
    assert bad.data.all()
    extra = np.zeros(4, np.float32)
    with pytest.raises(NotImplementedError, match="every group from the start"):
        opt.add_param_group({"params": [extra]})
    with pytest.raises(NotImplementedError, match="cannot bind"):
        opt.bind([extra])


def test_sharded_takes_params_by_name():
    """A dict of a packed buffer's views, as ``model.params`` often is: the
    dict's order, and the same steps as a single-process optimizer."""
    p = make_params(np.float64)
    # not in the buffer's order: the dict's order is the params' order
    named = {"out": p[4], "layer1": {"b": p[3], "W": p[2]}, "layer0": {"W": p[0], "b": p[1]}}
    opt = dist.ShardedOptimizer(fastopt.AdamW, named, lr=1e-2)
    ref_p = make_params(np.float64)
    ref = fastopt.AdamW(list(ref_p), lr=1e-2)
    g = p.zeros_like()
    for step in range(3):
        load_rank_grads(g, step, np.float64)
        opt.step(g)
        ref.step(mean_grads(step, np.float64))
    np.testing.assert_allclose(p.data, ref_p.data, **tol(np.float64))


@pytest.mark.parametrize("mode", ["dp", "shard"])
@pytest.mark.parametrize("edit", ["lr", "betas", "max_grad_norm", "skip_nonfinite",
                                  "loss_scaler"])
def test_a_setting_edited_on_one_rank_raises_everywhere(mode, edit):
    """Sharded clipping on one rank only waited forever in the norm's
    Allreduce; an lr edited on one rank stepped the replicas apart. Now
    every rank raises naming the setting, nothing steps, and the same edit
    on every rank goes on."""
    p = make_params(np.float32)
    opt = wrapped(mode, fastopt.AdamW, p, lr=1e-2)
    g = p.zeros_like()
    load_rank_grads(g, 0, np.float32)
    opt.step(g)
    opt.param_groups[0]["betas"] = [0.9, 0.999]     # a list: edited in place below
    load_rank_grads(g, 0, np.float32)
    opt.step(g)
    value = {"lr": 3e-3, "max_grad_norm": 0.1, "skip_nonfinite": True,
             "loss_scaler": fastopt.LossScaler(), "betas": 0.5}[edit]

    def apply():
        if edit == "lr":
            opt.param_groups[0]["lr"] = value
        elif edit == "betas":       # in place: the settings' snapshot must see it
            opt.param_groups[0]["betas"][0] = value
        else:
            setattr(opt, edit, value)
    if RANK == N - 1:
        apply()
    before = p.data.copy()
    load_rank_grads(g, 1, np.float32)
    with pytest.raises(dist.DistributedError, match=rf"{edit}.* on rank {N - 1} but .* on "
                                                    r"rank 0; every rank must have the same"):
        opt.step(g)
    np.testing.assert_array_equal(p.data, before)
    assert opt.iterations == 2
    if RANK != N - 1:
        apply()
    opt.step(g)
    assert opt.iterations == 3


@pytest.mark.parametrize("mode", ["dp", "shard"])
def test_equal_settings_written_differently_agree(mode):
    """np.False_ and False, or a key put back in another order, are the same
    settings: no rank raises."""
    p = make_params(np.float32)
    opt = wrapped(mode, fastopt.AdamW, p, lr=1e-2)
    g = p.zeros_like()
    load_rank_grads(g, 0, np.float32)
    opt.step(g)
    if RANK == N - 1:
        group = opt.param_groups[0]
        group["amsgrad"] = np.False_
        group["eps"] = group.pop("eps")          # the same value, last in the dict
        group["lr"] = np.float64(group["lr"])
    opt.step(g)
    assert opt.iterations == 2


@pytest.mark.parametrize("mode", ["dp", "shard"])
def test_a_save_refused_on_one_rank_raises_everywhere(mode, shared_dir):
    """A bad ``extra`` on one rank raised there before the state_dict's
    collective, and the others waited in it forever."""
    d = shared_dir
    p = make_params(np.float32)
    opt = wrapped(mode, fastopt.AdamW, p, lr=1e-2)
    path = os.path.join(d, f"bad-extra-{mode}.npz")
    extra = {"bad": np.array([object()])} if RANK == N - 1 else {}
    with pytest.raises(dist.DistributedError, match=rf"rank {N - 1}: TypeError: cannot store "
                                                    r"an array of Python objects"):
        fastopt.save(path, params=p, optimizer=opt, extra=extra)
    assert not os.path.exists(path)
    fastopt.save(path, params=p, optimizer=opt, extra={"ok": 1})     # all well again
    assert fastopt.load(path)["extra"] == {"ok": 1}


def test_sharded_last_lr_lists_every_group():
    p = make_params(np.float64)
    groups = [{"params": [p[1], p[3]], "lr": 0.1},
              {"params": [p[0], p[2], p[4]], "lr": fastopt.schedules.step_decay(0.5, 0.1, milestones=[1])}]
    opt = dist.ShardedOptimizer(fastopt.SGD, groups)
    g = p.zeros_like()
    for step, want in enumerate(([0.1, 0.5], [0.1, 0.05])):
        load_rank_grads(g, step, np.float64)
        opt.step(g)
        assert opt.last_lr == pytest.approx(want)


def test_sharded_checkpoints_by_name_load_by_name(shared_dir):
    """Params by name in another order: the moments follow the names both
    ways (sharded to one process, one process to sharded); they loaded by
    position, so two arrays of one shape swapped their moments silently."""
    d = shared_dir
    names = ["W1", "b1", "W2", "b2", "W3"]

    def named(p, order):
        return {names[k]: p[k] for k in order}
    SHAPES2 = [(37, 5), (11,), (64, 3), (11,), (64, 3)]   # b1/b2, W2/W3: one shape each
    ORDER = [0, 3, 4, 1, 2]   # b1 and b2, W2 and W3 trade places: by position, silently
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s) for s in SHAPES2]

    def grads_at(step):
        return [np.random.default_rng(50 + step).standard_normal(s) for s in SHAPES2]
    # one process, dict in one order; a sharded optimizer, the other order
    single_p = [a.copy() for a in init]
    single = fastopt.AdamW(named(single_p, range(5)), lr=1e-2)
    p = fastopt.pack([a.copy() for a in init])
    sharded = dist.ShardedOptimizer(fastopt.AdamW, named(p, ORDER), lr=1e-2)
    g = p.zeros_like()
    for step in range(2):
        single.step(dict(zip(names, grads_at(step))))
        for view, a in zip(g, grads_at(step)):
            view[...] = a
        sharded.step(g)
    path = os.path.join(d, "named-single.npz")
    if RANK == 0:
        fastopt.save(path, params=named(single_p, range(5)), optimizer=single)
    COMM.Barrier()
    q = fastopt.pack([a.copy() for a in init])
    resumed = dist.ShardedOptimizer(fastopt.AdamW, named(q, ORDER), lr=1e-2)
    fastopt.load(path, params=named(q, ORDER), optimizer=resumed)
    # and the sharded one's checkpoint into one process in the first order
    path2 = os.path.join(d, "named-sharded.npz")
    fastopt.save(path2, params=named(p, ORDER), optimizer=sharded)
    back_p = [np.zeros(s) for s in SHAPES2]
    back = fastopt.AdamW(named(back_p, range(5)), lr=1e-2)
    fastopt.load(path2, params=named(back_p, range(5)), optimizer=back)
    for step in range(2, 4):
        gs = grads_at(step)
        single.step(dict(zip(names, gs)))
        back.step(dict(zip(names, gs)))
        for view, a in zip(g, gs):
            view[...] = a
        resumed.step(g)
    for k in range(5):
        np.testing.assert_allclose(q[k], single_p[k], **tol(np.float64))
        np.testing.assert_allclose(back_p[k], single_p[k], **tol(np.float64))


# -- a trial's findings: what one rank does alone ------------------------------

@pytest.mark.parametrize("mode", ["dp", "shard"])
def test_a_weight_given_on_some_ranks_only_raises_everywhere(mode):
    """One rank passing its share while another took the default 1/N summed
    the gradients with weights that do not add up: replicas apart."""
    p = make_params(np.float32)
    opt = wrapped(mode, fastopt.SGD, p, lr=0.1)
    g = p.zeros_like()
    load_rank_grads(g, 0, np.float32)
    before = p.data.copy()
    with pytest.raises(dist.DistributedError, match=r"weight is .*given.* on rank|weight is "
                                                    r"None on rank"):
        opt.step(g, weight=0.3 if RANK == 0 else None)
    np.testing.assert_array_equal(p.data, before)
    load_rank_grads(g, 0, np.float32)
    opt.step(g, weight=1.0 / N)                    # given everywhere: fine
    assert not np.array_equal(p.data, before)


@pytest.mark.parametrize("option", ["state_seed", "state_dtype"])
def test_a_state_option_set_on_one_rank_raises_everywhere(option):
    p = make_params(np.float32)
    value = ({"state_seed": 1234 + RANK, "state_dtype": "bfloat16"} if option == "state_seed"
             else {"state_dtype": "bfloat16" if RANK else "float32"})
    opt = dist.DataParallel(fastopt.AdamW(p, lr=1e-2, **value))
    g = p.zeros_like()
    load_rank_grads(g, 0, np.float32)
    with pytest.raises(dist.DistributedError, match=rf"{option} is .* on rank 1 but .* on rank 0"):
        opt.step(g)


def test_a_seed_per_rank_is_fine_with_float32_state():
    """float32 state draws no rounding bits: a seed per rank changes nothing."""
    p = make_params(np.float32)
    opt = dist.DataParallel(fastopt.AdamW(p, lr=1e-2, state_seed=RANK))
    g = p.zeros_like()
    load_rank_grads(g, 0, np.float32)
    opt.step(g)
    assert opt.iterations == 1


@pytest.mark.parametrize("mode", ["dp", "shard"])
def test_a_rank_with_no_samples_and_weight_0_adds_nothing(mode):
    """Its mean gradient over no samples is 0/0 = NaN, and NaN * 0 is NaN:
    every rank's params went NaN. A weight of 0 sends zeros."""
    p = make_params(np.float32)
    opt = wrapped(mode, fastopt.SGD, p, lr=0.1)
    g = p.zeros_like()
    load_rank_grads(g, 0, np.float32)
    if RANK == N - 1:
        g.data[:] = np.nan
    weights = [1.0 / (N - 1)] * (N - 1) + [0.0]
    opt.step(g, weight=weights[RANK])
    assert np.isfinite(p.data).all()
    expect = make_params(np.float32)
    parts = [rank_grads(0, r, np.float32) for r in range(N - 1)]
    for k, view in enumerate(expect):
        view -= np.float32(0.1) * sum(pr[k] * np.float32(1.0 / (N - 1)) for pr in parts)
    np.testing.assert_allclose(p.data, expect.data, **tol(np.float32))


@pytest.mark.parametrize("mode", ["dp", "shard"])
def test_a_checkpoint_loaded_on_some_ranks_only_raises_everywhere(mode):
    """The replicas went on at different steps (and sharded ones off the
    run), silently: the step counts are agreed with each step."""
    p = make_params(np.float32)
    opt = wrapped(mode, fastopt.AdamW, p, lr=1e-2)
    g = p.zeros_like()
    load_rank_grads(g, 0, np.float32)
    opt.step(g)
    sd = opt.state_dict()
    for _ in range(2):
        load_rank_grads(g, 0, np.float32)
        opt.step(g)
    if mode == "dp" and RANK == 0:
        opt.load_state_dict(sd)         # (sharded: a collective, loaded by every rank)
    elif mode == "shard" and RANK == 0:
        opt._inner.iterations = 1       # what a load on one rank would leave
    with pytest.raises(dist.DistributedError, match=r"rank \d is at step \d but rank 0 at step "
                                                    r"\d \(a checkpoint loaded on some ranks"):
        opt.step(g)


def test_a_collective_called_on_one_rank_only_raises_instead_of_hanging():
    """state_dict (sharded: it gathers the shards) or fastopt.save on rank 0
    while the others step: a hang, or an internal TypeError. Now each
    raises, naming both calls."""
    p = make_params(np.float32)
    opt = dist.ShardedOptimizer(fastopt.AdamW, p, lr=1e-2)
    g = p.zeros_like()
    load_rank_grads(g, 0, np.float32)
    with pytest.raises(dist.DistributedError, match=r"rank 0 is in state_dict but rank \d in "
                                                    r"the step"):
        if RANK == 0:
            opt.state_dict()
        else:
            opt.step(g)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_a_shard_without_a_norm_takes_the_planned_step(clip):
    # the sharded step's norm hook is only needed for a norm: without one the
    # shard's optimizer takes its one-call planned path (it took the full
    # Python step, 3x the small model's time), with the same results
    ref_p, p, opt = run_both("shard", "adamw", np.float32, clip, steps=4)
    np.testing.assert_allclose(p.data, ref_p.data, **tol(np.float32))
    assert (opt._inner._plan is not None) == (clip is None)


@pytest.mark.parametrize("mode", ["dp", "shard"])
def test_an_overflowing_float64_norm_clips_by_the_true_norm_on_every_rank(mode):
    # finite gradients past ~1e154 overflow the sum of squares; the sharded
    # norm (its own collective) came out inf and clipped them to zero
    cls, hyp = fastopt.SGD, dict(lr=0.1, max_grad_norm=1.0)
    ref_p, p = make_params(np.float64), make_params(np.float64)
    ref, opt = cls(ref_p, **hyp), wrapped(mode, cls, p, **hyp)
    g = p.zeros_like()
    for step in range(3):
        for view, a in zip(g, rank_grads(step, RANK, np.float64, scale=1e200)):
            view[...] = a
        norm = opt.step(g)
        mean = [np.sum([rank_grads(step, r, np.float64, scale=1e200)[k] for r in range(N)],
                       axis=0) / N for k in range(len(SHAPES))]
        assert norm == pytest.approx(ref.step(mean), rel=1e-12) and norm > 1e200
    np.testing.assert_allclose(p.data, ref_p.data, **tol(np.float64))
    assert not np.array_equal(p.data, make_params(np.float64).data)


@pytest.mark.parametrize("mode", ["dp", "shard"])
def test_a_backend_per_rank_raises_everywhere(mode):
    # each backend rounds its own way: ranks on different ones (auto on
    # nodes without the same builds) stepped their replicas apart silently
    backends = [b for b in fastopt.available_backends() if b != "cuda"]
    p = make_params(np.float32)
    opt = wrapped(mode, fastopt.AdamW, p, lr=1e-2, backend=backends[RANK % len(backends)])
    g = p.zeros_like()
    load_rank_grads(g, 0, np.float32)
    before = p.data.copy()
    with pytest.raises(dist.DistributedError, match=r"backend is .* on rank 1 but .* on rank 0"):
        opt.step(g)
    np.testing.assert_array_equal(p.data, before)


def test_a_sharded_schedule_steps_on_the_planned_path_and_takes_a_new_one():
    # the wrapper wrote the schedule into the shard's group every step, which
    # kept each step on the full path; a newly assigned schedule still counts
    first = fastopt.schedules.warmup_cosine(1e-2, 2, 20)
    second = fastopt.schedules.exponential(3e-3, 0.5)
    ref_p, p = make_params(np.float64), make_params(np.float64)
    ref = fastopt.AdamW(ref_p, lr=first)
    opt = dist.ShardedOptimizer(fastopt.AdamW, p, lr=first)
    g = p.zeros_like()
    planned = []
    for step in range(6):
        if step == 4:
            opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = second
        load_rank_grads(g, step, np.float64)
        opt.step(g)
        ref.step(mean_grads(step, np.float64))
        planned.append(opt._inner._plan is not None)
        assert opt.last_lr == ref.last_lr
    assert planned[1:4] == [True] * 3 and opt.lr_schedule(0) is second
    np.testing.assert_allclose(p.data, ref_p.data, **tol(np.float64))


@pytest.mark.parametrize("mode", ["dp", "shard"])
@pytest.mark.parametrize("low", ["bfloat16", None])
def test_sync_master_values_and_param_state_as_one_process(mode, low):
    """sync_master(values) (pretrained float32 weights into 16-bit training)
    and param_state(p) on both wrappers, as a single-process optimizer's:
    the sharded ones write every rank's copy of the whole model, their
    master copies for their shard, and gather a param's state across the
    shards it spans (a collective)."""
    import ml_dtypes

    dtype = np.dtype(ml_dtypes.bfloat16) if low else np.dtype(np.float32)
    ref_p, p = make_params(dtype), make_params(dtype)
    ref = fastopt.AdamW(ref_p, lr=1e-2)
    opt = (dist.DataParallel(fastopt.AdamW(p, lr=1e-2)) if mode == "dp"
           else dist.ShardedOptimizer(fastopt.AdamW, list(p), lr=1e-2))
    rng = np.random.default_rng(7)
    weights = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    g = p.zeros_like()
    for step in range(4):
        if step == 2:
            opt.sync_master(weights)
            ref.sync_master(weights)
            np.testing.assert_array_equal(p.data.astype(np.float32),
                                          ref_p.data.astype(np.float32))
        same = mean_grads(step, dtype.type)          # every rank's: the mean is it
        for view, a in zip(g, same):
            view[...] = a
        opt.step(g)
        ref.step(same)
    np.testing.assert_allclose(p.data.astype(np.float32), ref_p.data.astype(np.float32),
                               rtol=1e-2 if low else 2e-5, atol=1e-2 if low else 2e-6)
    for k in (0, 2, 4):          # params split across shards too
        got, want = opt.param_state(p[k]), ref.param_state(ref_p[k])
        assert sorted(got) == sorted(want) and got["step"] == want["step"] == 4
        for name in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"values\[1\] has shape \(3,\) but params\[1\]"):
        opt.sync_master([weights[0], np.ones(3, np.float32), *weights[2:]])


def _blas_threads():
    from threadpoolctl import threadpool_info
    return max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")


@pytest.fixture
def thread_pools():
    """The pools' sizes before the test, and both put back after it."""
    from threadpoolctl import threadpool_limits
    before = _blas_threads(), fastopt.get_num_threads()
    yield before
    threadpool_limits(before[0], user_api="blas")
    fastopt.set_num_threads(before[1])


@pytest.mark.parametrize("mode", ["dp", "shard", "fit"])
def test_each_rank_takes_its_share_of_the_cores(mode, thread_pools):
    """N ranks on one machine each sized both pools for all of it (fit()
    measured 10-20x slower on 2 cores): a wrapper lowers them to the rank's
    share, leaves a pool already under it, and takes threads= as given."""
    from threadpoolctl import threadpool_limits

    from fastopt.distributed.cores import _cpus, fair_share
    from fastopt.distributed.training import DataParallelTraining
    from fastopt.nn import MLP
    from fastopt.nn.training import make_optimizer

    share = fair_share(_cpus(), COMM.allgather(_cpus()))    # every rank on this machine
    most = max(1, len(_cpus()))

    def make(threads):
        if mode == "fit":
            par = DataParallelTraining(COMM, threads=threads)
            return make_optimizer(MLP((6, 4, 3), seed=0), "adamw", 1e-2, parallel=par)
        return (dist.DataParallel(fastopt.AdamW(make_params(np.float32), lr=1e-2),
                                  threads=threads) if mode == "dp" else
                dist.ShardedOptimizer(fastopt.AdamW, make_params(np.float32), lr=1e-2,
                                      threads=threads))

    threadpool_limits(most, user_api="blas")
    fastopt.set_num_threads(most)
    opt = make("auto")
    assert (_blas_threads(), fastopt.get_num_threads()) == (share, share)
    assert opt.threads_per_rank == share
    # one thread each, set by the user: stays
    threadpool_limits(1, user_api="blas")
    fastopt.set_num_threads(1)
    assert make("auto").threads_per_rank == share
    assert (_blas_threads(), fastopt.get_num_threads()) == (1, 1)
    # None leaves the pools as they are; an int sets both
    threadpool_limits(most, user_api="blas")
    assert make(None).threads_per_rank is None and _blas_threads() == most
    assert make(1).threads_per_rank == 1
    assert (_blas_threads(), fastopt.get_num_threads()) == (1, 1)


def test_threads_beyond_the_kernel_pool_change_nothing_and_every_rank_gives_the_same(
        thread_pools, monkeypatch):
    from threadpoolctl import threadpool_limits

    from fastopt.distributed.cores import _cpus, fair_share
    share = fair_share(_cpus(), COMM.allgather(_cpus()))
    most = max(1, len(_cpus()))
    threadpool_limits(most, user_api="blas")
    fastopt.set_num_threads(most)
    with pytest.raises(ValueError):        # (Numba's pool is smaller: on every rank)
        dist.DataParallel(fastopt.AdamW(make_params(np.float32), lr=1e-2), threads=10_000)
    assert (_blas_threads(), fastopt.get_num_threads()) == (most, most)
    # OMP_NUM_THREADS as clusters export it (the core count) is no choice to keep
    monkeypatch.setenv("OMP_NUM_THREADS", str(most))
    dist.DataParallel(fastopt.AdamW(make_params(np.float32), lr=1e-2))
    assert (_blas_threads(), fastopt.get_num_threads()) == (share, share)
    # threads given differently on one rank: refused on every rank, not a hang
    with pytest.raises(dist.DistributedError, match=r"threads=1 on rank 1 but 'auto' on "
                                                     "rank 0: give every rank the same"):
        dist.DataParallel(fastopt.AdamW(make_params(np.float32), lr=1e-2),
                          threads=1 if RANK == 1 else "auto")


def test_sharded_groups_of_lists_of_layers_are_refused_everywhere():
    """Two groups' lists both count from 0: their names would collide and
    sync_master(values) wrote layer 0's values into group 1."""
    buf = make_params(np.float32)
    groups = [{"params": [{"W": buf[0], "b": buf[1]}]},
              {"params": [{"W": buf[2], "b": buf[3], "c": buf[4]}], "lr": 0.01}]
    with pytest.raises(dist.DistributedError, match="is a list in two param groups"):
        dist.ShardedOptimizer(fastopt.Adam, groups, lr=0.1)
