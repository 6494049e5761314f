r"""L-BFGS with torch.optim.LBFGS's algorithm and semantics over fastopt params.

Nocedal & Wright, *Numerical Optimization* (2nd ed.), Algorithm 7.4 (the
two-loop recursion) and 7.5 (L-BFGS), with torch's choices: the initial
inverse Hessian :math:`H_0 = \frac{y^\top s}{y^\top y} I` from the newest
pair, a pair kept only when :math:`y^\top s > 10^{-10}`, a first step of
:math:`\min(1, 1/\lVert g \rVert_1)\,\mathrm{lr}`, then ``lr`` (or the strong
Wolfe line search of :mod:`fastopt.optim.line_search`), and the same
stopping tests, so that trajectories equal torch's.

The vectors are flat: the params as one vector in param order (a packed
group *is* that vector; other layouts are stepped run by run), the
gradients gathered into one. The two-loop recursion's dot products and
axpys are the fused kernels of :mod:`fastopt.backends.flat_ops` (an axpy
and the next dot product in one pass), and the history is a ring
(:class:`History`) that keeps a new pair without copying it.

On device params (the ``cuda`` backend) the vectors, the history and every
update live on the GPU (:mod:`fastopt.backends.flat_cuda`); each dot product
is read back by the host, which waits for it there: L-BFGS decides its next
move on the host from those numbers (the two-loop coefficients, the
curvature test, the step length and the stopping tests), so that wait is
inherent to the algorithm, a few per iteration (2 per stored pair, and
about 5 more).
"""

from __future__ import annotations

import importlib
import math
import warnings

import numpy as np

from .. import _validate as V
from ..backends import backend_for, get_backend
from ..backends.flat_ops import ops_for
from .base import NONNEG, Optimizer, _holds_none, refuse_options
from .line_search import Trial, strong_wolfe
from .named import KeyTree, is_tree
from .placement import placement_for
from .param_state import GroupStates
from .state_checks import require_array, require_keys

LINE_SEARCHES = (None, "strong_wolfe")
#: a curvature pair is kept only when y . s exceeds this (torch's constant)
CURVATURE_MIN = 1e-10


