"""Kernel specs: every template instantiation a plan can launch, named once.

A :class:`KernelSpec` says which ``__global__`` template of which ``cuda/`` source, with
which template arguments; :func:`kernel_variants` lists all of them for an architecture,
so CI compiles exactly what the selection (:mod:`.select`) can choose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...dtypes import FLOAT_DTYPES, DType, f64
from ...errors import InvalidProblem
from ...problem import DECODE_MAX_M
from ...schemes import ActivationScheme, as_scheme

__all__ = [
    "KernelSpec",
    "SUPPORTED_ARCHS",
    "ACT_THREADS",
    "ACT_WARP_MAX_K",
    "MMA_TILES",
    "DP4A_TILES",
    "WGMMA_TILES",
    "WGMMA_THREADS",
    "GEMV_WARPS",
    "GEMV_NGROUPS",
    "ACT_SCHEMES",
    "ZP_NONE",
    "ZP_ALWAYS",
    "ZP_IF_GIVEN",
    "act_spec",
    "gemm_mma_spec",
    "gemv_spec",
    "gemv_unroll",
    "dp4a_spec",
    "wgmma_spec",
    "wgmma_smem_bytes",
    "arch_number",
    "kernel_variants",
]

#: The architectures CI compiles every kernel for (sm_90a: the H100's own, with its
#: architecture-specific features enabled).
SUPPORTED_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90a")

_CTYPES = {"f32": "float", "f16": "__half", "bf16": "__nv_bfloat16", "f64": "double"}

ACT_THREADS = 256
#: Rows up to this many elements: one warp per row (else one block per row).
ACT_WARP_MAX_K = 2048
#: Tensor-core GEMM tiles, name: (BM, BN, WARPS_M, WARPS_N, STAGES).
MMA_TILES = {
    "128x128": (128, 128, 2, 4, 3),
    "64x64": (64, 64, 2, 2, 3),
}
#: dp4a GEMM tiles, name: (BM, BN, TM, TN).
DP4A_TILES = {
    "128x128": (128, 128, 8, 8),
    "16x128": (16, 128, 2, 4),
}
#: Hopper (sm_90a) wgmma GEMM tiles, name: (BM, BN, STAGES); each stage holds a 128-byte
#: k-tile of both operands, (BM + BN) x 128 bytes, so either table row takes 192 KiB.
WGMMA_TILES = {
    "128x256": (128, 256, 4),
    "128x128": (128, 128, 6),
}
#: The wgmma GEMM's block: a producer warpgroup and two consumer warpgroups.
WGMMA_THREADS = 384
GEMV_WARPS = 8
#: Column groups of 8 per block the decode kernel is built for.
GEMV_NGROUPS = (1, 2, 4)

#: ``SCHEME`` of ``act_quant.cu`` per activation scheme (its SCHEME_* constants): both
#: static schemes share a kernel (the zero point is a run argument, 0 when symmetric).
ACT_SCHEMES = {
    ActivationScheme.DYNAMIC: 0,
    ActivationScheme.STATIC: 1,
    ActivationScheme.STATIC_ASYM: 1,
    ActivationScheme.DYNAMIC_ASYM: 2,
}
#: ``ZP`` of the GEMM kernels (qlinear_common.cuh): no zero-point term; always; where a
#: zero-point pointer is given (the byte-load fallbacks, one kernel for every scheme).
ZP_NONE, ZP_ALWAYS, ZP_IF_GIVEN = 0, 1, 2


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: a template instantiation in one source file.

    Attributes:
        source: file in ``cuda/``.
        template: the ``__global__`` function template.
        args: template arguments, as C++ text.
        threads: threads per block it is compiled for (``__launch_bounds__``).
        label: a short name for ``plan.sku``.
        pdl: launched with programmatic dependent launch on sm_90+ (it waits for the
            previous kernel itself, with ``griddepcontrol.wait``, after loads that do
            not depend on it).
        smem: dynamic shared memory per block, in bytes (above 48 KiB the kernel's
            limit is raised when it is loaded).
        tma_rows: for kernels whose first parameters are tensor maps (of the quantized
            activation, then of the weight), the rows of each map's box; empty otherwise.
    """

    source: str
    template: str
    args: tuple[str, ...]
    threads: int
    label: str
    pdl: bool = False
    smem: int = 0
    tma_rows: tuple[int, ...] = ()

    @property
    def name_expression(self) -> str:
        """The C++ name expression NVRTC instantiates, e.g.
        ``qlinear_act_quant<float, 256, ...>``."""
        return f"{self.template}<{', '.join(self.args)}>"


