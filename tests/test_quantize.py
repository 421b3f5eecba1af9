"""The activation pass alone (DynamicRangeQuantizePlan) against the oracle, every backend."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qlinear as ql
from qltest import (
    assert_bitwise_equal,
    oracle_quantize,
    poisoned,
    random_activation,
    select_or_skip,
)

DTYPES = [ql.f32, ql.f16, ql.bf16, ql.f64]


def run_quantize(be, x, dtype, q_min=-127, q_max=127):
    rng = np.random.default_rng()
    m, k = x.shape
    desc = ql.DynamicRangeQuantizeDescriptor(m=m, k=k, dtype=dtype, q_min=q_min, q_max=q_max)
    plan = select_or_skip(ql.DynamicRangeQuantizePlan, be, desc)
    args = ql.DynamicRangeQuantizeArgs(be.from_numpy(x), poisoned(be, (m, k), ql.s8, rng),
                                       poisoned(be, (m,), dtype, rng))
    plan.run(args)
    q, s = be.to_numpy(args.act_q), be.to_numpy(args.act_scale)
    want_q, want_s = oracle_quantize(x, dtype, q_min, q_max)
    assert_bitwise_equal(s, want_s, f"act_scale [{plan.sku}]")
    assert_bitwise_equal(q.astype(np.int64), want_q, f"act_q [{plan.sku}]")
    return q, s


@pytest.mark.parametrize("dtype", DTYPES, ids=[d.name for d in DTYPES])
@pytest.mark.parametrize("m,k", [(1, 1), (1, 3), (3, 4), (17, 1025), (64, 257), (5, 4096)])
def test_quantize_matches_oracle(qlinear_backend, dtype, m, k):
    rng = np.random.default_rng()
    run_quantize(qlinear_backend, random_activation(rng, m, k, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=[d.name for d in DTYPES])
def test_round_half_to_even(qlinear_backend, dtype):
    """Values that sit exactly on .5 after division by the scale round to even."""
    q_max = 64  # scale = 1 exactly when amax = 64: x / 1 = x keeps the .5 ties
    x = np.array([[64.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 63.5, -63.5]], dtype.numpy)
    q, s = run_quantize(qlinear_backend, x, dtype, -64, q_max)
    assert s[0] == 1
    assert q[0].tolist() == [64, 0, 2, 2, 0, -2, -2, 4, 64, -64]


@settings(deadline=None)
@given(m=st.integers(1, 50), k=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       q=st.tuples(st.integers(-128, -1), st.integers(1, 127)), seed=st.integers(0, 2**32 - 1))
def test_hypothesis_quantize(qlinear_backend, m, k, dtype, q, seed):
    rng = np.random.default_rng(seed)
    run_quantize(qlinear_backend, random_activation(rng, m, k, dtype), dtype, *q)
