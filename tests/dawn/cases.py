"""The conformance matrix: which exported programs run in the browser, and how each is
built (program, fresh random data, poisoned outputs) and checked.

Each :class:`Case` forces one kernel variant through :class:`WgpuOptions` and names in
``expect`` what its sku must hold, so a chooser change that stops exercising a variant
fails instead of passing on another kernel.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

import qlinear as ql
from qlinear.backends.wgpu.choose import AdapterFacts
from qlinear.backends.wgpu.options import WgpuOptions
from qlinear.backends.wgpu.program import (
    Program,
    linear_program,
    quantize_program,
)
from qltest import (
    POISON,
    oracle_linear_scheme,
    oracle_quantize_scheme,
    random_activation,
    random_scale,
    random_weight,
    shifted_activation,
)

__all__ = ["Case", "CASES", "Built", "build", "cpu_outputs", "oracle_outputs"]

_DTYPES = {"f32": ql.f32, "f16": ql.f16, "bf16": ql.bf16}
_KS = (37, 64, 67)  # odd K (row padding, partial words) and a multiple of 4
#: (m, k, n) of the shared linear suite (tests/test_linear.py::test_linear_matches_oracle).
SHARED_SHAPES = [(1, 1, 1), (1, 3, 5), (2, 4, 8), (3, 7, 2), (5, 16, 16), (17, 33, 9),
                 (16, 64, 40), (33, 130, 65), (64, 256, 128), (7, 1023, 6), (9, 1025, 7),
                 (4, 2051, 3), (65, 48, 5), (130, 272, 136)]


@dataclass(frozen=True)
class Case:
    """One program: a linear layer or the activation pass alone, with forced options."""

    kind: str  # "linear" or "quantize"
    m: int
    k: int
    n: int
    dtype: str
    scheme: str = "dynamic"
    bias: bool = False
    ip: str | None = None  # inner_product
    tile: str | None = None
    sg: bool | None = None  # subgroups option; None: the adapter's choice
    exact: bool = False  # quantize_exact_only
    f16: str = "packed"  # f16_storage: "native" needs the adapter's shader-f16
    limits: tuple[tuple[str, int], ...] = ()  # lowered WgpuOptions limits
    qrange: tuple[int, int] | None = None  # (q_min, q_max); None: the scheme's default
    expect: tuple[str, ...] = ()  # substrings of the sku
    refuse: tuple[str, ...] = ()  # substrings the sku must not hold

    @property
    def id(self) -> str:
        parts = [self.kind, f"m{self.m}", f"k{self.k}"]
        if self.kind == "linear":
            parts += [f"n{self.n}", self.ip or "ip-auto"]
            parts += [f"tile{self.tile}"] if self.tile else []
            parts += ["bias"] if self.bias else []
        parts += [self.dtype, self.scheme]
        parts += [] if self.sg is None else ["sg" if self.sg else "nosg"]
        parts += ["exact"] if self.exact else []
        parts += ["f16native"] if self.f16 == "native" else []
        parts += [f"{name}{v}" for name, v in self.limits]
        parts += [f"q{self.qrange[0]}..{self.qrange[1]}"] if self.qrange else []
        return "-".join(parts)

    @property
    def options(self) -> dict[str, Any]:
        """The :meth:`WgpuOptions.replaced` settings of the case."""
        out: dict[str, Any] = {"inner_product": self.ip, "tile": self.tile,
                               "quantize_exact_only": self.exact, "f16_storage": self.f16,
                               **dict(self.limits)}
        if self.sg is not None:
            out["subgroups"] = self.sg
        return out


def _sg_marks(sg: bool | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(substrings the sku must hold, and must not) for the subgroups option ``sg``: the
    activation pass names its subgroup reduction "_sg" (then "+" starts the next kernel)."""
    if sg is None:
        return (), ()
    return ("_sg+",) if sg else (), () if sg else ("_sg",)


def _storage_tag(dtype: str) -> str:
    return "f32_words" if dtype == "f32" else f"{dtype}_packed"


