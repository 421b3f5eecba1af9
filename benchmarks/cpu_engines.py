"""The cpu backend's two engines beside torch's W8A8 composition and numpy's float32
matmul, side by side in one run.

For each shape four things are timed: a cpu layer call (``layer.forward(x, out=y)``:
argument checks, activation pass, exact int8 GEMM, dequant + bias) with the oneDNN
engine and with the numpy engine, torch's W8A8 composition (per-token quant,
``torch._int_mm``, dequant + bias; :func:`qlinear.bench.torch_peers`) and
``numpy.matmul`` in float32. They are timed in rounds: each round runs each one for a
block of calls, in an order shuffled per round, after a pause and an untimed call, so
that drift on a shared machine hits all of them alike and none pays for the thread
pool another left spinning. A round's figure is its block's median call; ratios are
taken per round (baseline / oneDNN engine: > 1 means the cpu layer is faster); the
table gives the medians over rounds, with the interquartile range as the spread (the
JSON also the extremes).

    PYTHONPATH=. python benchmarks/cpu_engines.py [--seconds 8] [--json FILE]
"""

import argparse
import functools
import json
import random
import statistics
import sys
import time

import numpy as np

import qlinear as ql
from qlinear.bench import run_meta
from qlinear.bench.peers import TORCH_W8A8, torch_peers

SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (512, 4096, 4096), (512, 384, 1536),
          (1, 4096, 14336), (16, 4096, 14336), (512, 4096, 14336),
          (1, 384, 1536), (16, 384, 1536)]


def interleaved(runs, seconds, min_rounds=9):
    """Per-round median call times (ms) of every run: each round runs each one, in an
    order shuffled per round, for a block of calls after a pause and an untimed call
    (numpy's BLAS threads spin for a while after a call, 2**28 cycles by default, and
    torch's pool too: a run must not pay for the one before it)."""
    names = list(runs)
    first = {}
    for name in names:
        t0 = time.perf_counter()
        runs[name]()
        first[name] = time.perf_counter() - t0
    # Calls per block: about seconds / (rounds * runs) of work, 1 to 200.
    calls = {name: max(1, min(200, int(seconds / min_rounds / len(names) / t)))
             for name, t in first.items()}
    times = {name: [] for name in names}
    order = random.Random(0)
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or time.perf_counter() - start < seconds:
        order.shuffle(names)
        for name in names:
            time.sleep(0.15)
            runs[name]()
            block = []
            for _ in range(calls[name]):
                t0 = time.perf_counter()
                runs[name]()
                block.append((time.perf_counter() - t0) * 1e3)
            times[name].append(statistics.median(block))
        rounds += 1
    return times, calls


def torch_threads():
    import torch

    return torch.get_num_threads()


def spread(values):
    q1, _, q3 = statistics.quantiles(values, n=4)
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values),
            "max": max(values), "n": len(values)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0,
                    help="of timed calls per shape (at least 9 rounds)")
    ap.add_argument("--shapes", default="", help="M,K,N;M,K,N... (default: SHAPES)")
    ap.add_argument("--json", help="write the rows as JSON")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s] or SHAPES
    be = ql.backend("cpu")
    if be.engine.engine != "onednn":
        sys.exit(f"the oneDNN engine does not run here: {be.engine.why}")
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'M':>4} {'K':>5} {'N':>5} | {'onednn':>8} {'numpy':>8} {'torch':>8} {'np f32':>8} "
          f"| {'vs torch [IQR]':>17} {'vs np f32 [IQR]':>17}  (ms, medians over rounds)")
    for m, k, n in shapes:
        w = rng.standard_normal((n, k)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
        layer = ql.QuantizedLinear.from_float(w, bias, backend=be)
        with be.configured(engine="numpy"):
            layer_np = ql.QuantizedLinear.from_float(w, bias, backend=be)
            layer_np.plan(m)
        y, y_np = np.empty((m, n), np.float32), np.empty((m, n), np.float32)
        a32 = rng.standard_normal((m, k)).astype(np.float32)
        b32 = np.ascontiguousarray(w.T)
        peer = torch_peers(m, k, n, "f32")[TORCH_W8A8]
        runs = {"onednn": functools.partial(layer.forward, x, out=y),
                "numpy": functools.partial(layer_np.forward, x, out=y_np),
                "torch_w8a8": peer,
                "numpy_f32": functools.partial(np.matmul, a32, b32)}
        for fn in runs.values():
            fn()  # warm-up: caches, first-touch, oneDNN's primitive cache
        assert np.array_equal(y, y_np), "the engines differ"
        times, calls = interleaved(runs, args.seconds)
        vs = {b: [tb / ta for tb, ta in zip(times[b], times["onednn"])]
              for b in ("torch_w8a8", "numpy_f32", "numpy")}
        row = {"m": m, "k": k, "n": n, "sku": layer.plan(m).sku,
               "sku_numpy": layer_np.plan(m).sku,
               **{f"{name}_ms": spread(v) for name, v in times.items()},
               **{f"vs_{b}": spread(v) for b, v in vs.items()}, "calls_per_block": calls}
        rows.append(row)
        med = {name: statistics.median(v) for name, v in times.items()}
        r1, r2 = row["vs_torch_w8a8"], row["vs_numpy_f32"]
        print(f"{m:>4} {k:>5} {n:>5} | {med['onednn']:>8.3f} {med['numpy']:>8.3f} "
              f"{med['torch_w8a8']:>8.3f} {med['numpy_f32']:>8.3f} | "
              f"{r1['median']:>5.2f} [{r1['q1']:.2f}, {r1['q3']:.2f}] "
              f"{r2['median']:>5.2f} [{r2['q1']:.2f}, {r2['q3']:.2f}]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            meta = run_meta(be.name, be.device_name, engine=be.engine.why,
                            torch_threads=torch_threads())
            json.dump({"meta": meta, "peer": peer.detail, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
