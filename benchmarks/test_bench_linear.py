"""pytest-benchmark: each backend's plan beside the float32 matmul of the same shape.

One group per shape. Run: ``python -m pytest benchmarks/ --benchmark-group-by=group``
(add ``--qlinear-backend=cpu`` for one backend). The plan timing covers what a layer
call does: activation pass + GEMM + dequant epilogue, weights prepared once.
"""

import numpy as np
import pytest

import qlinear as ql
from qlinear.bench import float_matmul

SHAPES = [(m, k, n) for k, n in [(384, 1536), (4096, 4096)] for m in (1, 16, 512)]
IDS = [f"M{m}-K{k}-N{n}" for m, k, n in SHAPES]


def _group(m, k, n):
    return f"M={m} K={k} N={n} f32"


@pytest.mark.parametrize("m,k,n", SHAPES, ids=IDS)
def test_plan(benchmark, qlinear_backend, m, k, n):
    be = qlinear_backend
    if not be.is_gpu and be.name != "cpu" and m * k * n > 512 * 384 * 1536:
        pytest.skip(f"{be.name} on {be.device_name} is a CPU emulation: large shapes too slow")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k)).astype(np.float32)
    layer = ql.QuantizedLinear.from_float(w, backend=be)
    x = be.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    out = be.empty((m, n), ql.f32)
    layer.forward(x, out=out)
    be.synchronize()
    benchmark.group = _group(m, k, n)
    benchmark.extra_info["sku"] = layer.plan(m).sku

    def run():
        layer.forward(x, out=out)
        be.synchronize()
    benchmark(run)


@pytest.mark.parametrize("m,k,n", SHAPES, ids=IDS)
def test_numpy_f32_matmul(benchmark, m, k, n):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w_t = np.ascontiguousarray(rng.standard_normal((n, k)).astype(np.float32).T)
    benchmark.group = _group(m, k, n)
    benchmark(np.matmul, x, w_t)


@pytest.mark.parametrize("m,k,n", SHAPES, ids=IDS)
def test_backend_float_matmul(benchmark, qlinear_backend, m, k, n):
    be = qlinear_backend
    if be.name == "cpu":
        pytest.skip("cpu's float matmul is test_numpy_f32_matmul")
    if not be.is_gpu and m * k * n > 512 * 384 * 1536:
        pytest.skip(f"{be.name} on {be.device_name} is a CPU emulation: large shapes too slow")
    fn = float_matmul(be, m, k, n, ql.f32)
    if fn is None:
        pytest.skip(f"{be.name} offers no float matmul")
    benchmark.group = _group(m, k, n)
    benchmark(fn)
