"""The wgpu backend: WGSL compute shaders through wgpu (Vulkan, Metal, DX12, GL, and
Mesa's lavapipe on a machine without a GPU).

A linear run is two kernels in one compute pass: the fused activation pass
(``shaders/rowquant.wgsl``) and a GEMM with the dequant/bias epilogue fused
chosen by shape and adapter, and named in ``plan.sku``: for M <= 16 ``gemv.wgsl``,
which reads each weight word once; else ``gemm_dot4.wgsl`` (dot4I8Packed, 8 x 8
register tiles in 128 x 128 blocks for M > 64, 4 x 4 in 64 x 64 blocks below), or
``gemm_f32.wgsl`` (exact f32 multiply-adds over K-chunks of 1024) on Metal and GL,
where naga emulates dot4I8Packed. Tiles shrink to fit the adapter's workgroup memory.
``be.configured(...)`` overrides these choices (tests run every variant on lavapipe).

Kernels are specialised with WGSL ``override`` constants; the only source-level
step is choosing the element-access prelude (``elem_words.wgsl``, or
``elem_f16.wgsl`` where the adapter has ``shader-f16``), which is prepended, with
``common.wgsl`` (and ``linear_io.wgsl`` for the GEMMs), to the kernel family's file.

Numbers are the cpu backend's bit for bit: every rounding the contract names is
done in integer arithmetic inside the shaders (see ``shaders/common.wgsl``).

Tensors are ``wgpu.GPUBuffer`` ranges. s8 matrices have rows padded to a multiple
of 4 bytes (``expected_strides``), so that the kernels see whole u32 words; the pad
bytes of ``act_q`` are written as zeros.

Streams: ``plan.run(args)`` encodes and submits at once; ``plan.run(args,
stream=b)`` with ``b`` from ``be.batch()`` encodes into ``b``, and everything
encoded is submitted once, when the ``with`` block ends (or at ``b.submit()``);
``stream`` may also be a ``wgpu.GPUCommandEncoder`` that the caller finishes and
submits. ``be.to_numpy`` and ``be.synchronize`` submit open batches and wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from collections import OrderedDict
from typing import Optional

import numpy as np

from ..dtypes import DType, as_dtype, bf16, f16, f32, f64, s8
from ..errors import BackendUnavailable, DeviceError, InvalidProblem, Unsupported
from ..resources import read_source
from ..tensors import Tensor, contiguous_strides
from .base import Backend, Executable, PrecisionGuarantee

__all__ = ["WgpuBackend", "Batch", "create"]

_INSTALL = ("pip install wgpu; on Linux without a GPU: apt-get install mesa-vulkan-drivers "
            "libvulkan1")

#: Largest M served by the small-M (decode) kernel.
SMALL_M = 16
# Words of K whose f32 partial sums stay exact (1024 products of magnitude <= 2^14).
_FMA_CHUNK_WORDS = 256
# Stride of the per-dispatch parameter blocks in one uniform buffer: the largest
# min-uniform-buffer-offset-alignment WebGPU allows.
_PARAM_STRIDE = 256
_RUN_CACHE = 16

_GEMM_FAMILIES = ("gemm_dot4", "gemm_f32", "gemv")
# Bindings of each layout: storage buffers, then the uniform at 7.
_LAYOUTS = {
    "quant": (0, 1, 2),
    "linear": (0, 1, 2, 3, 4, 5),
    "matmul": (0, 1, 2),
    "micro": (0, 1),
}
_FAMILY_LAYOUT = {"rowquant": "quant", "gemm_dot4": "linear", "gemm_f32": "linear",
                  "gemv": "linear", "matmul_f32": "matmul", "micro": "micro"}
_TIN_KIND = {"f32": 0, "f16": 1, "bf16": 2}


def astuple_shallow(bundle) -> tuple:
    """The fields of a dataclass bundle, in order, without copying them."""
    return tuple(getattr(bundle, f.name) for f in dataclasses.fields(bundle))


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, int(x - 1).bit_length())


def _layout(shape: tuple, dtype: DType) -> tuple[tuple, int]:
    """(strides in elements, bytes) of a new tensor: s8 matrices get rows padded to 4 bytes."""
    if dtype == s8 and len(shape) >= 2:
        row = _round_up(shape[-1], 4)
        strides = [1]
        step = row
        for n in reversed(shape[1:-1]):
            strides.append(step)
            step *= max(n, 1)
        strides.append(step)
        strides = tuple(reversed(strides))
        nbytes = math.prod(shape[:-1]) * row if all(shape) else 0
        return strides, nbytes
    return contiguous_strides(tuple(shape)), math.prod(shape) * dtype.itemsize


def _shape(shape, name="shape") -> tuple:
    try:
        out = tuple(int(n) for n in shape)
        ok = all(int(n) == n and n >= 0 for n in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidProblem(f"{name}: expected a tuple of non-negative integers, got {shape!r}")
    return out


class Batch:
    """Many plan runs, one submit.

    ``with be.batch() as b:`` then ``plan.run(args, stream=b)`` any number of times:
    the runs are encoded into one command encoder and submitted together when the
    block ends (nothing is submitted if it ends with an exception). ``b.submit()``
    submits what is encoded so far and keeps the batch open. ``be.to_numpy`` and
    ``be.synchronize`` submit open batches first, so their results are visible.

    With ``be.batch(timestamps=True)`` (adapters with timestamp queries inside
    encoders) the GPU time of each submitted span is recorded: ``b.gpu_seconds()``."""

    def __init__(self, backend: "WgpuBackend", timestamps: bool = False):
        if timestamps and not backend.has_timestamps:
            raise Unsupported("timestamps: this adapter has no timestamp queries inside "
                              "command encoders (features timestamp-query and "
                              "timestamp-query-inside-encoders)")
        self.backend = backend
        self.timestamps = bool(timestamps)
        self._encoder = None
        self._query = None
        self._spans: list = []
        self._open = False
        #: Plan runs encoded since the last submit.
        self.pending = 0
        #: Plan runs submitted by this batch.
        self.submitted = 0

    def encoder(self):
        """The ``wgpu.GPUCommandEncoder`` runs are encoded into (created on first use)."""
        if not self._open:
            raise InvalidProblem("stream: expected an open batch (inside its 'with' block), "
                                 "got one that has ended")
        if self._encoder is None:
            be = self.backend
            with be._guard("creating a command encoder"):
                self._encoder = be.device.create_command_encoder(label="qlinear batch")
                if self.timestamps:
                    self._query = be.device.create_query_set(type="timestamp", count=2)
                    be._write_timestamp(self._encoder, self._query, 0)
        return self._encoder

    def submit(self) -> None:
        """Submit what has been encoded so far (one queue submit); the batch stays open."""
        enc, self._encoder = self._encoder, None
        if enc is None:
            return
        be = self.backend
        with be._guard("submitting a batch"):
            if self.timestamps:
                u = be._wgpu.BufferUsage
                out = be.device.create_buffer(size=16, usage=u.QUERY_RESOLVE | u.COPY_SRC)
                be._write_timestamp(enc, self._query, 1)
                enc.resolve_query_set(self._query, 0, 2, out, 0)
                self._spans.append(out)
            be.device.queue.submit([enc.finish()])
        self.submitted += self.pending
        self.pending = 0

    def gpu_seconds(self) -> float:
        """GPU time of the spans submitted so far (``timestamps=True``); waits for them."""
        if not self.timestamps:
            raise InvalidProblem("gpu_seconds: expected a batch made with timestamps=True")
        be = self.backend
        total = 0
        for buf in self._spans:
            with be._guard("reading timestamps"):
                t0, t1 = np.frombuffer(be.device.queue.read_buffer(buf), np.uint64)[:2]
            total += int(t1) - int(t0)
        return total * be.timestamp_period_ns * 1e-9

    def __enter__(self) -> "Batch":
        self._open = True
        self.backend._batches.append(self)
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.submit()
            else:
                self._encoder = None
        finally:
            self._open = False
            self.backend._batches.remove(self)
        return False

    def __repr__(self) -> str:
        return f"<qlinear wgpu Batch pending={self.pending} submitted={self.submitted}>"


class _Dispatches:
    """Everything one run encodes: (pipeline, bind group, grid) in order."""

    __slots__ = ("items",)

    def __init__(self, items):
        self.items = items


class _RunCache:
    """Bind groups and parameters per set of tensors, keyed by buffer ids and offsets.

    It holds no Python reference to the buffers: the entries of a buffer are dropped
    when it is collected (so an id is never reused while cached, and the bind groups,
    which keep the native buffer alive, go with it). One finalizer per buffer."""

    def __init__(self):
        self.entries: OrderedDict = OrderedDict()
        self._watched: dict = {}  # id(buffer) -> keys of the entries that bind it

    def lookup(self, buffers, key, build):
        d = self.entries.get(key)
        if d is not None:
            self.entries.move_to_end(key)
            return d
        d = self.entries[key] = build()
        for buf in buffers:
            keys = self._watched.get(id(buf))
            if keys is None:
                keys = self._watched[id(buf)] = set()
                weakref.finalize(buf, _forget_buffer, weakref.ref(self), id(buf))
            keys.add(key)
        while len(self.entries) > _RUN_CACHE:
            self._drop(next(iter(self.entries)))
        return d

    def _drop(self, key) -> None:
        self.entries.pop(key, None)
        for bid, _ in key:
            keys = self._watched.get(bid)
            if keys is not None:
                keys.discard(key)

    def forget(self, bid) -> None:
        for key in list(self._watched.pop(bid, ())):
            self._drop(key)

    def __len__(self) -> int:
        return len(self.entries)


def _forget_buffer(ref, bid) -> None:
    cache = ref()
    if cache is not None:
        cache.forget(bid)


class _WgpuExecutable(Executable):
    """Shared run machinery: bind groups cached per set of tensors, encoding, submit."""

    def __init__(self, be: "WgpuBackend", desc):
        self.be = be
        self.desc = desc
        self.settings = dict(be._settings)
        self._runs = _RunCache()

    def _cached(self, tensors, build):
        tensors = [t for t in tensors if t is not None]
        key = tuple((id(t.memory), t.buffer_offset) for t in tensors)
        return self._runs.lookup([t.memory for t in tensors], key, build)

    def _encode(self, stream, dispatches: _Dispatches) -> None:
        be = self.be

        def record(enc):
            with be._guard("encoding a compute pass"):
                cp = enc.begin_compute_pass(label=self.sku)
                for pipeline, bind_group, grid in dispatches.items:
                    cp.set_pipeline(pipeline)
                    cp.set_bind_group(0, bind_group)
                    cp.dispatch_workgroups(*grid)
                cp.end()

        if stream is None:
            enc = be.device.create_command_encoder(label="qlinear run")
            record(enc)
            with be._guard("submitting a run"):
                be.device.queue.submit([enc.finish()])
        elif isinstance(stream, Batch):
            if stream.backend is not be:
                raise InvalidProblem("stream: expected a batch of this backend, got one of another")
            record(stream.encoder())
            stream.pending += 1
        elif isinstance(stream, be._wgpu.GPUCommandEncoder):
            record(stream)
        else:
            raise InvalidProblem(
                "stream: expected None, a batch from be.batch() or a wgpu.GPUCommandEncoder, "
                f"got {type(stream).__name__}")


class _Choice:
    """What a plan runs: kernel parameters, and the name that says so."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _with_f16_note(g: PrecisionGuarantee, c: "_Choice") -> PrecisionGuarantee:
    if c.elem_tag != "f16_native":
        return g
    return PrecisionGuarantee(
        g.bit_identical, g.deterministic, True, g.exact_int32,
        g.note + " f16 storage is native: values are rounded in integer arithmetic, then moved "
                 "through the adapter's exact f16<->f32 conversions, which keep f16 subnormals on "
                 "lavapipe and desktop GPUs; an adapter that flushed them would flush subnormal "
                 "f16 scales and outputs (f16_storage='packed' is integer-only).")


