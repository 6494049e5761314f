r"""Sharpness-Aware Minimization around any fastopt optimizer.

Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently Improving
Generalization" (Algorithm 1), and its adaptive form, ASAM (Kwon et al.
2021), whose perturbation is scaled elementwise by :math:`|p|`. Each
training step evaluates the gradient twice::

    loss, grads = loss_and_grad(params)
    sam.perturb(grads)              # p <- p + e: the worst nearby point
    loss, grads = loss_and_grad(params)
    sam.step(grads)                 # p <- p - e, then the base step with these grads

The math (:mod:`fastopt.backends.flat_ops`) is a global-norm pass and a
scaled copy of the gradients added to the params: one compiled call per
param group (both passes in one call for a one-group optimizer).

:meth:`SAM.step` on the compiled CPU backends (numba, cython) hands ``e``
to the base optimizer's step tables as an offset
(:meth:`~fastopt.backends.tables.StepTable.set_shift`): the kernels read
each weight as ``p - e`` and write the stepped weight, so the restore and
the base step are one pass over the params, and one native call for a
one-group optimizer (the planned fast step of
:mod:`fastopt.optim.step_plan` included: the offset travels in the table).
The NumPy reference and compact optimizer state (``state_dtype``) keep two
passes: ``p -= e``, then the base step.

On device params (a base optimizer on the ``cuda`` backend) the same steps
are kernels (:mod:`fastopt.backends.flat_cuda`): the optimizers' device norm
pass, the scale decided on the device, one perturbation launch per run of
params; :meth:`SAM.perturb` then reads the norm back (whether to skip is
decided by it, as on the host). :meth:`SAM.step` hands ``e`` to the base
optimizer's device step as an offset: its kernels read ``p - e``, so the
restore and the step are one pass over the params.
"""

from __future__ import annotations

import math
import threading
import warnings

import numpy as np

from .. import _validate as V
from .._warn import warn_user
from .._memory import state_zeros
from ..backends import get_backend
from ..backends.flat_ops import ops_for, sam_scale
from ..backends.tables import group_tables, refuse_each_other
from ..clip import ordered_sum
from ..params import FlatArrays
from . import forks
from .base import Optimizer, _InGroups, prepared_load
from .interrupt import INTERRUPTS, finished, held
from .param_state import GroupStates
from .placement import Offsets, span
from .state_checks import require_array, require_keys


def _refuse_maximize(groups):
    """SAM's ``e`` ascends the loss: for a maximizing base it would move
    the params to the best nearby point, not the worst, silently."""
    for gi, group in enumerate(groups):
        if group.get("maximize"):
            raise ValueError(f"SAM: param_groups[{gi}] has maximize=True; SAM's perturbation "
                             "is the worst nearby point of a minimization, so minimize the "
                             "negated objective instead")


