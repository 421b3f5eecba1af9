"""Element types: f32, f16, bf16, f64 (activations, scales, outputs), s8 (quantized values)
and s32 (per-row zero points and weight column sums of the asymmetric schemes).

bf16 on the host is ``ml_dtypes.bfloat16``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import ml_dtypes
import numpy as np

from .errors import InvalidProblem

__all__ = ["DType", "DTypeLike", "f32", "f16", "bf16", "f64", "s8", "s32", "FLOAT_DTYPES",
           "as_dtype"]


@dataclass(frozen=True, eq=False)
class DType:
    """An element type: its short ``name``, the ``numpy`` dtype that holds it on the
    host, and its size in bytes. There is one instance per type: compare with ``==``/``is``."""

    name: str
    numpy: np.dtype
    itemsize: int
    is_float: bool

    def __repr__(self) -> str:
        return f"qlinear.{self.name}"

    def __str__(self) -> str:
        return self.name

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (as_dtype, (self.name,))


f32 = DType("f32", np.dtype(np.float32), 4, True)
f16 = DType("f16", np.dtype(np.float16), 2, True)
bf16 = DType("bf16", np.dtype(ml_dtypes.bfloat16), 2, True)
f64 = DType("f64", np.dtype(np.float64), 8, True)
s8 = DType("s8", np.dtype(np.int8), 1, False)
s32 = DType("s32", np.dtype(np.int32), 4, False)

#: The activation / output types (TIn), in the order tests and the CLI list them.
FLOAT_DTYPES = (f32, f16, bf16, f64)
_ALL = (f32, f16, bf16, f64, s8, s32)
_ALIASES = {
    "float32": f32, "float16": f16, "half": f16, "bfloat16": bf16,
    "float64": f64, "double": f64, "int8": s8, "int32": s32,
}


_BY_NUMPY = {d.numpy: d for d in _ALL}


#: What :func:`as_dtype` takes: a :class:`DType`, a name, or a numpy / ml_dtypes dtype.
DTypeLike = Union[DType, str, np.dtype, type]  # noqa: UP007 (a runtime alias on 3.10)


def as_dtype(value: Any, *, name: str = "dtype") -> DType:
    """Return the :class:`DType` for a DType, a short name (``"f16"``), a numpy or
    ml_dtypes dtype, or a torch-style name (``"float16"``). ``name`` is the argument
    named in the error."""
    if isinstance(value, DType):
        return value
    if isinstance(value, np.dtype) and value in _BY_NUMPY:  # the common, hot case
        return _BY_NUMPY[value]
    if isinstance(value, str):
        for d in _ALL:
            if d.name == value:
                return d
        if value in _ALIASES:
            return _ALIASES[value]
    try:
        npd = None if value is None else np.dtype(value)  # np.dtype(None) is float64
    except Exception:
        npd = None
    if npd is not None:
        for d in _ALL:
            if d.numpy == npd:
                return d
    raise InvalidProblem(
        f"{name}: expected one of f32, f16, bf16, f64, s8, s32 (or their numpy dtypes), "
        f"got {value!r}"
    )
