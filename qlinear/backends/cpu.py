"""The cpu backend: numpy, exact, and the readable statement of the semantics.

The five steps of the numerical contract, for ``x[M, K]`` of TIn:

1. ``amax[m] = max_k |x[m, k]|`` in the compute type C (f32; f64 when TIn is f64);
2. ``scale[m] = amax[m] / q_max`` in C, stored rounded to TIn; 1 for all-zero rows and
   for rows whose scale underflows to 0 in TIn; NaN for rows holding NaN or Inf;
3. ``q[m, k] = clamp(round_half_to_even(x[m, k] / scale[m]), q_min, q_max)`` with the
   stored scale (0 in underflowed and non-finite rows);
4. ``acc[m, n] = sum_k q[m, k] * weight_q[n, k]``, exact;
5. ``y[m, n] = ((C(acc) * C(scale[m])) * C(weight_scale[n])) (+ C(bias[n]))``, rounded once to TIn.

On the numpy engine step 4 runs on float32 BLAS over K-chunks of at most
``_chunk(...)`` columns: every product is an integer of magnitude <= 128*128 and every
partial sum of a chunk stays an integer of magnitude <= 2**24, so float32 holds it
exactly in any summation order; the chunks are summed exactly in float64. M is
processed in blocks so that the temporaries stay bounded. Where oneDNN's exact int8
GEMM can run (:mod:`~qlinear.backends.cpu_engine` decides), the oneDNN engine
(:mod:`~qlinear.backends.cpu_torch`) runs the same steps to the same bits.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..dtypes import DType, DTypeLike, as_dtype
from ..errors import DeviceError, InvalidProblem, Unsupported
from ..problem import (
    DynamicRangeQuantizeDescriptor,
    LinearTensors,
    QuantizedLinearDescriptor,
    QuantizeTensors,
)
from ..schemes import ActivationScheme
from ..tensors import Tensor
from ..validate import check_new_tensor, check_plain_array, check_rows, host_array
from .base import Backend, Executable, PrecisionGuarantee
from .cpu_engine import (
    ENGINES,
    EngineChoice,
    HostFacts,
    ProbeResult,
    choose_engine,
    engine_setting,
    host_facts,
    probe_int_mm,
    torch_isa,
)
from .cpu_quant import compute_type, dequantize, quantize, quantize_rows
from .cpu_torch import TorchEngine, gemm_layout, torch_pass

__all__ = ["CpuBackend", "create", "quantize_rows", "int_matmul", "dequantize",
           "subtract_zero_points"]

_F32_EXACT = 2**24
# Temporaries per M-block (q as float, acc as float64) stay under this many bytes.
_BLOCK_BYTES = 64 << 20


def _chunk(q_min: int, q_max: int) -> int:
    """Largest K-chunk whose partial sums stay exact integers in float32."""
    return _F32_EXACT // (max(-q_min, q_max) * 128)


def int_matmul(q: np.ndarray, w_t: np.ndarray, chunk: int) -> np.ndarray:
    """Exact ``acc[M, N] = q[M, K] @ w_t[K, N]`` for integer-valued float arrays.

    Returns the accumulator as the float type of ``q`` when one chunk covers K (every
    value is then exact), else as float64 (chunk sums are exact, and so is their sum)."""
    k = q.shape[1]
    if q.dtype == np.float64 or k <= chunk:
        return q @ w_t
    acc = np.add(q[:, :chunk] @ w_t[:chunk], q[:, chunk:2 * chunk] @ w_t[chunk:2 * chunk],
                 dtype=np.float64)
    for k0 in range(2 * chunk, k, chunk):
        acc += q[:, k0:k0 + chunk] @ w_t[k0:k0 + chunk]
    return acc


def subtract_zero_points(acc: np.ndarray, zp: np.ndarray, colsum: np.ndarray,
                         bound: int) -> np.ndarray:
    """``acc[m, n] - zp[m] * colsum[n]`` exactly, in place where that stays exact.

    ``bound`` bounds every term and the result (``K * (q_max - q_min) * 128``): below
    2**24 float32 holds them all as integers, so a float32 ``acc`` is updated in place;
    otherwise the result is float64 (every term is an integer far below 2**53)."""
    ft = np.float32 if acc.dtype == np.float32 and bound < _F32_EXACT else np.float64
    out = acc.astype(ft, copy=False)
    out -= np.multiply.outer(zp.astype(ft), colsum.astype(ft))
    return out


def _scheme_tag(scheme: ActivationScheme) -> str:
    """``""`` for the default scheme (its sku is unchanged), else ``"_<scheme>"``."""
    return "" if scheme is ActivationScheme.DYNAMIC else f"_{scheme.value}"


def _block_rows(m: int, k: int, n: int) -> int:
    return max(1, min(m, _BLOCK_BYTES // max(1, 8 * (k + n))))


class _QuantizeExecutable(Executable):
    precision_guarantee = PrecisionGuarantee(
        note="the reference: exact division, round half to even")

    def __init__(self, desc: DynamicRangeQuantizeDescriptor, torch: TorchEngine | None):
        self.desc = desc
        self.torch = torch if torch_pass(desc.scheme, desc.m * desc.k) else None
        self.sku = f"cpu.rowquant{_scheme_tag(desc.scheme)}" + ("_torch" if self.torch else "")

    def run(self, t: QuantizeTensors, stream: Any = None) -> None:
        d = self.desc
        step = _block_rows(d.m, d.k, 0)
        if self.torch is not None:
            with np.errstate(invalid="ignore"):
                self.torch.run_quantize(d, t, step)
            return
        x, act_q, act_scale = t.activation.handle, t.act_q.handle, t.act_scale.handle
        with np.errstate(invalid="ignore"):
            for m0 in range(0, d.m, step):
                rows = slice(m0, m0 + step)
                q, scale, zp = quantize(x[rows], d.dtype, d.q_min, d.q_max, d.scheme,
                                        t.input_scale, t.input_zero_point)
                act_q[rows] = q
                act_scale[rows] = scale
                if t.act_zp is not None:
                    t.act_zp.handle[rows] = zp


class _LinearExecutable(Executable):
    precision_guarantee = PrecisionGuarantee(
        note="the reference: exact division, round half to even, exact int32 via float BLAS chunks")

    def __init__(self, desc: QuantizedLinearDescriptor, torch: TorchEngine | None):
        self.desc = desc
        self.torch = torch
        self.chunk = _chunk(desc.q_min, desc.q_max)
        self.zp_bound = desc.k * (desc.q_max - desc.q_min) * 128
        ct = compute_type(desc.dtype)
        zp = "+zp" if desc.scheme.asymmetric else ""
        gemm = f"blas_{'f64' if ct == np.float64 else 'f32'}_kchunk{self.chunk}"
        if torch is not None:
            # How the GEMM reads the weight (cpu_torch.gemm_layout; a read-only one's).
            gemm = f"onednn_s8_{gemm_layout(desc.m, desc.k, desc.c_out, True)}"
            self.precision_guarantee = PrecisionGuarantee(
                note="the reference: exact division, round half to even, exact int32 via "
                     "oneDNN's s8 GEMM (probed at first use)")
        self.sku = f"cpu.rowquant{_scheme_tag(desc.scheme)}+{gemm}+dequant{zp}"

    def _weight(self, wt: Tensor) -> np.ndarray:
        """``weight_q.T`` as the compute type, ``[K, N]`` contiguous; kept on read-only tensors."""
        ct = compute_type(self.desc.dtype)
        key = ("w_t", ct)
        w_t = wt.cache.get(key)
        if w_t is None:
            w_t = np.ascontiguousarray(wt.handle.T, dtype=ct)
            if wt.readonly:
                wt.cache[key] = w_t
        return w_t

    def run(self, t: LinearTensors, stream: Any = None) -> None:
        d = self.desc
        if self.torch is not None:
            with np.errstate(invalid="ignore", over="ignore"):
                self.torch.run_linear(d, t, _block_rows(d.m, d.k, d.c_out))
            return
        x, out = t.activation.handle, t.output.handle
        act_q, act_scale = t.act_q_scratch.handle, t.act_scale_scratch.handle
        act_zp = None if t.act_zp_scratch is None else t.act_zp_scratch.handle
        w_t = self._weight(t.weight_q)
        ws = t.weight_scale.handle
        bias = None if t.bias is None else t.bias.handle
        colsum = None if t.weight_colsum is None else t.weight_colsum.handle
        step = _block_rows(d.m, d.k, d.c_out)
        with np.errstate(invalid="ignore", over="ignore"):
            for m0 in range(0, d.m, step):
                # One block needs no slicing (it shows at decode sizes).
                rows = slice(None) if step >= d.m else slice(m0, m0 + step)
                q, scale, zp = quantize(x[rows], d.dtype, d.q_min, d.q_max, d.scheme,
                                        t.input_scale, t.input_zero_point)
                act_q[rows] = q
                act_scale[rows] = scale
                acc = int_matmul(q, w_t, self.chunk)
                if zp is not None:
                    assert act_zp is not None and colsum is not None  # validated
                    act_zp[rows] = zp
                    acc = subtract_zero_points(acc, zp, colsum, self.zp_bound)
                dequantize(acc, scale, ws, bias, out[rows])


class CpuBackend(Backend):
    """numpy on the host. Tensors are numpy arrays; plain arrays are accepted as arguments.

    The int8 GEMM runs on one of two engines (:mod:`qlinear.backends.cpu_engine`): oneDNN's
    exact s8 GEMM through torch where torch is installed, the CPU has VNNI or AMX and a
    probe at first use agrees with the exact product; numpy's float32 BLAS over exact
    K-chunks otherwise. ``$QLINEAR_CPU_ENGINE`` (auto, numpy, onednn), read when the
    backend is created, and :meth:`configured` set which; :attr:`engine` says which runs."""

    name = "cpu"
    device_id = "cpu"
    is_gpu = False
    host_memory = True
    torch_device_type = "cpu"
    activation_schemes = frozenset(ActivationScheme)

    def __init__(self, setting: str = "auto"):
        self._setting = setting
        self._configured = threading.local()  # each thread's configured() engine
        self._choices: dict[str, EngineChoice] = {}
        self._torch: TorchEngine | None = None
        self._probed: ProbeResult | None = None
        self._lock = threading.Lock()

    # -- engines -------------------------------------------------------------------
    @property
    def setting(self) -> str:
        """The engine setting plans are selected with: this thread's :meth:`configured`
        block's, else the backend's (``auto``, ``numpy`` or ``onednn``)."""
        return getattr(self._configured, "engine", None) or self._setting

    @property
    def engine(self) -> EngineChoice:
        """The engine plans use under the current setting, and why (the first call for a
        setting that may take oneDNN imports torch and runs the probe, once)."""
        setting = self.setting
        choice = self._choices.get(setting)
        if choice is None:
            with self._lock:
                choice = self._choices.get(setting)
                if choice is None:
                    facts = host_facts()
                    choice = choose_engine(setting, facts, lambda: self._probe(facts))
                    self._choices[setting] = choice
        return choice

    def _probe(self, facts: HostFacts) -> ProbeResult:
        if self._probed is None:
            try:
                import torch
            except Exception as e:  # a broken install counts as none
                self._probed = ProbeResult(False, f"import torch failed: {e}")
            else:
                if facts.isa is None and torch_isa(torch) is False:
                    self._probed = ProbeResult(False, "torch finds neither VNNI nor AMX on "
                                                      "this CPU")
                else:
                    self._probed = probe_int_mm(torch)
                if self._probed.exact:
                    self._torch = TorchEngine(torch)
        return self._probed

    def _engine_for_plan(self) -> TorchEngine | None:
        choice = self.engine
        if choice.refused:
            raise Unsupported(f"engine: expected a host where oneDNN's int8 GEMM runs "
                              f"exactly, got one where {choice.refused}")
        return self._torch if choice.engine == "onednn" else None

    @contextlib.contextmanager
    def configured(self, *, engine: str) -> Iterator[CpuBackend]:
        """Plans selected inside the block, by the calling thread, use ``engine``:
        ``"numpy"``, ``"onednn"`` (:class:`Unsupported` at selection where it cannot run)
        or ``"auto"``; restored on exit. Plans keep the engine they were selected with."""
        if engine not in ENGINES:
            raise InvalidProblem(f"engine: expected one of {ENGINES}, got {engine!r}")
        old = getattr(self._configured, "engine", None)
        self._configured.engine = engine
        try:
            yield self
        finally:
            self._configured.engine = old

    @property
    def device_name(self) -> str:
        """The host, with its core count."""
        return f"host CPU ({os.cpu_count()} cores, numpy {np.__version__})"

    def _tensor(self, arr: np.ndarray, dtype: DType, readonly: bool = False) -> Tensor:
        item = arr.itemsize
        strides: list[int | float] = [s // item for s in arr.strides]
        if any(s % item for s in arr.strides):  # not a whole number of elements: never valid
            strides = [s / item for s in arr.strides]
        return Tensor("cpu", "cpu", arr.shape, dtype, strides, arr, "host",
                      data_ptr=arr.__array_interface__["data"][0], readonly=readonly)

    def empty(self, shape: Sequence[int], dtype: DTypeLike) -> Tensor:
        """A new uninitialised host tensor (:class:`DeviceError` when the host cannot
        allocate it)."""
        dims, dt = check_new_tensor(shape, dtype)
        try:
            arr = np.empty(dims, dt.numpy)
        except (MemoryError, ValueError) as e:
            raise DeviceError(f"allocating {math.prod(dims) * dt.itemsize} bytes on the host "
                              "failed (out of memory?)", native=str(e)) from None
        return self._tensor(arr, dt)

    def from_numpy(self, array: np.ndarray, *, readonly: bool = False) -> Tensor:
        """A host tensor holding a copy of ``array`` (read-only if ``readonly``)."""
        src, dtype = host_array(array)
        arr = np.array(src, copy=True, order="C")
        if readonly:
            arr.flags.writeable = False
        return self._tensor(arr, dtype, readonly)

    def to_numpy(self, tensor: Any) -> np.ndarray:
        """A copy of the tensor's array."""
        return np.array(self.wrap(tensor).handle, copy=True)

    def wrap(self, obj: Any, *, name: str = "tensor") -> Tensor:
        """A cpu Tensor for a numpy array (no copy; ndarray subclasses other than
        ``np.memmap`` are refused, see :func:`qlinear.validate.check_plain_array`) or an
        existing Tensor."""
        if isinstance(obj, Tensor):
            return obj
        if not isinstance(obj, np.ndarray):
            raise InvalidProblem(
                f"{name}: expected a numpy array or a qlinear cpu tensor, got {type(obj).__name__}")
        check_plain_array(name, obj)
        try:
            dtype = as_dtype(obj.dtype)
        except InvalidProblem:
            raise InvalidProblem(
                f"{name}: expected dtype f32, f16, bf16, f64, s8 or s32, got {obj.dtype}") from None
        return self._tensor(obj, dtype, not obj.flags.writeable)

    def narrow(self, tensor: Any, rows: int) -> Tensor:
        """The first ``rows`` rows of ``tensor`` (an integer in ``0..tensor.shape[0]``)."""
        t = self.wrap(tensor)
        return self._tensor(t.handle[:check_rows(t, rows)], t.dtype, t.readonly)

    def check_stream(self, stream: Any) -> None:
        """The cpu backend runs synchronously on the calling thread: only None is a stream."""
        if stream is not None:
            raise InvalidProblem(
                f"stream: expected None on the cpu backend, got {type(stream).__name__}")

    def linear_executable(self, desc: QuantizedLinearDescriptor) -> Executable:
        """The cpu linear executable: rowquant, the engine's exact int8 GEMM, dequant."""
        return _LinearExecutable(desc, self._engine_for_plan())

    def quantize_executable(self, desc: DynamicRangeQuantizeDescriptor) -> Executable:
        """The cpu activation pass (in torch ops on the oneDNN engine, dynamic scheme)."""
        return _QuantizeExecutable(desc, self._engine_for_plan())

    def info(self) -> dict[str, Any]:
        """Host facts and kernel choices."""
        blas = "unknown"
        try:
            cfg: Any = np.show_config(mode="dicts")
            blas = cfg["Build Dependencies"]["blas"]["name"]
        except Exception:
            pass
        choice = self.engine
        if choice.engine == "onednn":
            method = ("rowquant + oneDNN s8 x s8 -> s32 GEMM (torch._int_mm) + dequant; the passes "
                      "in torch ops above 2**17 elements, in numpy below")
        else:
            method = ("rowquant + float32 BLAS over K-chunks of <= 2**24 // (max|q| * 128) "
                      "columns (1032 for -127..127) + dequant")
        return {"device": self.device_name, "engine": choice.engine, "engine_why": choice.why,
                "setting": self.setting, "blas": blas, "method": method}


def create() -> CpuBackend:
    """The cpu backend (always available; a bad ``$QLINEAR_CPU_ENGINE`` raises
    :class:`BackendUnavailable` naming it)."""
    return CpuBackend(engine_setting())
