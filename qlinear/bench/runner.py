"""``qlinear bench``'s loop: for each case, check the plan against the exact reference,
then time it beside the backend's floating-point matmul and, where installed, the
torch peers; and the text table of the results."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backends import Backend
from ..dtypes import s8
from ..errors import Unsupported
from ..layer import quantize_weight
from ..plans import QuantizedLinearPlan
from ..problem import QuantizedLinearArgs, QuantizedLinearDescriptor
from ..reference import reference_linear
from .baselines import float_matmul
from .cases import BenchCase
from .timing import median_time

__all__ = ["bench", "check_plan", "format_table"]

# Rows checked exactly against the reference when checking every row costs too much.
_CHECK_ROWS = 8


def check_plan(be: Backend, plan: QuantizedLinearPlan, args: QuantizedLinearArgs,
               x: np.ndarray, wq: np.ndarray, ws: np.ndarray, bias: np.ndarray | None,
               rng: np.random.Generator) -> str:
    """Run ``plan`` once and compare its output and scratches with the exact reference
    (sampled rows on large problems). Returns "ok" or a description of the first mismatch."""
    desc = plan.descriptor
    m = desc.m
    rows = np.arange(m) if m * desc.k * desc.c_out <= 2**26 else \
        np.unique(np.concatenate([[0, m - 1], rng.integers(0, m, _CHECK_ROWS)]))
    plan.run(args)
    y = be.to_numpy(args.output)[rows]
    q = be.to_numpy(args.act_q_scratch)[rows]
    s = be.to_numpy(args.act_scale_scratch)[rows]
    want_y, want_q, want_s = reference_linear(x[rows], wq, ws, bias, desc.dtype,
                                              desc.q_min, desc.q_max)
    for name, got, want in (("act_scale", s, want_s), ("act_q", q.astype(np.int64), want_q),
                            ("output", y, want_y)):
        g, w = got.astype(np.float64), want.astype(np.float64)
        same = (g == w) | (np.isnan(g) & np.isnan(w))
        if not same.all():
            return f"MISMATCH in {name} ({int((~same).sum())} elements)"
    return "ok"


def _peers(be: Backend, case: BenchCase) -> dict[str, Any]:
    if be.torch_device_type is None:
        return {}
    try:
        from .peers import torch_peers

        return torch_peers(case[0], case[1], case[2], case[3], device=be.torch_device_type)
    except Exception:
        return {}


def bench(be: Backend, cases: Sequence[BenchCase], *, min_seconds: float = 0.3,
          max_reps: int = 50, progress: bool = True,
          rng: np.random.Generator | None = None) -> list[dict[str, Any]]:
    """Check and time every case on ``be``; return one dict per case."""
    rng = rng or np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    bar: Any = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(cases), desc=f"qlinear bench ({be.name})", file=sys.stderr,
                       leave=False)
        except ImportError:
            bar = None
    for case in cases:
        rows.append(_bench_case(be, case, rng, min_seconds, max_reps))
        if bar:
            bar.update()
    if bar:
        bar.close()
    return rows


def _bench_case(be: Backend, case: BenchCase, rng: np.random.Generator, min_seconds: float,
                max_reps: int) -> dict[str, Any]:
    m, k, n, dt = case
    row: dict[str, Any] = {"backend": be.name, "device": be.device_name, "m": m, "k": k,
                           "n": n, "dtype": dt.name}
    x = (rng.standard_normal((m, k)) * 3).astype(dt.numpy)
    w = rng.standard_normal((n, k)).astype(np.float32)
    wq, ws = quantize_weight(w, dtype=dt)
    bias = rng.standard_normal(n).astype(dt.numpy)
    desc = QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dt)
    try:
        plan = QuantizedLinearPlan.select(be, desc)
    except Unsupported as e:
        row.update(check=f"unsupported: {e}")
        return row
    args = QuantizedLinearArgs(
        activation=be.from_numpy(x), weight_q=be.from_numpy(wq, readonly=True),
        weight_scale=be.from_numpy(ws, readonly=True), output=be.empty((m, n), dt),
        act_q_scratch=be.empty((m, k), s8), act_scale_scratch=be.empty((m,), dt),
        bias=be.from_numpy(bias, readonly=True))
    row["sku"] = plan.sku
    row["check"] = check_plan(be, plan, args, x, wq, ws, bias, rng)
    t = median_time(lambda: plan.run(args), be.synchronize, min_seconds, max_reps)
    row["qlinear_ms"] = t * 1e3
    row["tops"] = desc.ops / t / 1e12
    fm = float_matmul(be, m, k, n, dt)
    if fm is not None:
        tf = median_time(fm, lambda: None, min_seconds, max_reps)
        row["float_matmul_ms"] = tf * 1e3
        row["vs_float_matmul"] = tf / t
    for name, fn in _peers(be, case).items():
        tp = median_time(fn, lambda: None, min_seconds, max_reps)
        row[f"{name}_ms"] = tp * 1e3
        row[f"vs_{name}"] = tp / t
    return row


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of bench rows."""
    peer_cols = sorted({key for r in rows for key in r if key.startswith("vs_")
                        and key != "vs_float_matmul"})
    head = ["dtype", "M", "K", "N", "check", "time ms", "TOPS", "x float mm"] + \
        [f"x {c[3:]}" for c in peer_cols] + ["sku"]
    lines = []
    for r in rows:
        def fmt(key: str, spec: str, r: dict[str, Any] = r) -> str:
            return format(r[key], spec) if key in r else "-"
        lines.append([r["dtype"], str(r["m"]), str(r["k"]), str(r["n"]), r.get("check", "-"),
                      fmt("qlinear_ms", ".3f"), fmt("tops", ".4f"), fmt("vs_float_matmul", ".2f")]
                     + [fmt(c, ".2f") for c in peer_cols] + [r.get("sku", "-")])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)
