"""What a wgpu plan runs, as data: its kernels (pipelines named by family, prelude, entry
point, override constants and reductions) and the dispatch steps of one run. Pure: made
from the descriptor, the adapter's facts and the options, with no device.

The wgpu executables compile these kernels and realize these steps on their device;
:mod:`.program` writes the same design out for another WebGPU implementation (Dawn in a
browser), so both run the one plan the choosers made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...problem import (
    DynamicRangeQuantizeDescriptor,
    LinearTensors,
    QuantizedLinearDescriptor,
    QuantizeTensors,
)
from .choose import (
    AdapterFacts,
    LinearChoice,
    QuantChoice,
    choose_linear,
    choose_quant,
    linear_sku,
    quantize_sku,
)
from .options import WgpuOptions
from .steps import Placed, Step, gemm_steps, quant_rows_per_dispatch, quant_steps

__all__ = ["Kernel", "QuantDesign", "LinearDesign", "LINEAR_FIELDS", "QUANT_FIELDS"]


def _tensor_fields(bundle: type) -> tuple[str, ...]:
    # The host scalars travel in the parameter blocks, not as tensors.
    return tuple(f.name for f in dataclasses.fields(bundle)
                 if f.name not in ("input_scale", "input_zero_point"))


#: The tensor fields of a linear / activation-pass bundle, in field order: the names the
#: steps bind tensors by.
LINEAR_FIELDS = _tensor_fields(LinearTensors)
QUANT_FIELDS = _tensor_fields(QuantizeTensors)


@dataclass(frozen=True)
class Kernel:
    """One compute pipeline: ``shaders/<family>.wgsl`` composed with the TIn prelude
    ``elem`` (and subgroup reductions or not), its ``entry`` point and override
    ``constants``."""

    family: str
    elem: str
    entry: str
    constants: tuple[tuple[str, int], ...]
    subgroups: bool = False

    @classmethod
    def of(cls, choice: Any, constants: Mapping[str, int]) -> Kernel:
        """The kernel of a chooser's ``choice`` with these override constants."""
        return cls(choice.family, choice.storage.prelude, choice.entry,
                   tuple(sorted(constants.items())), choice.subgroups)


def _quant_kernel(q: QuantChoice, q_min: int, q_max: int) -> Kernel:
    return Kernel.of(q, q.constants(q_min, q_max))


@dataclass(frozen=True)
class QuantDesign:
    """The activation pass alone (``rowquant.wgsl``)."""

    desc: DynamicRangeQuantizeDescriptor
    options: WgpuOptions
    align: int
    choice: QuantChoice
    rows_per_dispatch: int

    @classmethod
    def make(cls, desc: DynamicRangeQuantizeDescriptor, facts: AdapterFacts,
             options: WgpuOptions, align: int) -> QuantDesign:
        """The design for ``desc`` on an adapter with these facts, options and storage
        offset alignment ``align``."""
        return cls(desc, options, align, choose_quant(desc, facts, options),
                   quant_rows_per_dispatch(desc.k, desc.dtype.itemsize, options, align))

    @property
    def sku(self) -> str:
        """The plan's sku."""
        return quantize_sku(self.choice)

    @property
    def kernel(self) -> Kernel:
        """The activation pass's pipeline."""
        return _quant_kernel(self.choice, self.desc.q_min, self.desc.q_max)

    def steps(self, t: Mapping[str, Placed], input_scale: float | None = None,
              input_zero_point: int | None = None) -> tuple[Step, ...]:
        """The dispatches of a run on the tensors ``t`` (QuantizeTensors' fields by name)."""
        return quant_steps(self.desc, self.rows_per_dispatch, self.align, t["activation"],
                           t["act_q"], t["act_scale"], t.get("act_zp"), input_scale,
                           input_zero_point)


@dataclass(frozen=True)
class LinearDesign:
    """The activation pass, then the GEMM with the dequant/bias epilogue fused."""

    desc: QuantizedLinearDescriptor
    options: WgpuOptions
    align: int
    quant: QuantChoice
    gemm: LinearChoice
    quant_rows: int

    @classmethod
    def make(cls, desc: QuantizedLinearDescriptor, facts: AdapterFacts, options: WgpuOptions,
             align: int) -> LinearDesign:
        """The design for ``desc`` on an adapter with these facts, options and storage
        offset alignment ``align``."""
        gemm = choose_linear(desc, facts, options)
        quant = choose_quant(desc.activation_pass, facts, options)
        return cls(desc, options, align, quant, gemm,
                   quant_rows_per_dispatch(desc.k, desc.dtype.itemsize, options, align))

    @property
    def sku(self) -> str:
        """The plan's sku."""
        return linear_sku(self.quant, self.gemm)

    @property
    def quant_kernel(self) -> Kernel:
        """The activation pass's pipeline."""
        return _quant_kernel(self.quant, self.desc.q_min, self.desc.q_max)

    def gemm_kernel(self, has_bias: bool) -> Kernel:
        """The GEMM's pipeline, with or without the bias add."""
        return Kernel.of(self.gemm, self.gemm.constants(has_bias))

    def steps(self, t: Mapping[str, Placed], input_scale: float | None = None,
              input_zero_point: int | None = None) -> tuple[tuple[Step, ...], tuple[Step, ...]]:
        """(activation-pass steps, GEMM steps) of a run on the tensors ``t``
        (LinearTensors' fields by name; the optional ones may be None)."""
        desc = self.desc
        quant = quant_steps(desc.activation_pass, self.quant_rows, self.align, t["activation"],
                            t["act_q_scratch"], t["act_scale_scratch"], t.get("act_zp_scratch"),
                            input_scale, input_zero_point)
        return quant, gemm_steps(self.gemm, desc, self.options, self.align, t)
