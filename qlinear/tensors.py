"""The tensor view every backend hands to a plan: shape, dtype, strides, device.

A :class:`Tensor` does not own a copy of anything: ``handle`` is the backend's own
object (a numpy array on cpu, a ``wgpu.GPUBuffer`` on wgpu, a device pointer owner
on cuda). Where element 0 sits is said in the terms of the memory it lives in:
``data_ptr``, an address, for memory that has addresses (host memory on cpu, device
memory on cuda); ``buffer_offset``, bytes from the start of ``handle``, for memory that
has none (a WebGPU buffer). Either one, with ``memory`` naming the address space, locates
the bytes, so aliasing between any two views of one backend can be checked without
knowing the backend.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np

from .dtypes import DType
from .errors import InvalidProblem

__all__ = ["Tensor", "TensorLike", "contiguous_strides", "host_view", "SupportsDLPack",
           "SupportsCudaArrayInterface"]


@runtime_checkable
class SupportsDLPack(Protocol):
    """An array that exports itself through DLPack (torch, CuPy, JAX, numpy)."""

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any: ...

    def __dlpack_device__(self) -> tuple[int, int]: ...


@runtime_checkable
class SupportsCudaArrayInterface(Protocol):
    """A CUDA array exporting ``__cuda_array_interface__`` (torch, CuPy, Numba)."""

    @property
    def __cuda_array_interface__(self) -> dict: ...


@functools.lru_cache(maxsize=4096)
def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
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
        shape: tuple of non-negative ints (numpy ints are converted; floats, bools and
            negatives raise :class:`InvalidProblem`, as in ``be.empty``).
        dtype: a :class:`qlinear.DType`.
        strides: tuple, in elements (not bytes); a backend passes a non-integer stride
            for memory that is not a whole number of elements apart (never valid).
        handle: the backend's native object.
        memory: a hashable naming the address space (views into one buffer share it).
        data_ptr: the address of element 0 (host address on cpu, device pointer on cuda),
            or None where the memory has no addresses.
        buffer_offset: where element 0 sits inside ``handle``, in bytes (wgpu), or None
            where ``data_ptr`` is given.
        origin: whichever of the two this memory has: where element 0 sits in
            ``memory``'s address space (what aliasing checks compare).
        owner: whatever must stay alive for the memory to stay valid.
        readonly: the creator promised nobody writes it (``from_numpy(..., readonly=True)``);
            a backend may then keep data derived from it in ``cache``.
    """

    __slots__ = ("backend", "device", "shape", "dtype", "strides", "handle", "memory",
                 "data_ptr", "buffer_offset", "origin", "owner", "readonly", "cache", "size",
                 "_span", "__weakref__")

    def __init__(self, backend: str, device: str, shape: Sequence[int], dtype: DType,
                 strides: Sequence[int | float], handle: Any, memory: Hashable, *,
                 data_ptr: int | None = None, buffer_offset: int | None = None,
                 owner: Any = None, readonly: bool = False):
        if (data_ptr is None) == (buffer_offset is None):
            raise InvalidProblem(
                "data_ptr, buffer_offset: expected exactly one of them, got "
                f"data_ptr={data_ptr!r}, buffer_offset={buffer_offset!r}")
        self.origin = int(data_ptr) if data_ptr is not None else int(buffer_offset or 0)
        self.backend = backend
        self.device = device
        if type(shape) is not tuple or not all(type(n) is int and n >= 0 for n in shape):
            from .validate import check_shape  # validate imports this module

            shape = check_shape(shape)
        self.shape: tuple[int, ...] = shape
        self.dtype = dtype
        self.strides = tuple(strides)  # kept as given: a fractional stride must stay invalid
        self.handle = handle
        self.memory = memory
        self.data_ptr = None if data_ptr is None else self.origin
        self.buffer_offset = None if buffer_offset is None else self.origin
        self.owner = owner
        self.readonly = bool(readonly)
        # Derived data a backend may keep for read-only tensors (e.g. cpu's f32 weight).
        self.cache: dict[Any, Any] = {}
        #: Number of elements.
        self.size = math.prod(self.shape)
        self._span: tuple[int, int] | None = None

    def view(self, shape: Sequence[int], *, origin: int | None = None) -> Tensor:
        """A view of the same memory, with the same strides, of another ``shape`` (e.g. the
        first rows), whose element 0 sits at ``origin`` (default: where this one's does)."""
        origin = self.origin if origin is None else int(origin)
        where = ({"data_ptr": origin} if self.data_ptr is not None
                 else {"buffer_offset": origin})
        return Tensor(self.backend, self.device, shape, self.dtype, self.strides, self.handle,
                      self.memory, owner=self.owner, readonly=self.readonly, **where)

    def rehandled(self, handle: Any) -> Tensor:
        """A new view with this one's metadata over ``handle``, another object for the same
        memory (a numpy array of the same address, shape, strides and dtype), unchecked;
        its ``cache`` starts empty and ``owner`` is None."""
        t = Tensor.__new__(Tensor)
        t.backend, t.device, t.shape, t.dtype = self.backend, self.device, self.shape, self.dtype
        t.strides, t.handle, t.memory, t.origin = self.strides, handle, self.memory, self.origin
        t.data_ptr, t.buffer_offset, t.owner = self.data_ptr, self.buffer_offset, None
        t.readonly, t.cache, t.size, t._span = self.readonly, {}, self.size, self._span
        return t

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
            return (self.origin, self.origin)
        lo: int | float = 0
        hi: int | float = 0
        for n, s in zip(self.shape, self.strides):
            extent = (n - 1) * s
            if extent < 0:
                lo += extent
            else:
                hi += extent
        item = self.dtype.itemsize
        base = self.origin
        return (int(base + lo * item), int(base + (hi + 1) * item))

    def overlaps(self, other: Tensor) -> bool:
        """Whether the two views can touch a common byte."""
        if self.memory != other.memory or self.size == 0 or other.size == 0:
            return False
        a0, a1 = self.byte_span()
        b0, b1 = other.byte_span()
        return a0 < b1 and b0 < a1

    def __repr__(self) -> str:
        return (f"Tensor(backend={self.backend!r}, device={self.device!r}, shape={self.shape}, "
                f"dtype={self.dtype.name}, strides={self.strides})")


