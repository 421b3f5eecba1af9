"""Problem descriptors (what is computed) and argument bundles (on which tensors).

A descriptor is validated when it is made; arguments are validated against it by
:mod:`qlinear.validate` when a plan checks or runs them.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from .dtypes import DType, as_dtype
from .errors import InvalidProblem
from .schemes import ActivationScheme, as_scheme
from .tensors import Tensor, TensorLike

__all__ = [
    "QuantizedLinearDescriptor",
    "DynamicRangeQuantizeDescriptor",
    "QuantizedLinearArgs",
    "DynamicRangeQuantizeArgs",
    "LinearTensors",
    "QuantizeTensors",
    "ArgumentSpec",
    "argument_specs",
    "max_exact_k",
    "INT32_MAX",
    "DECODE_MAX_M",
    "check_int",
]

INT32_MAX = 2**31 - 1
#: Largest M that counts as decode: every backend serves M <= this with a kernel that
#: reads the weight once (GEMV-like) instead of the tiled GEMM.
DECODE_MAX_M = 16
#: Largest |weight_q| value: int8 weights may hold -128.
_W_ABS_MAX = 128


def max_exact_k(q_min: int = -127, q_max: int = 127, asymmetric: bool = False) -> int:
    """The largest K for which the int32 accumulation cannot overflow:
    ``K * max(|q_min|, |q_max|) * 128 <= 2**31 - 1``, or with a zero point (``asymmetric``)
    ``K * (q_max - q_min) * 128 <= 2**31 - 1``, since ``q - zp`` then spans the whole range."""
    span = (q_max - q_min) if asymmetric else max(-q_min, q_max)
    return INT32_MAX // (span * _W_ABS_MAX)


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None,
              what: str = "") -> int:
    """``value`` as an int, if it is an integer (a Python or numpy int; never a bool, a
    float or a string) within ``lo..hi``; :class:`InvalidProblem` naming ``name`` otherwise.
    Every integer parameter of the API goes through here, so all take the same values."""
    if lo is not None and hi is not None:
        expected = f"an integer in {lo}..{hi}{what}"
    elif lo == 0:
        expected = "a non-negative integer"
    elif lo is not None:
        expected = f"an integer >= {lo}"
    else:
        expected = "an integer"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InvalidProblem(f"{name}: expected {expected}, got {value!r}")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise InvalidProblem(f"{name}: expected {expected}, got {value!r}")
    return v


def _size(name: str, value: Any) -> int:
    return check_int(name, value, 0)


def _normalise(desc: Any, sizes: tuple[str, ...]) -> None:
    """The checks both descriptors share: sizes, dtype, scheme and q range, stored
    normalised on the frozen ``desc``."""
    for name in sizes:
        object.__setattr__(desc, name, _size(name, getattr(desc, name)))
    object.__setattr__(desc, "dtype", _float_dtype(desc.dtype))
    scheme = as_scheme(desc.scheme)
    object.__setattr__(desc, "scheme", scheme)
    q_min = scheme.default_q_min if desc.q_min is None else desc.q_min
    q_min, q_max = _q_range(q_min, desc.q_max)
    object.__setattr__(desc, "q_min", q_min)
    object.__setattr__(desc, "q_max", q_max)


def _q_range(q_min: Any, q_max: Any) -> tuple[int, int]:
    q_min = check_int("q_min", q_min, -128, 127, " (int8)")
    q_max = check_int("q_max", q_max, -128, 127, " (int8)")
    if not q_min < 0 < q_max:
        raise InvalidProblem(
            f"q_min, q_max: expected q_min < 0 < q_max, got q_min={q_min!r}, q_max={q_max!r}")
    return int(q_min), int(q_max)


def _float_dtype(value: object) -> DType:
    d = as_dtype(value, name="dtype")
    if not d.is_float:
        raise InvalidProblem(f"dtype: expected a float type (f32, f16, bf16, f64), got {d.name}")
    return d


@dataclass(frozen=True)
class QuantizedLinearDescriptor:
    """A W8A8 linear problem:
    ``y[m, c_out] = dequant(quant(x[m, k]) @ weight_q[c_out, k].T) (+ bias)``.

    Args:
        m: rows of the activation (tokens).
        c_out: output channels (rows of ``weight_q``).
        k: input features.
        dtype: TIn, the type of activation, scales, bias and output (f32, f16, bf16, f64;
            a :class:`DType` or anything :func:`qlinear.dtypes.as_dtype` takes).
        q_min, q_max: activation quantization range; int8, q_min < 0 < q_max. ``q_min``
            defaults to -127 for the symmetric schemes and -128 for the asymmetric ones;
            ``q_max`` to 127.
        scheme: how activations are quantized, an :class:`ActivationScheme` or its name
            (``"dynamic"``, ``"static"``, ``"static_asym"``, ``"dynamic_asym"``); the
            default is dynamic per-token symmetric.
    """

    m: int
    c_out: int
    k: int
    dtype: DType
    q_min: int = None  # type: ignore[assignment]  # normalised to an int by __post_init__
    q_max: int = 127
    scheme: ActivationScheme = ActivationScheme.DYNAMIC

    def __post_init__(self) -> None:
        _normalise(self, ("m", "c_out", "k"))
        asym = self.scheme.asymmetric
        limit = max_exact_k(self.q_min, self.q_max, asym)
        if self.k > limit:
            span = (f"(q_max - q_min) = {self.q_max - self.q_min}" if asym
                    else f"{max(-self.q_min, self.q_max)}")
            raise InvalidProblem(
                f"k: expected at most {limit} so that the int32 accumulation is exact "
                f"(K * {span} * 128 < 2**31), got {self.k}")

    @property
    def activation_pass(self) -> DynamicRangeQuantizeDescriptor:
        """The descriptor of this problem's activation pass alone."""
        return DynamicRangeQuantizeDescriptor(self.m, self.k, self.dtype, self.q_min, self.q_max,
                                              self.scheme)

    @property
    def is_decode(self) -> bool:
        """Whether M is small enough (<= :data:`DECODE_MAX_M`) for the decode kernels."""
        return self.m <= DECODE_MAX_M

    @property
    def ops(self) -> int:
        """Integer operations of the GEMM (2*M*K*C_out), for TOPS figures."""
        return 2 * self.m * self.k * self.c_out


