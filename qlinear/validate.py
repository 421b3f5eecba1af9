"""Every argument check, written once, used by every backend.

The checks run before anything is written: a plan that raises here leaves the
output and both scratches as they were. What each argument must be (shape, element
type, written or read) is declared once, on its Args class (:mod:`qlinear.problem`);
validation returns the typed bundle the executables run on.

Beside the plan arguments, the checks every backend's tensor methods share live here
too, so that one mistake gets one message on every backend: host arrays entering a
backend (:func:`check_plain_array`, :func:`host_array`), the shape and dtype of a new
tensor (:func:`check_shape`, :func:`check_new_tensor`) and the rows of a narrowed view
(:func:`check_rows`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, Union

import numpy as np

from .dtypes import DType, as_dtype, s8, s32
from .errors import InvalidProblem
from .problem import (
    DynamicRangeQuantizeArgs,
    DynamicRangeQuantizeDescriptor,
    LinearTensors,
    QuantizedLinearArgs,
    QuantizedLinearDescriptor,
    QuantizeTensors,
    argument_specs,
    check_int,
)
from .schemes import check_input_scale
from .tensors import Tensor

if TYPE_CHECKING:
    from .backends.base import Backend

__all__ = ["check_tensor", "check_no_alias", "check_args", "expectations", "linear_args",
           "quantize_args", "check_plain_array", "host_array", "check_shape",
           "check_new_tensor", "check_rows", "scheme_constants"]

# ndarray subclasses whose elements behave exactly as a plain array's: a memory-mapped
# file is used in place. Any other subclass may carry meaning (a mask, matrix indexing)
# that a kernel reading the raw memory would silently drop.
_PLAIN_ARRAY_TYPES = (np.ndarray, np.memmap)
_MAX_BYTES = 2**63 - 1

Descriptor = Union[  # noqa: UP007 (a runtime alias on 3.10)
    QuantizedLinearDescriptor, DynamicRangeQuantizeDescriptor]
Bundle = TypeVar("Bundle", LinearTensors, QuantizeTensors)


def check_tensor(backend: Backend, name: str, obj: Any, shape: Sequence[int],
                 dtype: DType) -> Tensor:
    """Wrap ``obj`` on ``backend`` and check its dtype, shape and layout.

    Returns the :class:`Tensor`. Raises :class:`InvalidProblem` naming ``name``; an
    ndarray subclass is refused here, before the backend sees it, with the same message
    on every backend.
    """
    if obj is None:
        raise InvalidProblem(f"{name}: expected a {dtype.name} tensor of shape {shape}, got None")
    if type(obj) is not Tensor and isinstance(obj, np.ndarray):
        check_plain_array(name, obj)
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
_ELEM_DTYPES = {"s8": s8, "s32": s32}


@functools.lru_cache(maxsize=256)
def expectations(args_type: type, desc: Descriptor) -> Expectations:
    """``(name, shape, dtype or scalar kind, written, presence)`` of every argument of
    ``args_type`` for ``desc``: what :func:`check_args` checks. ``presence`` is
    ``"required"``, ``"optional"`` (None allowed) or ``"absent"`` (must be None: the
    descriptor's scheme does not use it). A plan computes them once, when selected."""
    out = []
    for spec in argument_specs(args_type):
        if spec.when is not None:
            presence = "required" if getattr(desc.scheme, spec.when) else "absent"
        else:
            presence = "optional" if spec.optional else "required"
        kind = spec.elem if spec.elem in ("scale", "zero_point") else (
            _ELEM_DTYPES.get(spec.elem, desc.dtype))
        out.append((spec.name, tuple(getattr(desc, dim) for dim in spec.shape), kind,
                    spec.written, presence))
    return tuple(out)


def _check_scalar(desc: Descriptor, name: str, kind: str, presence: str,
                  obj: Any) -> float | int | None:
    """A host scalar of the scheme (``kind`` ``"scale"`` or ``"zero_point"``) checked and
    normalised, or None where the scheme takes none."""
    if presence == "absent":
        if obj is None:
            return None
        raise InvalidProblem(
            f"{name}: expected None with scheme {desc.scheme.value!r}, got {type(obj).__name__}")
    if obj is None:
        raise InvalidProblem(
            f"{name}: expected {'a real number' if kind == 'scale' else 'an integer'} "
            f"with scheme {desc.scheme.value!r}, got None")
    if kind == "scale":
        return check_input_scale(obj, desc.dtype, name)
    return check_int(name, obj, desc.q_min, desc.q_max, f" (q_min..q_max of scheme "
                                                       f"{desc.scheme.value!r})")


def scheme_constants(desc: Descriptor, input_scale: Any,
                     input_zero_point: Any) -> tuple[float | None, int | None]:
    """The scheme's host constants as :func:`check_args` checks them: ``(input_scale
    rounded to TIn, input_zero_point)``, each None where ``desc.scheme`` takes none (and
    then required to be None). For what keeps them beside a plan (a layer)."""
    given = {"input_scale": input_scale, "input_zero_point": input_zero_point}
    args_type = (DynamicRangeQuantizeArgs if isinstance(desc, DynamicRangeQuantizeDescriptor)
                 else QuantizedLinearArgs)
    scale, zp = (_check_scalar(desc, name, kind, presence, given[name])
                 for name, _, kind, _, presence in expectations(args_type, desc)
                 if isinstance(kind, str))
    return (None if scale is None else float(scale)), (None if zp is None else int(zp))


def check_args(backend: Backend, desc: Descriptor, args: Any, bundle: type[Bundle],
               expected: Expectations | None = None) -> Bundle:
    """Check every argument of ``args`` (an instance of ``bundle.args_type``) against
    ``desc`` on ``backend``, then that no written argument overlaps another; return the
    checked tensors (and normalised host scalars) as a ``bundle``. ``expected``:
    :func:`expectations` of ``desc``, when the caller keeps them."""
    args_type = bundle.args_type
    if not isinstance(args, args_type):
        raise InvalidProblem(f"args: expected {args_type.__name__}, got {type(args).__name__}")
    values: list[Any] = []
    written: dict[str, Tensor] = {}
    read: dict[str, Tensor] = {}
    if expected is None:
        expected = expectations(args_type, desc)
    for name, shape, kind, is_written, presence in expected:
        obj = getattr(args, name)
        if isinstance(kind, str):
            values.append(_check_scalar(desc, name, kind, presence, obj))
            continue
        if obj is None and presence != "required":
            values.append(None)
            continue
        if presence == "absent":
            raise InvalidProblem(
                f"{name}: expected None with scheme {desc.scheme.value!r}, "
                f"got {type(obj).__name__}")
        t = check_tensor(backend, name, obj, shape, kind)
        values.append(t)
        (written if is_written else read)[name] = t
    check_no_alias(written, read)
    # In declaration order, which the bundle's fields follow (a test checks it).
    return bundle(*values)


def linear_args(backend: Backend, desc: QuantizedLinearDescriptor,
                args: QuantizedLinearArgs) -> LinearTensors:
    """Check ``args`` against ``desc`` on ``backend``; return the checked tensors."""
    return check_args(backend, desc, args, LinearTensors)


def quantize_args(backend: Backend, desc: DynamicRangeQuantizeDescriptor,
                  args: DynamicRangeQuantizeArgs) -> QuantizeTensors:
    """Check activation-pass ``args`` against ``desc``; return the checked tensors."""
    return check_args(backend, desc, args, QuantizeTensors)


# -- what every backend's tensor methods check ------------------------------------------


def check_plain_array(name: str, obj: Any) -> None:
    """Refuse a numpy.ndarray subclass (``np.ma.MaskedArray``, ``np.matrix``, a user's own)
    with :class:`InvalidProblem` naming ``name``: a backend reads the raw elements, so a
    mask or a subclass's semantics would be silently lost. ``np.memmap`` is accepted;
    anything that is not an ndarray passes (the caller decides what else it takes)."""
    if isinstance(obj, np.ndarray) and type(obj) not in _PLAIN_ARRAY_TYPES:
        raise InvalidProblem(
            f"{name}: expected an array that is not a numpy.ndarray subclass, got "
            f"{type(obj).__name__} (its mask or semantics would be silently lost)")


def host_array(obj: Any, name: str = "array") -> tuple[np.ndarray, DType]:
    """What ``be.from_numpy`` copies: ``obj`` as a numpy array (anything
    ``numpy.asarray`` takes; ndarray subclasses refused, see :func:`check_plain_array`)
    and its :class:`DType`. Raises :class:`InvalidProblem` naming ``name``."""
    check_plain_array(name, obj)
    arr = np.asarray(obj)
    return arr, as_dtype(arr.dtype, name=name)


def check_shape(shape: Any, name: str = "shape") -> tuple[int, ...]:
    """``shape`` as a tuple of Python ints: a sequence (tuple, list, ...; not a string)
    whose every dimension passes :func:`qlinear.problem.check_int` as a non-negative
    integer (numpy ints accepted; bools, floats, strings and None refused). Raises
    :class:`InvalidProblem` naming ``name`` or ``name[i]``."""
    if type(shape) is tuple and all(type(n) is int and n >= 0 for n in shape):
        return shape  # the common case: already checked or straight from numpy
    if not isinstance(shape, Sequence) or isinstance(shape, (str, bytes)):
        raise InvalidProblem(f"{name}: expected a sequence of non-negative integers, "
                             f"got {shape!r}")
    return tuple(check_int(f"{name}[{i}]", n, 0) for i, n in enumerate(shape))


def check_new_tensor(shape: Any, dtype: Any) -> tuple[tuple[int, ...], DType]:
    """The checked ``(shape, dtype)`` of a tensor ``be.empty(shape, dtype)`` makes: the
    shape per :func:`check_shape`, the dtype per :func:`qlinear.dtypes.as_dtype`, and at
    most 2**63 - 1 bytes in all (beyond that no allocator can even be asked)."""
    dims = check_shape(shape)
    dt = as_dtype(dtype, name="dtype")
    if math.prod(dims) * dt.itemsize > _MAX_BYTES:
        raise InvalidProblem(
            f"shape: expected a tensor of at most 2**63 - 1 bytes, got shape {dims} of {dt.name}")
    return dims, dt


def check_rows(t: Tensor, rows: Any) -> int:
    """``rows`` as an int in ``0..t.shape[0]`` (what ``be.narrow(t, rows)`` keeps);
    :class:`InvalidProblem` naming ``rows``, or ``tensor`` when it has no rows at all."""
    if not t.shape:
        raise InvalidProblem(
            f"tensor: expected a tensor with at least one dimension, got shape {t.shape}")
    return check_int("rows", rows, 0, t.shape[0])
