"""Dispatch planning, as pure data: how a run is cut into dispatches that fit the
adapter's limits, which byte range of each tensor every dispatch binds, and the
parameter block that tells the kernel where its block starts in each binding.

A problem larger than one storage binding (or one dispatch dimension) runs block by
block; each block binds a sub-range of each tensor, aligned down to the adapter's
offset alignment, and its ``*_base`` parameters locate the block's first element in it.

Nothing here touches a device: tensors are named (by their field in the argument
bundle) and placed (their byte offset in their buffer). The wgpu backend turns the steps
into bind groups (:mod:`.dispatch`); :mod:`.program` writes the same steps out for
another WebGPU implementation, so both run exactly one plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...errors import Unsupported
from .device import round_up
from .layouts import LINEAR, QUANT, Layout
from .options import WgpuOptions

if TYPE_CHECKING:
    from ...problem import DynamicRangeQuantizeDescriptor, QuantizedLinearDescriptor
    from .choose import LinearChoice

__all__ = ["Placed", "Span", "Step", "DUMMY", "PARAM_STRIDE", "binding_room", "span",
           "pack_params", "scale_bits", "quant_rows_per_dispatch", "quant_steps", "gemm_steps"]

#: Stride of the per-dispatch parameter blocks in one uniform buffer: the largest
#: min-uniform-buffer-offset-alignment WebGPU allows.
PARAM_STRIDE = 256

#: A tensor as the planner sees it: (its name in the bundle, its byte offset in its
#: buffer), or None where an optional tensor is absent.
Placed = tuple[str, int] | None


@dataclass(frozen=True)
class Span:
    """Bytes ``[offset, offset + size)`` of tensor ``tensor``'s buffer, bound to one
    variable of one dispatch. ``tensor`` None binds a 16-byte dummy buffer, one per
    variable (WebGPU refuses overlapping writable bindings of one buffer in a dispatch)."""

    tensor: str | None
    offset: int
    size: int


#: The binding of an absent tensor or an empty range.
DUMMY = Span(None, 0, 16)


@dataclass(frozen=True)
class Step:
    """One dispatch: its bind group layout, the fields of its parameter block, the span
    bound to each WGSL variable, and its grid of workgroups."""

    layout: Layout
    params: Mapping[str, int]
    spans: Mapping[str, Span]
    grid: tuple[int, int, int]


def binding_room(options: WgpuOptions, align: int) -> int:
    """Bytes a block may span so that, aligned down and rounded up, it fits one binding."""
    return options.max_storage_binding - align - 4


def span(align: int, t: Placed, b0: int, b1: int) -> tuple[Span, int]:
    """Bind bytes [b0, b1) of tensor ``t``: (span, byte offset of b0 inside it). An absent
    tensor or an empty range binds the dummy buffer."""
    if t is None or b1 <= b0:
        return DUMMY, 0
    name, base = t
    start = base + b0
    off = start - start % align
    return Span(name, off, round_up(base + b1 - off, 4)), start - off


def pack_params(dtype: np.dtype, blocks: Sequence[Mapping[str, int]]) -> np.ndarray:
    """The bytes of a parameter buffer: one ``dtype`` record per block, :data:`PARAM_STRIDE`
    bytes apart. Each block names every field of ``dtype`` but the ``pad*`` ones."""
    assert dtype.names is not None
    need = {n for n in dtype.names if not n.startswith("pad")}
    records = np.zeros(len(blocks), dtype)
    for i, block in enumerate(blocks):
        if set(block) != need:
            raise ValueError(f"parameter block: expected fields {sorted(need)}, "
                             f"got {sorted(block)}")
        for name, value in block.items():
            records[name][i] = value
    data = np.zeros((len(blocks), PARAM_STRIDE), np.uint8)
    data[:, :dtype.itemsize] = records.view(np.uint8).reshape(len(blocks), dtype.itemsize)
    return data


def scale_bits(input_scale: float | None) -> int:
    """The f32 bit pattern of a static scale (already rounded to TIn, so exact in f32);
    0 without one."""
    if input_scale is None:
        return 0
    return int(np.array(input_scale, np.float32).view(np.uint32))


def quant_rows_per_dispatch(k: int, itemsize: int, options: WgpuOptions, align: int) -> int:
    """Rows of the activation pass per dispatch: one workgroup per row, and each tensor's
    rows in one binding (zero points are 4 bytes a row)."""
    room = binding_room(options, align)
    per_row = max(k * itemsize, round_up(k, 4), itemsize, 4)
    if per_row > room:
        raise Unsupported(
            f"k: a row of {k} elements needs {per_row} bytes in one storage binding, "
            f"the adapter allows {options.max_storage_binding}")
    return max(1, min(options.max_workgroups_per_dim, room // per_row))


def quant_steps(desc: DynamicRangeQuantizeDescriptor, rows_per: int, align: int, x: Placed,
                q: Placed, s: Placed, zp: Placed = None, input_scale: float | None = None,
                input_zero_point: int | None = None) -> tuple[Step, ...]:
    """The activation pass of ``x`` into ``q``, ``s`` (and the zero points ``zp``, with an
    asymmetric scheme), ``rows_per`` rows a dispatch; the static schemes' scale and zero
    point travel in the parameter blocks."""
    k, isz = desc.k, desc.dtype.itemsize
    kp = round_up(k, 4)
    steps = []
    for r0 in range(0, desc.m, rows_per):
        rows = min(rows_per, desc.m - r0)
        xr, xo = span(align, x, r0 * k * isz, (r0 + rows) * k * isz)
        qr, qo = span(align, q, r0 * kp, (r0 + rows) * kp)
        sr, so = span(align, s, r0 * isz, (r0 + rows) * isz)
        zr, zo = span(align, zp, r0 * 4, (r0 + rows) * 4)
        params = dict(k=k, kw=kp // 4, x_base=xo // isz, q_base=qo // 4, s_base=so // isz,
                      zp_base=zo // 4, in_scale=scale_bits(input_scale),
                      in_zp=input_zero_point or 0)
        steps.append(Step(QUANT, params, {"tout": sr, "x": xr, "q": qr, "act_zp": zr},
                          (rows, 1, 1)))
    return tuple(steps)


def gemm_steps(c: LinearChoice, desc: QuantizedLinearDescriptor, options: WgpuOptions,
               align: int, t: Mapping[str, Placed]) -> tuple[Step, ...]:
    """The GEMM of a linear run, in blocks of columns, then rows, that fit one binding each
    and whose grids fit the dispatch limit. ``t`` places the tensors of the bundle by
    field name (``bias``, ``act_zp_scratch``, ``weight_colsum`` may be None)."""
    m, n, k = desc.m, desc.c_out, desc.k
    isz = desc.dtype.itemsize
    kp = round_up(k, 4)
    room = binding_room(options, align)
    max_wg = options.max_workgroups_per_dim
    # Columns per block: its weight rows (and scales, bias) in one binding, its grid in range.
    cols = min(n, max_wg * c.bn, room // max(kp, isz, 4))
    if c.bn <= cols < n:
        cols = cols // c.bn * c.bn
    if cols < 1:
        raise Unsupported(f"weight_q: one row of {kp} bytes exceeds the storage binding "
                          f"limit of {options.max_storage_binding} bytes")
    rows_cap = max_wg * c.bm if c.splits_rows else m
    steps = []
    for c0 in range(0, n, cols):
        nc = min(cols, n - c0)
        # Rows per block: their act_q rows and the y span [r0*n + c0, (r0+nr-1)*n + c0 + nc)
        # each in one binding.
        rows = min(rows_cap, m, room // max(kp, isz, 4), (room // isz - nc) // n + 1)
        if rows < 1:
            raise Unsupported(f"output: one row block exceeds the storage binding limit of "
                              f"{options.max_storage_binding} bytes")
        for r0 in range(0, m, rows):
            nr = min(rows, m - r0)
            ar, ao = span(align, t["act_q_scratch"], r0 * kp, (r0 + nr) * kp)
            wr, wo = span(align, t["weight_q"], c0 * kp, (c0 + nc) * kp)
            sr, so = span(align, t["act_scale_scratch"], r0 * isz, (r0 + nr) * isz)
            wsr, wso = span(align, t["weight_scale"], c0 * isz, (c0 + nc) * isz)
            br, bo = span(align, t.get("bias"), c0 * isz, (c0 + nc) * isz)
            zr, zo = span(align, t.get("act_zp_scratch"), r0 * 4, (r0 + nr) * 4)
            cr, co = span(align, t.get("weight_colsum"), c0 * 4, (c0 + nc) * 4)
            yr, yo = span(align, t["output"], (r0 * n + c0) * isz,
                          ((r0 + nr - 1) * n + c0 + nc) * isz)
            params = dict(m=nr, n=nc, kw=kp // 4, a_base=ao // 4, b_base=wo // 4,
                          s_base=so // isz, ws_base=wso // isz, bias_base=bo // isz,
                          y_base=yo // isz, y_stride=n, zero=0, zp_base=zo // 4,
                          cs_base=co // 4)
            grid = (-(-nc // c.bn), -(-nr // c.bm) if c.splits_rows else 1, 1)
            steps.append(Step(LINEAR, params, {
                "tout": yr, "act": ar, "wt": wr, "act_scale": sr, "wscale": wsr, "bias": br,
                "act_zp": zr, "colsum": cr}, grid))
    return tuple(steps)
