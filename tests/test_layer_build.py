"""``QuantizedLinear`` checks everything when it is built, on every backend: shapes,
dtypes, finite scales and bias, scales that fit the layer's dtype, K = 0, the integer
rule for ``q_max``, and whether the backend runs the dtype at all."""

import warnings

import numpy as np
import pytest

import qlinear as ql
from qltest import assert_bitwise_equal, oracle_linear, random_activation, random_scale

N, K = 6, 10


def _w(rng, n=N, k=K, dtype=np.float32):
    w = rng.standard_normal((n, k)).astype(dtype)
    w[w == 0] = 0.5
    return w


def _wq(rng, n=N, k=K):
    q = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
    q[q == 0] = 1
    return q


# Each case: (what is built, the argument the error must name). ``rng`` draws fresh data.
BAD_BUILDS = {
    "bias_too_short": (lambda be, rng: ql.QuantizedLinear.from_float(
        _w(rng), rng.standard_normal(N - 1).astype(np.float32), backend=be), "bias"),
    "bias_too_long": (lambda be, rng: ql.QuantizedLinear(
        _wq(rng), random_scale(rng, N, ql.f32), rng.standard_normal(N + 2).astype(np.float32),
        backend=be), "bias"),
    "bias_2d": (lambda be, rng: ql.QuantizedLinear.from_float(
        _w(rng), rng.standard_normal((1, N)).astype(np.float32), backend=be), "bias"),
    "bias_str": (lambda be, rng: ql.QuantizedLinear.from_float(_w(rng), "abc", backend=be),
                 "bias"),
    "bias_nan": (lambda be, rng: ql.QuantizedLinear.from_float(
        _w(rng), np.where(np.arange(N) == 2, np.nan, 1.0).astype(np.float32), backend=be),
        "bias"),
    "bias_overflows_f16": (lambda be, rng: ql.QuantizedLinear.from_float(
        _w(rng), np.full(N, 1e6, np.float32), backend=be, dtype=ql.f16), "bias"),
    "weight_1d": (lambda be, rng: ql.QuantizedLinear.from_float(
        rng.standard_normal(K).astype(np.float32), backend=be), "weight"),
    "weight_3d": (lambda be, rng: ql.QuantizedLinear.from_float(
        rng.standard_normal((2, N, K)).astype(np.float32), backend=be), "weight"),
    "weight_str": (lambda be, rng: ql.QuantizedLinear.from_float(
        np.full((N, K), "x"), backend=be), "weight"),
    "weight_q_1d": (lambda be, rng: ql.QuantizedLinear(
        _wq(rng)[0], random_scale(rng, N, ql.f32), backend=be), "weight_q"),
    "weight_q_3d": (lambda be, rng: ql.QuantizedLinear(
        _wq(rng)[None], random_scale(rng, N, ql.f32), backend=be), "weight_q"),
    "weight_q_int16": (lambda be, rng: ql.QuantizedLinear(
        _wq(rng).astype(np.int16), random_scale(rng, N, ql.f32), backend=be), "weight_q"),
    "scale_too_short": (lambda be, rng: ql.QuantizedLinear(
        _wq(rng), random_scale(rng, N - 1, ql.f32), backend=be), "weight_scale"),
    "scale_too_long": (lambda be, rng: ql.QuantizedLinear(
        _wq(rng), random_scale(rng, N + 1, ql.f32), backend=be), "weight_scale"),
    "scale_nan": (lambda be, rng: ql.QuantizedLinear(
        _wq(rng), np.where(np.arange(N) == 3, np.nan, random_scale(rng, N, ql.f32)),
        backend=be), "weight_scale"),
    "scale_inf_f16": (lambda be, rng: ql.QuantizedLinear(
        _wq(rng), np.where(np.arange(N) == 1, np.inf, random_scale(rng, N, ql.f16)),
        backend=be), "weight_scale"),
    "scale_int": (lambda be, rng: ql.QuantizedLinear(
        _wq(rng), np.ones(N, np.int8), backend=be), "weight_scale"),
    "k_past_exact_bound": (lambda be, rng: ql.QuantizedLinear(
        np.ones((1, ql.max_exact_k() + 1), np.int8), np.ones(1, np.float32), backend=be), "k"),
    "weight_masked": (lambda be, rng: ql.QuantizedLinear.from_float(
        np.ma.masked_less(_w(rng), 0), backend=be), "weight"),
    "weight_q_matrix": (lambda be, rng: ql.QuantizedLinear(
        np.asmatrix(_wq(rng)), random_scale(rng, N, ql.f32), backend=be), "weight_q"),
    "scale_masked": (lambda be, rng: ql.QuantizedLinear(
        _wq(rng), np.ma.masked_greater(random_scale(rng, N, ql.f32), 0.01), backend=be),
        "weight_scale"),
    "bias_masked": (lambda be, rng: ql.QuantizedLinear.from_float(
        _w(rng), np.ma.masked_less(rng.standard_normal(N).astype(np.float32), 0), backend=be),
        "bias"),
    "q_max_bool": (lambda be, rng: ql.QuantizedLinear(
        _wq(rng), random_scale(rng, N, ql.f32), backend=be, q_max=True), "q_max"),
}


