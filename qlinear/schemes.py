"""Activation quantization schemes: how the activation pass turns ``x[M, K]`` into int8.

The default, **dynamic per-token symmetric**, is the numerical contract's steps 1-3.
The other schemes are the ones vLLM's int8 path runs and compressed-tensors checkpoints
store (DESIGN.md, "Activation schemes"); C is f32 (f64 when TIn is f64), every operation
one correctly rounded C operation, rint rounds half to even:

- ``STATIC`` / ``STATIC_ASYM`` (per tensor): the caller gives ``input_scale`` ``s``
  (stored rounded to TIn) and, for ``STATIC_ASYM``, an integer zero point ``z``.
  ``scale[m] = s``; ``q = clamp(rint(x / s) + z, q_min, q_max)``; ``zp[m] = z``.
- ``DYNAMIC_ASYM`` (per token, vLLM's azp formula): ``mn``, ``mx`` = row min and max;
  if ``mx > mn``: ``scale = TIn((mx - mn) / (q_max - q_min))`` and, if that is > 0 and
  finite, ``zp = clamp(rint(q_min - mn / scale), q_min, q_max)``,
  ``q = clamp(rint(x / scale) + zp, q_min, q_max)``. Otherwise (a constant row, or a scale
  that rounds to 0 or overflows) the row is quantized by the symmetric rule with ``zp = 0``.
- In every scheme a row holding NaN or Inf gets scale NaN, q 0 and zp 0.

With a zero point the GEMM's epilogue subtracts ``zp[m] * weight_colsum[n]`` from the int32
accumulator before dequantizing (``weight_colsum[n] = sum_k weight_q[n, k]``, see
:func:`weight_colsum`); the K bound is then ``K * (q_max - q_min) * 128 < 2**31``.
"""

from __future__ import annotations

import enum
import math
import numbers
from typing import Any

import numpy as np

from .dtypes import DType, bf16
from .errors import InvalidProblem

__all__ = ["ActivationScheme", "weight_colsum", "as_scheme", "check_input_scale"]


class ActivationScheme(str, enum.Enum):
    """How activations are quantized (a ``str``: ``"dynamic"`` and the member compare equal)."""

    #: Per-token symmetric: ``scale[m] = max|x[m]| / q_max`` (the default).
    DYNAMIC = "dynamic"
    #: Per-tensor with a given ``input_scale``, zero point 0.
    STATIC = "static"
    #: Per-tensor with a given ``input_scale`` and ``input_zero_point``.
    STATIC_ASYM = "static_asym"
    #: Per-token asymmetric: per-row scale and zero point from the row's min and max.
    DYNAMIC_ASYM = "dynamic_asym"

    @property
    def dynamic(self) -> bool:
        """Whether scales come from the data (per token) rather than from the caller."""
        return self in (ActivationScheme.DYNAMIC, ActivationScheme.DYNAMIC_ASYM)

    @property
    def static(self) -> bool:
        """Whether the caller gives the scale (``input_scale``)."""
        return not self.dynamic

    @property
    def asymmetric(self) -> bool:
        """Whether rows carry a zero point: the run writes a zero-point scratch and the
        epilogue needs the weight's column sums."""
        return self in (ActivationScheme.STATIC_ASYM, ActivationScheme.DYNAMIC_ASYM)

    @property
    def static_zero_point(self) -> bool:
        """Whether the caller gives the zero point (``input_zero_point``): ``STATIC_ASYM``."""
        return self is ActivationScheme.STATIC_ASYM

    @property
    def default_q_min(self) -> int:
        """-127 for the symmetric schemes (-128 never appears), -128 for the asymmetric ones."""
        return -128 if self.asymmetric else -127

    def __str__(self) -> str:
        return self.value


def as_scheme(value: Any, name: str = "scheme") -> ActivationScheme:
    """``value`` (an :class:`ActivationScheme` or its string) as an :class:`ActivationScheme`;
    :class:`InvalidProblem` naming ``name`` otherwise."""
    if isinstance(value, ActivationScheme):
        return value
    if isinstance(value, str):
        try:
            return ActivationScheme(value)
        except ValueError:
            pass
    names = ", ".join(repr(s.value) for s in ActivationScheme)
    raise InvalidProblem(f"{name}: expected one of {names}, got {value!r}")


def check_input_scale(value: Any, dtype: DType, name: str = "input_scale") -> float:
    """A static scheme's ``input_scale`` as the Python float of its TIn-rounded value.

    ``value``: a real number (a Python or numpy scalar, or an array of one element, as
    checkpoints store it) that is finite and > 0 and stays so once rounded to ``dtype``.
    Raises :class:`InvalidProblem` naming ``name``."""
    v = value
    if isinstance(v, (np.ndarray, np.generic)) and v.size == 1 and (
            v.dtype.kind in "fiu" or v.dtype == bf16.numpy):
        v = float(v.reshape(()))
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise InvalidProblem(f"{name}: expected a finite real number > 0, got {value!r}")
    f = float(v)
    if not (math.isfinite(f) and f > 0):
        raise InvalidProblem(f"{name}: expected a finite real number > 0, got {value!r}")
    with np.errstate(over="ignore", under="ignore"):
        stored = float(np.array(f, dtype.numpy))
    if not (math.isfinite(stored) and stored > 0):
        raise InvalidProblem(
            f"{name}: expected a value that stays finite and > 0 in {dtype.name}, got {value!r} "
            f"(it rounds to {stored!r})")
    return stored


def weight_colsum(weight_q: Any) -> np.ndarray:
    """``sum_k weight_q[n, k]`` as int32 ``[C_out]``: what an asymmetric scheme's epilogue
    subtracts (times the row's zero point). Computed once when a layer is built.

    ``weight_q``: an int8 array ``[C_out, K]``; :class:`InvalidProblem` otherwise."""
    w = np.asarray(weight_q)
    if w.dtype != np.int8 or w.ndim != 2:
        raise InvalidProblem(
            f"weight_q: expected a 2-D int8 array [C_out, K], got a {w.ndim}-D {w.dtype} array")
    # |sum| <= K * 128 fits int32 for any K the plans accept; int64 first so nothing wraps.
    return w.sum(axis=1, dtype=np.int64).astype(np.int32)
