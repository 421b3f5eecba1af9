"""``qlinear bench``'s loop: for each case, check the plan against the exact reference,
then time it beside the backend's floating-point matmul and, where installed, the
torch peers. Every timing keeps its spread (min / median / max and repetitions); every
ratio is baseline time / qlinear time, so > 1 means qlinear is faster."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backends import Backend
from ..dtypes import s8
from ..errors import InvalidProblem, Unsupported
from ..layer import quantize_weight
from ..plans import QuantizedLinearPlan
from ..problem import QuantizedLinearArgs, QuantizedLinearDescriptor, check_int
from ..reference import reference_linear
from .baselines import float_matmul, float_matmul_detail
from .cases import BenchCase
from .timing import interleaved_stats

__all__ = ["bench", "check_plan", "check_timing", "FLOAT_MATMUL", "NUMPY_ENGINE"]

#: Key of the floating-point matmul on the backend's own device in a bench row.
FLOAT_MATMUL = "float_matmul"
#: Key of the cpu backend's numpy engine, timed beside the oneDNN one where that runs.
NUMPY_ENGINE = "numpy_engine"

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


def check_timing(min_seconds: Any, max_reps: Any) -> tuple[float, int]:
    """``(min_seconds, max_reps)`` checked: a finite number of seconds >= 0 and an integer
    >= 1; :class:`InvalidProblem` naming the argument otherwise."""
    if isinstance(min_seconds, bool) or not isinstance(min_seconds, (int, float)) \
            or not math.isfinite(min_seconds) or min_seconds < 0:
        raise InvalidProblem(f"min_seconds: expected a finite number of seconds >= 0, "
                             f"got {min_seconds!r}")
    return float(min_seconds), check_int("max_reps", max_reps, 1)


def bench(be: Backend, cases: Sequence[BenchCase], *, min_seconds: float = 0.3,
          max_reps: int = 50, progress: bool = True,
          rng: np.random.Generator | None = None) -> list[dict[str, Any]]:
    """Check and time every case on ``be``; return one dict per case.

    Each timing ``T`` (``qlinear``, ``float_matmul``, each peer) gives ``T_ms`` (the
    median), ``T_min_ms``, ``T_max_ms`` and ``T_reps``; each baseline ``B`` gives
    ``vs_B`` = B's median time / qlinear's median time (> 1: qlinear is faster) and its
    description in ``row["baselines"][B]``."""
    min_seconds, max_reps = check_timing(min_seconds, max_reps)
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
    desc = QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dt)
    try:
        plan = QuantizedLinearPlan.select(be, desc)
    except Unsupported as e:
        row.update(check=f"unsupported: {e}")
        return row
    x = (rng.standard_normal((m, k)) * 3).astype(dt.numpy)
    w = rng.standard_normal((n, k)).astype(np.float32)
    wq, ws = quantize_weight(w, dtype=dt)
    bias = rng.standard_normal(n).astype(dt.numpy)
    args = QuantizedLinearArgs(
        activation=be.from_numpy(x), weight_q=be.from_numpy(wq, readonly=True),
        weight_scale=be.from_numpy(ws, readonly=True), output=be.empty((m, n), dt),
        act_q_scratch=be.empty((m, k), s8), act_scale_scratch=be.empty((m,), dt),
        bias=be.from_numpy(bias, readonly=True))
    row["sku"] = plan.sku
    row["check"] = check_plan(be, plan, args, x, wq, ws, bias, rng)
    details: dict[str, str] = {}
    runs: dict[str, Any] = {"qlinear": lambda: plan.run(args)}
    fm = float_matmul(be, m, k, n, dt)
    if fm is not None:
        runs[FLOAT_MATMUL] = fm
        details[FLOAT_MATMUL] = float_matmul_detail(be)
    other = _other_engine(be, desc)
    if other is not None:
        other_plan, detail = other
        check = check_plan(be, other_plan, args, x, wq, ws, bias, rng)
        if check != "ok":
            row["check"] = f"{NUMPY_ENGINE}: {check}"
        runs[NUMPY_ENGINE] = lambda: other_plan.run(args)
        details[NUMPY_ENGINE] = detail
    for name, fn in _peers(be, case).items():
        runs[name] = fn
        details[name] = getattr(fn, "detail", name)
    # One sync for all: a baseline's call waits for itself, and syncing an idle backend
    # costs nothing.
    stats = interleaved_stats(runs, be.synchronize, min_seconds, max_reps)
    t = stats.pop("qlinear")
    row.update(t.as_ms("qlinear"))
    row["tops"] = desc.ops / t.median / 1e12
    for name, tb in stats.items():
        row.update(tb.as_ms(name))
        row[f"vs_{name}"] = tb.median / t.median
    row["baselines"] = details
    return row


def _other_engine(be: Backend, desc: QuantizedLinearDescriptor) -> tuple[Any, str] | None:
    """On cpu running the oneDNN engine: the same problem's plan on the numpy engine, and
    what it is in words (None elsewhere)."""
    engine = getattr(be, "engine", None)
    if be.name != "cpu" or engine is None or engine.engine == "numpy":
        return None
    with be.configured(engine="numpy"):  # type: ignore[attr-defined]
        plan = QuantizedLinearPlan.select(be, desc)
    return plan, f"the same plan on the cpu backend's numpy engine ({plan.sku})"
