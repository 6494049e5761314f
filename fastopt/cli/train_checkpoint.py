"""``fastopt train --checkpoint`` / ``--resume``: the run's checkpoint file.

After each epoch ``--checkpoint`` writes ``OUT/checkpoint.npz``
(:func:`fastopt.save`, atomically: an interrupted write leaves the previous
epoch's file): the models' params, the optimizer's state (its step count,
so a schedule goes on where it was), the finished epochs' records, and the
options that define the run. ``--resume`` loads it and trains on from the
next epoch with the batches the uninterrupted run would have drawn: the
result is the same bit for bit (one process; under mpiexec, with the same
number of ranks).
"""

from __future__ import annotations

import os

CHECKPOINT = "checkpoint.npz"
_KEY = "fastopt_train"      # the checkpoint's extra entry

# What defines the run: a resumed one must have the same (--epochs apart,
# which may grow when the schedule does not depend on it). How it runs may
# change: --target, --quiet, --no-plot, and (the results then agree to
# rounding, not bit for bit) --backend, --threads, the number of MPI ranks,
# --shard-state, --overlap (the checkpoint holds the whole state).
RUN_KEYS = ("data", "hidden", "activation", "optimizer", "lr", "sam", "ensemble_lrs",
            "schedule", "warmup_steps", "weight_decay", "momentum", "max_grad_norm",
            "state_dtype", "batch_size", "seed", "dtype", "device")


def checkpoint_path(args) -> str:
    return os.path.join(os.fspath(args.out), CHECKPOINT)


def flag_of(key) -> str:
    """The command-line flag of an argument's name: ``max_grad_norm`` -> ``--max-grad-norm``."""
    return "--" + key.replace("_", "-")


def run_config(args, steps) -> dict:
    """The options that define the run (JSON-able), with --epochs; a default
    as the value it stands for (``--weight-decay 0.01`` given or not is one
    run). ``steps``: the run's steps in all (warmup-cosine's warmup)."""
    config = {k: getattr(args, k) for k in RUN_KEYS}
    config.update(_resolved(config, steps))
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    config["epochs"] = args.epochs
    return config


def _resolved(config, steps) -> dict:
    from fastopt.nn.training import resolved_options
    return resolved_options(config.get("optimizer"), config.get("schedule"), steps,
                            weight_decay=config.get("weight_decay"),
                            momentum=config.get("momentum"),
                            warmup_steps=config.get("warmup_steps"))


def resume_from(args, steps):
    """``(problem, finished epoch records)``: the checkpoint's records when
    it is this run's, else a phrase saying why it cannot be resumed."""
    from fastopt.checkpoint import CheckpointError

    path = checkpoint_path(args)
    try:
        saved = _saved_run(path)
    except FileNotFoundError:
        # nothing to go on from: the run starts (a requeued batch job's one
        # command line, the first time as after a stop), and says so
        return None, []
    except CheckpointError as exc:
        return f"--resume: {exc}", None
    config, now = dict(saved["config"]), run_config(args, steps)
    # defaults as the values they stand for, in a file that kept them unset too
    config.update(_resolved(config, config.get("epochs", args.epochs) * (steps // args.epochs)))
    finished = saved["epochs"]
    if config["epochs"] != args.epochs and config["schedule"] != "constant":
        return (f"--resume: {path} is a run of --epochs {config['epochs']} and its "
                f"--schedule {config['schedule']} spans them all; give --epochs "
                f"{config['epochs']}"), None
    for key in RUN_KEYS:
        if config.get(key) != now[key]:
            return (f"--resume: {path} is a run with {flag_of(key)} {_shown(config.get(key))}, "
                    f"not {_shown(now[key])}: give the same options (or another --out "
                    "to start afresh)"), None
    if len(finished) > args.epochs:
        return (f"--resume: {path} has finished {len(finished)} epochs, more than "
                f"--epochs {args.epochs}"), None
    # all of them: the caller says there is nothing left to train and goes
    # through, writing the results again (a requeued batch job that had
    # finished is no usage error)
    return None, finished


def finished_note(args, finished) -> str:
    """What --resume says of a run that has trained all its epochs."""
    return (f"--resume: {checkpoint_path(args)} has finished {len(finished)} epochs of "
            f"--epochs {args.epochs}: nothing left to train; its results are written again"
            + (" (a larger --epochs trains on)" if args.schedule == "constant" else ""))


def _saved_run(path) -> dict:
    """The run's entry of the checkpoint at ``path`` (``{"config", "epochs"}``);
    CheckpointError for a file fastopt train did not write, FileNotFoundError."""
    from fastopt.checkpoint import CheckpointError, read
    tree = read(path)
    saved = tree.get("extra", {}).get(_KEY) if isinstance(tree.get("extra"), dict) else None
    if not isinstance(saved, dict) or "config" not in saved or "epochs" not in saved:
        raise CheckpointError(f"{path} was not written by fastopt train --checkpoint")
    return saved


def checkpointed_epochs(args) -> int:
    """Epochs the checkpoint in --out holds, read back from it: a second
    Ctrl-C can land between its rename and the count kept in
    ``args.checkpointed`` (the message then said to resume from an epoch the
    file had finished); that count where the file cannot be read."""
    from fastopt.checkpoint import read_meta
    try:
        # the metadata alone (the run's records are JSON there), not the arrays:
        # this runs while a SIGTERM's grace period passes
        meta = read_meta(checkpoint_path(args))
        return len(meta["extra"][_KEY]["epochs"])
    except (Exception, KeyboardInterrupt):     # noqa: BLE001 - a third Ctrl-C too
        return getattr(args, "checkpointed", 0)


def _shown(value) -> str:
    if value is None:
        return "(not given)"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def save_epoch(args, steps, model, opt, records) -> None:
    """Write the checkpoint after an epoch (every rank calls it under MPI:
    the optimizer's state is gathered, rank 0 writes)."""
    import fastopt
    fastopt.save(checkpoint_path(args), params=model.params, optimizer=opt,
                 extra={_KEY: {"config": run_config(args, steps), "epochs": records}})


def existing_problem(args):
    """Why this run (--checkpoint without --resume) must not start: a
    checkpoint in --out that it would overwrite after its first epoch."""
    from fastopt.checkpoint import CheckpointError

    path = checkpoint_path(args)
    if not os.path.lexists(path):
        return None
    try:
        saved = _saved_run(path)
        n, of = len(saved["epochs"]), saved["config"]["epochs"]
    except (CheckpointError, OSError, KeyError, TypeError):
        n = of = None
    if n is not None and n >= of:
        return (f"{path} exists (a finished run of --epochs {of}): delete it, or give "
                "another --out, to start afresh (or --resume with a larger --epochs to "
                "train it on, with --schedule constant)")
    done = "" if n is None else f" (a run stopped after epoch {n} of --epochs {of})"
    return (f"{path} exists{done}: pass --resume to go on from it, or delete it (or give "
            "another --out) to start afresh")


def load_into(args, model, opt) -> str | None:
    """Load the checkpoint into ``model`` and ``opt``; a phrase if it does not fit."""
    import fastopt
    try:
        fastopt.load(checkpoint_path(args), params=model.params, optimizer=opt)
    except fastopt.CheckpointError as exc:
        return f"--resume: {exc}"
    return None
