"""Running planned dispatches on a wgpu device: the :class:`~.steps.Step` s of
:mod:`.steps` turned into parameter buffers and bind groups of real buffers
(:func:`realize`), and the cache of them per set of tensors (:class:`RunCache`).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...tensors import Tensor
from .device import WgpuDevice
from .layouts import PARAMS_BINDING, Layout
from .steps import PARAM_STRIDE, Span, Step, pack_params, span

__all__ = ["Dispatches", "RunCache", "bind_range", "pack_params", "params_buffer", "bind_group",
           "realize", "PARAM_STRIDE"]

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


def bind_range(gpu: WgpuDevice, t: Tensor | None, b0: int, b1: int) -> tuple[Resource, int]:
    """Bind bytes [b0, b1) of tensor ``t``: (resource, byte offset of b0 inside it). An
    absent tensor or an empty range binds the device's dummy buffer."""
    placed = None if t is None else ("t", int(t.buffer_offset or 0))
    sp, inner = span(gpu.align, placed, b0, b1)
    return _resource(gpu, "", sp, {"t": t}), inner


def _resource(gpu: WgpuDevice, variable: str, sp: Span,
              tensors: Mapping[str, Tensor | None]) -> Resource:
    if sp.tensor is None:
        return {"buffer": gpu.dummy_for(variable), "offset": 0, "size": 16}
    t = tensors[sp.tensor]
    assert t is not None
    return {"buffer": t.handle, "offset": sp.offset, "size": sp.size}


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


def realize(gpu: WgpuDevice, pipeline: Any, steps: Sequence[Step],
            tensors: Mapping[str, Tensor | None]) -> Dispatches:
    """``steps`` (all of one layout) with ``pipeline`` on this device: one parameter buffer
    holding every step's block, one bind group per step binding ``tensors`` by name."""
    layout = steps[0].layout
    assert layout.params is not None and all(s.layout is layout for s in steps)
    params = params_buffer(gpu, layout.params, [s.params for s in steps])
    return Dispatches(tuple(
        (pipeline, bind_group(gpu, layout, {v: _resource(gpu, v, sp, tensors)
                                            for v, sp in s.spans.items()}, params, i), s.grid)
        for i, s in enumerate(steps)))
