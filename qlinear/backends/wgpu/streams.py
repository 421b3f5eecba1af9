"""Where a run's dispatches go: submitted at once (``stream=None``), into a
:class:`Batch` (many runs, one submit, optionally timed on the GPU), or into a
``wgpu.GPUCommandEncoder`` that the caller finishes and submits.

A batch belongs to the thread whose ``with`` block opened it: only that thread encodes
into it or submits it, and only that thread's reads submit it early."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import InvalidProblem, Unsupported
from .dispatch import Dispatches

if TYPE_CHECKING:
    from .backend import WgpuBackend

__all__ = ["Batch", "check_stream", "encode"]


class Batch:
    """Many plan runs, one submit.

    ``with be.batch() as b:`` then ``plan.run(args, stream=b)`` any number of times:
    the runs are encoded into one command encoder and submitted together when the
    block ends (nothing is submitted if it ends with an exception). ``b.submit()``
    submits what is encoded so far and keeps the batch open. ``be.to_numpy`` and
    ``be.synchronize`` submit the calling thread's open batches first, so their results
    are visible. A batch is used by the thread that entered its block: another thread
    gets :class:`InvalidProblem` (each thread opens its own).

    With ``be.batch(timestamps=True)`` (adapters with timestamp queries inside
    encoders) the GPU time of each submitted span is recorded: ``b.gpu_seconds()``."""

    def __init__(self, backend: WgpuBackend, timestamps: bool = False):
        if timestamps and not backend.has_timestamps:
            raise Unsupported("timestamps: this adapter has no timestamp queries inside "
                              "command encoders (features timestamp-query and "
                              "timestamp-query-inside-encoders)")
        self.backend = backend
        self.timestamps = bool(timestamps)
        self._gpu = backend.gpu
        self._encoder: Any = None
        self._query: Any = None
        self._spans: list[Any] = []
        self._open = False
        self._thread: int | None = None  # the thread inside the ``with`` block
        #: Plan runs encoded since the last submit.
        self.pending = 0
        #: Plan runs submitted by this batch.
        self.submitted = 0

    def check_usable(self) -> None:
        """Raise :class:`InvalidProblem` unless runs can be encoded into this batch now:
        inside its ``with`` block, on the thread of that block."""
        if not self._open:
            raise InvalidProblem("stream: expected an open batch (inside its 'with' block), "
                                 "got one that has ended")
        self._check_thread()

    def encoder(self) -> Any:
        """The ``wgpu.GPUCommandEncoder`` runs are encoded into (created on first use)."""
        self.check_usable()
        if self._encoder is None:
            gpu = self._gpu
            with gpu.guard("creating a command encoder"):
                self._encoder = gpu.device.create_command_encoder(label="qlinear batch")
                if self.timestamps:
                    self._query = gpu.device.create_query_set(type="timestamp", count=2)
                    gpu.write_timestamp(self._encoder, self._query, 0)
        return self._encoder

    def submit(self) -> None:
        """Submit what has been encoded so far (one queue submit); the batch stays open."""
        if self._encoder is None:
            return
        self._check_thread()
        enc, self._encoder = self._encoder, None
        gpu = self._gpu
        with gpu.guard("submitting a batch"):
            if self.timestamps:
                u = gpu.wgpu.BufferUsage
                out = gpu.device.create_buffer(size=16, usage=u.QUERY_RESOLVE | u.COPY_SRC)
                gpu.write_timestamp(enc, self._query, 1)
                enc.resolve_query_set(self._query, 0, 2, out, 0)
                self._spans.append(out)
            gpu.device.queue.submit([enc.finish()])
        self.submitted += self.pending
        self.pending = 0

    def _check_thread(self) -> None:
        if self._thread != threading.get_ident():
            raise InvalidProblem(
                "stream: expected a batch opened by this thread, got one opened by another "
                "thread (a batch is encoded and submitted by the thread of its 'with' block)")

    def gpu_seconds(self) -> float:
        """GPU time of the spans submitted so far (``timestamps=True``); waits for them."""
        if not self.timestamps:
            raise InvalidProblem("gpu_seconds: expected a batch made with timestamps=True")
        gpu = self._gpu
        total = 0
        for buf in self._spans:
            with gpu.guard("reading timestamps"):
                t0, t1 = np.frombuffer(gpu.device.queue.read_buffer(buf), np.uint64)[:2]
            total += int(t1) - int(t0)
        return total * gpu.timestamp_period_ns * 1e-9

    def __enter__(self) -> Batch:
        if self._open:
            raise InvalidProblem("batch: expected a batch not yet entered, got one already "
                                 "inside its 'with' block")
        self._open = True
        self._thread = threading.get_ident()
        self._gpu.open_batches.append(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                self.submit()
            else:
                self._encoder = None
        finally:
            self._open = False
            self._thread = None
            self._gpu.open_batches.remove(self)

    def __repr__(self) -> str:
        return f"<qlinear wgpu Batch pending={self.pending} submitted={self.submitted}>"


def check_stream(backend: WgpuBackend, stream: Any) -> None:
    """Raise :class:`InvalidProblem` unless ``stream`` is something runs of ``backend`` can
    be encoded into now: None, an open :class:`Batch` of ``backend`` on this thread, or a
    ``wgpu.GPUCommandEncoder``."""
    if stream is None or isinstance(stream, backend.gpu.wgpu.GPUCommandEncoder):
        return
    if not isinstance(stream, Batch):
        raise InvalidProblem(
            "stream: expected None, a batch from be.batch() or a wgpu.GPUCommandEncoder, "
            f"got {type(stream).__name__}")
    if stream.backend is not backend:
        raise InvalidProblem("stream: expected a batch of this backend, got one of another")
    stream.check_usable()


def encode(backend: WgpuBackend, stream: Any, label: str, dispatches: Dispatches) -> None:
    """Encode ``dispatches`` in one compute pass labelled ``label`` into ``stream``: None
    (a new encoder, submitted at once), a :class:`Batch` of ``backend``, or a
    ``wgpu.GPUCommandEncoder``."""
    gpu = backend.gpu

    def record(enc: Any) -> None:
        with gpu.guard("encoding a compute pass"):
            cp = enc.begin_compute_pass(label=label)
            for pipeline, group, grid in dispatches.items:
                cp.set_pipeline(pipeline)
                cp.set_bind_group(0, group)
                cp.dispatch_workgroups(*grid)
            cp.end()

    check_stream(backend, stream)
    if stream is None:
        enc = gpu.device.create_command_encoder(label="qlinear run")
        record(enc)
        with gpu.guard("submitting a run"):
            gpu.device.queue.submit([enc.finish()])
    elif isinstance(stream, Batch):
        record(stream.encoder())
        stream.pending += 1
    else:
        record(stream)
