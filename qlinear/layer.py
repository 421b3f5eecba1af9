"""Weight quantization and the high-level layer that owns weights and scratch."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from .backends import Backend
from .backends import backend as get_backend
from .dtypes import DType, DTypeLike, as_dtype, f64
from .errors import InvalidProblem
from .plans import QuantizedLinearPlan
from .problem import QuantizedLinearArgs, QuantizedLinearDescriptor
from .tensors import Tensor

__all__ = ["quantize_weight", "QuantizedLinear"]


def quantize_weight(weight: Any, *, dtype: DTypeLike | None = None,
                    q_max: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8 quantization of a float ``weight[C_out, K]``.

    ``weight_scale[n] = max_k |weight[n, k]| / q_max`` (in f32, f64 for f64), stored in
    ``dtype`` (default: the weight's own float type); all-zero rows get scale 1.
    ``weight_q[n, k] = clamp(round_half_to_even(weight[n, k] / weight_scale[n]), -q_max, q_max)``.

    Returns ``(weight_q[C_out, K] int8, weight_scale[C_out] dtype)`` as numpy arrays.
    """
    w = np.asarray(weight)
    if w.ndim != 2:
        raise InvalidProblem(f"weight: expected a 2-D array [C_out, K], got shape {w.shape}")
    dt = as_dtype(dtype if dtype is not None else w.dtype, name="dtype")
    if not dt.is_float:
        raise InvalidProblem(f"dtype: expected a float type (f32, f16, bf16, f64), got {dt.name}")
    if not (isinstance(q_max, int) and 0 < q_max <= 127):
        raise InvalidProblem(f"q_max: expected an integer in 1..127, got {q_max!r}")
    ct = np.float64 if dt == f64 else np.float32
    wc = w.astype(ct)
    if not np.isfinite(wc).all():
        bad = int(np.argwhere(~np.isfinite(wc))[0][0])
        raise InvalidProblem(f"weight: expected finite values, got NaN or Inf in row {bad}")
    amax = np.abs(wc).max(axis=1) if wc.shape[1] else np.zeros(wc.shape[0], ct)
    scale = (amax / ct(q_max)).astype(dt.numpy)
    scale[scale == 0] = 1
    q = np.clip(np.rint(wc / scale.astype(ct)[:, None]), -q_max, q_max).astype(np.int8)
    return q, scale


