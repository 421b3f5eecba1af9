"""Weight quantization and the high-level layer that owns weights and scratch."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import ml_dtypes
import numpy as np

from .backends import Backend
from .backends import backend as get_backend
from .dtypes import DType, DTypeLike, as_dtype, bf16, f64
from .errors import InvalidProblem
from .plans import QuantizedLinearPlan
from .problem import QuantizedLinearArgs, QuantizedLinearDescriptor, check_int
from .schemes import ActivationScheme, as_scheme, weight_colsum
from .tensors import Tensor
from .validate import check_plain_array, scheme_constants

__all__ = ["quantize_weight", "QuantizedLinear"]

#: Version of the pickled state of a :class:`QuantizedLinear` (2 added the activation
#: scheme and its constants; version 1 states load as the dynamic scheme).
_STATE_VERSION = 2


def _is_float(dt: np.dtype) -> bool:
    """Whether an array of ``dt`` holds floats (bf16 included)."""
    return dt.kind == "f" or dt == bf16.numpy


def _is_real(dt: np.dtype) -> bool:
    """Whether an array of ``dt`` holds real numbers (ints, floats, bf16; not bools)."""
    return dt.kind in "iu" or _is_float(dt)


def _first_bad(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _float_max(dt: DType) -> float:
    return float(ml_dtypes.finfo(dt.numpy).max)


def quantize_weight(weight: Any, *, dtype: DTypeLike | None = None,
                    q_max: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8 quantization of a float ``weight[C_out, K]``.

    ``weight_scale[n] = max_k |weight[n, k]| / q_max`` (in f32, f64 for f64), stored in
    ``dtype`` (default: the weight's own float type); all-zero rows get scale 1.
    ``weight_q[n, k] = clamp(round_half_to_even(weight[n, k] / weight_scale[n]), -q_max, q_max)``.

    Raises :class:`InvalidProblem` for a weight that is not a finite 2-D real array, a
    ``q_max`` outside 1..127, or a row whose scale does not fit ``dtype`` (an f16 layer
    holds scales up to 65504, so rows with ``max |w|`` above about 8.3e6 are refused).

    Returns ``(weight_q[C_out, K] int8, weight_scale[C_out] dtype)`` as numpy arrays.
    """
    q_max = check_int("q_max", q_max, 1, 127)
    check_plain_array("weight", weight)
    w = np.asarray(weight)
    if w.ndim != 2:
        raise InvalidProblem(f"weight: expected a 2-D array [C_out, K], got shape {w.shape}")
    if not _is_real(w.dtype):
        raise InvalidProblem(f"weight: expected a real (float or int) array, got dtype {w.dtype}")
    if dtype is None and not _is_float(w.dtype):
        raise InvalidProblem(
            f"dtype: expected a float type (f32, f16, bf16, f64) for an integer weight, "
            f"got None (the weight is {w.dtype})")
    dt = as_dtype(dtype if dtype is not None else w.dtype, name="dtype")
    if not dt.is_float:
        raise InvalidProblem(f"dtype: expected a float type (f32, f16, bf16, f64), got {dt.name}")
    if not np.isfinite(w).all():
        bad = _first_bad(~np.isfinite(w))
        raise InvalidProblem(
            f"weight: expected finite values, got {w[bad]} at {bad} (row {bad[0]})")
    ct = np.float64 if dt == f64 else np.float32
    with np.errstate(over="ignore"):  # a value beyond ct is reported below, not warned about
        wc = w.astype(ct)
    if not np.isfinite(wc).all():
        bad = _first_bad(~np.isfinite(wc))
        raise InvalidProblem(
            f"weight: expected values within {np.dtype(ct).name} (the compute type of "
            f"dtype {dt.name}), got {w[bad]} at {bad}")
    amax = np.abs(wc).max(axis=1) if wc.shape[1] else np.zeros(wc.shape[0], ct)
    with np.errstate(over="ignore"):
        scale = (amax / ct(q_max)).astype(dt.numpy)
    if not np.isfinite(scale).all():
        row = _first_bad(~np.isfinite(scale))[0]
        raise InvalidProblem(
            f"weight: expected max |w| / q_max of every row within {dt.name}'s range "
            f"(at most {_float_max(dt):.6g}), got {float(amax[row]):.6g} / {q_max} in row "
            f"{row}; quantize with dtype=f32 or bf16, or scale the weight down")
    scale[scale == 0] = 1
    q = np.clip(np.rint(wc / scale.astype(ct)[:, None]), -q_max, q_max).astype(np.int8)
    return q, scale


