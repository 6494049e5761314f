"""The layers' passes and their dispatch to the backend's kernels.

Per layer, forward is a matmul then one fused pass (bias add + activation);
backward is the loss kernel (softmax/MSE gradient and the last bias gradient
in one pass), then per layer a matmul for the weight gradient, a matmul for
the upstream gradient and one fused pass (activation derivative x upstream
gradient, bias gradient reduced in the same pass). The first layer can run
over the batch's non-zeros only (:mod:`._sparse`).

Workspaces (pre-activations, activations, upstream gradients, labels) are
allocated on the first batch of a given size and reused afterwards: a
training step allocates nothing. The K models of an ensemble run stacked
(each pass over all K) or one after another, optionally split over threads.
"""

from __future__ import annotations

import numpy as np

from . import _blas
from .backends import _pool


class LayerPasses:
    """Forward and backward over the workspaces of :class:`~fastopt.nn.Ensemble`
    (a mixin: it reads the model's layout, kernels and options)."""

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
