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

The passes over the layers are in :mod:`.layers`, the input checks in
:mod:`.inputs`, the kernels' modules in :mod:`.backends`.

``backend="cuda"`` keeps the same layout on the GPU (:mod:`._cuda`: params,
grads and workspaces are device buffers, the same passes are CUDA kernels).
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict

import numpy as np

from .. import _validate as V
from ..backends import is_device_array, kernel_threads
from ..params import FlatArrays, flat_zeros
from ..schedules import Schedule
from .activations import DEFAULT_INIT, LOSSES, activation_id, parse_layers
from .backends import get_backend
from .inputs import BatchChecks
from .layers import LayerPasses


def _batch_size(batch_size):
    """The evaluation chunk, an int >= 1 (-1 made an empty loop: evaluate()
    returned a loss and accuracy of 0)."""
    return V.check_int("batch_size", batch_size, low=1)


def _seeds(seed, k):
    if seed is None or isinstance(seed, numbers.Integral) or (
            isinstance(seed, np.ndarray) and seed.ndim == 0):
        # None: fresh OS entropy, as np.random.default_rng(None) (it meant 0,
        # so "no seed" gave every run the same weights)
        base = (int(np.random.SeedSequence().generate_state(1)[0]) if seed is None
                else V.check_int("seed", seed, low=0))
        return [base + i for i in range(k)]
    if not hasattr(seed, "__iter__"):
        raise TypeError(f"seed must be an int >= 0 or a sequence of them, got "
                        f"{type(seed).__name__}")
    seeds = [V.check_int(f"seed[{i}]", s, low=0) for i, s in enumerate(seed)]
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


class Ensemble(BatchChecks, LayerPasses):
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
    seed : int, sequence of k ints, or None
        Model i is initialised from ``np.random.default_rng(seed + i)`` (or
        ``seed[i]``), so ``MLP(sizes, seed=seed + i)`` is the same model.
        None: a base seed drawn from the OS, different in every run.
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
        self.alpha = V.check_real("alpha", alpha)      # leaky_relu's slope
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
        #: better inside one BLAS call). Results agree to rounding, not bit for
        #: bit: a BLAS matmul on one thread blocks its sums differently from one
        #: on several (float32 gradients measured within 1e-8); each setting
        #: gives the same bits run after run.
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

    def train_step(self, opt, X, y, *, sync=True, max_grad_norm=None):
        """``loss_and_grad`` then ``opt.step(self.grads)``; returns the losses.

        ``max_grad_norm``: each model's gradients clipped by their own norm
        first (:meth:`clip_grads`), so that the models of a sweep train as
        each would alone (an optimizer's ``max_grad_norm`` is one norm over
        all its params: every model's, coupling them).

        On the device (backend "cuda") the optimizer's step is launched
        before the losses are read back, so the host waits once per step;
        with ``sync=False`` it does not wait at all and the K losses come as
        a device array (a workspace the next batch of the same size
        overwrites: copy it to keep it). Host backends ignore ``sync``."""
        self._check_optimizer(opt)
        if self._device:
            losses = self._device_loss_and_grad(X, y)
            if max_grad_norm is not None:
                self.clip_grads(max_grad_norm)
            opt.step(self.grads)
            return losses.copy_to_host().astype(np.float64) if sync else losses
        losses = self.loss_and_grad(X, y)
        if max_grad_norm is not None:
            self.clip_grads(max_grad_norm)
        self._step(opt)
        return losses

    def clip_grads(self, max_norm):
        """Scale each model's gradients in ``self.grads`` so that its own
        global norm is at most ``max_norm``, as
        :func:`fastopt.clip_by_global_norm` does for one model (torch's
        ``min(1, max_norm / (norm + 1e-6))``); returns the K norms before
        clipping (float64). On the device: one clip per model, the norms
        read back."""
        from ..clip import clip_by_global_norm

        max_norm = V.check_real("max_norm", max_norm, low=0.0, low_open=True)
        if self._device:
            models = [self._net.model_params(i, self.grads) for i in range(self.k)]
        else:       # each model's run of the flat buffer, contiguous (the compiled norm
            models = [[m] for m in self.grads.data.reshape(self.k, -1)]   # and scale)
        return np.array([float(clip_by_global_norm(m, max_norm)) for m in models])

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
        return self._predict_checked(*self._check_x(X), batch_size)

    def _predict_checked(self, X, shared, batch_size):
        batch_size = _batch_size(batch_size)
        B = tuple(X.shape)[-2]
        outs = []
        for s in range(0, B, batch_size):
            xb = X[s:s + batch_size] if shared else X[:, s:s + batch_size]
            outs.append(self._outputs(xb))
        out = np.concatenate(outs, axis=1)
        return out.argmax(axis=2) if self.loss == "cross_entropy" else out

    def accuracy(self, X, y, batch_size=1024):
        """Fraction of correct labels per model, ``[K]`` (cross-entropy
        models: an MSE model's outputs are not labels; its
        :meth:`evaluate` gives the loss)."""
        if self.loss != "cross_entropy":
            raise ValueError(f"accuracy counts correct labels, for cross_entropy models; "
                             f"this one's loss is {self.loss}: use evaluate() for its loss")
        X, shared = self._check_x(X)          # once, for the labels and the outputs
        y = _host(self._check_targets(y, X, shared))
        return (Ensemble._predict_checked(self, X, shared, batch_size) == y).mean(axis=-1)

    def evaluate(self, X, y, batch_size=1024):
        """Mean loss and accuracy per model on a held-out set: two ``[K]`` arrays
        (accuracy is NaN for MSE). Chunked forward passes, no gradients."""
        batch_size = _batch_size(batch_size)
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

    def model(self, i):
        """A standalone copy of model ``i`` as an :class:`MLP` (``-1``: the
        last)."""
        from .mlp import MLP
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"model index must be an int, got {type(i).__name__}")
        if not -self.k <= i < self.k:
            raise IndexError(f"model {i} of an ensemble of {self.k} models (0..{self.k - 1})")
        i = int(i) % self.k
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
