"""The cpu backend's activation passes, one per :class:`~qlinear.ActivationScheme`, and its
dequantization (step 5), in numpy: what both cpu engines run on small problems, and the
numpy engine always.

Each takes ``x[M, K]`` of TIn and returns ``(q, scale, zp)``: ``q[M, K]`` as the compute
type C (f32; f64 when TIn is f64) holding integers in ``q_min..q_max``, ``scale[M]`` of TIn
(the stored scale) and ``zp[M]`` int32 (zeros for the symmetric schemes). Every arithmetic
step is one correctly rounded C operation, so these are the exact statement of
DESIGN.md's rules ("Numerical contract", "Activation schemes"):

- dynamic (:func:`quantize_rows`): ``scale = amax / q_max`` stored in TIn (1 when that is
  0); ``q = clamp(rint(x / scale), q_min, q_max)``.
- static (:func:`quantize_static`): ``scale = s``; ``q = clamp(rint(x / s) + z, q_min, q_max)``.
- dynamic asymmetric (:func:`quantize_asym`): ``scale = (mx - mn) / (q_max - q_min)`` in TIn,
  ``zp = clamp(rint(q_min - mn / scale), q_min, q_max)``,
  ``q = clamp(rint(x / scale) + zp, q_min, q_max)``; constant rows and rows whose scale
  rounds to 0 or overflows take the dynamic rule with ``zp = 0``.
- every scheme: a row holding NaN or Inf gets ``scale`` NaN, ``q`` 0 and ``zp`` 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..dtypes import DType, f64
from ..schemes import ActivationScheme

__all__ = ["compute_type", "dynamic_rows", "quantize_rows", "quantize_static", "quantize_asym",
           "quantize", "dequantize"]


def compute_type(dtype: DType) -> np.dtype:
    """C: float64 for f64, float32 for the other TIn."""
    return np.dtype(np.float64) if dtype == f64 else np.dtype(np.float32)


def dynamic_rows(amax: np.ndarray, dtype: DType, q_min: int,
                 q_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, bool]:
    """The dynamic rule per row, from ``amax[M]`` (max|x| in the compute type C, NaN where a
    row holds NaN, Inf where it holds Inf): ``(scale, divisor, bad, clip)``.

    ``scale[M]`` of ``dtype`` is the stored scale (1 where it is 0, NaN where the row is
    not finite); ``divisor[M]`` in C is what x is divided by (1 in ``bad`` rows); ``bad``
    marks the rows whose q is 0 (None when there are none); ``clip`` says whether some
    ``rint(x / divisor)`` can round past the range. Every engine applies it to its own
    reductions, so the rule is written once. Callers hold
    ``np.errstate(invalid="ignore", over="ignore")`` (NaN and Inf rows are expected)."""
    ct = amax.dtype
    scale = (amax / ct.type(q_max)).astype(dtype.numpy)
    divisor = scale.astype(ct)
    bad = None
    # Rows whose stored scale is 0 (all-zero, or underflowed in TIn), NaN or Inf.
    if not (divisor.min() > 0 and divisor.max() < np.inf):
        bad = ~(np.isfinite(divisor) & (divisor != 0))
        scale[divisor == 0] = 1
        scale[~np.isfinite(divisor)] = np.nan
        divisor[bad] = 1
        amax = np.where(bad, ct.type(0), amax)
    # |x| <= amax, and division and rint are monotonic: clamping is needed only if some
    # row's amax / scale can round past the range.
    clip = bool((amax / divisor).max() >= min(q_max, -q_min) + 0.5)
    return scale, divisor, bad, clip


def quantize_rows(x: np.ndarray, dtype: DType, q_min: int,
                  q_max: int) -> tuple[np.ndarray, np.ndarray]:
    """The activation pass (steps 1-3) for ``x[M, K]`` of ``dtype``.

    Returns ``(q, scale)``: ``q[M, K]`` as the compute type holding integers in
    ``q_min..q_max`` and ``scale[M]`` of ``dtype`` (the stored scale)."""
    ct = compute_type(dtype)
    xc = x.astype(ct, copy=False)
    m, k = xc.shape
    if k == 0:
        return np.zeros((m, 0), ct), np.ones(m, dtype.numpy)
    # max(max, -min) is max|x| without an |x| temporary; NaN propagates through both.
    amax = np.maximum(xc.max(axis=1), -xc.min(axis=1))
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        scale, divisor, bad, clip = dynamic_rows(amax, dtype, q_min, q_max)
        q = xc / divisor[:, None]
        np.rint(q, out=q)
        if clip:
            np.clip(q, q_min, q_max, out=q)
        if bad is not None:
            q[bad] = 0
    return q, scale


def _row_extrema(xc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mn, mx, finite)`` per row; NaN and Inf show in the extrema (NaN propagates)."""
    mn, mx = xc.min(axis=1), xc.max(axis=1)
    return mn, mx, np.isfinite(mn) & np.isfinite(mx)


