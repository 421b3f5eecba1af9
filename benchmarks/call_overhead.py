"""Host-side call overhead: cpu layer.forward at (1, 384, 1536) f32 on each cpu engine
(and the validation alone: plan.can_implement), and the time to encode one wgpu plan.run
into a batch (validation + run cache + encoding). Prints JSON.

Compare two commits by running it alternately from each one's tree:
``PYTHONPATH=<tree> OMP_NUM_THREADS=1 python benchmarks/call_overhead.py``."""

import contextlib
import json
import time

import numpy as np

import qlinear as ql


def best_of(fn, batches=15, per=200):
    out = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(per):
            fn()
        out.append((time.perf_counter() - t0) / per)
    return min(out) * 1e6

rng = np.random.default_rng(1)
M, K, N = 1, 384, 1536
w = rng.standard_normal((N, K)).astype(np.float32)
b = rng.standard_normal(N).astype(np.float32)
x = rng.standard_normal((M, K)).astype(np.float32)
res = {}
cpu_be = ql.backend("cpu")
y = np.empty((M, N), np.float32)
engines = [getattr(cpu_be, "engine", None)]
for engine in ["numpy", "onednn"] if engines[0] is not None else [None]:
    if engine == "onednn" and cpu_be.engine.engine != "onednn":
        continue
    ctx = cpu_be.configured(engine=engine) if engine else contextlib.nullcontext()
    with ctx:
        cpu = ql.QuantizedLinear.from_float(w, b, backend=cpu_be)
        cpu.forward(x, out=y)
    label = f"cpu layer.forward ({engine} engine)" if engine else "cpu layer.forward"
    res[label] = best_of(lambda cpu=cpu: cpu.forward(x, out=y))
    plan = cpu.plan(M)
    q, s, _ = cpu.scratch(M)
    cargs = ql.QuantizedLinearArgs(x, cpu.weight_q, cpu.weight_scale, y, q, s, cpu.bias)
    res[f"{label}: validation (can_implement)"] = best_of(
        lambda plan=plan, cargs=cargs: plan.can_implement(cargs))
    if hasattr(plan, "_checked"):  # the run's checks, last run's arguments recognised
        plan._checked(cargs)
        res[f"{label}: checks of run, same arguments again"] = best_of(
            lambda plan=plan, cargs=cargs: plan._checked(cargs))
be = ql.backend("wgpu")
wq, ws = ql.quantize_weight(w)
plan = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(M, N, K, ql.f32))
args = ql.QuantizedLinearArgs(be.from_numpy(x), be.from_numpy(wq, readonly=True),
                              be.from_numpy(ws, readonly=True), be.empty((M, N), ql.f32),
                              be.empty((M, K), ql.s8), be.empty((M,), ql.f32),
                              be.from_numpy(b, readonly=True))
plan.run(args)
be.synchronize()
samples = []
for _ in range(15):
    with be.batch() as bt:
        t0 = time.perf_counter()
        for _ in range(100):
            plan.run(args, stream=bt)
        samples.append((time.perf_counter() - t0) / 100 * 1e6)
    be.synchronize()
res["wgpu plan.run into a batch"] = min(samples)
print(json.dumps(res))