class _QuantizeExecutable(_WgpuExecutable):
    precision_guarantee = PrecisionGuarantee(
        flushes_subnormals=False,
        note="amax, scale and quantization are computed in integer arithmetic on bit patterns "
             "(exact division, round half to even): identical to the cpu backend, "
             "subnormal inputs included")

    def __init__(self, be, desc):
        super().__init__(be, desc)
        self.choice = be._choose_quant(desc.dtype, desc.k, self.settings)
        self.sku = f"wgpu.{_quant_name(self.choice)}+{self.choice.elem_tag}"
        self.precision_guarantee = _with_f16_note(self.precision_guarantee, self.choice)
        self.pipeline = be._quant_pipeline(self.choice, desc.q_min, desc.q_max)
        self.rows_per_dispatch = be._quant_rows_per_dispatch(desc.k, desc.dtype, self.settings)

    def run(self, t, stream=None):
        x, q, s = t.activation, t.act_q, t.act_scale
        d = self._cached((x, q, s), lambda: self.be._quant_dispatches(
            self.pipeline, self.desc, self.rows_per_dispatch, x, q, s))
        self._encode(stream, d)


class _LinearExecutable(_WgpuExecutable):
    precision_guarantee = PrecisionGuarantee(
        flushes_subnormals=True,
        note="activation pass exact in integer arithmetic; int32 accumulation exact; the "
             "epilogue's two f32 multiplies and bias add are correctly rounded float operations "
             "(kept unfused), other roundings are integer RNE: identical to the cpu backend. "
             "Adapters that flush subnormal floats may flush subnormal products in the epilogue.")

    def __init__(self, be, desc):
        super().__init__(be, desc)
        self.choice = c = be._choose_linear(desc, self.settings)
        self.quant_choice = be._choose_quant(desc.dtype, desc.k, self.settings)
        self.sku = f"wgpu.{_quant_name(self.quant_choice)}+{c.name}+{c.elem_tag}"
        self.precision_guarantee = _with_f16_note(self.precision_guarantee, c)
        self.quant_pipeline = be._quant_pipeline(self.quant_choice, desc.q_min, desc.q_max)
        self.quant_rows = be._quant_rows_per_dispatch(desc.k, desc.dtype, self.settings)
        self.gemm_pipelines = {has_bias: be._gemm_pipeline(c, has_bias) for has_bias in (False, True)}

    def run(self, t, stream=None):
        # A bias-less run of the same tensors has its own entry: the key's length differs.
        d = self._cached(astuple_shallow(t), lambda: self._build(t))
        self._encode(stream, d)

    def _build(self, t) -> _Dispatches:
        be, desc = self.be, self.desc
        quant = be._quant_dispatches(self.quant_pipeline, desc.activation_pass, self.quant_rows,
                                     t.activation, t.act_q_scratch, t.act_scale_scratch)
        gemm = be._gemm_dispatches(self.gemm_pipelines[t.bias is not None], self.choice, desc,
                                   t, self.settings)
        return _Dispatches(quant.items + gemm.items)


