"""The optional PyTorch adapter: swap ``nn.Linear`` for W8A8 modules that call qlinear.

Example::

    import torch, qlinear.torch as qlt
    model = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(),
                                torch.nn.Linear(1536, 384)).eval()
    qlt.quantize_linears(model)              # 2: the count swapped
    with torch.inference_mode():
        y = model(torch.randn(4, 16, 384))   # f32 in, f32 out, W8A8 inside

What happens inside a :class:`QLinear`:

* the weight is quantized once, per output channel, by :func:`qlinear.quantize_weight`;
  the int8 weight, its scales and the bias are *buffers*, so ``state_dict()`` holds
  them (and no float weight) and ``load_state_dict`` restores a quantized model;
* each call runs one :class:`qlinear.QuantizedLinear` (per-token dynamic int8
  activations, exact int32 GEMM, dequantization + bias, see the numerical contract),
  which keeps its scratch between calls and grows it with the number of tokens;
* CPU tensors go through numpy views of the torch memory (no copy when the input is
  contiguous; the output is written in place into the returned tensor); CUDA tensors
  go zero-copy through the cuda backend's ``wrap`` (DLPack / ``__cuda_array_interface__``)
  and run on ``torch.cuda.current_stream()``.

Input dtypes: f32, f16, bf16 (and f64 where the backend has it). The output has the
input's dtype and device, as with torchao's dynamic int8 quantization: an input whose
dtype differs from the layer's runs a second backend layer, built on first use, with
the same int8 weight and the scales and bias rounded to the input's dtype.

CPU threads: torch's OpenMP pool and numpy's BLAS pool (which the cpu backend uses)
take turns on the same cores, and each spin-waits for a while after its work; on a
machine with few cores, limit one of them (``OPENBLAS_NUM_THREADS=1`` or
``torch.set_num_threads(1)``), or a model mixing float and W8A8 layers runs several
times slower than either alone.

Limits: inference only (a backward pass through a :class:`QLinear` raises
:class:`qlinear.Unsupported`); not traceable by ``torch.compile``/TorchScript (the call
leaves torch); one :class:`QLinear` serialises its calls (its scratch is shared), and on
CUDA, calls on different streams must be ordered by the caller for the same reason.

Only this module imports torch; the qlinear core never does.
"""

from __future__ import annotations

import fnmatch
import threading
from typing import Callable, Collection, Union

import ml_dtypes
import numpy as np
import torch
from torch import nn

from .backends import Backend, backend as _get_backend
from .dtypes import DType, as_dtype, bf16, f16, f32, f64
from .errors import InvalidProblem, Unsupported
from .layer import QuantizedLinear, quantize_weight

__all__ = ["QLinear", "quantize_linears", "to_numpy_view", "qlinear_dtype", "torch_dtype"]

_TO_QL = {torch.float32: f32, torch.float16: f16, torch.bfloat16: bf16, torch.float64: f64}
_TO_TORCH = {v: k for k, v in _TO_QL.items()}

SkipFilter = Union[None, str, Callable[[str, nn.Module], bool], Collection[str]]


