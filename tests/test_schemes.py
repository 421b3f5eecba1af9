"""The activation schemes (static per-tensor, symmetric or with a zero point; dynamic
per-token asymmetric) on every backend (``qlinear_backend``), against the int64 oracle."""

import numpy as np
import pytest

import qlinear as ql
from qltest import (
    OTHER_SCHEME_IDS,
    OTHER_SCHEMES,
    check_linear_scheme,
    check_quantize_scheme,
    oracle_linear_scheme,
    poisoned,
    random_activation,
    random_scale,
    random_weight,
    scheme_args,
    shifted_activation,
)

S = ql.ActivationScheme
SCHEMES, SCHEME_IDS = OTHER_SCHEMES, OTHER_SCHEME_IDS
DTYPES = [ql.f32, ql.f16, ql.bf16, ql.f64]
DT_IDS = [d.name for d in DTYPES]


def static_constants(rng, x, scheme, q_min=-128, q_max=127):
    """An input scale that maps most of x into range (some values saturate) and, for
    ``static_asym``, a random zero point in range."""
    finite = np.abs(x.astype(np.float64))
    finite = finite[np.isfinite(finite)]
    amax = float(finite.max()) if finite.size else 1.0
    scale = max(amax, 1e-3) / rng.uniform(60, 160)
    zp = int(rng.integers(q_min // 2, q_max // 2 + 1)) if scheme.static_zero_point else None
    return (scale, zp) if scheme.static else (None, None)


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 37, 5), (4, 64, 16), (16, 130, 24),
                                   (33, 257, 65), (70, 1100, 9), (130, 272, 136)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_scheme_matches_oracle(qlinear_backend, scheme, dtype, m, k, n, with_bias):
    rng = np.random.default_rng()
    x = shifted_activation(rng, m, k, dtype)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    wq[0, : min(k, 5)] = -128  # checkpoint weights hold -128
    bias = rng.standard_normal(n).astype(dtype.numpy) if with_bias else None
    s, z = static_constants(rng, x, scheme)
    check_linear_scheme(qlinear_backend, x, wq, ws, bias, dtype, scheme, s, z, rng=rng)


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_scheme_special_rows(qlinear_backend, scheme, dtype):
    """NaN/Inf rows give NaN outputs with q and zp 0; constant, all-zero, single-signed and
    saturating rows follow the rules; no other row is touched."""
    rng = np.random.default_rng()
    m, k, n = 10, 23, 7
    x = shifted_activation(rng, m, k, dtype)
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    x[3, 22] = -np.inf
    x[4] = 0
    x[5] = x[5, 0]  # constant row
    x[6] = np.abs(x[6]) + 1  # all positive: the zero point clamps at q_min
    x[7] = -np.abs(x[7]) - 1  # all negative
    s, z = static_constants(rng, x, scheme)
    if scheme.static:
        x[8, ::3] = (s * 400)  # beyond the range: saturates
        x[8, 1::3] = -(s * 400)
    bias = rng.standard_normal(n).astype(dtype.numpy)
    y, _ = check_linear_scheme(qlinear_backend, x, random_weight(rng, n, k),
                               random_scale(rng, n, dtype), bias, dtype, scheme, s, z, rng=rng)
    ny = np.isnan(y.astype(np.float64))
    assert ny[1:4].all()
    assert not ny[[0, 4, 5, 6, 7, 8, 9]].any()


@pytest.mark.parametrize("dtype", [ql.f16, ql.f32], ids=["f16", "f32"])
def test_asym_scale_underflow_takes_the_symmetric_rule(qlinear_backend, dtype):
    """A row whose (max - min) / 255 rounds to 0 in TIn but whose amax / 127 does not is
    quantized symmetrically with zero point 0: two neighbouring normal values (f16: 2**-14
    and the next; f32: just below 2**-119, where amax / 127 is still a normal f32)."""
    rng = np.random.default_rng()
    m, k, n = 3, 11, 4
    x = shifted_activation(rng, m, k, dtype)
    base = np.array({"f16": 2.0**-14, "f32": 0.995 * 2.0**-119}[dtype.name], dtype.numpy)
    x[1] = base
    x[1, ::2] = np.nextafter(base, np.array(np.inf, dtype.numpy))
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    check_linear_scheme(qlinear_backend, x, wq, ws, None, dtype, S.DYNAMIC_ASYM, rng=rng)
    _, q, scale, zp = oracle_linear_scheme(x, wq, ws, None, dtype, S.DYNAMIC_ASYM)
    assert zp[1] == 0 and np.all(q[1] > 0), "the row did not take the symmetric rule"


@pytest.mark.parametrize("zp", [-128, 127, 0])
@pytest.mark.parametrize("dtype", [ql.f32, ql.bf16], ids=["f32", "bf16"])
def test_static_zero_point_at_the_bounds(qlinear_backend, dtype, zp):
    rng = np.random.default_rng()
    m, k, n = 5, 40, 6
    x = shifted_activation(rng, m, k, dtype)
    s, _ = static_constants(rng, x, S.STATIC_ASYM)
    check_linear_scheme(qlinear_backend, x, random_weight(rng, n, k), random_scale(rng, n, dtype),
                        None, dtype, S.STATIC_ASYM, s, zp, rng=rng)


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("m", [2, 80], ids=["m2", "prefill-m80"])
def test_asym_accumulation_at_the_k_bound(qlinear_backend, scheme, m):
    """The largest K the scheme allows, every q and weight at an extreme: exact int32 (K a
    multiple of 16 at M = 80: the prefill GEMMs' aligned paths)."""
    rng = np.random.default_rng()
    k = ql.max_exact_k(-128, 127, scheme.asymmetric)
    k -= k % 16 if m > 64 else 0
    n, dtype = 2, ql.f32
    x = np.ones((m, k), np.float32)
    x[1::2, ::2] = -1
    x[0::2, -1] = -1  # a min below the max, so the asymmetric rule applies
    wq = np.full((n, k), -128, np.int8)
    wq[1, ::3] = 127
    s, z = (1.0 / 127, -128) if scheme.static else (None, None)
    check_linear_scheme(qlinear_backend, x, wq, random_scale(rng, n, dtype), None, dtype, scheme,
                        s, z if scheme.static_zero_point else None, q_min=-128, rng=rng)


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("m,k", [(1, 1), (3, 5), (17, 1025), (64, 257)])
def test_quantize_scheme_matches_oracle(qlinear_backend, scheme, dtype, m, k):
    rng = np.random.default_rng()
    x = shifted_activation(rng, m, k, dtype)
    x[0, 0] = np.nan if m > 1 else x[0, 0]
    s, z = static_constants(rng, x, scheme)
    check_quantize_scheme(qlinear_backend, x, dtype, scheme, s, z, rng=rng)


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_custom_q_range(qlinear_backend, scheme):
    rng = np.random.default_rng()
    m, k, n, dtype = 9, 31, 5, ql.f32
    x = shifted_activation(rng, m, k, dtype)
    s, z = static_constants(rng, x, scheme, -8, 7)
    check_linear_scheme(qlinear_backend, x, random_weight(rng, n, k), random_scale(rng, n, dtype),
                        None, dtype, scheme, s, z, q_min=-8, q_max=7, rng=rng)


def test_scratch_reused_across_runs(qlinear_backend):
    """One plan and one set of tensors; a new static scale and zero point on every run."""
    be = qlinear_backend
    rng = np.random.default_rng()
    m, k, n, dtype = 6, 19, 10, ql.f32
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype, scheme="static_asym")
    plan = ql.QuantizedLinearPlan.select(be, desc)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    extra = scheme_args(be, S.STATIC_ASYM, m, k, n, dtype, rng, wq)
    out, xq, xs = be.empty((m, n), dtype), be.empty((m, k), ql.s8), be.empty((m,), dtype)
    for _ in range(3):
        x = shifted_activation(rng, m, k, dtype)
        s, z = static_constants(rng, x, S.STATIC_ASYM)
        plan.run(ql.QuantizedLinearArgs(
            be.from_numpy(x), be.from_numpy(wq), be.from_numpy(ws), out, xq, xs,
            **(extra | {"input_scale": s, "input_zero_point": z})))
        want, *_ = oracle_linear_scheme(x, wq, ws, None, dtype, S.STATIC_ASYM, s, z)
        np.testing.assert_array_equal(be.to_numpy(out), want)