def _check_weight_q(weight_q: Any) -> np.ndarray:
    check_plain_array("weight_q", weight_q)
    wq = np.asarray(weight_q)
    if wq.dtype != np.int8 or wq.ndim != 2:
        raise InvalidProblem(
            f"weight_q: expected a 2-D int8 array [C_out, K], got a {wq.ndim}-D {wq.dtype} "
            f"array of shape {wq.shape}")
    return wq


def _check_scale(weight_scale: Any, c_out: int) -> np.ndarray:
    """The per-channel scale ``[c_out]`` (a scalar or ``[1]`` scale is per tensor: broadcast)."""
    check_plain_array("weight_scale", weight_scale)
    ws = np.asarray(weight_scale)
    if not _is_float(ws.dtype):
        raise InvalidProblem(
            f"weight_scale: expected a float array (f32, f16, bf16, f64), got dtype {ws.dtype}")
    dt = as_dtype(ws.dtype, name="weight_scale")
    if ws.shape in ((), (1,)):
        ws = np.full(c_out, ws.reshape(()), dt.numpy)
    if ws.shape != (c_out,):
        raise InvalidProblem(
            f"weight_scale: expected shape [C_out] = [{c_out}] (or a scalar or [1], per "
            f"tensor), got {ws.shape}")
    if not np.isfinite(ws).all():
        bad = _first_bad(~np.isfinite(ws))[0]
        raise InvalidProblem(f"weight_scale: expected finite values, got {ws[bad]} at index {bad}")
    return ws


def _check_bias(bias: Any, c_out: int, dt: DType) -> np.ndarray | None:
    """The bias ``[c_out]`` rounded to ``dt``, or None."""
    if bias is None:
        return None
    check_plain_array("bias", bias)
    b = np.asarray(bias)
    if b.ndim != 1 or not _is_real(b.dtype):
        raise InvalidProblem(
            f"bias: expected None or a 1-D real array [C_out] = [{c_out}], got "
            f"{type(bias).__name__} of dtype {b.dtype} and shape {b.shape}")
    if b.shape != (c_out,):
        raise InvalidProblem(f"bias: expected shape [C_out] = [{c_out}], got {b.shape}")
    with np.errstate(over="ignore"):  # reported below
        rounded = b.astype(dt.numpy)
    if not np.isfinite(rounded).all():
        bad = _first_bad(~np.isfinite(rounded))[0]
        raise InvalidProblem(
            f"bias: expected finite values within {dt.name}'s range (at most "
            f"{_float_max(dt):.6g}), got {b[bad]} at index {bad}")
    return rounded


