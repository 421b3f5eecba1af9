"""Every argument check, written once, used by every backend.

The checks run before anything is written: a plan that raises here leaves the
output and both scratches as they were.
"""

from __future__ import annotations

from .dtypes import DType, s8
from .errors import InvalidProblem
from .problem import (
    DynamicRangeQuantizeArgs,
    DynamicRangeQuantizeDescriptor,
    QuantizedLinearArgs,
    QuantizedLinearDescriptor,
)
from .tensors import Tensor

__all__ = ["check_tensor", "check_no_alias", "linear_args", "quantize_args"]


def check_tensor(backend, name: str, obj, shape: tuple, dtype: DType) -> Tensor:
    """Wrap ``obj`` on ``backend`` and check its dtype, shape and layout.

    Returns the :class:`Tensor`. Raises :class:`InvalidProblem` naming ``name``.
    """
    if obj is None:
        raise InvalidProblem(f"{name}: expected a {dtype.name} tensor of shape {shape}, got None")
    t = backend.wrap(obj, name=name)
    if t.backend != backend.name:
        raise InvalidProblem(
            f"{name}: expected a tensor of backend {backend.name!r}, got one of backend {t.backend!r}")
    if t.device != backend.device_id:
        raise InvalidProblem(
            f"{name}: expected a tensor on device {backend.device_id!r}, got one on {t.device!r}")
    if t.dtype != dtype:
        raise InvalidProblem(f"{name}: expected dtype {dtype.name}, got {t.dtype.name}")
    if t.shape != tuple(shape):
        raise InvalidProblem(f"{name}: expected shape {tuple(shape)}, got {t.shape}")
    want = backend.expected_strides(t.shape, t.dtype)
    if t.strides != want and t.size and not _same_strides(t.shape, t.strides, want):
        raise InvalidProblem(
            f"{name}: expected a contiguous tensor with strides {want} (in elements), "
            f"got strides {t.strides}")
    return t


def _same_strides(shape, got, want) -> bool:
    # A dimension of extent 1 can have any stride without changing the layout.
    return all(n == 1 or g == w for n, g, w in zip(shape, got, want))


def check_no_alias(written: dict, others: dict) -> None:
    """Raise if a tensor that the run writes overlaps any other tensor of the run."""
    for a, t in written.items():
        if t.readonly:
            raise InvalidProblem(f"{a}: expected a writable tensor, got a read-only one")
    # (name, memory, start, end) of every non-empty tensor; a written one is compared with
    # every tensor after it in this list, which covers every pair involving a write.
    spans = [(name, t.memory, *t.byte_span()) for name, t in (*written.items(), *others.items())
             if t.size]
    for i, (a, mem, a0, a1) in enumerate(spans):
        if a not in written:
            break
        for b, mem_b, b0, b1 in spans[i + 1:]:
            if mem == mem_b and a0 < b1 and b0 < a1:
                raise InvalidProblem(
                    f"{a}: expected memory that no other argument uses, got a tensor that "
                    f"overlaps {b}")


def linear_args(backend, desc: QuantizedLinearDescriptor, args: QuantizedLinearArgs) -> dict:
    """Check ``args`` against ``desc`` on ``backend``; return the tensors by argument name."""
    if not isinstance(args, QuantizedLinearArgs):
        raise InvalidProblem(f"args: expected QuantizedLinearArgs, got {type(args).__name__}")
    m, n, k, dt = desc.m, desc.c_out, desc.k, desc.dtype
    t = {
        "activation": check_tensor(backend, "activation", args.activation, (m, k), dt),
        "weight_q": check_tensor(backend, "weight_q", args.weight_q, (n, k), s8),
        "weight_scale": check_tensor(backend, "weight_scale", args.weight_scale, (n,), dt),
        "output": check_tensor(backend, "output", args.output, (m, n), dt),
        "act_q_scratch": check_tensor(backend, "act_q_scratch", args.act_q_scratch, (m, k), s8),
        "act_scale_scratch": check_tensor(backend, "act_scale_scratch", args.act_scale_scratch,
                                          (m,), dt),
    }
    t["bias"] = None if args.bias is None else check_tensor(backend, "bias", args.bias, (n,), dt)
    written = {name: t[name] for name in ("output", "act_q_scratch", "act_scale_scratch")}
    read = {name: t[name] for name in ("activation", "weight_q", "weight_scale", "bias")
            if t[name] is not None}
    check_no_alias(written, read)
    return t


def quantize_args(backend, desc: DynamicRangeQuantizeDescriptor,
                  args: DynamicRangeQuantizeArgs) -> dict:
    """Check activation-pass ``args`` against ``desc``; return the tensors by argument name."""
    if not isinstance(args, DynamicRangeQuantizeArgs):
        raise InvalidProblem(f"args: expected DynamicRangeQuantizeArgs, got {type(args).__name__}")
    m, k, dt = desc.m, desc.k, desc.dtype
    t = {
        "activation": check_tensor(backend, "activation", args.activation, (m, k), dt),
        "act_q": check_tensor(backend, "act_q", args.act_q, (m, k), s8),
        "act_scale": check_tensor(backend, "act_scale", args.act_scale, (m,), dt),
    }
    check_no_alias({"act_q": t["act_q"], "act_scale": t["act_scale"]},
                   {"activation": t["activation"]})
    return t