def qlinear_dtype(dtype) -> DType:
    """The qlinear :class:`~qlinear.DType` for a torch float dtype (or anything
    :func:`qlinear.dtypes.as_dtype` takes); raises :class:`InvalidProblem` otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _TO_QL:
            raise InvalidProblem(
                f"dtype: expected torch.float32, float16, bfloat16 or float64, got {dtype}")
        return _TO_QL[dtype]
    d = as_dtype(dtype, name="dtype")
    if not d.is_float:
        raise InvalidProblem(f"dtype: expected a float type (f32, f16, bf16, f64), got {d.name}")
    return d


def torch_dtype(dtype) -> torch.dtype:
    """The torch dtype for a qlinear float dtype (or a torch dtype, returned as is)."""
    return _TO_TORCH[qlinear_dtype(dtype)]


def to_numpy_view(t: torch.Tensor) -> np.ndarray:
    """A numpy array sharing ``t``'s memory (a CPU tensor; bf16 as ``ml_dtypes.bfloat16``).

    Never copies: the array is a view, so writes to it are writes to ``t``."""
    t = t.detach()
    if t.device.type != "cpu":
        raise InvalidProblem(f"tensor: expected a CPU tensor, got one on {t.device}")
    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16: reinterpret the 16-bit words, then relabel them.
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _host_copy(t: torch.Tensor) -> np.ndarray:
    return to_numpy_view(t.detach().to("cpu", copy=True).contiguous())


class _InferenceOnly(torch.autograd.Function):
    """Carries a QLinear result into an autograd graph so that a backward pass fails
    loudly instead of silently dropping the gradient of everything upstream."""

    @staticmethod
    def forward(ctx, x, y):
        return y

    @staticmethod
    def backward(ctx, grad):
        raise Unsupported(
            "QLinear: backward is not supported (W8A8 layers are inference-only); "
            "run the model under torch.no_grad()/torch.inference_mode(), or keep the "
            "layers you train as nn.Linear (quantize_linears(..., skip=...))")


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

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype=torch.float32, device=None,
                 backend: Union[None, str, Backend] = None):
        super().__init__()
        tdt = torch_dtype(dtype)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.q_min, self.q_max = -127, 127
        self.backend = backend.name if isinstance(backend, Backend) else backend
        if self.backend is not None:
            _get_backend(self.backend)  # fail now, with the reason, not at the first call
        self.register_buffer("weight_q", torch.zeros(
            (self.out_features, self.in_features), dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(
            self.out_features, dtype=tdt, device=device))
        self.register_buffer("bias", torch.zeros(self.out_features, dtype=tdt, device=device)
                             if bias else None)
        self._init_runtime()

    def _init_runtime(self):
        # Backend layers by input dtype, valid while the buffers keep the key they had.
        self._layers: dict = {}
        self._layers_key = None
        self._lock = threading.Lock()

    def __getstate__(self):
        # Backend layers hold device memory and the lock is not copyable: rebuild both.
        state = self.__dict__.copy()
        for name in ("_layers", "_layers_key", "_lock"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._init_runtime()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, backend: Union[None, str, Backend] = None,
                    dtype=None) -> "QLinear":
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
                q.bias.copy_(linear.bias.detach().to(q.bias.dtype))
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

    def _buffers_key(self):
        # _version counts in-place writes (load_state_dict, copy_), data_ptr catches .to():
        # either one means the backend copies are stale. Inference tensors (buffers made
        # under torch.inference_mode) have no version counter; load_state_dict still
        # clears the layers (_load_from_state_dict).
        return tuple(None if t is None else
                     (t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device)
                     for t in (self.weight_q, self.weight_scale, self.bias))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._layers_key = None

    def backend_layer(self, dtype, device) -> QuantizedLinear:
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
        the backend runs it), of ``x``'s dtype and on ``x``'s device."""
        if not isinstance(x, torch.Tensor):
            raise InvalidProblem(f"input: expected a torch.Tensor, got {type(x).__name__}")
        if x.is_nested or x.layout != torch.strided:
            raise InvalidProblem(
                f"input: expected a dense strided tensor, got a "
                f"{'nested' if x.is_nested else str(x.layout)} one")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise InvalidProblem(
                f"input: expected shape [..., {self.in_features}], got {list(x.shape)}")
        if x.dtype not in _TO_QL:
            raise InvalidProblem(
                f"input: expected dtype float32, float16, bfloat16 or float64, got {x.dtype}")
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        with self._lock:
            layer = self._layers.get((x.dtype, x.device))
            if layer is None or self._buffers_key() != self._layers_key:
                layer = self.backend_layer(x.dtype, x.device)
            y = self._run(layer, x2)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _InferenceOnly.apply(x, y)
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


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _skip_fn(skip: SkipFilter) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, mod: False
    if callable(skip):
        return skip
    patterns = [skip] if isinstance(skip, str) else list(skip)
    for p in patterns:
        if not isinstance(p, str):
            raise InvalidProblem(
                f"skip: expected a callable (name, module) -> bool, or names / glob patterns "
                f"(str), got an element {p!r}")

    def matches(name: str, mod: nn.Module) -> bool:
        # A pattern naming a parent ("encoder.layers.0") skips every linear below it.
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatchcase(pre, p) for p in patterns for pre in prefixes)

    return matches


