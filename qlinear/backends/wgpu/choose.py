"""Which kernels a plan runs: pure functions of the problem, the adapter's facts and the
options. Nothing here touches a device or imports wgpu, so every choice (and every
:class:`Unsupported` message) can be tested for any adapter, by describing it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ...dtypes import DType, f16, f64
from ...errors import Unsupported
from ...problem import DECODE_MAX_M, DynamicRangeQuantizeDescriptor, QuantizedLinearDescriptor
from ...schemes import ActivationScheme
from .options import WgpuOptions

__all__ = ["AdapterFacts", "Storage", "QuantChoice", "GemvChoice", "TiledChoice", "LinearChoice",
           "choose_quant", "choose_linear", "choose_storage", "inner_product",
           "inner_product_why", "f16_native", "quantize_sku", "linear_sku", "DOT4_FAILED",
           "CPU_LOOP_BUDGET", "k_loop_iterations"]

# Adapter types that are GPUs; software adapters (lavapipe) report "CPU".
_GPU_TYPES = ("DiscreteGPU", "IntegratedGPU", "VirtualGPU")
# TIN_KIND of elem_words.wgsl.
_TIN_KIND = {"f32": 0, "f16": 1, "bf16": 2}
# SCHEME of rowquant.wgsl.
_SCHEME_CODE = {ActivationScheme.DYNAMIC: 0, ActivationScheme.STATIC: 1,
                ActivationScheme.STATIC_ASYM: 2, ActivationScheme.DYNAMIC_ASYM: 3}
#: Loop iterations an invocation may run on a CPU adapter: llvmpipe (lavapipe) ends every
#: loop of a shader invocation once 65535 iterations of all its loops together have run
#: (Mesa's LP_MAX_TGSI_LOOP_ITERATIONS, shared by every loop of a shader), silently: a
#: longer K loop would leave the rest of K out of the sum. Loops of constant trip count
#: are unrolled before it counts; the tiled GEMMs' are not. A margin stays for the rest.
CPU_LOOP_BUDGET = 65535 - 1024
#: Why a plan takes the f32 path on an adapter whose dot4I8Packed failed the probe
#: (``AdapterFacts.dot4_exact`` False): said in its sku.
DOT4_FAILED = "f32 path: dot4I8Packed failed the probe"


@dataclass(frozen=True)
class AdapterFacts:
    """What the choosers need to know about an adapter.

    Attributes:
        is_gpu: a GPU, not a CPU adapter such as lavapipe (which prefers other shapes).
        backend_type: the driver API wgpu runs on: "Vulkan", "Metal", "D3D12", "OpenGL".
        features: the device features (``"shader-f16"``, ...), as wgpu or WebGPU names them.
        max_invocations_per_workgroup, max_workgroup_size_x, max_workgroup_size_y: limits.
        dot4_exact: False where the adapter got ``dot4I8Packed`` wrong on the probe's edge
            values (:mod:`qlinear.backends.wgpu.probe`): its plans take the f32 path.
    """

    is_gpu: bool
    backend_type: str
    features: frozenset[str]
    max_invocations_per_workgroup: int
    max_workgroup_size_x: int
    max_workgroup_size_y: int
    dot4_exact: bool = True

    @classmethod
    def from_adapter(cls, adapter_type: str, backend_type: str, features: Iterable[str],
                     limits: Mapping[str, Any], dot4_exact: bool = True) -> AdapterFacts:
        """The facts of an adapter as wgpu reports them (its ``info`` and device limits)
        and as the dot4 probe found it."""
        return cls(is_gpu=adapter_type in _GPU_TYPES, backend_type=backend_type,
                   features=frozenset(features),
                   max_invocations_per_workgroup=int(limits["max-compute-invocations-per-workgroup"]),
                   max_workgroup_size_x=int(limits["max-compute-workgroup-size-x"]),
                   max_workgroup_size_y=int(limits["max-compute-workgroup-size-y"]),
                   dot4_exact=bool(dot4_exact))

    @property
    def subgroups(self) -> bool:
        """Whether the device has subgroup operations (feature "subgroup" or "subgroups")."""
        return not self.features.isdisjoint(("subgroup", "subgroups"))

    @property
    def max_invocations_1d(self) -> int:
        """Most invocations of a workgroup laid out along x."""
        return min(self.max_invocations_per_workgroup, self.max_workgroup_size_x)

    @property
    def max_invocations_2d(self) -> int:
        """Most invocations of a workgroup laid out along x and y."""
        return min(self.max_invocations_per_workgroup,
                   self.max_workgroup_size_x * self.max_workgroup_size_y)


@dataclass(frozen=True)
class Storage:
    """How TIn is held in WGSL: the element-access prelude (``elem_<prelude>.wgsl``), its
    TIN_KIND override (words prelude only) and the tag that names it in the sku."""

    prelude: str
    tag: str
    tin_kind: int | None = None

    def constants(self) -> dict[str, int]:
        """The override constants of the prelude."""
        return {} if self.tin_kind is None else {"TIN_KIND": self.tin_kind}


@dataclass(frozen=True)
class QuantChoice:
    """The activation pass (``rowquant.wgsl``): one workgroup of ``wg`` invocations per row,
    quantizing by ``scheme`` (a pipeline variant: its SCHEME override)."""

    storage: Storage
    wg: int
    exact: bool
    scheme: ActivationScheme = ActivationScheme.DYNAMIC
    #: The row's amax (min, max) reduced with subgroup operations, not workgroup atomics alone.
    subgroups: bool = False

    family = "rowquant"
    entry = "main"

    @property
    def name(self) -> str:
        """The kernel's name in the sku: the scheme named unless it is the default."""
        scheme = "" if self.scheme is ActivationScheme.DYNAMIC else f"_{self.scheme.value}"
        return (f"rowquant_wg{self.wg}{scheme}" + ("_exact" if self.exact else "")
                + ("_sg" if self.subgroups else ""))

    def constants(self, q_min: int, q_max: int) -> dict[str, int]:
        """The override constants of the pipeline for quantization range ``q_min..q_max``."""
        return dict(self.storage.constants(), WG=self.wg, Q_MIN=q_min, Q_MAX=q_max,
                    SCHEME=_SCHEME_CODE[self.scheme], EXACT_ONLY=int(self.exact))