def _gemv_cases() -> list[Case]:
    """The small-M kernel at M = 1, 3, 16, both inner products, every dtype; K, bias and
    the subgroup reductions rotate over them. Each is a pipeline of its own (MROWS = M)."""
    out = []
    for mi, (m, n) in enumerate(((1, 8), (3, 33), (16, 40))):
        for ii, ip in enumerate(("dot4", "fma")):
            for di, dt in enumerate(_DTYPES):
                sg = (mi + ii + di) % 2 == 0
                yes, no = _sg_marks(sg)
                gemv_sg = ("_sg",) if sg else ()
                out.append(Case("linear", m, _KS[(di + mi + ii) % 3], n, dt,
                                bias=(ii + di) % 2 == 0, ip=ip, sg=sg,
                                expect=(f"gemv_m{m}_", f"_{ip}", *gemv_sg, *yes,
                                        _storage_tag(dt)), refuse=no))
    return out


# The tiled GEMM's cases: (m, k, n, dtype, inner product, tile, bias, scheme, sg). Compiling
# a tiled pipeline takes SwiftShader seconds (the 8 x 8 tile several), so the list covers
# each kernel x dtype once and repeats pipelines (the same constants: TIN_KIND, HAS_BIAS,
# BIG_ACC, ASYM) where only the activation pass or the dispatch split differs.
_TILED = [
    (17, 37, 70, "f32", "dot4", "4x4", True, "dynamic", True),
    (64, 64, 33, "f16", "dot4", "4x4", False, "dynamic", False),
    (40, 67, 72, "bf16", "dot4", "4x4", True, "dynamic", True),
    (64, 67, 33, "f32", "fma", "4x4", False, "dynamic", False),
    (17, 37, 70, "f16", "fma", "4x4", True, "dynamic", True),
    (80, 64, 70, "f32", "fma", "4x4", False, "dynamic", True),  # 4 x 4 above M = 64
    (80, 67, 70, "f32", "dot4", "8x8", True, "dynamic", True),
    (130, 37, 40, "f16", "dot4", "8x8", False, "dynamic", False),  # two row blocks
    (40, 37, 72, "f32", "dot4", "4x4", False, "dynamic_asym", True),
    (40, 64, 72, "bf16", "fma", "4x4", True, "static_asym", False),
    (40, 67, 72, "f32", "dot4", "4x4", True, "static", False),  # the GEMM of the first
    # K * 127 * 128 > 2**24: int32 -> f32 conversions that are no longer exact (BIG_ACC).
    (20, 1100, 24, "f16", "dot4", "4x4", False, "dynamic", True),
    (20, 1100, 24, "f32", "fma", "4x4", True, "dynamic", False),
]


def _tiled_cases() -> list[Case]:
    out = []
    for m, k, n, dt, ip, tile, bias, scheme, sg in _TILED:
        yes, no = _sg_marks(sg)
        zp = ("_zp",) if "asym" in scheme else ()
        name = () if scheme == "dynamic" else (f"_{scheme}",)
        out.append(Case("linear", m, k, n, dt, scheme=scheme, bias=bias, ip=ip, tile=tile,
                        sg=sg, expect=(f"_r{tile}_{ip}", *zp, *name, *yes,
                                       _storage_tag(dt)), refuse=no))
    return out


