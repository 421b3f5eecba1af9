"""Odd shapes through the cuda backend, for ``compute-sanitizer`` (memcheck, racecheck).

Every case is checked against the exact int64 reference as well, so one run under the
sanitizer says both "no bad access / no race" and "right answer"; the asymmetric
activation schemes' cases (zero points and weight column sums read at the tile edges)
against the cpu backend, which runs every scheme exactly. It also runs one zero-copy
case each on torch and CuPy tensors on a non-default stream, where installed.

    compute-sanitizer --tool memcheck --error-exitcode 3 \
        python benchmarks/sanitize_cases.py
    compute-sanitizer --tool racecheck --error-exitcode 3 \
        python benchmarks/sanitize_cases.py --quick --no-interop
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import qlinear as ql  # noqa: E402
from qlinear.reference import reference_linear  # noqa: E402

MS = [1, 16, 17, 4097]
KS = [3, 1025, 4096]
N = 72  # not a multiple of any tile
#: (M, K, dtype name, scheme): the zero-point GEMM (aligned K: the tiled kernel with the
#: term compiled in) and, in full runs, the byte-load decode kernel given zero points.
SCHEME_CASES = [(17, 4096, "f16", "dynamic_asym"), (1, 1025, "bf16", "static_asym")]


def same(got, want):
    g, w = got.astype(np.float64), want.astype(np.float64)
    return bool(np.all((g == w) | (np.isnan(g) & np.isnan(w))))


def run_case(be, m, k, n, dtype, rng):
    x = (rng.standard_normal((m, k)) * 3).astype(dtype.numpy)
    x[0, 0] = np.nan if m > 2 else x[0, 0]
    wq = rng.integers(-128, 128, (n, k), dtype=np.int8)
    ws = rng.uniform(1e-3, 1e-2, n).astype(dtype.numpy)
    bias = rng.standard_normal(n).astype(dtype.numpy)
    plan = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(m, n, k, dtype))
    args = ql.QuantizedLinearArgs(be.from_numpy(x), be.from_numpy(wq), be.from_numpy(ws),
                                  be.empty((m, n), dtype), be.empty((m, k), ql.s8),
                                  be.empty((m,), dtype), be.from_numpy(bias))
    plan.run(args)
    y, q, s = reference_linear(x, wq, ws, bias, dtype)
    ok = (same(be.to_numpy(args.output), y) and same(be.to_numpy(args.act_scale_scratch), s)
          and (be.to_numpy(args.act_q_scratch).astype(np.int64) == q).all())
    print(f"{'ok ' if ok else 'BAD'} M={m} K={k} N={n} {dtype.name} {plan.sku}", flush=True)
    return ok


def run_scheme_case(be, m, k, n, dtype, scheme, rng):
    """One asymmetric-scheme problem on ``be`` and on the cpu backend: output, q, scales
    and zero points must agree bit for bit."""
    x = (rng.standard_normal((m, k)) * 3 + rng.uniform(-4, 4, (m, 1))).astype(dtype.numpy)
    if m > 2:
        x[1, 0] = np.nan
    wq = rng.integers(-128, 128, (n, k), dtype=np.int8)
    ws = rng.uniform(1e-3, 1e-2, n).astype(dtype.numpy)
    bias = rng.standard_normal(n).astype(dtype.numpy)
    desc = ql.QuantizedLinearDescriptor(m, n, k, dtype, scheme=scheme)
    static = {"input_scale": 0.05, "input_zero_point": -9} if desc.scheme.static else {}
    got, skus = [], []
    for b in (be, ql.backend("cpu")):
        plan = ql.QuantizedLinearPlan.select(b, desc)
        skus.append(plan.sku)
        args = ql.QuantizedLinearArgs(
            b.from_numpy(x), b.from_numpy(wq), b.from_numpy(ws), b.empty((m, n), dtype),
            b.empty((m, k), ql.s8), b.empty((m,), dtype), b.from_numpy(bias),
            act_zp_scratch=b.empty((m,), ql.s32),
            weight_colsum=b.from_numpy(ql.weight_colsum(wq)), **static)
        plan.run(args)
        got.append([b.to_numpy(t) for t in (args.output, args.act_q_scratch,
                                             args.act_scale_scratch, args.act_zp_scratch)])
    # Floats (bf16 is numpy kind "V") NaN where the other is NaN, integers equal.
    ok = all(same(a, c) if a.dtype.kind in "fV" else bool((a == c).all())
             for a, c in zip(*got))
    print(f"{'ok ' if ok else 'BAD'} M={m} K={k} N={n} {dtype.name} {scheme} {skus[0]}",
          flush=True)
    return ok


def zero_copy(be, rng):
    ok = True
    try:
        import torch
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            x = torch.randn(5, 33, device="cuda", dtype=torch.float16)
            layer = ql.QuantizedLinear.from_float(rng.standard_normal((7, 33)).astype(np.float32),
                                                  backend=be, dtype=ql.f16)
            y = torch.empty(5, 7, device="cuda", dtype=torch.float16)
            layer.forward(be.wrap(x), out=be.wrap(y), stream=s)
        s.synchronize()
        want = layer(x.cpu().numpy())
        good = same(y.cpu().numpy(), want)
        print(f"{'ok ' if good else 'BAD'} torch zero-copy on a non-default stream", flush=True)
        ok &= good
    except ImportError:
        print("-- torch not installed: zero-copy torch case not run")
    try:
        import cupy as cp
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            x = cp.asarray(rng.standard_normal((4, 40)).astype(np.float32))
            layer = ql.QuantizedLinear.from_float(rng.standard_normal((9, 40)).astype(np.float32),
                                                  backend=be)
            y = cp.empty((4, 9), cp.float32)
            layer.forward(be.wrap(x), out=be.wrap(y), stream=s)
        s.synchronize()
        good = same(cp.asnumpy(y), layer(cp.asnumpy(x)))
        print(f"{'ok ' if good else 'BAD'} CuPy zero-copy on a non-default stream", flush=True)
        ok &= good
    except ImportError:
        print("-- CuPy not installed: zero-copy CuPy case not run")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases (racecheck is slow)")
    ap.add_argument("--backend", default="cuda", help="cuda (default); others to try it out")
    # racecheck looks at shared memory: torch's and CuPy's own kernels only cost it time.
    ap.add_argument("--no-interop", action="store_true",
                    help="skip the torch and CuPy zero-copy cases")
    args = ap.parse_args()
    be = ql.backend(args.backend)
    rng = np.random.default_rng(7)
    ms, ks = (MS[:3], KS[:2]) if args.quick else (MS, KS)
    dtypes = [ql.f16] if args.quick else [ql.f16, ql.bf16, ql.f32] + (
        [ql.f64] if be.name != "wgpu" else [])
    ok = all([run_case(be, m, k, N, dt, rng) for m in ms for k in ks for dt in dtypes])
    cases = SCHEME_CASES[:1] if args.quick else SCHEME_CASES
    ok &= all([run_scheme_case(be, m, k, N, getattr(ql, dt), sch, rng)
               for m, k, dt, sch in cases])
    if be.name == "cuda" and not args.no_interop:
        ok &= zero_copy(be, rng)
    print("all ok" if ok else "FAILURES", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