@dataclass(frozen=True)
class GemvChoice:
    """The small-M kernel (``gemv.wgsl``): ``kl`` invocations along K for each of ``cg``
    columns of a workgroup, all ``m`` rows at once."""

    storage: Storage
    ip: str
    m: int
    kl: int
    cg: int
    big_acc: bool
    #: Why the inner product is not the adapter's usual one ("" when it is), for the sku.
    why: str = ""
    #: The epilogue takes the zero point's share out of the accumulators (ASYM).
    asym: bool = False
    #: The K reduction runs through subgroup operations, not workgroup memory alone.
    subgroups: bool = False

    family = "gemv"
    entry = "main"
    #: Every row is in one dispatch: the kernel holds at most DECODE_MAX_M rows.
    splits_rows = False

    @property
    def bm(self) -> int:
        """Rows the kernel can hold."""
        return DECODE_MAX_M

    @property
    def bn(self) -> int:
        """Columns per workgroup."""
        return self.cg

    @property
    def name(self) -> str:
        """The kernel's name in the sku."""
        return (f"gemv_m{self.m}_kl{self.kl}_c{self.cg}_{self.ip}" + ("_zp" if self.asym else "")
                + ("_sg" if self.subgroups else ""))

    def constants(self, has_bias: bool) -> dict[str, int]:
        """The override constants of the pipeline, with or without the bias add."""
        return dict(self.storage.constants(), HAS_BIAS=int(has_bias), BIG_ACC=int(self.big_acc),
                    ASYM=int(self.asym), KL=self.kl, CG=self.cg, MROWS=max(1, self.m),
                    STRATEGY=1 if self.ip == "fma" else 0)