def _linear_cases() -> list[Case]:
    out = _gemv_cases() + _tiled_cases()
    # The other schemes on the small-M kernel, both inner products.
    for si, scheme in enumerate(("static", "static_asym", "dynamic_asym")):
        for ii, ip in enumerate(("dot4", "fma")):
            sg = (si + ii) % 2 == 1
            yes, no = _sg_marks(sg)
            zp = ("_zp",) if "asym" in scheme else ()
            out.append(Case("linear", 5, _KS[(si + ii) % 3], 24, list(_DTYPES)[(si + ii) % 3],
                            scheme=scheme, bias=ii == 1, ip=ip, sg=sg,
                            expect=(f"_{scheme}", "gemv_m5_", f"_{ip}", *zp, *yes), refuse=no))
    # Dispatches split by a lowered storage-binding or workgroup-count limit; the tiled
    # ones repeat pipelines of _TILED.
    for limit in (("max_storage_binding", 1024), ("max_workgroups_per_dim", 2)):
        n = 150 if limit[0] == "max_workgroups_per_dim" else 77  # > 2 blocks of 64 columns
        out += [Case("linear", 5, 45, 77, "f16", bias=True, limits=(limit,), expect=("gemv",)),
                Case("linear", 5, 45, 77, "bf16", scheme="dynamic_asym", limits=(limit,),
                     expect=("gemv",)),
                Case("linear", 40, 45, n, "f16", ip="dot4", sg=False, limits=(limit,),
                     expect=("_r4x4_dot4",)),
                Case("linear", 40, 45, n, "f32", ip="dot4", scheme="dynamic_asym", sg=True,
                     limits=(limit,), expect=("_r4x4_dot4",))]
    # K past the exact f32 conversion range on the small-M kernel.
    out += [Case("linear", 2, 1100, 16, "bf16", ip=ip, bias=ip == "fma", expect=(f"_{ip}",))
            for ip in ("dot4", "fma")]
    # f16 as WGSL f16, where the adapter has shader-f16 (SwiftShader has not: skipped).
    out += [Case("linear", m, 37, 40, "f16", ip="dot4", bias=True, f16="native",
                 expect=("f16_native",)) for m in (3, 40)]
    # The shared linear suite's shapes (tests/test_linear.py), with the kernels the
    # choosers pick for this adapter: nothing forced. dtype and bias rotate so that the
    # tiled ones reuse pipelines of _TILED (compiling one takes SwiftShader seconds).
    for i, (m, k, n) in enumerate(SHARED_SHAPES):
        dt, bias = (("f32", True), ("f16", False), ("bf16", True))[i % 3 if m <= 64 else i % 2]
        out.append(Case("linear", m, k, n, dt, bias=bias,
                        expect=("gemv_" if m <= 16 else "gemm_tiled_",)))
    # A quantization range other than the scheme's (the activation pass's Q_MIN / Q_MAX).
    out += [Case("linear", 20, 37, 11, "bf16", qrange=(-8, 7), expect=("gemm_tiled_",)),
            Case("linear", 3, 37, 11, "f16", scheme="dynamic_asym", qrange=(-100, 20),
                 expect=("gemv_",))]
    # Every activation element through the exact integer division.
    out += [Case("linear", 2, 67, 20, "bf16", ip="dot4", exact=True, expect=("_exact",)),
            Case("linear", 17, 37, 70, "f16", ip="fma", bias=True, exact=True, sg=True,
                 expect=("_exact", "_r4x4_fma"))]
    return out


def _quantize_cases() -> list[Case]:
    out = []
    for si, scheme in enumerate(("dynamic", "static", "static_asym", "dynamic_asym")):
        for di, dt in enumerate(_DTYPES):
            sg = (si + di) % 2 == 0
            yes, no = _sg_marks(sg)
            name = "" if scheme == "dynamic" else f"_{scheme}"
            out.append(Case("quantize", 6 + di, _KS[(si + di) % 3] * (3 if di == 2 else 1), 0,
                            dt, scheme=scheme, sg=sg,
                            expect=(f"rowquant_wg32{name}", *yes), refuse=no))
    out.append(Case("quantize", 9, 37, 0, "f16", exact=True, sg=True, expect=("_exact_sg",)))
    out.append(Case("quantize", 9, 130, 0, "bf16", scheme="dynamic_asym", exact=True, sg=False,
                    expect=("_exact",), refuse=("_sg",)))
    for limit in (("max_storage_binding", 1024), ("max_workgroups_per_dim", 2)):
        out.append(Case("quantize", 40, 45, 0, "f16", scheme="static_asym", limits=(limit,)))
    out.append(Case("quantize", 5, 67, 0, "f16", scheme="dynamic_asym", f16="native",
                    expect=("f16_native",)))
    return out


#: Every case, in a stable order.
CASES = _linear_cases() + _quantize_cases()


@dataclass
class Built:
    """A case made concrete: its program, its host data and the browser's document."""

    case: Case
    program: Program
    desc: Any
    arrays: dict[str, Any]  # inputs by tensor name, and the static scalars
    document: dict[str, Any]  # {"program", "inputs", "poison"}, for the page


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _poison(program: Program, rng: np.random.Generator) -> dict[str, str]:
    out = {}
    for name, spec in program.tensors.items():
        if spec.role == "input":
            continue
        if spec.dtype.is_float:
            arr = np.full(spec.shape, POISON, spec.dtype.numpy)
        else:
            info = np.iinfo(spec.dtype.numpy)
            arr = rng.integers(info.min, info.max, size=spec.shape, dtype=spec.dtype.numpy,
                               endpoint=True)
        out[name] = _b64(program.input_bytes(name, arr))
    return out


