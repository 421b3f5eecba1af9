"""What wgpu plans run: the activation pass alone, or the activation pass and a GEMM in
one compute pass. Each keeps the options it was selected with, its pipelines, and the
bind groups of the tensor sets it ran on."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ...problem import (
    DynamicRangeQuantizeDescriptor,
    LinearTensors,
    QuantizedLinearDescriptor,
    QuantizeTensors,
)
from ...tensors import Tensor
from ..base import Executable, PrecisionGuarantee
from . import dispatch
from .choose import QuantChoice, Storage, choose_linear, choose_quant, linear_sku, quantize_sku
from .device import WgpuDevice
from .dispatch import Dispatches, RunCache
from .streams import encode

if TYPE_CHECKING:
    from .backend import WgpuBackend

__all__ = ["QuantizeExecutable", "LinearExecutable"]

# The host scalars of a bundle: they travel in the parameter blocks, so they key the run
# cache beside the tensors.
_SCALARS = ("input_scale", "input_zero_point")
# Every tensor of a linear bundle, in field order (bias and the zero-point tensors may be
# None): the run cache key.
_LINEAR_TENSORS = operator.attrgetter(
    *(f.name for f in dataclasses.fields(LinearTensors) if f.name not in _SCALARS))


def _with_f16_note(g: PrecisionGuarantee, storage: Storage) -> PrecisionGuarantee:
    if storage.tag != "f16_native":
        return g
    return PrecisionGuarantee(
        g.bit_identical, g.deterministic, True, g.exact_int32,
        g.note + " f16 storage is native: values are rounded in integer arithmetic, then moved "
                 "through the adapter's exact f16<->f32 conversions, which keep f16 subnormals on "
                 "lavapipe and desktop GPUs; an adapter that flushed them would flush subnormal "
                 "f16 scales and outputs (f16_storage='packed' is integer-only).")


def _quant_pipeline(gpu: WgpuDevice, q: QuantChoice, q_min: int, q_max: int) -> Any:
    return gpu.shaders.pipeline(q.family, q.storage.prelude, q.constants(q_min, q_max), q.entry,
                                q.subgroups)


class _WgpuExecutable(Executable):
    """Shared run machinery: bind groups cached per set of tensors, encoding, submit."""

    def __init__(self, be: WgpuBackend, desc: Any):
        self.be = be
        self.gpu = be.gpu
        self.desc = desc
        self.options = be.options
        self._runs = RunCache()

    def _cached(self, tensors: Sequence[Tensor | None], build: Callable[[], Dispatches],
                scalars: Any = None) -> Dispatches:
        present = [t for t in tensors if t is not None]
        key = tuple((id(t.memory), t.buffer_offset) for t in present)
        return self._runs.lookup([t.memory for t in present], key, build, scalars)

    def _encode(self, stream: Any, dispatches: Dispatches) -> None:
        encode(self.be, stream, self.sku, dispatches)


class QuantizeExecutable(_WgpuExecutable):
    """The fused activation pass (``rowquant.wgsl``)."""

    precision_guarantee = PrecisionGuarantee(
        flushes_subnormals=False,
        note="amax, scale and quantization are computed in integer arithmetic on bit patterns "
             "(exact division, round half to even): identical to the cpu backend, "
             "subnormal inputs included")

    def __init__(self, be: WgpuBackend, desc: DynamicRangeQuantizeDescriptor):
        super().__init__(be, desc)
        self.choice = choose_quant(desc, be.facts, self.options)
        self.sku = quantize_sku(self.choice)
        self.precision_guarantee = _with_f16_note(self.precision_guarantee, self.choice.storage)
        self.pipeline = _quant_pipeline(self.gpu, self.choice, desc.q_min, desc.q_max)
        self.rows_per_dispatch = dispatch.quant_rows_per_dispatch(
            self.gpu, desc.k, desc.dtype.itemsize, self.options)

    def run(self, tensors: QuantizeTensors, stream: Any = None) -> None:
        t = tensors
        x, q, s, zp = t.activation, t.act_q, t.act_scale, t.act_zp
        scalars = (t.input_scale, t.input_zero_point)
        d = self._cached((x, q, s, zp), lambda: dispatch.quant_dispatches(
            self.gpu, self.pipeline, self.desc, self.rows_per_dispatch, x, q, s, zp,
            *scalars), scalars)
        self._encode(stream, d)


class LinearExecutable(_WgpuExecutable):
    """The activation pass, then the GEMM with the dequant/bias epilogue fused."""

    precision_guarantee = PrecisionGuarantee(
        flushes_subnormals=True,
        note="activation pass exact in integer arithmetic; int32 accumulation exact (a zero "
             "point's share taken out in int32); the "
             "epilogue's two f32 multiplies and bias add are correctly rounded float operations "
             "(kept unfused), other roundings are integer RNE: identical to the cpu backend. "
             "Adapters that flush subnormal floats may flush subnormal products in the epilogue.")

    def __init__(self, be: WgpuBackend, desc: QuantizedLinearDescriptor):
        super().__init__(be, desc)
        act = desc.activation_pass
        self.choice = c = choose_linear(desc, be.facts, self.options)
        self.quant_choice = choose_quant(act, be.facts, self.options)
        self.sku = linear_sku(self.quant_choice, c)
        self.precision_guarantee = _with_f16_note(self.precision_guarantee, c.storage)
        self.quant_pipeline = _quant_pipeline(self.gpu, self.quant_choice, desc.q_min, desc.q_max)
        self.quant_rows = dispatch.quant_rows_per_dispatch(
            self.gpu, desc.k, desc.dtype.itemsize, self.options)
        self.gemm_pipelines = {
            has_bias: self.gpu.shaders.pipeline(c.family, c.storage.prelude,
                                                c.constants(has_bias), c.entry, c.subgroups)
            for has_bias in (False, True)}

    def run(self, tensors: LinearTensors, stream: Any = None) -> None:
        # A bias-less run of the same tensors has its own entry: the key's length differs.
        d = self._cached(_LINEAR_TENSORS(tensors), lambda: self._build(tensors),
                         (tensors.input_scale, tensors.input_zero_point))
        self._encode(stream, d)

    def _build(self, t: LinearTensors) -> Dispatches:
        desc = self.desc
        quant = dispatch.quant_dispatches(self.gpu, self.quant_pipeline, desc.activation_pass,
                                          self.quant_rows, t.activation, t.act_q_scratch,
                                          t.act_scale_scratch, t.act_zp_scratch, t.input_scale,
                                          t.input_zero_point)
        gemm = dispatch.gemm_dispatches(self.gpu, self.gemm_pipelines[t.bias is not None],
                                        self.choice, desc, t, self.options)
        return quant + gemm
