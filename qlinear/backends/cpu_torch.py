"""The cpu backend's oneDNN engine: the same five steps, the bulk work in torch ops.

The engine runs on the caller's numpy memory through zero-copy torch views
(``torch.from_numpy``; bf16 through an int16 view). For ``x[M, K]`` of TIn:

1. ``amax[m]``: ``torch.amax`` and ``torch.amin`` per row, then ``max(max, -min)`` in C
   on the [M] vectors (exact in any type, NaN propagating);
2. the per-row rule (scale, divisor, rows that quantize to 0, whether to clamp) is
   :func:`~qlinear.backends.cpu_quant.dynamic_rows`, the numpy engine's own (problems of
   up to :data:`QUANT_GRAIN` elements, and the static and asymmetric schemes, run the
   numpy engine's activation pass whole);
3. ``q = rint(x / divisor)`` (one correctly rounded C division, round half to even),
   clamped where the rule says so, written into the caller's int8 scratch;
4. ``acc = q @ weight_q.T`` by ``torch._int_mm``, oneDNN's s8 x s8 -> s32 GEMM: exact on
   the CPUs :mod:`~qlinear.backends.cpu_engine` admits; the zero point's
   ``acc - zp[m] * colsum[n]`` in int32 (exact: the descriptor bounds K so that it fits);
5. ``y = ((C(acc) * C(scale)) * C(weight_scale)) (+ C(bias))``: one torch op per
   operation, never fused into a multiply-add, rounded once to TIn.

So the bits are the numpy engine's (the test suite runs every oracle test on both).
Which operand layout the GEMM reads is :func:`gemm_layout`'s choice.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..dtypes import DType, bf16
from ..problem import LinearTensors, QuantizedLinearDescriptor, QuantizeTensors
from ..schemes import ActivationScheme
from ..tensors import Tensor
from .cpu_quant import compute_type, dequantize, dynamic_rows, quantize

__all__ = ["TorchEngine", "QUANT_GRAIN", "EPILOGUE_GRAIN", "gemm_layout", "torch_pass"]

# Up to these many elements a pass runs in numpy, above them in torch ops. Each torch op
# on more than 32768 elements wakes torch's thread pool, which after a GEMM has gone to
# sleep: below about 2**17 elements that costs more than numpy's single thread saves
# (measured right after a GEMM, as in a layer call, on 2 cores; both crossovers lay
# between 2**16 and 2**18).
#: Activation pass: M * K elements.
QUANT_GRAIN = 1 << 17
#: Dequant epilogue: M * C_out elements.
EPILOGUE_GRAIN = 1 << 17


def torch_pass(scheme: ActivationScheme, elements: int) -> bool:
    """Whether the activation pass over ``elements`` runs in torch ops: the dynamic scheme
    above :data:`QUANT_GRAIN` (the other schemes run the numpy engine's pass whole)."""
    return scheme is ActivationScheme.DYNAMIC and elements > QUANT_GRAIN


def gemm_layout(m: int, k: int, n: int, readonly: bool) -> str:
    """How step 4 reads the weight for ``m`` rows (timed with torch 2.13 on AVX512-VNNI,
    K = 4096, N = 4096 and 14336; a pure choice):

    - ``"wnk"``, M = 1: ``q @ W.T``, the weight as stored (oneDNN's GEMV streams its rows,
      3-7x faster than from a ``[K, N]`` copy);
    - ``"wt"``, 8 <= M <= 32 with a weight of 4 MiB or more, or 2 <= M <= 32 with a
      writable weight: ``(W @ q.T).T``, the weight as stored in first place: 1.2-1.4x
      faster than ``[K, N]`` at these M where the weight streams from memory (no faster
      on small weights); the accumulator comes transposed, which costs the epilogue
      more per element as M grows (past M = 32 more than the GEMM gains);
    - ``"wkn"`` otherwise with a read-only weight: ``q @ W_kn``, a ``[K, N]`` int8 copy
      kept with the weight (a quarter of the numpy engine's float32 copy); a writable
      weight's contents may change, so it is read as stored (``"wnk"``) instead of being
      copied per call. K = 1 always takes the copy (tiny then): the transposed views of
      a ``[*, 1]`` operand have strides (1, 1), which oneDNN misreads (wrong sums).
    """
    if k == 1:
        return "wkn"
    if m == 1:
        return "wnk"
    if m <= 32 and ((m >= 8 and n * k >= 1 << 22) or not readonly):
        return "wt"
    return "wkn" if readonly else "wnk"


class TorchEngine:
    """The bulk operations of the oneDNN engine, on torch views of host arrays."""

    def __init__(self, torch: Any):
        self.torch = torch
        self._quiet = False  # torch has had its one warning about read-only arrays

    # -- views -------------------------------------------------------------------------
    def view(self, arr: np.ndarray) -> Any:
        """A torch tensor sharing ``arr``'s memory (bf16 through its int16 bits)."""
        if not arr.flags.writeable and not self._quiet:
            # torch warns, once per process, that it cannot mark the view read-only;
            # nothing writes through it. After that one there is nothing to silence.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                view = self._view(arr)
            self._quiet = True
            return view
        return self._view(arr)

    def _view(self, arr: np.ndarray) -> Any:
        torch = self.torch
        if arr.dtype == bf16.numpy:
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)

    def view_of(self, t: Tensor) -> Any:
        """The torch view of a tensor's array, kept with the tensor: a view aliases the
        caller's memory, so it stays right whether or not the tensor is read-only."""
        got = t.cache.get("torch")
        if got is None:
            got = t.cache["torch"] = self.view(t.handle)
        return got

    def cached(self, t: Tensor, key: Any, make: Any) -> Any:
        """``make()``, kept in ``t.cache`` when ``t`` is read-only (its data cannot change)."""
        got = t.cache.get(key)
        if got is None:
            got = make()
            if t.readonly:
                t.cache[key] = got
        return got

    def as_compute(self, t: Tensor, ct: np.dtype) -> Any:
        """A per-channel vector (weight scale, bias) as C, in torch."""
        return self.cached(t, ("torch", ct),
                           lambda: self.view(np.ascontiguousarray(t.handle, dtype=ct)))

    def gemm(self, t: Tensor, act_q: Any, layout: str) -> Any:
        """``act_q @ weight_q.T`` in int32 through the ``layout`` :func:`gemm_layout` chose
        (``"wt"`` gives the accumulator as a transposed view)."""
        torch = self.torch
        w_nk = self.view_of(t)
        if layout == "wnk":
            return torch._int_mm(act_q, w_nk.t())
        if layout == "wt":
            return torch._int_mm(w_nk, act_q.t()).t()
        w_kn = self.cached(t, ("torch", "kn"), lambda: self._kn_copy(w_nk))
        return torch._int_mm(act_q, w_kn)

    def _kn_copy(self, w_nk: Any) -> Any:
        n, k = w_nk.shape
        return self.torch.empty((k, n), dtype=w_nk.dtype).copy_(w_nk.t())

    # -- the steps ---------------------------------------------------------------------
    def quantize_dynamic(self, x: np.ndarray, dtype: DType, q_min: int, q_max: int,
                         act_q: Any) -> np.ndarray:
        """Steps 1-3 of the dynamic scheme: writes ``act_q`` (a torch int8 view), returns
        the stored scale (numpy, TIn)."""
        torch = self.torch
        ct = compute_type(dtype)
        xt = self.view(x)
        mx, mn = torch.amax(xt, 1), torch.amin(xt, 1)
        if xt.dtype == torch.bfloat16:  # numpy has no bf16 of its own: widen (exactly)
            mx, mn = mx.float(), mn.float()
        # max(max, -min) on the [M] vectors in numpy: exact in any type, NaN propagating.
        amax = np.maximum(mx.numpy().astype(ct), -mn.numpy().astype(ct))
        scale, divisor, bad, clip = dynamic_rows(amax, dtype, q_min, q_max)
        # A dimensioned C divisor promotes an f16 / bf16 x to C before dividing.
        q = torch.div(xt, torch.from_numpy(divisor)[:, None])
        q.round_()
        if clip:
            q.clamp_(q_min, q_max)
        if bad is not None:
            q[torch.from_numpy(bad)] = 0
        act_q.copy_(q)
        return scale

    def dequantize(self, acc: Any, scale: np.ndarray, ws: Any, bias: Any | None,
                   out: Any, ct: np.dtype) -> None:
        """Step 5 into ``out`` (a torch view of TIn); ``ws``, ``bias`` already in C."""
        torch = self.torch
        sc = torch.from_numpy(scale.astype(ct))[:, None]
        same = out.dtype == (torch.float64 if ct == np.float64 else torch.float32)
        y = torch.mul(acc, sc, out=out) if same else torch.mul(acc, sc)
        y.mul_(ws)
        if bias is not None:
            y.add_(bias)
        if not same:
            out.copy_(y)

    def run_linear(self, desc: QuantizedLinearDescriptor, t: LinearTensors,
                   step: int) -> None:
        """The whole linear call, ``step`` rows at a time."""
        torch = self.torch
        ct = compute_type(desc.dtype)
        act_scale = t.act_scale_scratch.handle
        act_q_all = self.view_of(t.act_q_scratch)
        out_all = self.view_of(t.output)
        layout = gemm_layout(desc.m, desc.k, desc.c_out, t.weight_q.readonly)
        colsum = None if t.weight_colsum is None else self.view_of(t.weight_colsum)
        for m0 in range(0, desc.m, step):
            rows = slice(None) if step >= desc.m else slice(m0, m0 + step)
            act_q = act_q_all[rows]
            scale, zp = self._quantize(desc, t, rows, act_q)
            act_scale[rows] = scale
            if desc.k == 0:
                acc = torch.zeros((act_q.shape[0], desc.c_out), dtype=torch.int32)
            else:
                acc = self.gemm(t.weight_q, act_q, layout)
            if zp is not None:
                assert t.act_zp_scratch is not None and colsum is not None  # validated
                t.act_zp_scratch.handle[rows] = zp
                acc.sub_(torch.outer(torch.from_numpy(zp), colsum))
            # A transposed accumulator ("wt") is read best by torch's strided loops.
            if acc.numel() <= EPILOGUE_GRAIN and layout != "wt":
                dequantize(acc.numpy(), scale, t.weight_scale.handle,
                           None if t.bias is None else t.bias.handle, t.output.handle[rows])
            else:
                bias = None if t.bias is None else self.as_compute(t.bias, ct)
                self.dequantize(acc, scale, self.as_compute(t.weight_scale, ct), bias,
                                out_all[rows], ct)

    def _quantize(self, desc: QuantizedLinearDescriptor, t: LinearTensors, rows: slice,
                  act_q: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Steps 1-3 for ``rows`` into ``act_q``: ``(scale, zp)`` as numpy arrays."""
        x = t.activation.handle[rows]
        if torch_pass(desc.scheme, x.size):
            return self.quantize_dynamic(x, desc.dtype, desc.q_min, desc.q_max, act_q), None
        q, scale, zp = quantize(x, desc.dtype, desc.q_min, desc.q_max, desc.scheme,
                                t.input_scale, t.input_zero_point)
        t.act_q_scratch.handle[rows] = q
        return scale, zp

    def run_quantize(self, desc: Any, t: QuantizeTensors, step: int) -> None:
        """The activation pass alone (dynamic scheme, more than :data:`QUANT_GRAIN` elements),
        ``step`` rows at a time."""
        act_q_all = self.view_of(t.act_q)
        for m0 in range(0, desc.m, step):
            rows = slice(m0, m0 + step)
            t.act_scale.handle[rows] = self.quantize_dynamic(
                t.activation.handle[rows], desc.dtype, desc.q_min, desc.q_max, act_q_all[rows])
