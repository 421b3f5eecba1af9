"""What the backend stands on: cuda-core with every name it uses, the CUDA driver
(libcuda) found safely, and driver errors turned into ours."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

from ...errors import BackendUnavailable, DeviceError

__all__ = [
    "CUDA_CORE_NAMES",
    "CUDA_CORE_NEEDED",
    "check_cuda_core",
    "find_driver",
    "cu_check",
    "driver_version",
    "pointer_device",
]


#: What the backend takes from ``cuda.core``, all checked by ``create()`` before the
#: device is touched, so that none of the lazy imports can fail later.
CUDA_CORE_NAMES = ("Device", "LaunchConfig", "launch", "Stream", "LEGACY_DEFAULT_STREAM",
                   "PER_THREAD_DEFAULT_STREAM", "ObjectCode", "Program", "ProgramOptions")
#: The oldest cuda-core that has all of them (as pyproject.toml requires).
CUDA_CORE_NEEDED = "cuda-core>=1.0"


def _cuda_core_version() -> str:
    try:
        import importlib.metadata as md

        return md.version("cuda-core")
    except Exception:
        try:
            import cuda.core

            return str(cuda.core.__version__)
        except Exception:
            return "unknown"


def check_cuda_core() -> None:
    """Raise :class:`BackendUnavailable` naming the cuda-core version found and the one
    needed unless cuda.core imports and has every name in :data:`CUDA_CORE_NAMES` and
    ``cuda.core.utils.StridedMemoryView``."""
    install = f"pip install -U '{CUDA_CORE_NEEDED}'"
    try:
        import cuda.core as core
    except Exception as e:  # an old cuda.core can fail on newer bindings in any way
        raise BackendUnavailable(
            "cuda", f"cuda-core {_cuda_core_version()} cannot be imported ({e}); qlinear "
            f"needs {CUDA_CORE_NEEDED}", install) from None
    missing = [f"cuda.core.{name}" for name in CUDA_CORE_NAMES if not hasattr(core, name)]
    try:
        from cuda.core.utils import StridedMemoryView  # noqa: F401
    except ImportError:
        missing.append("cuda.core.utils.StridedMemoryView")
    if missing:
        raise BackendUnavailable(
            "cuda", f"cuda-core {_cuda_core_version()} lacks {', '.join(missing)}; qlinear "
            f"needs {CUDA_CORE_NEEDED}", install)


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
