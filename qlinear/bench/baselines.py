"""The floating-point matmul of a benchmark's shape on the same device: what ``qlinear
bench`` divides by ("x float mm"), one implementation per backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..backends import Backend
from ..dtypes import DType, f64

__all__ = ["float_matmul", "float_matmul_detail"]

Runner = Callable[[], Any]


def _numpy_matmul(be: Backend, m: int, k: int, n: int, dtype: DType) -> Runner | None:
    # numpy has no f16/bf16 BLAS: they are run in float32, as numpy users would.
    ct = np.float64 if dtype == f64 else np.float32
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(ct)
    b = rng.standard_normal((k, n)).astype(ct)
    return lambda: np.matmul(a, b)


def _wgsl_matmul(be: Backend, m: int, k: int, n: int, dtype: DType) -> Runner | None:
    from .wgpu_kernels import float_matmul as wgsl

    return wgsl(be, m, k, n, dtype)  # type: ignore[arg-type]


# Backend name -> the baseline on its device, and what it is in words (the table's footer
# names it, since "x float mm" means a different matmul on each backend). cuda has none
# of its own: torch's matmul on the GPU is its baseline, as a peer.
_DETAILS = {
    "cpu": "numpy's float32 matmul (numpy.matmul; f16 and bf16 run in float32, f64 in float64)",
    "wgpu": "qlinear's own WGSL f32 tiled matmul on the same adapter (f32 for every dtype; "
            "untuned)",
}
_BASELINES: dict[str, Callable[[Backend, int, int, int, DType], Runner | None]] = {
    "cpu": _numpy_matmul,
    "wgpu": _wgsl_matmul,
}


def float_matmul(be: Backend, m: int, k: int, n: int, dtype: DType) -> Runner | None:
    """A callable that runs a floating-point ``[m, k] @ [k, n]`` matmul of ``dtype`` on
    ``be``'s device on random data made once, and waits for it; None where the backend
    has no such baseline or the shape exceeds its limits."""
    make = _BASELINES.get(be.name)
    return None if make is None else make(be, m, k, n, dtype)


def float_matmul_detail(be: Backend) -> str:
    """What :func:`float_matmul` runs on ``be``, in words; "" where it has no baseline."""
    return _DETAILS.get(be.name, "")
