"""The CUDA driver (libcuda): finding it safely, and turning its errors into ours."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

from ...errors import DeviceError

__all__ = ["find_driver", "cu_check", "driver_version", "pointer_device"]


def find_driver() -> str | None:
    """Where libcuda is, found without calling into it (a driver call on a machine
    without a driver can leave later calls hanging). None when there is none."""
    try:
        import cuda.pathfinder as pf

        loaded = pf.load_nvidia_dynamic_lib("cuda")
        return getattr(loaded, "abs_path", None) or "libcuda"
    except Exception:
        pass
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    for name in names:
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    return ctypes.util.find_library("cuda")


def cu_check(result: Any, what: str) -> Any:
    """Unpack a cuda.bindings driver result ``(err, *values)``: None, the one value, or
    the tuple of values. Raises :class:`DeviceError` naming ``what`` on an error."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if int(err) != 0:
        try:
            from cuda.bindings import driver

            _, name = driver.cuGetErrorName(err)
            _, text = driver.cuGetErrorString(err)
            detail = f"{name.decode()}: {text.decode()}"
        except Exception:
            detail = str(err)
        kind = "out of memory" if "OUT_OF_MEMORY" in detail else "the device failed"
        raise DeviceError(f"{what}: {kind}", native=detail)
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def driver_version() -> str:
    """The driver's CUDA version, e.g. ``"12.4"``, or ``"unknown"``."""
    try:
        from cuda.bindings import driver

        version = int(cu_check(driver.cuDriverGetVersion(), "driver version"))
    except Exception:
        return "unknown"
    return f"{version // 1000}.{version % 1000 // 10}"


def pointer_device(ptr: int) -> str:
    """The device id (``"cuda:N"``) of the memory at ``ptr``, or a description of why
    it is none."""
    from cuda.bindings import driver

    try:
        ordinal = cu_check(driver.cuPointerGetAttribute(
            driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr),
            "querying a pointer's device")
        return f"cuda:{int(ordinal)}"
    except DeviceError:
        return "unknown (not CUDA device memory)"
