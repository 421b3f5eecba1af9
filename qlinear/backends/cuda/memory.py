"""Device memory of the cuda backend's own tensors (``be.empty``, ``be.from_numpy``)."""

from __future__ import annotations

import weakref
from typing import Any

from .driver import cu_check

__all__ = ["DeviceMemory"]


class DeviceMemory:
    """``nbytes`` of device memory from ``cuMemAlloc`` in ``context``, freed once nothing
    refers to it any more (or on :meth:`close`).

    Not from a stream-ordered pool on purpose: a pool frees in the order of one stream,
    and could hand the bytes to a new allocation while a kernel on another stream (torch's
    current one, say) still reads them. Here the free first waits for all work in the
    context (``cuCtxSynchronize``, then ``cuMemFree``), so memory in use is never
    reused; the price is that dropping the last reference waits for the device."""

    __slots__ = ("ptr", "nbytes", "_free", "__weakref__")

    def __init__(self, nbytes: int, context: Any) -> None:
        from cuda.bindings import driver

        self.nbytes = int(nbytes)
        self.ptr = int(cu_check(driver.cuMemAlloc(max(self.nbytes, 1)),
                                f"allocating {self.nbytes} bytes"))
        self._free = weakref.finalize(self, _free_after_device_work, self.ptr, context)
        # At exit the driver takes the memory back itself, perhaps already torn down.
        self._free.atexit = False

    def close(self) -> None:
        """Free the memory now (after the device's work); later calls do nothing."""
        self._free()

    def __repr__(self) -> str:
        return f"DeviceMemory(ptr={self.ptr:#x}, nbytes={self.nbytes})"


def _free_after_device_work(ptr: int, context: Any) -> None:
    # Runs from the garbage collector, on any thread and with any context current: it
    # pushes its own and must not raise (an error here has no caller to reach; a context
    # with a sticky error has lost its memory anyway).
    try:
        from cuda.bindings import driver

        if int(driver.cuCtxPushCurrent(context)[0]) != 0:
            return
        try:
            driver.cuCtxSynchronize()
            driver.cuMemFree(ptr)
        finally:
            driver.cuCtxPopCurrent()
    except Exception:
        pass
