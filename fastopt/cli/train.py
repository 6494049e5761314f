"""``fastopt train``: train an MLP (or an lr sweep as one batched ensemble) on MNIST.

    fastopt train --data mnist --hidden 256,256 --optimizer adamw --lr 1e-3 \\
        --schedule warmup-cosine --epochs 15
    fastopt train --data mnist --hidden 256,256 --ensemble-lrs 1e-1,1e-2,1e-3,1e-4,1e-5
    fastopt train --optimizer sgd --lr 0.05 --sam 0.05        # SAM: two gradients a step
    fastopt train --optimizer lbfgs --batch-size 8000         # L-BFGS: full batch only
    fastopt train --state-dtype bfloat16                      # compact optimizer state

Under ``mpiexec -n N fastopt train ...`` (``pip install 'fastopt[mpi]'``) the
same command trains data-parallel: each rank computes the gradient of its
slice of every batch, the gradients are averaged over MPI after the
backward pass (``--overlap``: layer by layer during it; ``--shard-state``:
optimizer state sharded across ranks, ZeRO-1/2), and rank 0 prints and
writes the results.

Data: the fixed seeded 8k train / 2k held-out split of the MNIST test set
(:func:`fastopt.data.mnist_split`). Prints a progress bar with the loss and
throughput, the held-out accuracy per epoch, and writes ``metrics.json`` and
``curves.png`` (loss and accuracy per epoch, one curve per lr) to ``--out``.

``--out`` is checked before anything starts (exit 2 if it cannot be a
directory). Ctrl-C stops training after the current step, writes the
metrics and curves of the epochs that finished (``"interrupted": true``),
prints one line and exits 130; a second Ctrl-C stops at once. SIGTERM (a
batch scheduler's stop) is taken the same way, exit 143. Under mpiexec
(which passes the signal to every rank) the ranks agree after each step
whether any was asked to stop, so all stop after the same step: rank 0
writes the finished epochs, and every rank exits 130 (a second Ctrl-C
ends the job at once).

``--checkpoint`` writes ``checkpoint.npz`` to ``--out`` after each epoch
(the models, the optimizer state, the finished epochs' records);
``--resume`` goes on from it after its last epoch, with the same batches
and schedule as a run never stopped: the same result bit for bit (with the
same backend, threads and ranks; else to rounding).
"""

from __future__ import annotations

import math

from .common import EXIT_INTERRUPTED, non_negative_int, positive_int, user_path
from .out_lock import OutLock
from .train_checkpoint import (CHECKPOINT, checkpoint_path, checkpointed_epochs,
                               existing_problem, finished_note, flag_of, load_into,
                               resume_from, save_epoch)

HELP = "train an MLP (or a batched lr sweep) on MNIST: progress, held-out accuracy, curves"


def _floats(text):
    import argparse
    try:
        vals = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not vals or any(not v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return vals


def _rho(text):
    import argparse
    try:
        rho = float(text)
    except ValueError:
        rho = -1.0
    if not rho > 0 or rho == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive SAM radius, got {text!r}")
    return rho


def _fraction(text):
    import argparse
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"expected a held-out accuracy as a fraction in (0, 1] (0.94 for 94%), got {text!r}")
    return value


def _hidden(text):
    import argparse

    from fastopt.nn.activations import parse_layers
    try:
        return parse_layers(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc))


