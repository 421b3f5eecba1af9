"""The Hopper GEMM's switch and launches: whether plans select it, what ``qlinear info``
says about it, its functions with their shared-memory limit raised, and its tensor maps.

The kernel (``cuda/gemm_wgmma.cu``) is checked on the host only — compiled for sm_90a,
its machine code read back, its index math emulated (tests/test_cuda_wgmma_emulation.py)
— until a GPU run has passed the shared suite and compute-sanitizer with it. Until then
it runs only when asked for: ``QLINEAR_CUDA_WGMMA=1`` in the environment when the backend
is created, or ``backend.wgmma = True`` before plans are selected.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ...errors import BackendUnavailable
from .specs import KernelSpec
from .tma import TensorMapCache, kernel_function, launch_with_maps

__all__ = ["WGMMA_SETTING", "VERIFIED", "WgmmaLaunches", "wgmma_setting"]

#: The environment variable that switches the Hopper GEMM on.
WGMMA_SETTING = "QLINEAR_CUDA_WGMMA"
#: Whether a GPU run has verified the kernel (then the switch's default becomes on).
VERIFIED = False


def wgmma_setting() -> bool:
    """``$QLINEAR_CUDA_WGMMA``: ``1`` on, ``0`` or unset: the default (off until
    :data:`VERIFIED`). Anything else raises :class:`BackendUnavailable` naming it."""
    text = os.environ.get(WGMMA_SETTING, "").strip()
    if text not in ("", "0", "1"):
        raise BackendUnavailable(
            "cuda", f"{WGMMA_SETTING}: expected 0 or 1, got {text!r}",
            f"unset {WGMMA_SETTING} or set it to 1 (use the Hopper wgmma GEMM) or 0")
    return text == "1" if text else VERIFIED


class WgmmaLaunches:
    """What one backend needs to run the Hopper GEMM: the loaded functions (their dynamic
    shared-memory limit raised once, when a plan loads them) and the tensor maps of the
    operands it has seen. Thread-safe."""

    def __init__(self) -> None:
        self.maps = TensorMapCache()
        self._functions: dict[str, Any] = {}
        self._lock = threading.Lock()

    @staticmethod
    def status(arch: str, enabled: bool) -> str:
        """The ``wgmma`` line of ``qlinear info``."""
        state = "unverified on a GPU" if not VERIFIED else "verified on an H200"
        if arch != "sm_90a":
            return f"n/a: the Hopper GEMM needs sm_90a, this device is {arch}"
        if enabled:
            return f"on ({state}): prefill shapes with K % 16 == 0 take gemm_wgmma"
        return (f"off ({state}): {WGMMA_SETTING}=1 or backend.wgmma = True selects it for "
                f"prefill shapes")

    def function(self, spec: KernelSpec, kernel: Any) -> Any:
        """The ``CUfunction`` of ``spec`` (loaded as the cuda.core ``kernel``) in the current
        context, allowed ``spec.smem`` bytes of dynamic shared memory."""
        func = self._functions.get(spec.name_expression)
        if func is None:
            with self._lock:
                func = self._functions.get(spec.name_expression)
                if func is None:
                    func = kernel_function(kernel, spec.smem)
                    self._functions[spec.name_expression] = func
        return func

    def launch(self, spec: KernelSpec, kernel: Any, grid: tuple[int, ...], stream: Any,
               maps: tuple[Any, ...], pointers: tuple[int, ...], ints: tuple[int, ...]) -> None:
        """Launch ``spec`` with its tensor maps, device addresses and ints on the cuda.core
        ``stream``; asynchronous."""
        launch_with_maps(self.function(spec, kernel), spec.name_expression, grid, spec.threads,
                         spec.smem, stream, maps, pointers, ints)
