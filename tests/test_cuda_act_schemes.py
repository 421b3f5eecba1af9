"""The CUDA activation pass of the static and asymmetric schemes, emulated step by step
on the host and compared with the oracle of tests/qltest.py.

:func:`kernel_rows_scheme` re-enacts ``qlinear_act_quant`` (cuda/act_quant.cu) for
``SCHEME_STATIC`` and ``SCHEME_DYNAMIC_ASYM`` with the device's rounding: the row's NaN/Inf
test on the bits of |x|, the row min and max in C (NaN skipped, as fmin/fmax do), the two
per-row divisions of the asymmetric scale and zero point (IEEE), the reciprocal quotient
of ``RowQuant::fast`` (tests/test_cuda_act_numerics.py's exact Markstein emulation) or the
division of ``RowQuant::slow``, and the saturation of quotients beyond ``kSat`` before
the zero point is added. The rows cover the edges: NaN/Inf, zero and constant rows,
single-signed rows (the zero point at its limits), asymmetric scales that round to 0 in
f16 or overflow in f32, static values whose quotient overflows, and scales on both sides
of the reciprocal's range.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_cuda_act_numerics import _ABS, fast_divisor, markstein32, markstein64

import qlinear as ql
from qlinear.backends import cuda as qc
from qlinear.dtypes import DType, bf16, f16, f32, f64
from qltest import oracle_quantize_scheme

S = ql.ActivationScheme
f4, f8 = np.float32, np.float64

#: RowQuant::kSat of cuda/act_quant.cu.
K_SAT = 1024.0


def _stored(v, dtype: DType, ct):
    """``Elem<T>::from_bits(bits_rn(v))``: v rounded to T, widened back to C."""
    with np.errstate(over="ignore", under="ignore"):
        return ct(np.asarray(v, ct).astype(dtype.numpy))


def _finish(v: np.ndarray, z: int, lo: int, hi: int) -> np.ndarray:
    """RowQuant::finish: clamp to +-kSat in C, rint (to int), add z, clamp to lo..hi."""
    v = np.asarray(v, f8)
    v = np.where(v < -K_SAT, -K_SAT, np.where(v > K_SAT, K_SAT, v))
    r = np.nan_to_num(np.rint(v), nan=0.0).astype(np.int64)  # cvt.rni: NaN -> 0
    return np.clip(r + z, lo, hi)


def _quotients(xs: np.ndarray, d, ct, wide: bool = True) -> np.ndarray:
    """The value RowQuant hands to finish: q1, or q0 where |q0| >= kSat (``wide``; without
    it q1 throughout, to show that the selection matters), or the IEEE quotient outside
    fast_divisor's range."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if not fast_divisor(d, ct):
            return xs / d
        if ct is f4:
            q0, q1 = markstein32(xs, d)
        else:
            pairs = []
            for v in xs.tolist():
                q0 = v * (1.0 / float(d))
                pairs.append((q0, q0) if not abs(q0) < K_SAT else markstein64(v, float(d)))
            q0, q1 = (np.array(p, f8) for p in zip(*pairs)) if pairs else (xs, xs)
            if not wide:
                q1 = np.where(np.abs(q0) < K_SAT, q1, np.nan)  # what inf - inf would give
        near = (q0 > -K_SAT) & (q0 < K_SAT)
        return np.where(near, q1, q0) if wide else q1


