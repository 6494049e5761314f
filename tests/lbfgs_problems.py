"""Test problems of L-BFGS: (loss, flat float64 gradient) of a flat vector.

Shared by tests/test_lbfgs.py (host, against torch) and
tests/cuda_sim/test_cuda_lbfgs.py (device, against the host).
"""

from __future__ import annotations

import numpy as np


def rosenbrock(x):
    x = x.astype(np.float64)
    a, b = x[:-1], x[1:]
    f = np.sum(100 * (b - a * a) ** 2 + (1 - a) ** 2)
    g = np.zeros_like(x)
    g[:-1] = -400 * a * (b - a * a) - 2 * (1 - a)
    g[1:] += 200 * (b - a * a)
    return float(f), g


def logistic_problem(n=200, d=12, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = (X @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n) > 0).astype(float)

    def loss(x):                       # x = [W (d), b (1)], with an L2 penalty on W
        x = x.astype(np.float64)
        w, b = x[:d], x[d]
        z = X @ w + b
        r = (1 / (1 + np.exp(-z)) - y) / n
        f = np.mean(np.logaddexp(0, z) - y * z) + 0.005 * np.sum(w * w)
        return float(f), np.concatenate([X.T @ r + 0.01 * w, [r.sum()]])
    return loss


def rosenbrock_start(n):
    x = np.full(n, -1.2)
    x[1::2] = 1.0
    return x