def add_arguments(parser):
    parser.add_argument("--data", default="mnist", choices=["mnist"], help="dataset (mnist)")
    parser.add_argument("--data-dir", default=None, type=user_path,
                        help="directory with the MNIST IDX files (default: $FASTOPT_DATA; "
                             "in a development checkout, its data folder)")
    parser.add_argument("--hidden", type=_hidden, default=(256, 256),
                        help="hidden widths, e.g. 256,256 (default); '' for none "
                             "(softmax regression)")
    parser.add_argument("--activation", default="relu",
                        choices=["relu", "leaky_relu", "tanh", "sigmoid", "gelu"],
                        help="hidden layers' activation (default relu)")
    from ..nn.training import OPTIMIZERS   # numpy and fastopt only: no Numba, no torch
    parser.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS),
                        help="(default adamw)")
    parser.add_argument("--lr", type=float, default=None,
                        help="(peak) learning rate (default 1e-3, the Adam family's; SGD "
                             "usually wants 0.01-0.1; lbfgs: 1, its first trial step)")
    parser.add_argument("--sam", type=_rho, default=None, metavar="RHO",
                        help="wrap the optimizer in SAM with radius RHO (e.g. 0.05): each "
                             "step computes the gradients twice")
    parser.add_argument("--ensemble-lrs", type=_floats, default=None,
                        help="comma-separated lrs: train one model per lr in one batched run "
                             "(instead of --lr; each model from its own initial weights)")
    parser.add_argument("--schedule", default="constant", choices=["constant", "warmup-cosine"],
                        help="lr schedule (default constant)")
    parser.add_argument("--warmup-steps", type=non_negative_int, default=None,
                        help="warmup-cosine warmup, fewer than all steps (default: 5%% of "
                             "them; only with --schedule warmup-cosine)")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="default: the optimizer's (AdamW 1e-2, others 0)")
    parser.add_argument("--momentum", type=float, default=None,
                        help="SGD momentum (default 0.9; only with --optimizer sgd)")
    parser.add_argument("--max-grad-norm", type=float, default=None,
                        help="clip the gradients' global norm to this in each step "
                             "(with --ensemble-lrs: each model's own norm; default: no "
                             "clipping)")
    parser.add_argument("--state-dtype", default="float32",
                        choices=["float32", "bfloat16", "int8"],
                        help="optimizer state: float32, or compact (bfloat16: 2 bytes a "
                        "value, int8: about 1), both stochastically rounded")
    parser.add_argument("--epochs", type=positive_int, default=15, help="(default 15)")
    parser.add_argument("--batch-size", type=positive_int, default=128,
                        help="at most the training samples (8000; default 128)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the initial weights and of the batches' shuffle "
                             "(default 0; the 8k/2k train/held-out split is fixed)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="(default float32)")
    parser.add_argument("--backend", default="auto", choices=["auto", "cython", "numba", "numpy"],
                        help="CPU nn backend (with --device cpu; default auto: the "
                             "fastest one installed)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: weights, gradients, optimizer state and batches on the GPU "
                             "(needs numba-cuda and a GPU); default cpu")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads for BLAS (threadpoolctl) and for fastopt's kernels "
                             "and ensemble models; default: each library's own (under "
                             "mpiexec: each rank's share of its machine's cores)")
    parser.add_argument("--target", type=_fraction, default=0.94,
                        help="report the training time to reach this held-out accuracy, a "
                             "fraction (default 0.94)")
    parser.add_argument("--out", default="train-results", type=user_path,
                        help="output directory (default train-results)")
    parser.add_argument("--checkpoint", action="store_true",
                        help="after each epoch, write the models and the optimizer state "
                             "to OUT/checkpoint.npz (for --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="go on from OUT/checkpoint.npz after its last epoch, as if "
                             "never stopped (bit for bit with the same --backend, --threads "
                             "and ranks; the same options; --epochs may grow with --schedule "
                             "constant), or start the run where there is none yet; keeps "
                             "writing it")
    parser.add_argument("--no-plot", action="store_true", help="skip curves.png")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--shard-state", action="store_true",
                        help="under mpiexec: shard the optimizer state across ranks "
                             "(ZeRO-1/2) instead of replicating it")
    parser.add_argument("--overlap", action="store_true",
                        help="under mpiexec, replicated state: average the gradients layer "
                             "by layer during the backward pass (non-blocking allreduces) "
                             "instead of after it")


