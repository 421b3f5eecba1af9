"""A wgpu plan written out for another WebGPU implementation: the exact WGSL modules,
pipelines and dispatches the wgpu backend runs for a descriptor on an adapter described
by its facts, as a JSON document that a browser page (``examples/web/qlinear.js``) runs
with ``navigator.gpu``. Pure: no device is opened; the design comes from the same
choosers and dispatch planner (:mod:`.design`) as the backend's own plans.

The document (``format`` "qlinear.wgsl-program/1"), every key always present:

``kind``
    "linear" or "quantize".
``sku``, ``target``
    The plan's sku, as ``plan.sku`` on wgpu shows it; the compiler the WGSL is composed
    for ("tint" for Dawn, "naga" for wgpu).
``features``
    The WebGPU device features the modules need ("shader-f16", "subgroups").
``modules``
    WGSL texts; ``pipelines`` refer to them by index.
``pipelines``
    ``{"module", "entry", "constants", "layout", "label"}``: override constants as numbers,
    the bind group layout by name.
``layouts``
    By name: ``{"storage": {variable: binding}, "params": binding or null,
    "params_size": bytes}``; storage bindings are read-write storage buffers, the
    parameter block a uniform buffer, all visible to compute.
``tensors``
    By bundle field name (``LinearTensors`` / ``QuantizeTensors``; absent optional tensors
    are not listed): ``{"shape", "dtype", "nbytes", "role"}`` with role "input",
    "output" or "scratch". Each is one buffer of ``max(16, round_up(nbytes, 4))`` bytes in
    the wgpu buffer layout (s8 rows padded to 4 bytes).
``param_stride``, ``params``
    Every dispatch's uniform block, ``param_stride`` bytes apart, base64.
``dispatches``
    In order: ``{"pipeline", "params" (block index), "grid" [x, y, z], "bindings":
    {variable: {"tensor": name or null, "offset", "size"}}}``; tensor null binds a
    16-byte dummy storage buffer of that variable's own: WebGPU refuses a dispatch that
    binds overlapping ranges of one buffer to two writable storage bindings (Dawn checks
    it), and every binding of the kernels is read_write.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...dtypes import DType, s8, s32
from ...errors import InvalidProblem
from ...problem import (
    DynamicRangeQuantizeDescriptor,
    QuantizedLinearDescriptor,
)
from ...validate import scheme_constants
from .choose import AdapterFacts
from .design import LINEAR_FIELDS, QUANT_FIELDS, Kernel, LinearDesign, QuantDesign
from .device import round_up
from .layouts import LAYOUTS, PARAMS_BINDING
from .options import WgpuOptions
from .shaders import FAMILY_LAYOUT, check_target, shader_source
from .steps import PARAM_STRIDE, Placed, Step, pack_params
from .tensors import tensor_layout, upload_bytes

__all__ = ["FORMAT", "TensorSpec", "Program", "linear_program", "quantize_program",
           "browser_facts"]

#: The ``format`` of the JSON document.
FORMAT = "qlinear.wgsl-program/1"
# Offset alignment of storage bindings every WebGPU adapter accepts (its maximum).
_ALIGN = 256


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of a program: its shape, qlinear dtype, bytes in the buffer layout, and
    role ("input", "output" or "scratch")."""

    shape: tuple[int, ...]
    dtype: DType
    nbytes: int
    role: str