def build(case: Case, facts: AdapterFacts, limits: Mapping[str, Any],
          rng: np.random.Generator) -> Built:
    """The program of ``case`` for an adapter with ``facts`` and ``limits``, and fresh
    random data; :class:`ql.Unsupported` where the options cannot be met."""
    dtype = _DTYPES[case.dtype]
    options = WgpuOptions.from_limits(limits).replaced(**case.options)
    scheme = ql.ActivationScheme(case.scheme)
    m, k, n = case.m, case.k, case.n
    q_min, q_max = case.qrange or (None, 127)
    x = (shifted_activation if scheme.asymmetric else random_activation)(rng, m, k, dtype)
    arrays: dict[str, Any] = {"activation": x, "input_scale": None, "input_zero_point": None}
    if scheme.static:
        # Some elements saturate: static quantization clamps what lies beyond the range.
        arrays["input_scale"] = float(np.abs(x.astype(np.float64)).max() / 100)
    if scheme.static_zero_point:
        arrays["input_zero_point"] = int(rng.integers(-20, 21))
    scalars = {"input_scale": arrays["input_scale"],
               "input_zero_point": arrays["input_zero_point"]}
    if case.kind == "linear":
        desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype, scheme=scheme,
                                            q_min=q_min, q_max=q_max)
        program = linear_program(desc, facts, options, bias=case.bias, target="tint", **scalars)
        wq = random_weight(rng, n, k)
        arrays.update(weight_q=wq, weight_scale=random_scale(rng, n, dtype))
        if case.bias:
            arrays["bias"] = rng.standard_normal(n).astype(dtype.numpy)
        if scheme.asymmetric:
            arrays["weight_colsum"] = ql.weight_colsum(wq)
    else:
        desc = ql.DynamicRangeQuantizeDescriptor(m=m, k=k, dtype=dtype, scheme=scheme,
                                                 q_min=q_min, q_max=q_max)
        program = quantize_program(desc, facts, options, target="tint", **scalars)
    inputs = {name: _b64(program.input_bytes(name, arrays[name]))
              for name, spec in program.tensors.items() if spec.role == "input"}
    doc = {"program": program.to_json(), "inputs": inputs, "poison": _poison(program, rng)}
    return Built(case, program, desc, arrays, doc)


def cpu_outputs(built: Built, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every output and scratch of the same run on the cpu backend, from poisoned arrays."""
    cpu = ql.backend("cpu")
    a, desc, p = built.arrays, built.desc, built.program
    outs = {name: np.frombuffer(base64.b64decode(built.document["poison"][name]), np.uint8)
            for name in built.document["poison"]}
    fresh = {name: p.read(name, data.tobytes()) for name, data in outs.items()}
    scalars = {"input_scale": a["input_scale"], "input_zero_point": a["input_zero_point"]}
    if built.case.kind == "linear":
        plan = ql.QuantizedLinearPlan.select(cpu, desc)
        args = ql.QuantizedLinearArgs(
            activation=a["activation"], weight_q=a["weight_q"], weight_scale=a["weight_scale"],
            bias=a.get("bias"), weight_colsum=a.get("weight_colsum"), **fresh, **scalars)
    else:
        plan = ql.DynamicRangeQuantizePlan.select(cpu, desc)
        args = ql.DynamicRangeQuantizeArgs(activation=a["activation"], **fresh, **scalars)
    plan.run(args)
    return fresh


def oracle_outputs(built: Built) -> dict[str, np.ndarray]:
    """The int64 oracle's values of the outputs and scratches, by tensor name."""
    a, case = built.arrays, built.case
    dtype = _DTYPES[case.dtype]
    q_min, q_max = case.qrange or (None, 127)
    args = (dtype, case.scheme, a["input_scale"], a["input_zero_point"], q_min, q_max)
    if case.kind == "linear":
        y, q, s, zp = oracle_linear_scheme(a["activation"], a["weight_q"], a["weight_scale"],
                                           a.get("bias"), *args)
        out = {"output": y, "act_q_scratch": q, "act_scale_scratch": s, "act_zp_scratch": zp}
    else:
        q, s, zp = oracle_quantize_scheme(a["activation"], *args)
        out = {"act_q": q, "act_scale": s, "act_zp": zp}
    return {name: v for name, v in out.items() if name in built.program.tensors}