def _swappable(mod: nn.Module) -> bool:
    # MultiheadAttention's out_proj (NonDynamicallyQuantizableLinear) is never called as a
    # module: attention reads its .weight directly, so a swap would break it (torchao skips
    # it too). A subclass with its own forward would lose that forward.
    return (isinstance(mod, nn.Linear)
            and not isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear)
            and type(mod).forward is nn.Linear.forward)


def _no_op_pre_hook(module, args):
    return None


def _leave_fast_paths(root: nn.Module, swapped: set) -> None:
    """nn.TransformerEncoder(Layer)'s fused inference path reads ``linear1.weight``
    directly and would bypass (or trip over) a QLinear. Torch leaves that path for a
    layer with forward hooks on any submodule, and for a stack whose
    ``use_nested_tensor`` is False; both are set where a linear was swapped."""
    for name, mod in root.named_modules():
        if isinstance(mod, nn.TransformerEncoderLayer):
            for sub in mod.modules():
                if id(sub) in swapped and not getattr(sub, "_qlinear_fastpath_hook", False):
                    sub.register_forward_pre_hook(_no_op_pre_hook)
                    sub._qlinear_fastpath_hook = True
        elif isinstance(mod, nn.TransformerEncoder):
            if any(id(sub) in swapped for sub in mod.modules()):
                mod.use_nested_tensor = False


def quantize_linears(module: nn.Module, backend: Union[None, str, Backend] = None, *,
                     skip: SkipFilter = None, dtype=None) -> int:
    """Replace, in place, every ``nn.Linear`` inside ``module`` by a :class:`QLinear`;
    return how many were replaced.

    Args:
        module: the model (it may itself be an ``nn.Linear``: then it cannot be replaced
            in place, and :class:`InvalidProblem` says to use :meth:`QLinear.from_linear`).
        backend: qlinear backend name or object for every swapped layer; None follows
            each input's device (cpu backend for CPU tensors, cuda for CUDA tensors).
        skip: which linears to keep in float: a callable ``(qualified_name, module) -> bool``
            (True keeps it), or a name / glob pattern / collection of them, matched
            against the linear's qualified name and every parent's (``"head"``,
            ``"encoder.layers.0"``, ``"*.linear2"``).
        dtype: the dtype of the quantized layers (scales, bias); default each linear's
            weight dtype. Inputs of other float dtypes still work (see :class:`QLinear`).

    Not swapped, whatever ``skip`` says: ``nn.MultiheadAttention``'s ``out_proj`` (attention
    reads its weight directly, as torchao also notes) and subclasses of ``nn.Linear`` that
    override ``forward``. Where a linear inside ``nn.TransformerEncoderLayer`` is swapped,
    that layer's fused inference fast path is turned off so that the QLinear is called.
    """
    if not isinstance(module, nn.Module):
        raise InvalidProblem(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if _swappable(module):
        raise InvalidProblem(
            "module: got an nn.Linear itself, which cannot be replaced in place; "
            "use QLinear.from_linear(linear) or pass its parent module")
    if dtype is not None:
        dtype = qlinear_dtype(dtype)
    if backend is not None:
        _get_backend(backend)  # an unavailable backend fails before anything is swapped
    should_skip = _skip_fn(skip)
    # Every place a linear sits (a module shared by two parents appears twice), so that
    # a shared linear becomes one shared QLinear, replaced everywhere it is used.
    todo = [name for name, mod in module.named_modules(remove_duplicate=False)
            if _swappable(mod) and not should_skip(name, mod)]
    made: dict = {}
    for name in todo:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        linear = getattr(parent, attr)
        q = made.get(id(linear))
        if q is None:
            q = made[id(linear)] = QLinear.from_linear(linear, backend=backend, dtype=dtype)
        setattr(parent, attr, q)
    if made:
        _leave_fast_paths(module, {id(q) for q in made.values()})
    return len(made)
