"""``QuantizedLinear`` with every activation scheme: built with its constants (checked,
with named errors), run bit for bit against the oracle with poisoned outputs, per-tensor
weight scales broadcast, column sums kept for the asymmetric schemes, and saved, loaded
and pickled with the scheme."""

import pickle

import numpy as np
import pytest

import qlinear as ql
from qlinear import layer_io
from qltest import assert_bitwise_equal, oracle_linear_scheme, poisoned, random_activation

N, K = 9, 45
CONSTS = {"dynamic": {}, "dynamic_asym": {},
          "static": {"input_scale": 0.013},
          "static_asym": {"input_scale": 0.011, "input_zero_point": -7}}


def _parts(rng, n=N, k=K, dtype=ql.f32):
    wq = rng.integers(-128, 128, size=(n, k), dtype=np.int8)
    wq[0, 0] = -128  # checkpoint weights hold -128
    ws = (rng.random(n) * 0.01 + 0.001).astype(dtype.numpy)
    bias = rng.standard_normal(n).astype(dtype.numpy)
    return wq, ws, bias


def _layer(be, rng, scheme, dtype=ql.f32, **over):
    wq, ws, bias = _parts(rng, dtype=dtype)
    try:
        return ql.QuantizedLinear(wq, ws, bias, backend=be, scheme=scheme,
                                  **{**CONSTS[scheme], **over})
    except ql.Unsupported as e:
        pytest.skip(f"{be.name}: {e}")


def _check(layer, rng, m=7):
    be = layer.backend
    x = random_activation(rng, m, layer.in_features, layer.dtype)
    x[1, 3] = np.nan  # that row's output is NaN, the others are untouched
    out = poisoned(be, (m, layer.out_features), layer.dtype, rng)
    layer.forward(be.from_numpy(x), out=out)
    wq, ws, bias = layer.host_arrays()
    want, *_ = oracle_linear_scheme(x, wq, ws, bias, layer.dtype, layer.scheme,
                                    layer.input_scale, layer.input_zero_point, layer.q_min,
                                    layer.q_max)
    assert_bitwise_equal(be.to_numpy(out), want, f"{layer!r}")
    assert_bitwise_equal(layer(x), want, f"{layer!r} (numpy call)")


@pytest.mark.parametrize("scheme", list(CONSTS))
@pytest.mark.parametrize("dtype", [ql.f32, ql.bf16], ids=["f32", "bf16"])
def test_every_scheme_runs_as_the_oracle(qlinear_backend, scheme, dtype):
    rng = np.random.default_rng()
    layer = _layer(qlinear_backend, rng, scheme, dtype)
    assert layer.scheme == scheme
    assert layer.q_min == (-128 if layer.scheme.asymmetric else -127)
    _check(layer, rng, m=3)
    _check(layer, rng, m=20)  # the scratch (zero points too) grows


def test_column_sums_are_kept_for_asymmetric_schemes():
    rng = np.random.default_rng()
    for scheme in CONSTS:
        layer = _layer("cpu", rng, scheme)
        if layer.scheme.asymmetric:
            wq = layer.host_arrays()[0]
            got = layer.backend.to_numpy(layer.weight_colsum)
            assert got.dtype == np.int32
            assert_bitwise_equal(got.astype(np.int64), wq.astype(np.int64).sum(axis=1),
                                 "weight_colsum")
        else:
            assert layer.weight_colsum is None


@pytest.mark.parametrize("shape", [(), (1,)], ids=["scalar", "one"])
def test_per_tensor_scale_is_broadcast(shape):
    rng = np.random.default_rng()
    wq, _, bias = _parts(rng)
    s = np.float32(rng.random() * 0.01 + 0.001)
    layer = ql.QuantizedLinear(wq, np.full(shape, s, np.float32), bias, backend="cpu",
                               scheme="static", input_scale=0.02)
    assert_bitwise_equal(layer.host_arrays()[1], np.full(N, s, np.float32), "weight_scale")
    _check(layer, rng)


BAD = {
    "static_without_scale": (dict(scheme="static"), "input_scale"),
    "dynamic_with_scale": (dict(input_scale=0.1), "input_scale"),
    "static_zero_scale": (dict(scheme="static", input_scale=0.0), "input_scale"),
    "static_nan_scale": (dict(scheme="static", input_scale=float("nan")), "input_scale"),
    "scale_underflows_f16": (dict(scheme="static", input_scale=1e-9, f16=True), "input_scale"),
    "asym_without_zero_point": (dict(scheme="static_asym", input_scale=0.1),
                                "input_zero_point"),
    "static_with_zero_point": (dict(scheme="static", input_scale=0.1, input_zero_point=0),
                               "input_zero_point"),
    "zero_point_out_of_range": (dict(scheme="static_asym", input_scale=0.1,
                                     input_zero_point=128), "input_zero_point"),
    "zero_point_float": (dict(scheme="static_asym", input_scale=0.1, input_zero_point=1.5),
                         "input_zero_point"),
    "unknown_scheme": (dict(scheme="per_channel"), "scheme"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_scheme_constants_are_named(case):
    kw, name = BAD[case]
    kw = dict(kw)
    dtype = ql.f16 if kw.pop("f16", False) else ql.f32
    wq, ws, bias = _parts(np.random.default_rng(), dtype=dtype)
    with pytest.raises(ql.InvalidProblem, match=f"^{name}: expected"):
        ql.QuantizedLinear(wq, ws, bias, backend="cpu", **kw)


def test_asymmetric_k_bound():
    k = 65794  # K * 255 * 128 > 2**31 - 1 with -128..127
    wq = np.ones((1, k), np.int8)
    ws = np.ones(1, np.float32)
    ql.QuantizedLinear(wq, ws, backend="cpu", scheme="static", input_scale=0.1)
    with pytest.raises(ql.InvalidProblem, match="^k: expected at most 65793"):
        ql.QuantizedLinear(wq, ws, backend="cpu", scheme="dynamic_asym")


@pytest.mark.parametrize("scheme", list(CONSTS))
def test_scheme_survives_save_load_and_pickle(tmp_path, scheme):
    rng = np.random.default_rng()
    layer = _layer("cpu", rng, scheme, ql.bf16)
    path = tmp_path / "layer.safetensors"
    layer.save(path)
    meta = layer_io._read(str(path))[0]
    assert meta["format_version"] == ("1" if scheme == "dynamic" else "2")
    for back in (ql.QuantizedLinear.load(path), pickle.loads(pickle.dumps(layer))):
        assert back.scheme_arguments() == layer.scheme_arguments()
        x = random_activation(rng, 6, K, ql.bf16)
        assert_bitwise_equal(back(x), layer(x), f"restored {scheme} layer")


def test_version_1_pickle_state_loads_as_dynamic():
    layer = _layer("cpu", np.random.default_rng(), "dynamic")
    state = layer.__getstate__()
    old = {k: state[k] for k in ("backend", "weight_q", "weight_scale", "bias", "q_min",
                                 "q_max")}
    back = ql.QuantizedLinear.__new__(ql.QuantizedLinear)
    back.__setstate__(dict(old, version=1))
    assert back.scheme is ql.ActivationScheme.DYNAMIC and back.input_scale is None
