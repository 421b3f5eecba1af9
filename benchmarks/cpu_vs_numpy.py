"""The cpu plan beside float32 ``numpy.matmul`` of the same shape, side by side in one run.

What a layer call does is timed (activation pass + exact chunked BLAS + dequant; the
layer's prepared f32 weight reused) against ``x @ w_t`` in float32. The two are timed
in alternating rounds so that drift on a shared machine hits both; the figure is the
median over rounds of (matmul time / plan time), each time a median of many calls: as
everywhere in qlinear's benchmarks, ratio = baseline time / qlinear time, > 1 means
qlinear is faster.

    PYTHONPATH=. python benchmarks/cpu_vs_numpy.py [--json FILE]
"""

import argparse
import json
import statistics
import time

import numpy as np

import qlinear as ql

SHAPES = [(384, 1536), (4096, 4096)]
MS = [1, 16, 512]


def median_ms(fn, n):
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the rows as JSON")
    args = ap.parse_args()
    be = ql.backend("cpu")
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'K':>5} {'N':>5} {'M':>4} {'plan ms':>9} {'matmul ms':>9} {'mm/plan':>7}  (median of "
          f"{args.rounds} rounds)")
    for k, n in SHAPES:
        w = rng.standard_normal((n, k)).astype(np.float32)
        w_t = np.ascontiguousarray(w.T)
        layer = ql.QuantizedLinear.from_float(w, backend=be)
        for m in MS:
            x = rng.standard_normal((m, k)).astype(np.float32)
            y = np.empty((m, n), np.float32)
            calls = max(5, min(2000, int(2e9 / (m * k * n + 1e6))))
            plan_t, mm_t, ratios = [], [], []
            for _ in range(args.rounds):
                a = median_ms(lambda layer=layer, x=x, y=y: layer.forward(x, out=y), calls)
                b = median_ms(lambda x=x, w_t=w_t: x @ w_t, calls)
                plan_t.append(a)
                mm_t.append(b)
                ratios.append(b / a)
            row = {"m": m, "k": k, "n": n, "plan_ms": statistics.median(plan_t),
                   "matmul_ms": statistics.median(mm_t),
                   "vs_float_matmul": statistics.median(ratios),
                   "sku": layer.plan(m).sku}
            rows.append(row)
            print(f"{k:>5} {n:>5} {m:>4} {row['plan_ms']:>9.4f} {row['matmul_ms']:>9.4f} "
                  f"{row['vs_float_matmul']:>7.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
