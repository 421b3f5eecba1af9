"""One opened wgpu device as the kernel machinery uses it: the device and its queue,
wgpu's errors turned into :class:`DeviceError`, buffers, the batches each thread has
open on it, and its shader cache.

wgpu's device and queue may be used from any thread; what qlinear keeps beside them is
either per thread (open batches) or locked (the shader cache, each executable's run
cache)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ...errors import DeviceError, InvalidProblem, Unsupported
from .shaders import ShaderCache

if TYPE_CHECKING:
    from .streams import Batch

__all__ = ["WgpuDevice", "round_up"]


def round_up(x: int, a: int) -> int:
    """``x`` rounded up to a multiple of ``a``."""
    return (x + a - 1) // a * a


class WgpuDevice:
    """A ``wgpu.GPUDevice`` with what every user of it shares.

    Attributes:
        wgpu: the wgpu module (its enums and classes).
        device: the ``wgpu.GPUDevice``.
        align: the storage-buffer offset alignment, in bytes.
        dummy: a 16-byte buffer (what :meth:`wait` reads back).
        shaders: the device's shader modules, layouts and pipelines.
    """

    def __init__(self, wgpu_module: Any, device: Any, limits: Mapping[str, Any]):
        self.wgpu = wgpu_module
        self.device = device
        self.align = max(4, int(limits["min-storage-buffer-offset-alignment"]))
        self.dummy = device.create_buffer(size=16, usage=self.storage_usage,
                                          label="qlinear dummy")
        self._dummies: dict[str, Any] = {}
        # Each thread's batches inside their ``with`` block: a thread's read submits its
        # own, never one another thread is still encoding into.
        self._threads = threading.local()
        self.shaders = ShaderCache(self)

    def dummy_for(self, variable: str) -> Any:
        """The 16-byte buffer bound to WGSL ``variable`` where its optional tensor is absent:
        one per variable, because WebGPU forbids one dispatch to bind overlapping ranges of
        a buffer to two writable storage bindings (Dawn enforces it; the kernels declare
        every binding read_write)."""
        buf = self._dummies.get(variable)
        if buf is None:
            buf = self._dummies.setdefault(variable, self.device.create_buffer(
                size=16, usage=self.storage_usage, label=f"qlinear dummy {variable}"))
        return buf

    @property
    def open_batches(self) -> list[Batch]:
        """The calling thread's batches inside their ``with`` block (innermost last)."""
        try:
            return self._threads.batches
        except AttributeError:
            batches: list[Batch] = []
            self._threads.batches = batches
            return batches

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """wgpu's own errors (validation, out of memory, internal, device lost) as DeviceError."""
        try:
            yield
        except (InvalidProblem, Unsupported, DeviceError):
            raise
        except (self.wgpu.GPUError, RuntimeError) as e:
            raise DeviceError(f"wgpu: {what} failed ({type(e).__name__})", native=str(e)) from e

    @property
    def storage_usage(self) -> int:
        """The usage of the buffers qlinear allocates: bindable, readable, writable."""
        u = self.wgpu.BufferUsage
        return int(u.STORAGE | u.COPY_SRC | u.COPY_DST)

    def buffer(self, nbytes: int, label: str) -> Any:
        """A new zero-filled storage buffer of at least ``nbytes`` bytes."""
        # Sizes rounded to 16 so that every 4-byte-rounded binding or read stays inside.
        with self.guard(f"allocating {nbytes} bytes"):
            return self.device.create_buffer(size=max(16, round_up(nbytes, 16)),
                                             usage=self.storage_usage, label=label)

    def flush_batches(self) -> None:
        """Submit what the calling thread's open batches have encoded, so that its later
        reads see it. Other threads' batches are theirs to submit."""
        for b in list(self.open_batches):
            b.submit()

    def wait(self) -> None:
        """Wait until all submitted work has finished."""
        # queue.on_submitted_work_done_sync does not return in wgpu 0.32; reading back
        # four bytes maps a buffer after everything submitted before it.
        with self.guard("waiting for the queue"):
            self.device.queue.read_buffer(self.dummy, 0, 4)

    def write_timestamp(self, encoder: Any, query_set: Any, index: int) -> None:
        """Record a GPU timestamp into ``query_set[index]`` at this point of ``encoder``."""
        from wgpu.backends.wgpu_native.extras import write_timestamp

        write_timestamp(encoder, query_set, index)

    @property
    def timestamp_period_ns(self) -> float:
        """Nanoseconds per timestamp tick (1.0 where wgpu does not say)."""
        try:
            from wgpu.backends.wgpu_native._ffi import lib

            period = float(lib.wgpuQueueGetTimestampPeriod(self.device.queue._internal))
            return period if period > 0 else 1.0
        except Exception:  # a private entry point: absent in other wgpu versions
            return 1.0
