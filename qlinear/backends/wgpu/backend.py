"""The wgpu :class:`Backend`: the adapter's facts (the dot4 probe's verdict among them),
tensors on ``wgpu.GPUBuffer`` s, synchronisation, the options plans are made with, and
``create()``.

One backend object may be used from many threads: its caches are locked, batches belong
to the thread that opened them, and :meth:`WgpuBackend.configured` applies to the
calling thread."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ...dtypes import DTypeLike, as_dtype
from ...errors import BackendUnavailable, InvalidProblem
from ...problem import DynamicRangeQuantizeDescriptor, QuantizedLinearDescriptor
from ...schemes import ActivationScheme
from ...tensors import Tensor, host_view
from ...validate import check_new_tensor, check_shape, host_array
from .. import install_hint
from ..base import Backend
from .choose import AdapterFacts, f16_native, inner_product
from .device import WgpuDevice
from .executables import LinearExecutable, QuantizeExecutable
from .options import WgpuOptions
from .probe import Dot4Probe, probe_dot4
from .quiet import quiet_creation
from .shaders import shader_source
from .streams import Batch, check_stream
from .tensors import (
    buffer_strides,
    check_buffer_view,
    read_span,
    tensor_layout,
    upload_bytes,
)

__all__ = ["WgpuBackend", "create"]

class WgpuBackend(Backend):
    """WGSL kernels on a wgpu adapter. Tensors are ``wgpu.GPUBuffer`` ranges.

    Attributes beside :class:`Backend`'s: ``adapter``, ``device`` (wgpu's objects),
    ``adapter_info``, ``adapter_type``, ``backend_type``, ``features``, ``limits``,
    ``facts`` (:class:`AdapterFacts`; the first use runs the dot4 probe, whose verdict is
    ``dot4_probe``), ``options`` (:class:`WgpuOptions`, see :meth:`configured`) and
    ``gpu`` (:class:`WgpuDevice`)."""

    name = "wgpu"
    activation_schemes = frozenset(ActivationScheme)

    def __init__(self, wgpu_module: Any, adapter: Any, device: Any):
        self._wgpu = wgpu_module
        self.adapter = adapter
        self.device = device
        info = adapter.info
        self.adapter_info = {k: info[k] for k in info}
        self.adapter_type = str(self.adapter_info.get("adapter_type", ""))
        self.backend_type = str(self.adapter_info.get("backend_type", ""))
        self.device_id = "wgpu:0"
        self.features = frozenset(str(f) for f in device.features)
        self.limits = {k: device.limits[k] for k in device.limits}
        # Before the probe: what wgpu reports. The probe runs when facts are first needed
        # (a plan, info()), so that creating a backend only to look at it stays cheap.
        self._reported = AdapterFacts.from_adapter(self.adapter_type, self.backend_type,
                                                   self.features, self.limits)
        self._facts: AdapterFacts | None = None
        self._dot4: Dot4Probe | None = None
        self._probe_lock = threading.Lock()
        # lavapipe and other software adapters report "CPU": no GPU in this machine.
        self.is_gpu = self._reported.is_gpu
        self._options = WgpuOptions.from_limits(self.limits)
        self._configured = threading.local()  # each thread's configured() options
        self.gpu = WgpuDevice(wgpu_module, device, self.limits)

    # -- facts ---------------------------------------------------------------------
    @property
    def facts(self) -> AdapterFacts:
        """The adapter's facts as the choosers see them, ``dot4_exact`` as the dot4 probe
        found it (the first call runs the probe: one tiny kernel)."""
        facts = self._facts
        if facts is None:
            with self._probe_lock:
                if self._facts is None:
                    self._dot4 = probe_dot4(self.gpu)
                    self._facts = dataclasses.replace(self._reported,
                                                      dot4_exact=self._dot4.exact)
                facts = self._facts
        return facts

    @property
    def dot4_probe(self) -> Dot4Probe:
        """What the dot4I8Packed probe found on this adapter (runs it if not yet run)."""
        self.facts  # noqa: B018 (runs the probe once)
        assert self._dot4 is not None
        return self._dot4

    @property
    def options(self) -> WgpuOptions:
        """The options plans are selected with: this thread's :meth:`configured` block's,
        else the device's defaults."""
        return getattr(self._configured, "options", None) or self._options

    @property
    def device_name(self) -> str:
        """The adapter, its driver API and its type (e.g. lavapipe is "Vulkan, CPU")."""
        return (f"{self.adapter_info.get('device') or self.adapter_info.get('description')} "
                f"({self.backend_type}, {self.adapter_type})")

    def info(self) -> dict[str, Any]:
        """Adapter, type, limits, features, and how the choosers are set (inner product,
        f16 storage, whether reductions use subgroup operations; the kernels they pick for
        typical shapes are in :func:`qlinear.plans.typical_plans`)."""
        return {
            "device": self.device_name,
            "adapter": dict(self.adapter_info),
            "adapter_type": self.adapter_type,
            "backend_type": self.backend_type,
            "is_gpu": self.is_gpu,
            "features": sorted(self.features),
            # The limits a compute library runs into; the rest are about rendering.
            "limits": {k: v for k, v in self.limits.items()
                       if k.startswith(("max-compute", "max-storage-buffer", "max-buffer",
                                        "min-storage", "max-uniform-buffer-binding"))},
            "inner_product": inner_product(self.facts, self.options),
            "dot4_probe": self.dot4_probe.describe(),
            "f16_storage": f16_native(self.facts, self.options) and "native" or "packed",
            "subgroups": self.options.use_subgroups(self.facts.subgroups),
        }

    def settings(self) -> dict[str, Any]:
        """The current kernel choices and limits plans are made with (see :meth:`configured`)."""
        return self.options.as_dict()

    @contextlib.contextmanager
    def configured(self, **settings: Any) -> Iterator[WgpuBackend]:
        """Temporarily change how plans selected inside the block, by the calling thread,
        are made, for tests and experiments; restored on exit. Keys: the fields of
        :class:`WgpuOptions` (``inner_product``, ``f16_storage``, ``quantize_exact_only``,
        ``tile``, ``subgroups`` (None: where the adapter has them; True: required,
        :class:`Unsupported` at selection on an adapter without; False: never), and the
        limits ``max_storage_binding``, ``max_workgroups_per_dim``,
        ``max_workgroup_storage``); an unknown key or a value out of range raises
        :class:`InvalidProblem`. Plans keep the options they were selected with."""
        old = getattr(self._configured, "options", None)
        self._configured.options = self.options.replaced(**settings)
        try:
            yield self
        finally:
            self._configured.options = old

    def cache_info(self) -> dict[str, int]:
        """How many shader modules, pipelines and layouts this device has compiled and cached."""
        return self.gpu.shaders.info()

    # -- tensors -------------------------------------------------------------------
    def expected_strides(self, shape: Sequence[int], dtype: DTypeLike) -> tuple[int, ...]:
        """Row-major strides, except that s8 matrices have rows padded to a multiple of 4
        elements (the kernels read them as u32 words): ``(round_up(K, 4), 1)``."""
        return buffer_strides(shape, as_dtype(dtype))

    def _tensor(self, buf: Any, shape: tuple[int, ...], dtype: Any, offset: int = 0,
                readonly: bool = False) -> Tensor:
        strides, _ = tensor_layout(shape, dtype)
        return Tensor("wgpu", self.device_id, shape, dtype, strides, buf, buf,
                      buffer_offset=offset, owner=buf, readonly=readonly)

    def empty(self, shape: Sequence[int], dtype: DTypeLike) -> Tensor:
        """A new device tensor (zero-filled, as WebGPU buffers are; s8 row pads included).
        ``shape`` and ``dtype`` are checked by :func:`qlinear.validate.check_new_tensor`."""
        dims, dt = check_new_tensor(shape, dtype)
        _, nbytes = tensor_layout(dims, dt)
        return self._tensor(self.gpu.buffer(nbytes, "qlinear tensor"), dims, dt)

    def from_numpy(self, array: np.ndarray, *, readonly: bool = False) -> Tensor:
        """A device tensor holding a copy of ``array`` (s8 matrices padded with zero bytes).
        ``readonly=True`` marks it read-only: plans refuse to write it. ndarray subclasses
        are refused (:func:`qlinear.validate.host_array`)."""
        arr, dtype = host_array(array)
        shape = tuple(arr.shape)
        _, nbytes = tensor_layout(shape, dtype)
        buf = self.gpu.buffer(nbytes, "qlinear tensor")
        if nbytes:
            data = upload_bytes(arr, dtype, nbytes)
            with self.gpu.guard("writing a buffer"):
                self.device.queue.write_buffer(buf, 0, data)
        return self._tensor(buf, shape, dtype, readonly=readonly)

    def to_numpy(self, tensor: Any) -> np.ndarray:
        """A host copy of ``tensor``; submits the calling thread's open batches and waits for
        the work submitted before."""
        t = self.wrap(tensor, name="tensor")
        if t.backend != self.name:
            raise InvalidProblem(
                f"tensor: expected a wgpu tensor, got one of backend {t.backend!r}")
        if t.size == 0:
            return np.empty(t.shape, t.dtype.numpy)
        buf = t.handle
        if not buf.usage & self._wgpu.BufferUsage.COPY_SRC:
            raise InvalidProblem("tensor: expected a buffer with usage COPY_SRC to read it back, "
                                 f"got usage {int(buf.usage)}")
        self.gpu.flush_batches()
        a0, a1 = read_span(t)
        with self.gpu.guard("reading a buffer"):
            data = self.device.queue.read_buffer(buf, a0, a1 - a0)
        return host_view(np.frombuffer(data, np.uint8), t, a0)

    def wrap(self, obj: Any, *, name: str = "tensor") -> Tensor:
        """Return a qlinear :class:`Tensor` as is (validation then checks its backend), unless
        it is a wgpu tensor of another backend object's device (each ``create()`` opens its
        own device; its buffers cannot be bound here); anything else is refused: wrap a
        ``wgpu.GPUBuffer`` with :meth:`wrap_buffer`."""
        if isinstance(obj, Tensor):
            if obj.backend == "wgpu" and getattr(obj.handle, "_device", self.device) \
                    is not self.device:
                raise InvalidProblem(
                    f"{name}: expected a tensor of this wgpu backend's device "
                    f"({self.device_name}), got one of another backend instance's device "
                    "(tensors belong to the backend object that made them)")
            return obj
        raise InvalidProblem(
            f"{name}: expected a qlinear wgpu tensor (be.empty, be.from_numpy, be.wrap_buffer), "
            f"got {type(obj).__name__}; to use a wgpu.GPUBuffer, call "
            f"be.wrap_buffer(buffer, shape, dtype, offset=0)")

    def wrap_buffer(self, buffer: Any, shape: Sequence[int], dtype: DTypeLike, offset: int = 0,
                    *, readonly: bool = False) -> Tensor:
        """A tensor viewing ``buffer`` (a ``wgpu.GPUBuffer`` of this backend's device) from
        byte ``offset``, without a copy. The buffer needs usage STORAGE (and COPY_SRC for
        ``to_numpy``); ``offset`` must be a multiple of 4; the layout is
        :meth:`expected_strides` (s8 rows padded to 4 bytes), and the buffer must hold it
        up to a 4-byte boundary. Raises :class:`InvalidProblem` otherwise."""
        dt = as_dtype(dtype)
        dims = check_shape(shape)
        check_buffer_view(self._wgpu, buffer, dims, dt, offset)
        if getattr(buffer, "_device", self.device) is not self.device:
            raise InvalidProblem("buffer: expected a buffer of this backend's device "
                                 f"({self.device_name}), got one of another device")
        return self._tensor(buffer, dims, dt, int(offset), readonly=readonly)

    # -- streams -------------------------------------------------------------------
    def batch(self, *, timestamps: bool = False) -> Batch:
        """A :class:`Batch`: ``with be.batch() as b: plan.run(args, stream=b)`` encodes many
        runs and submits them once, at the end of the block. ``timestamps=True`` records
        GPU time (``b.gpu_seconds()``) where the adapter allows it (:attr:`has_timestamps`)."""
        return Batch(self, timestamps)

    @property
    def has_timestamps(self) -> bool:
        """Whether batches can record GPU timestamps on this adapter."""
        return {"timestamp-query", "timestamp-query-inside-encoders"} <= self.features

    @property
    def timestamp_period_ns(self) -> float:
        """Nanoseconds per timestamp tick (1.0 where wgpu does not say)."""
        return self.gpu.timestamp_period_ns

    check_stream = check_stream  # None, an open batch of this thread, or an encoder

    def synchronize(self, stream: Any = None) -> None:
        """Submit the calling thread's open batches and wait until all submitted work (of
        every thread) has finished."""
        self.gpu.flush_batches()
        self.gpu.wait()

    # -- shaders and executables -----------------------------------------------------
    def compile_wgsl(self, source: str, label: str = "qlinear") -> Any:
        """Compile WGSL ``source`` into a shader module, cached by its text. A compile
        error raises :class:`DeviceError` carrying naga's log."""
        return self.gpu.shaders.compile(source, label)

    shader_source = staticmethod(shader_source)

    def linear_executable(self, desc: QuantizedLinearDescriptor) -> LinearExecutable:
        """The two-kernel linear plan: fused activation pass of the descriptor's scheme,
        then the GEMM chosen by shape (small-M kernel for decode shapes, else tiled) and
        adapter (dot4I8Packed or f32 FMA), its epilogue taking out the zero point's share
        with an asymmetric scheme. f64 raises :class:`Unsupported`."""
        return LinearExecutable(self, desc)

    def quantize_executable(self, desc: DynamicRangeQuantizeDescriptor) -> QuantizeExecutable:
        """The fused activation pass of the descriptor's scheme alone (f64 raises
        :class:`Unsupported`)."""
        return QuantizeExecutable(self, desc)