@dataclass(frozen=True)
class DynamicRangeQuantizeDescriptor:
    """The activation pass alone: ``x[m, k]`` (TIn) -> ``q[m, k]`` (s8), ``scale[m]`` (TIn) and,
    with an asymmetric scheme, ``zp[m]`` (s32). Arguments as for
    :class:`QuantizedLinearDescriptor`."""

    m: int
    k: int
    dtype: DType
    q_min: int = None  # type: ignore[assignment]  # normalised to an int by __post_init__
    q_max: int = 127
    scheme: ActivationScheme = ActivationScheme.DYNAMIC

    def __post_init__(self) -> None:
        _normalise(self, ("m", "k"))


# -- arguments ----------------------------------------------------------------------
#
# Each argument is declared once, in its Args class, with what validation needs to
# know as field metadata: its shape (in descriptor attribute names), its element type
# (TIn, s8, s32, or a host scalar), whether the run writes it, whether it may be None,
# and which schemes use it.


@dataclass(frozen=True)
class ArgumentSpec:
    """What one argument must be.

    Attributes:
        shape: descriptor attribute names (``("m", "k")``); ``()`` for a host scalar.
        elem: ``"tin"`` (the descriptor's dtype), ``"s8"``, ``"s32"``, or a host scalar:
            ``"scale"`` (a real number, see :func:`qlinear.schemes.check_input_scale`) or
            ``"zero_point"`` (an integer in ``q_min..q_max``).
        written: the run writes it.
        optional: None is allowed.
        when: an :class:`ActivationScheme` property (``"asymmetric"``): the argument is
            required when the descriptor's scheme has it and must be None otherwise.
    """

    name: str
    shape: tuple[str, ...]
    elem: str = "tin"
    written: bool = False
    optional: bool = False
    when: str | None = None


def _arg(*shape: str, elem: str = "tin", written: bool = False, optional: bool = False,
         when: str | None = None) -> Any:
    spec = {"shape": shape, "elem": elem, "written": written, "optional": optional,
            "when": when}
    return field(default=None, metadata=spec) if optional or when else field(metadata=spec)


