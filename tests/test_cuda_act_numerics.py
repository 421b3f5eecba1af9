"""The CUDA activation pass's quantization without a division per element, checked on the
host.

``cuda/act_quant.cu`` (``RowQuant::fast``, ``fast_divisor``) quantizes ``x`` by a row's
stored scale ``d`` from the row's reciprocal:

    r  = RN(1 / d)                 __frcp_rn / __drcp_rn, once per row
    q0 = RN(x * r)                 __fmul_rn
    e  = RN(x - q0 * d)            __fmaf_rn(-q0, d, x)
    q1 = RN(q0 + e * r)            __fmaf_rn(e, r, q0)
    q  = clamp(rint(q1), q_min, q_max)

for divisors in ``FAST_RANGE`` and with the IEEE division elsewhere. :func:`markstein`
below is the same algorithm, every operation rounded exactly as the device rounds it:
numpy's float32/float64 division and product are IEEE (correctly rounded), and the fma,
which numpy lacks, is emulated with one rounding (:func:`fma32`, :func:`fma64`). The
results are compared with numpy's correctly rounded quotient ``x / d`` and with the int8
``q`` of :func:`qlinear.reference.reference_linear`.

Why checking significands suffices: inside ``FAST_RANGE`` and for ``|q0| >= 1/4`` every
step is a power-of-two scaling of the same steps on the significands of ``x`` and ``d``
(no intermediate is subnormal, and the residual is a multiple of ``ulp(q0) * ulp(d)``,
at least the smallest subnormal). So all pairs of significands (f16, bf16) cover every
quotient of that kind; elsewhere ``|x / d| < 1/2`` and both sides round to 0.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest

from qlinear.dtypes import DType, bf16, f16, f32, f64
from qlinear.reference import reference_linear

f4 = np.float32
f8 = np.float64

#: Divisors quantized through the reciprocal, per compute type; the same limits as
#: ``fast_divisor`` in cuda/act_quant.cu.
FAST_RANGE: dict[type, tuple[float, float]] = {
    f4: (2.0 ** -101, 2.0 ** 126), f8: (2.0 ** -968, 2.0 ** 1022)}

#: Quotients no row can reach: a row's |x| <= amax < 256 * d. Far above that, x * r would
#: overflow; the checks stay below this bound.
QUOTIENT_LIMIT = 2.0 ** 100


# --- exact emulation of the device's arithmetic ------------------------------------------

def round_exact(v: Fraction, p: int, emin: int) -> Fraction:
    """``v`` rounded to nearest even in binary floating point of precision ``p`` with
    minimum exponent ``emin`` (subnormals included), in exact arithmetic."""
    if v == 0:
        return Fraction(0)
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    quantum = Fraction(2) ** (max(e, emin) - p + 1)
    n, rem = divmod(a, quantum)
    if rem > quantum / 2 or (rem == quantum / 2 and n % 2 == 1):
        n += 1
    return n * quantum if v > 0 else -n * quantum


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``__fmaf_rn(a, b, c)`` for float32 arrays: ``a * b + c`` rounded once.

    ``a * b`` is exact in float64 (48 significant bits); TwoSum gives ``s + t == a*b + c``
    exactly; rounding ``s`` to odd (toward ``t`` when ``t != 0`` and ``s``'s last bit is
    even) keeps the sticky information, so the final float32 rounding is the single
    correct one (53 >= 24 + 2 bits; subnormal float32 results included)."""
    a8, b8, c8 = (np.asarray(v, f4).astype(f8) for v in (a, b, c))
    p = a8 * b8
    s = p + c8
    pv = s - c8
    t = (p - pv) + (c8 - (s - pv))
    even = (s.view(np.int64) & 1) == 0
    toward = np.where(t > 0, np.inf, -np.inf)
    s = np.where((t != 0) & even, np.nextafter(s, toward), s)
    return s.astype(f4)


