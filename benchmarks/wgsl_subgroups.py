"""The WGSL reductions with subgroup operations beside the workgroup-memory ones, side by
side in one run, on the wgpu backend's adapter.

Two plans per case, selected under ``be.configured(subgroups=False)`` and
``be.configured(subgroups=True)``: the decode layer (activation pass + small-M GEMM) at
M = 1 and 16, and the activation pass alone at M = 512. Each plan's output is first
checked bit for bit against ``qlinear.reference`` (and the two paths against each
other). The paths are then timed in alternating rounds, so that drift on a shared
machine hits both; a time is a batch of runs in one submit divided by the runs in it,
by GPU timestamps where the adapter has them (else wall time to the end of the batch).
A ratio is the median over rounds of (workgroup time / subgroup time), so > 1 means the
subgroup path is faster; the spread is the lowest and highest round.

    PYTHONPATH=. python benchmarks/wgsl_subgroups.py [--rounds 7] [--dtype f32] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import qlinear as ql
from qlinear.bench.provenance import git_commit
from qlinear.reference import reference_linear

__all__ = ["LAYERS", "ACT_PASS", "main"]

#: (M, K, N) of the decode layers; (M, K) of the activation pass alone.
LAYERS = [(1, 4096, 4096), (16, 4096, 4096), (1, 384, 1536), (16, 384, 1536)]
ACT_PASS = [(512, 4096)]
PATHS = {"workgroup": False, "subgroups": True}


def _layer_case(be, m, k, n, dtype, rng):
    """{path: (plan, args)} of the linear plan on both paths, checked against the reference."""
    x = (rng.standard_normal((m, k)) * 2).astype(dtype.numpy)
    wq = rng.integers(-128, 128, (n, k), dtype=np.int8)
    ws = (rng.uniform(0.5, 2, n) * 1e-2).astype(dtype.numpy)
    want = reference_linear(x, wq, ws, None, dtype)[0]
    xd, wqd, wsd = be.from_numpy(x), be.from_numpy(wq, readonly=True), be.from_numpy(ws)
    out = {}
    for path, sg in PATHS.items():
        with be.configured(subgroups=sg):
            plan = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(m, n, k, dtype))
        args = ql.QuantizedLinearArgs(
            activation=xd, weight_q=wqd, weight_scale=wsd, output=be.empty((m, n), dtype),
            act_q_scratch=be.empty((m, k), ql.s8), act_scale_scratch=be.empty((m,), dtype))
        plan.run(args)
        got = be.to_numpy(args.output)
        if not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
            raise SystemExit(f"{plan.sku}: output differs from qlinear.reference")
        out[path] = (plan, args)
    return out


def _act_case(be, m, k, dtype, rng):
    """{path: (plan, args)} of the activation pass on both paths; the two agree."""
    x = be.from_numpy((rng.standard_normal((m, k)) * 2).astype(dtype.numpy))
    out, seen = {}, []
    for path, sg in PATHS.items():
        with be.configured(subgroups=sg):
            plan = ql.DynamicRangeQuantizePlan.select(
                be, ql.DynamicRangeQuantizeDescriptor(m, k, dtype))
        args = ql.DynamicRangeQuantizeArgs(x, be.empty((m, k), ql.s8), be.empty((m,), dtype))
        plan.run(args)
        seen.append((be.to_numpy(args.act_q).tobytes(), be.to_numpy(args.act_scale).tobytes()))
        out[path] = (plan, args)
    if seen[0] != seen[1]:
        raise SystemExit("activation pass: the two paths disagree")
    return out


def _seconds(be, plan, args, inner):
    """Seconds per run of a batch of ``inner`` runs (GPU timestamps where available)."""
    t0 = time.perf_counter()
    with be.batch(timestamps=be.has_timestamps) as b:
        for _ in range(inner):
            plan.run(args, stream=b)
    be.synchronize()
    took = b.gpu_seconds() if b.timestamps else time.perf_counter() - t0
    return took / inner


def measure(be, case, rounds, min_seconds=0.2):
    """Per path: the median ms over rounds; and the median, min and max over rounds of
    (workgroup time / subgroup time)."""
    inner = {}
    for path, (plan, args) in case.items():
        _seconds(be, plan, args, 1)  # warm-up
        one = _seconds(be, plan, args, 1)
        inner[path] = max(1, min(64, int(min_seconds / max(one, 1e-6))))
    times = {p: [] for p in case}
    for _ in range(rounds):
        for path, (plan, args) in case.items():
            times[path].append(_seconds(be, plan, args, inner[path]))
    ratios = [w / s for w, s in zip(times["workgroup"], times["subgroups"])]
    row = {f"{p}_ms": statistics.median(t) * 1e3 for p, t in times.items()}
    row.update({f"{p}_sku": plan.sku for p, (plan, _) in case.items()},
               ratio=statistics.median(ratios), ratio_spread=[min(ratios), max(ratios)],
               rounds=rounds, runs_per_batch=inner)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds (default 7)")
    ap.add_argument("--dtype", default="f32", help="TIn: f32, f16 or bf16 (default f32)")
    ap.add_argument("--json", help="write the rows as JSON")
    a = ap.parse_args(argv)
    dtype = ql.dtypes.as_dtype(a.dtype)
    be = ql.backend("wgpu")
    if not be.facts.subgroups:
        sys.exit(f"{be.device_name}: no subgroup feature; nothing to compare")
    rng = np.random.default_rng(0)
    timing = "GPU timestamps" if be.has_timestamps else "wall time"
    print(f"wgpu: {be.device_name}; {dtype.name}; {a.rounds} rounds; timed by {timing}")
    print(f"{'what':>13} {'M':>4} {'K':>5} {'N':>5} {'workgroup ms':>12} {'subgroups ms':>12} "
          f"{'wg / sg':>7}  [min, max]")
    cases = [("layer", m, k, n, lambda m=m, k=k, n=n: _layer_case(be, m, k, n, dtype, rng))
             for m, k, n in LAYERS]
    cases += [("act pass", m, k, None, lambda m=m, k=k: _act_case(be, m, k, dtype, rng))
              for m, k in ACT_PASS]
    rows = []
    for what, m, k, n, make in cases:
        row = {"what": what, "m": m, "k": k, "n": n, "dtype": dtype.name,
               "device": be.device_name, "timing": timing, "commit": git_commit()}
        row.update(measure(be, make(), a.rounds))
        rows.append(row)
        lo, hi = row["ratio_spread"]
        print(f"{what:>13} {m:>4} {k:>5} {n or '':>5} {row['workgroup_ms']:>12.3f} "
              f"{row['subgroups_ms']:>12.3f} {row['ratio']:>7.2f}  [{lo:.2f}, {hi:.2f}]",
              flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