class QuantizedLinear:
    """A W8A8 linear layer: owns its int8 weight, per-channel scale, bias and reusable
    activation scratch on one backend.

    Everything is checked when the layer is built (shapes, dtypes, finite scales and bias,
    the q range, K's exactness bound, the scheme's constants, and that the backend runs
    the dtype and scheme), so that a call can only fail on its input. ``weight_scale``
    sets the layer's dtype (TIn); a scalar or ``[1]`` scale is per tensor and broadcast;
    ``bias`` is rounded to TIn.

    ``scheme`` says how activations are quantized (:class:`~qlinear.ActivationScheme` or
    its name): ``"dynamic"`` per token (the default), ``"static"`` with ``input_scale``,
    ``"static_asym"`` with ``input_scale`` and ``input_zero_point``, ``"dynamic_asym"``
    per token with a zero point per row. ``q_min`` defaults to -127 for the symmetric
    schemes and -128 for the asymmetric ones. An asymmetric layer keeps its weight's
    column sums (int32) beside the weight.

    ``layer(x)`` takes ``x[..., K]`` of the layer's dtype and returns ``y[..., C_out]``:
    a numpy array in gives a numpy array out; a 2-D backend tensor in gives a backend
    tensor out (asynchronous on GPU backends). The scratch grows when M grows.

    Layers pickle (host copies of the weight, scale and bias, and the backend's
    registry name: unpickling builds the layer again on ``ql.backend(name)``) and
    :meth:`save` to / :meth:`load` from a safetensors file, without torch.
    """

    _PLAN_CACHE = 64

    def __init__(self, weight_q: Any, weight_scale: Any, bias: Any = None, *,
                 backend: Backend | str | None = None, q_min: int | None = None,
                 q_max: int = 127, scheme: ActivationScheme | str = ActivationScheme.DYNAMIC,
                 input_scale: Any = None, input_zero_point: Any = None):
        self._build(weight_q, weight_scale, bias, backend, q_min, q_max, scheme, input_scale,
                    input_zero_point)

    def _build(self, weight_q: Any, weight_scale: Any, bias: Any,
               backend: Backend | str | None, q_min: int | None, q_max: int,
               scheme: Any = ActivationScheme.DYNAMIC, input_scale: Any = None,
               input_zero_point: Any = None) -> None:
        be = get_backend(backend)
        wq = _check_weight_q(weight_q)
        c_out, k = wq.shape
        ws = _check_scale(weight_scale, c_out)
        dt = as_dtype(ws.dtype, name="weight_scale")
        b = _check_bias(bias, c_out, dt)
        # The scheme, q range and K's bound once, with a clear error; then whether the
        # backend runs this dtype and scheme (Unsupported now rather than at the first call).
        sch = as_scheme(scheme)
        q_lo = sch.default_q_min if q_min is None else q_min
        desc = QuantizedLinearDescriptor(0, c_out, k, dt, q_lo, q_max, sch)
        consts = scheme_constants(desc, input_scale, input_zero_point)
        empty_plan = QuantizedLinearPlan.select(be, desc)
        self.backend = be
        self.dtype: DType = dt
        self.out_features, self.in_features = c_out, k
        self.q_min, self.q_max = desc.q_min, desc.q_max
        self.scheme: ActivationScheme = desc.scheme
        self.input_scale, self.input_zero_point = consts
        self.weight_q = be.from_numpy(wq, readonly=True)
        self.weight_scale = be.from_numpy(ws, readonly=True)
        self.bias = None if b is None else be.from_numpy(b, readonly=True)
        self.weight_colsum = (be.from_numpy(weight_colsum(wq), readonly=True)
                              if self.scheme.asymmetric else None)
        self._plans: OrderedDict[int, QuantizedLinearPlan] = OrderedDict({0: empty_plan})
        # (act_q [cap, K], act_scale [cap], act_zp [cap] or None)
        self._scratch: tuple[Tensor, Tensor, Tensor | None] | None = None

    @classmethod
    def from_float(cls, weight: Any, bias: Any = None, *, backend: Backend | str | None = None,
                   dtype: DTypeLike | None = None, q_min: int | None = None,
                   q_max: int = 127, scheme: ActivationScheme | str = ActivationScheme.DYNAMIC,
                   input_scale: Any = None, input_zero_point: Any = None) -> QuantizedLinear:
        """Quantize a float ``weight[C_out, K]`` (and keep ``bias[C_out]``) into a layer.

        ``dtype`` is TIn of activations and outputs (default: the weight's float type);
        the activation scheme and its constants are as for the constructor."""
        wq, ws = quantize_weight(weight, dtype=dtype)
        return cls(wq, ws, bias, backend=backend, q_min=q_min, q_max=q_max, scheme=scheme,
                   input_scale=input_scale, input_zero_point=input_zero_point)

    def host_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Host copies of ``(weight_q [C_out, K] int8, weight_scale [C_out], bias [C_out]
        or None)``, as the layer holds them (waits for the device on GPU backends)."""
        be = self.backend
        return (be.to_numpy(self.weight_q), be.to_numpy(self.weight_scale),
                None if self.bias is None else be.to_numpy(self.bias))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the layer to ``path`` as one safetensors file (format in
        :mod:`qlinear.layer_io`); torch is not needed. The file is replaced atomically."""
        from .layer_io import save_layer

        save_layer(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *,
             backend: Backend | str | None = None) -> QuantizedLinear:
        """The layer saved at ``path`` (by :meth:`save`), on ``backend``. Its outputs are
        bit-identical to the saved layer's. A missing, truncated, corrupt or foreign file
        raises :class:`InvalidProblem` naming ``path``."""
        from .layer_io import load_layer

        return load_layer(path, backend=backend, cls=cls)

    def scheme_arguments(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this layer's activation quantization:
        ``q_min``, ``q_max``, ``scheme`` (its name), ``input_scale``, ``input_zero_point``."""
        return {"q_min": self.q_min, "q_max": self.q_max, "scheme": self.scheme.value,
                "input_scale": self.input_scale, "input_zero_point": self.input_zero_point}

    def __getstate__(self) -> dict[str, Any]:
        wq, ws, bias = self.host_arrays()
        return {"version": _STATE_VERSION, "backend": self.backend.name, "weight_q": wq,
                "weight_scale": ws, "bias": bias, **self.scheme_arguments()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        version = state.get("version")
        if version not in (1, _STATE_VERSION):
            raise InvalidProblem(
                f"state: expected a pickled QuantizedLinear of version 1 or {_STATE_VERSION}, "
                f"got version {version!r}")
        self._build(state["weight_q"], state["weight_scale"], state["bias"], state["backend"],
                    state["q_min"], state["q_max"], state.get("scheme", ActivationScheme.DYNAMIC),
                    state.get("input_scale"), state.get("input_zero_point"))

    def plan(self, m: int) -> QuantizedLinearPlan:
        """The (cached) plan for ``m`` rows."""
        plan = self._plans.get(m)
        if plan is None:
            desc = QuantizedLinearDescriptor(m, self.out_features, self.in_features, self.dtype,
                                             self.q_min, self.q_max, self.scheme)
            plan = QuantizedLinearPlan.select(self.backend, desc)
            self._plans[m] = plan
            if len(self._plans) > self._PLAN_CACHE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(m)
        return plan

    def scratch(self, m: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(act_q[m, K], act_scale[m], act_zp[m] or None)`` views of the layer's scratch,
        grown if needed (``act_zp``, int32, only with an asymmetric scheme)."""
        be = self.backend
        if self._scratch is None or self._scratch[1].shape[0] < m:
            cap = max(m, 1)
            self._scratch = (be.empty((cap, self.in_features), as_dtype("s8")),
                             be.empty((cap,), self.dtype),
                             be.empty((cap,), as_dtype("s32")) if self.scheme.asymmetric
                             else None)
        q, s, zp = self._scratch
        if q.shape[0] == m:
            return q, s, zp
        return be.narrow(q, m), be.narrow(s, m), None if zp is None else be.narrow(zp, m)

    def forward(self, x: Any, out: Any = None, stream: Any = None) -> Any:
        """Run on a backend tensor ``x[M, K]``; write ``out[M, C_out]`` (allocated if None)
        and return it. Asynchronous on GPU backends."""
        be = self.backend
        # A host array goes to the plan as it is: the plan's checks (and their cache) see
        # the caller's array, not a new wrapper per call.
        xt = x if type(x) is np.ndarray and be.host_memory else be.wrap(x, name="activation")
        if xt.ndim != 2:
            raise InvalidProblem(f"activation: expected a 2-D tensor [M, K], got shape {xt.shape}")
        m = xt.shape[0]
        if out is None:
            out = be.empty((m, self.out_features), self.dtype)
        act_q, act_scale, act_zp = self.scratch(m)
        self.plan(m).run(QuantizedLinearArgs(
            activation=xt, weight_q=self.weight_q, weight_scale=self.weight_scale, output=out,
            act_q_scratch=act_q, act_scale_scratch=act_scale, bias=self.bias,
            act_zp_scratch=act_zp, weight_colsum=self.weight_colsum,
            input_scale=self.input_scale, input_zero_point=self.input_zero_point),
            stream=stream)
        return out

    def __call__(self, x: Any) -> Any:
        """``y[..., C_out]`` for ``x[..., K]``: numpy in, numpy out; a backend tensor in,
        a backend tensor out. With K = 0, ``y`` is the bias broadcast (zeros without one)."""
        if not isinstance(x, np.ndarray):
            return self.forward(x)
        check_plain_array("x", x)  # a mask or matrix semantics would be lost in the copy
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise InvalidProblem(
                f"x: expected shape [..., {self.in_features}], got {x.shape}")
        if x.dtype != self.dtype.numpy:
            raise InvalidProblem(f"x: expected dtype {self.dtype.name}, got {x.dtype}")
        lead = x.shape[:-1]
        # M from the leading dims, not reshape(-1, K): -1 is ambiguous when K = 0.
        x2 = np.ascontiguousarray(x.reshape(int(np.prod(lead, dtype=np.int64)), self.in_features))
        be = self.backend
        if be.host_memory:
            y = np.empty((x2.shape[0], self.out_features), self.dtype.numpy)
            self.forward(x2, out=y)
        else:
            y = be.to_numpy(self.forward(be.from_numpy(x2)))
        return y.reshape(*lead, self.out_features)

    def __repr__(self) -> str:
        consts = ""
        if self.input_scale is not None:
            consts += f", input_scale={self.input_scale!r}"
        if self.input_zero_point is not None:
            consts += f", input_zero_point={self.input_zero_point}"
        return (f"QuantizedLinear(in_features={self.in_features}, "
                f"out_features={self.out_features}, "
                f"dtype={self.dtype.name}, bias={self.bias is not None}, "
                f"scheme={self.scheme.value!r}{consts}, "
                f"q=[{self.q_min}, {self.q_max}], backend={self.backend.name!r})")