def host_view(raw: np.ndarray, t: Tensor, start: int) -> np.ndarray:
    """A C-contiguous host copy, in ``t.shape``, of ``t``'s elements, read from ``raw``: the
    bytes of ``t``'s memory that begin at byte address ``start`` (in the terms of
    ``t.origin``) and cover ``t.byte_span()``. How a backend reads back a strided view
    after copying the bytes it spans to the host."""
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    out_dtype = t.dtype.numpy
    if t.size == 0:
        return np.empty(t.shape, out_dtype)
    lo, hi = t.byte_span()
    if lo < start or hi - start > raw.size:
        raise ValueError(f"host_view: bytes {start}..{start + raw.size} do not cover the "
                         f"view's span {lo}..{hi}")
    item = t.dtype.itemsize
    # From the lowest byte the view touches, so that negative strides stay inside.
    flat = raw[lo - start:hi - start].view(out_dtype)
    strided = np.lib.stride_tricks.as_strided(
        flat[(t.origin - lo) // item:], shape=t.shape,
        strides=tuple(int(s) * item for s in t.strides))
    return strided.copy(order="C")


#: What a plan argument may be: a backend's :class:`Tensor`, or what the backend wraps
#: without a copy (a numpy array on cpu; an object with ``__cuda_array_interface__`` or
#: ``__dlpack__`` on cuda).
TensorLike = Union[  # noqa: UP007 (a runtime alias on 3.10)
    Tensor, np.ndarray, SupportsCudaArrayInterface, SupportsDLPack]
