"""fastopt.distributed under a real MPI launcher, from the normal test run.

Each test starts ``mpiexec -n K ...`` as a subprocess with a timeout (a hang
is a failure, not a stuck CI job) and skips cleanly when mpi4py or mpiexec
is missing (``pip install -e '.[mpi]'``). K = 2 and 3: three ranks split the
parameter buffer unevenly. The tests that run on every rank are in
tests/mpi/mpi_optim.py.

Open MPI refuses to run as root unless told; the environment below allows
it, and oversubscription (3 ranks on a 2-core machine: the variable is
OMPI_MCA_rmaps_base_oversubscribe up to Open MPI 4, PRTE_MCA_... from 5).
MPICH (the mpich wheel, what CI installs) needs none of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastopt.distributed import launched_size

pytest.importorskip("mpi4py")
ROOT = Path(__file__).resolve().parents[1]


def _mpiexec():
    here = Path(sys.executable).parent / "mpiexec"   # the mpich wheel's, beside python
    return str(here) if here.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found")
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "OMPI_MCA_rmaps_base_oversubscribe": "1",
       "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe", "PYTHONUNBUFFERED": "1"}


def mpirun(n, args, timeout=120):
    cmd = [MPIEXEC, "-n", str(n), *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s (a hang?)\n"
                    f"{exc.stdout or ''}{exc.stderr or ''}")


@pytest.mark.parametrize("n", [2, 3])
def test_distributed_suite(n):
    """Data-parallel and sharded steps equal one process (with and without
    clipping), errors and non-finite gradients agreed on every rank, layout
    checks, checkpoints both ways, fit()."""
    out = mpirun(n, [sys.executable, "-m", "pytest", "tests/mpi/mpi_optim.py", "-q", "-x",
                     "-p", "no:cacheprovider"])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert out.stdout.count(" passed") == n


@pytest.mark.parametrize("n", [2, 3])
def test_overlap_suite(n):
    """Overlapped gradient averaging (DataParallel.backward_hook): equal to
    the blocking path and to one process, and no hang when a rank fails part
    way through its backward pass, has bad arguments, or has no samples.
    Each test arms a 60 s watchdog on every rank (``-s`` so its stack dump is
    seen); the launcher's timeout backs it up."""
    out = mpirun(n, [sys.executable, "-m", "pytest", "tests/mpi/mpi_overlap.py", "-q", "-x",
                     "-s", "-p", "no:cacheprovider"], timeout=150)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert out.stdout.count(" passed") == n


def test_overlap_buckets_are_whole_arrays_from_the_end():
    from fastopt.distributed.optim import _plan_buckets

    offsets = [0, 100, 110, 400, 402, 500]      # 5 arrays
    assert _plan_buckets(offsets, 1) == [(402, 500), (400, 402), (110, 400), (100, 110),
                                         (0, 100)]
    assert _plan_buckets(offsets, 50) == [(402, 500), (110, 402), (0, 110)]
    assert _plan_buckets(offsets, 300) == [(110, 500), (0, 110)]     # the last may be small
    assert _plan_buckets(offsets, 10**6) == [(0, 500)]
    assert _plan_buckets([0, 0, 7, 7], 1) == [(0, 7)]                # empty arrays


@pytest.mark.parametrize("how", ["exit", "raise", "raise-comm"])
def test_a_rank_that_dies_ends_the_job(how):
    out = mpirun(2, [sys.executable, "tests/mpi/crash.py", how], timeout=60)
    assert out.returncode != 0
    assert "unreachable" not in out.stdout
    if how != "exit":
        assert "aborting every rank" in out.stderr


def _mnist_available():
    from fastopt.data import mnist_split
    try:
        mnist_split()
    except (FileNotFoundError, ValueError):
        return False
    return True


