"""A single MLP: the K = 1 ensemble with a 2-D interface."""

from __future__ import annotations

import numpy as np

from ..backends import is_device_array
from .ensemble import Ensemble


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
        super().__init__(1, sizes, activation, loss, init=init, seed=seed,
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

    def train_step(self, opt, X, y, *, sync=True, max_grad_norm=None):
        """``loss_and_grad`` then ``opt.step(self.grads)``; returns the loss
        (a float; with ``sync=False`` on backend "cuda", a one-element device
        array: see :meth:`Ensemble.train_step`, also for ``max_grad_norm``)."""
        loss = super().train_step(opt, X, y, sync=sync, max_grad_norm=max_grad_norm)
        return loss if isinstance(loss, float) or not sync else float(loss[0])

    def forward(self, X):
        return super().forward(X)[0]

    def predict(self, X, batch_size=1024):
        return super().predict(X, batch_size)[0]

    def accuracy(self, X, y, batch_size=1024):
        return float(super().accuracy(X, y, batch_size)[0])

    def evaluate(self, X, y, batch_size=1024):
        """Mean loss and accuracy on a held-out set, as floats (accuracy NaN
        for MSE), as :meth:`accuracy` and :meth:`train_step` return theirs."""
        loss, acc = super().evaluate(X, y, batch_size)
        return float(loss[0]), float(acc[0])
