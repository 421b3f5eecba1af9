"""The ``qlinear::linear`` torch operator: how a :class:`~qlinear.torch.QLinear` call
appears to ``torch.compile`` and ``torch.export``.

A QLinear leaves torch (numpy views on the CPU, qlinear's own kernels elsewhere), which
a compiler cannot look into. Under compilation the call is one opaque custom operator,
``torch.ops.qlinear.linear(x, key)``: ``key`` names the live QLinear (a process-wide
counter, not a tensor); its fake implementation gives the output's shape, dtype and
device, and its real one runs the module's eager path, so a compiled model gives the
eager result bit for bit. Its backward is another operator that raises
:class:`qlinear.Unsupported` when run, so compiling with inputs that require grad works
and only a backward pass fails, as in eager mode.
"""

import itertools
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InvalidProblem, Unsupported

__all__ = ["register", "linear", "is_compiling", "BACKWARD_MESSAGE"]

BACKWARD_MESSAGE = (
    "QLinear: backward is not supported (W8A8 layers are inference-only); run the model "
    "under torch.no_grad()/torch.inference_mode(), or keep the layers you train as "
    "nn.Linear (quantize_linears(..., skip=...))")

_modules: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_keys = itertools.count(1)
_lock = threading.Lock()


def register(module: Any) -> int:
    """A new key naming ``module`` (held weakly) for :func:`linear`."""
    with _lock:
        key = next(_keys)
        _modules[key] = module
    return key


def _module(key: int) -> Any:
    mod = _modules.get(key)
    if mod is None:
        raise InvalidProblem(f"qlinear::linear: expected the key of a live QLinear, got {key}")
    return mod


def _is_compiling_fallback() -> bool:
    return False


#: Whether torch.compile / torch.export is tracing the caller (False on old torch).
is_compiling: Callable[[], bool] = getattr(
    torch.compiler, "is_compiling", getattr(torch._dynamo, "is_compiling",
                                            _is_compiling_fallback))


def _run(x: torch.Tensor, key: int) -> torch.Tensor:
    return _module(key).run_eager(x)


if hasattr(torch.library, "custom_op"):
    @torch.library.custom_op("qlinear::linear", mutates_args=())
    def _linear_op(x: torch.Tensor, key: int) -> torch.Tensor:
        return _run(x, key)

    @_linear_op.register_fake
    def _linear_fake(x: torch.Tensor, key: int) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], _module(key).out_features))

    @torch.library.custom_op("qlinear::linear_backward", mutates_args=())
    def _backward_op(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise Unsupported(BACKWARD_MESSAGE)

    @_backward_op.register_fake
    def _backward_fake(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return _backward_op(grad, x), None

    _linear_op.register_autograd(_backward, setup_context=_setup_context)

    def linear(x: torch.Tensor, key: int) -> torch.Tensor:
        """``y[..., out_features]`` of the QLinear named by ``key``, as one operator."""
        out: torch.Tensor = _linear_op(x, key)
        return out
else:  # torch < 2.4: no custom operators; keep the call out of the graph instead
    linear = torch.compiler.disable(_run)