@pytest.mark.parametrize("mode", ["--shard-state", "--overlap"])
def test_train_command_under_mpiexec(tmp_path, mode):
    """``fastopt train`` unchanged under mpiexec: the same float64 run on one
    process and on two ranks (sharded state; replicated state with the
    allreduce overlapped with backward) gives the same losses."""
    if not _mnist_available():
        pytest.skip("MNIST files not found")
    args = ["-m", "fastopt.cli", "train", "--epochs", "1", "--hidden", "32", "--dtype", "float64",
            "--no-plot", "--quiet", "--threads", "1", "--max-grad-norm", "1.0"]
    single = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    out = mpirun(2, [sys.executable, *args, mode, "--out", str(tmp_path / "two")])
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("held-out accuracy lr=0.001:") == 1     # rank 0 reports
    assert ("2 MPI ranks (sharded optimizer state)" if mode == "--shard-state" else
            "2 MPI ranks (replicated optimizer state, allreduce overlapped with backward)"
            ) in out.stdout
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())["epochs"][-1]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["epochs"][-1]
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=1e-9)
    np.testing.assert_allclose(two["val_loss"], one["val_loss"], rtol=1e-9)
    assert two["val_acc"] == one["val_acc"]


def test_train_says_when_threads_times_ranks_exceed_the_cores(tmp_path):
    """A trial's --threads 2 over 2 ranks on 2 cores ran 3.4x slower without a word."""
    if not _mnist_available():
        pytest.skip("MNIST files not found")
    cores = os.cpu_count() or 1
    out = mpirun(2, [sys.executable, "-m", "fastopt.cli", "train", "--epochs", "1", "--hidden",
                     "8", "--no-plot", "--quiet", "--threads", str(cores), "--out",
                     str(tmp_path)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr.count(f"--threads {cores} is more than each rank's share of this "
                            f"machine's cores ({max(1, cores // 2)})") == 1


def test_train_resumes_under_mpiexec_from_a_checkpoint_every_rank_wrote(tmp_path):
    """--checkpoint under mpiexec (sharded state: a collective, rank 0
    writes) and --resume on two ranks end as the run never stopped."""
    if not _mnist_available():
        pytest.skip("MNIST files not found")
    args = [sys.executable, "-m", "fastopt.cli", "train", "--hidden", "16", "--no-plot",
            "--quiet", "--threads", "1", "--batch-size", "500", "--shard-state"]
    runs = [("straight", ["--epochs", "2", "--checkpoint"]),
            ("resumed", ["--epochs", "1", "--checkpoint"]),
            ("resumed", ["--epochs", "2", "--resume"])]
    for out, extra in runs:
        done = mpirun(2, [*args, *extra, "--out", str(tmp_path / out)])
        assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming after epoch 1" in done.stdout
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text())["epochs"]
            for d in ("straight", "resumed"))
    assert [(r["train_loss"], r["val_loss"]) for r in a] == \
        [(r["train_loss"], r["val_loss"]) for r in b]


@pytest.mark.parametrize("flags", [["--overlap"], ["--shard-state"],
                                   ["--overlap", "--shard-state"]])