class WgpuBackend(Backend):
    """WGSL kernels on a wgpu adapter. Tensors are ``wgpu.GPUBuffer`` ranges."""

    name = "wgpu"

    def __init__(self, wgpu_module, adapter, device):
        self._wgpu = wgpu_module
        self.adapter = adapter
        self.device = device
        info = adapter.info
        self.adapter_info = {k: info[k] for k in info}
        self.adapter_type = str(self.adapter_info.get("adapter_type", ""))
        self.backend_type = str(self.adapter_info.get("backend_type", ""))
        # lavapipe and other software adapters report "CPU": no GPU in this machine.
        self.is_gpu = self.adapter_type in ("DiscreteGPU", "IntegratedGPU", "VirtualGPU")
        self.device_id = "wgpu:0"
        self.features = frozenset(str(f) for f in device.features)
        self.limits = {k: device.limits[k] for k in device.limits}
        self._settings = {
            "inner_product": None,  # None (per adapter), "dot4" or "fma"
            "f16_storage": None,    # None (native where shader-f16), "native" or "packed"
            "quantize_exact_only": False,  # every element through the integer division
            "tile": None,           # None (per adapter and M), "4x4" or "8x8" register tiles
            "max_storage_binding": int(self.limits["max-storage-buffer-binding-size"]),
            "max_workgroups_per_dim": int(self.limits["max-compute-workgroups-per-dimension"]),
            "max_workgroup_storage": int(self.limits["max-compute-workgroup-storage-size"]),
        }
        self._align = max(4, int(self.limits["min-storage-buffer-offset-alignment"]))
        self._modules: dict = {}
        self._pipelines: dict = {}
        self._layouts: dict = {}
        self._batches: list = []
        usage = self._wgpu.BufferUsage
        self._dummy = device.create_buffer(
            size=16, usage=usage.STORAGE | usage.COPY_SRC | usage.COPY_DST, label="qlinear dummy")

    # -- facts ---------------------------------------------------------------------
    @property
    def device_name(self) -> str:
        """The adapter, its driver API and its type (e.g. lavapipe is "Vulkan, CPU")."""
        return (f"{self.adapter_info.get('device') or self.adapter_info.get('description')} "
                f"({self.backend_type}, {self.adapter_type})")

    def info(self) -> dict:
        """Adapter, type, limits, features and the kernels chosen for typical shapes."""
        from ..problem import QuantizedLinearDescriptor

        kernels = {}
        for label, m in (("decode M=1", 1), ("decode M=16", 16), ("prefill M=512", 512)):
            for dt in (f32, f16, bf16):
                desc = QuantizedLinearDescriptor(m, 4096, 4096, dt)
                try:
                    c = self._choose_linear(desc, self._settings)
                    q = self._choose_quant(dt, 4096, self._settings)
                    kernels[f"{label}, K=N=4096, {dt.name}"] = (
                        f"wgpu.{_quant_name(q)}+{c.name}+{c.elem_tag}")
                except Unsupported as e:
                    kernels[f"{label}, K=N=4096, {dt.name}"] = f"unsupported: {e}"
        kernels["f64"] = "unsupported: WGSL has no 64-bit floats"
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
            "inner_product": self._inner_product(self._settings),
            "f16_storage": self._f16_native(self._settings) and "native" or "packed",
            "kernels": kernels,
        }

    def settings(self) -> dict:
        """The current kernel choices and limits plans are made with (see :meth:`configured`)."""
        return dict(self._settings)

    @contextlib.contextmanager
    def configured(self, **settings):
        """Temporarily change how plans selected inside the block are made, for tests and
        experiments; restored on exit. Keys: ``inner_product`` ("dot4" or "fma"; None =
        per adapter: dot4I8Packed unless the adapter's API is Metal or GL, where naga
        emulates it), ``f16_storage`` ("native" or "packed"; None = native where the
        adapter has ``shader-f16``), ``quantize_exact_only`` (True: every activation
        element takes the integer division that otherwise only settles quotients near a
        rounding edge), ``tile`` ("4x4" or "8x8" register tiles of the dot4 GEMM; None =
        8 x 8 for M > 64), and the limits ``max_storage_binding``,
        ``max_workgroups_per_dim``, ``max_workgroup_storage`` (bytes / counts; lowering
        them exercises the sub-range binding, dispatch splitting and tile fallback
        that big problems need). Plans keep the settings they were selected with."""
        unknown = sorted(set(settings) - set(self._settings))
        if unknown:
            raise InvalidProblem(f"settings: expected keys among {sorted(self._settings)}, "
                                 f"got {unknown}")
        allowed = {"inner_product": (None, "dot4", "fma"), "f16_storage": (None, "native", "packed"),
                   "quantize_exact_only": (False, True), "tile": (None, "4x4", "8x8")}
        for k, v in settings.items():
            if k in allowed and v not in allowed[k]:
                raise InvalidProblem(f"{k}: expected one of {allowed[k]}, got {v!r}")
            if k not in allowed and not (isinstance(v, int) and v > 0):
                raise InvalidProblem(f"{k}: expected a positive integer, got {v!r}")
        old = dict(self._settings)
        self._settings.update(settings)
        try:
            yield self
        finally:
            self._settings = old

    def cache_info(self) -> dict:
        """How many shader modules, pipelines and layouts this device has compiled and cached."""
        return {"modules": len(self._modules), "pipelines": len(self._pipelines),
                "layouts": len(self._layouts)}

    # -- errors --------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self, what: str):
        """wgpu's own errors (validation, out of memory, internal, device lost) as DeviceError."""
        try:
            yield
        except (InvalidProblem, Unsupported, DeviceError):
            raise
        except (self._wgpu.GPUError, RuntimeError) as e:
            raise DeviceError(f"wgpu: {what} failed ({type(e).__name__})", native=str(e)) from e

    # -- tensors -------------------------------------------------------------------
    def expected_strides(self, shape, dtype):
        """Row-major strides, except that s8 matrices have rows padded to a multiple of 4
        elements (the kernels read them as u32 words): ``(round_up(K, 4), 1)``."""
        return _layout(tuple(shape), as_dtype(dtype))[0]

    def _usage(self):
        u = self._wgpu.BufferUsage
        return u.STORAGE | u.COPY_SRC | u.COPY_DST

    def _buffer(self, nbytes: int, label: str):
        # Sizes rounded to 16 so that every 4-byte-rounded binding or read stays inside.
        with self._guard(f"allocating {nbytes} bytes"):
            return self.device.create_buffer(size=max(16, _round_up(nbytes, 16)),
                                             usage=self._usage(), label=label)

    def _tensor(self, buf, shape, dtype, offset=0, readonly=False) -> Tensor:
        strides, _ = _layout(shape, dtype)
        return Tensor("wgpu", self.device_id, shape, dtype, strides, buf, buf,
                      buffer_offset=offset, owner=buf, readonly=readonly)

    def empty(self, shape, dtype):
        """A new device tensor (zero-filled, as WebGPU buffers are; s8 row pads included)."""
        dtype = as_dtype(dtype)
        shape = _shape(shape)
        _, nbytes = _layout(shape, dtype)
        return self._tensor(self._buffer(nbytes, "qlinear tensor"), shape, dtype)

    def from_numpy(self, array, *, readonly=False):
        """A device tensor holding a copy of ``array`` (s8 matrices padded with zero bytes).
        ``readonly=True`` marks it read-only: plans refuse to write it."""
        arr = np.asarray(array)
        dtype = as_dtype(arr.dtype, name="array")
        shape = tuple(arr.shape)
        _, nbytes = _layout(shape, dtype)
        buf = self._buffer(nbytes, "qlinear tensor")
        if nbytes:
            if dtype == s8 and arr.ndim >= 2 and shape[-1] % 4:
                padded = np.zeros(shape[:-1] + (_round_up(shape[-1], 4),), np.int8)
                padded[..., :shape[-1]] = arr
                data = padded.reshape(-1).view(np.uint8)
            else:
                data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            if nbytes % 4:
                data = np.concatenate([data, np.zeros(4 - nbytes % 4, np.uint8)])
            with self._guard("writing a buffer"):
                self.device.queue.write_buffer(buf, 0, data)
        return self._tensor(buf, shape, dtype, readonly=readonly)

    def to_numpy(self, tensor):
        """A host copy of ``tensor``; submits open batches and waits for the work before it."""
        t = self.wrap(tensor, name="tensor")
        if t.backend != self.name:
            raise InvalidProblem(f"tensor: expected a wgpu tensor, got one of backend {t.backend!r}")
        if t.size == 0:
            return np.empty(t.shape, t.dtype.numpy)
        buf = t.handle
        if not buf.usage & self._wgpu.BufferUsage.COPY_SRC:
            raise InvalidProblem("tensor: expected a buffer with usage COPY_SRC to read it back, "
                                 f"got usage {int(buf.usage)}")
        self._flush_batches()
        start, end = t.byte_span()
        a0 = start - start % 4
        a1 = _round_up(end, 4)
        with self._guard("reading a buffer"):
            data = self.device.queue.read_buffer(buf, a0, a1 - a0)
        raw = np.frombuffer(data, np.uint8)[start - a0:end - a0].view(t.dtype.numpy)
        item = t.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(raw, t.shape, tuple(s * item for s in t.strides))
        return np.array(view, copy=True)

    def wrap(self, obj, *, name="tensor"):
        """Return a qlinear :class:`Tensor` as is (validation then checks its backend);
        anything else is refused: wrap a ``wgpu.GPUBuffer`` with :meth:`wrap_buffer`."""
        if isinstance(obj, Tensor):
            return obj
        raise InvalidProblem(
            f"{name}: expected a qlinear wgpu tensor (be.empty, be.from_numpy, be.wrap_buffer), "
            f"got {type(obj).__name__}; to use a wgpu.GPUBuffer, call "
            f"be.wrap_buffer(buffer, shape, dtype, offset=0)")

    def wrap_buffer(self, buffer, shape, dtype, offset: int = 0, *, readonly: bool = False):
        """A tensor viewing ``buffer`` (a ``wgpu.GPUBuffer`` of this backend's device) from
        byte ``offset``, without a copy. The buffer needs usage STORAGE (and COPY_SRC for
        ``to_numpy``); ``offset`` must be a multiple of 4; the layout is
        :meth:`expected_strides` (s8 rows padded to 4 bytes), and the buffer must hold it
        up to a 4-byte boundary. Raises :class:`InvalidProblem` otherwise."""
        if not isinstance(buffer, self._wgpu.GPUBuffer):
            raise InvalidProblem(f"buffer: expected a wgpu.GPUBuffer, got {type(buffer).__name__}")
        if getattr(buffer, "_device", self.device) is not self.device:
            raise InvalidProblem("buffer: expected a buffer of this backend's device "
                                 f"({self.device_name}), got one of another device")
        dtype = as_dtype(dtype)
        shape = _shape(shape)
        usage = self._wgpu.BufferUsage
        if not buffer.usage & usage.STORAGE:
            raise InvalidProblem("buffer: expected usage flags including STORAGE, got "
                                 f"{_usage_names(self._wgpu, buffer.usage)}")
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
            raise InvalidProblem(f"offset: expected a non-negative integer, got {offset!r}")
        if offset % 4:
            raise InvalidProblem(f"offset: expected a multiple of 4 bytes, got {offset}")
        _, nbytes = _layout(shape, dtype)
        need = _round_up(int(offset) + nbytes, 4)
        if need > buffer.size:
            raise InvalidProblem(
                f"buffer: expected at least {need} bytes for a {dtype.name} tensor of shape "
                f"{shape} at offset {offset}, got a buffer of {buffer.size} bytes")
        return self._tensor(buffer, shape, dtype, int(offset), readonly=readonly)

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
        try:
            from wgpu.backends.wgpu_native._ffi import lib

            period = float(lib.wgpuQueueGetTimestampPeriod(self.device.queue._internal))
            return period if period > 0 else 1.0
        except Exception:  # a private entry point: absent in other wgpu versions
            return 1.0

    def _write_timestamp(self, encoder, query_set, index) -> None:
        from wgpu.backends.wgpu_native.extras import write_timestamp

        write_timestamp(encoder, query_set, index)

    def _flush_batches(self) -> None:
        for b in list(self._batches):
            b.submit()

    def synchronize(self, stream=None):
        """Submit open batches and wait until all submitted work has finished."""
        self._flush_batches()
        # queue.on_submitted_work_done_sync does not return in wgpu 0.32; reading back
        # four bytes maps a buffer after everything submitted before it.
        with self._guard("waiting for the queue"):
            self.device.queue.read_buffer(self._dummy, 0, 4)

    # -- shaders and pipelines -----------------------------------------------------
    def compile_wgsl(self, source: str, label: str = "qlinear"):
        """Compile WGSL ``source`` into a shader module, cached by its text. A compile
        error raises :class:`DeviceError` carrying naga's log."""
        mod = self._modules.get(source)
        if mod is None:
            with self._guard(f"compiling WGSL module {label!r}"):
                mod = self.device.create_shader_module(label=label, code=source)
            self._modules[source] = mod
        return mod

    @staticmethod
    def shader_source(family: str, elem: str = "words") -> str:
        """The WGSL text of kernel ``family`` (a file of ``shaders/``) as compiled: the
        element-access prelude (``elem`` = "words" or "f16"), ``common.wgsl``, the GEMM
        bindings for GEMM families, then the family itself."""
        if family in ("matmul_f32", "micro"):
            return read_source("shaders", f"{family}.wgsl")
        if elem not in ("words", "f16"):
            raise InvalidProblem(f"elem: expected 'words' or 'f16', got {elem!r}")
        parts = [f"elem_{elem}.wgsl", "common.wgsl"]
        if family in _GEMM_FAMILIES:
            parts.append("linear_io.wgsl")
        parts.append(f"{family}.wgsl")
        return "\n".join(read_source("shaders", p) for p in parts)

    def _layout_for(self, kind: str):
        lay = self._layouts.get(kind)
        if lay is None:
            stage = self._wgpu.ShaderStage.COMPUTE
            entries = [{"binding": b, "visibility": stage, "buffer": {"type": "storage"}}
                       for b in _LAYOUTS[kind]]
            if kind != "micro":
                entries.append({"binding": 7, "visibility": stage, "buffer": {"type": "uniform"}})
            with self._guard("creating a pipeline layout"):
                bgl = self.device.create_bind_group_layout(entries=entries)
                pl = self.device.create_pipeline_layout(bind_group_layouts=[bgl])
            lay = self._layouts[kind] = (bgl, pl)
        return lay

    def _pipeline(self, family: str, elem: str, constants: dict, entry: str = "main"):
        key = (family, elem, entry, tuple(sorted(constants.items())))
        pipe = self._pipelines.get(key)
        if pipe is None:
            module = self.compile_wgsl(self.shader_source(family, elem), label=family)
            _, layout = self._layout_for(_FAMILY_LAYOUT[family])
            with self._guard(f"creating the {family} pipeline"):
                pipe = self.device.create_compute_pipeline(
                    layout=layout, label=family,
                    compute={"module": module, "entry_point": entry,
                             "constants": {k: float(v) for k, v in constants.items()}})
            self._pipelines[key] = pipe
        return pipe

    # -- choices -------------------------------------------------------------------
    def _inner_product(self, settings) -> str:
        if settings["inner_product"]:
            return settings["inner_product"]
        # naga lowers dot4I8Packed to scalar shifts and multiplies for MSL and GLSL.
        return "fma" if self.backend_type in ("Metal", "OpenGL") else "dot4"

    def _f16_native(self, settings) -> bool:
        if settings["f16_storage"] == "native":
            if "shader-f16" not in self.features:
                raise Unsupported("f16_storage: 'native' needs the adapter feature shader-f16, "
                                  "which this adapter lacks")
            return True
        if settings["f16_storage"] == "packed":
            return False
        return "shader-f16" in self.features

    def _elem(self, dtype: DType, settings) -> tuple[str, dict, str]:
        """(prelude, constants, tag) for TIn = dtype."""
        if dtype == f64:
            raise Unsupported("dtype f64: WGSL has no 64-bit floats on the wgpu backend "
                              "(use f32, f16 or bf16 here, or the cpu or cuda backend for f64)")
        if dtype == f16 and self._f16_native(settings):
            return "f16", {}, "f16_native"
        tag = {"f32": "f32_words", "f16": "f16_packed", "bf16": "bf16_packed"}[dtype.name]
        return "words", {"TIN_KIND": _TIN_KIND[dtype.name]}, tag

    def _max_invocations(self) -> int:
        return min(int(self.limits["max-compute-invocations-per-workgroup"]),
                   int(self.limits["max-compute-workgroup-size-x"]))

    def _choose_quant(self, dtype, k, settings) -> _Choice:
        elem, consts, tag = self._elem(dtype, settings)
        # One workgroup per row; on a CPU adapter (lavapipe) small workgroups are cheaper.
        cap = 256 if self.is_gpu else 32
        wg = min(cap, self._max_invocations(), max(32, _pow2_at_least(-(-k // 4))))
        return _Choice(elem=elem, consts=consts, elem_tag=tag, wg=wg,
                       exact=bool(settings["quantize_exact_only"]))

    def _choose_linear(self, desc, settings) -> _Choice:
        elem, consts, tag = self._elem(desc.dtype, settings)
        ip = self._inner_product(settings)
        # |acc| <= K * 128 * 128: below 2^24 every int32 -> f32 conversion is exact.
        big_acc = desc.k * 128 * max(-desc.q_min, desc.q_max) > 2**24
        wg_mem = settings["max_workgroup_storage"]
        inv = min(int(self.limits["max-compute-invocations-per-workgroup"]),
                  int(self.limits["max-compute-workgroup-size-x"]) *
                  int(self.limits["max-compute-workgroup-size-y"]))
        if desc.m <= SMALL_M:
            # 32 lanes along K read a weight row coalesced on a GPU; on a CPU adapter
            # (lavapipe) each invocation is a SIMD lane and fewer, longer ones win.
            kl, cg = (32, 8) if self.is_gpu else (8, 8)

            def mem(kl):
                return 16 * cg * 4 + kl * cg * 16  # row sums + the parked vec4 partials

            # Fewer K lanes to fit the invocation or workgroup-memory limits.
            while (kl * cg > inv or mem(kl) > wg_mem) and kl > 1:
                kl //= 2
            mem = mem(kl)
            if mem > wg_mem or kl * cg > inv:
                raise Unsupported(
                    f"workgroup memory: the small-M kernel needs {mem} bytes and {kl * cg} "
                    f"invocations, the adapter allows {wg_mem} bytes and {inv}")
            name = f"gemv_m{desc.m}_kl{kl}_c{cg}_{ip}"
            return _Choice(kind="gemv", family="gemv", elem=elem, consts=consts, elem_tag=tag,
                           ip=ip, kl=kl, cg=cg, name=name, bm=SMALL_M, bn=cg, m=max(1, desc.m),
                           big_acc=big_acc)
        word = 16 if ip == "fma" else 4  # bytes per staged word: vec4<f32> or u32
        family = "gemm_f32" if ip == "fma" else "gemm_dot4"
        # (block, register tile). The 8 x 8 tile halves the workgroup-memory traffic per
        # multiply-add, which bounds the 4 x 4 tile on GPUs (and measured 1.6x faster on
        # lavapipe); it needs M to fill 128-row blocks.
        want8 = ip == "dot4" and (settings["tile"] == "8x8" or (
            settings["tile"] is None and desc.m > 64))
        shapes = ([(128, 8)] if want8 else []) + [(64, 4), (32, 4)]
        # Deeper K steps mean fewer barriers, which lavapipe pays dearly for (measured
        # best: 32 words); GPUs keep a shallow, cache-friendly 8.
        bks = (8, 4, 2, 1) if self.is_gpu or ip == "fma" else (32, 16, 8, 4, 2, 1)
        tried = []
        for block, tile in shapes:
            if (block // tile) ** 2 > inv:
                tried.append(f"{block}x{block} r{tile}x{tile}: {(block // tile) ** 2} invocations")
                continue
            for bk in bks:
                mem = bk * 2 * block * word
                tried.append(f"{block}x{block}x{bk * 4}: {mem} B")
                if mem <= wg_mem:
                    name = f"gemm_tiled_{block}x{block}x{bk * 4}_r{tile}x{tile}_{ip}"
                    return _Choice(kind="tiled", family=family, elem=elem, consts=consts,
                                   elem_tag=tag, ip=ip, bm=block, bn=block, bk=bk, tile=tile,
                                   entry="main" if ip == "fma" else f"tile{tile}x{tile}",
                                   name=name, big_acc=big_acc)
        raise Unsupported(
            f"workgroup memory: no GEMM tile fits the adapter's limit of {wg_mem} bytes and "
            f"{inv} invocations per workgroup (tried {', '.join(tried)})")

    def _quant_pipeline(self, c: _Choice, q_min: int, q_max: int):
        consts = dict(c.consts, WG=c.wg, Q_MIN=q_min, Q_MAX=q_max, EXACT_ONLY=int(c.exact))
        return self._pipeline("rowquant", c.elem, consts)

    def _gemm_pipeline(self, c: _Choice, has_bias: bool):
        consts = dict(c.consts, HAS_BIAS=int(has_bias), BIG_ACC=int(c.big_acc))
        if c.kind == "gemv":
            consts.update(KL=c.kl, CG=c.cg, MROWS=c.m, STRATEGY=1 if c.ip == "fma" else 0)
        else:
            consts.update(BM=c.bm, BN=c.bn, BK=c.bk, WGX=c.bn // c.tile, WGY=c.bm // c.tile)
            return self._pipeline(c.family, c.elem, consts, entry=c.entry)
        return self._pipeline(c.family, c.elem, consts)

    # -- dispatch planning ---------------------------------------------------------
    def _binding_room(self, settings) -> int:
        """Bytes a block may span so that, aligned down and rounded up, it fits one binding."""
        return settings["max_storage_binding"] - self._align - 4

    def _quant_rows_per_dispatch(self, k, dtype, settings) -> int:
        room = self._binding_room(settings)
        per_row = max(k * dtype.itemsize, _round_up(k, 4), dtype.itemsize, 1)
        if per_row > room:
            raise Unsupported(
                f"k: a row of {k} elements needs {per_row} bytes in one storage binding, "
                f"the adapter allows {settings['max_storage_binding']}")
        return max(1, min(settings["max_workgroups_per_dim"], room // per_row))

    def _range(self, t: Optional[Tensor], b0: int, b1: int):
        """Bind bytes [b0, b1) of tensor ``t``: (resource, byte offset of b0 inside it)."""
        if t is None or b1 <= b0:
            return {"buffer": self._dummy, "offset": 0, "size": 16}, 0
        start = t.buffer_offset + b0
        off = start - start % self._align
        size = _round_up(t.buffer_offset + b1 - off, 4)
        return {"buffer": t.handle, "offset": off, "size": size}, start - off

    def _params_buffer(self, blocks: list):
        data = np.zeros((len(blocks), _PARAM_STRIDE // 4), np.uint32)
        for i, b in enumerate(blocks):
            data[i, :len(b)] = b
        u = self._wgpu.BufferUsage
        with self._guard("writing kernel parameters"):
            buf = self.device.create_buffer(size=data.nbytes, usage=u.UNIFORM | u.COPY_DST)
            self.device.queue.write_buffer(buf, 0, data)
        return buf

    def _bind_group(self, kind: str, resources: dict, params, index: int, nbytes: int):
        bgl, _ = self._layout_for(kind)
        entries = [{"binding": b, "resource": r} for b, r in sorted(resources.items())]
        entries.append({"binding": 7, "resource": {"buffer": params, "offset": index * _PARAM_STRIDE,
                                                    "size": nbytes}})
        with self._guard("creating a bind group"):
            return self.device.create_bind_group(layout=bgl, entries=entries)

    def _quant_dispatches(self, pipeline, desc, rows_per, x, q, s) -> _Dispatches:
        k, isz = desc.k, desc.dtype.itemsize
        kp = _round_up(k, 4)
        blocks, binds = [], []
        for r0 in range(0, desc.m, rows_per):
            rows = min(rows_per, desc.m - r0)
            xr, xo = self._range(x, r0 * k * isz, (r0 + rows) * k * isz)
            qr, qo = self._range(q, r0 * kp, (r0 + rows) * kp)
            sr, so = self._range(s, r0 * isz, (r0 + rows) * isz)
            blocks.append([k, kp // 4, xo // isz, qo // 4, so // isz])
            binds.append(({0: sr, 1: xr, 2: qr}, rows))
        params = self._params_buffer(blocks)
        items = [(pipeline, self._bind_group("quant", res, params, i, 32), (rows, 1, 1))
                 for i, (res, rows) in enumerate(binds)]
        return _Dispatches(items)

    def _gemm_dispatches(self, pipeline, c: _Choice, desc, t, settings) -> _Dispatches:
        m, n, k = desc.m, desc.c_out, desc.k
        isz = desc.dtype.itemsize
        kp = _round_up(k, 4)
        room = self._binding_room(settings)
        max_wg = settings["max_workgroups_per_dim"]
        # Columns per block: its weight rows (and scales, bias) in one binding, its grid in range.
        cols = min(n, max_wg * c.bn, room // max(kp, isz))
        if c.bn <= cols < n:
            cols = cols // c.bn * c.bn
        if cols < 1:
            raise Unsupported(f"weight_q: one row of {kp} bytes exceeds the storage binding "
                              f"limit of {settings['max_storage_binding']} bytes")
        rows_cap = m if c.kind == "gemv" else max_wg * c.bm
        blocks, binds = [], []
        y, a, w = t.output, t.act_q_scratch, t.weight_q
        s, ws, bias = t.act_scale_scratch, t.weight_scale, t.bias
        for c0 in range(0, n, cols):
            nc = min(cols, n - c0)
            # Rows per block: their act_q rows and the y span [r0*n + c0, (r0+nr-1)*n + c0 + nc)
            # each in one binding.
            rows = min(rows_cap, m, room // max(kp, isz), (room // isz - nc) // n + 1)
            if rows < 1:
                raise Unsupported(f"output: one row block exceeds the storage binding limit of "
                                  f"{settings['max_storage_binding']} bytes")
            for r0 in range(0, m, rows):
                nr = min(rows, m - r0)
                ar, ao = self._range(a, r0 * kp, (r0 + nr) * kp)
                wr, wo = self._range(w, c0 * kp, (c0 + nc) * kp)
                sr, so = self._range(s, r0 * isz, (r0 + nr) * isz)
                wsr, wso = self._range(ws, c0 * isz, (c0 + nc) * isz)
                br, bo = self._range(bias, c0 * isz, (c0 + nc) * isz)
                yr, yo = self._range(y, (r0 * n + c0) * isz, ((r0 + nr - 1) * n + c0 + nc) * isz)
                blocks.append([nr, nc, kp // 4, ao // 4, wo // 4, so // isz, wso // isz,
                               bo // isz, yo // isz, n, 0, 0])
                grid = (-(-nc // c.bn), 1 if c.kind == "gemv" else -(-nr // c.bm), 1)
                binds.append(({0: yr, 1: ar, 2: wr, 3: sr, 4: wsr, 5: br}, grid))
        params = self._params_buffer(blocks)
        items = [(pipeline, self._bind_group("linear", res, params, i, 48), grid)
                 for i, (res, grid) in enumerate(binds)]
        return _Dispatches(items)

    # -- kernels -------------------------------------------------------------------
    def linear_executable(self, desc):
        """The two-kernel linear plan: fused activation pass, then the GEMM chosen by shape
        (small-M kernel for M <= 16, else tiled) and adapter (dot4I8Packed or f32 FMA).
        f64 raises :class:`Unsupported`."""
        return _LinearExecutable(self, desc)

    def quantize_executable(self, desc):
        """The fused activation pass alone (f64 raises :class:`Unsupported`)."""
        return _QuantizeExecutable(self, desc)


def _quant_name(c: _Choice) -> str:
    return f"rowquant_wg{c.wg}" + ("_exact" if c.exact else "")


def _usage_names(wgpu_module, usage: int) -> str:
    names = [n for n in ("MAP_READ", "MAP_WRITE", "COPY_SRC", "COPY_DST", "INDEX", "VERTEX",
                         "UNIFORM", "STORAGE", "INDIRECT", "QUERY_RESOLVE")
             if usage & getattr(wgpu_module.BufferUsage, n)]
    return "|".join(names) or "none"


def create() -> WgpuBackend:
    """The wgpu backend on the best adapter (high-performance preference), with the
    adapter's maximum limits and ``shader-f16`` where offered.

    Raises :class:`BackendUnavailable` when wgpu is missing or finds no adapter."""
    try:
        import wgpu
    except ImportError as e:
        raise BackendUnavailable("wgpu", f"cannot import wgpu ({e})", _INSTALL) from None
    try:
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception as e:  # wgpu raises RuntimeError or its own errors, by version
        raise BackendUnavailable("wgpu", f"no adapter found ({str(e).splitlines()[0]})",
                                 _INSTALL) from None
    if adapter is None:
        raise BackendUnavailable("wgpu", "no adapter found", _INSTALL)
    features = [f for f in ("shader-f16", "timestamp-query", "timestamp-query-inside-encoders")
                if f in adapter.features]
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
                required_features=features, required_limits={k: limits[k] for k in wanted if k in limits})
        except Exception as e:
            raise BackendUnavailable("wgpu", f"cannot open a device on {adapter.info.get('device')}: "
                                     f"{str(e).splitlines()[0]}", _INSTALL) from None
    return WgpuBackend(wgpu, adapter, device)