@dataclass(frozen=True)
class TiledChoice:
    """The tiled GEMM (``gemm_dot4.wgsl`` or ``gemm_f32.wgsl``): ``block`` x ``block``
    output blocks, ``tile`` x ``tile`` register tiles, ``bk`` words of K per step."""

    storage: Storage
    ip: str
    block: int
    tile: int
    bk: int
    big_acc: bool
    #: Why the inner product is not the adapter's usual one ("" when it is), for the sku.
    why: str = ""
    #: The epilogue takes the zero point's share out of the accumulators (ASYM).
    asym: bool = False
    #: The tiled GEMMs have no cross-invocation reduction: never subgroups.
    subgroups = False

    splits_rows = True

    @property
    def family(self) -> str:
        """The WGSL file: dot4I8Packed or f32 multiply-adds."""
        return "gemm_f32" if self.ip == "fma" else "gemm_dot4"

    @property
    def entry(self) -> str:
        """The entry point: one per register tile in gemm_dot4.wgsl."""
        return "main" if self.ip == "fma" else f"tile{self.tile}x{self.tile}"

    @property
    def bm(self) -> int:
        """Rows per workgroup."""
        return self.block

    @property
    def bn(self) -> int:
        """Columns per workgroup."""
        return self.block

    @property
    def name(self) -> str:
        """The kernel's name in the sku."""
        b, t = self.block, self.tile
        zp = "_zp" if self.asym else ""
        return f"gemm_tiled_{b}x{b}x{self.bk * 4}_r{t}x{t}_{self.ip}{zp}"

    def constants(self, has_bias: bool) -> dict[str, int]:
        """The override constants of the pipeline, with or without the bias add."""
        return dict(self.storage.constants(), HAS_BIAS=int(has_bias), BIG_ACC=int(self.big_acc),
                    ASYM=int(self.asym), BM=self.bm, BN=self.bn, BK=self.bk,
                    WGX=self.bn // self.tile, WGY=self.bm // self.tile)


LinearChoice = GemvChoice | TiledChoice


def inner_product(facts: AdapterFacts, options: WgpuOptions) -> str:
    """"dot4" or "fma": the option, else dot4I8Packed unless naga emulates it or the
    adapter failed the dot4 probe."""
    return inner_product_why(facts, options)[0]


def inner_product_why(facts: AdapterFacts, options: WgpuOptions) -> tuple[str, str]:
    """(:func:`inner_product`, why the f32 path is taken where dot4 would be usual: ""
    or :data:`DOT4_FAILED`). Forcing "dot4" on an adapter that failed the probe raises
    :class:`Unsupported`: its answers would be wrong."""
    if options.inner_product == "dot4" and not facts.dot4_exact:
        raise Unsupported("inner_product: expected 'fma' or None on this adapter, got 'dot4' "
                          "(its dot4I8Packed failed the probe: it computes wrong dot products)")
    if options.inner_product:
        return options.inner_product, ""
    # naga lowers dot4I8Packed to scalar shifts and multiplies for MSL and GLSL.
    if facts.backend_type in ("Metal", "OpenGL"):
        return "fma", ""
    return ("dot4", "") if facts.dot4_exact else ("fma", DOT4_FAILED)


def f16_native(facts: AdapterFacts, options: WgpuOptions) -> bool:
    """Whether f16 is held as WGSL f16 (else two per u32 word)."""
    if options.f16_storage == "native":
        if "shader-f16" not in facts.features:
            raise Unsupported("f16_storage: 'native' needs the adapter feature shader-f16, "
                              "which this adapter lacks")
        return True
    if options.f16_storage == "packed":
        return False
    return "shader-f16" in facts.features


def choose_storage(dtype: DType, facts: AdapterFacts, options: WgpuOptions) -> Storage:
    """How TIn = ``dtype`` is held; f64 raises :class:`Unsupported`."""
    if dtype == f64:
        raise Unsupported("dtype f64: WGSL has no 64-bit floats on the wgpu backend "
                          "(use f32, f16 or bf16 here, or the cpu or cuda backend for f64)")
    if dtype == f16 and f16_native(facts, options):
        return Storage("f16", "f16_native")
    tag = {"f32": "f32_words", "f16": "f16_packed", "bf16": "bf16_packed"}[dtype.name]
    return Storage("words", tag, _TIN_KIND[dtype.name])


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, int(x - 1).bit_length())


