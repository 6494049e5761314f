"""MLPs and batched ensembles of MLPs on one flat parameter buffer.

One class does the work for K models at once, :class:`Ensemble`; a single
:class:`MLP` is the K = 1 case with a 2-D interface. Layout:

* **Parameters** live in one :class:`~fastopt.params.FlatArrays` (``params``),
  model after model: model k's ``W0, b0, W1, b1, ...`` are one contiguous run
  of ``P`` elements at ``data[k * P:(k + 1) * P]``. The optimizer built on
  :meth:`Ensemble.param_groups` therefore steps the whole ensemble with one
  kernel call (shared hyperparameters) or one call per model (a learning rate
  and weight decay per model), never one per tensor.
* **Stacked views** ``weights[l]`` ``[K, n_in, n_out]`` and ``biases[l]``
  ``[K, n_out]`` look into the same buffer with a stride of ``P`` between
  models; the backward pass writes the gradient into the same layout in
  ``grads``.
* **Workspaces** (pre-activations, activations, upstream gradients, labels)
  are allocated on the first batch of a given size and reused afterwards:
  a training step allocates nothing.

Per layer, forward is a BLAS matmul then one fused pass (bias add +
activation); backward is the loss kernel (softmax/MSE gradient and the last
bias gradient in one pass), then per layer a BLAS matmul for the weight
gradient, a BLAS matmul for the upstream gradient and one fused pass
(activation derivative x upstream gradient, bias gradient reduced in the
same pass).

Every input is checked before anything is written: on a bad batch the model,
its gradients and the optimizer are exactly as before the call.

``backend="cuda"`` keeps the same layout on the GPU (:mod:`._cuda`: params,
grads and workspaces are device buffers, the same passes are CUDA kernels).
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict

import numpy as np

from .._registry import LazyModules
from ..backends import is_device_array, kernel_threads
from . import _blas
from ..params import FlatArrays, flat_zeros
from ..schedules import Schedule
from .activations import DEFAULT_INIT, LOSSES, activation_id, parse_layers

# backend="auto" preference, fastest first (fastopt.nn.bench): numba's np.dot
# goes through NumPy's OpenBLAS, a few % faster here than SciPy's behind
# cython_blas. The cython backend needs no JIT (no first-run compile).
_MODULES = {
    "numba": "fastopt.nn._numba",
    "cython": "fastopt.nn._cython_backend",
    "numpy": "fastopt.nn._ref",
}
_REGISTRY = LazyModules(_MODULES, "nn backend", {"reference": "numpy"})


_pools = {}


def _pool(n):
    """A process-wide pool of ``n`` worker threads, created on first use."""
    pool = _pools.get(n)
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor
        pool = _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="fastopt-nn")
    return pool


def available_backends() -> list:
    """nn backends that import here, in ``backend="auto"`` preference order."""
    return _REGISTRY.available()


def get_backend(name="auto"):
    if name == "cuda":
        return _cuda_backend()
    return _REGISTRY.get(name)


def _cuda_backend():
    """:mod:`fastopt.nn._cuda`, or a ValueError saying in one line why not.
    Asked for by name only: "auto" stays on the CPU backends, and
    :func:`available_backends` lists those (importing numba-cuda to probe
    for a GPU is not free)."""
    try:
        from . import _cuda
    except ImportError as exc:
        raise ValueError(f"nn backend 'cuda' is not available here: {exc}") from None
    return _cuda


def _seeds(seed, k):
    if seed is None or isinstance(seed, numbers.Integral):
        base = 0 if seed is None else int(seed)
        return [base + i for i in range(k)]
    seeds = [int(s) for s in seed]
    if len(seeds) != k:
        raise ValueError(f"seed has {len(seeds)} entries but the ensemble has {k} models")
    return seeds


def _per_model(name, value, k, low=0.0):
    """A scalar or a length-k sequence of non-negative finite reals (as floats)
    or :mod:`fastopt.schedules` schedules (passed through)."""
    if np.ndim(value) == 0:
        vals = [value] * k
    else:
        vals = list(np.asarray(value).reshape(-1)) if isinstance(value, np.ndarray) else list(value)
        if len(vals) != k:
            raise ValueError(f"{name} has {len(vals)} values but the ensemble has {k} models")
    out = []
    for i, v in enumerate(vals):
        if isinstance(v, Schedule):   # checked by the optimizer at each step
            out.append(v)
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name}[{i}] must be a real number, got {v!r}")
        v = float(v)
        if not math.isfinite(v) or v < low:
            raise ValueError(f"{name}[{i}] must be finite and >= {low}, got {v}")
        out.append(v)
    return out


def _host(a):
    """``a`` as a NumPy array (a device array is copied back)."""
    return a.copy_to_host() if is_device_array(a) else np.asarray(a)


class Ensemble:
    """K MLPs with the same layer sizes, trained together with batched matmuls.

    Parameters
    ----------
    k : int
        Number of models.
    sizes : sequence of int
        Layer widths including input and output, e.g. ``(784, 64, 10)``.
    activation : str
        Hidden activation: relu, leaky_relu, tanh, sigmoid, gelu, identity.
        The output layer is linear (the loss applies softmax).
    loss : {"cross_entropy", "mse"}
        Softmax cross-entropy on integer labels, or mean squared error on
        float targets ``[B, n_out]``. Both are means over the batch.
    init : {"auto", "he", "xavier"}
        He (normal, std sqrt(2/fan_in)) or Xavier/Glorot (uniform,
        +-sqrt(6/(fan_in + fan_out))); "auto" picks He for the ReLU family
        and gelu, Xavier for tanh/sigmoid. Biases start at zero.
    seed : int or sequence of k ints
        Model i is initialised from ``np.random.default_rng(seed + i)`` (or
        ``seed[i]``), so ``MLP(sizes, seed=seed + i)`` is the same model.
    dtype : float32 or float64
    backend : "auto", "cython", "numba", "numpy" or "cuda"
        Kernels for the fused passes (the reference "numpy" is the spec).
        "cuda" (:mod:`fastopt.nn._cuda`): params, grads, workspaces and the
        optimizer state on the GPU; ``params``/``grads`` are then
        :class:`fastopt.cuda.DeviceFlatArrays` with the CPU layout (the same
        seed gives the same initial weights), batches may be host or device
        arrays, a step reads back only the K losses, and the stacked host
        views ``weights``/``biases`` are None.
    alpha : float
        leaky_relu's negative slope.

    An optimizer built with ``max_grad_norm`` clips the global norm of
    everything it steps: over an ensemble, the joint norm of all K models'
    gradients (not each model's own), since clipping is one norm per step.
    """

    def __init__(self, k, sizes, activation="relu", loss="cross_entropy", *, init="auto",
                 seed=0, dtype=np.float32, backend="auto", alpha=0.01):
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k (number of models) must be an int >= 1, got {k!r}")
        sizes = parse_layers(sizes)
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least input and output widths, got {sizes}")
        self.k = int(k)
        self.sizes = sizes
        self.act = activation_id(activation)
        self.activation = activation
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
        self.loss = loss
        self.alpha = float(alpha)
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.dtype = dtype
        if init == "auto":
            init = DEFAULT_INIT[activation]
        if init not in ("he", "xavier"):
            raise ValueError(f"init must be 'auto', 'he' or 'xavier', got {init!r}")
        self.init = init
        self._device = backend == "cuda"
        self._kern = get_backend(backend)

        shapes = []
        for n_in, n_out in zip(sizes, sizes[1:]):
            shapes += [(n_in, n_out), (n_out,)]
        self.params = flat_zeros(shapes * self.k, dtype)
        self.n_per_model = self.params.data.size // self.k
        self.weights, self.biases = self._stacked(self.params)
        for i, s in enumerate(_seeds(seed, self.k)):
            rng = np.random.default_rng(s)
            for l, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
                if init == "he":
                    w = rng.standard_normal((n_in, n_out)) * math.sqrt(2.0 / n_in)
                else:
                    lim = math.sqrt(6.0 / (n_in + n_out))
                    w = rng.uniform(-lim, lim, (n_in, n_out))
                self.weights[l][i] = w
        if self._device:     # initialised on the host as on the CPU, then moved
            self._net = self._kern.DeviceNet(self, self.params)
            self.params, self.grads = self._net.params, self._net.grads
            self.weights = self.biases = None
        else:
            self.grads = self.params.zeros_like()
            self._gweights, self._gbiases = self._stacked(self.grads)
        self._ws = OrderedDict()
        self._opt_checked = None
        #: "auto", "model" (each model's forward+backward in turn) or "layer"
        #: (each layer for all K models in turn); the results are identical.
        self.order = "auto"
        #: Threads the K models are split over in model order, each running
        #: its models' matmuls on one BLAS thread (None: as many as
        #: :func:`fastopt.get_num_threads`). The default, 1, runs one model
        #: after another with BLAS's own threads: on the 2-core test machine
        #: that was faster (K=16 784-64-10, batch 128: 3.4 ms against 4.9 ms
        #: split over 2 threads; the small matmuls share the memory system
        #: better inside one BLAS call). Results are identical either way.
        self.threads = 1
        self.sparse_input = "auto"

    @property
    def sparse_input(self):
        """The first layer over the input's non-zeros only (:mod:`._sparse`):
        "auto" (the default: on the compiled backends, when a cost model of the
        batch's density, the layer's width and BLAS's thread count says it is
        faster; MNIST into 256 units on one thread is, on two it is not),
        True (always, on the compiled backends) or False (dense BLAS matmuls).

        Results agree with the dense path to rounding, with one difference:
        a zero input skips its weight row, so an inf/NaN weight that meets only
        zero inputs in a batch does not reach that batch's loss (a dense
        product gives NaN). Such a weight comes from an earlier step whose
        loss or gradients were already non-finite. The numpy reference is
        always dense. The index buffers take up to ~4x the batch's size per
        workspace while training."""
        return self._sparse_input

    @sparse_input.setter
    def sparse_input(self, mode):
        if isinstance(mode, (bool, np.bool_)):
            mode = bool(mode)
        elif not (isinstance(mode, str) and mode == "auto"):
            raise ValueError(f"sparse_input must be 'auto', True or False, got {mode!r}")
        self._sparse_input = mode

    # -- layout ---------------------------------------------------------------
    def _stacked(self, flat: FlatArrays):
        """Per layer, ``[K, n_in, n_out]`` and ``[K, n_out]`` views into ``flat``."""
        per = flat.data.reshape(self.k, self.n_per_model)
        ws, bs = [], []
        off = 0
        item = flat.data.itemsize
        for n_in, n_out in zip(self.sizes, self.sizes[1:]):
            w = np.lib.stride_tricks.as_strided(
                per[:, off:], (self.k, n_in, n_out), (per.strides[0], n_out * item, item))
            off += n_in * n_out
            b = per[:, off:off + n_out]
            off += n_out
            ws.append(w)
            bs.append(b)
        return ws, bs

    @property
    def backend(self) -> str:
        return self._kern.name

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    def param_groups(self, lr=None, weight_decay=None) -> list:
        """Param groups for a fastopt optimizer over this ensemble.

        ``lr`` may be a number or a :mod:`fastopt.schedules` schedule, or a
        sequence of K of them. With scalar (or omitted) ``lr`` and ``weight_decay``: one group
        holding every tensor, which the optimizer steps as one kernel call
        over the whole buffer. With a sequence of K values for either: one
        group per model (model k's tensors are one contiguous run, so one
        kernel call per model), each with its own ``lr``/``weight_decay``.
        """
        per_model = np.ndim(lr) > 0 or np.ndim(weight_decay) > 0
        if not per_model:
            # on the device the packed buffer itself: one launch per step
            g = {"params": self.params if self._device else list(self.params)}
            if lr is not None:
                g["lr"] = _per_model("lr", lr, 1)[0]
            if weight_decay is not None:
                g["weight_decay"] = _per_model("weight_decay", weight_decay, 1)[0]
            return [g]
        lrs = None if lr is None else _per_model("lr", lr, self.k)
        wds = None if weight_decay is None else _per_model("weight_decay", weight_decay, self.k)
        n = 2 * self.n_layers
        groups = []
        for i in range(self.k):
            g = {"params": (self._net.model_params(i) if self._device
                            else list(self.params[i * n:(i + 1) * n]))}
            if lrs is not None:
                g["lr"] = lrs[i]
            if wds is not None:
                g["weight_decay"] = wds[i]
            groups.append(g)
        return groups

    # -- input checks ------------------------------------------------------------
    def _check_x(self, X, name="X"):
        """X as ``[K, B, n_in]`` (a broadcast view when shared) plus whether
        shared. A device batch (backend "cuda") is checked for its shape,
        dtype and placement; its values stay unread (that would wait for
        the GPU)."""
        if self._device and is_device_array(X):
            X = self._kern.device_input(name, X, dtype=self.dtype)
            return X, self._check_x_shape(X.shape, name)
        if not isinstance(X, np.ndarray):
            X = np.asarray(X)
        if X.dtype.kind not in "fiu":
            raise TypeError(f"{name} must hold real numbers, got dtype {X.dtype}")
        shared = self._check_x_shape(X.shape, name)
        if X.dtype.kind == "f":
            # One fast pass: NaN/inf propagate to the sum of squares (a BLAS
            # dot, ~3x faster than np.sum here). A sum that overflows on
            # finite values is checked exactly before raising.
            with np.errstate(over="ignore", invalid="ignore"):
                if X.flags.c_contiguous and X.dtype in (np.float32, np.float64):
                    flat = X.reshape(-1)
                    total = float(np.dot(flat, flat))
                else:
                    total = float(np.add.reduce(X, axis=None))
            if not math.isfinite(total) and not np.isfinite(X).all():
                bad = int(np.count_nonzero(~np.isfinite(X)))
                raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")
        return X, shared

    def _check_x_shape(self, shape, name):
        """Whether a batch of this shape is shared by all models (2-D) or
        one per model (3-D); a ValueError naming what is wrong otherwise."""
        shape = tuple(shape)   # the CUDA simulator's shapes take no negative index
        n_in = self.sizes[0]
        if len(shape) == 2:
            shared = True
        elif len(shape) == 3:
            shared = False
            if shape[0] != self.k:
                raise ValueError(f"{name} has {shape[0]} per-model batches but the "
                                 f"ensemble has {self.k} models")
        else:
            raise ValueError(f"{name} must be [batch, {n_in}] or [k, batch, {n_in}], got "
                             f"shape {shape}")
        if shape[-1] != n_in:
            raise ValueError(f"{name} has {shape[-1]} features but the model expects "
                             f"{n_in} (layer sizes {self.sizes})")
        if shape[-2] == 0:
            raise ValueError(f"{name} is an empty batch (0 samples)")
        return shared

    def _check_targets(self, y, X, shared):
        """``y`` checked against the batch ``X``. Device labels/targets
        (backend "cuda") are checked for shape, dtype and placement only (an
        out-of-range label gives a NaN loss and NaN gradients instead)."""
        B = tuple(X.shape)[-2]
        device = self._device and is_device_array(y)
        if device:      # a numba view (zero copy): NumPy's dtype and shape
            y = self._kern.device_input("y", y)
        elif not isinstance(y, np.ndarray):
            y = np.asarray(y)
        want = (B,) if shared else (self.k, B)
        if self.loss == "cross_entropy":
            if y.dtype.kind not in "iu":
                raise TypeError(f"labels y must be integers (class indices), got dtype "
                                f"{y.dtype}")
            if y.shape != want and not (not shared and y.shape == (B,)):
                raise ValueError(f"labels y must have shape {want} to match X, got {y.shape}")
            if device:
                return y
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.sizes[-1]:
                raise ValueError(f"labels y must be in [0, {self.sizes[-1] - 1}], got values "
                                 f"in [{lo}, {hi}]")
        else:
            want = want + (self.sizes[-1],)
            if y.dtype.kind not in "fiu":
                raise TypeError(f"targets y must hold real numbers, got dtype {y.dtype}")
            if y.shape != want and not (not shared and y.shape == want[1:]):
                raise ValueError(f"targets y must have shape {want} to match X, got {y.shape}")
            if device:
                if y.dtype != self.dtype:
                    raise TypeError(f"targets y on the device must be {self.dtype} (the "
                                    f"model's dtype; device data is not converted), got "
                                    f"{y.dtype}")
                return y
            if y.dtype.kind == "f" and not np.isfinite(y).all():
                raise ValueError("targets y contain NaN or infinite values")
        return y

    # -- workspaces ------------------------------------------------------------
    def _workspace(self, B, shared, need_x):
        key = (B, shared, need_x)
        ws = self._ws.get(key)
        if ws is not None:
            self._ws.move_to_end(key)
            return ws
        K, dt = self.k, self.dtype
        Z = [np.empty((K, B, n), dt) for n in self.sizes[1:]]
        A = [np.empty_like(z) for z in Z[:-1]] + [Z[-1]]
        ws = {
            "Z": Z, "A": A,
            "D": [np.empty_like(z) for z in Z],
            "X": (np.empty((B, self.sizes[0]), dt) if shared else
                  np.empty((K, B, self.sizes[0]), dt)) if need_x else None,
            "y": (np.empty((K, B), np.int64) if self.loss == "cross_entropy" else
                  np.empty((K, B, self.sizes[-1]), dt)),
            "losses": np.empty(K, np.float64),
        }
        self._ws[key] = ws
        while len(self._ws) > 8:   # e.g. train + last partial batch + eval chunks
            self._ws.popitem(last=False)
        return ws

    def _prepare(self, X, checked=False, grad=False):
        """``(X3, shared, ws, sp)``: the batch as ``[K, B, n_in]`` in the
        model dtype, its workspace, and its sparse index (None: dense first
        layer), with the column index too when ``grad``."""
        X, shared = (X, X.ndim == 2) if checked else self._check_x(X)
        need_x = not (X.dtype == self.dtype and X.flags.c_contiguous)
        ws = self._workspace(X.shape[-2], shared, need_x)
        if need_x:
            np.copyto(ws["X"], X, casting="unsafe")
            X = ws["X"]
        X3 = np.broadcast_to(X, (self.k,) + X.shape) if shared else X
        return X3, shared, ws, self._sparse_index(X, shared, ws, grad)

    def _sparse_index(self, X, shared, ws, grad):
        """The non-zero index of the batch ``X`` (``[B, n]`` shared or
        ``[K, B, n]``) when the first layer should run sparse, else None."""
        mode = self._sparse_input
        if mode is False or self._kern.name == "numpy":
            return None
        from . import _sparse
        Xs = X.reshape((1,) + X.shape) if shared else X
        # the cost model's inputs but the density; models split over threads
        # run BLAS on one thread each
        split = self._model_major() and self._model_threads() > 1
        costs = (self.sizes[1], self.k if shared else 1, 1 if split else _blas.blas_threads())
        if mode == "auto":
            # some rows first: dense data (and a borderline density) pays a
            # few microseconds, not an indexing pass
            head = Xs[0, :32]
            if not _sparse.worth_it(np.count_nonzero(head) / head.size, *costs):
                return None
        sp = ws.get("sparse")
        if sp is None:
            sp = ws["sparse"] = _sparse.workspace(*Xs.shape, self.dtype, columns=grad)
        nnz = _sparse.index_rows(Xs, sp["val"], sp["idx"], sp["cnt"])
        if mode == "auto" and not _sparse.worth_it(nnz / Xs.size, *costs):
            return None
        if grad:
            if "cval" not in sp:
                _sparse.add_columns(sp)
            _sparse.index_cols(sp["val"], sp["idx"], sp["cnt"], sp["cval"], sp["crow"],
                               sp["cptr"])
        return sp

    @staticmethod
    def _sparse_slice(sp, k):
        """Model ``k``'s part of a sparse index (all of it when shared)."""
        if sp is None or sp["cnt"].shape[0] == 1:
            return sp
        return {name: a[k:k + 1] for name, a in sp.items()}

    # -- compute ------------------------------------------------------------------
    def _views(self, ws, k=None):
        """The arrays one pass works on: all K models stacked (``k=None``) or
        model ``k`` alone (``[1, ...]`` views), cached per workspace."""
        key = ("views", k)
        if key in ws:
            return ws[key]
        sl = slice(None) if k is None else slice(k, k + 1)
        v = {"W": [w[sl] for w in self.weights], "b": [b[sl] for b in self.biases],
             "gW": [g[sl] for g in self._gweights], "gb": [g[sl] for g in self._gbiases],
             "Z": [z[sl] for z in ws["Z"]], "A": [a[sl] for a in ws["A"]],
             "D": [d[sl] for d in ws["D"]], "y": ws["y"][sl], "losses": ws["losses"][sl]}
        ws[key] = v
        return v

    def _forward(self, X3, v, sp=None):
        kern, act, alpha = self._kern, self.act, self.alpha
        inp = X3
        last = self.n_layers - 1
        Z, A = v["Z"], v["A"]
        for l in range(self.n_layers):
            if l == 0 and sp is not None:
                from ._sparse import linear
                linear(sp["val"], sp["idx"], sp["cnt"], v["W"][0], Z[0])
            else:
                kern.linear(inp, v["W"][l], Z[l])
            kern.bias_act(Z[l], v["b"][l], A[l], 0 if l == last else act, alpha)
            inp = A[l]
        return Z[last]

    def _layer_ranges(self):
        """Per layer, its ``[lo, hi)`` element range within one model's run of
        the flat buffer (``W_l`` then ``b_l``, contiguous)."""
        ranges, off = [], 0
        for n_in, n_out in zip(self.sizes, self.sizes[1:]):
            ranges.append((off, off + n_in * n_out + n_out))
            off += n_in * n_out + n_out
        return ranges

    def _backward(self, X3, v, models, on_grads_ready=None, sp=None):
        kern, act, alpha = self._kern, self.act, self.alpha
        Z, A, D, gW, gb = v["Z"], v["A"], v["D"], v["gW"], v["gb"]
        if self.loss == "cross_entropy":
            kern.softmax_xent(Z[-1], v["y"], D[-1], gb[-1], v["losses"])
        else:
            kern.mse(Z[-1], v["y"], D[-1], gb[-1], v["losses"])
        ranges = self._layer_ranges() if on_grads_ready is not None else None
        for l in range(self.n_layers - 1, -1, -1):
            if l == 0 and sp is not None:
                from ._sparse import linear_grad_w
                linear_grad_w(sp["cval"], sp["crow"], sp["cptr"], D[0], gW[0])
            else:
                kern.linear_grad_w(A[l - 1] if l else X3, D[l], gW[l])
            if ranges is not None:
                # layer l's bias gradient came from the pass before this
                # matmul, so its W and b gradients are final here
                lo, hi = ranges[l]
                for k in models:
                    on_grads_ready(k * self.n_per_model + lo, k * self.n_per_model + hi)
            if l:
                kern.linear_grad_x(D[l], v["W"][l], D[l - 1])
                kern.act_grad(D[l - 1], Z[l - 1], A[l - 1], gb[l - 1], act, alpha)

    def _model_major(self):
        if self.order == "auto":
            # One model's activations, weights and Adam state fit in L2/L3:
            # finishing a model before the next keeps its input hot for the
            # weight gradient (measured faster at K=16 784-64-10 batch 128).
            return self.k > 1
        return self.order == "model"

    def loss_and_grad(self, X, y, *, on_grads_ready=None):
        """Forward + backward over one batch per model.

        ``X``: ``[B, n_in]`` (every model sees the same batch) or
        ``[K, B, n_in]`` (a batch per model); ``y``: labels ``[B]``/``[K, B]``
        (cross-entropy) or targets ``[B, n_out]``/``[K, B, n_out]`` (MSE).
        Writes the gradients into ``self.grads`` and returns the K mean
        losses (a view into a workspace, float64; copy it to keep it).

        ``on_grads_ready(lo, hi)``, if given, is called during the backward
        pass each time ``self.grads.data[lo:hi]`` (one layer of one model)
        holds its final value, last layer first; the rest of the backward
        pass is still to run, so work started there (e.g. a non-blocking
        allreduce of that slice) overlaps it. The callback must not write
        to the gradients of layers not yet reported.

        On the device (backend "cuda") the losses are a new host array (the
        one copy back per batch), and ``on_grads_ready`` is refused.
        """
        if self._device:
            return self._device_loss_and_grad(X, y, on_grads_ready).copy_to_host().astype(
                np.float64)
        X, shared = self._check_x(X)
        y = self._check_targets(y, X, shared)
        X3, shared, ws, sp = self._prepare(X, checked=True, grad=True)
        np.copyto(ws["y"], y, casting="unsafe")
        if self._model_major():
            n_threads = self._model_threads() if on_grads_ready is None else 1
            if n_threads > 1:
                self._models_in_parallel(X3, ws, n_threads, sp)
            else:
                self._models(X3, ws, range(self.k), on_grads_ready, sp)
        else:
            v = self._views(ws)
            self._forward(X3, v, sp)
            self._backward(X3, v, range(self.k), on_grads_ready, sp)
        return ws["losses"]

    def _device_loss_and_grad(self, X, y, on_grads_ready=None):
        """Checks, then launches forward and backward on the device; the K
        losses stay there (nothing waits for the GPU)."""
        if on_grads_ready is not None:
            raise NotImplementedError("on_grads_ready is not supported on backend 'cuda' (the "
                                      "gradients are final only when the GPU gets there)")
        X, shared = self._check_x(X)
        y = self._check_targets(y, X, shared)
        return self._net.loss_and_grad(X, shared, y)

    def _models(self, X3, ws, models, on_grads_ready=None, sp=None):
        for k in models:
            v = self._views(ws, k)
            spk = self._sparse_slice(sp, k)
            self._forward(X3[k:k + 1], v, spk)
            self._backward(X3[k:k + 1], v, (k,), on_grads_ready, spk)

    def _model_threads(self):
        if self.k < 2 or self._kern.name == "numpy":   # the reference stays simple
            return 1
        if self.threads is None:
            from .. import get_num_threads
            return min(self.k, get_num_threads())
        return min(self.k, self.threads)

    def _models_in_parallel(self, X3, ws, n_threads, sp=None):
        """Models split in contiguous runs over ``n_threads`` threads. Each
        model writes only its own workspace and gradient slices, and the
        kernels release the GIL (Numba ``nogil``, Cython ``with nogil``,
        BLAS), so the runs proceed side by side."""
        for k in range(self.k):      # build the per-model views up front, in one thread
            self._views(ws, k)
        runs = [range(self.k * i // n_threads, self.k * (i + 1) // n_threads)
                for i in range(n_threads)]
        pool = _pool(n_threads - 1)
        with _blas.single_threaded_blas():
            futures = [pool.submit(self._models, X3, ws, r, None, sp) for r in runs[1:]]
            try:
                self._models(X3, ws, runs[0], None, sp)   # this thread takes the first run
            finally:
                for f in futures:
                    f.result()

    def _check_optimizer(self, opt):
        if self._opt_checked is opt:
            return
        ps = [p for g in getattr(opt, "param_groups", ()) for p in g["params"]]
        if len(ps) != len(self.params) or not (
                self._net.owns(ps) if self._device else
                all(isinstance(p, np.ndarray) and np.shares_memory(p, self.params.data)
                    for p in ps)):
            raise ValueError("optimizer was not built on this model's params; use e.g. "
                             "fastopt.AdamW(model.param_groups(...))")
        self._opt_checked = opt

    def train_step(self, opt, X, y, *, sync=True):
        """``loss_and_grad`` then ``opt.step(self.grads)``; returns the losses.

        On the device (backend "cuda") the optimizer's step is launched
        before the losses are read back, so the host waits once per step;
        with ``sync=False`` it does not wait at all and the K losses come as
        a device array (a workspace the next batch of the same size
        overwrites: copy it to keep it). Host backends ignore ``sync``."""
        self._check_optimizer(opt)
        if self._device:
            losses = self._device_loss_and_grad(X, y)
            opt.step(self.grads)
            return losses.copy_to_host().astype(np.float64) if sync else losses
        losses = self.loss_and_grad(X, y)
        self._step(opt)
        return losses

    def _step(self, opt):
        if self._model_threads() > 1:
            opt.step(self.grads)      # BLAS ran on one thread: its pool is idle
            return
        # BLAS's idle workers keep spinning between matmuls; the optimizer
        # kernels' own second thread would share a core with them. On one
        # thread the step was faster at every size measured (784-256-256-10
        # batch 128: 1.16 vs 1.43 ms; 10M params: equal), docs/performance.md.
        with kernel_threads(1):
            opt.step(self.grads)

    def _outputs(self, X):
        if self._device:
            return self._net.forward(*self._check_x(X))
        X3, _, ws, sp = self._prepare(X)
        return self._forward(X3, self._views(ws), sp).copy()

    def forward(self, X):
        """Network outputs (logits for cross-entropy) ``[K, B, n_out]``, a new
        host array (on every backend)."""
        return self._outputs(X)

    def predict(self, X, batch_size=1024):
        """Predicted classes ``[K, B]`` (cross-entropy) or outputs (MSE)."""
        X, shared = self._check_x(X)
        B = tuple(X.shape)[-2]
        outs = []
        for s in range(0, B, batch_size):
            xb = X[s:s + batch_size] if shared else X[:, s:s + batch_size]
            outs.append(self._outputs(xb))
        out = np.concatenate(outs, axis=1)
        return out.argmax(axis=2) if self.loss == "cross_entropy" else out

    def accuracy(self, X, y, batch_size=1024):
        """Fraction of correct labels per model, ``[K]``."""
        pred = Ensemble.predict(self, X, batch_size)
        return (pred == _host(y)).mean(axis=-1)

    def evaluate(self, X, y, batch_size=1024):
        """Mean loss and accuracy per model on a held-out set: two ``[K]`` arrays
        (accuracy is NaN for MSE). Chunked forward passes, no gradients."""
        X, shared = self._check_x(X)
        y = _host(self._check_targets(y, X, shared))
        B = tuple(X.shape)[-2]
        loss = np.zeros(self.k)
        correct = np.zeros(self.k)
        for s in range(0, B, batch_size):
            xb = X[s:s + batch_size] if shared else X[:, s:s + batch_size]
            yb = y[..., s:s + batch_size] if self.loss == "cross_entropy" else (
                y[s:s + batch_size] if y.ndim == 2 else y[:, s:s + batch_size])
            z = self._outputs(xb).astype(np.float64)
            if self.loss == "cross_entropy":
                yb = np.broadcast_to(yb, z.shape[:2])
                m = z.max(axis=2, keepdims=True)
                lse = (m + np.log(np.exp(z - m).sum(axis=2, keepdims=True)))[..., 0]
                loss += (lse - np.take_along_axis(z, yb[..., None], 2)[..., 0]).sum(axis=1)
                correct += (z.argmax(axis=2) == yb).sum(axis=1)
            else:
                loss += ((z - yb) ** 2).mean(axis=2).sum(axis=1)
        acc = correct / B if self.loss == "cross_entropy" else np.full(self.k, np.nan)
        return loss / B, acc

    def model(self, i) -> "MLP":
        """A standalone copy of model ``i`` as an :class:`MLP`."""
        m = MLP(self.sizes, self.activation, self.loss, init=self.init, dtype=self.dtype,
                backend=self.backend, alpha=self.alpha)
        n = self.n_per_model
        if self._device:
            m.params.data.copy_to_device(self.params.data[i * n:(i + 1) * n])
        else:
            m.params.data[:] = self.params.data[i * n:(i + 1) * n]
        return m

    def __repr__(self):
        return (f"{type(self).__name__}(k={self.k}, sizes={self.sizes}, "
                f"activation={self.activation!r}, loss={self.loss!r}, dtype={self.dtype}, "
                f"backend={self.backend!r})")


class MLP(Ensemble):
    """A single MLP: the K = 1 :class:`Ensemble` with a 2-D interface.

    >>> net = MLP((784, 256, 256, 10), "relu", seed=0)
    >>> opt = fastopt.AdamW(net.param_groups(), lr=1e-3)
    >>> loss = net.train_step(opt, X_batch, y_batch)    # one fused AdamW call

    ``params`` (one flat buffer), ``grads`` (same layout), ``W[l]`` and
    ``b[l]`` (2-D and 1-D views of the layer's weights and bias).
    """

    def __init__(self, sizes, activation="relu", loss="cross_entropy", *, init="auto",
                 seed=0, dtype=np.float32, backend="auto", alpha=0.01):
        super().__init__(1, sizes, activation, loss, init=init, seed=[int(seed)],
                         dtype=dtype, backend=backend, alpha=alpha)

    @property
    def W(self):
        """The weights ``[n_in, n_out]`` per layer (device views on "cuda")."""
        return list(self.params[0::2]) if self._device else [w[0] for w in self.weights]

    @property
    def b(self):
        return list(self.params[1::2]) if self._device else [b[0] for b in self.biases]

    def _check_x(self, X, name="X"):
        if not (self._device and is_device_array(X)):
            X = X if isinstance(X, np.ndarray) else np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"{name} must be [batch, {self.sizes[0]}], got shape {X.shape}")
        return super()._check_x(X, name)

    def loss_and_grad(self, X, y, *, on_grads_ready=None):
        """Mean loss (float) of one batch; gradients into ``self.grads``
        (``on_grads_ready``: see :meth:`Ensemble.loss_and_grad`)."""
        return float(super().loss_and_grad(X, y, on_grads_ready=on_grads_ready)[0])

    def train_step(self, opt, X, y, *, sync=True):
        """``loss_and_grad`` then ``opt.step(self.grads)``; returns the loss
        (a float; with ``sync=False`` on backend "cuda", a one-element device
        array: see :meth:`Ensemble.train_step`)."""
        loss = super().train_step(opt, X, y, sync=sync)
        return loss if isinstance(loss, float) or not sync else float(loss[0])

    def forward(self, X):
        return super().forward(X)[0]

    def predict(self, X, batch_size=1024):
        return super().predict(X, batch_size)[0]

    def accuracy(self, X, y, batch_size=1024):
        return float(super().accuracy(X, y, batch_size)[0])