def fma64(a: float, b: float, c: float) -> float:
    """``__fma_rn(a, b, c)`` for doubles, in exact rational arithmetic."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    return float(round_exact(exact, 53, -1022))


def fast_divisor(d: np.ndarray | float, ct: type) -> np.ndarray:
    lo, hi = FAST_RANGE[ct]
    return (np.asarray(d) >= lo) & (np.asarray(d) <= hi)


def markstein32(x: np.ndarray, d: np.floating, correct: bool = True,
                fused: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(q0, q1)`` of RowQuant::fast (cuda/act_quant.cu) for float32 ``x`` and one ``d``.
    ``correct=False`` drops the correction, ``fused=False`` computes the residual with a
    rounded product: both only to show that the checks below notice."""
    d = f4(d)
    with np.errstate(over="ignore", invalid="ignore"):
        r = f4(1) / d
        q0 = x * r
        if not correct:
            return q0, q0
        e = fma32(-q0, np.full_like(x, d), x) if fused else (x - q0 * d).astype(f4)
        return q0, fma32(e, np.full_like(x, r), q0)


def markstein64(x: float, d: float) -> tuple[float, float]:
    """``(q0, q1)`` of RowQuant::fast for one double ``x`` and ``d``."""
    r = float(round_exact(1 / Fraction(d), 53, -1022))
    assert r == 1.0 / d  # numpy's division agrees: the emulation's own sanity
    q0 = x * r
    e = fma64(-q0, d, x)
    return q0, fma64(e, r, q0)


def rint_clamp(q: np.ndarray | float, lo: int, hi: int) -> np.ndarray:
    """``clamp(__float2int_rn(q), lo, hi)``: NaN converts to 0, out-of-range saturates."""
    with np.errstate(invalid="ignore"):
        v = np.nan_to_num(np.rint(np.asarray(q, f8)), nan=0.0, posinf=2.0 ** 31,
                          neginf=-2.0 ** 31)
    return np.clip(np.clip(v, -2.0 ** 31, 2.0 ** 31 - 1).astype(np.int64), lo, hi)


# --- the checks --------------------------------------------------------------------------

Algorithm = Callable[[np.ndarray, np.floating], tuple[np.ndarray, np.ndarray]]


def check_quotients(x: np.ndarray, d: np.floating, algo: Algorithm = markstein32) -> int:
    """Every quotient the kernel rounds correctly is the correctly rounded one, the others
    are below 1/2 (q0 < 1/4, see RowQuant::fast), and every int8 q is the reference's.
    Returns how many quotients were checked exactly."""
    with np.errstate(over="ignore", invalid="ignore"):
        want = x / f4(d)
    keep = np.abs(want) < QUOTIENT_LIMIT
    x, want = x[keep], want[keep]
    q0, q1 = algo(x, d)
    exact = np.abs(q0) >= 0.25
    wrong = exact & (q1 != want)
    assert not wrong.any(), (
        f"d={d!r}: {int(wrong.sum())} quotients differ, e.g. x={x[wrong][:4]!r}: "
        f"{q1[wrong][:4]!r} != {want[wrong][:4]!r}")
    small = ~exact
    assert (np.abs(want[small]) < 0.5).all() and (np.abs(q1[small]) < 0.5).all(), d
    q = rint_clamp(q1, -127, 127)
    ref = np.clip(np.rint(want.astype(f8)), -127, 127).astype(np.int64)
    assert np.array_equal(q, ref), f"d={d!r}: int8 results differ"
    return int(exact.sum())


