"""Non-negative least squares for the handful of coefficients the cost model fits.

``min ||A x - y||  subject to  x >= 0``. With at most a few columns, the exact solution is found by
trying every support (subset of columns that may be non-zero): the constrained optimum is the
unconstrained least-squares solution on its support, so the best feasible one over all supports
is the answer. Columns are scaled to unit magnitude first (token counts and token-pair counts
differ by nine orders of magnitude).
"""

from __future__ import annotations

import itertools

import numpy as np

MAX_COLUMNS = 8


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != y.shape[0]:
        raise ValueError(f"shape mismatch: A {a.shape}, y {y.shape}")
    k = a.shape[1]
    if k > MAX_COLUMNS:
        raise ValueError(f"at most {MAX_COLUMNS} columns, got {k}")
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    scaled = a / scale
    best_x, best_residual = np.zeros(k), float(np.sum(y * y))
    for support in itertools.product((False, True), repeat=k):
        cols = [i for i in range(k) if support[i]]
        if not cols:
            continue
        sol, *_ = np.linalg.lstsq(scaled[:, cols], y, rcond=None)
        if (sol < 0).any():
            continue
        x = np.zeros(k)
        x[cols] = sol
        residual = float(np.sum((scaled @ x - y) ** 2))
        if residual < best_residual - 1e-15 * max(1.0, best_residual):
            best_x, best_residual = x, residual
    return best_x / scale