@dataclass(frozen=True)
class Program:
    """A plan as data (see the module docstring for its JSON form)."""

    kind: str
    sku: str
    target: str
    tensors: Mapping[str, TensorSpec]
    kernels: tuple[Kernel, ...]
    #: (kernel index, step) per dispatch, in order.
    dispatches: tuple[tuple[int, Step], ...]

    def _texts(self) -> list[str]:
        return [shader_source(k.family, k.elem, subgroups=k.subgroups, target=self.target)
                for k in self.kernels]

    def modules(self) -> list[str]:
        """The distinct WGSL texts of the kernels, in first-use order."""
        return list(dict.fromkeys(self._texts()))

    @property
    def features(self) -> list[str]:
        """The WebGPU device features the modules need."""
        need = set()
        for k in self.kernels:
            if k.elem == "f16":
                need.add("shader-f16")
            if k.subgroups:
                need.add("subgroups")
        return sorted(need)

    def to_json(self) -> dict[str, Any]:
        """The program as a JSON-able dict."""
        texts = self._texts()
        modules = list(dict.fromkeys(texts))
        pipelines = [{"module": modules.index(text), "entry": k.entry,
                      "constants": {n: float(v) for n, v in k.constants},
                      "layout": FAMILY_LAYOUT[k.family], "label": k.family}
                     for k, text in zip(self.kernels, texts)]
        names = {FAMILY_LAYOUT[k.family] for k in self.kernels}
        layouts = {n: _layout_json(n) for n in sorted(names)}
        blocks = b"".join(pack_params(step.layout.params, [step.params]).tobytes()
                          for _, step in self.dispatches if step.layout.params is not None)
        dispatches = [{"pipeline": ki, "params": i, "grid": list(step.grid),
                       "bindings": {v: {"tensor": sp.tensor, "offset": sp.offset,
                                        "size": sp.size} for v, sp in step.spans.items()}}
                      for i, (ki, step) in enumerate(self.dispatches)]
        return {"format": FORMAT, "kind": self.kind, "sku": self.sku, "target": self.target,
                "features": self.features, "modules": modules, "pipelines": pipelines,
                "layouts": layouts,
                "tensors": {n: {"shape": list(t.shape), "dtype": t.dtype.name,
                                "nbytes": t.nbytes, "role": t.role}
                            for n, t in self.tensors.items()},
                "param_stride": PARAM_STRIDE, "params": base64.b64encode(blocks).decode(),
                "dispatches": dispatches}

    def _spec(self, name: str) -> TensorSpec:
        spec = self.tensors.get(name)
        if spec is None:
            raise InvalidProblem(f"name: expected one of {sorted(self.tensors)}, got {name!r}")
        return spec

    def input_bytes(self, name: str, array: np.ndarray) -> bytes:
        """The bytes of tensor ``name`` holding ``array`` in the buffer layout."""
        spec = self._spec(name)
        arr = np.asarray(array)
        if arr.shape != spec.shape or arr.dtype != spec.dtype.numpy:
            raise InvalidProblem(
                f"{name}: expected {spec.dtype.name} of shape {spec.shape}, got "
                f"{arr.dtype} of shape {arr.shape}")
        return upload_bytes(arr, spec.dtype, spec.nbytes).tobytes()

    def read(self, name: str, data: bytes) -> np.ndarray:
        """Tensor ``name`` from the bytes of its buffer (at least ``nbytes``)."""
        spec = self._spec(name)
        if len(data) < spec.nbytes:
            raise InvalidProblem(f"data: expected at least {spec.nbytes} bytes for {name}, "
                                 f"got {len(data)}")
        raw = np.frombuffer(data, np.uint8, spec.nbytes)
        shape = spec.shape
        if spec.dtype == s8 and len(shape) >= 2:
            row = round_up(shape[-1], 4)
            rows = raw.view(np.int8).reshape(*shape[:-1], row) if raw.size else \
                np.empty(shape, np.int8)
            return rows[..., :shape[-1]].copy()
        return raw.view(spec.dtype.numpy).reshape(shape).copy()


def _layout_json(name: str) -> dict[str, Any]:
    lay = LAYOUTS[name]
    params = lay.params
    return {"storage": dict(lay.storage), "params": None if params is None else PARAMS_BINDING,
            "params_size": 0 if params is None else params.itemsize}


def _specs(fields: Mapping[str, tuple[tuple[int, ...], DType, str]]) -> dict[str, TensorSpec]:
    return {n: TensorSpec(shape, dt, tensor_layout(shape, dt)[1], role)
            for n, (shape, dt, role) in fields.items()}


