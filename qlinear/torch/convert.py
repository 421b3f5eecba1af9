"""Conversions between torch and qlinear: dtypes, and numpy views of CPU tensors."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from ..dtypes import DType, DTypeLike, as_dtype, bf16, f16, f32, f64
from ..errors import InvalidProblem

__all__ = ["qlinear_dtype", "torch_dtype", "to_numpy_view", "host_copy", "from_numpy"]

_TO_QL = {torch.float32: f32, torch.float16: f16, torch.bfloat16: bf16, torch.float64: f64}
_TO_TORCH = {v: k for k, v in _TO_QL.items()}

def qlinear_dtype(dtype: DTypeLike | torch.dtype) -> DType:
    """The qlinear :class:`~qlinear.DType` for a torch float dtype (or anything
    :func:`qlinear.dtypes.as_dtype` takes); raises :class:`InvalidProblem` otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _TO_QL:
            raise InvalidProblem(
                f"dtype: expected torch.float32, float16, bfloat16 or float64, got {dtype}")
        return _TO_QL[dtype]
    d = as_dtype(dtype, name="dtype")
    if not d.is_float:
        raise InvalidProblem(f"dtype: expected a float type (f32, f16, bf16, f64), got {d.name}")
    return d


def torch_dtype(dtype: DTypeLike | torch.dtype) -> torch.dtype:
    """The torch dtype for a qlinear float dtype (or a torch dtype, returned as is)."""
    return _TO_TORCH[qlinear_dtype(dtype)]


def to_numpy_view(t: torch.Tensor) -> np.ndarray:
    """A numpy array sharing ``t``'s memory (a CPU tensor; bf16 as ``ml_dtypes.bfloat16``).

    Never copies: the array is a view, so writes to it are writes to ``t``."""
    t = t.detach()
    if t.device.type != "cpu":
        raise InvalidProblem(f"tensor: expected a CPU tensor, got one on {t.device}")
    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16: reinterpret the 16-bit words, then relabel them.
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def host_copy(t: torch.Tensor) -> np.ndarray:
    """A numpy copy of ``t`` in host memory, contiguous (bf16 as ``ml_dtypes.bfloat16``)."""
    return to_numpy_view(t.detach().to("cpu", copy=True).contiguous())


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``a``'s memory where it can (bf16 through its 16-bit words)."""
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
