"""Test helpers: the independent int64 oracle, random data, poisoning, bitwise comparison.

The oracle restates the numerical contract from DESIGN.md with int64 integer
arithmetic; it shares no code with any backend.
"""

from __future__ import annotations

import numpy as np
import pytest

import qlinear as ql

POISON = 31337.0


def compute_type(dtype):
    return np.float64 if dtype == ql.f64 else np.float32


def oracle_quantize(x, dtype, q_min=-127, q_max=127):
    """(q int64 [M, K], scale [M] of dtype) per the contract, row by row."""
    ct = compute_type(dtype)
    m, k = x.shape
    q = np.zeros((m, k), np.int64)
    scale = np.empty(m, dtype.numpy)
    for r in range(m):
        row = x[r].astype(ct)
        amax = ct(np.max(np.abs(row))) if k else ct(0)
        if not np.isfinite(amax):
            scale[r] = np.nan
            continue
        stored = (np.array([amax], ct) / ct(q_max)).astype(dtype.numpy)[0]
        if stored == 0:
            scale[r] = 1
            continue
        scale[r] = stored
        with np.errstate(over="ignore"):
            v = np.rint(row / ct(stored))
        q[r] = np.clip(v, q_min, q_max).astype(np.int64)
    return q, scale


def oracle_linear(x, wq, ws, bias, dtype, q_min=-127, q_max=127):
    """(y [M, N] of dtype, q, scale): exact int64 accumulation, one rounding."""
    q, scale = oracle_quantize(x, dtype, q_min, q_max)
    acc = q @ wq.astype(np.int64).T
    assert np.all(np.abs(acc) < 2**31), "oracle: accumulation left int32"
    return oracle_dequantize(acc, scale, ws, bias, dtype), q, scale