class History:
    """The newest ``m`` curvature pairs ``(s_i, y_i)`` with ``ro_i = 1 / (y_i . s_i)``.

    ``m + 1`` rows of ``S`` and of ``Y``, each a vector allocated on first
    use (``ops.empty``: host or device, :mod:`fastopt.backends.flat_ops`);
    ``rows`` lists the rows that hold pairs, oldest first. The one other
    row, ``spare``, holds the previous gradient (``Y[spare]``, torch's
    ``prev_flat_grad``) and the direction (``S[spare]``, ``d``): the next
    pair is formed there in place (``y = g - prev``, ``s = t d``), and
    keeping it only moves row numbers: the spare row joins the ring and
    the evicted oldest row (or an unused one) becomes the spare.
    """

    def __init__(self, m, n, dtype, ops=None):
        self.m, self.n, self.dtype = m, n, np.dtype(dtype)
        self.ops = ops_for("numpy") if ops is None else ops
        self.S, self.Y = [None] * (m + 1), [None] * (m + 1)   # rows made on first use
        self.rows, self.ro, self.spare = [], [], 0

    def __getstate__(self):
        # ops is a module: kept by name, so that a copy or a pickle of the
        # optimizer (its state holds this history) can be made
        return {**self.__dict__, "ops": self.ops.__name__}

    def __setstate__(self, state):
        self.__dict__.update(state, ops=importlib.import_module(state["ops"]))

    def _row(self, block, r):
        if block[r] is None:
            block[r] = self.ops.empty(self.n, self.dtype)
        return block[r]

    @property
    def prev_grad(self):
        return self._row(self.Y, self.spare)

    @property
    def direction(self):
        return self._row(self.S, self.spare)

    def __len__(self):
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows allocated so far."""
        return sum(int(v.nbytes) for v in (*self.S, *self.Y) if v is not None)

    def clear(self):
        self.rows, self.ro = [], []

    def keep(self, ro):
        """The pair formed in the spare row becomes the newest."""
        self.rows.append(self.spare)
        self.ro.append(ro)
        if len(self.rows) > self.m:
            self.spare = self.rows.pop(0)
            del self.ro[0]
        else:
            self.spare = min(set(range(self.m + 1)) - set(self.rows))

    def pairs(self):
        """``(s, y, ro)`` oldest first."""
        return [(self.S[r], self.Y[r], ro) for r, ro in zip(self.rows, self.ro)]

    def resized(self, m):
        """This history with room for ``m`` pairs: the newest ``m`` and the
        spare row's vectors, the same vectors (no copies)."""
        out = History(m, self.n, self.dtype, self.ops)
        kept = self.rows[len(self.rows) - min(len(self.rows), m):]
        k = len(kept)
        out.S[:k], out.Y[:k] = [self.S[r] for r in kept], [self.Y[r] for r in kept]
        out.S[k], out.Y[k] = self.S[self.spare], self.Y[self.spare]
        out.rows, out.ro, out.spare = list(range(k)), self.ro[len(self.ro) - k:], k
        return out

    @classmethod
    def of(cls, m, n, dtype, s, y, ro, prev_grad=None, direction=None, ops=None):
        """A history of size ``m`` holding the pairs ``s``/``y``/``ro`` (host
        arrays, oldest first; the newest ``m`` of them) and the spare row's
        vectors, copied to where ``ops`` keeps vectors."""
        out = cls(m, n, dtype, ops)
        k = min(len(ro), m)
        start = len(ro) - k
        put = out.ops.from_host
        out.S[:k] = [put(s[start + i]) for i in range(k)]
        out.Y[:k] = [put(y[start + i]) for i in range(k)]
        out.rows, out.ro, out.spare = list(range(k)), [float(r) for r in ro[start:]], k
        if prev_grad is not None:
            out.Y[k], out.S[k] = put(prev_grad), put(direction)
        return out


