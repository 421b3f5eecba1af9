"""What cuda plans run: the kernels chosen for one descriptor, loaded, and their launch
glue (argument marshalling, the aligned or fallback variant per run)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ...dtypes import DType, f64
from ..base import Executable, PrecisionGuarantee
from .select import select_linear, select_quantize

if TYPE_CHECKING:
    from ...problem import (
        DynamicRangeQuantizeDescriptor,
        LinearTensors,
        QuantizedLinearDescriptor,
        QuantizeTensors,
    )
    from ...tensors import Tensor
    from .backend import CudaBackend
    from .specs import KernelSpec

__all__ = ["CudaQuantizeExecutable", "CudaLinearExecutable"]


def _addresses(*tensors: Tensor) -> tuple[int, ...]:
    # A cuda Tensor always has a data_ptr; the type allows None for memory without addresses.
    return cast("tuple[int, ...]", tuple(t.data_ptr for t in tensors))


def _aligned(*ptrs: int, to: int = 16) -> bool:
    return all(p % to == 0 for p in ptrs)


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else cast(int, t.data_ptr)


def _scheme_args(dtype: DType, zp: Tensor | None, input_scale: float | None,
                 input_zero_point: int | None) -> tuple[Any, ...]:
    """The activation pass's scheme arguments: the zero-point output (or null), the static
    scale in the kernel's compute type (already a TIn value, so exact in it), the static
    zero point. Unused values are passed as 0: the kernel's SCHEME ignores them."""
    ctype = np.float64 if dtype == f64 else np.float32
    return (_ptr(zp), ctype(input_scale or 0.0), np.int32(input_zero_point or 0))


def _load(be: CudaBackend, *specs: KernelSpec) -> None:
    # Every kernel a run may launch, the fallbacks for misaligned addresses included, is
    # compiled and loaded with the plan: a compile error in a run could come after its
    # first kernel already wrote the caller's scratch. So is the shared-memory limit of
    # the kernels launched with tensor maps.
    for spec in dict.fromkeys(specs):
        kernel = be.kernel(spec)
        if spec.tma_rows:
            be.stream()  # the device current on this thread: functions are per context
            be.hopper.function(spec, kernel)


