"""Batch checks of the nn models: every input is checked before anything is
written, so on a bad batch the model, its gradients and the optimizer are
exactly as before the call."""

from __future__ import annotations

import math

import numpy as np

from ..backends import is_device_array


class BatchChecks:
    """The input checks :class:`~fastopt.nn.Ensemble` runs on ``X`` and ``y``
    (a mixin: it reads the model's sizes, loss, dtype and backend)."""

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