class LBFGS(Optimizer):
    r"""L-BFGS, stepped with a closure: ``opt.step(closure)``, where
    ``closure()`` evaluates the loss and its gradients at the current params
    and returns ``(loss, grads)`` (grads in the params' layout: a list, a
    dict by the params' keys, or a FlatArrays).

    One ``step`` runs up to ``max_iter`` iterations (``max_eval`` closure
    calls, default ``max_iter * 5 // 4``) and returns the first loss. Each
    iteration moves along :math:`d = -H g`, :math:`H` the inverse Hessian
    of the last ``history_size`` curvature pairs (two-loop recursion), by
    ``lr`` (the first iteration ever: :math:`\min(1, 1/\lVert g\rVert_1)\,
    \mathrm{lr}`) or, with ``line_search_fn="strong_wolfe"``, by a step that
    satisfies the strong Wolfe conditions. It stops at
    :math:`\max|g| \le` ``tolerance_grad``, or when the directional
    derivative, the step or the loss change falls below ``tolerance_change``.

    torch's semantics: one param group; the state (``state[0]``:
    ``func_evals``, ``n_iter``, ``d``, ``t``, ``H_diag``, ``prev_flat_grad``,
    ``prev_loss``, and the pairs, ``old_dirs`` (y), ``old_stps`` (s) and
    ``ro`` in :meth:`state_dict`) carries over from one ``step`` to the
    next. float32 or float64 params, host arrays or device arrays (the
    ``cuda`` backend: the vectors and the history on the GPU, each dot
    product read back by the host, see the module's docstring);
    full-batch (deterministic) closures are what it is for.

    An exception from the closure (or from its gradients' checks) stops the
    step: the params stay where the last completed move left them (a line
    search's trial point is undone), and the state is that of a step that
    ended there.
    """

    steps_with_closure = True     # SAM and the training loop tell it apart by this
    stop_reason = None   # why the last step stopped (see step()); None before the first
    _one_group = ("LBFGS takes one param group (torch's rule: its state is one vector "
                  "over every param)")
    _option_hints = {name: ("L-BFGS is stepped with a closure and keeps its history in the "
                            "params' dtype; it takes backend and its own options only")
                     for name in ("max_grad_norm", "skip_nonfinite", "loss_scaler",
                                  "state_dtype", "state_seed")}
    _hypers = dict(lr=NONNEG, tolerance_grad=NONNEG, tolerance_change=NONNEG)
    _state_names = ()

    def __init__(self, params=None, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7,
                 tolerance_change=1e-9, history_size=100, line_search_fn=None, *,
                 backend="auto", **unknown):
        if unknown:
            refuse_options(type(self), unknown)
        if max_eval is None:
            max_eval = V.check_int("max_iter", max_iter, low=1) * 5 // 4
        defaults = dict(lr=lr, max_iter=max_iter, max_eval=max_eval,
                        tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                        history_size=history_size, line_search_fn=line_search_fn)
        super().__init__(params, defaults, backend=backend)

    def _check_hypers(self, group, where=""):
        h = super()._check_hypers(group, where)
        for name in ("max_iter", "max_eval", "history_size"):
            h[name] = V.check_int(V.key(where, name), group[name], low=1)
        if group["line_search_fn"] not in LINE_SEARCHES:
            raise ValueError(f"{V.key(where, 'line_search_fn')} must be None or "
                             f"'strong_wolfe', got {group['line_search_fn']!r}")
        return h

    # -- params: one group of float32/float64 host arrays --------------------------
    def bind(self, params) -> None:
        params = V.listed(params)        # (a generator: read once)
        if self.param_groups and self._rebinds_same(params):
            return           # (not the history's reset below)
        specs = self._group_specs(params)
        if len(specs) != 1:
            raise ValueError(f"{self._one_group}, got {len(specs)}")
        given = specs[0]["params"]
        if is_tree(given):
            given = KeyTree.of(given, "params")[1]
        # the vectors have the params' dtype: float32 or float64, no 16-bit storage
        placement = placement_for(get_backend(backend_for(self._backend_name, params)))
        for i, a in enumerate(placement.group_arrays("params", given)[0]):
            if np.dtype(a.dtype) not in V.FLOAT_DTYPES:
                raise TypeError(f"params[{i}] must be float32 or float64, got {a.dtype}")
        super().bind(params)
        self._set_spans()
        self.state = GroupStates([self._new_lbfgs_state()])

    def _set_spans(self):
        """The params as one vector: each run a contiguous slice of it."""
        spans, lo = [], 0
        for run in self._run_info[0]["runs"]:
            spans.append((lo, lo + run["flat"].size, run["flat"]))
            lo += run["flat"].size
        self._spans, self._n = spans, lo

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.param_groups:
            # A copy holds each run's flat view as an array of its own: the
            # steps would write those, not the copy's params. Views of its own
            # params again (its state keeps nothing per run).
            self._build_runs()
            self._set_spans()
            self.state[0]["runs"] = [{} for _ in self._spans]

    def add_param_group(self, param_group) -> None:
        """L-BFGS steps one param group: the first params only (an
        optimizer made without them); another group is refused."""
        if self.param_groups:
            raise ValueError("LBFGS takes one param group; it cannot add another")
        super().add_param_group(param_group)

    def reset_state(self, groups=None) -> None:
        """Start afresh: the curvature pairs, the last direction and step
        size and the counts of iterations and function evaluations, as a new
        L-BFGS over the same params (the lr and ``iterations`` kept). L-BFGS
        steps one param group: ``groups`` is None or ``[0]``."""
        with self._lock:
            self._refuse_unbound("no state to reset")
            if not self._group_indexes(groups):     # ([]: none; the checks of any list)
                return
            fresh = self._new_lbfgs_state()
            self.state = GroupStates([fresh])       # (one assignment: whole or not at all)

    def _new_lbfgs_state(self):
        return {"step": 0, "runs": [{} for _ in self._spans], "flat": {},
                "func_evals": 0, "n_iter": 0, "t": None, "H_diag": 1.0, "prev_loss": None,
                "history": None}

    def _add(self, ops, t, d):
        """params += t d."""
        for lo, hi, run in self._spans:
            ops.axpy(t, d[lo:hi], run)

    def _params_copy(self, ops):
        x = ops.empty(self._n, self._group_dtype(0))
        for lo, hi, run in self._spans:
            ops.copy(run, x[lo:hi])
        return x

    def _set_params(self, ops, x):
        for lo, hi, run in self._spans:
            ops.copy(x[lo:hi], run)

    def _evaluate(self, closure):
        """``(loss, flat gradient)`` from the closure, checked: a new flat
        vector where the params are."""
        out = closure()
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError("LBFGS: closure() must return (loss, grads), the loss at the "
                            f"current params and its gradients; got {type(out).__name__}")
        loss, grads = out
        try:
            loss = float(np.asarray(loss, dtype=np.float64).reshape(()))
        except (TypeError, ValueError):
            raise TypeError("LBFGS: the loss closure() returned must be one real number, "
                            f"got {type(loss).__name__}") from None
        grads = self._one_pass(grads)
        if _holds_none(grads):      # (the other optimizers: a frozen layer's)
            raise TypeError("LBFGS: closure() returned a None gradient: L-BFGS steps every "
                            "param (one search direction over all of them), so it has no "
                            "frozen params; leave those out of its params")
        # shapes, dtypes, no overlap with the params; gathered into one vector
        # (a generator or grads.values(), as step() takes them, read once)
        return loss, self._placement.gather(self, grads)

    # -- the step -------------------------------------------------------------------
    def _history(self, st, m, ops):
        """The group's ring, made on first use (and again, keeping the
        newest pairs, if ``history_size`` was changed)."""
        hist = st["history"]
        if hist is None:
            hist = History(m, self._n, self._group_dtype(0), ops)
        elif hist.m != m:
            hist = hist.resized(m)
        st["history"] = hist
        return hist

    def step(self, closure):
        """One L-BFGS step (up to ``max_iter`` iterations); returns the loss
        of the first closure call (at the params as they were). Why it
        stopped is ``self.stop_reason``: ``"tolerance_grad"`` or
        ``"tolerance_change"`` (converged by that test), ``"max_iter"`` or
        ``"max_eval"`` (a limit: call ``step`` again to go on)."""
        if not callable(closure):
            raise TypeError("LBFGS.step needs a closure: closure() -> (loss, grads) at the "
                            "current params")
        with self._lock:
            self.stop_reason = None
            self._refuse_unbound("call bind(params) first")
            self._check_groups_unchanged()
            self._check_given()
            self._check_held()
            h = self._resolve(self._with_schedule(0, self.param_groups[0]), "param_groups[0]")
            ops = ops_for(self.backend)
            st = self.state[0]
            hist = self._history(st, h["history_size"], ops)
            loss, g = self._evaluate(closure)
            first_loss = loss
            st["func_evals"] += 1
            if not math.isfinite(loss):
                # (torch goes on as ever; a fit started at a NaN said nothing)
                warnings.warn(f"LBFGS: the loss at the params is {loss}: the step cannot "
                              "make progress from there (check the closure, or start "
                              "from other params)", RuntimeWarning, stacklevel=2)
            try:
                self.stop_reason = self._iterate(closure, h, ops, st, hist, loss, g)
            finally:
                self._finish_step(False, None, [h])
            return first_loss

    def _iterate(self, closure, h, ops, st, hist, loss, g) -> str:
        """The step's iterations from ``loss`` and ``g`` at the params; the
        name of the test or limit that stopped them."""
        lr, max_iter, max_eval = h["lr"], h["max_iter"], h["max_eval"]
        tol_change = h["tolerance_change"]
        g_sum, g_max = ops.abs_sum_max(g)
        if g_max <= h["tolerance_grad"]:
            return "tolerance_grad"
        evals, n_iter = 1, 0
        while n_iter < max_iter:
            n_iter += 1
            st["n_iter"] += 1
            # -- the direction: d = -H g -------------------------------------------------
            if st["n_iter"] == 1:
                hist.clear()
                st["H_diag"] = 1.0
                ops.negate(g, hist.direction)
            else:
                ys, yy = ops.pair_dots(st["t"], g, hist.prev_grad, hist.direction)
                if ys > CURVATURE_MIN:
                    hist.keep(1.0 / ys)
                    st["H_diag"] = ys / yy
                two_loop(ops, hist, g, st["H_diag"], hist.direction)
            d = hist.direction
            ops.copy(g, hist.prev_grad)
            st["prev_loss"] = prev_loss = loss
            # -- the step length ------------------------------------------------------------
            if st["n_iter"] == 1:
                t = min(1.0, 1.0 / g_sum if g_sum else float("inf")) * lr
            else:
                t = lr
            st["t"] = t
            gtd = ops.dot(g, d)
            if gtd > -tol_change:
                return "tolerance_change"     # (no descent left along d)
            d_max = ops.abs_sum_max(d)[1]
            if h["line_search_fn"] is not None:
                x0 = self._params_copy(ops)

                def trial(t):
                    self._add(ops, t, d)
                    try:
                        f, gt = self._evaluate(closure)
                    finally:
                        self._set_params(ops, x0)
                    return Trial(t, f, gt, ops.dot(gt, d))

                # the search's own interval tolerance stays at its default,
                # as torch's LBFGS calls it: tolerance_change is the outer
                # loop's (passing it on changed the trials taken)
                best, used = strong_wolfe(trial, t, Trial(0.0, loss, g, gtd), d_max,
                                          max_ls=max_eval - evals)
                st["t"] = t = best.t
                self._add(ops, t, d)
                loss, g = best.f, best.g
                g_sum, g_max = ops.abs_sum_max(g)
            else:
                self._add(ops, t, d)
                used = 0
                if n_iter != max_iter:   # the last iteration's loss is the next step's first
                    loss, g = self._evaluate(closure)
                    g_sum, g_max = ops.abs_sum_max(g)
                    used = 1
            evals += used
            st["func_evals"] += used
            # -- stopping tests: a converged step says so, limits or not (where
            # the new point was evaluated: else its loss and g are the last point's)
            if used and g_max <= h["tolerance_grad"]:
                return "tolerance_grad"
            if used and (d_max * abs(t) <= tol_change or abs(loss - prev_loss) < tol_change):
                return "tolerance_change"
            if n_iter == max_iter:
                return "max_iter"
            if evals >= max_eval:
                return "max_eval"
        return "max_iter"

    # -- checkpoints --------------------------------------------------------------------
    def state_nbytes(self) -> int:
        """Bytes of optimizer state allocated so far: the curvature pairs'
        vectors, the previous gradient and the direction (``history_size + 1``
        rows of two vectors of the params' size, each made on first use)."""
        hist = self.state[0]["history"] if self.state else None
        return 0 if hist is None else hist.nbytes

    def param_state(self, param) -> dict:
        """Refused: L-BFGS keeps one state over all params (torch keeps it
        under the first param), not one per param."""
        raise TypeError("L-BFGS keeps one state over all its params (its history of "
                        "(s, y) pairs over the params laid end to end), not one per "
                        "param: read it in state_dict()['lbfgs']")

    def _state_dict(self) -> dict:
        """The base optimizer's checkpoint (type, iterations, hyperparameters
        with the params' layout) plus ``"lbfgs"``: torch's state names, the
        pairs oldest first (``old_dirs``: y, ``old_stps``: s, each ``[k, n]``;
        ``ro``: ``[k]`` float64), vectors as copies."""
        sd = super()._state_dict()
        st = self.state[0]
        hist = st["history"]
        pairs = hist.pairs() if hist is not None else []
        started = st["n_iter"] > 0
        n, dtype = self._n, self._group_dtype(0)
        host = ops_for(self.backend).to_host      # copies
        sd["lbfgs"] = {
            "func_evals": st["func_evals"], "n_iter": st["n_iter"], "t": st["t"],
            "H_diag": st["H_diag"], "prev_loss": st["prev_loss"],
            "d": host(hist.direction) if started else None,
            "prev_flat_grad": host(hist.prev_grad) if started else None,
            "old_dirs": np.array([host(y) for _, y, _ in pairs], dtype).reshape(-1, n),
            "old_stps": np.array([host(s) for s, _, _ in pairs], dtype).reshape(-1, n),
            "ro": np.array([r for _, _, r in pairs], np.float64)}
        return sd

    def _prepare_load(self, sd):
        apply_base = super()._prepare_load(sd)
        require_keys(sd, ("lbfgs",), "the LBFGS state_dict")
        ls = sd["lbfgs"]
        require_keys(ls, ("func_evals", "n_iter", "t", "H_diag", "prev_loss", "d",
                          "prev_flat_grad", "old_dirs", "old_stps", "ro"), "lbfgs")
        evals = V.check_int("checkpoint lbfgs func_evals", ls["func_evals"], low=0)
        n_iter = V.check_int("checkpoint lbfgs n_iter", ls["n_iter"], low=0)
        n, dtype = self._n, self._group_dtype(0)

        def array(name, shape, want=dtype):
            return require_array(ls[name], shape, want, f"lbfgs {name}")

        ro = ls["ro"]
        k = ro.shape[0] if isinstance(ro, np.ndarray) and ro.ndim == 1 else -1
        ro = array("ro", (max(k, 0),), np.float64)
        s, y = array("old_stps", (k, n)), array("old_dirs", (k, n))
        started = n_iter > 0
        scalars = {}
        for name in ("t", "H_diag", "prev_loss"):
            value = ls[name]
            if started or name == "H_diag":
                value = V.check_real(f"checkpoint lbfgs {name}", value)
            elif value is not None:
                raise ValueError(f"checkpoint: lbfgs {name} must be None before the first "
                                 "iteration")
            scalars[name] = value
        if started:
            d, prev = array("d", (n,)), array("prev_flat_grad", (n,))
        elif ls["d"] is not None or ls["prev_flat_grad"] is not None or k:
            raise ValueError("checkpoint: lbfgs holds vectors but n_iter is 0")
        else:
            d = prev = None
        m = V.check_int("checkpoint history_size", sd["param_groups"][0]["history_size"],
                        low=1)
        if k > m:
            raise ValueError(f"checkpoint: lbfgs holds {k} pairs, more than its history_size "
                             f"{m}")
        # the same names in another order: each vector's parts moved to this one
        s, y, prev, d = (self._in_param_order(0, sd["param_groups"][0]["params"], a)
                         for a in (s, y, prev, d))
        hist = History.of(m, n, dtype, s, y, ro, prev, d, ops_for(self.backend))

        def apply():
            apply_base()
            st = self._new_lbfgs_state()
            st.update(func_evals=evals, n_iter=n_iter, history=hist, **scalars)
            st["step"] = self.state[0]["step"]
            self.state = GroupStates([st])
        return apply


def two_loop(ops, hist, g, h_diag, q):
    r"""``q = -H g`` by the two-loop recursion (N&W Algorithm 7.4), with
    :math:`H_0 = h_{diag} I`; each axpy is fused with the next dot product."""
    ops.negate(g, q)
    pairs = hist.pairs()
    k = len(pairs)
    alpha = [0.0] * k
    if k:
        c = ops.dot(pairs[-1][0], q)
    for i in range(k - 1, -1, -1):            # newest to oldest: alpha_i = ro_i s_i . q
        s, y, ro = pairs[i]
        alpha[i] = c * ro
        if i:
            c = ops.axpy_dot(-alpha[i], y, q, pairs[i - 1][0])
        else:
            ops.axpy(-alpha[i], y, q)
    if not k:
        ops.scale(h_diag, q)
        return
    c = ops.scale_dot(h_diag, q, pairs[0][1])
    for i in range(k):                        # oldest to newest: beta_i = ro_i y_i . r
        s, y, ro = pairs[i]
        step = alpha[i] - c * ro
        if i + 1 < k:
            c = ops.axpy_dot(step, s, q, pairs[i + 1][1])
        else:
            ops.axpy(step, s, q)
