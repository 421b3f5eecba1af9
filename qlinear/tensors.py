"""The tensor view every backend hands to a plan: shape, dtype, strides, device.

A :class:`Tensor` does not own a copy of anything: ``handle`` is the backend's own
object (a numpy array on cpu, a ``wgpu.GPUBuffer`` on wgpu, a device pointer owner
on cuda). ``memory``/``byte_offset`` locate the bytes, so aliasing between any two
views of one backend can be checked without knowing the backend.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Hashable

from .dtypes import DType

__all__ = ["Tensor", "contiguous_strides"]


@functools.lru_cache(maxsize=4096)
def contiguous_strides(shape: tuple) -> tuple[int, ...]:
    """Row-major strides, in elements, of a tensor of ``shape``."""
    strides = []
    step = 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


class Tensor:
    """A view of device (or host) memory, as a plan sees it.

    Attributes:
        backend: name of the backend that owns the memory (``"cpu"``, ``"wgpu"``, ``"cuda"``).
        device: the device it lives on, e.g. ``"cpu"``, ``"wgpu:0"``, ``"cuda:0"``.
        shape: tuple of ints.
        dtype: a :class:`qlinear.DType`.
        strides: tuple, in elements (not bytes); a backend passes a non-integer stride
            for memory that is not a whole number of elements apart (never valid).
        handle: the backend's native object.
        memory: a hashable naming the allocation space (views into one buffer share it).
        byte_offset: where element 0 sits inside ``memory``, in bytes.
        owner: whatever must stay alive for the memory to stay valid.
        readonly: the creator promised nobody writes it (``from_numpy(..., readonly=True)``);
            a backend may then keep data derived from it in ``cache``.
    """

    __slots__ = ("backend", "device", "shape", "dtype", "strides", "handle", "memory",
                 "byte_offset", "owner", "readonly", "cache", "size", "_span", "__weakref__")

    def __init__(self, backend: str, device: str, shape, dtype: DType, strides, handle: Any,
                 memory: Hashable, byte_offset: int = 0, owner: Any = None,
                 readonly: bool = False):
        self.backend = backend
        self.device = device
        self.shape = tuple(map(int, shape))
        self.dtype = dtype
        self.strides = tuple(strides)  # kept as given: a fractional stride must stay invalid
        self.handle = handle
        self.memory = memory
        self.byte_offset = int(byte_offset)
        self.owner = owner
        self.readonly = bool(readonly)
        # Derived data a backend may keep for read-only tensors (e.g. cpu's f32 weight).
        self.cache: dict = {}
        #: Number of elements.
        self.size = math.prod(self.shape)
        self._span = None

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    def byte_span(self) -> tuple[int, int]:
        """``(start, end)`` byte addresses, inside ``memory``, that the view can touch."""
        if self._span is None:
            self._span = self._compute_span()
        return self._span

    def _compute_span(self) -> tuple[int, int]:
        if self.size == 0:
            return (self.byte_offset, self.byte_offset)
        lo = hi = 0
        for n, s in zip(self.shape, self.strides):
            extent = (n - 1) * s
            if extent < 0:
                lo += extent
            else:
                hi += extent
        item = self.dtype.itemsize
        return (self.byte_offset + lo * item, self.byte_offset + (hi + 1) * item)

    def overlaps(self, other: "Tensor") -> bool:
        """Whether the two views can touch a common byte."""
        if self.memory != other.memory or self.size == 0 or other.size == 0:
            return False
        a0, a1 = self.byte_span()
        b0, b1 = other.byte_span()
        return a0 < b1 and b0 < a1

    def __repr__(self) -> str:
        return (f"Tensor(backend={self.backend!r}, device={self.device!r}, shape={self.shape}, "
                f"dtype={self.dtype.name}, strides={self.strides})")