def _quantize_with(xc: np.ndarray, divisor: np.ndarray, zp: np.ndarray, q_min: int,
                   q_max: int, bad: np.ndarray) -> np.ndarray:
    """``clamp(rint(x / divisor) + zp, q_min, q_max)`` per row, 0 in ``bad`` rows.

    Clamping ``rint(x / d)`` to ``q_min - zp .. q_max - zp`` before adding ``zp`` is the same
    integer and keeps every float step exact (x / d may be huge or infinite)."""
    q = xc / divisor[:, None]
    np.rint(q, out=q)
    np.clip(q, (q_min - zp)[:, None], (q_max - zp)[:, None], out=q)
    q += zp[:, None]
    q[bad] = 0
    return q


def quantize_static(x: np.ndarray, dtype: DType, q_min: int, q_max: int, input_scale: float,
                    zero_point: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The static per-tensor pass: ``input_scale`` (already rounded to ``dtype``) for every
    row, ``zero_point`` added after rounding."""
    ct = compute_type(dtype)
    xc = x.astype(ct, copy=False)
    m, k = xc.shape
    scale = np.full(m, input_scale, dtype.numpy)
    zp = np.full(m, zero_point, np.int32)
    if k == 0:
        return np.zeros((m, 0), ct), scale, zp
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        bad = ~_row_extrema(xc)[2]
        divisor = np.full(m, input_scale, ct)
        scale[bad] = np.nan
        zp[bad] = 0
        q = _quantize_with(xc, divisor, zp.astype(ct), q_min, q_max, bad)
    return q, scale, zp


def quantize_asym(x: np.ndarray, dtype: DType, q_min: int,
                  q_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dynamic per-token asymmetric pass (vLLM's azp rule, see the module docstring)."""
    ct = compute_type(dtype)
    xc = x.astype(ct, copy=False)
    m, k = xc.shape
    if k == 0:
        return np.zeros((m, 0), ct), np.ones(m, dtype.numpy), np.zeros(m, np.int32)
    with np.errstate(invalid="ignore", over="ignore", under="ignore", divide="ignore"):
        mn, mx, finite = _row_extrema(xc)
        scale = ((mx - mn) / ct.type(q_max - q_min)).astype(dtype.numpy)
        sc = scale.astype(ct)
        asym = finite & (mx > mn) & (sc > 0) & (sc < np.inf)
        # The symmetric rule where the asymmetric scale does not exist or does not fit TIn.
        sym = (np.maximum(mx, -mn) / ct.type(q_max)).astype(dtype.numpy)
        sym[sym.astype(ct) == 0] = 1
        scale = np.where(asym, scale, sym)
        scale[~finite] = np.nan
        divisor = np.where(asym, sc, scale.astype(ct))
        divisor[~finite] = 1
        zpf = np.zeros(m, ct)
        zpf[asym] = np.clip(np.rint(ct.type(q_min) - mn[asym] / divisor[asym]), q_min, q_max)
        q = _quantize_with(xc, divisor, zpf, q_min, q_max, ~finite)
    return q, scale, zpf.astype(np.int32)


def quantize(x: np.ndarray, dtype: DType, q_min: int, q_max: int, scheme: ActivationScheme,
             input_scale: float | None = None,
             zero_point: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The activation pass of ``scheme``: ``(q, scale, zp)``, ``zp`` None for the symmetric
    schemes (whose zero point is 0)."""
    if scheme is ActivationScheme.DYNAMIC:
        return (*quantize_rows(x, dtype, q_min, q_max), None)
    if scheme is ActivationScheme.DYNAMIC_ASYM:
        return quantize_asym(x, dtype, q_min, q_max)
    assert input_scale is not None  # validation requires it for the static schemes
    q, scale, zp = quantize_static(x, dtype, q_min, q_max, input_scale, zero_point or 0)
    return q, scale, (zp if scheme.asymmetric else None)


def dequantize(acc: np.ndarray, scale: np.ndarray, weight_scale: np.ndarray,
               bias: np.ndarray | None, out: np.ndarray) -> None:
    """Step 5: ``out[M, N] = ((C(acc) * C(scale)) * C(weight_scale)) (+ C(bias))``, one rounding.

    ``acc`` may be overwritten; it holds exact integers (as float32 or float64)."""
    ct = np.dtype(np.float64) if out.dtype == np.float64 else np.dtype(np.float32)
    # acc -> C first (float64 -> f32 rounds to nearest even, as f32(int32) does), then * scale.
    y = np.multiply(acc, scale.astype(ct, copy=False)[:, None], dtype=ct,
                    out=acc if acc.dtype == ct else None)
    if bias is None:
        _store(np.multiply, y, weight_scale.astype(ct, copy=False), out)
    else:
        y *= weight_scale.astype(ct, copy=False)
        _store(np.add, y, bias.astype(ct, copy=False), out)


def _store(op: Callable[..., Any], y: np.ndarray, operand: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = op(y, operand)`` rounded once to out's type; no temporary when it is y's."""
    if out.dtype == y.dtype:
        op(y, operand, out=out)
    else:
        op(y, operand, out=y)
        out[...] = y