class _Progress:
    """A one-line progress bar on stderr: epoch, batches, loss, throughput.
    Redrawn in place on a terminal; elsewhere (a log file, a pipe) one line
    per epoch, at its end."""

    def __init__(self, epochs, n_train, batch_size, stream, enabled=True, whose=""):
        self.epochs, self.n_train, self.stream, self.enabled = epochs, n_train, stream, enabled
        self.whose = whose      # under MPI: the loss shown is rank 0's part of the batch
        self.batch_size = batch_size
        self.last = 0.0
        isatty = getattr(stream, "isatty", None)
        self.tty = bool(isatty and isatty())

    def batch(self, epoch, i, n_batches, losses, seconds):
        import time
        now = time.perf_counter()
        last = i + 1 == n_batches
        if not self.enabled or (not last and (now - self.last < 0.1 or not self.tty)):
            return
        self.last = now
        width = 24
        done = int(width * (i + 1) / n_batches)
        seen = (epoch - 1) * self.n_train + min((i + 1) * self.batch_size, self.n_train)
        rate = seen / seconds if seconds > 0 else 0.0
        loss = min(float(l) for l in losses) if len(losses) > 1 else float(losses[0])
        tag = ("best loss" if len(losses) > 1 else "loss") + self.whose
        line = (f"epoch {epoch:>3}/{self.epochs} [{'#' * done}{'.' * (width - done)}]"
                f" {i + 1:>4}/{n_batches} {tag} {loss:.4f}  {rate:,.0f} samples/s ")
        self.stream.write("\r" + line if self.tty else line.rstrip() + "\n")
        self.stream.flush()

    def end_line(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _plot(history, labels, path):
    from .._plotting import agg_pyplot, save_figure
    plt = agg_pyplot()
    if plt is None:
        raise ImportError("matplotlib is not installed")
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history["epochs"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k, label in enumerate(labels):
        c = f"C{k % 10}"
        # markers: a run of one epoch has one point a curve, no line
        ax1.plot(epochs, [r["train_loss"][k] for r in history["epochs"]], ".-", color=c,
                 label=f"{label} train (mean over the epoch)")
        ax1.plot(epochs, [r["val_loss"][k] for r in history["epochs"]], ".--", color=c,
                 label=f"{label} held-out (at its end)")
        ax2.plot(epochs, [100 * r["val_acc"][k] for r in history["epochs"]], ".-", color=c,
                 label=label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.set_yscale("log")
    ax1.set_title("loss")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("held-out accuracy (%)")
    ax2.set_title("accuracy")
    if history.get("target"):
        ax2.axhline(100 * history["target"], color="grey", lw=0.8, ls=":")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):            # epochs are whole numbers (ticks at 1.2, 1.4... read oddly)
        if len(epochs) <= 12:
            ax.set_xticks(epochs)        # (MaxNLocator gives 0.96, 0.98... around one epoch)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _world():
    """The MPI communicator when launched by ``mpiexec -n N`` (N > 1), else None."""
    from fastopt.distributed import launched_size
    if launched_size() <= 1:
        return None
    from fastopt.distributed import world
    return world()


def run(args):
    import sys

    from fastopt._launcher import launched_rank
    said = launched_rank() == 0      # under mpiexec rank 0 alone says what is wrong
    try:
        comm = _world()
    except ImportError as exc:
        if said:
            print(f"fastopt train: launched under an MPI launcher but {exc}", file=sys.stderr)
        return 2
    if args.overlap and args.shard_state:
        if said:
            print("fastopt train: --overlap is for replicated state; sharded state reduces "
                  "after the backward pass", file=sys.stderr)
        return 2
    if comm is None:
        if args.shard_state or args.overlap:
            print(f"fastopt train: {'--shard-state' if args.shard_state else '--overlap'} "
                  "needs several ranks (mpiexec -n N)", file=sys.stderr)
            return 2
        try:
            rc = _run(args, None)
        finally:
            _release_out()
        if rc == 2:           # a bad argument: no empty --out left behind
            from .common import remove_unused_output_dirs
            remove_unused_output_dirs()
        return rc
    import os
    import time
    import traceback

    from fastopt.distributed import DistributedError
    rank = comm.Get_rank()
    from fastopt.distributed.cores import node_share
    share = node_share(comm)   # (a collective: the cores of each machine over its ranks)
    if args.threads is None:   # share the cores: N ranks x BLAS threads each would oversubscribe
        try:
            import threadpoolctl  # noqa: F401
            args.threads = share
        except ImportError:
            pass
    elif rank == 0 and args.threads > share:
        # (a trial's --threads 2 over 2 ranks on 2 cores: 3.4x slower, unsaid)
        print(f"fastopt train: --threads {args.threads} is more than each rank's share of "
              f"this machine's cores ({share}): BLAS threads spin and wait for each other "
              "(leave out --threads for that share)", file=sys.stderr)
    saved = sys.stdout, sys.stderr
    if rank != 0:
        # rank 0 reports; the others stay silent: every rank checks the same
        # arguments, and a problem only one rank sees reaches rank 0 through
        # an agreement (its message names the rank)
        args.quiet = True
        sys.stdout = sys.stderr = open(os.devnull, "w")
    try:
        return _run(args, comm)
    except DistributedError as exc:   # every rank raised it: exit together
        if rank == 0:
            print(f"fastopt train: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # mpiexec passes Ctrl-C to every rank, each at its own step: no step
        # to stop at together, so the job ends. Rank 0 has written what
        # finished and ends it; the others wait for that, and end it
        # themselves only if rank 0 is stuck (in a collective they left)
        _restore_streams(saved)
        if rank == 0:
            sys.stderr.write("fastopt train: under mpiexec Ctrl-C ends every rank at once\n")
            sys.stderr.flush()
            time.sleep(0.25)        # for mpiexec to pass the lines on (see _comm.py)
        else:
            # rank 0 writes metrics.json and curves.png first: 5 s was too
            # short on a loaded machine (matplotlib's import alone), and this
            # rank's abort cut the writing short
            time.sleep(15.0)
        comm.Abort(EXIT_INTERRUPTED)
    except BaseException:
        _restore_streams(saved)       # this rank's own traceback must be seen
        traceback.print_exc()
        sys.stderr.write(f"fastopt train: rank {rank} failed; aborting every rank\n")
        sys.stderr.flush()
        comm.Abort(1)
    finally:
        _release_out()
        _restore_streams(saved)


#: the --out lock this process holds while a run goes (not on args: they
#: are written to metrics.json)
_OUT_LOCKS = []


def _release_out():
    while _OUT_LOCKS:
        _OUT_LOCKS.pop().release()


def _restore_streams(saved):
    import sys
    if sys.stdout is not saved[0]:
        sys.stdout.close()
    sys.stdout, sys.stderr = saved


def _usage_problem(comm, problem, what):
    """``problem`` (a usage error this rank found, or None) agreed across
    ranks under MPI: the message to print and exit 2 on, on every rank, if
    any rank found one (a DistributedError from the agreement would mean
    exit 1, which reads as a failed run rather than a bad argument)."""
    if comm is None:
        return problem
    from fastopt.distributed import DistributedError, agree
    try:
        agree(comm, problem and ValueError(problem), what=what)
    except DistributedError as exc:
        return problem or str(exc)
    return None


def _run(args, comm):
    import os
    import sys

    import numpy as np

    import fastopt
    from .common import output_dir_problem
    from fastopt.data import mnist_split
    from fastopt.nn import Ensemble
    from fastopt.nn.training import fit, full_batch_problem, make_optimizer

    args.checkpoint = args.checkpoint or args.resume
    # rank 0 alone writes, so its view of --out is the one that counts
    problem = None if comm is not None and comm.Get_rank() else output_dir_problem(
        args.out, ("metrics.json", "curves.png") + ((CHECKPOINT,) if args.checkpoint else ()))
    if not problem and (comm is None or comm.Get_rank() == 0):
        # before the checks below: a second run on this --out passed them
        # while the first had not yet written (out_lock.py)
        lock = OutLock(args.out)
        problem = lock.acquire()
        if problem is None:
            _OUT_LOCKS.append(lock)
    if (not problem and args.checkpoint and not args.resume
            and (comm is None or comm.Get_rank() == 0)):
        problem = existing_problem(args)     # its progress would be written over
    problem = _usage_problem(comm, problem and f"--out {args.out or repr('')}: {problem}",
                             "checking --out")
    if problem:
        print(f"fastopt train: {problem}", file=sys.stderr)
        return 2
    if not args.checkpoint and os.path.lexists(checkpoint_path(args)) and (
            comm is None or comm.Get_rank() == 0):
        # this run's metrics.json would sit beside another run's checkpoint
        print(f"fastopt train: note: {checkpoint_path(args)} is another run's checkpoint; "
              "this run (no --checkpoint) writes its results beside it, and a later "
              "--resume would go on from that run and rewrite them", file=sys.stderr)
    problem, data = None, None
    try:
        data = mnist_split(args.data_dir, dtype=np.dtype(args.dtype))
    except (FileNotFoundError, ValueError) as exc:
        problem = str(exc)
    # every rank reads the files: the others must not wait for one that failed
    problem = _usage_problem(comm, problem, "loading the data")
    if problem:
        print(f"fastopt train: {problem}", file=sys.stderr)
        return 2
    Xtr, ytr, Xte, yte = data
    lrs = args.ensemble_lrs
    k = len(lrs) if lrs else 1
    if args.batch_size > Xtr.shape[0]:
        print(f"fastopt train: --batch-size {args.batch_size} is more than the "
              f"{Xtr.shape[0]} training samples", file=sys.stderr)
        return 2
    problem = full_batch_problem(args.optimizer, args.batch_size, Xtr.shape[0])
    if problem:
        print(f"fastopt train: --optimizer {problem}: add --batch-size {Xtr.shape[0]}",
              file=sys.stderr)
        return 2
    problem = _device_problem(args, comm)
    if problem:
        print(f"fastopt train: --device cuda: {problem}", file=sys.stderr)
        return 2
    if args.lr is not None and not 0.0 <= args.lr < float("inf"):
        print(f"fastopt train: --lr {args.lr}: must be a finite number >= 0", file=sys.stderr)
        return 2
    if args.ensemble_lrs is not None and args.lr is not None:
        print("fastopt train: --lr and --ensemble-lrs: give one (--ensemble-lrs sets each "
              "model's lr)", file=sys.stderr)
        return 2
    if args.lr is None:
        args.lr = 1.0 if args.optimizer == "lbfgs" else 1e-3
    sizes = (Xtr.shape[1], *args.hidden, 10)
    # One level of parallelism at a time (see fastopt/nn/layers.py): BLAS
    # threads inside one model's matmuls, fastopt's threads for the optimizer
    # kernels and for splitting an ensemble's models; --threads caps both.
    if args.threads is not None:
        try:
            fastopt.set_num_threads(args.threads)
        except ValueError as exc:
            print(f"fastopt train: --threads {args.threads}: {exc}", file=sys.stderr)
            return 2
    steps = args.epochs * -(-Xtr.shape[0] // args.batch_size)
    if args.warmup_steps is not None and (args.schedule != "warmup-cosine"
                                          or args.warmup_steps >= steps):
        print(f"fastopt train: --warmup-steps {args.warmup_steps}: "
              + ("only with --schedule warmup-cosine" if args.schedule != "warmup-cosine"
                 else f"the run has {steps} steps in all"), file=sys.stderr)
        return 2
    finished = []
    if args.resume:
        # every rank reads the file: all of them resume, or none
        problem, finished = resume_from(args, steps)
        problem = _usage_problem(comm, problem, "reading the checkpoint")
        if problem:
            print(f"fastopt train: {problem}", file=sys.stderr)
            return 2
        if not finished:
            print(f"fastopt train: --resume: no {checkpoint_path(args)} yet; starting the run "
                  "(it writes one after each epoch)", file=sys.stderr)
            args.resume = False
        elif len(finished) == args.epochs:
            # no epoch left: the run goes through (no step is taken) and writes
            # its results from the checkpoint's records again, in case the
            # first run was stopped after its last checkpoint, before them
            print(f"fastopt train: {finished_note(args, finished)}", file=sys.stderr)
    parallel = None
    if comm is not None:
        from fastopt.distributed.training import DataParallelTraining
        # --threads (by default each rank's share, set above) sizes the pools here
        parallel = DataParallelTraining(comm, shard_state=args.shard_state,
                                        overlap=args.overlap,
                                        threads="auto" if args.threads is None else None)
    # an lr sweep's models are each clipped by their own norm (the optimizer's
    # one norm over all of them let a diverging lr shrink the others' steps)
    per_model = args.max_grad_norm if k > 1 else None
    if per_model is not None and comm is not None:
        print("fastopt train: --ensemble-lrs with --max-grad-norm clips each model by its "
              "own norm, in one process: not under mpiexec (train each lr on its own, or "
              "leave out --max-grad-norm)", file=sys.stderr)
        return 2
    try:
        model = Ensemble(k, sizes, args.activation, seed=args.seed, dtype=args.dtype,
                         backend="cuda" if args.device == "cuda" else args.backend)
        opt = make_optimizer(model, args.optimizer, args.lr, lrs=lrs, schedule=args.schedule,
                             total_steps=steps, warmup_steps=args.warmup_steps,
                             weight_decay=args.weight_decay, momentum=args.momentum,
                             max_grad_norm=None if per_model is not None else
                             args.max_grad_norm, parallel=parallel,
                             sam=args.sam, state_dtype=args.state_dtype)
    except (TypeError, ValueError) as exc:
        print(f"fastopt train: {_as_flag(str(exc), args)}", file=sys.stderr)
        return 2
    if args.resume:
        problem = _usage_problem(comm, load_into(args, model, opt), "loading the checkpoint")
        if problem:
            print(f"fastopt train: {problem}", file=sys.stderr)
            return 2
        if per_model is not None and getattr(opt, "max_grad_norm", None) is not None:
            # a sweep checkpointed before each model was clipped by its own
            # norm: its optimizer clips the whole sweep; clipping per model
            # on top would be neither run
            per_model = None
            print("fastopt train: --resume: this checkpoint's sweep clips all its models "
                  "with one norm (it was made before each model was clipped by its own); "
                  "the run goes on that way", file=sys.stderr)
    labels = [f"lr={v:g}" for v in (lrs or [args.lr])]
    args.hyperparameters = _resolved_hypers(opt, args)
    mode = ("sharded optimizer state" if args.shard_state else "replicated optimizer state"
            + (", allreduce overlapped with backward" if args.overlap else ""))
    # no hidden layer: no activation either (softmax regression)
    kind = args.activation if args.hidden else "(no hidden layer: softmax regression)"
    print(f"fastopt train: {k} model(s) {'-'.join(map(str, sizes))} {kind}, "
          f"{args.optimizer}{'' if args.sam is None else f' + SAM rho={args.sam:g}'}"
          f"{'' if args.state_dtype == 'float32' else f' ({args.state_dtype} state)'} "
          f"{', '.join(labels)}{_shown_hypers(args.hyperparameters)}, schedule {args.schedule}, "
          f"{args.epochs} epoch{'s' * (args.epochs != 1)} x {steps // args.epochs} steps, "
          f"batch {args.batch_size}, "
          f"nn backend {model.backend}, optimizer backend {opt.backend}, "
          f"{Xtr.shape[0]} train / {Xte.shape[0]} held-out"
          + ("" if comm is None else f", {comm.Get_size()} MPI ranks ({mode})")
          + (f"; resuming after epoch {len(finished)}" if args.resume else ""))
    bar = _Progress(args.epochs, Xtr.shape[0], args.batch_size, sys.stderr, not args.quiet,
                    "" if comm is None else " (on rank 0's slice)")
    records = list(finished)   # finished epochs, kept here too: fit returns nothing when interrupted
    args.checkpointed = len(finished)      # epochs the checkpoint holds (said on Ctrl-C)

    def on_epoch(epoch, rec):
        records.append(rec)
        if args.checkpoint and _write_checkpoint(args, steps, model, opt, records, comm):
            args.checkpointed = len(records)
        bar.end_line()
        accs = "  ".join(f"{lab} {100 * a:.2f}%" for lab, a in zip(labels, rec["val_acc"]))
        # (running totals: the time since training began and the mean rate
        # over it, as metrics.json has them; read as per epoch they misled)
        print(f"epoch {epoch:>3}: held-out accuracy {accs}  ({rec['seconds']:.1f} s so far, "
              f"{rec['samples_per_s']:,.0f} samples/s{' per model' if k == 1 else ' x ' + str(k)}"
              " on average)", flush=True)

    limits = None
    if args.threads is not None:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            print("fastopt train: --threads needs threadpoolctl (pip install threadpoolctl)",
                  file=sys.stderr)
            return 2
        limits = threadpool_limits(args.threads, user_api="blas")
    stop = _StopOnCtrlC()
    # Under MPI each rank gets the signal at its own point, maybe while the
    # others wait in a collective for it: raised there, a rank left them
    # blocked (its abort came 15 s later, with nothing written). So the
    # ranks agree after each step (one 4-byte allreduce) and stop together.
    agreed = None if comm is None else _AgreedStop(comm, stop)

    def on_batch(*a):
        bar.batch(*a)
        if stop.requested if agreed is None else agreed():
            raise _Stopped

    interrupted = False
    from fastopt.bench.timing import load_since, load_snapshot
    load = load_snapshot()
    with stop:   # also while writing: a first Ctrl-C then no longer tears metrics.json
        try:
            # a diverging model's overflow is said once, as DIVERGED, after
            # training (NumPy's warnings named a line inside fastopt.nn)
            with np.errstate(over="ignore", invalid="ignore"):
                history = fit(model, opt, Xtr, ytr, epochs=args.epochs,
                              batch_size=args.batch_size, seed=args.seed, X_val=Xte, y_val=yte,
                              target=args.target, on_batch=on_batch, on_epoch=on_epoch,
                              parallel=parallel, finished=finished, clip_per_model=per_model)
        except (_Stopped, KeyboardInterrupt) as exc:
            if comm is not None:
                code = stop.exit_code if isinstance(exc, _Stopped) else EXIT_INTERRUPTED
                try:
                    if comm.Get_rank() == 0:     # what finished, as one process writes it
                        bar.end_line()
                        _finish_interrupted(args, _history_so_far(records, args.target, k),
                                            labels, sizes, model.backend, code)
                finally:
                    if isinstance(exc, _Stopped):
                        _written(comm)
                if isinstance(exc, _Stopped):
                    return code               # every rank, after the same step
                raise                         # a second Ctrl-C: the job ends (abort)
            interrupted = True
            history = _history_so_far(records, args.target, k)
        finally:
            if limits is not None:
                limits.restore_original_limits()
        if interrupted:
            bar.end_line()
            return _finish_interrupted(args, history, labels, sizes, model.backend,
                                       stop.exit_code)
        final = history["epochs"][-1]["val_acc"]
        lost = _diverged(history, sizes[-1])
        for k, (lab, a, t) in enumerate(zip(labels, final, history["time_to_target"])):
            reach = (f", reached {100 * args.target:.0f}% after {t:.1f} s of training"
                     if t is not None else f", never reached {100 * args.target:.0f}%")
            if k in lost:     # NaN weights: the accuracy is one class's share
                reach = (f": DIVERGED (training loss {lost[k][0]} by epoch {lost[k][1]}); "
                         "that accuracy is not a result, try a smaller --lr")
            print(f"held-out accuracy {lab}: {100 * a:.2f}%{reach}")
        shared = load_since(load)["other_processes"].get("other_cpu_fraction", 0.0)
        if shared >= 0.1 and comm is None:
            # a thread the host took away holds up each threaded step (bench says so too)
            print(f"note: other processes used {100 * shared:.0f}% of the CPUs during "
                  "training; threaded steps wait for a thread that is not running, so "
                  "the times above may be several times the machine's own"
                  + ("" if args.threads == 1 else " (--threads 1 is less hurt)"),
                  file=sys.stderr)
        if comm is not None and comm.Get_rank() != 0:
            _written(comm)
            return 0
        try:
            paths, problem, rc = _save_results(args, history, labels, sizes, model.backend)
        finally:
            if comm is not None:
                _written(comm)
        for path in paths:
            print(f"wrote {path}")
        if problem is not None:
            print(f"fastopt train: {problem}", file=sys.stderr)
            return rc
        if args.checkpoint and args.checkpointed < len(records):
            # the results are whole, but a job that relies on --resume must
            # learn that its checkpoint lags (the writes' failures were said)
            print(f"fastopt train: {checkpoint_path(args)} holds "
                  f"{args.checkpointed} of the {len(records)} epochs: writing it failed "
                  "after the others (see above); exit 1", file=sys.stderr)
            return 1
    return 0


def _write_checkpoint(args, steps, model, opt, records, comm) -> bool:
    """--checkpoint after an epoch; a failed write is said and training goes
    on (the previous epoch's file is left whole). Under MPI rank 0 writes
    and every rank learns how that went: all go on."""
    import sys
    failures = (OSError,)
    if comm is not None:
        from fastopt.distributed import DistributedError
        failures += (DistributedError,)
    try:
        save_epoch(args, steps, model, opt, records)
    except failures as exc:
        print(f"fastopt train: could not write {checkpoint_path(args)} after epoch "
              f"{len(records)}: {getattr(exc, 'strerror', None) or exc}; training goes on",
              file=sys.stderr)
        return False
    return True


def _device_problem(args, comm):
    """Why this run cannot train on the GPU (None when it can, or runs on the CPU)."""
    if args.device != "cuda":
        return None
    if comm is not None:
        return "data-parallel training (mpiexec) runs on the CPU only; run one process"
    if args.sam is not None or args.optimizer == "lbfgs":
        return ("this command trains on the GPU with a plain optimizer (SAM and L-BFGS step "
                "device arrays from Python, not yet in this loop); drop --sam / pick another "
                "--optimizer")
    if args.backend != "auto":
        return f"--backend {args.backend} is a CPU nn backend; leave it out"
    return None


class _Stopped(Exception):
    """Raised from the batch hook at the first step boundary after a Ctrl-C."""


def _written(comm):
    """Every rank waits here, its signal handlers still set, until rank 0
    has written the results: a rank that returned first took a SIGTERM by
    the default action, and mpiexec then ended rank 0 mid-write."""
    comm.Barrier()


class _AgreedStop:
    """``agreed()``: whether any rank of ``comm`` was asked to stop (its
    ``_StopOnCtrlC``), the same answer on every rank: a collective, called
    after each step by all of them."""

    def __init__(self, comm, stop):
        import numpy as np

        from fastopt.distributed._comm import mpi
        self.comm, self.stop, self._max = comm, stop, mpi().MAX
        self._mine, self._any = np.zeros(1, np.int32), np.zeros(1, np.int32)

    def __call__(self) -> bool:
        # the signal's number: SIGTERM's (15) over SIGINT's (2) where both came
        self._mine[0] = self.stop.exit_code - 128 if self.stop.requested else 0
        self.comm.Allreduce(self._mine, self._any, op=self._max)
        if self._any[0]:
            self.stop.exit_code = 128 + int(self._any[0])
        return bool(self._any[0])


class _StopOnCtrlC:
    """While active, a first Ctrl-C (SIGINT) only sets ``requested``; the
    training loop checks it after each step, so no step or epoch record is
    torn. A second Ctrl-C raises KeyboardInterrupt at once, as usual.
    SIGTERM (a batch scheduler's or ``kill``'s stop, which a KILL follows
    after a grace period) is taken the same way: the finished epochs are
    written, and the exit code says which signal (``exit_code``). Only
    default handlers are replaced (not one an embedding program set, nor
    SIG_IGN under nohup), and only in the main thread, where Python allows it."""

    def __init__(self, enabled=True):
        self.enabled, self.requested, self._old = enabled, False, {}
        self.exit_code = EXIT_INTERRUPTED

    def __enter__(self):
        import signal
        import threading
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return self
        for signum, default in ((signal.SIGINT, signal.default_int_handler),
                                (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(signum) is default:
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal
        # a second Ctrl-C stops at once; a second SIGTERM (a scheduler's to
        # every process, and mpiexec's forward of it) is the same request
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.exit_code = 128 + signum           # 130 for SIGINT, 143 for SIGTERM

    def __exit__(self, *exc):
        import signal
        for signum, old in self._old.items():
            signal.signal(signum, old)
        self._old = {}
        return False


def _history_so_far(records, target, k):
    """What fit() would have returned for the epochs that finished:
    time_to_target is the training time of the first epoch at ``target``."""
    reached = [next((r["seconds"] for r in records
                     if target is not None and r["val_acc"][j] >= target), None)
               for j in range(k)]
    return {"epochs": records, "time_to_target": reached, "target": target}


def _finish_interrupted(args, history, labels, sizes, backend, code=EXIT_INTERRUPTED):
    """After Ctrl-C (or SIGTERM: ``code`` 143): the finished epochs' metrics
    and curves, one line, ``code``."""
    import sys

    done = len(history["epochs"])
    problem = None
    if done:
        paths, problem, _ = _save_results(args, history, labels, sizes, backend,
                                          interrupted=True)
        what = (f"results of those in {', '.join(map(str, paths))}" if paths
                else "nothing written")
    else:
        what = "nothing written"
    if problem is not None:
        what += f" ({problem})"
    held = checkpointed_epochs(args) if args.checkpoint else 0
    if held:
        what += f"; --resume goes on from epoch {held + 1}"
    how = "interrupted" if code == EXIT_INTERRUPTED else "terminated (SIGTERM)"
    print(f"fastopt train: {how}; {done} of {args.epochs} epochs finished, {what}",
          file=sys.stderr, flush=True)
    return code


def _resolved_hypers(opt, args) -> dict:
    """The first param group's hyperparameters as the optimizer resolved
    them (the defaults a flag left out included; lr is per model) and the
    clipping norm: metrics.json had only the flags given (momentum null for
    a run at 0.9)."""
    inner = getattr(opt, "base_optimizer", opt)
    groups = getattr(inner, "param_groups", None) or [{}]
    hypers = {k: (list(v) if isinstance(v, tuple) else v) for k, v in groups[0].items()
              if k not in ("params", "lr") and isinstance(v, (int, float, bool, tuple, str))}
    hypers["max_grad_norm"] = getattr(inner, "max_grad_norm", None) or args.max_grad_norm
    if getattr(inner, "max_grad_norm", None) is None and args.max_grad_norm is not None:
        hypers["clip"] = "per model"      # (an lr sweep: Ensemble.clip_grads)
    return hypers


def _shown_hypers(hypers) -> str:
    """The header's few that decide a run: weight decay, SGD's momentum, clipping."""
    shown = [f"{label} {hypers[k]:g}" for k, label in (("momentum", "momentum"),
                                                     ("weight_decay", "weight decay"),
                                                     ("max_grad_norm", "clip"))
             if isinstance(hypers.get(k), (int, float)) and not isinstance(hypers[k], bool)
             and (hypers[k] or k == "weight_decay")]
    if hypers.get("clip") == "per model":
        shown[-1] += " per model"
    return f" ({', '.join(shown)})" if shown else ""


def _as_flag(message, args):
    """An optimizer's message about one of its arguments, named by the flag
    that gave it ("--max-grad-norm 0.0: must be > 0.0", as --lr's), not by
    the Python parameter."""
    for name in ("max_grad_norm", "weight_decay", "momentum"):
        if message.startswith(name + " "):
            return f"{flag_of(name)} {getattr(args, name)}: {message[len(name) + 1:]}"
    return message


def _diverged(history, n_classes) -> dict:
    """``{model index: (its blown-up training loss as text, the epoch)}``:
    non-finite in any epoch, or in the last past ten times a uniform
    guess's cross-entropy (log of the class count: a model at 9e24 was
    shown as an ordinary 10% result; one that blew up early and recovered
    is a result)."""
    lost = {}
    for r in history["epochs"]:
        for k, v in enumerate(r["train_loss"]):
            if k not in lost and (v is None or not math.isfinite(v)):   # (None: JSON's)
                lost[k] = (str(v), r["epoch"])
    limit = 10 * math.log(max(n_classes, 2))
    last = history["epochs"][-1] if history["epochs"] else {"train_loss": []}
    for k, v in enumerate(last["train_loss"]):
        if k not in lost and v > limit:
            lost[k] = (f"{v:.3g}", last["epoch"])
    return lost


def _finite_json(obj):
    """``obj`` with NaN and infinities as None: strict JSON (Python's NaN and
    Infinity tokens broke JSON.parse and were read as 1.8e308 by jq)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def _save_results(args, history, labels, sizes, backend, interrupted=False):
    """:func:`_write_results`, its failure as a phrase: ``(paths written,
    problem or None, exit code)``. A second Ctrl-C while writing (the first
    one only asks training to stop) leaves each file whole or not written."""
    written = []
    try:
        _write_results(args, history, labels, sizes, backend, interrupted, written)
    except OSError as exc:
        return (written, f"could not write the results in --out {args.out}: "
                f"{exc.strerror or exc}{_earlier_results_removed(args.out, written)}", 1)
    except KeyboardInterrupt:
        return written, "interrupted while writing the results", EXIT_INTERRUPTED
    return written, None, 0


def _earlier_results_removed(out, written) -> str:
    """An earlier run's metrics.json and curves.png in ``out`` that this run
    could not replace, removed (a job parsing metrics.json without the exit
    code read the old run's as this one's), and what became of them."""
    from pathlib import Path
    said = []
    for name in ("metrics.json", "curves.png"):
        old = Path(out) / name
        if old in written or not old.is_file():
            continue
        try:
            old.unlink()
            said.append(f"removed an earlier run's {name}")
        except OSError:
            said.append(f"an earlier run's {name} is still there")
    return f" ({'; '.join(said)})" if said else ""


def _write_results(args, history, labels, sizes, backend, interrupted, written):
    """metrics.json and (unless --no-plot, or without matplotlib) curves.png
    in --out, each written beside its place and renamed into it; the paths
    written are appended to ``written``. A curves.png of an earlier run is
    removed when this run draws none, so that it is not read as this run's."""
    import json
    import sys
    from pathlib import Path

    from .._files import write_atomically

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    final = history["epochs"][-1]["val_acc"]
    config = {k_: (list(v) if isinstance(v, tuple) else v)
              for k_, v in vars(args).items() if k_ not in ("func", "hyperparameters")}
    if args.ensemble_lrs is not None:
        config["lr"] = None      # (the default lr the sweep never used: each model's is its own)
    metrics = {"config": config,
               "sizes": list(sizes), "backend": backend, "labels": labels,
               "hyperparameters": getattr(args, "hyperparameters", None),
               "final_val_acc": final, "interrupted": interrupted,
               "diverged": [labels[k] for k in sorted(_diverged(history, sizes[-1]))],
               **history}
    write_atomically(out / "metrics.json",
                     json.dumps(_finite_json(metrics), indent=1, allow_nan=False).encode())
    written.append(out / "metrics.json")
    curves = out / "curves.png"
    drawn = False
    if not args.no_plot:
        try:
            _plot(history, labels, curves)
            drawn = True
            written.append(curves)
        except ImportError:
            print("matplotlib is not installed: no curves.png (pip install matplotlib)",
                  file=sys.stderr)
    if not drawn and curves.is_file():
        curves.unlink()
        print(f"removed {curves}: an earlier run's (this run draws none)", file=sys.stderr)