def all_finite(dtype: DType) -> np.ndarray:
    """Every finite value of a 16-bit dtype, widened to float32 (exactly)."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    if dtype == bf16:
        v = (bits.astype(np.uint32) << 16).view(f4)
    else:
        v = bits.view(np.float16).astype(f4)
    return v[np.isfinite(v)]


def edge_divisors(values: np.ndarray, rng: np.random.Generator, n_random: int) -> np.ndarray:
    """Positive divisors among ``values`` (one dtype's, as float32): powers of two,
    all-ones significands, the smallest and largest (normal and subnormal), the
    neighbours of FAST_RANGE's limits, the worst-rounded reciprocals, and random ones."""
    # A stored scale is RN(amax / q_max) <= max / 127 (rounded): larger divisors never occur.
    pos = np.unique(values[values > 0])
    pos = pos[pos <= pos.max() / 64]
    with np.errstate(over="ignore"):
        recip_err = np.abs(pos.astype(f8) * (f4(1) / pos).astype(f8) - 1)
    mant = pos.view(np.uint32) & 0x7FFFFF
    top = mant == (mant.max() if mant.size else 0)
    picks = [
        pos[mant == 0],  # powers of two
        pos[top],  # all-ones significands (of that dtype)
        pos[:4], pos[-4:],
        pos[np.argsort(-recip_err)[:16]],
        rng.choice(pos, n_random, replace=False),
    ]
    for limit in FAST_RANGE[f4]:
        i = np.searchsorted(pos, f4(limit))
        picks.append(pos[max(i - 2, 0):i + 2])
    normal_min = np.finfo(f4).tiny
    i = np.searchsorted(pos, normal_min)
    picks.append(pos[max(i - 2, 0):i + 2])
    return np.unique(np.concatenate(picks))


@pytest.mark.parametrize("dtype", [f16, bf16], ids=["f16", "bf16"])
def test_every_16bit_x_against_edge_and_random_divisors(dtype):
    rng = np.random.default_rng()
    x = all_finite(dtype)
    divisors = edge_divisors(x, rng, 200)
    fast = divisors[fast_divisor(divisors, f4)]
    assert fast.size > 150
    checked = sum(check_quotients(x, d) for d in fast)
    assert checked > 50 * x.size
    # Out of range the kernel divides (IEEE); that path needs no emulation. It is taken
    # only where the limits say: f16 scales are all inside, bf16 ones below 2^-101 not.
    slow = divisors[~fast_divisor(divisors, f4)]
    if dtype == f16:
        assert slow.size == 0
    else:
        assert slow.size > 0 and (slow < 2.0 ** -101).all()


@pytest.mark.parametrize("dtype", [f16, bf16], ids=["f16", "bf16"])
def test_every_pair_of_16bit_significands(dtype):
    # x and d in [1, 2): by the scaling argument (module docstring) these pairs stand for
    # every x and every in-range d of the dtype.
    bits = 10 if dtype == f16 else 7
    sig = (1 + np.arange(1 << bits, dtype=f8) / (1 << bits)).astype(f4)
    for d in sig:
        check_quotients(sig, d)


def test_f32_every_significand_against_the_worst_divisors():
    # Those with the largest reciprocal error |d * RN(1/d) - 1|, where q0 is furthest off
    # (up to 1.5 ulp, the residual then rounded): every x significand against them.
    d_all = (np.arange(1 << 23, dtype=np.uint32) | 0x3F800000).view(f4)
    err = np.abs(d_all.astype(f8) * (f4(1) / d_all).astype(f8) - 1)
    worst = d_all[np.argsort(-err)[:2]]
    for d in worst:
        assert check_quotients(d_all, d) == d_all.size


def test_f32_random_and_edge_values():
    rng = np.random.default_rng()
    lo, hi = FAST_RANGE[f4]
    # Random divisors over the whole range, the limits and all-ones significands, against
    # random x of every magnitude (subnormals included), ties x = (k + 1/2) d and values
    # beside them.
    d_rand = np.exp2(rng.uniform(np.log2(lo), 121, 120)).astype(f4)
    d_edge = np.array([lo, np.nextafter(f4(lo), f4(1)), f4(lo) * f4(2 - 2 ** -23),
                       2.0 ** 121, f4(1.5), f4(2 - 2 ** -23), f4(1 + 2 ** -23), f4(0.75)], f4)
    for d in np.concatenate([d_edge, d_rand]):
        assert fast_divisor(d, f4)
        x = (rng.integers(0, 0x7F800000, 20000, dtype=np.uint32)).view(f4)
        x = x * np.where(rng.random(x.size) < 0.5, f4(-1), f4(1))
        mag = (np.exp2(rng.uniform(-40, 6, 20000)) * f8(d)).astype(f4)
        half = (rng.integers(-128, 128, 2000) + f4(0.5)).astype(f4)
        ties = (half * d).astype(f4)
        near = np.concatenate([ties, np.nextafter(ties, f4(np.inf)),
                               np.nextafter(ties, f4(-np.inf))])
        tiny = (np.arange(1, 3000, dtype=np.uint32)).view(f4)
        check_quotients(np.concatenate([x, -mag, mag, near, tiny, -tiny]), d)


def _f64_cases(rng: np.random.Generator) -> list[tuple[float, float]]:
    lo, _ = FAST_RANGE[f8]
    d_sig = 1 + rng.random(20000)
    # Reciprocal error d * r - 1 exactly: Dekker's product (Veltkamp split) of d and r.
    r = 1.0 / d_sig
    split = 134217729.0
    def halves(v):
        t = split * v
        hi = t - (t - v)
        return hi, v - hi
    dh, dl = halves(d_sig)
    rh, rl = halves(r)
    p = d_sig * r
    err = ((dh * rh - p) + dh * rl + dl * rh) + dl * rl
    worst = d_sig[np.argsort(-np.abs((p - 1) + err))[:6]]
    divisors = [*worst, 1.0, 1.5, 2 - 2 ** -52, 1 + 2 ** -52, lo, lo * (2 - 2 ** -52),
                lo * 1.25, 2.0 ** 1017, 3.0 ** -400, 7.0 ** 300]
    cases = []
    for d in divisors:
        dm = float(np.frexp(d)[0]) * 2  # d's significand in [1, 2)
        scale = d / dm
        sig = 1 + rng.random(60)
        # x just below d's significand: x / d just below a power of two, where q0 is
        # furthest off.
        sig[:20] = np.maximum(dm * (1 - rng.random(20) * 2 ** -20), 1.0)
        for s in sig:
            for e in (0, 3, -1, 6):
                cases.append((float(s * scale * 2.0 ** e), d))
        for k in (0.5, 1.5, 2.5, 126.5, -0.5, 63.5):
            x = k * d
            cases += [(x, d), (float(np.nextafter(x, np.inf)), d),
                      (float(np.nextafter(x, -np.inf)), d)]
        cases += [(float(v) * 5e-324, d) for v in (1, 2, 3, 1 << 20, 1 << 52)]
        cases += [(0.25 * d, d), (float(np.nextafter(0.25 * d, 0)), d)]
    return cases


def test_f64_edge_and_random_values():
    rng = np.random.default_rng()
    cases = _f64_cases(rng)
    assert len(cases) > 2000
    for x, d in cases:
        assert fast_divisor(d, f8), d
        q0, q1 = markstein64(x, d)
        want = x / d
        if abs(q0) >= 0.25:
            assert q1 == want, (x, d, q1, want)
        else:
            assert abs(q1) < 0.5 and abs(want) < 0.5, (x, d, q1, want)
        assert rint_clamp(q1, -127, 127) == np.clip(np.rint(want), -127, 127), (x, d)


def _beside_ties(d: np.float32) -> np.ndarray:
    """float32 x at and up to 3 ulps beside (k + 1/2) * d, k = -127..126: where an error
    in the quotient changes rint."""
    ties = ((np.arange(-127, 127) + 0.5) * f8(d)).astype(f4)
    out = [ties]
    up, down = ties, ties
    for _ in range(3):
        up, down = np.nextafter(up, f4(np.inf)), np.nextafter(down, f4(-np.inf))
        out += [up, down]
    return np.concatenate(out)


def test_the_checks_notice_a_wrong_algorithm():
    # Without the correction, or with a rounded product in the residual, the same checks
    # fail, on the quotients and on the int8 results: they do test the algorithm.
    def uncorrected(xs, dv):
        return markstein32(xs, dv, correct=False)

    def unfused(xs, dv):
        return markstein32(xs, dv, fused=False)

    x, d = all_finite(f16), f4(np.float16(1.1))
    check_quotients(x, d)
    near, d32 = _beside_ties(f4(1.1)), f4(1.1)
    check_quotients(near, d32)
    ref = np.clip(np.rint((near / d32).astype(f8)), -127, 127)
    for wrong in (uncorrected, unfused):
        with pytest.raises(AssertionError, match="quotients differ"):
            check_quotients(x, d, algo=wrong)
        assert (rint_clamp(wrong(near, d32)[1], -127, 127) != ref).any()
    # And the range's lower limit matters: a subnormal divisor's reciprocal overflows,
    # and through it the quotients (and int8 results) are wrong.
    sub = f4(1.75 * 2.0 ** -130)
    assert not fast_divisor(sub, f4)
    with pytest.raises(AssertionError, match="quotients differ"):
        check_quotients(all_finite(bf16), sub)


# --- whole rows, as the kernel processes them, against the reference ----------------------

_ABS = {f16: (np.uint16, 0x7FFF, 0x7C00), bf16: (np.uint16, 0x7FFF, 0x7F80),
        f32: (np.uint32, 0x7FFFFFFF, 0x7F800000),
        f64: (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}


def kernel_rows(x: np.ndarray, dtype: DType, q_min: int,
                q_max: int) -> tuple[np.ndarray, np.ndarray]:
    """``(q, scale bits)`` of qlinear_act_quant for ``x[M, K]`` of ``dtype``, step by step:
    amax as the integer max of |x|'s bits (NaN/Inf: at or above the Inf pattern), the
    scale rounded to C then to T, the reciprocal path or the division per row."""
    ct = f8 if dtype == f64 else f4
    ut, mask, inf = _ABS[dtype]
    raw = x.view(ut).astype(np.uint64) & mask
    m = raw.max(axis=1)
    bad = m >= inf
    amax = m.astype(ut).view(x.dtype).astype(ct)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        stored = (amax / ct(q_max)).astype(x.dtype)
    divisor = stored.astype(ct)
    zero = ~(divisor > 0)
    stored[zero] = 1
    stored[bad] = np.nan
    q = np.zeros(x.shape, np.int64)
    for i in range(x.shape[0]):
        off = bad[i] or zero[i]
        d = divisor[i]
        xs = x[i].astype(ct)
        if off:
            continue  # 0..0 clamps whatever the arithmetic gives (NaN included)
        if not fast_divisor(d, ct):
            with np.errstate(over="ignore"):
                q[i] = rint_clamp(xs / d, q_min, q_max)
        elif ct is f4:
            q[i] = rint_clamp(markstein32(xs, d)[1], q_min, q_max)
        else:
            q[i] = [rint_clamp(markstein64(float(v), float(d))[1], q_min, q_max) for v in xs]
    return q, stored


@pytest.mark.parametrize("dtype", [f16, bf16, f32, f64], ids=lambda d: d.name)
@pytest.mark.parametrize("q_range", [(-127, 127), (-128, 127), (-8, 7)])
def test_rows_match_the_reference(dtype, q_range):
    rng = np.random.default_rng()
    q_min, q_max = q_range
    m, k = (12, 40) if dtype == f64 else (40, 300)
    # Row magnitudes from the smallest subnormal scales (f16), through the slow path's
    # (below 2^-101 for f32/bf16, 2^-968 for f64) to near the largest values.
    top = {f16: 12, bf16: 120, f32: 120, f64: 1000}[dtype]
    bottom = {f16: -26, bf16: -125, f32: -140, f64: -1060}[dtype]
    mags = np.exp2(rng.uniform(bottom, top, m))
    mags[:3] = [2.0 ** bottom, 2.0 ** -20 if dtype == f16 else 2.0 ** -110, 1.0]
    x = (rng.standard_normal((m, k)) * mags[:, None]).astype(dtype.numpy)
    x[3] = 0
    x[4, 7] = np.nan
    x[5, 0] = np.inf
    q, scale = kernel_rows(x, dtype, q_min, q_max)
    ones = np.ones((1, k), np.int8)
    _, q_ref, scale_ref = reference_linear(x, ones, np.ones(1, dtype.numpy), None, dtype,
                                           q_min, q_max)
    assert np.array_equal(scale.view(_ABS[dtype][0]), scale_ref.view(_ABS[dtype][0]))
    assert np.array_equal(q, q_ref)