def _b(v: bool) -> str:
    return "true" if v else "false"


def _act_cache(dtype: DType, scheme: ActivationScheme) -> int:
    # 16-byte vectors each thread keeps in registers between the two passes, all loaded
    # before the first is used (8 cover a warp's row of 2048 16-bit elements). f64 keeps
    # none: the row's f64 division and reciprocal call slow-path routines that clobber so
    # many registers that ptxas spills cached vectors around them (at 4 and at 8); its
    # loads are issued four at a time from L1/L2 instead. The asymmetric row's divisions
    # and its range spill 8 cached 16-bit vectors the same way: those keep 4 (ptxas's
    # choices, checked for every variant by tests/test_cuda_compile.py and
    # tests/test_cuda_sass.py: f32 spills at 4 but not at 8).
    if dtype == f64:
        return 0
    if scheme is ActivationScheme.DYNAMIC_ASYM and dtype.itemsize == 2:
        return 4
    return 8


def act_spec(dtype: DType, warp_rows: bool, vec: bool,
             scheme: ActivationScheme | str = ActivationScheme.DYNAMIC) -> KernelSpec:
    """The activation-pass kernel for ``scheme``: one warp (``warp_rows``) or one block per
    row, 16-byte vectors (``vec``) or elements. The label names any scheme but the default."""
    sch = as_scheme(scheme)
    rows = "warp" if warp_rows else f"block{ACT_THREADS}"
    named = "" if sch is ActivationScheme.DYNAMIC else f"{sch.value}_"
    label = f"rowquant_{named}{rows}_{'vec16' if vec else 'scalar'}"
    return KernelSpec("act_quant.cu", "qlinear_act_quant",
                      (_CTYPES[dtype.name], str(ACT_THREADS), _b(warp_rows), _b(vec),
                       str(_act_cache(dtype, sch)), str(ACT_SCHEMES[sch])),
                      ACT_THREADS, label)


def _zp(aligned: bool, zp: bool) -> tuple[str, str]:
    """``(ZP template argument, label suffix)``: the aligned kernels come with and without
    the zero-point term, the byte-load fallbacks apply it where the run passes zero points."""
    if not aligned:
        return str(ZP_IF_GIVEN), "_bytes"
    return (str(ZP_ALWAYS), "_zp") if zp else (str(ZP_NONE), "")


def gemm_mma_spec(dtype: DType, tile: str, aligned: bool, zp: bool = False) -> KernelSpec:
    """The tensor-core GEMM with a ``tile`` of :data:`MMA_TILES`; ``zp``: with the
    zero-point term of the asymmetric schemes."""
    bm, bn, wm, wn, stages = MMA_TILES[tile]
    zp_arg, suffix = _zp(aligned, zp)
    return KernelSpec("gemm_mma.cu", "qlinear_gemm_mma",
                      (_CTYPES[dtype.name], str(bm), str(bn), str(wm), str(wn), str(stages),
                       _b(aligned), zp_arg),
                      wm * wn * 32, f"gemm_mma_{tile}x64_s{stages}{suffix}")


def gemv_unroll(ngroups: int) -> int:
    """``U`` of ``gemv_mma.cu`` for ``ngroups`` column groups: the 64-byte chunks of K
    each warp loads per step."""
    return 4 if ngroups <= 2 else 2


def gemv_spec(dtype: DType, ngroups: int, aligned: bool, zp: bool = False) -> KernelSpec:
    """The decode kernel with ``ngroups`` x 8 columns per block; ``zp`` as for
    :func:`gemm_mma_spec`."""
    zp_arg, suffix = _zp(aligned, zp)
    return KernelSpec("gemv_mma.cu", "qlinear_gemv_mma",
                      (_CTYPES[dtype.name], str(GEMV_WARPS), str(ngroups),
                       str(gemv_unroll(ngroups)), _b(aligned), zp_arg),
                      GEMV_WARPS * 32,
                      f"decode_gemv_mma_n{8 * ngroups}_splitk{GEMV_WARPS}{suffix}", pdl=True)


