"""Every argument check, written once, used by every backend.

The checks run before anything is written: a plan that raises here leaves the
output and both scratches as they were. What each argument must be (shape, element
type, written or read) is declared once, on its Args class (:mod:`qlinear.problem`);
validation returns the typed bundle the executables run on.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, Union

from .dtypes import DType, s8
from .errors import InvalidProblem
from .problem import (
    DynamicRangeQuantizeArgs,
    DynamicRangeQuantizeDescriptor,
    LinearTensors,
    QuantizedLinearArgs,
    QuantizedLinearDescriptor,
    QuantizeTensors,
    argument_specs,
)
from .tensors import Tensor

if TYPE_CHECKING:
    from .backends.base import Backend

__all__ = ["check_tensor", "check_no_alias", "check_args", "expectations", "linear_args",
           "quantize_args"]

Descriptor = Union[  # noqa: UP007 (a runtime alias on 3.10)
    QuantizedLinearDescriptor, DynamicRangeQuantizeDescriptor]
Bundle = TypeVar("Bundle", LinearTensors, QuantizeTensors)


def check_tensor(backend: Backend, name: str, obj: Any, shape: Sequence[int],
                 dtype: DType) -> Tensor:
    """Wrap ``obj`` on ``backend`` and check its dtype, shape and layout.

    Returns the :class:`Tensor`. Raises :class:`InvalidProblem` naming ``name``.
    """
    if obj is None:
        raise InvalidProblem(f"{name}: expected a {dtype.name} tensor of shape {shape}, got None")
    t = backend.wrap(obj, name=name)
    if t.backend != backend.name:
        raise InvalidProblem(
            f"{name}: expected a tensor of backend {backend.name!r}, "
            f"got one of backend {t.backend!r}")
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


def _same_strides(shape: Sequence[int], got: Sequence[Any], want: Sequence[int]) -> bool:
    # A dimension of extent 1 can have any stride without changing the layout.
    return all(n == 1 or g == w for n, g, w in zip(shape, got, want))


def check_no_alias(written: Mapping[str, Tensor], others: Mapping[str, Tensor]) -> None:
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


Expectations = tuple[tuple[Any, ...], ...]


@functools.lru_cache(maxsize=256)
def expectations(args_type: type, desc: Descriptor) -> Expectations:
    """``(name, shape, dtype, written, optional)`` of every argument of ``args_type`` for
    ``desc``: what :func:`check_args` checks. A plan computes them once, when selected."""
    return tuple((spec.name, tuple(getattr(desc, dim) for dim in spec.shape),
                  s8 if spec.int8 else desc.dtype, spec.written, spec.optional)
                 for spec in argument_specs(args_type))


def check_args(backend: Backend, desc: Descriptor, args: Any, bundle: type[Bundle],
               expected: Expectations | None = None) -> Bundle:
    """Check every argument of ``args`` (an instance of ``bundle.args_type``) against
    ``desc`` on ``backend``, then that no written argument overlaps another; return the
    checked tensors as a ``bundle``. ``expected``: :func:`expectations` of ``desc``, when
    the caller keeps them."""
    args_type = bundle.args_type
    if not isinstance(args, args_type):
        raise InvalidProblem(f"args: expected {args_type.__name__}, got {type(args).__name__}")
    tensors: list[Any] = []
    written: dict[str, Tensor] = {}
    read: dict[str, Tensor] = {}
    if expected is None:
        expected = expectations(args_type, desc)
    for name, shape, dtype, is_written, optional in expected:
        obj = getattr(args, name)
        if obj is None and optional:
            tensors.append(None)
            continue
        t = check_tensor(backend, name, obj, shape, dtype)
        tensors.append(t)
        (written if is_written else read)[name] = t
    check_no_alias(written, read)
    # In declaration order, which the bundle's fields follow (a test checks it).
    return bundle(*tensors)


def linear_args(backend: Backend, desc: QuantizedLinearDescriptor,
                args: QuantizedLinearArgs) -> LinearTensors:
    """Check ``args`` against ``desc`` on ``backend``; return the checked tensors."""
    return check_args(backend, desc, args, LinearTensors)


def quantize_args(backend: Backend, desc: DynamicRangeQuantizeDescriptor,
                  args: DynamicRangeQuantizeArgs) -> QuantizeTensors:
    """Check activation-pass ``args`` against ``desc``; return the checked tensors."""
    return check_args(backend, desc, args, QuantizeTensors)
