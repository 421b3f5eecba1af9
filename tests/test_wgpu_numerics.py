"""wgpu numerics: both inner-product strategies, both f16 storages, bf16, the 8 x 8
register tiles, exact f32 chunks, rounding ties and edges, subnormals, the activation
pass alone.

Every numeric check is against the independent int64 oracle of ``qltest``, on fresh
random data, with outputs poisoned before the run and every element compared bit
for bit. Runs on whatever adapter wgpu finds (lavapipe on a machine without a GPU);
skipped with the reason when there is none.
"""

import numpy as np
import pytest

import qlinear as ql
from qltest import (
    assert_bitwise_equal,
    oracle_quantize,
    poisoned,
    random_activation,
    random_scale,
    random_weight,
)
from wgpu_helpers import DTYPES, SHAPES, linear, select_plan


@pytest.mark.parametrize("ip", ["dot4", "fma"])
@pytest.mark.parametrize("dtype,storage", [(ql.f32, None), (ql.f16, "native"), (ql.f16, "packed"),
                                           (ql.bf16, None)],
                         ids=["f32", "f16native", "f16packed", "bf16"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_strategies_and_storages(wgpu_be, rng, ip, dtype, storage, m, k, n):
    if storage == "native" and "shader-f16" not in wgpu_be.features:
        pytest.skip("adapter has no shader-f16")
    settings = {"inner_product": ip, "f16_storage": storage}
    plan = select_plan(wgpu_be, m, n, k, dtype, **settings)
    assert f"_{ip}" in plan.sku
    if dtype == ql.f16:
        assert f"f16_{storage}" in plan.sku
    assert ("gemv" in plan.sku) == (m <= 16)
    x = random_activation(rng, m, k, dtype)
    bias = rng.standard_normal(n).astype(dtype.numpy) if m % 2 else None
    with wgpu_be.configured(**settings):
        linear(wgpu_be, x, random_weight(rng, n, k), random_scale(rng, n, dtype), bias, dtype, rng)


@pytest.mark.parametrize("dtype,storage", [(ql.f32, None), (ql.f16, "packed"), (ql.bf16, None)],
                         ids=["f32", "f16packed", "bf16"])
@pytest.mark.parametrize("m,k,n", [(17, 37, 9), (130, 70, 135), (129, 1100, 40)])
def test_8x8_register_tiles(wgpu_be, rng, dtype, storage, m, k, n):
    """The GPU tile (128 x 128 blocks, 8 x 8 per invocation), forced on any adapter."""
    settings = {"tile": "8x8", "f16_storage": storage, "inner_product": "dot4"}
    plan = select_plan(wgpu_be, m, n, k, dtype, **settings)
    assert "128x128" in plan.sku and "r8x8" in plan.sku
    x = random_activation(rng, m, k, dtype)
    with wgpu_be.configured(**settings):
        linear(wgpu_be, x, random_weight(rng, n, k), random_scale(rng, n, dtype),
                rng.standard_normal(n).astype(dtype.numpy), dtype, rng)


@pytest.mark.parametrize("ip", ["dot4", "fma"])
@pytest.mark.parametrize("m", [3, 40])
def test_fma_chunks_are_exact_at_the_extremes(wgpu_be, rng, ip, m):
    """K over several 1024-element chunks with every product at +-2^14: the f32 partial
    sums reach 2^24 exactly, and the int32 sum is exact."""
    k, n, dtype = 3 * 1024 + 8, 6, ql.f32
    x = np.where(rng.random((m, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    x[:, 0] = -1.0  # amax 1, so q = x * 127 ... clamp gives +-127; q_min -128 below
    wq = np.full((n, k), -128, np.int8)
    wq[1::2] = 127
    with wgpu_be.configured(inner_product=ip):
        linear(wgpu_be, x, wq, random_scale(rng, n, dtype), None, dtype, rng, q_min=-128, q_max=127)


def test_default_inner_product_per_adapter(wgpu_be):
    plan = select_plan(wgpu_be, 64, 64, 64, ql.f32)
    want = "fma" if wgpu_be.backend_type in ("Metal", "OpenGL") else "dot4"
    assert plan.sku.endswith(f"_{want}+f32_words")
    assert wgpu_be.info()["inner_product"] == want


def test_f16_native_needs_the_feature(wgpu_be):
    if "shader-f16" in wgpu_be.features:
        assert "f16_native" in select_plan(wgpu_be, 2, 2, 2, ql.f16).sku
    else:
        with pytest.raises(ql.Unsupported, match="shader-f16"):
            select_plan(wgpu_be, 2, 2, 2, ql.f16, f16_storage="native")


@pytest.mark.parametrize("storage", ["native", "packed"])
def test_f16_subnormal_scales_and_inputs(wgpu_be, rng, storage):
    """Rows whose scale is an f16 subnormal, rows that underflow to 0, subnormal inputs."""
    if storage == "native" and "shader-f16" not in wgpu_be.features:
        pytest.skip("adapter has no shader-f16")
    m, k, n, dtype = 6, 11, 5, ql.f16
    x = random_activation(rng, m, k, dtype)
    x[0] *= np.float16(1e-3) / np.abs(x[0]).max()      # scale ~ 8e-6: f16 subnormal
    x[1] = (x[1] / np.abs(x[1]).max() * np.float16(3e-6)).astype(np.float16)  # underflow: scale 1
    x[2] = np.float16(6e-8) * np.sign(x[2])            # the smallest subnormal
    x[3, ::2] = 0
    with wgpu_be.configured(f16_storage=storage):
        linear(wgpu_be, x, random_weight(rng, n, k), random_scale(rng, n, dtype),
                rng.standard_normal(n).astype(np.float16), dtype, rng)


@pytest.mark.parametrize("exact_only", [False, True], ids=["mixed", "exact"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[d.name for d in DTYPES])
def test_rounding_ties_and_specials(wgpu_be, rng, dtype, exact_only):
    """x / scale exactly on .5 (round half to even), NaN / Inf rows, zero rows, subnormals."""
    m, k, n = 8, 24, 10
    x = random_activation(rng, m, k, dtype)
    # Row 0: amax 127 * s with s a power of two, so x / s is exact; put values on ties.
    s = 2.0 ** -3
    x[0] = np.array([(j % 21 - 10) + 0.5 for j in range(k)]) * s
    x[0, 0] = 127 * s
    x[1, 3] = np.nan
    x[2, 5] = np.inf
    x[3, 7] = -np.inf
    x[4] = 0
    if dtype != ql.f16:
        x[5] = (rng.standard_normal(k) * 1e-39).astype(dtype.numpy)  # f32 / bf16 subnormals
    x = x.astype(dtype.numpy)
    with wgpu_be.configured(quantize_exact_only=exact_only):
        linear(wgpu_be, x, random_weight(rng, n, k), random_scale(rng, n, dtype),
                rng.standard_normal(n).astype(dtype.numpy), dtype, rng)


@pytest.mark.parametrize("exact_only", [False, True], ids=["mixed", "exact"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[d.name for d in DTYPES])
def test_quantization_near_rounding_edges(wgpu_be, rng, dtype, exact_only):
    """Many quotients x / scale within a few ulps of k + 0.5, where a float division or
    a reciprocal may round the other way: the exact path must agree with the oracle
    (forced for every element too, since an adapter's division may happen to wgpu_be exact)."""
    m, k = 64, 512
    q_max = 127
    rows = []
    for _ in range(m):
        amax = np.float32(rng.uniform(0.5, 4.0))
        s = (np.array([amax], np.float32) / np.float32(q_max)).astype(dtype.numpy)
        s32 = np.float32(s[0])
        t = rng.integers(-127, 127, k) + 0.5
        eps = rng.choice([-3, -2, -1, 0, 1, 2, 3], k) * 2.0 ** -20 * np.abs(t)
        row = ((t + eps) * np.float64(s32)).astype(np.float32)
        row[0] = amax
        rows.append(row)
    x = np.array(rows).astype(dtype.numpy)
    desc = ql.DynamicRangeQuantizeDescriptor(m=m, k=k, dtype=dtype)
    with wgpu_be.configured(quantize_exact_only=exact_only):
        plan = ql.DynamicRangeQuantizePlan.select(wgpu_be, desc)
    assert ("_exact" in plan.sku) == exact_only
    args = ql.DynamicRangeQuantizeArgs(activation=wgpu_be.from_numpy(x),
                                       act_q=poisoned(wgpu_be, (m, k), ql.s8, rng),
                                       act_scale=poisoned(wgpu_be, (m,), dtype, rng))
    plan.run(args)
    q, s = oracle_quantize(x, dtype)
    assert_bitwise_equal(wgpu_be.to_numpy(args.act_scale), s, dtype.name)
    assert_bitwise_equal(wgpu_be.to_numpy(args.act_q).astype(np.int64), q, dtype.name)


def test_bf16_output_rounding_is_nearest_even(wgpu_be, rng):
    """Outputs that fall exactly halfway between two bf16 values, and outputs with
    mantissa bits just above and below halfway."""
    m, k, n, dtype = 5, 8, 64, ql.bf16
    x = random_activation(rng, m, k, dtype)
    wq = random_weight(rng, n, k)
    # bias values with a half-ulp pattern: y = acc*s*ws + bias lands near bf16 ties often.
    ws = (np.ones(n) * 2.0 ** -7).astype(dtype.numpy)
    bias = (rng.integers(-2**10, 2**10, n) * 2.0 ** -9 + 2.0 ** -17).astype(dtype.numpy)
    linear(wgpu_be, x, wq, ws, bias, dtype, rng)
    linear(wgpu_be, x, wq, ws, None, dtype, rng)


def test_quantizeselect_plan(wgpu_be, rng):
    for dtype in DTYPES:
        m, k = 4, 29
        x = random_activation(rng, m, k, dtype)
        desc = ql.DynamicRangeQuantizeDescriptor(m=m, k=k, dtype=dtype, q_min=-100, q_max=90)
        plan = ql.DynamicRangeQuantizePlan.select(wgpu_be, desc)
        assert plan.sku.startswith("wgpu.rowquant")
        args = ql.DynamicRangeQuantizeArgs(activation=wgpu_be.from_numpy(x),
                                           act_q=poisoned(wgpu_be, (m, k), ql.s8, rng),
                                           act_scale=poisoned(wgpu_be, (m,), dtype, rng))
        plan.run(args)
        q, s = oracle_quantize(x, dtype, -100, 90)
        assert_bitwise_equal(wgpu_be.to_numpy(args.act_scale), s, dtype.name)
        assert_bitwise_equal(wgpu_be.to_numpy(args.act_q).astype(np.int64), q, dtype.name)
