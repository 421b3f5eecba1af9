"""Dispatch planning: how a run is cut into dispatches that fit the adapter's limits,
which byte range of each tensor every dispatch binds, and the parameter block that
tells the kernel where its block starts in each binding.

A problem larger than one storage binding (or one dispatch dimension) runs block by
block; each block binds a sub-range of each tensor, aligned down to the adapter's
offset alignment, and its ``*_base`` parameters locate the block's first element in it.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import Unsupported
from ...tensors import Tensor
from .device import WgpuDevice, round_up
from .layouts import LINEAR, PARAMS_BINDING, QUANT, Layout
from .options import WgpuOptions

if TYPE_CHECKING:
    from ...problem import DynamicRangeQuantizeDescriptor, LinearTensors, QuantizedLinearDescriptor
    from .choose import LinearChoice

__all__ = ["Dispatches", "RunCache", "binding_room", "bind_range", "pack_params", "params_buffer",
           "bind_group", "quant_rows_per_dispatch", "quant_dispatches", "gemm_dispatches",
           "scale_bits", "PARAM_STRIDE"]

# Stride of the per-dispatch parameter blocks in one uniform buffer: the largest
# min-uniform-buffer-offset-alignment WebGPU allows.
PARAM_STRIDE = 256
# Sets of tensors whose bind groups an executable keeps.
_RUN_CACHE = 16

#: A (resource, offset of the wanted bytes inside it) pair, as :func:`bind_range` gives.
Resource = dict[str, Any]


@dataclass(frozen=True)
class Dispatches:
    """Everything one run encodes: (pipeline, bind group, grid) in order."""

    items: tuple[tuple[Any, Any, tuple[int, int, int]], ...]

    def __add__(self, other: Dispatches) -> Dispatches:
        return Dispatches(self.items + other.items)


class RunCache:
    """Bind groups and parameters per set of tensors, keyed by buffer ids and offsets and
    by the host scalars the parameter blocks hold (a static scheme's scale and zero point).

    It holds no Python reference to the buffers: the entries of a buffer are dropped
    when it is collected (so an id is never reused while cached, and the bind groups,
    which keep the native buffer alive, go with it). One finalizer per buffer.

    Safe to share between threads (plans are): every lookup takes one lock. A buffer's
    finalizer, which the garbage collector may run on any thread, even inside a lookup,
    only notes the buffer's id; the next lookup drops its entries before anything else,
    so before its id can be looked up again."""

    def __init__(self) -> None:
        self.entries: OrderedDict[Hashable, Dispatches] = OrderedDict()
        self._watched: dict[int, set] = {}  # id(buffer) -> keys of the entries that bind it
        self._collected: deque[int] = deque()  # ids of collected buffers, not yet dropped
        self._lock = threading.Lock()

    def lookup(self, buffers: Sequence[Any], binds: tuple[tuple[int, Any], ...],
               build: Callable[[], Dispatches], scalars: Hashable = None) -> Dispatches:
        """The entry of ``binds`` (pairs of buffer id and offset) and ``scalars`` (the
        run's host values that its parameter blocks hold), made by ``build()`` on first
        use; ``buffers`` are the buffers it binds, whose collection drops it."""
        key = (binds, scalars)
        with self._lock:
            while self._collected:
                self._forget(self._collected.popleft())
            d = self.entries.get(key)
            if d is not None:
                self.entries.move_to_end(key)
                return d
            d = self.entries[key] = build()
            for buf in buffers:
                keys = self._watched.get(id(buf))
                if keys is None:
                    keys = self._watched[id(buf)] = set()
                    weakref.finalize(buf, _collected, weakref.ref(self), id(buf))
                keys.add(key)
            while len(self.entries) > _RUN_CACHE:
                self._drop(next(iter(self.entries)))
            return d

    def _drop(self, key: Any) -> None:
        self.entries.pop(key, None)
        for bid, _ in key[0]:
            keys = self._watched.get(bid)
            if keys is not None:
                keys.discard(key)

    def _forget(self, bid: int) -> None:
        for key in list(self._watched.pop(bid, ())):
            self._drop(key)

    def forget(self, bid: int) -> None:
        """Drop the entries that bind the buffer whose id was ``bid``."""
        with self._lock:
            self._forget(bid)

    def __len__(self) -> int:
        with self._lock:
            while self._collected:
                self._forget(self._collected.popleft())
            return len(self.entries)


def _collected(ref: weakref.ref, bid: int) -> None:
    # A deque append is atomic: no lock here, so a collection inside a lookup cannot deadlock.
    cache = ref()
    if cache is not None:
        cache._collected.append(bid)


def binding_room(gpu: WgpuDevice, options: WgpuOptions) -> int:
    """Bytes a block may span so that, aligned down and rounded up, it fits one binding."""
    return options.max_storage_binding - gpu.align - 4


def bind_range(gpu: WgpuDevice, t: Tensor | None, b0: int, b1: int) -> tuple[Resource, int]:
    """Bind bytes [b0, b1) of tensor ``t``: (resource, byte offset of b0 inside it). An
    absent tensor or an empty range binds the device's dummy buffer."""
    if t is None or b1 <= b0:
        return {"buffer": gpu.dummy, "offset": 0, "size": 16}, 0
    base = int(t.buffer_offset or 0)
    start = base + b0
    off = start - start % gpu.align
    size = round_up(base + b1 - off, 4)
    return {"buffer": t.handle, "offset": off, "size": size}, start - off


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


def params_buffer(gpu: WgpuDevice, dtype: np.dtype, blocks: Sequence[Mapping[str, int]]) -> Any:
    """A uniform buffer holding :func:`pack_params` of ``blocks``."""
    data = pack_params(dtype, blocks)
    u = gpu.wgpu.BufferUsage
    with gpu.guard("writing kernel parameters"):
        buf = gpu.device.create_buffer(size=data.nbytes, usage=u.UNIFORM | u.COPY_DST)
        gpu.device.queue.write_buffer(buf, 0, data)
    return buf


def bind_group(gpu: WgpuDevice, layout: Layout, resources: Mapping[str, Resource],
               params: Any = None, index: int = 0) -> Any:
    """A bind group of ``layout``: ``resources`` by WGSL variable name, and where the layout
    has a parameter block, block ``index`` of ``params`` (from :func:`params_buffer`)."""
    bgl, _ = gpu.shaders.layout(layout)
    entries: list[dict[str, Any]] = [
        {"binding": b, "resource": r}
        for b, r in sorted((layout.storage[name], r) for name, r in resources.items())]
    if layout.params is not None:
        entries.append({"binding": PARAMS_BINDING,
                        "resource": {"buffer": params, "offset": index * PARAM_STRIDE,
                                     "size": layout.params.itemsize}})
    with gpu.guard("creating a bind group"):
        return gpu.device.create_bind_group(layout=bgl, entries=entries)


def _bound(gpu: WgpuDevice, layout: Layout, pipeline: Any, blocks: list[dict[str, int]],
           binds: list[tuple[dict[str, Resource], tuple[int, int, int]]]) -> Dispatches:
    assert layout.params is not None
    params = params_buffer(gpu, layout.params, blocks)
    return Dispatches(tuple((pipeline, bind_group(gpu, layout, res, params, i), grid)
                            for i, (res, grid) in enumerate(binds)))


def quant_rows_per_dispatch(gpu: WgpuDevice, k: int, itemsize: int,
                            options: WgpuOptions) -> int:
    """Rows of the activation pass per dispatch: one workgroup per row, and each tensor's
    rows in one binding (zero points are 4 bytes a row)."""
    room = binding_room(gpu, options)
    per_row = max(k * itemsize, round_up(k, 4), itemsize, 4)
    if per_row > room:
        raise Unsupported(
            f"k: a row of {k} elements needs {per_row} bytes in one storage binding, "
            f"the adapter allows {options.max_storage_binding}")
    return max(1, min(options.max_workgroups_per_dim, room // per_row))


def scale_bits(input_scale: float | None) -> int:
    """The f32 bit pattern of a static scale (already rounded to TIn, so exact in f32);
    0 without one."""
    if input_scale is None:
        return 0
    return int(np.array(input_scale, np.float32).view(np.uint32))


def quant_dispatches(gpu: WgpuDevice, pipeline: Any, desc: DynamicRangeQuantizeDescriptor,
                     rows_per: int, x: Tensor, q: Tensor, s: Tensor, zp: Tensor | None = None,
                     input_scale: float | None = None,
                     input_zero_point: int | None = None) -> Dispatches:
    """The activation pass of ``x`` into ``q``, ``s`` (and the zero points ``zp``, with an
    asymmetric scheme), ``rows_per`` rows a dispatch; the static schemes' scale and zero
    point travel in the parameter blocks."""
    k, isz = desc.k, desc.dtype.itemsize
    kp = round_up(k, 4)
    blocks, binds = [], []
    for r0 in range(0, desc.m, rows_per):
        rows = min(rows_per, desc.m - r0)
        xr, xo = bind_range(gpu, x, r0 * k * isz, (r0 + rows) * k * isz)
        qr, qo = bind_range(gpu, q, r0 * kp, (r0 + rows) * kp)
        sr, so = bind_range(gpu, s, r0 * isz, (r0 + rows) * isz)
        zr, zo = bind_range(gpu, zp, r0 * 4, (r0 + rows) * 4)
        blocks.append(dict(k=k, kw=kp // 4, x_base=xo // isz, q_base=qo // 4, s_base=so // isz,
                           zp_base=zo // 4, in_scale=scale_bits(input_scale),
                           in_zp=input_zero_point or 0))
        binds.append(({"tout": sr, "x": xr, "q": qr, "act_zp": zr}, (rows, 1, 1)))
    return _bound(gpu, QUANT, pipeline, blocks, binds)


def gemm_dispatches(gpu: WgpuDevice, pipeline: Any, c: LinearChoice,
                    desc: QuantizedLinearDescriptor, t: LinearTensors,
                    options: WgpuOptions) -> Dispatches:
    """The GEMM of a linear run, in blocks of columns, then rows, that fit one binding each
    and whose grids fit the dispatch limit."""
    m, n, k = desc.m, desc.c_out, desc.k
    isz = desc.dtype.itemsize
    kp = round_up(k, 4)
    room = binding_room(gpu, options)
    max_wg = options.max_workgroups_per_dim
    # Columns per block: its weight rows (and scales, bias) in one binding, its grid in range.
    cols = min(n, max_wg * c.bn, room // max(kp, isz, 4))
    if c.bn <= cols < n:
        cols = cols // c.bn * c.bn
    if cols < 1:
        raise Unsupported(f"weight_q: one row of {kp} bytes exceeds the storage binding "
                          f"limit of {options.max_storage_binding} bytes")
    rows_cap = max_wg * c.bm if c.splits_rows else m
    blocks, binds = [], []
    y, a, w = t.output, t.act_q_scratch, t.weight_q
    s, ws, bias = t.act_scale_scratch, t.weight_scale, t.bias
    zp, cs = t.act_zp_scratch, t.weight_colsum
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
            ar, ao = bind_range(gpu, a, r0 * kp, (r0 + nr) * kp)
            wr, wo = bind_range(gpu, w, c0 * kp, (c0 + nc) * kp)
            sr, so = bind_range(gpu, s, r0 * isz, (r0 + nr) * isz)
            wsr, wso = bind_range(gpu, ws, c0 * isz, (c0 + nc) * isz)
            br, bo = bind_range(gpu, bias, c0 * isz, (c0 + nc) * isz)
            zr, zo = bind_range(gpu, zp, r0 * 4, (r0 + nr) * 4)
            cr, co = bind_range(gpu, cs, c0 * 4, (c0 + nc) * 4)
            yr, yo = bind_range(gpu, y, (r0 * n + c0) * isz, ((r0 + nr - 1) * n + c0 + nc) * isz)
            blocks.append(dict(m=nr, n=nc, kw=kp // 4, a_base=ao // 4, b_base=wo // 4,
                               s_base=so // isz, ws_base=wso // isz, bias_base=bo // isz,
                               y_base=yo // isz, y_stride=n, zero=0, zp_base=zo // 4,
                               cs_base=co // 4))
            grid = (-(-nc // c.bn), -(-nr // c.bm) if c.splits_rows else 1, 1)
            binds.append(({"tout": yr, "act": ar, "wt": wr, "act_scale": sr, "wscale": wsr,
                           "bias": br, "act_zp": zr, "colsum": cr}, grid))
    return _bound(gpu, LINEAR, pipeline, blocks, binds)
