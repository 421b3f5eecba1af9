"""The interface every backend fills in: tensors, kernels, device facts.

A backend is one file in ``qlinear/backends/`` that defines a :class:`Backend`
subclass and a ``create()`` function; its kernels live in ``shaders/`` or ``cuda/``.
Validation, plans and the layer are shared and call only what is declared here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ..dtypes import DType
from ..tensors import Tensor, contiguous_strides

__all__ = ["Backend", "Kernel", "PrecisionGuarantee"]


@dataclass(frozen=True)
class PrecisionGuarantee:
    """What a kernel promises about its numbers.

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


class Kernel(ABC):
    """A compiled, ready-to-run implementation of one descriptor on one backend."""

    #: Names the kernel(s) chosen, e.g. ``"cpu.blas_f32_chunk1024"``.
    sku: str = ""
    #: A :class:`PrecisionGuarantee`.
    precision_guarantee: PrecisionGuarantee = PrecisionGuarantee()

    @abstractmethod
    def run(self, tensors: dict, stream: Any = None) -> None:
        """Run on already-validated tensors (a dict by argument name). Must not raise
        for valid arguments except for device failures (:class:`DeviceError`)."""


class Backend(ABC):
    """One way of running qlinear: its tensors, its kernels and its device."""

    #: Registry name: ``"cpu"``, ``"wgpu"`` or ``"cuda"``.
    name: str = ""
    #: The device tensors must live on, e.g. ``"cpu"``, ``"wgpu:0"``, ``"cuda:0"``.
    device_id: str = ""
    #: Whether this backend runs on a GPU (a CPU adapter such as lavapipe is not one).
    is_gpu: bool = False

    @property
    def device_name(self) -> str:
        """A human description of the device."""
        return self.device_id

    # -- tensors -------------------------------------------------------------------
    @abstractmethod
    def empty(self, shape, dtype: DType) -> Tensor:
        """A new tensor of ``shape`` and ``dtype`` with unspecified contents."""

    @abstractmethod
    def from_numpy(self, array: np.ndarray, *, readonly: bool = False) -> Tensor:
        """A new tensor holding a copy of ``array``. ``readonly=True`` promises that
        nobody writes it later, so the backend may keep data derived from it."""

    @abstractmethod
    def to_numpy(self, tensor: Tensor) -> np.ndarray:
        """A host copy of ``tensor`` (waits for the work that writes it)."""

    @abstractmethod
    def wrap(self, obj: Any, *, name: str = "tensor") -> Tensor:
        """Return ``obj`` as a :class:`Tensor` of this backend without copying;
        raise :class:`InvalidProblem` naming ``name`` if it cannot be used here."""

    def expected_strides(self, shape, dtype: DType) -> tuple:
        """The strides (elements) a tensor of ``shape`` must have to be used by a plan."""
        return contiguous_strides(shape)

    @abstractmethod
    def narrow(self, tensor: Tensor, rows: int) -> Tensor:
        """A view of the first ``rows`` rows of a backend-allocated ``tensor``."""

    def synchronize(self, stream: Any = None) -> None:
        """Wait until the work submitted so far (on ``stream``) has finished."""

    # -- kernels -------------------------------------------------------------------
    @abstractmethod
    def linear_kernel(self, desc) -> Kernel:
        """The kernel for a :class:`QuantizedLinearDescriptor` (raise :class:`Unsupported`)."""

    @abstractmethod
    def quantize_kernel(self, desc) -> Kernel:
        """The kernel for a :class:`DynamicRangeQuantizeDescriptor`."""

    # -- facts and peers -------------------------------------------------------------
    def info(self) -> dict:
        """Device, limits and kernel choices, for ``qlinear info``."""
        return {"device": self.device_name}

    def float_matmul(self, m: int, k: int, n: int, dtype: DType) -> Optional[Callable[[], None]]:
        """For benchmarks: a callable that runs a floating-point ``[m,k] @ [k,n]`` matmul
        of ``dtype`` on this device on fresh random data and waits for it, or None."""
        return None

    def __repr__(self) -> str:
        return f"<qlinear backend {self.name!r} on {self.device_name}>"