def test_nothing_written_when_refused(qlinear_backend):
    """A bad static scale is refused before anything the caller owns is written."""
    be = qlinear_backend
    rng = np.random.default_rng()
    m, k, n, dtype = 3, 8, 4, ql.f16
    plan = ql.QuantizedLinearPlan.select(
        be, ql.QuantizedLinearDescriptor(m, n, k, dtype, scheme="static_asym"))
    wq = random_weight(rng, n, k)
    args = dict(activation=be.from_numpy(random_activation(rng, m, k, dtype)),
                weight_q=be.from_numpy(wq), weight_scale=be.from_numpy(random_scale(rng, n, dtype)),
                output=poisoned(be, (m, n), dtype, rng),
                act_q_scratch=poisoned(be, (m, k), ql.s8, rng),
                act_scale_scratch=poisoned(be, (m,), dtype, rng),
                **scheme_args(be, S.STATIC_ASYM, m, k, n, dtype, rng, wq, 0.1, 3))
    before = {name: be.to_numpy(args[name]) for name in
              ("output", "act_q_scratch", "act_scale_scratch", "act_zp_scratch")}
    with pytest.raises(ql.InvalidProblem, match="input_scale"):
        plan.run(ql.QuantizedLinearArgs(**(args | {"input_scale": 1e-9})))  # 0 in f16
    with pytest.raises(ql.InvalidProblem, match="input_zero_point"):
        plan.run(ql.QuantizedLinearArgs(**(args | {"input_zero_point": 128})))
    for name, want in before.items():
        np.testing.assert_array_equal(be.to_numpy(args[name]).view(np.uint8),
                                      want.view(np.uint8), err_msg=name)