def kernel_rows_scheme(x: np.ndarray, dtype: DType, scheme: S, q_min: int, q_max: int,
                       input_scale: float | None = None, input_zero_point: int | None = None,
                       wide: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(q, scale, zp)`` of qlinear_act_quant for ``x[M, K]`` in a static or asymmetric
    scheme, step by step as the kernel computes them."""
    ct = f8 if dtype == f64 else f4
    ut, mask, inf = _ABS[dtype]
    raw = x.view(ut).astype(np.uint64) & mask
    m_bits = raw.max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.uint64)
    m, k = x.shape
    q = np.zeros((m, k), np.int64)
    scale = np.empty(m, dtype.numpy)
    zps = np.zeros(m, np.int64)
    for i in range(m):
        bad = m_bits[i] >= inf
        amax = ct(np.array(m_bits[i]).astype(ut).view(x.dtype).astype(ct))
        xs = x[i].astype(ct)
        z = 0
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            if scheme.static:
                s = _stored(input_scale, dtype, ct)
                z = int(input_zero_point or 0)
            else:
                finite = xs[~np.isnan(xs)]
                mn = ct(finite.min()) if finite.size else ct(np.inf)
                mx = ct(finite.max()) if finite.size else ct(-np.inf)
                spread = bool(mx > mn)
                t = (ct(mx - mn) if spread else amax) / ct(q_max - q_min if spread else q_max)
                st = _stored(t, dtype, ct)
                ok = spread and st > 0 and np.isfinite(st)
                u = ct((mn if ok else amax) / (st if ok else ct(q_max)))
                s = st if ok else _stored(u, dtype, ct)
                if ok:
                    z = int(np.clip(np.rint(ct(ct(q_min) - u)), q_min, q_max))
        off = bad or not s > 0
        if bad:
            scale[i], z = np.nan, 0
        else:
            scale[i] = 1 if off else s
        zps[i] = z
        if not off:
            q[i] = _finish(_quotients(xs, s, ct, wide), z, q_min, q_max)
    return q, scale, zps


def _rows(rng: np.random.Generator, dtype: DType, scheme: S, k: int):
    """Rows over every edge the kernel distinguishes, with the static constants."""
    tiny = {f16: 2.0 ** -20, bf16: 2.0 ** -110, f32: 2.0 ** -110, f64: 2.0 ** -990}[dtype]
    big = {f16: 2e3, bf16: 1e37, f32: 1e37, f64: 1e300}[dtype]
    rows = []
    for mag in (1.0, 3e-3, 250.0, tiny, big):
        base = rng.standard_normal(k) * mag
        rows += [base, base + rng.uniform(-3, 3) * np.abs(base).max(), np.abs(base) + mag,
                 -np.abs(base) - mag]
    const = np.full(k, rng.uniform(-5, 5))
    nan_row = rng.standard_normal(k)
    nan_row[k // 2] = np.nan
    inf_row = rng.standard_normal(k)
    inf_row[-1] = -np.inf
    narrow = 1e-6 + rng.random(k) * 1e-7  # f16: the asymmetric scale rounds to 0
    rows += [const, np.zeros(k), nan_row, inf_row, narrow]
    if dtype in (f32, f64):
        wide = np.linspace(-1, 1, k) * (3e38 if dtype == f32 else 1.7e308)
        rows.append(wide)  # mx - mn overflows: the symmetric fallback
    x = np.array(rows).astype(dtype.numpy)
    if scheme.static:
        s = float(np.abs(x[0].astype(f8)).max()) / rng.uniform(60, 160)
        x[1, ::4] = s * 400  # saturates
        x[2, ::5] = {f16: 6e4, bf16: 3e38, f32: 3e38, f64: 1e308}[dtype]  # x / s may overflow
    else:
        s = None
    return x, s


def _check(dtype, scheme, q_range, input_scale, x, rng):
    q_min, q_max = q_range
    z = int(rng.integers(q_min, q_max + 1)) if scheme.static_zero_point else None
    q, scale, zp = kernel_rows_scheme(x, dtype, scheme, q_min, q_max, input_scale, z)
    q_ref, scale_ref, zp_ref = oracle_quantize_scheme(x, dtype, scheme, input_scale, z,
                                                      q_min, q_max)
    ut = _ABS[dtype][0]
    nan = np.isnan(scale_ref.astype(f8))
    assert np.array_equal(np.isnan(scale.astype(f8)), nan)
    assert np.array_equal(scale.view(ut)[~nan], scale_ref.view(ut)[~nan])
    assert np.array_equal(q, q_ref), np.argwhere(q != q_ref)[:5]
    assert np.array_equal(zp, zp_ref)
    return q, z


@pytest.mark.parametrize("dtype", [f16, bf16, f32, f64], ids=lambda d: d.name)
@pytest.mark.parametrize("scheme", [S.STATIC, S.STATIC_ASYM, S.DYNAMIC_ASYM],
                         ids=lambda s: s.value)
@pytest.mark.parametrize("q_range", [None, (-100, 90)], ids=["default", "narrow"])
def test_rows_match_the_oracle(dtype, scheme, q_range):
    rng = np.random.default_rng()
    k = 24 if dtype == f64 else 200
    x, s = _rows(rng, dtype, scheme, k)
    _check(dtype, scheme, q_range or (scheme.default_q_min, 127), s, x, rng)


@pytest.mark.parametrize("dtype", [f32, bf16, f64], ids=lambda d: d.name)
def test_static_scales_on_both_sides_of_the_reciprocal_range(dtype):
    """Static scales below 2^-101 (f64: 2^-968) and, for f32, above 2^126 take the IEEE
    division; quotients overflow there and saturate."""
    rng = np.random.default_rng()
    ct = f8 if dtype == f64 else f4
    scales = [2.0 ** -120, 2.0 ** -101 * 0.75] if ct is f4 else [2.0 ** -1000]
    if dtype == f32:
        scales.append(2.0 ** 127)
    for s in scales:
        stored = _stored(s, dtype, ct)
        assert not fast_divisor(stored, ct)
        mags = np.array([[s * 50], [s], [s * 1e3], [1.0], [1e30 if ct is f4 else 1e300],
                         [s * 1e-3]])
        mags = np.minimum(mags, 1e37 if ct is f4 else 1e307)  # x itself stays finite
        x = (rng.standard_normal((6, 40)) * mags).astype(dtype.numpy)
        _check(dtype, S.STATIC_ASYM, (-128, 127), s, x, rng)


def test_the_saturation_of_huge_quotients_matters():
    """Without kSat's selection of q0 (q1 alone), quotients that overflow come out of the
    correction as NaN and give 0 instead of saturating: the comparison notices."""
    x = np.array([[3e38, -3e38, 1.0, 2e38]], np.float32)
    s = 1e-3
    q, _, _ = kernel_rows_scheme(x, f32, S.STATIC_ASYM, -128, 127, s, 5)
    q_ref, _, _ = oracle_quantize_scheme(x, f32, S.STATIC_ASYM, s, 5, -128, 127)
    assert np.array_equal(q, q_ref) and q_ref[0].tolist() == [127, -128, 127, 127]
    bad, _, _ = kernel_rows_scheme(x, f32, S.STATIC_ASYM, -128, 127, s, 5, wide=False)
    assert not np.array_equal(bad, q_ref)


def test_emulated_kernel_matches_the_source():
    """The steps emulated above are the kernel's."""
    src = qc.expand_source("act_quant.cu")
    for line in (
        "const bool spread = mx > mn;",
        "C num = spread ? add_rn(mx, -mn) : amax;",
        "C den = from_int<C>(spread ? q_max - q_min : q_max);",
        "const C quotient = div_rn(num, den);",
        "tbits = Elem<T>::bits_rn(quotient);",
        "ok = spread && s > C(0) && finite_c(s);",
        "num = ok ? mn : amax;",
        "den = ok ? s : static_cast<C>(q_max);",
        "u = quotient;",
        "sbits = ok ? tbits : Elem<T>::bits_rn(u);",
        "if (ok) z = ::min(::max(rint_to_int(add_rn(from_int<C>(q_min), -u)), q_min), q_max);",
        "sbits = Elem<T>::bits_rn(in_scale);",
        "const bool off = bad || !(divisor > C(0));",
        "if (WIDE) return finish(q0 > -kSat && q0 < kSat ? q1 : q0);",
        "if (WIDE) return finish(div_rn(x, d));",
        "static constexpr C kSat = C(1024);",
        "v = v < -kSat ? -kSat : (v > kSat ? kSat : v);",
        "return ::min(::max(rint_to_int(v) + z, lo), hi);",
        "RowQuant<C, SCHEME != SCHEME_DYNAMIC> quant;",
        "if (ASYM && lane + i * G < nvec) range.vec(cache[i]);",
    ):
        assert line in src, line
    assert qc.specs.ACT_SCHEMES == {S.DYNAMIC: 0, S.STATIC: 1, S.STATIC_ASYM: 1,
                                    S.DYNAMIC_ASYM: 2}
    for name, value in (("SCHEME_DYNAMIC", 0), ("SCHEME_STATIC", 1),
                        ("SCHEME_DYNAMIC_ASYM", 2)):
        assert f"constexpr int {name} = {value};" in src