def create() -> WgpuBackend:
    """The wgpu backend on the best adapter (high-performance preference), with the
    adapter's maximum limits and ``shader-f16`` and ``subgroup`` where offered.

    Raises :class:`BackendUnavailable` when wgpu is missing or finds no adapter."""
    hint = install_hint("wgpu")
    try:
        import wgpu
    except ImportError as e:
        raise BackendUnavailable("wgpu", f"cannot import wgpu ({e})", hint) from None
    with quiet_creation():
        return _open(wgpu, hint)


def _open(wgpu: Any, hint: str) -> WgpuBackend:
    try:
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception as e:  # wgpu raises RuntimeError or its own errors, by version
        raise BackendUnavailable("wgpu", f"no adapter found ({str(e).splitlines()[0]})",
                                 hint) from None
    if adapter is None:
        raise BackendUnavailable("wgpu", "no adapter found", hint)
    # "subgroup" is wgpu's name of WebGPU's "subgroups": the reductions use it where offered.
    features = [f for f in ("shader-f16", "subgroup", "timestamp-query",
                            "timestamp-query-inside-encoders") if f in adapter.features]
    limits = {k: adapter.limits[k] for k in adapter.limits}
    try:
        device = adapter.request_device_sync(required_features=features, required_limits=limits)
    except Exception:
        wanted = ("max-storage-buffer-binding-size", "max-buffer-size",
                  "max-compute-workgroup-storage-size", "max-compute-invocations-per-workgroup",
                  "max-compute-workgroup-size-x", "max-compute-workgroup-size-y",
                  "max-compute-workgroups-per-dimension", "max-storage-buffers-per-shader-stage")
        try:
            device = adapter.request_device_sync(
                required_features=features,
                required_limits={k: limits[k] for k in wanted if k in limits})
        except Exception as e:
            raise BackendUnavailable(
                "wgpu", f"cannot open a device on {adapter.info.get('device')}: "
                        f"{str(e).splitlines()[0]}", hint) from None
    return WgpuBackend(wgpu, adapter, device)