def test_train_mpi_flags_refused_where_they_mean_nothing(flags):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")}
    out = subprocess.run([sys.executable, "-m", "fastopt.cli", "train", *flags], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert ("is for replicated state" if len(flags) == 2 else "needs several ranks") \
        in out.stderr


@pytest.mark.parametrize("case", ["out", "data", "batch", "parse", "bench"])
def test_usage_errors_under_mpiexec_exit_2_said_once(tmp_path, case):
    """A bad argument under mpiexec exits 2 on every rank (not 1, a failed
    run), and the message comes once, from rank 0: found by argparse, or by
    ``fastopt train`` itself (on rank 0 alone, or on every rank)."""
    if case not in ("data", "parse", "bench") and not _mnist_available():
        pytest.skip("MNIST files not found")
    (tmp_path / "a_file").write_text("")
    train = [sys.executable, "-m", "fastopt.cli", "train", "--threads", "1"]
    cmd = {"out": [*train, "--out", str(tmp_path / "a_file")],
           "data": [*train, "--data-dir", str(tmp_path / "missing"),
                    "--out", str(tmp_path / "o")],
           "batch": [*train, "--batch-size", "10000000", "--out", str(tmp_path / "o")],
           "parse": [*train, "--epochs", "0"],
           "bench": [sys.executable, "-m", "fastopt.bench.distributed", "mlp",
                     "--epochs", "0"]}[case]
    out = mpirun(2, cmd)
    assert out.returncode == 2, out.stdout + out.stderr
    said = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(said) == 1, out.stderr
    assert said[0].startswith("python -m fastopt.bench.distributed: error:" if case == "bench"
                              else "fastopt train:")
    assert {"out": "--out", "data": "missing", "batch": "--batch-size", "parse": "--epochs",
            "bench": "--epochs"}[case] in said[0]


@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])   # SIGINT, SIGTERM
def test_train_ctrl_c_under_mpiexec_writes_what_finished_and_exits_130(tmp_path, signum, code):
    """Ctrl-C under mpiexec ended the job as a crash: a traceback per rank,
    'rank 1 failed', exit 1 and nothing written after minutes of epochs.
    Then each rank stopped where the signal found it, and one that found
    rank 0 waiting in a collective left it there (nothing written, abort
    after 15 s: a flaky failure here). The ranks now agree after each step
    and stop after the same one."""
    import signal

    if not _mnist_available():
        pytest.skip("MNIST files not found")
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "fastopt.cli", "train",
                             "--epochs", "500", "--hidden", "16", "--threads", "1", "--quiet",
                             "--out", str(tmp_path)], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        for line in proc.stdout:          # an epoch finished: then Ctrl-C
            if line.startswith("epoch   2:"):
                break
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and "failed" not in err and "Abort" not in err, err[-3000:]
    assert err.count("fastopt train: interrupted;" if signum == 2 else
                     "fastopt train: terminated (SIGTERM);") == 1, err[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["interrupted"] is True and len(metrics["epochs"]) >= 2


def test_bench_mlp_cases_train_alike():
    """``python -m fastopt.bench.distributed mlp`` under mpiexec: blocking,
    overlapped and sharded rows, each the same training run."""
    if not _mnist_available():
        pytest.skip("MNIST files not found")
    out = mpirun(2, [sys.executable, "-m", "fastopt.bench.distributed", "mlp", "--epochs", "1",
                     "--threads", "1", "--bucket-elems", "1"])
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["case"].split("), ")[1] for r in rows] == [
        "replicated state, allreduce after backward",
        "replicated state, allreduce overlapped with backward", "sharded state"]
    assert rows[1]["buckets"] == 6 and rows[1]["ratio_to_blocking_median"] > 0
    losses = [r["train_loss_last_epoch"] for r in rows]
    assert losses[1] == losses[0]        # two ranks: the same sums, bit for bit
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)


def test_launched_size_and_rank_read_the_launcher_environment(monkeypatch):
    from fastopt._launcher import launched_rank

    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS",
                "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert launched_size() == 1 and launched_rank() == 0
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert launched_size() == 4 and launched_rank() == 3


def test_sharded_nadam_is_refused_rather_than_resumed_wrong():
    """NAdam keeps a per-group momentum product outside the state buffers the
    sharded optimizer merges: refused with a clear error (one rank)."""
    pytest.importorskip("mpi4py")
    import fastopt
    from fastopt.distributed import DistributedError, ShardedOptimizer
    with pytest.raises(DistributedError, match="does not shard NAdam"):
        ShardedOptimizer(fastopt.NAdam, [np.ones(4)], lr=1e-3)


def test_sharded_step_refuses_an_unknown_group_key_on_every_rank_and_recovers():
    """A misspelt hyperparameter written into a group is refused before any
    collective (every rank raises together), and once the user deletes it
    the shard's own groups lose it too: the step goes on (one rank)."""
    pytest.importorskip("mpi4py")
    import fastopt
    from fastopt.distributed import DistributedError, ShardedOptimizer
    from mpi4py import MPI
    params = fastopt.pack([np.ones(4, np.float32), np.ones(4, np.float32)])
    opt = ShardedOptimizer(fastopt.AdamW, list(params), comm=MPI.COMM_SELF, lr=0.1)
    grads = params.zeros_like()
    grads.data[:] = 1
    opt.step(grads)
    before = params.data.copy()
    opt.param_groups[0]["weight_decy"] = 0.1
    with pytest.raises(DistributedError, match=r"unknown keys \['weight_decy'\]"):
        opt.step(grads)
    np.testing.assert_array_equal(params.data, before)
    del opt.param_groups[0]["weight_decy"]
    opt.step(grads)
    assert not np.array_equal(params.data, before)


