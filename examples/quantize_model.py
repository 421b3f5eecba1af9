"""Quantize a small transformer encoder to W8A8 with qlinear and compare it to the float model.

Builds the model offline (random weights from a fixed seed), swaps every ``nn.Linear``
for a ``qlinear.torch.QLinear`` with ``quantize_linears``, then prints, side by side,
the forward time of both models (interleaved runs: median, min and max), the quantized
model's fidelity (cosine per sequence against the float model, largest absolute error)
and the size of each ``state_dict``.

    python examples/quantize_model.py                     # CPU tensors, cpu backend
    OMP_NUM_THREADS=2 python examples/quantize_model.py   # another thread-pool size
    python examples/quantize_model.py --device cuda       # CUDA tensors, cuda backend

Thread pools: torch's OpenMP pool and numpy's BLAS pool (the cpu backend's GEMM) take
turns on the same cores, and each spin-waits for the other. On a 2-core machine only
OMP_NUM_THREADS=1 gave stable timings in a trial. Both pools read their size once,
when numpy and torch are imported, so this script sets OMP_NUM_THREADS=1 before
importing either (unless it is already set: then it keeps that value), calls
torch.set_num_threads with the same number, and prints what it set.

Needs torch (``pip install torch==2.13.0`` gives the CPU wheel).
"""

from __future__ import annotations

import os
import sys

# Before numpy or torch is imported: both size their thread pools from it, once.
THREADS_GIVEN = os.environ.get("OMP_NUM_THREADS")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

PROG = "quantize_model.py"


def fail(message: str) -> int:
    """A one-line error on stderr; exit status 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def interleaved_ms(fns: dict, runs: int, sync) -> dict[str, list[float]]:
    """Wall times in ms of each of ``fns``, one call of each per round over ``runs``
    rounds (alternating which goes first, so drift on a shared machine hits all), after
    one warm-up call of each."""
    for fn in fns.values():
        fn()
        sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(runs):
        for name in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv=None) -> int:
    """Run the comparison; return the exit status (0, 1 when fidelity is too low, 2 when
    it cannot run here)."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda[:N]")
    p.add_argument("--backend", default=None, help="qlinear backend (default: follow the device)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--layers", type=positive, default=4)
    p.add_argument("--d-model", type=positive, default=384)
    p.add_argument("--batch", type=positive, default=4)
    p.add_argument("--seq", type=positive, default=32)
    p.add_argument("--runs", type=positive, default=15,
                   help="interleaved timing rounds (one forward of each model per round)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    threads = os.environ["OMP_NUM_THREADS"]
    if not threads.isdigit() or int(threads) < 1:
        return fail(f"OMP_NUM_THREADS: expected an integer >= 1, got {threads!r}")
    try:
        import torch
    except ImportError:
        return fail("torch: expected it installed (pip install torch==2.13.0), got none")
    torch.set_num_threads(int(threads))
    try:
        device = torch.device(a.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        return fail(f"--device: expected cpu or cuda[:N], got {a.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail(f"--device {a.device}: expected a CUDA device, got torch {torch.__version__} "
                    "without CUDA (torch.cuda.is_available() is False)")
    import qlinear as ql
    import qlinear.torch as qlt

    try:
        return run(a, torch, ql, qlt, device, int(threads))
    except ql.QlinearError as e:
        return fail(str(e).splitlines()[0])


def run(a, torch, ql, qlt, device, threads: int) -> int:
    """Build, quantize, time and compare; print the table."""
    from torch import nn

    class Encoder(nn.Module):
        """Input projection, a stack of post-norm transformer encoder layers, output head."""

        def __init__(self, d_model: int, heads: int, ff: int, layers: int):
            super().__init__()
            self.embed = nn.Linear(d_model, d_model)
            layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0,
                                               activation="gelu", batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(d_model, d_model)

        def forward(self, x):
            """``x[batch, seq, d_model]`` -> same shape."""
            return self.head(self.encoder(self.embed(x)))

    def state_dict_mb(model) -> float:
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        return buf.getbuffer().nbytes / 1e6

    dtype = getattr(torch, a.dtype)
    torch.manual_seed(a.seed)
    d = a.d_model
    heads = max(h for h in range(1, max(1, d // 64) + 1) if d % h == 0)
    fmodel = Encoder(d, heads, 4 * d, a.layers).eval().to(device, dtype)
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
        times = interleaved_ms({"float": lambda: fmodel(x), "quant": lambda: qmodel(x)},
                               a.runs, sync)
    cos = torch.nn.functional.cosine_similarity(yq.flatten(1), yf.flatten(1), dim=1)
    err = float((yq - yf).abs().max())
    backend = qmodel.embed.backend_layer(dtype, device).backend
    tf, tq = times["float"], times["quant"]
    speed = [f / q for f, q in zip(tf, tq)]

    print(f"qlinear torch example: {a.layers}-layer transformer encoder, d_model {d}, "
          f"{a.batch} sequences x {a.seq} tokens, {a.dtype} on {device}")
    print(f"quantize_linears swapped {n} nn.Linear for QLinear (backend {backend.name}: "
          f"{backend.device_name}); {kept} attention out_proj kept in float")
    origin = "from the environment" if THREADS_GIVEN is not None else \
        "set by this example; set it yourself to change it"
    print(f"thread pools: OMP_NUM_THREADS={threads} ({origin}); torch threads "
          f"{torch.get_num_threads()}; OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print(f"torch {torch.__version__}, qlinear {ql.__version__}")
    print()
    rows = [
        ("", f"float ({a.dtype})", "W8A8 (qlinear)"),
        (f"median forward ms ({a.runs} interleaved runs)", f"{statistics.median(tf):.2f}",
         f"{statistics.median(tq):.2f}"),
        ("min / max forward ms", f"{min(tf):.2f} / {max(tf):.2f}",
         f"{min(tq):.2f} / {max(tq):.2f}"),
        ("speed vs float per run, median (min-max)", "1.00x",
         f"{statistics.median(speed):.2f}x ({min(speed):.2f}-{max(speed):.2f})"),
        ("cosine vs float, min / mean", "1", f"{float(cos.min()):.6f} / {float(cos.mean()):.6f}"),
        ("max |y - y_float|", "0", f"{err:.4g} (|y_float| max {float(yf.abs().max()):.3g})"),
        ("state_dict MB", f"{state_dict_mb(fmodel):.2f}", f"{state_dict_mb(qmodel):.2f}"),
    ]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}")
    print("speed vs float = float time / W8A8 time in the same round: > 1 means W8A8 is faster")
    return 0 if float(cos.min()) > 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
