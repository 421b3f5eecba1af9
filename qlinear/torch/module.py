"""The :class:`QLinear` module: a W8A8 stand-in for ``nn.Linear`` that calls qlinear."""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
from torch import nn

from ..backends import Backend
from ..backends import backend as _get_backend
from ..dtypes import DTypeLike
from ..errors import InvalidProblem, Unsupported
from ..layer import QuantizedLinear, quantize_weight
from ..plans import QuantizedLinearPlan
from ..problem import QuantizedLinearDescriptor, check_int
from ..schemes import ActivationScheme, as_scheme
from ..validate import scheme_constants
from . import ops
from .convert import _TO_QL, _TO_TORCH, qlinear_dtype, torch_dtype
from .convert import from_numpy as _from_numpy
from .convert import host_copy as _host_copy
from .runner import backend_for, run_layer

__all__ = ["QLinear"]


class _InferenceOnly(torch.autograd.Function):
    """Carries a QLinear result into an autograd graph so that a backward pass fails
    loudly instead of silently dropping the gradient of everything upstream."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        raise Unsupported(ops.BACKWARD_MESSAGE)


_SCHEME_TEXT = {
    ActivationScheme.DYNAMIC: "per token",
    ActivationScheme.STATIC: "per tensor (static scale)",
    ActivationScheme.STATIC_ASYM: "per tensor (static scale and zero point)",
    ActivationScheme.DYNAMIC_ASYM: "per token with a zero point",
}

_TRACE_MESSAGE = (
    "QLinear: torch.jit.trace cannot record a W8A8 call (it runs outside torch, so the "
    "trace would replay a constant); use torch.compile or torch.export, which call it "
    "as the operator torch.ops.qlinear.linear, or run the model eagerly")


def _check_input(x: Any, in_features: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise InvalidProblem(f"input: expected a torch.Tensor, got {type(x).__name__}")
    if x.is_nested or x.layout != torch.strided:
        raise InvalidProblem(
            f"input: expected a dense strided tensor, got a "
            f"{'nested' if x.is_nested else str(x.layout)} one")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise InvalidProblem(
            f"input: expected shape [..., {in_features}], got {list(x.shape)}")
    if x.dtype not in _TO_QL:
        raise InvalidProblem(
            f"input: expected dtype float32, float16, bfloat16 or float64, got {x.dtype}")


class QLinear(nn.Module):
    """A W8A8 replacement for ``nn.Linear``: int8 per-output-channel weight, int8
    activations (dynamic per token by default), exact int32 accumulation, run by qlinear.

    Buffers (in ``state_dict``): ``weight_q`` ``[out_features, in_features]`` int8,
    ``weight_scale`` ``[out_features]`` and ``bias`` ``[out_features]`` (or None) of the
    layer's dtype; with a static scheme ``input_scale`` ``[1]`` (layer's dtype), and with
    ``"static_asym"`` ``input_zero_point`` ``[1]`` int32 (None otherwise). Build one with
    :meth:`from_linear`, :meth:`from_quantized`, :func:`quantize_linears` or
    :func:`load_compressed`; the constructor makes an empty one of the right shape to
    ``load_state_dict`` into.

    The backend keeps its own copy of the weight (made on the first call for each input
    dtype and device, and again after the buffers change), so the int8 weight is held
    twice, and the cpu backend adds its float32 ``[K, N]`` working copy. There is no
    ``weight`` attribute: code that reads ``linear.weight`` (such as torch's fused
    ``nn.TransformerEncoderLayer`` inference path) cannot use a QLinear;
    :func:`quantize_linears` turns that path off where it swaps, and a QLinear put into
    such a layer by hand needs ``torch.backends.mha.set_fastpath_enabled(False)``.

    Args:
        in_features, out_features, bias: as for ``nn.Linear``.
        dtype: the layer's float dtype (scales, bias, and the dtype it computes in for
            inputs of that dtype); default torch.float32.
        device: where the buffers live. Inputs are run on their own device (the
            backend's copy of the weight is made there), as ``.to(device)`` suggests.
        backend: a qlinear backend name or :class:`qlinear.Backend`; None (default)
            follows the input: the cpu backend for CPU tensors, cuda for CUDA tensors.
            A CPU tensor may run on any backend (through host copies on a GPU backend);
            a CUDA tensor needs the cuda backend.
        scheme, input_scale, input_zero_point, q_min, q_max: the activation scheme and
            its constants, as for :class:`qlinear.QuantizedLinear` (default: dynamic per
            token, -127..127).
    """

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    input_scale: torch.Tensor | None
    input_zero_point: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: DTypeLike | torch.dtype = torch.float32,
                 device: torch.device | str | None = None,
                 backend: None | str | Backend = None,
                 scheme: ActivationScheme | str = ActivationScheme.DYNAMIC,
                 input_scale: Any = None, input_zero_point: Any = None,
                 q_min: int | None = None, q_max: int = 127):
        super().__init__()
        tdt = torch_dtype(dtype)
        self.in_features = check_int("in_features", in_features, 0)
        self.out_features = check_int("out_features", out_features, 0)
        # The scheme, q range and K's exactness bound, now rather than at the first call.
        sch = as_scheme(scheme)
        desc = QuantizedLinearDescriptor(0, self.out_features, self.in_features,
                                         qlinear_dtype(tdt),
                                         sch.default_q_min if q_min is None else q_min, q_max,
                                         sch)
        self.scheme: ActivationScheme = desc.scheme
        self.q_min, self.q_max = desc.q_min, desc.q_max
        scale, zp = scheme_constants(desc, input_scale, input_zero_point)
        self.backend = backend.name if isinstance(backend, Backend) else backend
        if self.backend is not None:
            # Fail now, with the reason, not at the first call: the backend, and whether
            # it runs this dtype.
            QuantizedLinearPlan.select(_get_backend(self.backend), desc)
        self.register_buffer("weight_q", torch.zeros(
            (self.out_features, self.in_features), dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(
            self.out_features, dtype=tdt, device=device))
        self.register_buffer("bias", torch.zeros(self.out_features, dtype=tdt, device=device)
                             if bias else None)
        self.register_buffer("input_scale", None if scale is None else
                             torch.full((1,), scale, dtype=tdt, device=device))
        self.register_buffer("input_zero_point", None if zp is None else
                             torch.full((1,), zp, dtype=torch.int32, device=device))
        self._init_runtime()

    def _init_runtime(self) -> None:
        # Backend layers by input dtype, valid while the buffers keep the key they had.
        self._layers: dict[tuple[torch.dtype, torch.device], QuantizedLinear] = {}
        self._layers_key: Any = None
        self._lock = threading.Lock()
        self._op_key = ops.register(self)  # names this module to torch.ops.qlinear.linear

    def __getstate__(self) -> dict[str, Any]:
        # Backend layers hold device memory and the lock is not copyable: rebuild both;
        # a copy is another module, with its own operator key.
        state = self.__dict__.copy()
        for name in ("_layers", "_layers_key", "_lock", "_op_key"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_runtime()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, backend: None | str | Backend = None,
                    dtype: DTypeLike | torch.dtype | None = None, **scheme: Any) -> QLinear:
        """Quantize an ``nn.Linear`` (weight per output channel, symmetric, -127..127).

        ``dtype`` is the layer's dtype (default: the linear's weight dtype); the weight is
        quantized from its own values, not from a copy rounded to ``dtype``. ``scheme``:
        the keyword arguments ``scheme``, ``input_scale``, ``input_zero_point``,
        ``q_min``, ``q_max`` of the constructor."""
        w = linear.weight
        dt = qlinear_dtype(dtype if dtype is not None else w.dtype)
        q = cls(linear.in_features, linear.out_features, linear.bias is not None,
                dtype=_TO_TORCH[dt], device=w.device, backend=backend, **scheme)
        wq, ws = quantize_weight(_host_copy(w), dtype=dt)
        with torch.no_grad():
            q.weight_q.copy_(torch.from_numpy(wq))
            q.weight_scale.copy_(_from_numpy(ws))
            if linear.bias is not None:
                assert q.bias is not None
                q.bias.copy_(linear.bias.detach().to(q.bias.dtype))
                if not bool(torch.isfinite(q.bias).all()):
                    bad = int(torch.nonzero(~torch.isfinite(q.bias))[0, 0])
                    raise InvalidProblem(
                        f"bias: expected finite values within {q.bias.dtype}'s range, got "
                        f"{linear.bias[bad].item()} at index {bad}")
        q.train(linear.training)
        return q

    @classmethod
    def from_quantized(cls, weight_q: Any, weight_scale: Any, bias: Any = None, *,
                       backend: None | str | Backend = None,
                       device: torch.device | str | None = None, **scheme: Any) -> QLinear:
        """A QLinear holding an already quantized weight, as is (never re-quantized).

        ``weight_q`` ``[C_out, K]`` int8, ``weight_scale`` ``[C_out]`` (or a scalar or
        ``[1]``, per tensor) and ``bias`` ``[C_out]`` or None: numpy arrays or CPU tensors;
        the layer's dtype is the scale's. ``scheme``: as for :meth:`from_linear`.
        Everything is checked as :class:`qlinear.QuantizedLinear` checks it (on
        ``backend``, cpu when None), before the module exists."""
        arrays = [a if a is None or not isinstance(a, torch.Tensor) else _host_copy(a)
                  for a in (weight_q, weight_scale, bias)]
        layer = QuantizedLinear(*arrays, backend=backend or "cpu", **scheme)
        wq, ws, b = layer.host_arrays()
        q = cls(layer.in_features, layer.out_features, b is not None,
                dtype=_TO_TORCH[layer.dtype], device=device, backend=backend,
                **layer.scheme_arguments())
        with torch.no_grad():
            q.weight_q.copy_(torch.from_numpy(wq))
            q.weight_scale.copy_(_from_numpy(ws))
            if q.bias is not None and b is not None:
                q.bias.copy_(_from_numpy(b))
        return q

    @property
    def dtype(self) -> torch.dtype:
        """The layer's dtype (that of ``weight_scale``; follows ``.half()``, ``.to()``)."""
        return self.weight_scale.dtype

    def _buffers_key(self) -> tuple[Any, ...]:
        # _version counts in-place writes (load_state_dict, copy_), data_ptr catches .to():
        # either one means the backend copies are stale. Inference tensors (buffers made
        # under torch.inference_mode) have no version counter; load_state_dict still
        # clears the layers (_load_from_state_dict).
        return tuple(None if t is None else
                     (t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device)
                     for t in (self.weight_q, self.weight_scale, self.bias, self.input_scale,
                               self.input_zero_point))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._layers_key = None

    def backend_layer(self, dtype: DTypeLike | torch.dtype,
                      device: torch.device | str) -> QuantizedLinear:
        """The :class:`qlinear.QuantizedLinear` that runs inputs of ``dtype`` on ``device``
        (built on first use from the buffers; rebuilt when they change)."""
        tdt = torch_dtype(dtype)
        device = torch.device(device)
        key = self._buffers_key()
        if key != self._layers_key:
            self._layers = {}
            self._layers_key = key
        layer = self._layers.get((tdt, device))
        if layer is None:
            be = backend_for(self.backend, device)
            ws = self.weight_scale.detach().to(tdt)
            if not bool(torch.isfinite(ws).all() and (ws > 0).all()):
                raise InvalidProblem(
                    f"input: dtype {tdt} cannot hold this layer's weight scales (stored in "
                    f"{self.dtype}): they overflow or underflow to 0; quantize with "
                    f"dtype={tdt} or pass {self.dtype} inputs")
            bias = None if self.bias is None else _host_copy(self.bias.detach().to(tdt))
            layer = QuantizedLinear(_host_copy(self.weight_q), _host_copy(ws), bias,
                                    backend=be, **self._scheme_arguments())
            self._layers[(tdt, device)] = layer
        return layer

    def _scheme_arguments(self) -> dict[str, Any]:
        # The constants as the buffers hold them now (load_state_dict may have changed them).
        scale, zp = self.input_scale, self.input_zero_point
        return {"q_min": self.q_min, "q_max": self.q_max, "scheme": self.scheme,
                "input_scale": None if scale is None else float(scale.detach().double().item()),
                "input_zero_point": None if zp is None else int(zp.item())}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y[..., out_features]`` for ``x[..., in_features]`` (f32, f16, bf16; f64 where
        the backend runs it), of ``x``'s dtype and on ``x``'s device.

        Under ``torch.compile``/``torch.export`` the call is the operator
        ``torch.ops.qlinear.linear`` (same result, bit for bit); ``torch.jit.trace``
        raises :class:`qlinear.Unsupported`, as its trace would replay a constant."""
        if torch.jit.is_tracing():
            raise Unsupported(_TRACE_MESSAGE)
        _check_input(x, self.in_features)
        if ops.is_compiling():
            return ops.linear(x, self._op_key)
        y = self.run_eager(x)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _InferenceOnly.apply(x, y)
        return y

    def run_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The call itself, on a checked ``x``: no autograd, no compiler (what the
        operator runs)."""
        lead = x.shape[:-1]
        # M from the leading dims, not reshape(-1, K): -1 is ambiguous when K = 0.
        x2 = x.detach().reshape(math.prod(lead), self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        with self._lock:
            layer = self._layers.get((x.dtype, x.device))
            if layer is None or self._buffers_key() != self._layers_key:
                layer = self.backend_layer(x.dtype, x.device)
            y = self._run(layer, x2)
        return y.reshape(*lead, self.out_features)

    def _run(self, layer: QuantizedLinear, x2: torch.Tensor) -> torch.Tensor:
        return run_layer(layer, x2)

    def extra_repr(self) -> str:
        """What the layer is: features, bias, dtype, backend, and that it is W8A8."""
        dtype = str(self.dtype).replace("torch.", "")
        if self.backend is not None:
            be = self.backend
        else:
            be = f"auto ({self.weight_q.device.type})"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={dtype}, backend={be}, "
                f"W8A8: int8 weight per output channel, int8 activations "
                f"{_SCHEME_TEXT[self.scheme]} [{self.q_min}, {self.q_max}]")