def test_a_sharded_schedule_that_fails_is_named_with_its_step():
    """A schedule raising inside the sharded step is said as the single-process
    optimizer says it (the group, the step), every rank raising; nothing moves."""
    pytest.importorskip("mpi4py")
    import fastopt
    from fastopt.distributed import DistributedError, ShardedOptimizer
    from mpi4py import MPI
    params = fastopt.pack([np.ones(4, np.float32)])

    def sched(k):
        if k >= 1:
            raise ArithmeticError("too far")
        return 0.1

    opt = ShardedOptimizer(fastopt.AdamW, list(params), comm=MPI.COMM_SELF, lr=sched)
    grads = params.zeros_like()
    grads.data[:] = 1
    opt.step(grads)
    before = params.data.copy()
    with pytest.raises(DistributedError,
                       match=r"param_groups\[0\]\['lr'\]: the schedule failed at step 1: ArithmeticError: too far"):
        opt.step(grads)
    np.testing.assert_array_equal(params.data, before)


def test_data_parallel_says_how_to_pack_groups_out_of_memory_order():
    """The README's pack([w1, b1, w2, b2]) with weights and biases as two
    groups: the message said to pass grads as a list, which DataParallel
    refuses. It says how to pack them now, when it is made."""
    pytest.importorskip("mpi4py")
    import fastopt
    from fastopt.distributed import DataParallel, DistributedError
    from mpi4py import MPI
    w1, b1, w2, b2 = fastopt.pack([np.ones((3, 2)), np.ones(2), np.ones((2, 2)), np.ones(2)])
    opt = fastopt.AdamW([{"params": [w1, w2]}, {"params": [b1, b2], "weight_decay": 0.0}])
    with pytest.raises(DistributedError, match=r"pack them in the optimizer's order, "
                                               r"pack\(\[w1, w2, b1, b2\]\)"):
        DataParallel(opt, comm=MPI.COMM_SELF)
    with pytest.raises(DistributedError, match="wraps an optimizer that has its params"):
        DataParallel(fastopt.AdamW(lr=1e-3), comm=MPI.COMM_SELF)


def test_a_bare_step_or_zero_grad_of_a_wrapper_says_to_pass_the_gradients():
    pytest.importorskip("mpi4py")
    import fastopt
    from fastopt.distributed import DataParallel, ShardedOptimizer
    from mpi4py import MPI
    params = fastopt.pack([np.ones(3), np.ones(2)])
    for opt in (DataParallel(fastopt.AdamW(params), comm=MPI.COMM_SELF),
                ShardedOptimizer(fastopt.AdamW, params, comm=MPI.COMM_SELF)):
        name = type(opt).__name__
        with pytest.raises(TypeError, match=rf"{name}.step\(\) needs the gradients"):
            opt.step()
        with pytest.raises(TypeError, match=rf"{name}.zero_grad\(\) needs the gradients"):
            opt.zero_grad()
    np.testing.assert_array_equal(params.data, 1.0)


def test_lbfgs_is_refused_by_both_wrappers_when_made():
    """It failed at the first step ('needs a closure'): the wrappers step
    with averaged gradients, L-BFGS with a closure."""
    pytest.importorskip("mpi4py")
    import fastopt
    from fastopt.distributed import DataParallel, DistributedError, ShardedOptimizer
    from mpi4py import MPI
    p = fastopt.pack([np.ones(4)])
    with pytest.raises(DistributedError, match="LBFGS steps with a closure"):
        DataParallel(fastopt.LBFGS(p), comm=MPI.COMM_SELF)
    with pytest.raises(DistributedError, match="LBFGS steps with a closure"):
        ShardedOptimizer(fastopt.LBFGS, list(p), comm=MPI.COMM_SELF)


def test_a_checkpoint_of_params_by_name_loads_into_a_sharded_optimizer():
    """A single-process optimizer made from a dict records its params'
    names; a sharded one (views of one buffer, unnamed) refused that
    checkpoint although the layouts were the same. Loaded by position (one
    rank); compact state_dtype given as a NumPy dtype is float state."""
    pytest.importorskip("mpi4py")
    import fastopt
    from fastopt.distributed import ShardedOptimizer
    from mpi4py import MPI
    named = {"W": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}
    single = fastopt.AdamW(named, lr=0.1)
    for _ in range(2):
        single.step({"W": np.full((4, 3), 0.5, np.float32), "b": np.ones(3, np.float32)})
    sd = single.state_dict()
    assert sd["param_groups"][0]["params"][0]["name"] == "W"
    params = fastopt.pack([np.ones((4, 3), np.float32), np.ones(3, np.float32)])
    opt = ShardedOptimizer(fastopt.AdamW, list(params), comm=MPI.COMM_SELF, lr=0.1,
                           state_dtype=np.float32)
    opt.load_state_dict(sd)
    np.testing.assert_array_equal(opt.state_dict()["state"][0]["buffers"]["exp_avg"],
                                  sd["state"][0]["buffers"]["exp_avg"])