def _placed(specs: Mapping[str, TensorSpec], fields: tuple[str, ...]) -> dict[str, Placed]:
    return {f: (f, 0) if f in specs else None for f in fields}


def browser_facts(facts: Mapping[str, Any]) -> AdapterFacts:
    """The :class:`AdapterFacts` of a browser's adapter as ``adapterFacts()`` of
    ``examples/web/qlinear.js`` reports it (``features`` by WebGPU's names, ``limits``
    named as wgpu names them): a CPU adapter where it is a fallback adapter or SwiftShader,
    else a GPU; backend "WebGPU"."""
    cpu = bool(facts.get("is_fallback")) or facts.get("architecture") == "swiftshader"
    return AdapterFacts.from_adapter("CPU" if cpu else "DiscreteGPU", "WebGPU",
                                     facts.get("features", ()), facts["limits"])


def linear_program(desc: QuantizedLinearDescriptor, facts: AdapterFacts, options: WgpuOptions,
                   *, bias: bool, target: str = "tint", input_scale: float | None = None,
                   input_zero_point: int | None = None) -> Program:
    """The linear plan for ``desc`` on an adapter with ``facts`` and ``options``, with or
    without a bias; a static scheme's scale and zero point are checked as a run's are
    (:func:`qlinear.validate.scheme_constants`) and go into the parameter blocks."""
    check_target(target)
    input_scale, input_zero_point = scheme_constants(desc, input_scale, input_zero_point)
    design = LinearDesign.make(desc, facts, options, _ALIGN)
    m, k, n, dt = desc.m, desc.k, desc.c_out, desc.dtype
    asym = desc.scheme.asymmetric
    fields: dict[str, tuple[tuple[int, ...], DType, str]] = {
        "activation": ((m, k), dt, "input"), "weight_q": ((n, k), s8, "input"),
        "weight_scale": ((n,), dt, "input")}
    if bias:
        fields["bias"] = ((n,), dt, "input")
    if asym:
        fields["weight_colsum"] = ((n,), s32, "input")
    fields.update({"output": ((m, n), dt, "output"), "act_q_scratch": ((m, k), s8, "scratch"),
                   "act_scale_scratch": ((m,), dt, "scratch")})
    if asym:
        fields["act_zp_scratch"] = ((m,), s32, "scratch")
    specs = _specs(fields)
    quant, gemm = design.steps(_placed(specs, LINEAR_FIELDS), input_scale,
                               input_zero_point)
    kernels = (design.quant_kernel, design.gemm_kernel(bias))
    return Program("linear", design.sku, target, specs, kernels,
                   tuple((0, s) for s in quant) + tuple((1, s) for s in gemm))


def quantize_program(desc: DynamicRangeQuantizeDescriptor, facts: AdapterFacts,
                     options: WgpuOptions, *, target: str = "tint",
                     input_scale: float | None = None,
                     input_zero_point: int | None = None) -> Program:
    """The activation-pass plan for ``desc`` on an adapter with ``facts`` and ``options``;
    a static scheme's scale and zero point as :func:`linear_program` takes them."""
    check_target(target)
    input_scale, input_zero_point = scheme_constants(desc, input_scale, input_zero_point)
    design = QuantDesign.make(desc, facts, options, _ALIGN)
    m, k, dt = desc.m, desc.k, desc.dtype
    fields: dict[str, tuple[tuple[int, ...], DType, str]] = {
        "activation": ((m, k), dt, "input"), "act_q": ((m, k), s8, "output"),
        "act_scale": ((m,), dt, "output")}
    if desc.scheme.asymmetric:
        fields["act_zp"] = ((m,), s32, "output")
    specs = _specs(fields)
    steps = design.steps(_placed(specs, QUANT_FIELDS), input_scale,
                         input_zero_point)
    return Program("quantize", design.sku, target, specs, (design.kernel,),
                   tuple((0, s) for s in steps))

