"""A minimal training loop over in-memory arrays, shared by ``fastopt train``
and the MNIST benchmark.

Per epoch: a seeded shuffle, mini-batches gathered into one reused buffer
(``np.take(..., out=)``), ``model.train_step`` per batch, then an
evaluation on the held-out set. Training time excludes the evaluation.

Data-parallel training plugs in from above: ``parallel=`` takes an object
with ``optimizer(cls, groups, options)``, ``step_function(model, opt)``,
``end_epoch(totals)``, ``validate(model, X_val, y_val)`` and ``world_size``
(:class:`fastopt.distributed.training.DataParallelTraining` over MPI); this
module never imports the distributed layer.
"""

from __future__ import annotations

import time

import numpy as np

import fastopt

from ..optim.state_format import state_dtype_name
from .ensemble import Ensemble

OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "rmsprop": "RMSprop",
              "adagrad": "Adagrad", "adamax": "Adamax", "nadam": "NAdam", "radam": "RAdam",
              "lion": "Lion", "lamb": "LAMB", "lbfgs": "LBFGS"}
SCHEDULES = ("constant", "warmup-cosine")


def full_batch_problem(opt_name, batch_size, n_train):
    """Why ``batch_size`` does not suit ``opt_name`` (then say how to fix
    it), or None: L-BFGS's line search and curvature pairs compare
    evaluations of one fixed objective, so it trains on the whole set."""
    if opt_name == "lbfgs" and batch_size < n_train:
        return (f"lbfgs is full-batch (its line search and curvature pairs need one fixed "
                f"loss), but the batches hold {batch_size} of {n_train} samples")
    return None


