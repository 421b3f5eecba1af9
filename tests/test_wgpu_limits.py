"""wgpu limits: dispatch splitting past the workgroup-count limit, sub-range binding past
the storage binding limit (lowered, and the real one), tile fallback under the
workgroup-memory limit. Numbers checked against the oracle of ``qltest``."""

import numpy as np
import pytest

import qlinear as ql
from qltest import (
    assert_bitwise_equal,
    oracle_linear,
    random_activation,
    random_scale,
    random_weight,
)
from wgpu_helpers import dispatch_count, linear, linear_args, select_plan


def test_rows_past_65535_split_the_dispatch(wgpu_be, rng):
    """More rows than one dispatch dimension holds, few columns: real limit, bf16."""
    m, k, n, dtype = 65_535 + 4_000, 6, 3, ql.bf16
    x = random_activation(rng, m, k, dtype)
    y = linear(wgpu_be, x, random_weight(rng, n, k), random_scale(rng, n, dtype), None, dtype, rng)
    assert y.shape == (m, n)


@pytest.mark.parametrize("m", [5, 300])
def test_lowered_workgroup_limit_splits_every_kernel(wgpu_be, rng, m):
    k, n, dtype = 9, 150, ql.f16
    plan = select_plan(wgpu_be, m, n, k, dtype, max_workgroups_per_dim=2)
    x = random_activation(rng, m, k, dtype)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    with wgpu_be.configured(max_workgroups_per_dim=2):
        linear(wgpu_be, x, wq, ws, rng.standard_normal(n).astype(np.float16), dtype, rng)
    # Run the selected plan itself: its dispatch list shows the split.
    args = linear_args(wgpu_be, rng, x, wq, ws, None, dtype)
    plan.run(args)
    want_y, _, _ = oracle_linear(x, wq, ws, None, dtype)
    assert_bitwise_equal(wgpu_be.to_numpy(args.output), want_y, plan.sku)
    assert dispatch_count(plan) > 4


@pytest.mark.parametrize("dtype", [ql.f16, ql.f32], ids=["f16", "f32"])
@pytest.mark.parametrize("m", [3, 90])
def test_tensors_past_a_lowered_binding_limit(wgpu_be, rng, dtype, m):
    """Every tensor larger than the (lowered) storage binding limit: bound in sub-ranges,
    at offsets that are not binding-aligned, with 16-bit words split across blocks."""
    k, n = 45, 77
    limit = 1024
    plan = select_plan(wgpu_be, m, n, k, dtype, max_storage_binding=limit)
    x = random_activation(rng, m, k, dtype)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    bias = rng.standard_normal(n).astype(dtype.numpy)
    args = linear_args(wgpu_be, rng, x, wq, ws, bias, dtype)
    plan.run(args)
    want_y, want_q, want_s = oracle_linear(x, wq, ws, bias, dtype)
    assert_bitwise_equal(wgpu_be.to_numpy(args.output), want_y, plan.sku)
    assert_bitwise_equal(wgpu_be.to_numpy(args.act_q_scratch).astype(np.int64), want_q, plan.sku)
    assert_bitwise_equal(wgpu_be.to_numpy(args.act_scale_scratch), want_s, plan.sku)
    assert dispatch_count(plan) > 4


def test_weight_past_the_real_binding_limit(wgpu_be, rng):
    """A weight larger than the adapter's storage binding limit (128 MiB on lavapipe), M = 2."""
    limit = wgpu_be.limits["max-storage-buffer-binding-size"]
    if limit > 256 << 20:
        pytest.skip(f"binding limit {limit} bytes: too large a weight to test here")
    k = 4096
    n = limit // k + 40
    m, dtype = 2, ql.f16
    x = random_activation(rng, m, k, dtype)
    wq = rng.integers(-128, 128, size=(n, k), dtype=np.int8)
    ws = random_scale(rng, n, dtype)
    linear(wgpu_be, x, wq, ws, None, dtype, rng)


def test_workgroup_memory_is_checked(wgpu_be, rng):
    eight = select_plan(wgpu_be, 200, 40, 40, ql.f32, tile="8x8", max_workgroup_storage=4096)
    assert "128x128x16_r8x8" in eight.sku  # BK halved to fit 4 KiB
    # The f32-FMA tiles stage vec4<f32> words: 64x64x32 needs 16 KiB.
    plan = select_plan(wgpu_be, 40, 40, 40, ql.f32, inner_product="fma")
    assert "64x64x32" in plan.sku
    small = select_plan(wgpu_be, 40, 40, 40, ql.f32, inner_product="fma",
                        max_workgroup_storage=4096)
    assert "x16_" in small.sku or "x8_" in small.sku, small.sku
    x = random_activation(rng, 40, 40, ql.f32)
    wq, ws = random_weight(rng, 40, 40), random_scale(rng, 40, ql.f32)
    args = linear_args(wgpu_be, rng, x, wq, ws, None, ql.f32)
    small.run(args)
    assert_bitwise_equal(wgpu_be.to_numpy(args.output), oracle_linear(x, wq, ws, None, ql.f32)[0],
                         small.sku)
    with pytest.raises(ql.Unsupported, match="workgroup memory"):
        select_plan(wgpu_be, 40, 40, 40, ql.f32, max_workgroup_storage=64)
    with pytest.raises(ql.Unsupported, match="workgroup memory"):
        select_plan(wgpu_be, 4, 40, 40, ql.f32, max_workgroup_storage=64)


@pytest.mark.parametrize("inner_product", ["dot4", "fma"])
def test_the_longest_k_loops_are_summed_whole(wgpu_be, rng, inner_product):
    """The largest K at a prefill M, extreme values: on lavapipe, whose loops stop after
    65535 iterations in all, the chooser keeps the tiled GEMM's K loop under that (the
    8 x 8 tile and the f32 path's step of 8 words would drop the end of every row)."""
    k = ql.max_exact_k(-127, 127) // 16 * 16
    m, n, dtype = 80, 6, ql.f32
    x = np.ones((m, k), np.float32)
    x[1::2] = -1
    x[:, -1] = 0.5  # the last element too: a cut K loop loses it first
    wq = np.full((n, k), -128, np.int8)
    wq[1::2, ::3] = 127
    with wgpu_be.configured(inner_product=inner_product):
        linear(wgpu_be, x, wq, random_scale(rng, n, dtype), None, dtype, rng)
