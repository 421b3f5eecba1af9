"""A slow, exact int64 statement of the numerical contract, for ``qlinear bench``'s check.

It shares no code with the backends. (The test suite carries its own oracle.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dtypes import DType, f64

__all__ = ["reference_linear"]


def reference_linear(x: Any, weight_q: Any, weight_scale: Any, bias: Any, dtype: DType,
                     q_min: int = -127,
                     q_max: int = 127) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y[M, N], q[M, K] int64, scale[M])`` for host arrays, exactly per DESIGN.md."""
    ct = np.float64 if dtype == f64 else np.float32
    xc = np.asarray(x).astype(ct)
    m, k = xc.shape
    amax = np.abs(xc).max(axis=1) if k else np.zeros(m, ct)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        scale = (amax / ct(q_max)).astype(dtype.numpy)
    finite = np.isfinite(amax)
    underflow = finite & (scale == 0)
    scale[underflow] = 1
    scale[~finite] = np.nan
    q = np.zeros((m, k), np.int64)
    good = finite & ~underflow
    with np.errstate(invalid="ignore", over="ignore"):
        q[good] = np.clip(np.rint(xc[good] / scale[good].astype(ct)[:, None]), q_min, q_max)
    # float64 BLAS is exact here: every product and partial sum is an integer below 2**53.
    acc = (q.astype(np.float64) @ np.asarray(weight_q).astype(np.float64).T).astype(np.int64)
    with np.errstate(invalid="ignore", over="ignore"):
        y = (acc.astype(ct) * scale.astype(ct)[:, None]) * np.asarray(weight_scale).astype(ct)
        if bias is not None:
            y = y + np.asarray(bias).astype(ct)
        y = y.astype(dtype.numpy)
    return y, q, scale