def test_settings_of_two_wrappers_stepping_in_turn_are_hashed_once_each(monkeypatch):
    # each step hashes its settings for the agreement; two models' wrappers
    # stepping in turn keep their dicts, and neither is hashed again
    import hashlib
    from fastopt.distributed import _comm
    calls = []
    real = hashlib.blake2b
    monkeypatch.setattr(_comm.hashlib, "blake2b",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    a, b = {"lr": 0.1}, {"lr": 0.2}
    first = [_comm._hash(a), _comm._hash(b)]
    for _ in range(5):
        assert [_comm._hash(a), _comm._hash(b)] == first
    assert len(calls) == 2 and first[0] != first[1]
    assert _comm._hash({"lr": 0.1}) == first[0]       # the same values, another dict


def test_wrappers_take_sync_master_values_and_give_param_state_by_name():
    """The distributed wrappers had neither (a single-process optimizer's
    sync_master(values) and param_state(p)): one rank, params by name."""
    pytest.importorskip("mpi4py")
    import fastopt
    from fastopt.distributed import DataParallel, ShardedOptimizer
    from mpi4py import MPI
    rng = np.random.default_rng(0)
    for wrap in ("dp", "shard"):
        buf = fastopt.pack([rng.standard_normal((3, 2)), rng.standard_normal(2)])
        named = {"l1": {"W": buf[0], "b": buf[1]}}
        opt = (DataParallel(fastopt.AdamW(named, lr=0.1), comm=MPI.COMM_SELF) if wrap == "dp"
               else ShardedOptimizer(fastopt.AdamW, named, comm=MPI.COMM_SELF, lr=0.1))
        g = buf.zeros_like()
        g.data[:] = 1.0
        opt.step(g)
        state = opt.param_state(("l1", "W"))
        assert state["step"] == 1 and state["exp_avg"].shape == (3, 2)
        np.testing.assert_allclose(opt.param_state(buf[1])["exp_avg"], 0.1)
        new = {"l1": {"W": np.full((3, 2), 2.0), "b": np.full(2, 3.0)}}
        opt.sync_master(new)
        np.testing.assert_array_equal(buf.data, [2.0] * 6 + [3.0] * 2)
        before = buf.data.copy()
        with pytest.raises(ValueError, match=r"values\['l1\.b'\] has shape \(3,\)|"
                                             r"values\['l1'\]\['b'\] has shape \(3,\)"):
            opt.sync_master({"l1": {"W": np.ones((3, 2)), "b": np.ones(3)}})
        np.testing.assert_array_equal(buf.data, before)
        with pytest.raises(ValueError, match="no param named 'l2.W'"):
            opt.param_state("l2.W")


def test_a_ranks_share_splits_each_cpu_among_the_ranks_that_may_use_it():
    from fastopt.distributed.cores import fair_share
    # unbound ranks on 8 cores
    assert fair_share(range(8), [range(8)] * 2) == 4
    assert fair_share(range(8), [range(8)] * 3) == 2
    assert fair_share(range(2), [range(2)] * 3) == 1     # oversubscribed: never 0
    # mpiexec -bind-to core: each rank keeps its own cores
    assert fair_share([0, 1], [[0, 1], [2, 3]]) == 2
    # two ranks bound to cores 0-3 and one unbound on 0-7
    assert fair_share(range(8), [range(4), range(4), range(8)]) == 5


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "all", "1"])
def test_a_wrappers_threads_must_be_auto_none_or_a_count(bad):
    from fastopt.distributed.training import DataParallelTraining
    with pytest.raises(ValueError, match="threads must be 'auto', None or an int >= 1"):
        DataParallelTraining(object(), threads=bad)