def resolved_options(name, schedule="constant", total_steps=None, *, weight_decay=None,
                     momentum=None, warmup_steps=None) -> dict:
    """The values :func:`make_optimizer` trains with where these are None
    (its defaults): the optimizer class's weight decay, SGD's momentum 0.9,
    warmup-cosine's warmup of 5% of ``total_steps``; None where the
    optimizer or schedule has no such setting."""
    import inspect
    cls = getattr(fastopt, OPTIMIZERS.get(name, ""), None)
    if weight_decay is None and cls is not None:
        default = inspect.signature(cls).parameters.get("weight_decay")
        weight_decay = None if default is None else default.default
    if momentum is None and name == "sgd":
        momentum = 0.9
    if schedule == "warmup-cosine" and total_steps is not None and (
            total_steps >= 2 or warmup_steps == 0):
        w = warmup_steps if warmup_steps is not None else max(1, total_steps // 20)
        warmup_steps = min(w, total_steps - 1)
    return {"weight_decay": weight_decay, "momentum": momentum, "warmup_steps": warmup_steps}


def make_optimizer(model: Ensemble, name="adamw", lr=1e-3, *, lrs=None, schedule="constant",
                   total_steps=None, warmup_steps=None, weight_decay=None, momentum=None,
                   max_grad_norm=None, backend="auto", parallel=None, sam=None,
                   state_dtype="float32"):
    """An optimizer over ``model.param_groups``: one group (one kernel call)
    for a single lr, or one group per model for ``lrs`` (an lr sweep).

    ``sam=rho``: the optimizer wrapped in :class:`fastopt.SAM` (each
    training step then computes the gradients twice). ``name="lbfgs"``:
    :class:`fastopt.LBFGS` with the strong Wolfe line search, for one
    model trained full-batch (``lr`` is its first trial step).

    With a ``parallel`` plug-in (see the module docstring), the optimizer it
    makes of the class and groups (over MPI: a data-parallel optimizer with
    replicated or sharded state).

    ``momentum``: SGD's (default 0.9); refused for the others, which do not
    take one (it used to be ignored).

    ``state_dtype``: the optimizer's state as float32, or compact
    (``"bfloat16"``, ``"int8"``: see :mod:`fastopt.optim.state_format`).

    ``schedule="warmup-cosine"``: :class:`fastopt.schedules.warmup_cosine`
    with each model's lr as the peak, ``warmup_steps`` (default 5% of
    ``total_steps``) of linear warmup from 0, cosine decay to 10% of the peak
    at ``total_steps``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")
    state_dtype = state_dtype_name(state_dtype)     # np.float32 is "float32"
    if momentum is not None and name != "sgd":
        raise ValueError(f"momentum is an SGD setting; {name} does not take it")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    peaks = list(lrs) if lrs is not None else [lr]
    if lrs is not None and len(peaks) != model.k:
        raise ValueError(f"{len(peaks)} learning rates for an ensemble of {model.k} models")
    if schedule == "warmup-cosine":
        if total_steps is None:
            raise ValueError("warmup-cosine needs total_steps")
        least = 1 if warmup_steps == 0 else 2    # a warmup step (unless none) and a decay step
        if total_steps < least:
            raise ValueError(f"warmup-cosine needs at least {least} steps, the run has "
                             f"{total_steps} (more epochs or a smaller batch, or --schedule "
                             "constant)")
        w = resolved_options(name, schedule, total_steps, warmup_steps=warmup_steps)
        peaks = [fastopt.schedules.warmup_cosine(p, w["warmup_steps"], total_steps)
                 for p in peaks]
    _check_combination(name, lrs, parallel, sam, weight_decay, max_grad_norm, state_dtype,
                       model.params.dtype)
    if name == "lbfgs":
        return fastopt.LBFGS(model.params, lr=peaks[0], line_search_fn="strong_wolfe",
                             backend=backend)
    groups = model.param_groups(lr=peaks if lrs is not None else peaks[0])
    cls = getattr(fastopt, OPTIMIZERS[name])
    kw = dict(backend=backend, max_grad_norm=max_grad_norm)
    if name == "sgd":
        kw["momentum"] = resolved_options(name, momentum=momentum)["momentum"]
    if weight_decay is not None:
        kw["weight_decay"] = weight_decay
    if state_dtype != "float32":
        kw["state_dtype"] = state_dtype
    if parallel is not None:
        return parallel.optimizer(cls, groups, kw)
    opt = cls(groups, **kw)
    return opt if sam is None else fastopt.SAM(opt, rho=sam)


def _check_combination(name, lrs, parallel, sam, weight_decay, max_grad_norm, state_dtype,
                       dtype):
    """Refuse what SAM, L-BFGS, sharding and compact state cannot do here,
    naming the option."""
    if state_dtype != "float32" and dtype == np.float64:
        raise ValueError(f"--state-dtype {state_dtype} is compact state for float32 (or "
                         "16-bit) params; --dtype float64 params keep float64 state: "
                         "use --dtype float32, or leave out --state-dtype")
    if sam is not None or name == "lbfgs":
        what = "--optimizer lbfgs" if name == "lbfgs" else "--sam"
        if lrs is not None:
            why = "one line search" if name == "lbfgs" else "one gradient norm for the ascent"
            raise ValueError(f"{what} trains one model: its step couples every parameter "
                             f"({why}), so not an --ensemble-lrs sweep")
        if parallel is not None:
            raise ValueError(f"{what} runs in one process, not under mpiexec")
    if name == "lbfgs":
        if sam is not None:
            raise ValueError("--sam wraps an optimizer stepped with gradients, not lbfgs")
        compact = None if state_dtype == "float32" else state_dtype
        for flag, value in (("--weight-decay", weight_decay),
                            ("--max-grad-norm", max_grad_norm), ("--state-dtype", compact)):
            if value is not None:
                raise ValueError(f"--optimizer lbfgs takes no {flag}")
    if name in ("lamb", "nadam") and getattr(parallel, "shard_state", False):
        why = ("its per-tensor trust ratio needs whole tensors, and a shard holds parts of "
               "them" if name == "lamb" else "its per-group momentum product is not sharded yet")
        raise ValueError(f"--optimizer {name} with --shard-state: {why}; leave out "
                         "--shard-state (replicated state)")
    if state_dtype != "float32" and getattr(parallel, "shard_state", False):
        raise ValueError(f"--state-dtype {state_dtype} keeps compact optimizer state, which "
                         "--shard-state does not shard yet; drop one of them")


def fit(model: Ensemble, opt, X, y, *, epochs, batch_size, seed=0, X_val=None, y_val=None,
        target=None, on_batch=None, on_epoch=None, parallel=None, finished=(),
        clip_per_model=None):
    """Train for ``epochs``; every model sees the same shuffled batches.

    Returns a history dict: per epoch the mean training loss per model,
    held-out loss and accuracy per model, cumulative training seconds and
    samples/s; ``time_to_target`` (seconds of training until the first epoch
    whose held-out accuracy reached ``target``, per model, None if never).
    ``on_batch(epoch, i, n_batches, losses, seconds)`` and
    ``on_epoch(epoch, record)`` are progress hooks.

    ``parallel``: a data-parallel plug-in (see the module docstring), which
    then makes each step, combines the epoch's losses and the held-out
    metrics, and whose optimizer ``opt`` must be (``make_optimizer(...,
    parallel=)``).

    ``finished``: the records of epochs an earlier run finished (its
    history's ``"epochs"``), when ``model`` and ``opt`` were loaded from its
    checkpoint after the last of them: training goes on from the next
    epoch with the batches the uninterrupted run would have drawn, so the
    result is the same bit for bit.

    ``clip_per_model``: clip each model's gradients by its own norm to this
    before each step (:meth:`Ensemble.clip_grads`; a sweep's models then
    train as each would alone), in one process.
    """
    if clip_per_model is not None and parallel is not None:
        raise ValueError("clip_per_model runs in one process (under MPI the averaged "
                         "gradients would need it); clip with the optimizer's max_grad_norm")
    if parallel is None:
        step = _step_function(model, opt, X.shape[0], batch_size, clip_per_model)

        def validate():
            return Ensemble.evaluate(model, X_val, y_val)
        end_epoch, extra = None, {}
    else:
        step = parallel.step_function(model, opt)

        def validate():
            return parallel.validate(model, X_val, y_val)
        end_epoch, extra = parallel.end_epoch, {"world_size": parallel.world_size}
    return _run_epochs(model, opt, X, y, epochs=epochs, batch_size=batch_size, seed=seed,
                       target=target, on_batch=on_batch, on_epoch=on_epoch, step=step,
                       end_epoch=end_epoch, validate=None if X_val is None else validate,
                       finished=list(finished), **extra)


def _step_function(model, opt, n_train, batch_size, clip_per_model=None):
    """``step(gather, idx) -> (losses, samples)`` for ``opt``: one gradient
    and step per batch; SAM's two gradients (at p, then at p + e); or an
    L-BFGS step whose closure evaluates the whole batch."""
    if clip_per_model is not None and (isinstance(opt, fastopt.SAM)
                                       or getattr(opt, "steps_with_closure", False)):
        raise ValueError("clip_per_model is for optimizers stepped with gradients")

    if isinstance(opt, fastopt.SAM):
        def sam_step(gather, idx):
            X_b, y_b = gather(idx)
            losses = model.loss_and_grad(X_b, y_b).copy()
            opt.perturb(model.grads)
            model.train_step(opt, X_b, y_b)
            return losses, idx.size
        return sam_step
    if getattr(opt, "steps_with_closure", False):
        problem = full_batch_problem("lbfgs", batch_size, n_train)
        if problem:
            raise ValueError(f"{problem}; pass batch_size={n_train}")

        def closure_step(gather, idx):
            X_b, y_b = gather(idx)
            loss = opt.step(lambda: (model.loss_and_grad(X_b, y_b)[0], model.grads))
            return np.array([loss]), idx.size
        return closure_step

    def step(gather, idx):
        return model.train_step(opt, *gather(idx), max_grad_norm=clip_per_model), idx.size
    return step


def _run_epochs(model, opt, X, y, *, epochs, batch_size, seed, target, on_batch, on_epoch,
                step, validate, end_epoch=None, finished=(), **history_extra):
    """The epoch loop both ``fit`` paths share: seeded shuffles, batches
    gathered into reused buffers, ``step(gather, idx) -> (losses, samples)``
    per batch, ``end_epoch(totals)`` to combine the loss sums (over ranks),
    ``validate() -> (loss, acc)`` per epoch, and the history records, after
    the ``finished`` ones of an earlier run."""
    n = X.shape[0]
    if n == 0:
        raise ValueError("empty training set")
    if X.dtype != model.dtype:
        X = X.astype(model.dtype)
    model._check_optimizer(opt)
    rng = np.random.default_rng(seed)
    n_batches = -(-n // batch_size)
    gather = _BatchGatherer(X, y, model.dtype)
    history = {"epochs": [], "time_to_target": [None] * model.k, "target": target,
               **history_extra}
    done = getattr(opt, "iterations", None)
    if finished and done is not None and done != len(finished) * n_batches:
        # (a checkpoint saved inside an epoch would replay that epoch from its start)
        raise ValueError(
            f"finished lists {len(finished)} epochs of {n_batches} steps, but the optimizer "
            f"has taken {done} steps: load the model and the optimizer saved at the end of "
            f"epoch {len(finished)} (e.g. in on_epoch)")
    elapsed = 0.0
    for rec in finished:
        rng.permutation(n)           # that epoch's shuffle: the next one follows it
        elapsed = rec["seconds"]
        if "val_acc" in rec:
            _record_validation(history, rec, rec["val_loss"], rec["val_acc"], target, elapsed)
        history["epochs"].append(rec)
    for epoch in range(len(finished) + 1, epochs + 1):
        order = rng.permutation(n)
        total = np.zeros(model.k)
        t0 = time.perf_counter()
        for i in range(n_batches):
            losses, b = step(gather, order[i * batch_size:(i + 1) * batch_size])
            total += np.asarray(losses) * b
            if on_batch is not None:
                on_batch(epoch, i, n_batches, losses, elapsed + time.perf_counter() - t0)
        elapsed += time.perf_counter() - t0
        if end_epoch is not None:
            end_epoch(total)
        rec = {"epoch": epoch, "train_loss": (total / n).tolist(), "seconds": elapsed,
               "samples_per_s": epoch * n / elapsed}
        if validate is not None:
            vl, va = validate()
            _record_validation(history, rec, vl, va, target, elapsed)
        history["epochs"].append(rec)
        if on_epoch is not None:
            on_epoch(epoch, rec)
    return history


def _record_validation(history, rec, val_loss, val_acc, target, elapsed):
    """Store an epoch's held-out loss/accuracy per model, and the training
    seconds at which each model first reached ``target`` accuracy."""
    rec["val_loss"] = np.asarray(val_loss).tolist()
    rec["val_acc"] = np.asarray(val_acc).tolist()
    if target is not None:
        for k, acc in enumerate(val_acc):
            if acc >= target and history["time_to_target"][k] is None:
                history["time_to_target"][k] = elapsed


class _BatchGatherer:
    """``gather(idx)``: rows ``idx`` of X and y copied into buffers kept per
    batch size (a training step allocates nothing)."""

    def __init__(self, X, y, dtype):
        self.X, self.y, self.dtype = X, y, dtype
        self.bufs = {}

    def __call__(self, idx):
        b = idx.size
        if b not in self.bufs:
            self.bufs[b] = (np.empty((b, self.X.shape[1]), self.dtype),
                            np.empty(b, self.y.dtype))
        xb, yb = self.bufs[b]
        # idx comes from a permutation, always in range: mode="clip" skips the
        # temporary that the default mode="raise" makes with out= (a 128x784
        # float32 gather: 42 -> 14 us)
        np.take(self.X, idx, axis=0, out=xb, mode="clip")
        np.take(self.y, idx, axis=0, out=yb, mode="clip")
        return xb, yb
