"""The shapes ``qlinear bench`` runs: (K, N) of real models at decode and prefill M."""

from __future__ import annotations

from ..backends import Backend
from ..dtypes import DType, DTypeLike, as_dtype

__all__ = ["BenchCase", "default_cases", "LLM_SHAPES", "LLM_M", "SMALL_SHAPES", "SMALL_M"]

#: (K, N) of real models, and M for decode and prefill.
LLM_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]
LLM_M = [1, 16, 512, 4096]
#: What a 2-core machine finishes in well under a minute.
SMALL_SHAPES = [(384, 1536), (4096, 4096)]
SMALL_M = [1, 16, 512]


class BenchCase(tuple):
    """``(m, k, n, dtype)`` of one benchmark row."""

    __slots__ = ()

    def __new__(cls, m: int, k: int, n: int, dtype: DTypeLike) -> BenchCase:
        return super().__new__(cls, (int(m), int(k), int(n), as_dtype(dtype)))


def default_cases(be: Backend, dtype: DType | None = None) -> list[BenchCase]:
    """The shapes ``qlinear bench`` runs with no arguments on ``be``: the LLM shapes in
    f16 on a GPU, the small set in f32 elsewhere."""
    if be.is_gpu:
        dt = dtype or as_dtype("f16")
        return [BenchCase(m, k, n, dt) for k, n in LLM_SHAPES for m in LLM_M]
    dt = dtype or as_dtype("f32")
    return [BenchCase(m, k, n, dt) for k, n in SMALL_SHAPES for m in SMALL_M]
