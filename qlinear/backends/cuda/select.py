"""Kernel selection: descriptor + device facts -> kernel specs and launch geometry.

Pure: it needs neither cuda-python nor a device, so every choice for every supported
architecture is testable on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...dtypes import DType, DTypeLike, as_dtype
from ...problem import DECODE_MAX_M
from ...schemes import ActivationScheme, as_scheme
from .specs import (
    ACT_THREADS,
    ACT_WARP_MAX_K,
    DP4A_TILES,
    GEMV_NGROUPS,
    MMA_TILES,
    WGMMA_TILES,
    KernelSpec,
    act_spec,
    arch_number,
    dp4a_spec,
    gemm_mma_spec,
    gemv_spec,
    wgmma_spec,
)

__all__ = ["LinearSelection", "WGMMA_MIN_M", "select_linear", "select_quantize"]

#: The wgmma GEMM takes prefill shapes only: below this many rows a 128-row tile is
#: mostly empty and the mma.sync GEMM's 64-row tiles give more blocks.
WGMMA_MIN_M = 65


@dataclass(frozen=True)
class LinearSelection:
    """The kernels of one linear plan and their launch geometry.

    ``act``/``gemm`` are the fast variants for the shape; ``act_fallback``/``gemm_fallback``
    serve tensors whose addresses are not 16-byte aligned (the same kernels with element
    or byte loads; equal to the fast ones when the shape already rules vectors out)."""

    act: KernelSpec
    act_fallback: KernelSpec
    act_grid: tuple[int, ...]
    gemm: KernelSpec
    gemm_fallback: KernelSpec
    gemm_grid: tuple[int, ...]
    sku: str


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _act_plan(m: int, k: int, dtype: DType,
              scheme: ActivationScheme) -> tuple[KernelSpec, KernelSpec, tuple[int, ...]]:
    warp_rows = k <= ACT_WARP_MAX_K
    vec_ok = k > 0 and (k * dtype.itemsize) % 16 == 0
    fast = act_spec(dtype, warp_rows, vec_ok, scheme)
    fallback = act_spec(dtype, warp_rows, False, scheme)
    rows_per_block = ACT_THREADS // 32 if warp_rows else 1
    return fast, fallback, (max(1, _cdiv(m, rows_per_block)),)


def select_quantize(m: int, k: int, dtype: DTypeLike,
                    scheme: ActivationScheme | str = ActivationScheme.DYNAMIC,
                    ) -> tuple[KernelSpec, KernelSpec, tuple[int, ...]]:
    """``(fast, fallback, grid)`` of the activation pass for ``x[m, k]`` in ``scheme``."""
    return _act_plan(m, k, as_dtype(dtype), as_scheme(scheme))


def _gemv_groups(m: int, n: int, sm_count: int) -> int:
    """NG of the decode kernel (steps 1-3 of :func:`select_linear`)."""
    rows = min(m, 16)  # a block's activation rows
    widest_first = sorted(GEMV_NGROUPS, reverse=True)
    lean = [g for g in widest_first if rows <= 4 * g] or widest_first[:1]
    for g in lean:
        if _cdiv(n, 8 * g) >= 2 * sm_count:
            return g
    for g in widest_first:
        if g <= lean[-1] and 2 * _cdiv(n, 8 * g) >= sm_count:
            return g
    return widest_first[-1]


def _wgmma_tile(m: int, n: int, sm_count: int) -> str:
    """The :data:`WGMMA_TILES` entry for ``m x n``: the 128x256 tile when its tiles cover
    every SM (half as many shared-memory reads of the activation per MMA), else the
    128x128 one, which gives twice as many tiles."""
    bm, bn = WGMMA_TILES["128x256"][:2]
    return "128x256" if _cdiv(m, bm) * _cdiv(n, bn) >= sm_count else "128x128"


def select_linear(m: int, n: int, k: int, dtype: DTypeLike, arch: str, sm_count: int,
                  scheme: ActivationScheme | str = ActivationScheme.DYNAMIC,
                  wgmma: bool = False) -> LinearSelection:
    """Choose the kernels for ``y[m, n] = dequant(quant(x[m, k]) @ w[n, k].T)`` on ``arch``,
    with the activation pass of ``scheme`` and, for an asymmetric one, the GEMM with the
    zero-point term (the shape alone chooses the GEMM's family, tile and width).

    Decode shapes (``m <=`` :data:`~qlinear.problem.DECODE_MAX_M`) take the split-K kernel
    that streams the weight once (sm_80+) or the 16-row dp4a tile (sm_75); larger ones
    the tiled GEMM, 128x128 when that still gives every SM a tile, else 64x64.

    With ``wgmma`` (the backend's switch) on sm_90a, ``m >=`` :data:`WGMMA_MIN_M` and
    ``k % 16 == 0`` (``k > 0``), the Hopper GEMM takes the shape instead, with the tile of
    :func:`_wgmma_tile`, on a persistent grid of at most one block per SM; its fallback
    for operands that are not 16-byte aligned stays the mma.sync byte-load kernel.

    The decode kernel's block (8 x NG columns, NG in :data:`GEMV_NGROUPS`) reads all of its
    ``m`` activation rows (``m * k`` bytes, from L2) for ``8 * NG * k`` weight bytes, so
    narrow blocks at ``m = 16`` move twice as many activation bytes as weight bytes. NG is:

    1. at least the narrowest with activation bytes per block at most half its weight
       bytes (``m <= 4 * NG``; any NG at ``m <= 4``);
    2. among those, the widest that still gives every SM two blocks;
    3. if none does, the narrowest of step 1, unless its grid would leave more than half
       of the SMs idle: then the widest NG that gives at least half of them a block
       (idle SMs cost more bandwidth than re-read activations), else the narrowest.

    At ``m <= 4`` step 1 allows every NG: the widest block that gives every SM two, else
    the narrowest."""
    dt = as_dtype(dtype)
    sch = as_scheme(scheme)
    act, act_fb, act_grid = _act_plan(m, k, dt, sch)
    aligned = k % 16 == 0
    zp = sch.asymmetric
    sm_count = max(1, int(sm_count))
    grid: tuple[int, ...]
    if arch_number(arch) >= 80:
        if m <= DECODE_MAX_M:
            ng = _gemv_groups(m, n, sm_count)
            gemm = gemv_spec(dt, ng, aligned, zp)
            gemm_fb = gemv_spec(dt, ng, False, zp)
            grid = (max(1, _cdiv(n, 8 * ng)), max(1, _cdiv(m, 16)))
        else:
            tile = "128x128" if _cdiv(m, 128) * _cdiv(n, 128) >= sm_count else "64x64"
            bm, bn = MMA_TILES[tile][:2]
            gemm = gemm_mma_spec(dt, tile, aligned, zp)
            gemm_fb = gemm_mma_spec(dt, tile, False, zp)
            grid = (_cdiv(m, bm) * _cdiv(n, bn),)
            if wgmma and arch == "sm_90a" and m >= WGMMA_MIN_M and k > 0 and aligned:
                big = _wgmma_tile(m, n, sm_count)
                bm, bn = WGMMA_TILES[big][:2]
                gemm = wgmma_spec(dt, big, zp)
                grid = (min(_cdiv(m, bm) * _cdiv(n, bn), sm_count),)
    else:
        tile = "16x128" if m <= DECODE_MAX_M else "128x128"
        bm, bn = DP4A_TILES[tile][:2]
        gemm = dp4a_spec(dt, tile, aligned, zp)
        gemm_fb = dp4a_spec(dt, tile, False, zp)
        grid = (max(1, _cdiv(m, bm) * _cdiv(n, bn)),)
    sku = f"cuda.{arch}.{act.label}+{gemm.label}+dequant_{dt.name}"
    return LinearSelection(act, act_fb, act_grid, gemm, gemm_fb, grid, sku)
