"""Peers for ``qlinear bench``: what the same problem costs in torch, when torch is here.

Torch is imported inside :func:`torch_peers` only, so importing this module costs
nothing and works without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..dtypes import DTypeLike, as_dtype
from ..errors import InvalidProblem

__all__ = ["torch_peers", "Peer", "TORCH_MATMUL", "TORCH_W8A8"]

#: Key of torch's floating-point matmul ``x[m, k] @ w[k, n]`` of the problem's dtype.
TORCH_MATMUL = "torch.matmul"
#: Key of torch's W8A8 composition: per-token int8 quantization in torch ops, an int8
#: GEMM with int32 accumulation (``torch._int_mm`` where it runs), dequantization + bias.
TORCH_W8A8 = "torch.w8a8"


@dataclass(frozen=True)
class Peer:
    """A peer's run: call it to run once and wait; ``detail`` says what it runs."""

    run: Callable[[], None]
    detail: str

    def __call__(self) -> None:
        self.run()


def torch_peers(m: int, k: int, n: int, dtype: DTypeLike,
                device: str = "cpu") -> dict[str, Peer]:
    """Zero-argument callables that run ``[m, k] x [k, n]`` in torch on ``device`` and
    wait for completion, on random data made once here.

    Keys: :data:`TORCH_MATMUL` and :data:`TORCH_W8A8`. Each is a :class:`Peer`, whose
    ``detail`` says what it runs (for example which int8 GEMM the W8A8 one uses).
    ``dtype`` is a qlinear dtype or name (f32, f16, bf16, f64). Returns ``{}`` when
    torch is not installed or ``device`` is not usable by the installed torch.
    """
    dt = as_dtype(dtype, name="dtype")
    if not dt.is_float:
        raise InvalidProblem(f"dtype: expected a float type (f32, f16, bf16, f64), got {dt.name}")
    for name, v in (("m", m), ("k", k), ("n", n)):
        if not isinstance(v, int) or v < 1:
            raise InvalidProblem(f"{name}: expected a positive integer, got {v!r}")
    try:
        import torch
    except ImportError:
        return {}
    tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
           "f64": torch.float64}[dt.name]
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            return {}
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError):
        return {}

    gen = torch.Generator(device="cpu").manual_seed(1234)

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dev, tdt)

    if dev.type == "cuda":
        def wait() -> None:
            torch.cuda.synchronize(dev)
    else:
        def wait() -> None:
            pass

    x = rand(m, k)
    w_t = rand(k, n)  # [K, N]: the layout both peers' GEMMs read fastest
    bias = rand(n)
    # Offline weight quantization (per output channel), as a W8A8 deployment would store it.
    w_amax = w_t.float().abs().amax(dim=0)
    w_scale = torch.where(w_amax > 0, w_amax / 127, torch.ones_like(w_amax))
    wq_t = torch.clamp(torch.round(w_t.float() / w_scale), -127, 127).to(torch.int8)
    w_scale = w_scale.to(tdt)
    ct = torch.float64 if tdt == torch.float64 else torch.float32

    def matmul() -> None:
        torch.matmul(x, w_t)
        wait()

    int_mm, int_detail = _int8_gemm(torch, dev, m, k, n, wq_t)

    def w8a8() -> None:
        xc = x.to(ct)
        amax = xc.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(tdt)
        q = torch.clamp(torch.round(xc / scale.to(ct)), -127, 127).to(torch.int8)
        acc = int_mm(q)
        (acc.to(ct) * scale.to(ct) * w_scale.to(ct) + bias.to(ct)).to(tdt)
        wait()
    return {TORCH_MATMUL: Peer(matmul, f"torch.matmul {tdt} on {dev}"),
            TORCH_W8A8: Peer(w8a8, f"torch's int8 W8A8 composition, {tdt} on {dev}: "
                                   f"per-token quant, {int_detail}, dequant + bias")}


def _int8_gemm(torch: Any, dev: Any, m: int, k: int, n: int,
               wq_t: Any) -> tuple[Callable[[Any], Any], str]:
    """The fastest exact ``q[m, k] int8 @ wq_t[k, n] int8 -> int32`` torch offers here,
    checked once on this shape, with a description."""
    # The probe keeps the properties kernels dispatch on (M <= 16 or not, K, N) but is
    # checked on a few columns only: an int64 reference of a full LLM shape takes minutes.
    rows = m if m <= 64 else 64
    probe = torch.randint(-127, 128, (rows, k), dtype=torch.int8, device=dev)
    cols = sorted(set(range(min(n, 8))) | set(range(max(0, n - 8), n)))
    want = probe.cpu().long() @ wq_t[:, cols].cpu().long()

    def exact(fn: Callable[[Any], Any]) -> bool:
        try:
            got = fn(probe)
        except (RuntimeError, NotImplementedError):
            return False
        return got.dtype == torch.int32 and torch.equal(got[:, cols].cpu().long(), want)

    if hasattr(torch, "_int_mm"):
        def direct(q: Any) -> Any:
            return torch._int_mm(q, wq_t)
        if exact(direct):
            return direct, "torch._int_mm"
        if dev.type == "cuda" and m <= 16:
            # cuBLASLt's int8 GEMM wants more than 16 rows: pad, as torchao does.
            pad = torch.zeros((32, k), dtype=torch.int8, device=dev)

            def padded(q: Any) -> Any:
                pad[:q.shape[0]].copy_(q)
                return torch._int_mm(pad, wq_t)[:q.shape[0]]
            if exact(padded):
                return padded, "torch._int_mm (M padded to 32)"
    if dev.type == "cpu":
        wi = wq_t.to(torch.int32)

        def int32_mm(q: Any) -> Any:
            return torch.matmul(q.to(torch.int32), wi)
        if exact(int32_mm):
            return int32_mm, "int32 torch.matmul (no _int_mm here)"
    # Exact while every partial sum stays below 2**24: K <= 1040 for |q|, |w| <= 127.
    wf = wq_t.to(torch.float32)

    def f32_mm(q: Any) -> Any:
        return torch.matmul(q.to(torch.float32), wf).to(torch.int32)
    exactness = "exact" if k * 127 * 127 < 2**24 else "not exact at this K"
    return f32_mm, f"float32 matmul of int8 values ({exactness}; no int8 GEMM here)"
