"""Plans: a descriptor bound to a backend's executable, checked arguments, then run.

The shape follows CUTLASS's Python interface: select a plan for a problem, ask
whether it can implement a set of arguments (and why not), its workspace size
(always 0: scratch is caller-owned), then run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar, Union

from . import validate
from .backends import Backend, Executable, PrecisionGuarantee
from .backends import backend as get_backend
from .check_cache import CheckCache
from .dtypes import FLOAT_DTYPES, DType
from .errors import InvalidProblem, QlinearError, Unsupported
from .problem import (
    DynamicRangeQuantizeDescriptor,
    LinearTensors,
    QuantizedLinearDescriptor,
    QuantizeTensors,
    check_int,
)
from .schemes import ActivationScheme

BackendLike = Union[Backend, str, None]  # noqa: UP007 (a runtime alias on 3.10)
_PlanT = TypeVar("_PlanT", bound="_Plan")

__all__ = ["QuantizedLinearPlan", "DynamicRangeQuantizePlan", "typical_plans"]


class _Plan:
    _descriptor_type: ClassVar[type] = object
    _bundle: ClassVar[Any]

    def __init__(self, backend: Backend, descriptor: Any, executable: Executable):
        self.backend = backend
        self.descriptor = descriptor
        self._executable = executable
        self._expected = validate.expectations(self._bundle.args_type, descriptor)
        self._checks = CheckCache(tuple(e[0] for e in self._expected), self._bundle)

    @classmethod
    def _make_executable(cls, be: Backend, desc: Any) -> Executable:
        raise NotImplementedError

    def _is_empty(self) -> bool:
        raise NotImplementedError

    @classmethod
    def select(cls: type[_PlanT], backend: BackendLike, descriptor: Any) -> _PlanT:
        """Choose and prepare (compile, cache) the executable for ``descriptor`` on ``backend``
        (a :class:`Backend`, a backend name, or None for the best available).

        Raises :class:`InvalidProblem` naming ``descriptor`` when it is not this plan's
        descriptor type, or ``backend`` when it is neither a backend nor a backend's name;
        :class:`Unsupported` when the backend cannot run the descriptor."""
        if not isinstance(descriptor, cls._descriptor_type):
            raise InvalidProblem(
                f"descriptor: expected {cls._descriptor_type.__name__}, "
                f"got {type(descriptor).__name__}")
        be = get_backend(backend)
        scheme: ActivationScheme = getattr(descriptor, "scheme")  # noqa: B009 (both types have it)
        if scheme not in be.activation_schemes:
            runs = ", ".join(sorted(str(s) for s in be.activation_schemes))
            raise Unsupported(
                f"scheme: the {be.name} backend runs the activation schemes {runs}, "
                f"got {scheme.value!r}")
        return cls(be, descriptor, cls._make_executable(be, descriptor))

    @property
    def sku(self) -> str:
        """Which kernel(s) this plan runs, e.g. ``"cpu.blas_f32_chunk1024"``."""
        return self._executable.sku

    @property
    def precision_guarantee(self) -> PrecisionGuarantee:
        """What the plan promises about its numbers (bit identity, determinism, subnormals)."""
        return self._executable.precision_guarantee

    def workspace_size(self) -> int:
        """Bytes of workspace the plan needs beyond the arguments: always 0, since the
        scratch tensors are part of the arguments and owned by the caller."""
        return 0

    def can_implement(self, args: Any) -> bool:
        """Return True if ``args`` fit this plan; otherwise raise :class:`InvalidProblem`
        naming the argument, what was expected and what was given."""
        validate.check_args(self.backend, self.descriptor, args, self._bundle, self._expected)
        return True

    def run(self, args: Any, stream: Any | None = None) -> None:
        """Validate ``args`` and ``stream`` and run. Asynchronous on GPU backends: the
        results are ready after ``backend.synchronize(stream)`` or ``backend.to_numpy``.
        On any error nothing the caller owns has been written.

        ``stream``: None, or what the backend runs on (a cuda stream, a wgpu batch); the cpu
        backend takes only None. A stream the backend cannot use raises
        :class:`InvalidProblem` (``"stream: expected <what>, got <type name>"``).

        Empty problems are valid: with M = 0 (or C_out = 0 for the linear plan) nothing is
        computed or written (the arguments and the stream are still checked); with K = 0
        every row has scale 1 and ``y = bias`` (or 0).

        Arguments the same as the last run's (the same backend tensors, the same writable
        numpy arrays with the same shape, strides, dtype and address, the same numbers)
        are recognised rather than checked again (:mod:`qlinear.check_cache`); the plan
        keeps none of them alive."""
        tensors = self._checked(args)
        self.backend.check_stream(stream)
        if self._is_empty():
            return
        self._executable.run(tensors, stream)

    def _checked(self, args: Any) -> Any:
        """The checked bundle of ``args`` (last run's, where they are last run's)."""
        if type(args) is self._bundle.args_type:
            tensors = self._checks.get(args)
            if tensors is not None:
                return tensors
        tensors = validate.check_args(self.backend, self.descriptor, args, self._bundle,
                                      self._expected)
        self._checks.put(args, tensors)
        return tensors

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.descriptor} sku={self.sku!r}>"


class QuantizedLinearPlan(_Plan):
    """A plan for :class:`QuantizedLinearDescriptor`: activation pass, int8 GEMM with
    exact int32 accumulation, dequantization (+ bias) to TIn.

    Example::

        plan = QuantizedLinearPlan.select(ql.backend("cpu"), desc)
        plan.run(QuantizedLinearArgs(activation=x, weight_q=wq, weight_scale=ws, output=y,
                                     act_q_scratch=xq, act_scale_scratch=xs))
    """

    _descriptor_type = QuantizedLinearDescriptor
    _bundle = LinearTensors

    @classmethod
    def _make_executable(cls, be: Backend, desc: Any) -> Executable:
        return be.linear_executable(desc)

    def _is_empty(self) -> bool:
        return self.descriptor.m == 0 or self.descriptor.c_out == 0


class DynamicRangeQuantizePlan(_Plan):
    """A plan for the activation pass alone (:class:`DynamicRangeQuantizeDescriptor`):
    per-row amax, scale, round half to even, clamp to ``q_min..q_max`` by default; with
    another scheme, the caller's static scale (and zero point) or each row's min and max
    and a per-row zero point (see :mod:`qlinear.schemes`)."""

    _descriptor_type = DynamicRangeQuantizeDescriptor
    _bundle = QuantizeTensors

    @classmethod
    def _make_executable(cls, be: Backend, desc: Any) -> Executable:
        return be.quantize_executable(desc)

    def _is_empty(self) -> bool:
        return self.descriptor.m == 0


def typical_plans(backend: BackendLike = None, k: int = 4096, n: int = 4096,
                  ms: Sequence[int] = (1, 16, 512),
                  dtypes: Sequence[DType] = FLOAT_DTYPES) -> dict[str, str]:
    """What a backend runs for typical LLM shapes: ``{"M=1 K=N=4096 f16": sku}``, one entry
    per M and dtype, with ``"unsupported: <why>"`` where it cannot. Selecting compiles, so
    this is for ``qlinear info`` and tests, not a hot path. ``k``, ``n`` and every M are
    non-negative integers (:func:`qlinear.problem.check_int`): a bad one raises
    :class:`InvalidProblem` rather than filling the table with refusals."""
    k = check_int("k", k, 0)
    n = check_int("n", n, 0)
    ms = [check_int(f"ms[{i}]", m, 0) for i, m in enumerate(ms)]
    be = get_backend(backend)
    table: dict[str, str] = {}
    for m in ms:
        for dt in dtypes:
            label = f"M={m} K={k} N={n} {dt.name}" if k != n else f"M={m} K=N={k} {dt.name}"
            try:
                desc = QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dt)
                table[label] = QuantizedLinearPlan.select(be, desc).sku
            except QlinearError as e:
                table[label] = f"unsupported: {e}"
    return table
