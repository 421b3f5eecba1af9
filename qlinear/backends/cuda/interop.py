"""What other CUDA libraries hand us: arrays (``__cuda_array_interface__``, DLPack) and
streams (cuda.core ``Stream``, raw handles, ``__cuda_stream__``), read without copies."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ...dtypes import DType, as_dtype, f16, f32, f64
from ...errors import InvalidProblem
from ...tensors import contiguous_strides

__all__ = ["ArrayView", "cai_view", "dlpack_view", "stream_handle", "Streams"]

_TYPESTRS = {"f4": f32, "f2": f16, "f8": f64, "i1": as_dtype("s8"), "i4": as_dtype("s32")}
_DL_CUDA, _DL_CUDA_MANAGED = 2, 13


class ArrayView(NamedTuple):
    """Where a foreign device array's elements are: ``ptr`` (element 0), ``shape``,
    ``strides`` in elements, ``dtype``, ``readonly``."""

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: DType
    readonly: bool


def cai_view(obj: Any, name: str) -> ArrayView | None:
    """The :class:`ArrayView` of an object's ``__cuda_array_interface__``, or None when it
    has none (or one torch refuses, such as bf16). Raises :class:`InvalidProblem` naming
    ``name`` for one qlinear cannot use."""
    try:
        cai = obj.__cuda_array_interface__
    except Exception:
        return None
    if not isinstance(cai, dict):
        return None
    typestr = str(cai.get("typestr", ""))
    if typestr[:1] == ">" or typestr[1:] not in _TYPESTRS:
        raise InvalidProblem(
            f"{name}: expected dtype f32, f16, bf16, f64, s8 or s32 (little-endian), "
            f"got typestr {typestr!r}")
    if cai.get("mask") is not None:
        raise InvalidProblem(f"{name}: expected a tensor without a mask, got a masked array")
    dtype = _TYPESTRS[typestr[1:]]
    shape = tuple(int(s) for s in cai["shape"])
    ptr, readonly = cai["data"]
    strides = cai.get("strides")
    if strides is None:
        el_strides = contiguous_strides(shape)
    else:
        if any(int(s) % dtype.itemsize for s in strides):
            raise InvalidProblem(
                f"{name}: expected strides that are multiples of the item size "
                f"{dtype.itemsize}, got byte strides {tuple(strides)}")
        el_strides = tuple(int(s) // dtype.itemsize for s in strides)
    return ArrayView(int(ptr or 0), shape, el_strides, dtype, bool(readonly))


def dlpack_view(obj: Any, name: str) -> tuple[ArrayView, str, Any]:
    """``(view, device, handle)`` of a DLPack exporter in CUDA memory: its
    :class:`ArrayView`, its device (``"cuda:N"``) and the cuda.core ``StridedMemoryView``
    it was read through (bf16 comes this way from torch)."""
    try:
        dev_type, dev_id = obj.__dlpack_device__()
    except Exception:
        dev_type, dev_id = None, None
    if dev_type is not None and int(dev_type) not in (_DL_CUDA, _DL_CUDA_MANAGED):
        raise InvalidProblem(
            f"{name}: expected a tensor in CUDA device memory, got DLPack device type "
            f"{int(dev_type)} (1 = host CPU)")
    from cuda.core.utils import StridedMemoryView  # create() checked it is there
    try:
        view = StridedMemoryView(obj, stream_ptr=-1)
    except Exception as e:
        raise InvalidProblem(f"{name}: expected a DLPack tensor cuda.core can read, got "
                             f"{type(obj).__name__} ({e})") from None
    try:
        dtype = as_dtype(view.dtype)
    except Exception:
        raise InvalidProblem(
            f"{name}: expected dtype f32, f16, bf16, f64, s8 or s32, got {view.dtype}") from None
    shape = tuple(int(s) for s in view.shape)
    strides = (contiguous_strides(shape) if view.strides is None
               else tuple(int(s) for s in view.strides))
    device = f"cuda:{int(view.device_id if dev_id is None else dev_id)}"
    readonly = bool(getattr(view, "readonly", False))
    return ArrayView(int(view.ptr), shape, strides, dtype, readonly), device, view


def stream_handle(stream: Any) -> int:
    """The raw ``CUstream`` handle of a stream given as an int, an object with
    ``__cuda_stream__`` (the protocol; a method, a property in early cuda.core), one with a
    ``cuda_stream`` attribute (torch, CuPy), or a cuda.bindings ``CUstream``."""
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
        return int(stream)
    if hasattr(stream, "__cuda_stream__"):
        proto = stream.__cuda_stream__
        return int((proto() if callable(proto) else proto)[1])
    if hasattr(stream, "cuda_stream"):
        return int(stream.cuda_stream)
    if type(stream).__name__ == "CUstream":
        return int(stream)
    raise InvalidProblem(
        "stream: expected None, a cuda.core Stream, a CUstream handle (int) or an object "
        f"with __cuda_stream__ (torch, CuPy), got {type(stream).__name__}")


class Streams:
    """The cuda.core ``Stream`` for whatever ``plan.run`` was given as a stream, on one
    device. Never creates a stream: foreign handles are wrapped, and the wrappers kept so
    a handle seen again costs a dictionary look-up."""

    _MAX_KEPT = 64

    def __init__(self, device: Any) -> None:
        from cuda.core import Stream

        self._device = device
        self._stream_type = Stream
        self._by_handle: dict[int, Any] = {}

    def get(self, stream: Any = None) -> Any:
        """None: the device's default stream; a ``Stream`` as is; anything
        :func:`stream_handle` reads, as a ``Stream``. For None the device must be current
        (``CudaBackend.stream`` makes it so)."""
        if stream is None:
            return self._device.default_stream
        if isinstance(stream, self._stream_type):
            return stream
        handle = stream_handle(stream)
        s = self._by_handle.get(handle)
        if s is None:
            s = self._wrap(handle)
            if len(self._by_handle) > self._MAX_KEPT:
                self._by_handle.clear()
            self._by_handle[handle] = s
        return s

    def _wrap(self, handle: int) -> Any:
        self._device.set_current()
        if handle in (0, 1):  # NULL / CU_STREAM_LEGACY: the legacy default stream
            from cuda.core import LEGACY_DEFAULT_STREAM

            return LEGACY_DEFAULT_STREAM
        if handle == 2:  # CU_STREAM_PER_THREAD
            from cuda.core import PER_THREAD_DEFAULT_STREAM

            return PER_THREAD_DEFAULT_STREAM
        return self._stream_type.from_handle(handle)
