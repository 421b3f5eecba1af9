"""One quantized layer of a compressed-tensors checkpoint, read and checked against its
config group (see :mod:`qlinear.checkpoint`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidProblem

if TYPE_CHECKING:
    from .checkpoint import CompressedCheckpoint, LayerGroup, QuantizedLayerSpec

__all__ = ["read_layer"]

_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
_INT_TYPES = ("I8", "I16", "I32", "I64", "U8")


def _bad(name: str, expected: str, got: str) -> InvalidProblem:
    return InvalidProblem(f"tensor {name!r}: expected {expected}, got {got}")


def _meta(ckpt: CompressedCheckpoint, name: str, kinds: tuple[str, ...],
          shapes: tuple[tuple[int, ...], ...], what: str) -> None:
    dtype, shape = ckpt.stored(name)
    if dtype not in kinds:
        raise _bad(name, f"{what} ({' or '.join(kinds)})", f"dtype {dtype}")
    if shape not in shapes:
        raise _bad(name, f"shape {' or '.join(str(list(s)) for s in shapes)}",
                   f"shape {list(shape)}")


def _scalar(ckpt: CompressedCheckpoint, name: str, kinds: tuple[str, ...],
            what: str) -> float | int:
    _meta(ckpt, name, kinds, ((1,), (), (1, 1)), what)
    v = ckpt.tensor(name).reshape(())
    return int(v) if kinds == _INT_TYPES else float(v)


def read_layer(ckpt: CompressedCheckpoint, name: str, group: LayerGroup) -> QuantizedLayerSpec:
    """Layer ``name``'s tensors as a :class:`~qlinear.checkpoint.QuantizedLayerSpec`; every
    tensor's presence, dtype, shape and (for zero points) value checked against ``group``."""
    from .checkpoint import QuantizedLayerSpec

    have = set(ckpt.layer_names(name))
    scheme = group.scheme
    for part in ("weight", "weight_scale") + (("input_scale",) if scheme.static else ()):
        if f"{name}.{part}" not in have:
            raise _bad(f"{name}.{part}", f"in the checkpoint (layer {name!r} is quantized by "
                       f"config group {group.name!r}, scheme {scheme.value!r})", "no such tensor")
    if scheme.static_zero_point and f"{name}.input_zero_point" not in have:
        raise _bad(f"{name}.input_zero_point", "in the checkpoint (asymmetric static inputs)",
                   "no such tensor")
    if scheme.dynamic:
        for part in ("input_scale", "input_zero_point"):
            if f"{name}.{part}" in have:
                raise _bad(f"{name}.{part}", "no such tensor (the inputs are dynamic)",
                           "one in the checkpoint")
    wname = f"{name}.weight"
    dtype, shape = ckpt.stored(wname)
    if dtype != "I8" or len(shape) != 2:
        raise _bad(wname, "a 2-D int8 (I8) weight [N, K] (format int-quantized)",
                   f"dtype {dtype}, shape {list(shape)}")
    n = shape[0]
    per_tensor = group.weight_strategy == "tensor"
    scale_shapes = ((1,), (), (1, 1)) if per_tensor else ((n, 1), (n,))
    sname = f"{name}.weight_scale"
    _meta(ckpt, sname, _FLOAT_TYPES, scale_shapes,
          f"a float weight scale per {'tensor' if per_tensor else 'channel'}")
    zname = f"{name}.weight_zero_point"
    if zname in have:  # older writers stored zeros for symmetric weights
        _meta(ckpt, zname, _INT_TYPES, scale_shapes, "an integer zero point")
        if np.any(ckpt.tensor(zname) != 0):
            raise _bad(zname, "zeros (the weights are symmetric)", "non-zero values")
    bias = None
    if f"{name}.bias" in have:
        _meta(ckpt, f"{name}.bias", _FLOAT_TYPES, ((n,),), "a float bias")
        bias = ckpt.tensor(f"{name}.bias")
    input_scale = input_zp = None
    if scheme.static:
        input_scale = float(_scalar(ckpt, f"{name}.input_scale", _FLOAT_TYPES, "a float scale"))
        iz = f"{name}.input_zero_point"
        if iz in have:
            zp = int(_scalar(ckpt, iz, _INT_TYPES, "an integer zero point"))
            if scheme.static_zero_point:
                if not group.q_min <= zp <= group.q_max:
                    raise _bad(iz, f"a value in {group.q_min}..{group.q_max}", str(zp))
                input_zp = zp
            elif zp != 0:
                raise _bad(iz, "0 (the group's inputs are symmetric)", str(zp))
    ws = ckpt.tensor(sname).reshape(-1)
    return QuantizedLayerSpec(name, ckpt.tensor(wname), ws, bias, scheme, input_scale,
                              input_zp, group.q_min, group.q_max)
