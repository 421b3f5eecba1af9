"""Quantize a small transformer encoder to W8A8 with qlinear and compare it to the float model.

Builds the model offline (random weights from a fixed seed), swaps every ``nn.Linear``
for a ``qlinear.torch.QLinear`` with ``quantize_linears``, then prints, side by side,
the median forward time of both models, the quantized model's fidelity (cosine per
sequence against the float model, largest absolute error) and the size of each
``state_dict``.

    python examples/quantize_model.py                   # CPU tensors, cpu backend
    python examples/quantize_model.py --device cuda     # CUDA tensors, cuda backend

Needs torch (``pip install torch==2.13.0`` gives the CPU wheel).
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import sys
import time

import torch
from torch import nn

import qlinear.torch as qlt


class Encoder(nn.Module):
    """Input projection, a stack of post-norm transformer encoder layers, output head."""

    def __init__(self, d_model: int, heads: int, ff: int, layers: int):
        super().__init__()
        self.embed = nn.Linear(d_model, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, activation="gelu",
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, d_model)

    def forward(self, x):
        """``x[batch, seq, d_model]`` -> same shape."""
        return self.head(self.encoder(self.embed(x)))


def median_ms(fn, runs: int, sync) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``runs`` runs, after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def state_dict_mb(model: nn.Module) -> float:
    """Bytes of ``torch.save(model.state_dict())``, in MB."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes / 1e6


def main(argv=None) -> int:
    """Run the comparison; return the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="torch device (cpu or cuda)")
    p.add_argument("--backend", default=None, help="qlinear backend (default: follow the device)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(a.seed)
    d = a.d_model
    fmodel = Encoder(d, max(1, d // 64), 4 * d, a.layers).eval().to(device, dtype)
    qmodel = copy.deepcopy(fmodel)
    n = qlt.quantize_linears(qmodel, backend=a.backend)
    kept = sum(type(m) is nn.modules.linear.NonDynamicallyQuantizableLinear
               for m in qmodel.modules())
    x = torch.randn(a.batch, a.seq, d, generator=torch.Generator().manual_seed(a.seed + 1))
    x = x.to(device, dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        yf = fmodel(x).double()
        yq = qmodel(x).double()
        t_float = median_ms(lambda: fmodel(x), a.runs, sync)
        t_quant = median_ms(lambda: qmodel(x), a.runs, sync)
    cos = torch.nn.functional.cosine_similarity(yq.flatten(1), yf.flatten(1), dim=1)
    err = float((yq - yf).abs().max())
    backend = qmodel.embed.backend_layer(dtype, device).backend

    print(f"qlinear torch example: {a.layers}-layer transformer encoder, d_model {d}, "
          f"{a.batch} sequences x {a.seq} tokens, {a.dtype} on {device}")
    print(f"quantize_linears swapped {n} nn.Linear for QLinear (backend {backend.name}: "
          f"{backend.device_name}); {kept} attention out_proj kept in float")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    pools = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    if device.type == "cpu" and torch.get_num_threads() > 1 and not any(map(os.environ.get, pools)):
        # Measured on 2 cores: the quantized model 3-7x slower than with one pool limited.
        print("note: torch's OpenMP threads and numpy's BLAS threads (the cpu backend) take "
              "turns on the same cores and each spin-waits for the other; on few cores set "
              "OPENBLAS_NUM_THREADS=1 (or OMP_NUM_THREADS=1) for representative timings")
    print()
    rows = [
        ("", f"float ({a.dtype})", "W8A8 (qlinear)"),
        (f"median forward ms ({a.runs} runs)", f"{t_float:.2f}", f"{t_quant:.2f}"),
        ("speed vs float", "1.00x", f"{t_float / t_quant:.2f}x"),
        ("cosine vs float, min / mean", "1", f"{float(cos.min()):.6f} / {float(cos.mean()):.6f}"),
        ("max |y - y_float|", "0", f"{err:.4g} (|y_float| max {float(yf.abs().max()):.3g})"),
        ("state_dict MB", f"{state_dict_mb(fmodel):.2f}", f"{state_dict_mb(qmodel):.2f}"),
    ]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}")
    return 0 if float(cos.min()) > 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
