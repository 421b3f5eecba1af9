"""Tensor maps, and the launch of the kernels that take them by value (the Hopper GEMM).

A tensor map (``CUtensorMap``, 128 opaque bytes) tells the copy engine where a 2-D tensor
is, how it is strided, which box one copy moves and how the box is laid out in shared
memory. It is made on the host by the driver (``cuTensorMapEncodeTiled``) and passed to
the kernel by value, as a ``__grid_constant__`` parameter. cuda.core's ``launch`` does not
marshal such a parameter from a ``CUtensorMap`` of cuda.bindings, so these kernels are
launched with cuda.bindings' ``cuLaunchKernel`` and a parameter array built here (the
driver copies each parameter from the address given, in the kernel's own layout).

qlinear's maps all describe an int8 matrix ``[rows, row_bytes]`` in row-major order (the
quantized activation, the weight): uint8 elements, a box of 128 bytes of a row (one
128-byte swizzle row) by ``box_rows`` rows, the 128-byte swizzle, zero fill outside the
matrix. A map depends on the address, so the executables keep the maps of the tensors they
last saw (:class:`TensorMapCache`): a layer calls with the same scratch and weight.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ...errors import DeviceError, InvalidProblem
from .driver import cu_check

__all__ = ["BOX_ROW_BYTES", "TensorMapCache", "encode_rows_map", "kernel_function",
           "launch_with_maps"]

#: Bytes of a row one copy moves: the k-tile of the Hopper GEMM, one 128-byte swizzle row.
BOX_ROW_BYTES = 128


def _driver() -> Any:
    from cuda.bindings import driver

    return driver


def encode_rows_map(ptr: int, rows: int, row_bytes: int, box_rows: int) -> Any:
    """The tensor map (cuda.bindings ``CUtensorMap``) of the int8 matrix at ``ptr`` with
    ``rows`` rows of ``row_bytes`` bytes, boxes of ``BOX_ROW_BYTES x box_rows``.

    The copy engine needs a 16-byte aligned address and row pitch and at most 256 rows per
    box; the plans only choose the Hopper GEMM where that holds, so a violation is a
    :class:`InvalidProblem` naming it. Raises :class:`DeviceError` with the driver's error."""
    if ptr % 16 or row_bytes % 16 or row_bytes <= 0 or rows <= 0 or not 0 < box_rows <= 256:
        raise InvalidProblem(
            f"tensor map: expected a 16-byte aligned address and row pitch, rows > 0 and "
            f"1..256 box rows, got address {ptr:#x}, {rows} rows of {row_bytes} bytes, "
            f"{box_rows} box rows")
    d = _driver()
    # cuda.bindings takes these lists only as its own integer types, not as ints.
    u64, u32 = d.cuuint64_t, d.cuuint32_t
    return cu_check(d.cuTensorMapEncodeTiled(
        d.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, ptr,
        [u64(row_bytes), u64(rows)],         # dimensions, innermost first
        [u64(row_bytes)],                    # the pitch of every dimension but the innermost
        [u32(BOX_ROW_BYTES), u32(box_rows)],  # the box
        [u32(1), u32(1)],                    # element strides: every element
        d.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        d.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        d.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        d.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),  # zeros
        f"encoding the tensor map of {rows} x {row_bytes} bytes at {ptr:#x}")


class TensorMapCache:
    """The tensor maps of the last ``capacity`` (address, rows, row bytes, box rows) seen,
    shared by a backend's executables and safe to use from several threads."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._maps: OrderedDict[tuple[int, int, int, int], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ptr: int, rows: int, row_bytes: int, box_rows: int) -> Any:
        """The map of :func:`encode_rows_map` for these arguments, made once."""
        key = (ptr, rows, row_bytes, box_rows)
        with self._lock:
            found = self._maps.get(key)
            if found is not None:
                self._maps.move_to_end(key)
                return found
        made = encode_rows_map(ptr, rows, row_bytes, box_rows)
        with self._lock:
            self._maps[key] = made
            while len(self._maps) > self.capacity:
                self._maps.popitem(last=False)
        return made

    def __len__(self) -> int:
        return len(self._maps)


def kernel_function(kernel: Any, smem: int) -> Any:
    """The ``CUfunction`` of a loaded cuda.core ``Kernel`` in the current context, allowed
    ``smem`` bytes of dynamic shared memory (a kernel may use more than 48 KiB only after
    this). Raises :class:`DeviceError` with the driver's error."""
    d = _driver()
    handle = kernel.handle
    if isinstance(handle, d.CUkernel):  # cuda.core loads libraries: context-free kernels
        func = cu_check(d.cuKernelGetFunction(handle), "getting the kernel's function")
    else:
        func = handle
    if smem > 48 * 1024:
        cu_check(d.cuFuncSetAttribute(
            func, d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
            f"allowing the kernel {smem} bytes of dynamic shared memory")
    return func


def launch_with_maps(func: Any, name: str, grid: tuple[int, ...], threads: int, smem: int,
                     stream: Any, maps: Sequence[Any], pointers: Sequence[int],
                     ints: Sequence[int]) -> None:
    """Launch ``func`` with parameters ``(*maps, *pointers, *ints)``: tensor maps by value,
    then device addresses (64-bit), then 32-bit ints, on the cuda.core ``stream``;
    asynchronous. Raises :class:`DeviceError` with the driver's error."""
    values: list[Any] = [ctypes.c_uint64(int(p)) for p in pointers]
    values += [ctypes.c_int32(int(i)) for i in ints]
    addresses = [int(m.getPtr()) for m in maps] + [ctypes.addressof(v) for v in values]
    params = (ctypes.c_void_p * len(addresses))(*addresses)
    gx, gy, gz = (tuple(grid) + (1, 1))[:3]
    d = _driver()
    try:
        # maps and values stay referenced until the call returns: the driver copies them.
        cu_check(d.cuLaunchKernel(func, gx, gy, gz, threads, 1, 1, smem, stream.handle,
                                  ctypes.addressof(params), 0), f"launching {name}")
    except DeviceError as e:
        raise DeviceError(f"launching {name} on grid {grid} failed",
                          native=e.native or str(e)) from None
