"""The interface every backend fills in: tensors, executables, device facts.

A backend is a module (``cpu.py``) or a package (``wgpu/``, ``cuda/``) in
``qlinear/backends/`` whose top level defines a :class:`Backend` subclass and a
``create()`` function; its kernel sources live in ``shaders/`` or ``cuda/``.
Validation, plans and the layer are shared and call only what is declared here.

Words: an *executable* is what a plan runs (one or more device kernels and their
launch glue, chosen and prepared for one descriptor); a *kernel* is one compiled
device function (a WGSL entry point, a CUDA ``__global__`` function).

What a caller hands a backend's tensor methods is checked by the shared functions of
:mod:`qlinear.validate` (``check_new_tensor``, ``host_array``, ``check_rows``), so a
mistake gets the same :class:`InvalidProblem` on every backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import DType, DTypeLike
from ..tensors import Tensor, contiguous_strides
from ..validate import check_rows

if TYPE_CHECKING:
    from ..problem import DynamicRangeQuantizeDescriptor, QuantizedLinearDescriptor

__all__ = ["Backend", "Executable", "PrecisionGuarantee"]


@dataclass(frozen=True)
class PrecisionGuarantee:
    """What an executable promises about its numbers.

    Attributes:
        bit_identical: outputs and scratches equal the reference (cpu) bit for bit on normal inputs.
        deterministic: the same inputs give the same bits on every run.
        flushes_subnormals: subnormal inputs may be read as zero.
        exact_int32: the integer accumulation is exact (always true in qlinear).
        note: anything else worth knowing, in words.
    """

    bit_identical: bool = True
    deterministic: bool = True
    flushes_subnormals: bool = False
    exact_int32: bool = True
    note: str = ""


class Executable(ABC):
    """What a plan runs: the kernels chosen for one descriptor on one backend, compiled
    and ready, with their launch glue."""

    #: Names the kernel(s) chosen, e.g. ``"cpu.blas_f32_chunk1024"``.
    sku: str = ""
    #: A :class:`PrecisionGuarantee`.
    precision_guarantee: PrecisionGuarantee = PrecisionGuarantee()

    @abstractmethod
    def run(self, tensors: Any, stream: Any = None) -> None:
        """Run on already-validated tensors (a :class:`LinearTensors` or
        :class:`QuantizeTensors` bundle). Must not raise for valid arguments except for
        device failures (:class:`DeviceError`) and a stream this backend cannot use."""


class Backend(ABC):
    """One way of running qlinear: its tensors, its kernels and its device."""

    #: Registry name: ``"cpu"``, ``"wgpu"`` or ``"cuda"``.
    name: str = ""
    #: The device tensors must live on, e.g. ``"cpu"``, ``"wgpu:0"``, ``"cuda:0"``.
    device_id: str = ""
    #: Whether this backend runs on a GPU (a CPU adapter such as lavapipe is not one).
    is_gpu: bool = False
    #: Whether tensors live in host memory as numpy arrays (plans take numpy arrays as
    #: they are; the layer runs numpy inputs without an upload).
    host_memory: bool = False
    #: The torch device type whose tensors this backend uses without a copy
    #: (``"cpu"``, ``"cuda"``), or None.
    torch_device_type: str | None = None
    #: The :class:`~qlinear.ActivationScheme` values this backend's executables run; plans
    #: refuse the others with :class:`Unsupported` when they are selected.
    activation_schemes: frozenset[str] = frozenset({"dynamic"})

    @property
    def device_name(self) -> str:
        """A human description of the device."""
        return self.device_id

    # -- tensors -------------------------------------------------------------------
    @abstractmethod
    def empty(self, shape: Sequence[int], dtype: DTypeLike) -> Tensor:
        """A new tensor of ``shape`` and ``dtype`` with unspecified contents. ``shape`` and
        ``dtype`` go through :func:`qlinear.validate.check_new_tensor` first (a sequence of
        non-negative integers, numpy ints accepted; a qlinear dtype)."""

    @abstractmethod
    def from_numpy(self, array: np.ndarray, *, readonly: bool = False) -> Tensor:
        """A new tensor holding a copy of ``array`` (read through
        :func:`qlinear.validate.host_array`: ndarray subclasses such as masked arrays are
        refused). ``readonly=True`` promises that nobody writes it later, so the backend
        may keep data derived from it."""

    @abstractmethod
    def to_numpy(self, tensor: Any) -> np.ndarray:
        """A host copy of ``tensor`` (waits for the work that writes it)."""

    @abstractmethod
    def wrap(self, obj: Any, *, name: str = "tensor") -> Tensor:
        """Return ``obj`` as a :class:`Tensor` of this backend without copying;
        raise :class:`InvalidProblem` naming ``name`` if it cannot be used here."""

    def expected_strides(self, shape: Sequence[int], dtype: DType) -> tuple[int, ...]:
        """The strides (elements) a tensor of ``shape`` must have to be used by a plan."""
        return contiguous_strides(tuple(shape))

    def narrow(self, tensor: Any, rows: int) -> Tensor:
        """A view of the first ``rows`` rows of ``tensor`` (same memory, same strides).
        ``rows``: an integer in ``0..tensor.shape[0]`` (:func:`qlinear.validate.check_rows`)."""
        t = self.wrap(tensor)
        return t.view((check_rows(t, rows),) + t.shape[1:])

    def synchronize(self, stream: Any = None) -> None:  # noqa: B027 (cpu has nothing to wait for)
        """Wait until the work submitted so far (on ``stream``) has finished."""

    def check_stream(self, stream: Any) -> None:  # noqa: B027 (the executables check their own)
        """Raise :class:`InvalidProblem` (``"stream: expected <what>, got <type name>"``)
        if ``stream`` is nothing this backend's runs can use. Plans call it on every run,
        empty problems included, before anything is written. By default the executables
        check the stream when they use it; a backend that can say sooner overrides this."""

    # -- executables ---------------------------------------------------------------
    @abstractmethod
    def linear_executable(self, desc: QuantizedLinearDescriptor) -> Executable:
        """The executable for a :class:`QuantizedLinearDescriptor`, compiled and ready
        (raise :class:`Unsupported` when this backend cannot run it)."""

    @abstractmethod
    def quantize_executable(self, desc: DynamicRangeQuantizeDescriptor) -> Executable:
        """The executable for a :class:`DynamicRangeQuantizeDescriptor`."""

    # -- facts -----------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Device, limits and kernel choices, for ``qlinear info``."""
        return {"device": self.device_name}

    def __repr__(self) -> str:
        return f"<qlinear backend {self.name!r} on {self.device_name}>"
