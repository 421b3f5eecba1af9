"""Benchmark of the wgpu backend beside the cpu backend, on the same machine, in one run.

    python benchmarks/wgpu_bench.py            # (K, N) = (384, 1536), M = 1, 16, 512
    python benchmarks/wgpu_bench.py --full     # + (4096,4096), (4096,14336), (14336,4096),
                                               #   M = 1, 16, 512, 4096 (for a real GPU)
    python benchmarks/wgpu_bench.py --json out.json

First two microbenchmarks for context: dot4I8Packed throughput from registers
(the adapter's int8 peak as WGSL sees it) and a vec4<u32> copy (memory bandwidth).
Then for each shape: the W8A8 plan on wgpu and on cpu, the f32 WGSL tiled matmul of
the same shape on the same adapter (the ratio column: f32 time / W8A8 time) and
numpy's float32 matmul for the cpu. Times are medians of --repeats measurements;
on wgpu a measurement is a batch of runs in one submit divided by the runs in it,
timed by GPU timestamps where the adapter has them (else wall time to the end of
the batch), so per-submit overhead is amortised as a real pipeline would. Every
plan's output is first checked bit for bit against ``qlinear.reference``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")

import qlinear as ql  # noqa: E402
from qlinear.bench import float_matmul  # noqa: E402
from qlinear.bench.wgpu_kernels import micro_kernels  # noqa: E402
from qlinear.reference import reference_linear  # noqa: E402

SMALL = [(384, 1536)]
FULL = [(4096, 4096), (4096, 14336), (14336, 4096)]


def measure(fn, repeats: int, min_time: float = 0.05, max_inner: int = 64, batch=None):
    """Median seconds per call of ``fn``: calls grouped so one measurement lasts >= min_time.
    ``batch(inner)``, when given, runs ``inner`` calls and returns their seconds (or None
    for wall time)."""
    fn()  # warm-up: compile, allocate, first-touch
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    inner = max(1, min(max_inner, int(min_time / max(one, 1e-7))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        took = None
        if batch is not None:
            took = batch(inner)
        else:
            for _ in range(inner):
                fn()
        if took is None:
            took = time.perf_counter() - t0
        times.append(took / inner)
    return statistics.median(times)


def setup(be, m, k, n, dtype, rng):
    x = (rng.standard_normal((m, k)) * 2).astype(dtype.numpy)
    wq = rng.integers(-127, 128, (n, k), dtype=np.int8)
    ws = (rng.uniform(0.5, 2, n) * 1e-2).astype(dtype.numpy)
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype)
    plan = ql.QuantizedLinearPlan.select(be, desc)
    args = ql.QuantizedLinearArgs(
        activation=be.from_numpy(x), weight_q=be.from_numpy(wq, readonly=True),
        weight_scale=be.from_numpy(ws, readonly=True), output=be.empty((m, n), dtype),
        act_q_scratch=be.empty((m, k), ql.s8), act_scale_scratch=be.empty((m,), dtype))
    plan.run(args)
    got = be.to_numpy(args.output)
    want = reference_linear(x, wq, ws, None, dtype)[0]
    ok = np.array_equal(got.view(np.uint8), want.view(np.uint8))
    return plan, args, ok


def bench_plan(be, plan, args, repeats):
    if be.name == "wgpu":
        def batch(inner):
            with be.batch(timestamps=be.has_timestamps) as b:
                for _ in range(inner):
                    plan.run(args, stream=b)
            be.synchronize()
            return b.gpu_seconds() if b.timestamps else None

        def one():
            plan.run(args)
            be.synchronize()
        return measure(one, repeats, batch=batch)
    return measure(lambda: plan.run(args), repeats)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also the large LLM shapes and M=4096")
    ap.add_argument("--dtype", default="f16", help="TIn: f32, f16 or bf16 (default f16)")
    ap.add_argument("--repeats", type=int, default=7, help="measurements per figure (median)")
    ap.add_argument("--no-cpu", action="store_true", help="skip the cpu backend columns")
    ap.add_argument("--inner-product", choices=["dot4", "fma"],
                    help="force the wgpu inner-product strategy (default: per adapter)")
    ap.add_argument("--tile", choices=["4x4", "8x8"],
                    help="force the register tile of the dot4 GEMM (default: per adapter)")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)
    dtype = ql.dtypes.as_dtype(a.dtype)
    gpu = ql.backend("wgpu")
    cpu = ql.backend("cpu")
    rng = np.random.default_rng(0)
    shapes = [(k, n, m) for k, n in SMALL for m in (1, 16, 512)]
    if a.full:
        shapes += [(k, n, m) for k, n in FULL for m in (1, 16, 512, 4096)]
    print(f"wgpu: {gpu.device_name}")
    print(f"cpu:  {cpu.device_name}")
    timing = "GPU timestamps" if gpu.has_timestamps else "wall time"
    print(f"dtype {dtype.name}, median of {a.repeats}; wgpu timed by {timing} over batched runs")

    words = (1 << 24) if gpu.is_gpu else (1 << 20)
    micro = micro_kernels(gpu, words=words, iters=256 if gpu.is_gpu else 64)
    run, ops = micro["dot4"]
    t = measure(run, a.repeats)
    dot4_gops = ops / t / 1e9
    run, nbytes = micro["copy"]
    t = measure(run, a.repeats)
    copy_gbs = nbytes / t / 1e9
    print(f"micro: dot4I8Packed {dot4_gops:.1f} GOPS (int8 ops, 8 per dot4), "
          f"copy {copy_gbs:.2f} GB/s (read + write)\n")
    del micro

    hdr = (f"{'K':>6} {'N':>6} {'M':>5} | {'wgpu ms':>9} {'GOPS':>8} {'%dot4':>6} {'f32mm ms':>9} "
           f"{'ratio':>6} | {'cpu ms':>9} {'GOPS':>8} {'np f32 ms':>9} | {'cpu/wgpu':>8}  sku")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for k, n, m in shapes:
        ops = 2 * m * k * n
        with gpu.configured(inner_product=a.inner_product, tile=a.tile):
            plan, args, ok = setup(gpu, m, k, n, dtype, rng)
        t_gpu = bench_plan(gpu, plan, args, a.repeats)
        mm = float_matmul(gpu, m, k, n, ql.f32)
        t_mm = measure(mm, a.repeats) if mm else float("nan")
        row = {"k": k, "n": n, "m": m, "dtype": dtype.name, "wgpu_s": t_gpu, "wgpu_ok": ok,
               "wgpu_sku": plan.sku, "wgpu_f32_matmul_s": t_mm}
        t_cpu = t_np = float("nan")
        if not a.no_cpu:
            cplan, cargs, cok = setup(cpu, m, k, n, dtype, rng)
            reps = a.repeats if ops < 2**33 else min(a.repeats, 3)
            t_cpu = bench_plan(cpu, cplan, cargs, reps)
            t_np = measure(float_matmul(cpu, m, k, n, ql.f32), reps)
            row.update(cpu_s=t_cpu, cpu_ok=cok, numpy_f32_matmul_s=t_np)
        rows.append(row)
        flag = "" if ok else "  WRONG OUTPUT"
        gops = ops / t_gpu / 1e9
        pct = row["wgpu_pct_dot4_peak"] = 100 * gops / dot4_gops
        print(f"{k:>6} {n:>6} {m:>5} | {t_gpu * 1e3:>9.3f} {gops:>8.2f} {pct:>6.1f} "
              f"{t_mm * 1e3:>9.3f} {t_mm / t_gpu:>6.2f} | {t_cpu * 1e3:>9.3f} "
              f"{ops / t_cpu / 1e9:>8.2f} {t_np * 1e3:>9.3f} | {t_cpu / t_gpu:>8.2f}  "
              f"{plan.sku}{flag}", flush=True)
        del plan, args
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"wgpu_device": gpu.device_name, "cpu_device": cpu.device_name,
                       "dtype": dtype.name, "timing": timing, "rows": rows,
                       "micro": {"dot4_gops": dot4_gops, "copy_gbs": copy_gbs}}, f, indent=1)
    return 0 if all(r["wgpu_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