def dp4a_spec(dtype: DType, tile: str, aligned: bool, zp: bool = False) -> KernelSpec:
    """The ``__dp4a`` GEMM with a ``tile`` of :data:`DP4A_TILES`; ``zp`` as for
    :func:`gemm_mma_spec`."""
    bm, bn, tm, tn = DP4A_TILES[tile]
    decode = "decode_" if bm <= DECODE_MAX_M else ""
    zp_arg, suffix = _zp(aligned, zp)
    return KernelSpec("gemm_dp4a.cu", "qlinear_gemm_dp4a",
                      (_CTYPES[dtype.name], str(bm), str(bn), str(tm), str(tn), _b(aligned),
                       zp_arg),
                      (bm // tm) * (bn // tn), f"{decode}gemm_dp4a_{tile}{suffix}")


def wgmma_smem_bytes(bn: int, stages: int) -> int:
    """Dynamic shared memory of ``gemm_wgmma.cu`` with ``stages`` stages of a 128 x ``bn``
    tile: the tiles, a full and an empty 8-byte barrier per stage, and the slack that lets
    the kernel start its tiles on a 1024-byte boundary (the swizzle pattern's period)."""
    return stages * (128 + bn) * 128 + 16 * stages + 1024


def wgmma_spec(dtype: DType, tile: str, zp: bool = False) -> KernelSpec:
    """The Hopper GEMM with a ``tile`` of :data:`WGMMA_TILES` (sm_90a only; 16-byte aligned
    operands and ``K % 16 == 0``, what its tensor maps need); ``zp`` as for
    :func:`gemm_mma_spec`."""
    bm, bn, stages = WGMMA_TILES[tile]
    zp_arg, suffix = _zp(True, zp)
    return KernelSpec("gemm_wgmma.cu", "qlinear_gemm_wgmma",
                      (_CTYPES[dtype.name], str(bn), str(stages), zp_arg),
                      WGMMA_THREADS, f"gemm_wgmma_{tile}x128_s{stages}_persistent{suffix}",
                      smem=wgmma_smem_bytes(bn, stages), tma_rows=(bm, bn))


def arch_number(arch: str) -> int:
    """``"sm_90a"`` -> 90."""
    m = re.fullmatch(r"sm_(\d+)[af]?", arch)
    if not m:
        raise InvalidProblem(f"arch: expected a name like 'sm_80' or 'sm_90a', got {arch!r}")
    return int(m.group(1))


def kernel_variants(arch: str) -> list[KernelSpec]:
    """Every kernel a plan can choose on ``arch``: every dtype, scheme, path, tile and
    alignment, and the Hopper GEMM on sm_90a (each kernel once: the static schemes share
    theirs, and the byte-load GEMMs serve every scheme)."""
    tensor_cores = arch_number(arch) >= 80
    schemes = [ActivationScheme.DYNAMIC, ActivationScheme.STATIC, ActivationScheme.DYNAMIC_ASYM]
    hopper = arch == "sm_90a"  # wgmma and setmaxnreg need the architecture-specific target
    specs = []
    for dt in FLOAT_DTYPES:
        for scheme in schemes:
            for warp_rows in (True, False):
                for vec in (True, False):
                    specs.append(act_spec(dt, warp_rows, vec, scheme))
        for aligned, zp in ((True, False), (True, True), (False, False)):
            if tensor_cores:
                specs += [gemm_mma_spec(dt, tile, aligned, zp) for tile in MMA_TILES]
                specs += [gemv_spec(dt, ng, aligned, zp) for ng in GEMV_NGROUPS]
            else:
                specs += [dp4a_spec(dt, tile, aligned, zp) for tile in DP4A_TILES]
        if hopper:
            specs += [wgmma_spec(dt, tile, zp) for tile in WGMMA_TILES for zp in (False, True)]
    return specs