class CudaQuantizeExecutable(Executable):
    """The activation pass: one kernel, its 16-byte-vector variant where the shape and
    the addresses allow it."""

    precision_guarantee = PrecisionGuarantee(
        note="IEEE division (__fdiv_rn/__ddiv_rn), round half to even, in every activation "
             "scheme; bit-identical to cpu")

    def __init__(self, be: CudaBackend, desc: DynamicRangeQuantizeDescriptor) -> None:
        self.be = be
        self.desc = desc
        self.fast, self.fallback, self.grid = select_quantize(desc.m, desc.k, desc.dtype,
                                                              desc.scheme)
        self.sku = f"cuda.{be.arch}.{self.fast.label}"
        _load(be, self.fast, self.fallback)

    def run(self, tensors: QuantizeTensors, stream: Any = None) -> None:
        d = self.desc
        xp, qp, sp = _addresses(tensors.activation, tensors.act_q, tensors.act_scale)
        spec = self.fast
        # q's vectors hold as many int8 as x's hold elements: 16 / itemsize bytes.
        if spec != self.fallback and not (
                _aligned(xp) and _aligned(qp, to=16 // d.dtype.itemsize)):
            spec = self.fallback
        zp, scale, z = _scheme_args(d.dtype, tensors.act_zp, tensors.input_scale,
                                    tensors.input_zero_point)
        self.be.launch(spec, self.grid, stream, xp, qp, sp, zp,
                       np.int32(d.m), np.int32(d.k), np.int32(d.q_min), np.int32(d.q_max),
                       scale, z)


class CudaLinearExecutable(Executable):
    """The activation pass, then the int8 GEMM with the dequantization (+ bias) epilogue
    fused, on one stream, with no synchronization."""

    precision_guarantee = PrecisionGuarantee(
        bit_identical=True, deterministic=True, flushes_subnormals=False, exact_int32=True,
        note="IEEE division and round half to even in the activation pass; exact int32 on "
             "integer tensor cores (dp4a on sm_75); split-K partials summed in int32 in a "
             "fixed order; epilogue with __fmul_rn/__fadd_rn (no FMA contraction)")

    def __init__(self, be: CudaBackend, desc: QuantizedLinearDescriptor) -> None:
        self.be = be
        self.desc = desc
        self.sel = sel = select_linear(desc.m, desc.c_out, desc.k, desc.dtype, be.arch,
                                       be.sm_count, desc.scheme, wgmma=be.wgmma)
        self._sku_pdl = sel.sku.replace(f"+{sel.gemm.label}+", f"+{sel.gemm.label}+pdl+", 1)
        if sel.gemm.pdl:
            be.pdl_enabled()  # decided now, so that sku says it from the start
        _load(be, sel.act, sel.act_fallback, sel.gemm, sel.gemm_fallback)

    @property
    def sku(self) -> str:  # type: ignore[override]  # read-only: derived, never assigned
        """The selection's sku; ``+pdl`` after the GEMM's label while it is launched with
        programmatic dependent launch (see :meth:`CudaBackend.pdl_enabled`)."""
        if self.sel.gemm.pdl and self.be.pdl_enabled():
            return self._sku_pdl
        return self.sel.sku

    def run(self, tensors: LinearTensors, stream: Any = None) -> None:
        d, sel, t = self.desc, self.sel, tensors
        xp, aqp, ascp, wqp, wsp, yp = _addresses(t.activation, t.act_q_scratch,
                                                 t.act_scale_scratch, t.weight_q,
                                                 t.weight_scale, t.output)
        item = d.dtype.itemsize
        act = sel.act
        if act != sel.act_fallback and not (_aligned(xp) and _aligned(aqp, to=16 // item)):
            act = sel.act_fallback
        gemm = sel.gemm
        if gemm != sel.gemm_fallback and not _aligned(aqp, wqp):
            gemm = sel.gemm_fallback
        # The epilogue stores two outputs at once where columns come in aligned pairs.
        pair_ok = d.c_out % 2 == 0 and yp % (2 * item) == 0
        zp, scale, z = _scheme_args(d.dtype, t.act_zp_scratch, t.input_scale,
                                    t.input_zero_point)
        s = self.be.stream(stream)
        # The tensor maps are made before anything is launched: a driver error there
        # leaves the caller's scratch untouched.
        maps = self._maps(gemm, aqp, wqp) if gemm.tma_rows else ()
        self.be.launch(act, sel.act_grid, s, xp, aqp, ascp, zp, np.int32(d.m), np.int32(d.k),
                       np.int32(d.q_min), np.int32(d.q_max), scale, z)
        # Zero points and column sums only with an asymmetric scheme (None, so null,
        # otherwise): the byte-load GEMMs apply the term exactly when they are given.
        if maps:
            self.be.hopper.launch(gemm, self.be.kernel(gemm), sel.gemm_grid, s, maps,
                                  (ascp, wsp, _ptr(t.bias), zp, _ptr(t.weight_colsum), yp),
                                  (d.m, d.c_out, d.k, int(pair_ok)))
            return
        self.be.launch(gemm, sel.gemm_grid, s, aqp, ascp, wqp, wsp, _ptr(t.bias), zp,
                       _ptr(t.weight_colsum), yp,
                       np.int32(d.m), np.int32(d.c_out), np.int32(d.k), np.int32(pair_ok))

    def _maps(self, gemm: KernelSpec, aqp: int, wqp: int) -> tuple[Any, ...]:
        """The Hopper GEMM's tensor maps of the quantized activation and the weight (made
        once per address, see :mod:`.tma`)."""
        d, maps = self.desc, self.be.hopper.maps
        box_a, box_w = gemm.tma_rows
        return (maps.get(aqp, d.m, d.k, box_a), maps.get(wqp, d.c_out, d.k, box_w))
