"""Problem descriptors (what is computed) and argument bundles (on which tensors).

A descriptor is validated when it is made; arguments are validated against it by
:mod:`qlinear.validate` when a plan checks or runs them.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional

from .dtypes import DType, as_dtype
from .errors import InvalidProblem

__all__ = [
    "QuantizedLinearDescriptor",
    "DynamicRangeQuantizeDescriptor",
    "QuantizedLinearArgs",
    "DynamicRangeQuantizeArgs",
    "max_exact_k",
    "INT32_MAX",
]

INT32_MAX = 2**31 - 1
#: Largest |weight_q| value: int8 weights may hold -128.
_W_ABS_MAX = 128


def max_exact_k(q_min: int = -127, q_max: int = 127) -> int:
    """The largest K for which ``sum_k q*w`` cannot overflow int32:
    ``K * max(|q_min|, |q_max|) * 128 <= 2**31 - 1``."""
    return INT32_MAX // (max(-q_min, q_max) * _W_ABS_MAX)


def _size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidProblem(f"{name}: expected a non-negative integer, got {value!r}")
    if value < 0:
        raise InvalidProblem(f"{name}: expected a non-negative integer, got {value!r}")
    return int(value)


def _q_range(q_min, q_max) -> tuple[int, int]:
    for name, v in (("q_min", q_min), ("q_max", q_max)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise InvalidProblem(f"{name}: expected an integer in -128..127, got {v!r}")
        if not -128 <= v <= 127:
            raise InvalidProblem(f"{name}: expected an integer in -128..127 (int8), got {v!r}")
    if not q_min < 0 < q_max:
        raise InvalidProblem(
            f"q_min, q_max: expected q_min < 0 < q_max, got q_min={q_min!r}, q_max={q_max!r}")
    return int(q_min), int(q_max)


def _float_dtype(value) -> DType:
    d = as_dtype(value, name="dtype")
    if not d.is_float:
        raise InvalidProblem(f"dtype: expected a float type (f32, f16, bf16, f64), got {d.name}")
    return d


@dataclass(frozen=True)
class QuantizedLinearDescriptor:
    """A W8A8 linear problem: ``y[m, c_out] = dequant(quant(x[m, k]) @ weight_q[c_out, k].T) (+ bias)``.

    Args:
        m: rows of the activation (tokens).
        c_out: output channels (rows of ``weight_q``).
        k: input features.
        dtype: TIn, the type of activation, scales, bias and output (f32, f16, bf16, f64).
        q_min, q_max: activation quantization range, default -127..127; int8, q_min < 0 < q_max.
    """

    m: int
    c_out: int
    k: int
    dtype: Any
    q_min: int = -127
    q_max: int = 127

    def __post_init__(self):
        object.__setattr__(self, "m", _size("m", self.m))
        object.__setattr__(self, "c_out", _size("c_out", self.c_out))
        object.__setattr__(self, "k", _size("k", self.k))
        object.__setattr__(self, "dtype", _float_dtype(self.dtype))
        q_min, q_max = _q_range(self.q_min, self.q_max)
        object.__setattr__(self, "q_min", q_min)
        object.__setattr__(self, "q_max", q_max)
        limit = max_exact_k(q_min, q_max)
        if self.k > limit:
            raise InvalidProblem(
                f"k: expected at most {limit} so that the int32 accumulation is exact "
                f"(K * {max(-q_min, q_max)} * 128 < 2**31), got {self.k}")

    @property
    def activation_pass(self) -> "DynamicRangeQuantizeDescriptor":
        """The descriptor of this problem's activation pass alone."""
        return DynamicRangeQuantizeDescriptor(self.m, self.k, self.dtype, self.q_min, self.q_max)

    @property
    def ops(self) -> int:
        """Integer operations of the GEMM (2*M*K*C_out), for TOPS figures."""
        return 2 * self.m * self.k * self.c_out


@dataclass(frozen=True)
class DynamicRangeQuantizeDescriptor:
    """The activation pass alone: ``x[m, k]`` (TIn) -> ``q[m, k]`` (s8) and ``scale[m]`` (TIn)."""

    m: int
    k: int
    dtype: Any
    q_min: int = -127
    q_max: int = 127

    def __post_init__(self):
        object.__setattr__(self, "m", _size("m", self.m))
        object.__setattr__(self, "k", _size("k", self.k))
        object.__setattr__(self, "dtype", _float_dtype(self.dtype))
        q_min, q_max = _q_range(self.q_min, self.q_max)
        object.__setattr__(self, "q_min", q_min)
        object.__setattr__(self, "q_max", q_max)


@dataclass
class QuantizedLinearArgs:
    """The tensors of one linear run. Each is a backend tensor (or, on cpu, a numpy array).

    Shapes and dtypes (TIn = the descriptor's dtype):
        activation ``x[M, K]`` TIn; weight_q ``[C_out, K]`` s8; weight_scale ``[C_out]`` TIn;
        output ``y[M, C_out]`` TIn; act_q_scratch ``[M, K]`` s8; act_scale_scratch ``[M]`` TIn;
        bias ``[C_out]`` TIn or None.
    The scratches are caller-owned and reusable across runs; after a run they hold the
    quantized activation and its per-row scales.
    """

    activation: Any
    weight_q: Any
    weight_scale: Any
    output: Any
    act_q_scratch: Any
    act_scale_scratch: Any
    bias: Optional[Any] = None


@dataclass
class DynamicRangeQuantizeArgs:
    """The tensors of one activation pass: activation ``x[M, K]`` TIn, act_q ``[M, K]`` s8
    (output), act_scale ``[M]`` TIn (output)."""

    activation: Any
    act_q: Any
    act_scale: Any