def choose_quant(desc: DynamicRangeQuantizeDescriptor, facts: AdapterFacts,
                 options: WgpuOptions) -> QuantChoice:
    """The activation pass for ``desc``."""
    storage = choose_storage(desc.dtype, facts, options)
    # One workgroup per row; on a CPU adapter (lavapipe) small workgroups are cheaper.
    cap = 256 if facts.is_gpu else 32
    wg = min(cap, facts.max_invocations_1d, max(32, _pow2_at_least(-(-desc.k // 4))))
    return QuantChoice(storage, wg, bool(options.quantize_exact_only), desc.scheme,
                       options.use_subgroups(facts.subgroups))


def choose_linear(desc: QuantizedLinearDescriptor, facts: AdapterFacts,
                  options: WgpuOptions) -> LinearChoice:
    """The GEMM for ``desc``: the small-M kernel for decode shapes, else the tiled GEMM
    with the largest tile that fits the adapter's workgroup limits."""
    storage = choose_storage(desc.dtype, facts, options)
    ip, why = inner_product_why(facts, options)
    asym = desc.scheme.asymmetric
    # |acc| <= K * span * 128, where span is max(|q|), or with a zero point the whole
    # range (q - zp spans it): below 2^24 every int32 -> f32 conversion is exact.
    span = desc.q_max - desc.q_min if asym else max(-desc.q_min, desc.q_max)
    big_acc = desc.k * span * 128 > 2**24
    if desc.is_decode:
        c: LinearChoice = _choose_gemv(desc, facts, options, storage, ip, big_acc, why)
    else:
        c = _choose_tiled(desc, facts, options, storage, ip, big_acc, why)
    return dataclasses.replace(c, asym=asym)


def _choose_gemv(desc: QuantizedLinearDescriptor, facts: AdapterFacts, options: WgpuOptions,
                 storage: Storage, ip: str, big_acc: bool, why: str) -> GemvChoice:
    wg_mem = options.max_workgroup_storage
    inv = facts.max_invocations_1d  # a one-dimensional workgroup of kl * cg
    # 32 lanes along K read a weight row coalesced on a GPU; on a CPU adapter
    # (lavapipe) each invocation is a SIMD lane and fewer, longer ones win.
    kl, cg = (32, 8) if facts.is_gpu else (8, 8)
    sg = options.use_subgroups(facts.subgroups)

    def mem(kl: int) -> int:  # row sums, + the parked vec4 partials without subgroups
        return DECODE_MAX_M * cg * 4 + (0 if sg else kl * cg * 16)

    # Fewer K lanes to fit the invocation or workgroup-memory limits.
    while (kl * cg > inv or mem(kl) > wg_mem) and kl > 1:
        kl //= 2
    if mem(kl) > wg_mem or kl * cg > inv:
        raise Unsupported(
            f"workgroup memory: the small-M kernel needs {mem(kl)} bytes and {kl * cg} "
            f"invocations, the adapter allows {wg_mem} bytes and {inv}")
    return GemvChoice(storage, ip, desc.m, kl, cg, big_acc, why, subgroups=sg)


def _choose_tiled(desc: QuantizedLinearDescriptor, facts: AdapterFacts, options: WgpuOptions,
                  storage: Storage, ip: str, big_acc: bool, why: str) -> TiledChoice:
    wg_mem = options.max_workgroup_storage
    inv = facts.max_invocations_2d
    word = 16 if ip == "fma" else 4  # bytes per staged word: vec4<f32> or u32
    # (block, register tile). The 8 x 8 tile halves the workgroup-memory traffic per
    # multiply-add, which bounds the 4 x 4 tile on GPUs (and measured 1.6x faster on
    # lavapipe); it needs M to fill 128-row blocks.
    want8 = ip == "dot4" and (options.tile == "8x8" or (options.tile is None and desc.m > 64))
    shapes = ([(128, 8)] if want8 else []) + [(64, 4), (32, 4)]
    # Deeper K steps mean fewer barriers, which lavapipe pays dearly for (measured
    # best: 32 words); GPUs keep a shallow, cache-friendly 8. gemm_f32 moves its f32
    # sums into int32 every 256 words, so its step must divide 256; on a CPU adapter it
    # deepens to 16 where 8 would run past the loop budget.
    if facts.is_gpu:
        bks: tuple[int, ...] = (8, 4, 2, 1)
    else:
        bks = (8, 16, 4, 2, 1) if ip == "fma" else (32, 16, 8, 4, 2, 1)
    tried = []
    for block, tile in shapes:
        if (block // tile) ** 2 > inv:
            tried.append(f"{block}x{block} r{tile}x{tile}: {(block // tile) ** 2} invocations")
            continue
        for bk in bks:
            mem = bk * 2 * block * word
            loops = k_loop_iterations(desc.k, block, tile, bk)
            if not facts.is_gpu and loops > CPU_LOOP_BUDGET:
                tried.append(f"{block}x{block}x{bk * 4}: {loops} loop iterations")
                continue
            tried.append(f"{block}x{block}x{bk * 4}: {mem} B")
            if mem <= wg_mem:
                return TiledChoice(storage, ip, block, tile, bk, big_acc, why)
    raise Unsupported(
        f"workgroup memory: no GEMM tile fits the adapter's limit of {wg_mem} bytes and "
        f"{inv} invocations per workgroup"
        f"{'' if facts.is_gpu else f' and {CPU_LOOP_BUDGET} loop iterations'} "
        f"(tried {', '.join(tried)})")


def k_loop_iterations(k: int, block: int, tile: int, bk: int) -> int:
    """Loop iterations one invocation of the tiled GEMM runs over K (the count llvmpipe's
    loop limit applies to): per step of ``bk`` words, the two staging loops
    (``block * bk`` words over ``(block / tile)**2`` invocations each), the ``bk``
    multiply-add steps, and one exit check per loop and for the step itself."""
    words = -(-k // 4)
    steps = -(-words // bk)
    staging = -(-block * bk // (block // tile) ** 2)
    return steps * (2 * staging + bk + 4)


def quantize_sku(q: QuantChoice) -> str:
    """The sku of an activation-pass plan."""
    return f"wgpu.{q.name}+{q.storage.tag}"


def linear_sku(q: QuantChoice, c: LinearChoice) -> str:
    """The sku of a linear plan: its activation pass, its GEMM, its TIn storage, and why
    its inner product is not the adapter's usual one, where it is not."""
    sku = f"wgpu.{q.name}+{c.name}+{c.storage.tag}"
    return f"{sku} ({c.why})" if c.why else sku