@functools.cache
def argument_specs(args_type: type) -> tuple[ArgumentSpec, ...]:
    """The :class:`ArgumentSpec` of every field of an Args class, in declaration order."""
    return tuple(ArgumentSpec(f.name, **f.metadata) for f in fields(args_type))


@dataclass
class QuantizedLinearArgs:
    """The tensors of one linear run. Each is a backend tensor, or what the backend wraps
    without a copy (a numpy array on cpu; a torch or CuPy CUDA tensor on cuda).

    Shapes and dtypes (TIn = the descriptor's dtype):
        activation ``x[M, K]`` TIn; weight_q ``[C_out, K]`` s8; weight_scale ``[C_out]`` TIn;
        output ``y[M, C_out]`` TIn; act_q_scratch ``[M, K]`` s8; act_scale_scratch ``[M]`` TIn;
        bias ``[C_out]`` TIn or None.
    With an asymmetric scheme (``static_asym``, ``dynamic_asym``), and None otherwise:
        act_zp_scratch ``[M]`` s32 (written: the rows' zero points); weight_colsum
        ``[C_out]`` s32, ``sum_k weight_q[n, k]`` (:func:`qlinear.weight_colsum`).
    With a static scheme, and None otherwise: input_scale, a host real number (finite,
        > 0, used rounded to TIn); with ``static_asym``: input_zero_point, a host integer
        in ``q_min..q_max``.
    The scratches are caller-owned and reusable across runs; after a run they hold the
    quantized activation, its per-row scales (and zero points).
    """

    activation: TensorLike = _arg("m", "k")
    weight_q: TensorLike = _arg("c_out", "k", elem="s8")
    weight_scale: TensorLike = _arg("c_out")
    output: TensorLike = _arg("m", "c_out", written=True)
    act_q_scratch: TensorLike = _arg("m", "k", elem="s8", written=True)
    act_scale_scratch: TensorLike = _arg("m", written=True)
    bias: TensorLike | None = _arg("c_out", optional=True)
    act_zp_scratch: TensorLike | None = _arg("m", elem="s32", written=True, when="asymmetric")
    weight_colsum: TensorLike | None = _arg("c_out", elem="s32", when="asymmetric")
    input_scale: Any = _arg(elem="scale", when="static")
    input_zero_point: Any = _arg(elem="zero_point", when="static_zero_point")


@dataclass
class DynamicRangeQuantizeArgs:
    """The tensors of one activation pass: activation ``x[M, K]`` TIn, act_q ``[M, K]`` s8
    (output), act_scale ``[M]`` TIn (output); act_zp ``[M]`` s32 (output) with an asymmetric
    scheme; input_scale and input_zero_point as for :class:`QuantizedLinearArgs`."""

    activation: TensorLike = _arg("m", "k")
    act_q: TensorLike = _arg("m", "k", elem="s8", written=True)
    act_scale: TensorLike = _arg("m", written=True)
    act_zp: TensorLike | None = _arg("m", elem="s32", written=True, when="asymmetric")
    input_scale: Any = _arg(elem="scale", when="static")
    input_zero_point: Any = _arg(elem="zero_point", when="static_zero_point")


# -- validated bundles ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinearTensors:
    """:class:`QuantizedLinearArgs` after validation: every argument a checked
    :class:`Tensor` of the plan's backend (``bias`` and the scheme's extras may be None),
    host scalars checked and normalised. What executables run on."""

    args_type: ClassVar[type] = QuantizedLinearArgs

    activation: Tensor
    weight_q: Tensor
    weight_scale: Tensor
    output: Tensor
    act_q_scratch: Tensor
    act_scale_scratch: Tensor
    bias: Tensor | None
    act_zp_scratch: Tensor | None = None
    weight_colsum: Tensor | None = None
    #: The static scale rounded to TIn, as a Python float (None with a dynamic scheme).
    input_scale: float | None = None
    #: The static zero point (None unless the scheme is ``static_asym``).
    input_zero_point: int | None = None


@dataclass(frozen=True, slots=True)
class QuantizeTensors:
    """:class:`DynamicRangeQuantizeArgs` after validation: checked :class:`Tensor` s."""

    args_type: ClassVar[type] = DynamicRangeQuantizeArgs

    activation: Tensor
    act_q: Tensor
    act_scale: Tensor
    act_zp: Tensor | None = None
    input_scale: float | None = None
    input_zero_point: int | None = None
