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
from . import ops
from .convert import _TO_QL, _TO_TORCH, qlinear_dtype, to_numpy_view, torch_dtype
from .convert import from_numpy as _from_numpy
from .convert import host_copy as _host_copy

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
    """A W8A8 replacement for ``nn.Linear``: int8 per-output-channel weight, dynamic
    per-token int8 activations, exact int32 accumulation, run by qlinear.

    Buffers (in ``state_dict``): ``weight_q`` ``[out_features, in_features]`` int8,
    ``weight_scale`` ``[out_features]`` and ``bias`` ``[out_features]`` (or None) of the
    layer's dtype. Build one with :meth:`from_linear` or :func:`quantize_linears`; the
    constructor makes an empty one of the right shape to ``load_state_dict`` into.

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
    """

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: DTypeLike | torch.dtype = torch.float32,
                 device: torch.device | str | None = None,
                 backend: None | str | Backend = None):
        super().__init__()
        tdt = torch_dtype(dtype)
        self.in_features = check_int("in_features", in_features, 0)
        self.out_features = check_int("out_features", out_features, 0)
        self.q_min, self.q_max = -127, 127
        # K's exactness bound, now rather than at the first call.
        desc = QuantizedLinearDescriptor(0, self.out_features, self.in_features,
                                         qlinear_dtype(tdt), self.q_min, self.q_max)
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
                    dtype: DTypeLike | torch.dtype | None = None) -> QLinear:
        """Quantize an ``nn.Linear`` (weight per output channel, symmetric, -127..127).

        ``dtype`` is the layer's dtype (default: the linear's weight dtype); the weight is
        quantized from its own values, not from a copy rounded to ``dtype``."""
        w = linear.weight
        dt = qlinear_dtype(dtype if dtype is not None else w.dtype)
        q = cls(linear.in_features, linear.out_features, linear.bias is not None,
                dtype=_TO_TORCH[dt], device=w.device, backend=backend)
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

    @property
    def dtype(self) -> torch.dtype:
        """The layer's dtype (that of ``weight_scale``; follows ``.half()``, ``.to()``)."""
        return self.weight_scale.dtype

    def _backend_for(self, device: torch.device) -> Backend:
        if self.backend is not None:
            be = _get_backend(self.backend)
            if device.type != "cpu" and be.torch_device_type != device.type:
                raise InvalidProblem(
                    f"input: expected a CPU tensor or a tensor for backend {be.name!r}, got one "
                    f"on {device}; quantize with backend={device.type!r} (or backend=None, which "
                    f"follows the input's device)")
        elif device.type in ("cpu", "cuda"):
            be = _get_backend(device.type)
        else:
            raise InvalidProblem(f"input: expected a CPU or CUDA tensor, got one on {device}")
        if device.type == "cuda" and be.device_id != str(device):
            raise InvalidProblem(
                f"input: expected a tensor on {be.device_id}, where qlinear's cuda backend "
                f"runs, got one on {device}")
        return be

    def _buffers_key(self) -> tuple[Any, ...]:
        # _version counts in-place writes (load_state_dict, copy_), data_ptr catches .to():
        # either one means the backend copies are stale. Inference tensors (buffers made
        # under torch.inference_mode) have no version counter; load_state_dict still
        # clears the layers (_load_from_state_dict).
        return tuple(None if t is None else
                     (t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device)
                     for t in (self.weight_q, self.weight_scale, self.bias))

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
            be = self._backend_for(device)
            ws = self.weight_scale.detach().to(tdt)
            if not bool(torch.isfinite(ws).all() and (ws > 0).all()):
                raise InvalidProblem(
                    f"input: dtype {tdt} cannot hold this layer's weight scales (stored in "
                    f"{self.dtype}): they overflow or underflow to 0; quantize with "
                    f"dtype={tdt} or pass {self.dtype} inputs")
            bias = None if self.bias is None else _host_copy(self.bias.detach().to(tdt))
            layer = QuantizedLinear(_host_copy(self.weight_q), _host_copy(ws), bias,
                                    backend=be, q_min=self.q_min, q_max=self.q_max)
            self._layers[(tdt, device)] = layer
        return layer

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
        m = x2.shape[0]
        be = layer.backend
        if x2.device.type == "cpu":
            if be.torch_device_type == "cpu":
                y = torch.empty((m, self.out_features), dtype=x2.dtype)
                if x2.dtype == torch.bfloat16:
                    layer.forward(to_numpy_view(x2), out=to_numpy_view(y))
                else:
                    layer.forward(x2.numpy(), out=y.numpy())
                return y
            # Another backend on host tensors: its own upload/download, like numpy callers.
            return _from_numpy(layer(to_numpy_view(x2)))
        # CUDA: the backend wraps torch's memory (DLPack / __cuda_array_interface__) and
        # enqueues on torch's current stream, so torch's caching allocator sees the
        # same ordering as for its own kernels (x2 may be freed right after this call).
        y = torch.empty((m, self.out_features), dtype=x2.dtype, device=x2.device)
        stream = torch.cuda.current_stream(x2.device)
        layer.forward(be.wrap(x2, name="input"), out=be.wrap(y, name="output"), stream=stream)
        return y

    def extra_repr(self) -> str:
        """What the layer is: features, bias, dtype, backend, and that it is W8A8."""
        dtype = str(self.dtype).replace("torch.", "")
        if self.backend is not None:
            be = self.backend
        else:
            be = f"auto ({self.weight_q.device.type})"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={dtype}, backend={be}, "
                f"W8A8: int8 weight per output channel, int8 activations per token "
                f"[{self.q_min}, {self.q_max}]")
