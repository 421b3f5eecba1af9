"""What wgpu plans run: the activation pass alone, or the activation pass and a GEMM in
one compute pass. Each keeps the design it was selected with (:mod:`.design`: kernels and
dispatch planning as data), its compiled pipelines, and the bind groups of the tensor
sets it ran on."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ...problem import (
    DynamicRangeQuantizeDescriptor,
    LinearTensors,
    QuantizedLinearDescriptor,
    QuantizeTensors,
)
from ...tensors import Tensor
from ..base import Executable, PrecisionGuarantee
from .choose import Storage
from .design import LINEAR_FIELDS, QUANT_FIELDS, Kernel, LinearDesign, QuantDesign
from .device import WgpuDevice
from .dispatch import Dispatches, RunCache, realize
from .steps import Placed
from .streams import encode

if TYPE_CHECKING:
    from .backend import WgpuBackend

__all__ = ["QuantizeExecutable", "LinearExecutable", "placed"]

# The host scalars of a bundle: they travel in the parameter blocks, so they key the run
# cache beside the tensors.
_SCALARS = operator.attrgetter("input_scale", "input_zero_point")


def placed(tensors: Mapping[str, Tensor | None]) -> dict[str, Placed]:
    """The planner's view of a bundle's tensors: (name, byte offset in its buffer)."""
    return {k: None if t is None else (k, int(t.buffer_offset or 0)) for k, t in tensors.items()}


def _with_f16_note(g: PrecisionGuarantee, storage: Storage) -> PrecisionGuarantee:
    if storage.tag != "f16_native":
        return g
    return PrecisionGuarantee(
        g.bit_identical, g.deterministic, True, g.exact_int32,
        g.note + " f16 storage is native: values are rounded in integer arithmetic, then moved "
                 "through the adapter's exact f16<->f32 conversions, which keep f16 subnormals on "
                 "lavapipe and desktop GPUs; an adapter that flushed them would flush subnormal "
                 "f16 scales and outputs (f16_storage='packed' is integer-only).")


def _pipeline(gpu: WgpuDevice, k: Kernel) -> Any:
    return gpu.shaders.pipeline(k.family, k.elem, dict(k.constants), k.entry, k.subgroups)


class _WgpuExecutable(Executable):
    """Shared run machinery: bind groups cached per set of tensors, encoding, submit."""

    def __init__(self, be: WgpuBackend, desc: Any):
        self.be = be
        self.gpu = be.gpu
        self.desc = desc
        self.options = be.options
        self._runs = RunCache()

    #: The bundle's tensor fields, and a getter of them in that order (set per subclass).
    _fields: tuple[str, ...]
    _tensors: Callable[[Any], tuple]

    def _cached(self, bundle: Any,
                build: Callable[[dict[str, Tensor | None]], Dispatches]) -> Dispatches:
        # One run's key is cheap (attribute reads, ids); the named tensors are only made
        # for a miss.
        fields = self._fields
        values = self._tensors(bundle)
        present = [t for t in values if t is not None]
        # A bias-less run of the same tensors has its own entry: the key's length differs.
        key = tuple((id(t.memory), t.buffer_offset) for t in present)
        return self._runs.lookup([t.memory for t in present], key,
                                 lambda: build(dict(zip(fields, values))), _SCALARS(bundle))

    def _encode(self, stream: Any, dispatches: Dispatches) -> None:
        encode(self.be, stream, self.sku, dispatches)


class QuantizeExecutable(_WgpuExecutable):
    """The fused activation pass (``rowquant.wgsl``)."""

    _fields = QUANT_FIELDS
    _tensors = operator.attrgetter(*QUANT_FIELDS)

    precision_guarantee = PrecisionGuarantee(
        flushes_subnormals=False,
        note="amax, scale and quantization are computed in integer arithmetic on bit patterns "
             "(exact division, round half to even): identical to the cpu backend, "
             "subnormal inputs included")

    def __init__(self, be: WgpuBackend, desc: DynamicRangeQuantizeDescriptor):
        super().__init__(be, desc)
        self.design = QuantDesign.make(desc, be.facts, self.options, self.gpu.align)
        self.choice = self.design.choice
        self.sku = self.design.sku
        self.precision_guarantee = _with_f16_note(self.precision_guarantee, self.choice.storage)
        self.pipeline = _pipeline(self.gpu, self.design.kernel)

    def run(self, tensors: QuantizeTensors, stream: Any = None) -> None:
        t = tensors

        def build(named: dict[str, Tensor | None]) -> Dispatches:
            steps = self.design.steps(placed(named), t.input_scale, t.input_zero_point)
            return realize(self.gpu, self.pipeline, steps, named)

        self._encode(stream, self._cached(t, build))


class LinearExecutable(_WgpuExecutable):
    """The activation pass, then the GEMM with the dequant/bias epilogue fused."""

    _fields = LINEAR_FIELDS
    _tensors = operator.attrgetter(*LINEAR_FIELDS)

    precision_guarantee = PrecisionGuarantee(
        flushes_subnormals=True,
        note="activation pass exact in integer arithmetic; int32 accumulation exact (a zero "
             "point's share taken out in int32); the "
             "epilogue's two f32 multiplies and bias add are correctly rounded float operations "
             "(kept unfused), other roundings are integer RNE: identical to the cpu backend. "
             "Adapters that flush subnormal floats may flush subnormal products in the epilogue.")

    def __init__(self, be: WgpuBackend, desc: QuantizedLinearDescriptor):
        super().__init__(be, desc)
        self.design = d = LinearDesign.make(desc, be.facts, self.options, self.gpu.align)
        self.choice = d.gemm
        self.quant_choice = d.quant
        self.sku = d.sku
        self.precision_guarantee = _with_f16_note(self.precision_guarantee, d.gemm.storage)
        self.quant_pipeline = _pipeline(self.gpu, d.quant_kernel)
        self.gemm_pipelines = {has_bias: _pipeline(self.gpu, d.gemm_kernel(has_bias))
                               for has_bias in (False, True)}

    def run(self, tensors: LinearTensors, stream: Any = None) -> None:
        t = tensors

        def build(named: dict[str, Tensor | None]) -> Dispatches:
            quant, gemm = self.design.steps(placed(named), t.input_scale, t.input_zero_point)
            return (realize(self.gpu, self.quant_pipeline, quant, named)
                    + realize(self.gpu, self.gemm_pipelines[t.bias is not None], gemm, named))

        self._encode(stream, self._cached(t, build))
