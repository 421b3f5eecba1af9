"""How a :class:`~qlinear.torch.QLinear` call reaches a backend: which backend serves an
input's device, and the call itself on CPU (numpy views) or CUDA (zero-copy wrap)."""

from __future__ import annotations

import torch

from ..backends import Backend
from ..backends import backend as _get_backend
from ..errors import InvalidProblem
from ..layer import QuantizedLinear
from .convert import from_numpy, to_numpy_view

__all__ = ["backend_for", "run_layer"]


def backend_for(name: str | None, device: torch.device) -> Backend:
    """The backend that runs inputs on ``device`` for a module whose backend is ``name``
    (None: follow the input, cpu for CPU tensors and cuda for CUDA tensors)."""
    if name is not None:
        be = _get_backend(name)
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


def run_layer(layer: QuantizedLinear, x2: torch.Tensor) -> torch.Tensor:
    """``y[M, C_out]`` of ``layer`` for a contiguous ``x2[M, K]``, on ``x2``'s device."""
    m = x2.shape[0]
    be = layer.backend
    if x2.device.type == "cpu":
        if be.torch_device_type == "cpu":
            y = torch.empty((m, layer.out_features), dtype=x2.dtype)
            if x2.dtype == torch.bfloat16:
                layer.forward(to_numpy_view(x2), out=to_numpy_view(y))
            else:
                layer.forward(x2.numpy(), out=y.numpy())
            return y
        # Another backend on host tensors: its own upload/download, like numpy callers.
        return from_numpy(layer(to_numpy_view(x2)))
    # CUDA: the backend wraps torch's memory (DLPack / __cuda_array_interface__) and
    # enqueues on torch's current stream, so torch's caching allocator sees the
    # same ordering as for its own kernels (x2 may be freed right after this call).
    y = torch.empty((m, layer.out_features), dtype=x2.dtype, device=x2.device)
    stream = torch.cuda.current_stream(x2.device)
    layer.forward(be.wrap(x2, name="input"), out=be.wrap(y, name="output"), stream=stream)
    return y
