"""The linear plan against the int64 oracle, on every backend (``qlinear_backend``)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qlinear as ql
from qltest import (
    assert_bitwise_equal,
    check_linear,
    oracle_linear,
    random_activation,
    random_scale,
    random_weight,
    run_linear,
)

DTYPES = [ql.f32, ql.f16, ql.bf16, ql.f64]
DT_IDS = [d.name for d in DTYPES]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("m,k,n", [
    (1, 1, 1), (1, 3, 5), (2, 4, 8), (3, 7, 2), (5, 16, 16), (17, 33, 9), (16, 64, 40),
    (33, 130, 65), (64, 256, 128), (7, 1023, 6), (9, 1025, 7), (4, 2051, 3),
    # Prefill shapes (M > 64, K % 16 == 0: the Hopper GEMM's, where it is on), every edge
    # partial: rows, columns (odd), the 128-byte k-tile.
    (65, 48, 5), (130, 272, 136),
])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_linear_matches_oracle(qlinear_backend, dtype, m, k, n, with_bias):
    rng = np.random.default_rng()
    x = random_activation(rng, m, k, dtype)
    wq = random_weight(rng, n, k)
    ws = random_scale(rng, n, dtype)
    bias = rng.standard_normal(n).astype(dtype.numpy) if with_bias else None
    check_linear(qlinear_backend, x, wq, ws, bias, dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("q_min,q_max", [(-128, 127), (-8, 7), (-1, 1), (-100, 20), (-5, 127)])
def test_custom_q_range(qlinear_backend, dtype, q_min, q_max):
    rng = np.random.default_rng()
    m, k, n = 13, 37, 11
    x = random_activation(rng, m, k, dtype)
    check_linear(qlinear_backend, x, random_weight(rng, n, k), random_scale(rng, n, dtype),
                 None, dtype, q_min, q_max, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_special_rows(qlinear_backend, dtype):
    """NaN and Inf rows give NaN outputs; all-zero rows scale 1 and q 0; nothing else touched."""
    rng = np.random.default_rng()
    m, k, n = 8, 21, 6
    x = random_activation(rng, m, k, dtype)
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    x[3, 20] = -np.inf
    x[4] = 0
    x[5, :] = -x[5, :]
    bias = rng.standard_normal(n).astype(dtype.numpy)
    y = check_linear(qlinear_backend, x, random_weight(rng, n, k), random_scale(rng, n, dtype),
                     bias, dtype, rng=rng)
    ny = np.isnan(y.astype(np.float64))
    assert ny[1:4].all()
    assert not ny[[0, 4, 5, 6, 7]].any()


@pytest.mark.parametrize("dtype", [ql.f16, ql.bf16, ql.f32], ids=["f16", "bf16", "f32"])
def test_tiny_rows_underflow(qlinear_backend, dtype):
    """A row whose scale rounds to 0 in TIn quantizes like an all-zero row: scale 1, q 0."""
    rng = np.random.default_rng()
    m, k, n = 4, 9, 5
    x = random_activation(rng, m, k, dtype)
    # amax / 127 must fall below half the smallest subnormal of TIn (f16 6e-8, bf16 9.2e-41,
    # f32 1.4e-45); such rows are themselves subnormal, so the result is the same whether a
    # backend flushes subnormal inputs to zero or not.
    tiny = {"f16": 3e-6, "bf16": 1e-39, "f32": 5e-44}[dtype.name]
    x[2] = np.full(k, tiny, np.float64).astype(dtype.numpy)
    x[2, ::2] *= -1
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    y, aq, asc, _ = run_linear(qlinear_backend, x, wq, ws, None, dtype, rng=rng)
    assert asc[2] == 1 and not aq[2].any()
    want_y, _, _ = oracle_linear(x, wq, ws, None, dtype)
    assert_bitwise_equal(y, want_y, "output")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("m", [2, 80], ids=["m2", "prefill-m80"])
def test_extreme_accumulation_is_exact(qlinear_backend, dtype, m):
    """|acc| close to 2**31: every q at q_max, every weight at -128, largest K allowed (a
    multiple of 16 at M = 80, so that prefill GEMMs with aligned-K paths take it too)."""
    rng = np.random.default_rng()
    k = ql.max_exact_k(-127, 127)
    k -= k % 16 if m > 64 else 0
    n = 2
    x = np.ones((m, k), dtype.numpy)
    x[1::2] = -x[1::2]
    wq = np.full((n, k), -128, np.int8)
    wq[1, ::3] = 127
    ws = random_scale(rng, n, dtype)
    check_linear(qlinear_backend, x, wq, ws, None, dtype, rng=rng)


@pytest.mark.parametrize("m,k,n", [(0, 8, 4), (4, 8, 0), (0, 0, 0), (3, 0, 5)])
@pytest.mark.parametrize("dtype", [ql.f32, ql.bf16], ids=["f32", "bf16"])
def test_empty_problems(qlinear_backend, dtype, m, k, n):
    rng = np.random.default_rng()
    x = random_activation(rng, m, k, dtype)
    bias = rng.standard_normal(n).astype(dtype.numpy)
    check_linear(qlinear_backend, x, random_weight(rng, n, k), random_scale(rng, n, dtype),
                 bias, dtype, rng=rng)


def test_large_m_past_65535_rows(qlinear_backend):
    """More rows than one dispatch dimension allows (65535), with few columns."""
    rng = np.random.default_rng()
    m, k, n = 65_537 + 3 * 7, 5, 3
    for dtype in (ql.f32, ql.f16):
        x = random_activation(rng, m, k, dtype)
        check_linear(qlinear_backend, x, random_weight(rng, n, k), random_scale(rng, n, dtype),
                     rng.standard_normal(n).astype(dtype.numpy), dtype, rng=rng)


@settings(deadline=None)
@given(
    m=st.one_of(st.integers(1, 40), st.sampled_from([1, 16, 65_536, 70_001])),
    k=st.one_of(st.integers(1, 70), st.sampled_from([1, 3, 1023, 1025, 1500, 2049])),
    n=st.integers(1, 24),
    dtype=st.sampled_from(DTYPES),
    q=st.one_of(st.just((-127, 127)), st.tuples(st.integers(-128, -1), st.integers(1, 127))),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_hypothesis_shapes_dtypes_ranges(qlinear_backend, m, k, n, dtype, q, with_bias, seed):
    if m * k > 3_000_000 or m * n > 400_000:
        k = min(k, 3_000_000 // m)
        n = min(n, max(1, 400_000 // m))
    rng = np.random.default_rng(seed)
    x = random_activation(rng, m, k, dtype)
    bias = rng.standard_normal(n).astype(dtype.numpy) if with_bias else None
    check_linear(qlinear_backend, x, random_weight(rng, n, k), random_scale(rng, n, dtype),
                 bias, dtype, q[0], q[1], rng=rng)


def test_scratch_reused_across_runs(qlinear_backend):
    """One plan, one set of scratch and output tensors, many fresh inputs."""
    be = qlinear_backend
    rng = np.random.default_rng()
    m, k, n, dtype = 6, 19, 10, ql.f32
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype)
    plan = ql.QuantizedLinearPlan.select(be, desc)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    wq_t, ws_t = be.from_numpy(wq, readonly=True), be.from_numpy(ws, readonly=True)
    out = be.empty((m, n), dtype)
    xq, xs = be.empty((m, k), ql.s8), be.empty((m,), dtype)
    for _ in range(3):
        x = random_activation(rng, m, k, dtype)
        plan.run(ql.QuantizedLinearArgs(be.from_numpy(x), wq_t, ws_t, out, xq, xs))
        want, _, _ = oracle_linear(x, wq, ws, None, dtype)
        assert_bitwise_equal(be.to_numpy(out), want, "output")
