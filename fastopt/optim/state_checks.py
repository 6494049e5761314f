"""Checks of a checkpoint's parts, for the optimizers whose state is not the
base class's flat buffers (SAM, L-BFGS): each raises naming what is wrong,
before anything is applied."""

from __future__ import annotations

import numpy as np


def require_keys(d, keys, where) -> None:
    """``d`` is a dict holding every one of ``keys``."""
    if not isinstance(d, dict):
        raise TypeError(f"checkpoint: {where} must be a dict, got {type(d).__name__}")
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"checkpoint: {where} is missing keys {missing}")


def require_array(a, shape, dtype, what):
    """``a`` is an ndarray of ``shape`` and ``dtype``; returns it."""
    if not isinstance(a, np.ndarray) or a.shape != tuple(shape) or a.dtype != dtype:
        got = f"{a.dtype}{list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"checkpoint: {what} is {got}, expected {np.dtype(dtype)}"
                         f"{list(shape)}")
    return a