class SAM:
    r"""Sharpness-Aware Minimization (SAM/ASAM) around ``base_optimizer``.

    .. math::
        e &= \rho\, \frac{g}{\lVert g \rVert_2}
            \quad\text{(adaptive: } e = \rho\, \frac{p^2 \odot g}
            {\lVert |p| \odot g \rVert_2}\text{)} \\
        p &\leftarrow p + e \quad\text{(perturb; the caller computes } g'
            \text{ there)} \\
        p &\leftarrow p - e, \text{ then the base optimizer's step with } g'

    The norm is global: over every array of every param group, in float64.
    A zero gradient gives ``e = 0`` (the paper's reference code adds 1e-12
    to the norm instead; without it a zero gradient would be 0/0).

    ``base_optimizer``: any fastopt optimizer stepped with gradients (SGD,
    AdamW, ...) that already has its params, in any layout (packed, a list,
    a dict, param groups); SAM updates those same arrays. ``param_groups``
    are the base optimizer's own (lr schedules, hyperparameter edits and
    checkpoints keep working).

    * :meth:`perturb` with non-finite gradients skips the perturbation:
      params untouched, a RuntimeWarning, ``skipped_perturbs`` counted; the
      following :meth:`step` is then the base optimizer's plain step (which
      skips non-finite gradients itself when it was made with
      ``skip_nonfinite=True``).
    * :meth:`step` without :meth:`perturb`, or :meth:`perturb` twice, is a
      RuntimeError; wrong gradients are refused before anything is written.
    * A base step that skips non-finite gradients (``skip_nonfinite``)
      still restores the params: they end at the unperturbed point, the
      base's state untouched and ``skipped_steps`` counted, on every
      backend and placement.
    * State: ``state[gi]["e_w"]``, the group's perturbation as one flat
      buffer (the optimizers' layout), kept in :meth:`state_dict` with
      whether the params are perturbed, nested with the base's state.
    * A base optimizer maximizing (``maximize=True`` in a group) is
      refused, at construction and by :meth:`perturb`: ``e`` ascends the
      loss, the worst nearby point of a minimization only. Negate the
      objective instead.
    * ASAM's ``e`` is the formula above, with no offset added to ``|p|``
      (Kwon et al.'s code scales by ``|p| + 0.01``): params at exactly 0,
      such as zero-initialised biases, are not perturbed.
    * Device params (a base optimizer on the ``cuda`` backend): the same
      semantics, ``e`` on the device (laid out as the base's state
      buffers), and :meth:`step` restores and steps in one pass (see the
      module's docstring); :meth:`perturb` waits for its norm.
    """

    # sam.lr = 0.5 set an attribute no step read (the base steps with its
    # groups' lr): refused, naming the groups, as on the optimizers
    lr = _InGroups("lr", "lr")
    learning_rate = _InGroups("learning_rate", "lr")

    def __init__(self, base_optimizer, rho=0.05, adaptive=False):
        if isinstance(base_optimizer, SAM):
            raise TypeError("SAM wraps a plain optimizer, not another SAM")
        if not isinstance(base_optimizer, Optimizer) or getattr(base_optimizer,
                                                                "steps_with_closure", False):
            raise TypeError("base_optimizer must be a fastopt optimizer stepped with "
                            f"gradients (SGD, AdamW, ...), got {type(base_optimizer).__name__}")
        if not base_optimizer.param_groups:
            raise ValueError("base_optimizer has no params yet: make it with its params "
                             "(or bind them) before wrapping it in SAM")
        for gi, group in enumerate(base_optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if np.dtype(p.dtype) not in V.FLOAT_DTYPES:
                    raise TypeError(f"SAM: param_groups[{gi}]['params'][{i}] is {p.dtype}; "
                                    "SAM perturbs the params in place and takes float32 or "
                                    "float64 params only (no mixed precision)")
        _refuse_maximize(base_optimizer.param_groups)
        self.base_optimizer = base_optimizer
        self.rho = V.check_real("rho", rho, low=0.0)
        self.adaptive = V.check_bool("adaptive", adaptive)
        self.perturbed = False       # the params are at p + e
        self.skipped_perturbs = 0    # perturbs skipped for non-finite gradients
        self.grad_norm = None        # the last perturb's norm (||g||, or || |p| g ||)
        self._skipped = False        # the last perturb was skipped: step is a plain step
        self._lock = threading.RLock()
        forks.register(self)
        self._layout_key = None
        self._build()

    # -- the base optimizer's view ------------------------------------------------
    @property
    def param_groups(self) -> list:
        return self.base_optimizer.param_groups

    @property
    def defaults(self) -> dict:
        return self.base_optimizer.defaults

    @property
    def iterations(self) -> int:
        return self.base_optimizer.iterations

    @property
    def last_lr(self):
        return self.base_optimizer.last_lr

    @property
    def backend(self) -> str:
        return self.base_optimizer.backend

    def lr_schedule(self, group: int = 0):
        return self.base_optimizer.lr_schedule(group)

    def zero_grad(self, grads=V.NOT_GIVEN) -> None:
        if grads is V.NOT_GIVEN:
            V.refuse_no_grads(type(self).__name__, "zero_grad")
        self.base_optimizer.zero_grad(grads)

    def param_state(self, param) -> dict:
        """The base optimizer's :meth:`~fastopt.Optimizer.param_state` (SAM's
        own perturbation is in ``state_dict()``)."""
        return self.base_optimizer.param_state(param)

    def state_nbytes(self) -> int:
        """The base optimizer's :meth:`~fastopt.Optimizer.state_nbytes` plus
        SAM's own perturbation buffers (one flat ``e_w`` per group, the
        params' size and dtype)."""
        return self.base_optimizer.state_nbytes() + sum(int(st["e_w"].nbytes)
                                                        for st in self.state)

    # -- layout: one table and one e buffer per group ------------------------------
    def _key(self):
        return tuple((id(g["params"]), len(g["params"])) for g in self.param_groups)

    @property
    def _on_device(self) -> bool:
        return self.base_optimizer._device

    def _build(self):
        """Per group: its e buffer, and on the host its table (params as
        1-D views, e offsets). Again after ``add_param_group`` on the base
        (not while perturbed)."""
        groups = self.param_groups
        sizes = [p.size for g in groups for p in g["params"]]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
        self._tables, self.state, self._e_runs, first = [], GroupStates(), [], 0
        base = self.base_optimizer
        for gi, group in enumerate(groups):
            params = group["params"]
            if self._on_device:     # laid out as the base's state: its runs' views
                buf, views = base._placement.state_buffer(
                    [r["flat"].size for r in base._run_info[gi]["runs"]], base._group_dtype(gi))
                self.state.append({"e_w": buf})
                self._e_runs.append(views)
                continue
            offsets = np.concatenate([[0], np.cumsum([p.size for p in params])[:-1]])
            e = state_zeros(sum(p.size for p in params), params[0].dtype)   # read with the state
            ts = group_tables(params, [p.reshape(-1) for p in params], [None] * len(params),
                              offsets.astype(np.int64))
            for t in ts:
                t.index_global = [first + k for k in t.index]
                t.state_addresses([e])      # grads must not overlap e either
            self._tables.append(ts)
            self.state.append({"e_w": e})
            first += len(params)
        self._all = [t for ts in self._tables for t in ts]
        if len(self._all) > 1:      # each table's grads must miss every group's params and e
            refuse_each_other(self._all, [st["e_w"] for st in self.state])
        self._layout_key = self._key()

    def _current_tables(self):
        if self._layout_key != self._key():
            if self.perturbed:
                raise RuntimeError("SAM: the base optimizer's param groups changed while "
                                   "the params are perturbed; call step(grads) first")
            self._build()
        return self._tables

    def _e_host(self, gi):
        """Group ``gi``'s e as one host array over its params in order (a copy)."""
        if self._on_device:
            return np.concatenate([v.copy_to_host() for v in self._e_runs[gi]])
        return self.state[gi]["e_w"].copy()

    def _e_load(self, gi, a):
        """Group ``gi``'s e from a host array laid out as :meth:`_e_host`'s."""
        if not self._on_device:
            self.state[gi]["e_w"][...] = a
            return
        base = self.base_optimizer
        buf, views = base._placement.state_buffer(
            [r["flat"].size for r in base._run_info[gi]["runs"]], base._group_dtype(gi), a)
        self.state[gi]["e_w"], self._e_runs[gi] = buf, views

    # -- gradients ------------------------------------------------------------------
    def _bind(self, grads):
        """Point every table at ``grads``, checked in full before anything is
        written (as the optimizers' step checks them)."""
        base = self.base_optimizer
        if isinstance(grads, FlatArrays):
            base.check_grads(grads)          # layout, dtype, aliasing (cached by identity)
            V.check_disjoint(self._e_named(), [("grads", grads.data)])
            for t in self._all:
                t.grads_from_flat(grads.data, [self._offsets[i] for i in t.index_global])
            return
        # a dict by the params' keys -> a list; strided grads -> C-ordered copies
        grads = base._grads_as_list(grads)
        if isinstance(grads, (list, tuple)) and any(g is None for g in grads):
            i = [g is None for g in grads].index(True)
            raise TypeError(
                f"{base._param_label(i).replace('params', 'grads', 1)} is None: SAM steps "
                "every param (its perturbation and its norm span them all), so a frozen "
                "layer cannot be skipped here: make the SAM over an optimizer of the "
                "layers it trains, or step the base optimizer alone while a layer is frozen")
        grads = base._readable_grads(grads)
        gather = getattr(get_backend(self.backend), "gather", None)
        if gather is not None and type(grads) in (list, tuple) and \
                len(grads) == len(self._offsets) - 1 and all(
                    gather(t, [grads[i] for i in t.index_global]) for t in self._all):
            return      # checked in compiled code: dtype, shape, contiguity, no overlap
        grads = V.as_array_list("grads", grads, by_name=base._names is not None)
        base.check_grads(grads)              # raises, naming the array
        V.check_disjoint(self._e_named(), [(f"grads[{i}]", g) for i, g in enumerate(grads)])
        for t in self._all:
            t.grads_from_arrays([grads[i].reshape(-1) for i in t.index_global])

    def _e_named(self):
        return [(f"SAM state 'e_w' of group {gi}", st["e_w"]) for gi, st in
                enumerate(self.state)]

    def _device_segments(self, grads):
        """The device grads checked as the base's step checks them (and
        against e): per group ``(run, p, g, lo, hi)``."""
        base = self.base_optimizer
        segments, flats = base._placement.checked_segments(base, grads)
        base._placement.backend.check_disjoint(
            self._e_named(), [(f"grads[{i}]", g) for i, g in enumerate(flats)])
        return segments, flats

    # -- the two halves of a step ------------------------------------------------------
    def perturb(self, grads) -> float:
        """Move the params to ``p + e`` from ``grads`` (the gradients at the
        current params, in their layout); returns the norm used (``||g||``,
        adaptive ``|| |p| g ||``), also ``self.grad_norm``.

        Non-finite gradients: nothing is written, a RuntimeWarning says so,
        and the next :meth:`step` is the base optimizer's plain step."""
        with self._lock:
            if self.perturbed:
                raise RuntimeError("SAM.perturb called twice: the params are already "
                                   "perturbed; compute the gradients there and call "
                                   "step(grads) first")
            self.base_optimizer._check_given()
            # (a group appended to or removed from param_groups: refused, as by step)
            self.base_optimizer._check_groups_unchanged()
            self.base_optimizer._check_held(self)
            _refuse_maximize(self.param_groups)
            self._current_tables()
            if self._on_device:
                return self._perturbed(self._perturb_device(grads))
            done = {}
            try:
                return self._perturbed(self._perturb_host(grads, done))
            except INTERRUPTS:
                # a Ctrl-C as a kernel returned: the perturbation completed
                # and perturbed set, or nothing written and nothing set. Not
                # on the NumPy backend (docs/training.md, "All or nothing"): it writes
                # array by array and counts after, so an interrupt between
                # the two could not be told from one before the writes
                if self.backend != "numpy":
                    held(self._settle_perturb, done)
                raise

    def _perturbed(self, total):
        """The flags after a perturbation pass of sum of squares ``total``;
        the norm."""
        self.grad_norm = math.sqrt(total)
        self._skipped = not math.isfinite(total)
        if self._skipped:
            self.skipped_perturbs += 1
            warnings.warn("SAM.perturb: the gradients' norm is not finite (they hold NaN "
                          "or inf, or float64 values past about 1e154); the params were "
                          "not perturbed, and the next step(grads) is the base "
                          "optimizer's plain step", RuntimeWarning, stacklevel=3)
        else:
            self.perturbed = True
        return self.grad_norm

    def _perturb_host(self, grads, done) -> float:
        """The host's passes; the sum of squares (non-finite: nothing written).
        ``done``: what an interrupted call completes from (the tables with
        their e and call counts before the first write, then the scale)."""
        self._bind(grads)
        ops = ops_for(self.backend)
        pairs = [(t, st["e_w"]) for ts, st in zip(self._tables, self.state) for t in ts]
        done.update(ops=ops, pairs=pairs, calls=[t.outcome[0] for t, _ in pairs])
        if len(pairs) == 1:          # the norm pass and the update in one call
            return ops.sam_fused(pairs[0][0], pairs[0][1], self.rho, self.adaptive)
        total = ordered_sum(ops.sam_sumsq(t, self.adaptive) for t, _ in pairs)
        if math.isfinite(total):
            done["total"], done["scale"] = total, sam_scale(self.rho, total)
            for t, e in pairs:
                ops.sam_perturb(t, e, done["scale"], self.adaptive)
        return total

    def _settle_perturb(self, done):
        """After an interrupt in :meth:`perturb`'s host passes: once one table
        was perturbed, the others perturbed too and the flags set as an
        uninterrupted call sets them; nothing when none was (each pass counts
        itself in its table's outcome). Idempotent (:func:`held`)."""
        pairs = done.get("pairs")
        if pairs is None:
            return                           # interrupted before the first kernel
        wrote = [t.outcome[0] != c for (t, _), c in zip(pairs, done["calls"])]
        if not any(wrote):
            return
        if len(pairs) == 1:
            total = pairs[0][0].outcome[1]   # the fused call's sum of squares
        else:
            total = done["total"]
            for (t, e), w in zip(pairs, wrote):
                if not w:
                    done["ops"].sam_perturb(t, e, done["scale"], self.adaptive)
        self.grad_norm, self._skipped, self.perturbed = math.sqrt(total), False, True

    def _perturb_device(self, grads) -> float:
        """The device's kernels: the norm pass, the scale (and whether to
        skip) decided on the device, a perturbation launch per run; then
        the sum of squares read back (waits for the GPU)."""
        segments, _ = self._device_segments(grads)
        be = self.base_optimizer._placement.backend
        ops = ops_for("cuda")
        segs = [(gi, seg) for gi, group in enumerate(segments) for seg in group]
        ctrl = be.norm_control([g for _, (_, _, g, _, _) in segs],
                               weights=[p for _, (_, p, _, _, _) in segs]
                               if self.adaptive else None)
        ops.sam_scale(ctrl, self.rho)
        for gi, (ri, p, g, lo, hi) in segs:
            ops.sam_perturb(p, g, span(self._e_runs[gi][ri], lo, hi), ctrl, self.adaptive)
        return ops.sam_result(ctrl)

    def step(self, grads=V.NOT_GIVEN):
        """Undo the perturbation (``p -= e``) and apply the base optimizer's
        step with ``grads``, the gradients computed at the perturbed point.
        Returns what the base step returns.

        ``grads`` and the base optimizer's hyperparameters (a bad value
        written into a param group, a schedule that fails) are checked
        before the params are restored: on such a refusal the params are
        still perturbed and :meth:`step` may be called again. Should a
        Ctrl-C come before the base step's kernels ran, then on the Cython
        and Numba backends with float state, where the restore is fused into
        the base step, nothing has changed either. Elsewhere (compact base
        state, the NumPy backend, device params) the params are restored
        first, and stay restored to the unperturbed point: call
        :meth:`perturb` again.

        On device params the restore is fused into the base step (its
        kernels read ``p - e``; a step the base skips for non-finite
        gradients still restores)."""
        if grads is V.NOT_GIVEN:
            V.refuse_no_grads(type(self).__name__, "step")
        with self._lock:
            if not self.perturbed and not self._skipped:
                raise RuntimeError("SAM.step called without perturb: call "
                                   "sam.perturb(grads) at the current params, compute the "
                                   "gradients at the perturbed point, then sam.step(grads) "
                                   "(a fastopt.nn model: net.loss_and_grad(X, y); "
                                   "sam.perturb(net.grads); net.train_step(sam, X, y), or "
                                   "fastopt.nn.training.fit, which does that)")
            if self.perturbed and self._on_device:
                return self._restore_and_step_on_device(grads)
            if self.perturbed:
                self._bind(grads)        # the checks, before the params are restored
                shifts = self._base_shifts()
                if shifts is not None:
                    return self._restore_in_base_step(grads, shifts)
                # a pass of its own, completed through an interrupt: the
                # params are restored and say so, or neither
                calls = [[t.outcome[0] for t in ts] for ts in self._tables]
                # what the base step would refuse (a bad hyperparameter, a
                # schedule that fails, a param made read-only), refused before
                # the params are restored: a retry finds them perturbed
                self.base_optimizer._next_step_options()
                self.base_optimizer._check_arrays_as_given(writes=True)   # (frozen since?)
                finished(self._restore_apart, calls)
            self.perturbed = self._skipped = False
            return self.base_optimizer.step(grads)

    def _restore_apart(self, calls):
        """``p -= e`` table by table, then not perturbed. Each restore counts
        itself in its table's ``outcome`` in the same native call, so a run
        after an interrupt (``calls``: the counts before the first) restores
        each table once."""
        ops = ops_for(self.backend)
        for ts, st, before in zip(self._tables, self.state, calls):
            for t, count in zip(ts, before):
                if t.outcome[0] == count:
                    ops.sam_restore(t, st["e_w"])
        self.perturbed = self._skipped = False

    def _base_shifts(self):
        """``[(table, e views)]`` over the base optimizer's step tables, each
        table's weights paired with their slices of ``e``; None where the
        base's step cannot read an offset (the NumPy reference, compact
        state): then the restore is a pass of its own."""
        base = self.base_optimizer
        if not getattr(base._backend, "compiled_tables", False) or base._state_format.compact:
            return None
        tables = base._tables or base._host_tables()
        key = (tables, tuple(st["e_w"] for st in self.state))
        cached = getattr(self, "_shift_cache", None)
        if cached is not None and cached[0][0] is key[0] and all(
                a is b for a, b in zip(cached[0][1], key[1])):
            return cached[1]
        shifts = []
        for ts, st, group in zip(tables, self.state, self.param_groups):
            starts = np.cumsum([0] + [p.size for p in group["params"]])
            e = st["e_w"]
            for t in ts:
                shifts.append((t, tuple(e[starts[k]:starts[k] + n]
                                        for k, n in zip(t.index, t.sizes))))
        self._shift_cache = (key, shifts)
        return shifts

    def _restore_in_base_step(self, grads, shifts):
        """The base step with ``e`` as its tables' offset: the kernels that
        apply it restore and step in one pass and clear it; what is still
        pending after a skipped step is restored here; a step that did
        nothing leaves SAM perturbed (:meth:`_settle_shifts`)."""
        base = self.base_optimizer
        with base._lock:
            calls = [t.outcome[0] for t, _ in shifts]
            iterations = base.iterations
            restored = set()
            try:
                for t, views in shifts:
                    t.set_shift(views)
                out = base.step(grads)
                # in the try: an interrupt as it starts is handled below
                self._settle_shifts(shifts, calls, iterations, restored)
            except BaseException:
                # a refused step, an interrupt anywhere above (a
                # set_shift not yet made too): SAM as before the step or as
                # after it, through any further interrupt
                held(self._settle_shifts, shifts, calls, iterations, restored)
                raise
            return out

    def _settle_shifts(self, shifts, calls, iterations, restored):
        """After the base step. Where it did nothing (refused, or
        interrupted before its kernels): the offsets cleared, the params
        still perturbed, and so flagged. Else (stepped, or skipped for
        non-finite gradients, counted either way): each table's offset
        applied by its kernel (its call count moved, not skipped), or
        ``w -= e`` here, once (``restored``: the weights done); then not
        perturbed."""
        if self.base_optimizer.iterations == iterations and all(
                t.outcome[0] == before for (t, _), before in zip(shifts, calls)):
            for t, _ in shifts:
                t.clear_shift()
            return
        for i, ((t, views), before) in enumerate(zip(shifts, calls)):
            if t.outcome[0] != before and not t.outcome[2]:
                t.clear_shift()                 # applied (cleared already, but where
                continue                        # the interrupt came first)
            for j, (w, e) in enumerate(zip(t.weights, views)):
                if (i, j) not in restored:      # one line (see _restore_apart)
                    w -= e; restored.add((i, j))  # noqa: E702
            t.clear_shift()
        self.perturbed = self._skipped = False

    def _restore_and_step_on_device(self, grads):
        base = self.base_optimizer
        with base._lock:
            base._check_groups_unchanged()
            segments, flats = self._device_segments(grads)   # refused: still perturbed
            base._next_step_options()      # a bad hyperparameter too, as on the host
            offsets = Offsets(self._e_runs)
            self.perturbed = self._skipped = False
            try:
                return base._placement.launch(base, segments, flats, offsets)
            except BaseException:
                if not offsets.used:     # refused before its kernels: restore here
                    ops = ops_for("cuda")
                    for info, views in zip(base._run_info, self._e_runs):
                        for run, e in zip(info["runs"], views):
                            ops.axpy(-1.0, e, run["flat"])
                raise

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"type": "SAM", "rho", "adaptive", "perturbed", "perturb_skipped",
        "skipped_perturbs", "e_w", "base"}``: ``e_w`` one flat array per
        group while perturbed (else None), ``base`` the base optimizer's
        :meth:`~fastopt.Optimizer.state_dict`. The params are not included
        (see :func:`fastopt.save`): a checkpoint taken between
        :meth:`perturb` and :meth:`step` holds the perturbed params, and the
        resumed :meth:`step` restores them. Taken under SAM's lock (and
        the base's), as its steps: one thread's checkpoint holds one step."""
        with self._lock, self.base_optimizer._lock:
            return {"type": "SAM", "rho": self.rho, "adaptive": self.adaptive,
                    "perturbed": self.perturbed, "perturb_skipped": self._skipped,
                    "skipped_perturbs": self.skipped_perturbs,
                    "e_w": ([self._e_host(gi) for gi in range(len(self.state))]
                            if self.perturbed else None),
                    "base": self.base_optimizer.state_dict()}

    def load_state_dict(self, state_dict) -> None:
        """Restore :meth:`state_dict` output, checked in full first (the
        base's part included): on a mismatch nothing changes."""
        with self._lock, self.base_optimizer._lock:
            prepared_load(self, state_dict)()

    def reset_state(self, groups=None) -> None:
        """The base optimizer's :meth:`~fastopt.optim.base.Optimizer.reset_state`;
        refused while perturbed (``perturb`` done, its ``step`` not)."""
        with self._lock, self.base_optimizer._lock:
            if self.perturbed:
                raise RuntimeError("SAM is perturbed (perturb done, its step not): step "
                                   "first (it restores the params), then reset_state")
            self.base_optimizer.reset_state(groups)

    def _prepare_load(self, sd):
        """Check ``sd``; return a function that applies it (what
        :func:`fastopt.load` calls)."""
        require_keys(sd, ("type", "rho", "adaptive", "perturbed", "perturb_skipped",
                          "skipped_perturbs", "e_w", "base"), "the SAM state_dict")
        if sd["type"] != "SAM":
            raise ValueError(f"checkpoint is for an optimizer of type {sd['type']}, not SAM")
        rho = V.check_real("checkpoint rho", sd["rho"], low=0.0)
        adaptive = V.check_bool("checkpoint adaptive", sd["adaptive"])
        perturbed = V.check_bool("checkpoint perturbed", sd["perturbed"])
        skipped = V.check_bool("checkpoint perturb_skipped", sd["perturb_skipped"])
        count = V.check_int("checkpoint skipped_perturbs", sd["skipped_perturbs"], low=0)
        if self._layout_key != self._key():
            self._build()
        e_w = sd["e_w"]
        # the base's groups in another order (its load reorders them): e's too
        order = self.base_optimizer._group_order(sd["base"])
        base_sd = self.base_optimizer._reordered(sd["base"], order)
        if order is not None and isinstance(e_w, list) and len(e_w) == len(order):
            e_w = [e_w[j] for j in order]
        if perturbed:
            if not isinstance(e_w, list) or len(e_w) != len(self.state):
                raise ValueError(f"checkpoint: e_w must list one array per param group "
                                 f"({len(self.state)}) when perturbed")
            base = self.base_optimizer
            for gi, a in enumerate(e_w):
                n = sum(p.size for p in self.param_groups[gi]["params"])
                require_array(a, (n,), base._group_dtype(gi), f"e_w[{gi}]")
        elif e_w is not None:
            raise ValueError("checkpoint: e_w must be None when not perturbed")
        apply_base = self.base_optimizer._prepare_load(sd["base"])
        if perturbed:        # the same names in another order: e's parts moved to this one
            e_w = [self.base_optimizer._in_param_order(gi, g["params"], a)
                   for gi, (g, a) in enumerate(zip(base_sd["param_groups"], e_w))]

        def apply():
            apply_base()
            for name, saved, mine in (("rho", rho, self.rho), ("adaptive", adaptive,
                                                                 self.adaptive)):
                if saved != mine:
                    warn_user(f"load_state_dict: the checkpoint's SAM {name}={saved!r} "
                              f"replaces this SAM's {mine!r}")
            self.rho, self.adaptive = rho, adaptive
            self.perturbed, self._skipped, self.skipped_perturbs = perturbed, skipped, count
            if perturbed:
                for gi, a in enumerate(e_w):
                    self._e_load(gi, a)
        return apply

    def __copy__(self):
        # shared base optimizer, separate perturbation: one copy's perturb
        # then went unrestored by the other's step
        raise TypeError("copy.copy of a SAM would share its base optimizer but not its "
                        "perturbation; use copy.deepcopy(sam) for an independent copy")

    def __getstate__(self):
        # tables hold raw addresses of this object's arrays: a copy rebuilds
        # its own, and its e buffers, from host copies of e
        state = self.__dict__.copy()
        state["_saved_e"] = [self._e_host(gi) for gi in range(len(self.state))]
        for name in ("_lock", "_tables", "_all", "state", "_e_runs", "_shift_cache"):
            state.pop(name, None)
        state["_layout_key"] = None
        return state

    def __setstate__(self, state):
        saved = state.pop("_saved_e")
        self.__dict__.update(state)
        self._lock = threading.RLock()
        forks.register(self)
        self._build()
        for gi, e in enumerate(saved):
            self._e_load(gi, e)

    def __repr__(self):
        return (f"SAM(rho={self.rho}, adaptive={self.adaptive}, "
                f"base_optimizer={self.base_optimizer!r})")
