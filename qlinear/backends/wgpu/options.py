"""How plans are made on one wgpu device: kernel choices and the limits they respect.

:class:`WgpuOptions` is what ``be.configured(...)`` changes for the plans selected
inside its block, and what an executable keeps: it is immutable, so a plan's options
cannot change under it. Every value is checked here, once, whoever builds or replaces it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import InvalidProblem, Unsupported

__all__ = ["WgpuOptions"]

# The fields that take one of a few values, and those values; the others are limits.
_CHOICES: dict[str, tuple[Any, ...]] = {
    "inner_product": (None, "dot4", "fma"),
    "f16_storage": (None, "native", "packed"),
    "quantize_exact_only": (False, True),
    "tile": (None, "4x4", "8x8"),
    "subgroups": (None, True, False),
}


@dataclass(frozen=True, kw_only=True)
class WgpuOptions:
    """Kernel choices and limits.

    Attributes:
        inner_product: "dot4" (dot4I8Packed) or "fma" (exact f32 multiply-adds); None =
            per adapter: dot4 unless the adapter's API is Metal or GL, where naga emulates it.
        f16_storage: "native" or "packed"; None = native where the adapter has ``shader-f16``.
        quantize_exact_only: every activation element takes the integer division that
            otherwise only settles quotients near a rounding edge.
        tile: "4x4" or "8x8" register tiles of the dot4 GEMM; None = 8 x 8 for M > 64.
        subgroups: True: the reductions across invocations (the activation pass's row
            maximum, the small-M GEMM's K sum) use subgroup operations, which the adapter
            must have; False: workgroup memory only; None = subgroups where the adapter has
            them. Either way the results are the same, bit for bit.
        max_storage_binding, max_workgroups_per_dim, max_workgroup_storage: the limits
            plans respect (bytes / counts); lowering them exercises the sub-range binding,
            dispatch splitting and tile fallback that big problems need.
    """

    inner_product: str | None = None
    f16_storage: str | None = None
    quantize_exact_only: bool = False
    tile: str | None = None
    subgroups: bool | None = None
    max_storage_binding: int
    max_workgroups_per_dim: int
    max_workgroup_storage: int

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            allowed = _CHOICES.get(f.name)
            if allowed is not None:
                if v not in allowed:
                    raise InvalidProblem(f"{f.name}: expected one of {allowed}, got {v!r}")
            elif not (isinstance(v, int) and v > 0):
                raise InvalidProblem(f"{f.name}: expected a positive integer, got {v!r}")

    @classmethod
    def from_limits(cls, limits: Mapping[str, Any]) -> WgpuOptions:
        """The defaults for a device with these (wgpu-named) limits: its own maxima."""
        return cls(max_storage_binding=int(limits["max-storage-buffer-binding-size"]),
                   max_workgroups_per_dim=int(limits["max-compute-workgroups-per-dimension"]),
                   max_workgroup_storage=int(limits["max-compute-workgroup-storage-size"]))

    def use_subgroups(self, available: bool) -> bool:
        """Whether plans use subgroup operations on an adapter that has them (``available``)
        or not; :class:`Unsupported` where ``subgroups`` is True and it has none."""
        if self.subgroups and not available:
            raise Unsupported("subgroups: expected None or False on this adapter, got True (it "
                              "lacks the feature subgroup, in WebGPU subgroups)")
        return available if self.subgroups is None else bool(self.subgroups)

    def replaced(self, **settings: Any) -> WgpuOptions:
        """A copy with ``settings`` changed; :class:`InvalidProblem` for an unknown key or
        a value out of range."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise InvalidProblem(f"settings: expected keys among {sorted(names)}, got {unknown}")
        return dataclasses.replace(self, **settings)

    def as_dict(self) -> dict[str, Any]:
        """Every field by name, in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
