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

Compilers: under ``torch.compile`` and ``torch.export`` each QLinear call is one opaque
operator, ``torch.ops.qlinear.linear`` (:mod:`qlinear.torch.ops`), so a compiled model gives
the eager result bit for bit; ``torch.jit.trace`` raises :class:`qlinear.Unsupported`
(the call leaves torch, so a trace would replay a constant).

Limits: inference only (a backward pass through a :class:`QLinear` raises
:class:`qlinear.Unsupported`); one :class:`QLinear` serialises its calls (its scratch is
shared), and on CUDA, calls on different streams must be ordered by the caller for the
same reason.

Checkpoints: :func:`load_compressed` runs a compressed-tensors W8A8 checkpoint (as
llm-compressor writes it and vLLM serves it) in the float model's architecture, with the
checkpoint's own int8 weights, scales and activation scheme (dynamic or static, symmetric
or asymmetric).

Only this module imports torch; the qlinear core never does.
"""

from .checkpoint import load_compressed
from .convert import qlinear_dtype, to_numpy_view, torch_dtype
from .module import QLinear
from .swap import SkipFilter, quantize_linears

__all__ = ["QLinear", "quantize_linears", "load_compressed", "to_numpy_view", "qlinear_dtype",
           "torch_dtype", "SkipFilter"]
