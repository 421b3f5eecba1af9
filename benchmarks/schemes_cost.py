"""What each activation scheme costs beside the default, side by side in one run.

One layer per scheme over the same int8 weight (static scales calibrated on the input),
called on device tensors with the result waited for; the schemes are timed in
alternating rounds so that drift on a shared machine hits them all. A figure is the
median over rounds of (dynamic time / scheme time), each time a median of many calls:
as everywhere in qlinear's benchmarks, > 1 means the scheme is faster than the default.
The spread is the lowest and highest ratio over the rounds.

    PYTHONPATH=. python benchmarks/schemes_cost.py [--backend cpu --backend wgpu] [--json FILE]
"""

import argparse
import json
import statistics

import numpy as np

import qlinear as ql
from qlinear.bench.provenance import git_commit
from qlinear.bench.timing import time_stats

SCHEMES = ["dynamic", "static", "static_asym", "dynamic_asym"]
SHAPES = {  # (M, K, N) per backend: lavapipe runs on the CPU, so its set is smaller
    "cpu": [(1, 4096, 4096), (16, 4096, 4096), (512, 384, 1536), (512, 4096, 4096)],
    "wgpu": [(1, 4096, 4096), (16, 4096, 4096), (512, 384, 1536)],
    "cuda": [(1, 4096, 4096), (16, 4096, 4096), (512, 4096, 4096), (4096, 4096, 4096)],
}


def layers(be, wq, ws, x):
    amax = float(np.abs(x).max())
    consts = {"static": {"input_scale": amax / 127},
              "static_asym": {"input_scale": amax / 127.5, "input_zero_point": 3}}
    return {s: ql.QuantizedLinear(wq, ws, backend=be, scheme=s, **consts.get(s, {}))
            for s in SCHEMES}


def measure(be, m, k, n, rounds, rng):
    wq = rng.integers(-128, 128, (n, k), dtype=np.int8)
    ws = (rng.uniform(0.5, 2.0, n) * 1e-2).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    by_scheme = layers(be, wq, ws, x)
    xd = x if be.host_memory else be.from_numpy(x)
    out = {s: be.empty((m, n), ql.f32) for s in SCHEMES}
    times = {s: [] for s in SCHEMES}
    budget = max(0.05, min(0.5, 2e-11 * m * k * n))
    for _ in range(rounds):
        for s in SCHEMES:
            layer, y = by_scheme[s], out[s]
            st = time_stats(lambda layer=layer, y=y: layer.forward(xd, out=y),
                            be.synchronize, budget, 200)
            times[s].append(st.median * 1e3)
    row = {"backend": be.name, "device": be.device_name, "m": m, "k": k, "n": n,
           "commit": git_commit(), "rounds": rounds}
    for s in SCHEMES:
        row[f"{s}_ms"] = statistics.median(times[s])
        if s != "dynamic":
            ratios = [d / t for d, t in zip(times["dynamic"], times[s], strict=True)]
            row[f"dynamic_over_{s}"] = statistics.median(ratios)
            row[f"dynamic_over_{s}_spread"] = [min(ratios), max(ratios)]
        row[f"{s}_sku"] = by_scheme[s].plan(m).sku
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", action="append", help="cpu, wgpu, cuda (default: cpu and "
                    "every other available one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the rows as JSON")
    args = ap.parse_args()
    names = args.backend or [s.name for s in ql.backend_status() if s.available]
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'backend':>7} {'M':>5} {'K':>5} {'N':>5} {'dynamic ms':>10}  "
          + "  ".join(f"{'dyn/' + s:>18}" for s in SCHEMES[1:]) + "  (median [min, max])")
    for name in names:
        be = ql.backend(name)
        for m, k, n in SHAPES[name]:
            row = measure(be, m, k, n, args.rounds, rng)
            rows.append(row)
            cells = "  ".join(
                f"{row[f'dynamic_over_{s}']:>5.2f} [{row[f'dynamic_over_{s}_spread'][0]:.2f}, "
                f"{row[f'dynamic_over_{s}_spread'][1]:.2f}]" for s in SCHEMES[1:])
            print(f"{name:>7} {m:>5} {k:>5} {n:>5} {row['dynamic_ms']:>10.3f}  {cells}",
                  flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
