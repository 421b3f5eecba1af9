"""How tensors sit in ``wgpu.GPUBuffer`` s: row-major, except that s8 matrices have rows
padded to a multiple of 4 bytes, so that the kernels see whole u32 words (the pad bytes
of ``act_q`` are written as zeros)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...dtypes import DType, s8
from ...errors import InvalidProblem
from ...problem import check_int
from ...tensors import Tensor, contiguous_strides
from .device import round_up

__all__ = ["tensor_layout", "buffer_strides", "check_buffer_view",
           "upload_bytes", "read_span", "usage_names"]


def tensor_layout(shape: tuple[int, ...], dtype: DType) -> tuple[tuple[int, ...], int]:
    """(strides in elements, bytes) of a tensor of ``shape``."""
    if dtype == s8 and len(shape) >= 2:
        row = round_up(shape[-1], 4)
        strides = [1]
        step = row
        for n in reversed(shape[1:-1]):
            strides.append(step)
            step *= max(n, 1)
        strides.append(step)
        nbytes = math.prod(shape[:-1]) * row if all(shape) else 0
        return tuple(reversed(strides)), nbytes
    return contiguous_strides(tuple(shape)), math.prod(shape) * dtype.itemsize


def upload_bytes(arr: np.ndarray, dtype: DType, nbytes: int) -> np.ndarray:
    """The bytes of ``arr`` in the buffer layout (s8 rows padded with zeros), padded to a
    whole number of 4-byte words as queue writes need."""
    shape = arr.shape
    if dtype == s8 and arr.ndim >= 2 and shape[-1] % 4:
        padded = np.zeros(shape[:-1] + (round_up(shape[-1], 4),), np.int8)
        padded[..., :shape[-1]] = arr
        data = padded.reshape(-1).view(np.uint8)
    else:
        data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    if nbytes % 4:
        data = np.concatenate([data, np.zeros(4 - nbytes % 4, np.uint8)])
    return data


def read_span(t: Tensor) -> tuple[int, int]:
    """The 4-byte-aligned byte range of ``t.handle`` that holds ``t``."""
    start, end = t.byte_span()
    return start - start % 4, round_up(end, 4)


def usage_names(wgpu_module: Any, usage: int) -> str:
    """Buffer usage flags in words, e.g. ``"COPY_DST|MAP_READ"``."""
    names = [n for n in ("MAP_READ", "MAP_WRITE", "COPY_SRC", "COPY_DST", "INDEX", "VERTEX",
                         "UNIFORM", "STORAGE", "INDIRECT", "QUERY_RESOLVE")
             if usage & getattr(wgpu_module.BufferUsage, n)]
    return "|".join(names) or "none"


def buffer_strides(shape: Sequence[int], dtype: DType) -> tuple[int, ...]:
    """The strides a tensor of ``shape`` must have on wgpu."""
    return tensor_layout(tuple(shape), dtype)[0]


def check_buffer_view(wgpu_module: Any, buffer: Any, shape: tuple[int, ...], dtype: DType,
                      offset: Any) -> None:
    """:class:`InvalidProblem` unless ``buffer`` can hold a ``dtype`` tensor of ``shape``
    in the buffer layout from byte ``offset``: a ``wgpu.GPUBuffer`` with usage STORAGE,
    ``offset`` a multiple of 4, enough bytes up to a 4-byte boundary."""
    if not isinstance(buffer, wgpu_module.GPUBuffer):
        raise InvalidProblem(f"buffer: expected a wgpu.GPUBuffer, got {type(buffer).__name__}")
    if not buffer.usage & wgpu_module.BufferUsage.STORAGE:
        raise InvalidProblem("buffer: expected usage flags including STORAGE, got "
                             f"{usage_names(wgpu_module, buffer.usage)}")
    offset = check_int("offset", offset, 0)
    if offset % 4:
        raise InvalidProblem(f"offset: expected a multiple of 4 bytes, got {offset}")
    _, nbytes = tensor_layout(shape, dtype)
    need = round_up(offset + nbytes, 4)
    if need > buffer.size:
        raise InvalidProblem(
            f"buffer: expected at least {need} bytes for a {dtype.name} tensor of shape "
            f"{shape} at offset {offset}, got a buffer of {buffer.size} bytes")
