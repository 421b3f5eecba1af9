"""The cuda backend object: one device, its tensors, its loaded kernels and launches."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...dtypes import DType, DTypeLike
from ...errors import BackendUnavailable, DeviceError, InvalidProblem, Unsupported
from ...kernel_cache import KernelCache
from ...problem import DynamicRangeQuantizeDescriptor, QuantizedLinearDescriptor
from ...schemes import ActivationScheme
from ...tensors import Tensor, contiguous_strides, host_view
from ...validate import check_new_tensor, host_array
from ..base import Backend
from .compile import CompileOptions, compile_module, device_arch, nvrtc_version
from .driver import (
    check_cuda_core,
    cu_check,
    driver_version,
    find_driver,
    pointer_device,
)
from .executables import CudaLinearExecutable, CudaQuantizeExecutable
from .interop import Streams, cai_view, dlpack_view
from .launcher import Launcher
from .memory import DeviceMemory
from .specs import KernelSpec, arch_number
from .wgmma import WgmmaLaunches, wgmma_setting

__all__ = ["CudaBackend", "create"]


class CudaBackend(Backend):
    """One NVIDIA GPU through cuda.core: kernels compiled by NVRTC for the device's own
    architecture; tensors are its own device memory (``empty``, ``from_numpy``) or any
    object exposing ``__cuda_array_interface__`` or ``__dlpack__`` (torch, CuPy), wrapped
    without a copy.

    Runs are asynchronous on the stream given to ``plan.run`` (a cuda.core ``Stream``, a
    raw ``CUstream`` handle as an int, or any object with ``__cuda_stream__``; None: the
    device's default stream). ``wrap`` does not order streams: run on a stream that is
    ordered after the work producing the inputs (for torch, its current stream)."""

    name = "cuda"
    is_gpu = True
    torch_device_type = "cuda"
    activation_schemes = frozenset(ActivationScheme)

    def __init__(self, device: Any, *, cache: KernelCache | None = None) -> None:
        self._device = device
        self._cache = cache
        self._streams = Streams(device)
        self.ordinal = int(device.device_id)
        self.device_id = f"cuda:{self.ordinal}"
        self.compute_capability: tuple[int, int] = (
            int(device.compute_capability[0]), int(device.compute_capability[1]))
        self.arch = device_arch(self.compute_capability)
        self._arch_number = arch_number(self.arch)
        self.sm_count = int(device.properties.multiprocessor_count)
        self._kernels: dict[str, Any] = {}
        self._modules: list[Any] = []  # loaded ObjectCode, kept alive with their kernels
        self._lock = threading.RLock()
        self._context: Any = None  # the CUcontext device memory is freed in
        self._launcher = Launcher(self.arch, self._arch_number)
        self.wgmma: bool = wgmma_setting()  # plans selected from now on may take gemm_wgmma
        self.hopper = WgmmaLaunches()

    # -- device ----------------------------------------------------------------------
    @property
    def device(self) -> Any:
        """The cuda.core ``Device`` (its ``properties`` hold the limits and clocks)."""
        return self._device

    @property
    def device_name(self) -> str:
        """The GPU's name, compute capability and SM count."""
        major, minor = self.compute_capability
        return f"{self._device.name} (compute capability {major}.{minor}, {self.sm_count} SMs)"

    def _current(self) -> Any:
        self._device.set_current()
        return self._device

    def stream(self, stream: Any = None) -> Any:
        """The cuda.core ``Stream`` for ``stream``: None (the device's default stream), a
        ``Stream``, a raw ``CUstream`` handle (int), or any object with ``__cuda_stream__``
        or a ``cuda_stream`` handle attribute (torch, CuPy). Never creates a stream. Makes
        the device current on the calling thread first (launches on a foreign stream go to
        the context current at the time)."""
        self._device.set_current()
        return self._streams.get(stream)

    def check_stream(self, stream: Any) -> None:
        """Raise :class:`InvalidProblem` (``"stream: expected None, a cuda.core Stream, ...,
        got <type name>"``) unless :meth:`stream` can use ``stream`` (every run calls it)."""
        if stream is not None:
            self._streams.get(stream)

    def synchronize(self, stream: Any = None) -> None:
        """Wait for ``stream`` (None: all work on the device) to finish."""
        try:
            if stream is None:
                self._current().sync()
            else:
                self.stream(stream).sync()
        except InvalidProblem:
            raise
        except Exception as e:
            raise DeviceError("synchronize: the device failed", native=str(e)) from None

    # -- kernels -----------------------------------------------------------------------
    def kernel(self, spec: KernelSpec) -> Any:
        """The loaded cuda.core ``Kernel`` of ``spec`` (compiled and cached on first use)."""
        k = self._kernels.get(spec.name_expression)
        if k is not None:
            return k
        with self._lock:
            k = self._kernels.get(spec.name_expression)
            if k is not None:
                return k
            entry = compile_module(spec.source, [spec.name_expression],
                                   CompileOptions(self.arch), self._cache)
            from cuda.core import ObjectCode

            mangled = entry.symbols.get(spec.name_expression)
            if not mangled:
                raise DeviceError(f"NVRTC reported no symbol for {spec.name_expression}")
            self._current()
            try:
                # By its mangled name: symbol_mapping values must be bytes in some
                # cuda.core versions and str in none, a plain str name works in all.
                obj = ObjectCode.from_cubin(entry.binary, name=spec.source)
                k = obj.get_kernel(mangled)
            except Exception as e:
                raise DeviceError(f"loading {spec.name_expression} ({self.arch} cubin) failed",
                                  native=str(e)) from None
            self._modules.append(obj)
            self._kernels[spec.name_expression] = k
            return k

    # -- launches ----------------------------------------------------------------------
    def pdl_enabled(self) -> bool:
        """Whether kernels marked ``pdl`` use programmatic dependent launch
        (:class:`~.launcher.Launcher`)."""
        return self._launcher.pdl_enabled()

    def pdl_status(self) -> str:
        """``"on"``, or ``"off: <why>"``."""
        return self._launcher.pdl_status()

    def launch(self, spec: KernelSpec, grid: tuple[int, ...], stream: Any, *args: Any) -> None:
        """Launch ``spec`` on ``grid`` blocks of ``spec.threads`` threads on ``stream``
        (anything :meth:`stream` accepts) with ``args``; asynchronous. The device is made
        current first; kernels marked ``pdl`` use programmatic dependent launch while
        :meth:`pdl_enabled` (see :class:`~.launcher.Launcher`)."""
        self._launcher.launch(self.kernel(spec), spec.name_expression, grid, spec.threads,
                              spec.pdl, self.stream(stream), *args)

    def linear_executable(self, desc: QuantizedLinearDescriptor) -> CudaLinearExecutable:
        """The executable for ``desc``: the activation pass, then the int8 GEMM with the
        dequantization (+ bias) fused, both compiled and loaded."""
        return CudaLinearExecutable(self, desc)

    def quantize_executable(self, desc: DynamicRangeQuantizeDescriptor) -> CudaQuantizeExecutable:
        """The executable of the activation pass alone for ``desc``."""
        return CudaQuantizeExecutable(self, desc)

    # -- tensors -----------------------------------------------------------------------
    def _tensor(self, shape: Sequence[int], dtype: DType, ptr: int, owner: Any,
                handle: Any = None, strides: Sequence[int] | None = None,
                readonly: bool = False, device: str | None = None) -> Tensor:
        shape = tuple(int(s) for s in shape)
        return Tensor("cuda", device or self.device_id, shape, dtype,
                      strides if strides is not None else contiguous_strides(shape),
                      handle if handle is not None else owner, device or self.device_id,
                      data_ptr=int(ptr), owner=owner, readonly=readonly)

    def empty(self, shape: Sequence[int], dtype: DTypeLike) -> Tensor:
        """A new device tensor; its handle is a :class:`~.memory.DeviceMemory`, freed when
        the last tensor viewing it is gone, after the work on every stream of the device
        (a stream-ordered pool could reuse it under a kernel of another stream).
        ``shape`` and ``dtype`` are checked by :func:`qlinear.validate.check_new_tensor`
        before the device is touched."""
        shape, dt = check_new_tensor(shape, dtype)
        nbytes = math.prod(shape) * dt.itemsize
        self._current()  # cuMemAlloc allocates in the calling thread's current context
        try:
            mem = DeviceMemory(nbytes, self._context_handle())
        except DeviceError as e:
            raise DeviceError(f"allocating {nbytes} bytes on {self.device_id} failed "
                              f"(out of memory?)", native=e.native or str(e)) from None
        return self._tensor(shape, dt, mem.ptr, mem)

    def _context_handle(self) -> Any:
        ctx = self._context
        if ctx is None:
            from cuda.bindings import driver

            ctx = self._context = cu_check(driver.cuCtxGetCurrent(),
                                           f"reading the CUDA context of {self.device_id}")
        return ctx

    def from_numpy(self, array: np.ndarray, *, readonly: bool = False) -> Tensor:
        """A device tensor holding a copy of ``array`` (copied before this returns).
        ndarray subclasses are refused (:func:`qlinear.validate.host_array`)."""
        src, dtype = host_array(array)
        arr = np.ascontiguousarray(src)
        t = self.empty(arr.shape, dtype)
        if arr.nbytes:
            from cuda.bindings import driver

            self._current()
            cu_check(driver.cuMemcpyHtoD(t.data_ptr, arr.ctypes.data, arr.nbytes),
                     f"copying {arr.nbytes} bytes to {self.device_id}")
        t.readonly = bool(readonly)
        return t

    def to_numpy(self, tensor: Any) -> np.ndarray:
        """A host copy of ``tensor``, after all work on the device has finished."""
        t = self.wrap(tensor, name="tensor")
        if t.backend != "cuda":
            raise InvalidProblem(
                f"tensor: expected a cuda tensor, got one of backend {t.backend!r}")
        if t.size == 0:
            return np.empty(t.shape, t.dtype.numpy)
        from cuda.bindings import driver

        self.synchronize()
        lo, hi = t.byte_span()

        def copy_into(host: np.ndarray) -> np.ndarray:
            cu_check(driver.cuMemcpyDtoH(host.ctypes.data, lo, hi - lo),
                     f"copying {hi - lo} bytes from {t.device}")
            return host

        if t.strides == contiguous_strides(t.shape):
            return copy_into(np.empty(t.shape, t.dtype.numpy))
        return host_view(copy_into(np.empty(hi - lo, np.uint8)), t, lo)

    def wrap(self, obj: Any, *, name: str = "tensor") -> Tensor:
        """``obj`` as a cuda Tensor without a copy: a qlinear Tensor as is, or any device
        array with ``__cuda_array_interface__`` (read directly) or ``__dlpack__`` (through
        cuda.core's ``StridedMemoryView``; bf16 comes this way from torch)."""
        if isinstance(obj, Tensor):
            return obj
        if isinstance(obj, np.ndarray):
            raise InvalidProblem(
                f"{name}: expected a CUDA device tensor (torch, CuPy, or "
                f"backend.empty/from_numpy), got a numpy array in host memory")
        view = cai_view(obj, name)
        handle = None
        if view is not None:
            device = self._pointer_device(view.ptr) if view.ptr else self.device_id
        elif hasattr(obj, "__dlpack__"):
            view, device, handle = dlpack_view(obj, name)
        else:
            raise InvalidProblem(
                f"{name}: expected a CUDA device tensor (__cuda_array_interface__ or __dlpack__), "
                f"got {type(obj).__name__}")
        return self._tensor(view.shape, view.dtype, view.ptr, obj, handle=handle,
                            strides=view.strides, readonly=view.readonly, device=device)

    def _pointer_device(self, ptr: int) -> str:
        return pointer_device(ptr)

    # -- facts -------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Device, driver, compiler and cache (the kernels chosen for typical shapes are in
        :func:`qlinear.plans.typical_plans`)."""
        from ...kernel_cache import cache_dir

        return {
            "device": self.device_name,
            "arch": self.arch,
            "driver": driver_version(),
            "nvrtc": ".".join(map(str, nvrtc_version())),
            "sms": self.sm_count,
            "shared_memory_per_block": int(self._device.properties.max_shared_memory_per_block),
            "pdl": self.pdl_status(),
            "wgmma": self.hopper.status(self.arch, self.wgmma),
            "cache": str(cache_dir() or "off (memory only)"),
        }


def _device_ordinal() -> int:
    # Read before anything else, so that a typo is reported as itself wherever it is set.
    text = os.environ.get("QLINEAR_CUDA_DEVICE", "").strip() or "0"
    if not text.isdigit():
        raise BackendUnavailable(
            "cuda", f"QLINEAR_CUDA_DEVICE: expected a device number (0, 1, ...), got {text!r}",
            "unset QLINEAR_CUDA_DEVICE or set it to a CUDA device number")
    return int(text)


def create() -> CudaBackend:
    """The cuda backend on device ``$QLINEAR_CUDA_DEVICE`` (default 0).

    Raises :class:`BackendUnavailable` (with the reason and what to install) when
    cuda-python, the driver, NVRTC or a supported GPU is missing, or cuda-core is older
    than :data:`~.driver.CUDA_CORE_NEEDED`. The driver library is looked for before any
    driver call."""
    ordinal = _device_ordinal()
    try:
        import cuda.bindings  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable("cuda", f"cuda-python is not installed ({e})") from None
    check_cuda_core()
    if find_driver() is None:
        raise BackendUnavailable("cuda", "no NVIDIA driver (libcuda) found",
                                 "install the NVIDIA driver (it provides libcuda)")
    nvrtc_version()  # raises BackendUnavailable without NVRTC
    from cuda.bindings import driver

    try:
        cu_check(driver.cuInit(0), "initialising the CUDA driver")
        count = cu_check(driver.cuDeviceGetCount(), "counting CUDA devices")
    except DeviceError as e:
        raise BackendUnavailable("cuda", f"the CUDA driver does not start: {e.native or e}",
                                 "a working NVIDIA driver and GPU") from None
    if not count:
        raise BackendUnavailable("cuda", "no CUDA device found", "an NVIDIA GPU")
    if ordinal >= int(count):
        raise BackendUnavailable(
            "cuda", f"QLINEAR_CUDA_DEVICE={ordinal}, but only {int(count)} device(s) exist")
    from cuda.core import Device

    try:
        device = Device(ordinal)
        device.set_current()
    except Exception as e:
        raise BackendUnavailable("cuda", f"cannot use CUDA device {ordinal}: {e}") from None
    try:
        return CudaBackend(device)
    except Unsupported as e:
        raise BackendUnavailable("cuda", str(e),
                                 "an NVIDIA GPU of compute capability 7.5+") from None