@pytest.mark.parametrize("case", list(BAD_BUILDS))
def test_bad_layer_fails_when_built(qlinear_backend, case):
    build, arg = BAD_BUILDS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the error is the signal, not numpy's
        with pytest.raises(ql.InvalidProblem) as info:
            build(qlinear_backend, np.random.default_rng())
    text = str(info.value)
    assert text.startswith(f"{arg}: expected "), text
    assert "got" in text, text


@pytest.mark.parametrize("dtype", [ql.f16, ql.bf16], ids=["f16", "bf16"])
def test_scale_overflowing_the_dtype_is_refused(qlinear_backend, dtype):
    """``w[0, 0] = 1e7`` in an f16 layer: max|w| / 127 > 65504. bf16 overflows past f32's
    range only, so its case starts from f64 weights."""
    rng = np.random.default_rng()
    w = _w(rng, dtype=np.float64)
    big = 1e7 if dtype == ql.f16 else 1e39
    w[0, 0] = big
    for make in (lambda: ql.quantize_weight(w, dtype=dtype),
                 lambda: ql.QuantizedLinear.from_float(w, backend=qlinear_backend, dtype=dtype)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ql.InvalidProblem, match=r"^weight: expected") as info:
                make()
        if dtype == ql.f16:
            assert "f16" in str(info.value) and "65504" in str(info.value)
            assert "row 0" in str(info.value)
    # Just inside the range, the layer builds and matches the oracle.
    w[0, 0] = 8e6 if dtype == ql.f16 else 1e30
    layer = ql.QuantizedLinear.from_float(w, backend=qlinear_backend, dtype=dtype)
    wq, ws = ql.quantize_weight(w, dtype=dtype)
    assert np.isfinite(ws.astype(np.float64)).all()
    x = random_activation(rng, 3, K, dtype)
    want, _, _ = oracle_linear(x, wq, ws, None, dtype)
    assert_bitwise_equal(layer(x), want, "output")


def test_weight_beyond_the_compute_type_is_refused():
    w = np.ones((2, 3))
    w[1, 2] = 1e300  # finite in f64, inf in f32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ql.InvalidProblem, match=r"^weight: expected .*float32.*\(1, 2\)"):
            ql.quantize_weight(w, dtype=ql.f32)


@pytest.mark.parametrize("dtype", [ql.f32, ql.f16, ql.bf16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(5, 0), (2, 3, 0), (0,), (0, 0)],
                         ids=lambda s: "x".join(map(str, s)))
def test_k_zero_gives_the_bias(qlinear_backend, dtype, with_bias, shape):
    """K = 0: y is the bias broadcast to [..., C_out], or zeros without one."""
    rng = np.random.default_rng()
    w = np.empty((N, 0), np.float32)
    bias = rng.standard_normal(N).astype(dtype.numpy) if with_bias else None
    layer = ql.QuantizedLinear.from_float(w, bias, backend=qlinear_backend, dtype=dtype)
    assert layer.in_features == 0 and layer.out_features == N
    y = layer(np.empty(shape, dtype.numpy))
    assert y.shape == (*shape[:-1], N) and y.dtype == dtype.numpy
    want = np.broadcast_to(bias if with_bias else np.zeros(N, dtype.numpy), y.shape)
    assert_bitwise_equal(y, np.ascontiguousarray(want), "output")


def test_quantize_weight_q_max_follows_the_integer_rule():
    rng = np.random.default_rng()
    w = _w(rng)
    want = ql.quantize_weight(w, q_max=127)
    for q in (np.int64(127), np.int8(127), np.uint8(127)):
        got = ql.quantize_weight(w, q_max=q)
        assert (got[0] == want[0]).all() and (got[1] == want[1]).all()
    got = ql.quantize_weight(w, q_max=np.int32(100))
    assert np.abs(got[0]).max() == 100
    for bad in (True, np.bool_(True), 127.0, "127", 0, 128, -1, None):
        with pytest.raises(ql.InvalidProblem, match=r"^q_max: expected an integer in 1\.\.127"):
            ql.quantize_weight(w, q_max=bad)


def test_integer_weight_needs_a_dtype():
    w = np.arange(12, dtype=np.int32).reshape(3, 4) - 6
    with pytest.raises(ql.InvalidProblem, match=r"^dtype: expected a float type"):
        ql.quantize_weight(w)
    wq, ws = ql.quantize_weight(w, dtype=ql.f32)
    assert ws.dtype == np.float32 and wq[0, 0] == -127


def test_scalar_scale_is_per_tensor(qlinear_backend):
    rng = np.random.default_rng()
    wq = _wq(rng)
    s = np.float32(rng.uniform(0.001, 0.01))
    a = ql.QuantizedLinear(wq, s, backend=qlinear_backend)
    b = ql.QuantizedLinear(wq, np.full(N, s, np.float32), backend=qlinear_backend)
    x = random_activation(rng, 4, K, ql.f32)
    assert_bitwise_equal(a(x), b(x), "output")


def test_dtype_the_backend_cannot_run_fails_when_built(wgpu_be):
    rng = np.random.default_rng()
    with pytest.raises(ql.Unsupported, match="f64"):
        ql.QuantizedLinear.from_float(_w(rng, dtype=np.float64), backend=wgpu_be)