def oracle_dequantize(acc, scale, ws, bias, dtype):
    """y = ((C(acc) * C(scale)) * C(ws)) (+ C(bias)), rounded once to dtype."""
    ct = compute_type(dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        y = (acc.astype(ct) * scale.astype(ct)[:, None]) * ws.astype(ct)[None, :]
        if bias is not None:
            y = y + bias.astype(ct)[None, :]
        return y.astype(dtype.numpy)  # may overflow to +-inf in f16, as rounding once does


def random_activation(rng, m, k, dtype, spread=True):
    """Fresh non-zero random data with per-row magnitudes spread over decades."""
    x = rng.standard_normal((m, k))
    if spread and m:
        x *= 10.0 ** rng.uniform(-2, 2, size=(m, 1))
    x[x == 0] = 0.5
    return x.astype(dtype.numpy)


def random_weight(rng, n, k):
    w = rng.integers(-128, 128, size=(n, k), dtype=np.int8)
    w[w == 0] = 1
    return w


def random_scale(rng, n, dtype):
    return (rng.uniform(0.5, 2.0, n) * 10.0 ** rng.uniform(-3, -1, n)).astype(dtype.numpy)


def poisoned(be, shape, dtype, rng):
    """A backend tensor full of garbage (POISON for floats, random bytes for s8)."""
    if dtype == ql.s8:
        arr = rng.integers(-128, 128, size=shape, dtype=np.int8)
    else:
        arr = np.full(shape, POISON, dtype.numpy)
    return be.from_numpy(arr)


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bitwise_equal(got, want, what):
    """Every element equal bit for bit; NaNs only need to be NaN where expected."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if got.dtype.kind == "f" or got.dtype == ql.bf16.numpy:
        gn = np.isnan(got.astype(np.float64))
        wn = np.isnan(want.astype(np.float64))
        bad = gn != wn
        bad |= (~wn) & (bits(got) != bits(want))
    else:
        bad = got != want
    if bad.any():
        idx = np.argwhere(bad)
        first = tuple(idx[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements differ; first at {first}: "
            f"got {got[first]!r}, want {want[first]!r}")


def select_or_skip(plan_cls, be, desc):
    """Select a plan; a dtype the backend does not offer is a skip with the reason."""
    try:
        return plan_cls.select(be, desc)
    except ql.Unsupported as e:
        pytest.skip(f"{be.name}: {e}")


def run_linear(be, x, wq, ws, bias, dtype, q_min=-127, q_max=127, rng=None):
    """Run a poisoned linear problem on ``be``; return (y, act_q, act_scale, plan)."""
    rng = rng or np.random.default_rng()
    m, k = x.shape
    n = wq.shape[0]
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype, q_min=q_min, q_max=q_max)
    plan = select_or_skip(ql.QuantizedLinearPlan, be, desc)
    args = ql.QuantizedLinearArgs(
        activation=be.from_numpy(x), weight_q=be.from_numpy(wq), weight_scale=be.from_numpy(ws),
        output=poisoned(be, (m, n), dtype, rng),
        act_q_scratch=poisoned(be, (m, k), ql.s8, rng),
        act_scale_scratch=poisoned(be, (m,), dtype, rng),
        bias=None if bias is None else be.from_numpy(bias))
    assert plan.can_implement(args)
    plan.run(args)
    return (be.to_numpy(args.output), be.to_numpy(args.act_q_scratch),
            be.to_numpy(args.act_scale_scratch), plan)


def check_linear(be, x, wq, ws, bias, dtype, q_min=-127, q_max=127, rng=None):
    """Run on ``be`` and compare output and both scratches with the oracle, bit for bit."""
    y, aq, asc, plan = run_linear(be, x, wq, ws, bias, dtype, q_min, q_max, rng)
    want_y, want_q, want_s = oracle_linear(x, wq, ws, bias, dtype, q_min, q_max)
    if wq.shape[0]:  # with C_out = 0 the run is a no-op: the scratches are not computed
        assert_bitwise_equal(asc, want_s, f"act_scale_scratch [{plan.sku}]")
        assert_bitwise_equal(aq.astype(np.int64), want_q, f"act_q_scratch [{plan.sku}]")
    assert_bitwise_equal(y, want_y, f"output [{plan.sku}]")
    return y


# -- activation schemes (DESIGN.md, "Activation schemes"), restated row by row ------------

#: The schemes besides the default that the scheme suites run, and their test ids.
OTHER_SCHEMES = [ql.ActivationScheme.STATIC, ql.ActivationScheme.STATIC_ASYM,
                 ql.ActivationScheme.DYNAMIC_ASYM]
OTHER_SCHEME_IDS = [s.value for s in OTHER_SCHEMES]


def _ct_scalar(dtype, v):
    return compute_type(dtype)(v)


def _stored(dtype, v):
    """v (a compute-type scalar) rounded to TIn, back as the compute type."""
    with np.errstate(over="ignore", under="ignore"):
        return _ct_scalar(dtype, np.array([v]).astype(dtype.numpy)[0])


def _row_q(row, divisor, zp, q_min, q_max):
    """clamp(rint(row / divisor) + zp, q_min, q_max) as Python ints (exact)."""
    with np.errstate(over="ignore"):
        r = np.rint(row / divisor)
    out = []
    for v in r.tolist():
        if v == float("inf"):
            out.append(q_max)
        elif v == float("-inf"):
            out.append(q_min)
        else:
            out.append(min(q_max, max(q_min, int(v) + zp)))
    return out


def oracle_quantize_scheme(x, dtype, scheme, input_scale=None, input_zero_point=None,
                           q_min=None, q_max=127):
    """(q int64 [M, K], scale [M] of dtype, zp int64 [M]) for any scheme, row by row."""
    scheme = ql.ActivationScheme(scheme)
    if q_min is None:
        q_min = -128 if scheme.asymmetric else -127
    if scheme is ql.ActivationScheme.DYNAMIC:
        q, s = oracle_quantize(x, dtype, q_min, q_max)
        return q, s, np.zeros(x.shape[0], np.int64)
    ct = compute_type(dtype)
    m, k = x.shape
    q = np.zeros((m, k), np.int64)
    scale = np.empty(m, dtype.numpy)
    zps = np.zeros(m, np.int64)
    for r in range(m):
        row = x[r].astype(ct)
        if k and not np.all(np.isfinite(row)):
            scale[r] = np.nan
            continue
        if scheme.static:
            s = _stored(dtype, ct(input_scale))
            z = int(input_zero_point or 0)
            scale[r] = s
            zps[r] = z
            q[r] = _row_q(row, s, z, q_min, q_max)
            continue
        if k == 0:
            scale[r] = 1
            continue
        mn, mx = ct(row.min()), ct(row.max())
        with np.errstate(over="ignore"):
            s = _stored(dtype, ct(ct(mx - mn) / ct(q_max - q_min))) if mx > mn else ct(0)
        if mx > mn and 0 < s < np.inf:
            z = min(q_max, max(q_min, int(np.rint(ct(ct(q_min) - ct(mn / s))))))
            scale[r] = s
            zps[r] = z
            q[r] = _row_q(row, s, z, q_min, q_max)
            continue
        # the symmetric rule, zero point 0
        amax = ct(max(abs(mn), abs(mx)))
        s = _stored(dtype, ct(amax / ct(q_max)))
        if s == 0:
            scale[r] = 1
            continue
        scale[r] = s
        q[r] = _row_q(row, s, 0, q_min, q_max)
    return q, scale, zps


def oracle_linear_scheme(x, wq, ws, bias, dtype, scheme, input_scale=None,
                         input_zero_point=None, q_min=None, q_max=127):
    """(y, q, scale, zp) for any scheme: exact int64 accumulation minus zp * colsum."""
    q, scale, zp = oracle_quantize_scheme(x, dtype, scheme, input_scale, input_zero_point,
                                          q_min, q_max)
    w64 = wq.astype(np.int64)
    acc = q @ w64.T - zp[:, None] * w64.sum(axis=1)[None, :]
    assert np.all(np.abs(acc) < 2**31), "oracle: accumulation left int32"
    return oracle_dequantize(acc, scale, ws, bias, dtype), q, scale, zp


def shifted_activation(rng, m, k, dtype, spread=3.0):
    """Rows offset from 0 by up to ``spread`` times their magnitude, so that min and max
    are asymmetric around 0 (some rows all positive, some all negative)."""
    x = random_activation(rng, m, k, dtype).astype(np.float64)
    x += rng.uniform(-spread, spread, size=(m, 1)) * np.abs(x).max(axis=1, keepdims=True)
    return x.astype(dtype.numpy)


def scheme_args(be, scheme, m, k, n, dtype, rng, wq=None, input_scale=None,
                input_zero_point=None):
    """The scheme's extra QuantizedLinearArgs fields: a poisoned zp scratch and the column
    sums for the asymmetric schemes, the host scalars for the static ones."""
    scheme = ql.ActivationScheme(scheme)
    extra = {}
    if scheme.asymmetric:
        extra["act_zp_scratch"] = be.from_numpy(rng.integers(-2**31, 2**31, m, dtype=np.int32))
        extra["weight_colsum"] = be.from_numpy(ql.weight_colsum(wq))
    if scheme.static:
        extra["input_scale"] = input_scale
    if scheme.static_zero_point:
        extra["input_zero_point"] = input_zero_point
    return extra


def check_linear_scheme(be, x, wq, ws, bias, dtype, scheme, input_scale=None,
                        input_zero_point=None, q_min=None, q_max=127, rng=None):
    """Run a poisoned linear problem of ``scheme`` on ``be``; compare the output and every
    scratch with the oracle, bit for bit. Returns (y, plan)."""
    rng = rng or np.random.default_rng()
    scheme = ql.ActivationScheme(scheme)
    m, k = x.shape
    n = wq.shape[0]
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype, q_min=q_min,
                                        q_max=q_max, scheme=scheme)
    plan = select_or_skip(ql.QuantizedLinearPlan, be, desc)
    extra = scheme_args(be, scheme, m, k, n, dtype, rng, wq, input_scale, input_zero_point)
    args = ql.QuantizedLinearArgs(
        activation=be.from_numpy(x), weight_q=be.from_numpy(wq), weight_scale=be.from_numpy(ws),
        output=poisoned(be, (m, n), dtype, rng),
        act_q_scratch=poisoned(be, (m, k), ql.s8, rng),
        act_scale_scratch=poisoned(be, (m,), dtype, rng),
        bias=None if bias is None else be.from_numpy(bias), **extra)
    assert plan.can_implement(args)
    plan.run(args)
    want_y, want_q, want_s, want_zp = oracle_linear_scheme(
        x, wq, ws, bias, dtype, scheme, input_scale, input_zero_point, q_min, q_max)
    if n:
        assert_bitwise_equal(be.to_numpy(args.act_scale_scratch), want_s,
                             f"act_scale_scratch [{plan.sku}]")
        assert_bitwise_equal(be.to_numpy(args.act_q_scratch).astype(np.int64), want_q,
                             f"act_q_scratch [{plan.sku}]")
        if scheme.asymmetric:
            assert_bitwise_equal(be.to_numpy(args.act_zp_scratch).astype(np.int64), want_zp,
                                 f"act_zp_scratch [{plan.sku}]")
    y = be.to_numpy(args.output)
    assert_bitwise_equal(y, want_y, f"output [{plan.sku}]")
    return y, plan


def check_quantize_scheme(be, x, dtype, scheme, input_scale=None, input_zero_point=None,
                          q_min=None, q_max=127, rng=None):
    """The activation pass alone for ``scheme``, poisoned outputs, against the oracle."""
    rng = rng or np.random.default_rng()
    scheme = ql.ActivationScheme(scheme)
    m, k = x.shape
    desc = ql.DynamicRangeQuantizeDescriptor(m=m, k=k, dtype=dtype, q_min=q_min, q_max=q_max,
                                             scheme=scheme)
    plan = select_or_skip(ql.DynamicRangeQuantizePlan, be, desc)
    args = ql.DynamicRangeQuantizeArgs(
        be.from_numpy(x), poisoned(be, (m, k), ql.s8, rng), poisoned(be, (m,), dtype, rng),
        act_zp=(be.from_numpy(rng.integers(-2**31, 2**31, m, dtype=np.int32))
                if scheme.asymmetric else None),
        input_scale=input_scale if scheme.static else None,
        input_zero_point=input_zero_point if scheme.static_zero_point else None)
    plan.run(args)
    want_q, want_s, want_zp = oracle_quantize_scheme(x, dtype, scheme, input_scale,
                                                     input_zero_point, q_min, q_max)
    q, s = be.to_numpy(args.act_q), be.to_numpy(args.act_scale)
    assert_bitwise_equal(s, want_s, f"act_scale [{plan.sku}]")
    assert_bitwise_equal(q.astype(np.int64), want_q, f"act_q [{plan.sku}]")
    if scheme.asymmetric:
        assert_bitwise_equal(be.to_numpy(args.act_zp).astype(np.int64), want_zp,
                             f"act_zp [{plan.sku}]")
    return q, s