class QuantizedLinear:
    """A W8A8 linear layer: owns its int8 weight, per-channel scale, bias and reusable
    activation scratch on one backend.

    ``layer(x)`` takes ``x[..., K]`` of the layer's dtype and returns ``y[..., C_out]``:
    a numpy array in gives a numpy array out; a 2-D backend tensor in gives a backend
    tensor out (asynchronous on GPU backends). The scratch grows when M grows.
    """

    _PLAN_CACHE = 64

    def __init__(self, weight_q: Any, weight_scale: Any, bias: Any = None, *,
                 backend: Backend | str | None = None, q_min: int = -127, q_max: int = 127):
        self.backend = get_backend(backend)
        wq = np.asarray(weight_q)
        ws = np.asarray(weight_scale)
        if wq.dtype != np.int8 or wq.ndim != 2:
            raise InvalidProblem(
                f"weight_q: expected a 2-D int8 array, got {wq.ndim}-D {wq.dtype}")
        self.dtype: DType = as_dtype(ws.dtype, name="weight_scale")
        self.out_features, self.in_features = wq.shape
        # Validates q range and K once, with a clear error.
        QuantizedLinearDescriptor(0, self.out_features, self.in_features, self.dtype, q_min, q_max)
        self.q_min, self.q_max = q_min, q_max
        be = self.backend
        self.weight_q = be.from_numpy(wq, readonly=True)
        self.weight_scale = be.from_numpy(ws, readonly=True)
        self.bias = None if bias is None else be.from_numpy(
            np.asarray(bias).astype(self.dtype.numpy), readonly=True)
        self._plans: OrderedDict[int, QuantizedLinearPlan] = OrderedDict()
        self._scratch: tuple[Tensor, Tensor] | None = None  # (act_q [cap, K], act_scale [cap])

    @classmethod
    def from_float(cls, weight: Any, bias: Any = None, *, backend: Backend | str | None = None,
                   dtype: DTypeLike | None = None, q_min: int = -127,
                   q_max: int = 127) -> QuantizedLinear:
        """Quantize a float ``weight[C_out, K]`` (and keep ``bias[C_out]``) into a layer.

        ``dtype`` is TIn of activations and outputs (default: the weight's float type)."""
        wq, ws = quantize_weight(weight, dtype=dtype)
        return cls(wq, ws, bias, backend=backend, q_min=q_min, q_max=q_max)

    def plan(self, m: int) -> QuantizedLinearPlan:
        """The (cached) plan for ``m`` rows."""
        plan = self._plans.get(m)
        if plan is None:
            desc = QuantizedLinearDescriptor(m, self.out_features, self.in_features, self.dtype,
                                             self.q_min, self.q_max)
            plan = QuantizedLinearPlan.select(self.backend, desc)
            self._plans[m] = plan
            if len(self._plans) > self._PLAN_CACHE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(m)
        return plan

    def scratch(self, m: int) -> tuple[Tensor, Tensor]:
        """``(act_q[m, K], act_scale[m])`` views of the layer's scratch, grown if needed."""
        be = self.backend
        if self._scratch is None or self._scratch[1].shape[0] < m:
            cap = max(m, 1)
            self._scratch = (be.empty((cap, self.in_features), as_dtype("s8")),
                             be.empty((cap,), self.dtype))
        q, s = self._scratch
        if q.shape[0] == m:
            return q, s
        return be.narrow(q, m), be.narrow(s, m)

    def forward(self, x: Any, out: Any = None, stream: Any = None) -> Any:
        """Run on a backend tensor ``x[M, K]``; write ``out[M, C_out]`` (allocated if None)
        and return it. Asynchronous on GPU backends."""
        be = self.backend
        xt = be.wrap(x, name="activation")
        if xt.ndim != 2:
            raise InvalidProblem(f"activation: expected a 2-D tensor [M, K], got shape {xt.shape}")
        m = xt.shape[0]
        if out is None:
            out = be.empty((m, self.out_features), self.dtype)
        act_q, act_scale = self.scratch(m)
        self.plan(m).run(QuantizedLinearArgs(
            activation=xt, weight_q=self.weight_q, weight_scale=self.weight_scale, output=out,
            act_q_scratch=act_q, act_scale_scratch=act_scale, bias=self.bias), stream=stream)
        return out

    def __call__(self, x: Any) -> Any:
        """``y[..., C_out]`` for ``x[..., K]``: numpy in, numpy out; a backend tensor in,
        a backend tensor out."""
        if not isinstance(x, np.ndarray):
            return self.forward(x)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise InvalidProblem(
                f"x: expected shape [..., {self.in_features}], got {x.shape}")
        if x.dtype != self.dtype.numpy:
            raise InvalidProblem(f"x: expected dtype {self.dtype.name}, got {x.dtype}")
        lead = x.shape[:-1]
        x2 = np.ascontiguousarray(x.reshape(-1, self.in_features))
        be = self.backend
        if be.host_memory:
            y = np.empty((x2.shape[0], self.out_features), self.dtype.numpy)
            self.forward(x2, out=y)
        else:
            y = be.to_numpy(self.forward(be.from_numpy(x2)))
        return y.reshape(*lead, self.out_features)

    def __repr__(self) -> str:
        return (f"QuantizedLinear(in_features={self.in_features}, "
                f"out_features={self.out_features}, "
                f"dtype={self.dtype.name}, bias={self.bias is not None}, "
                f"q=[{self.q_min}, {self.q_max}], backend={self.backend.name!r})")
