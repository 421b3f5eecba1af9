"""``QuantizedLinear.save``/``load`` (safetensors, no torch) and pickling, on every backend:
the layer comes back equal, with bit-identical outputs; a bad file is an InvalidProblem
naming its path."""

import json
import pickle
import struct

import numpy as np
import pytest

import qlinear as ql
from qlinear import layer_io
from qltest import assert_bitwise_equal, bits, oracle_linear, random_activation

DTYPES = [ql.f32, ql.f16, ql.bf16]
DT_IDS = [d.name for d in DTYPES]


def _layer(be, rng, dtype, with_bias, q=(-127, 127), n=12, k=37):
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[w == 0] = 0.25
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    try:
        return ql.QuantizedLinear.from_float(w, bias, backend=be, dtype=dtype,
                                             q_min=q[0], q_max=q[1])
    except ql.Unsupported as e:
        pytest.skip(f"{be.name}: {e}")


def _assert_same_layer(a, b, rng):
    assert (a.in_features, a.out_features, a.dtype, a.q_min, a.q_max) == \
        (b.in_features, b.out_features, b.dtype, b.q_min, b.q_max)
    for got, want, what in zip(b.host_arrays(), a.host_arrays(),
                               ("weight_q", "weight_scale", "bias")):
        assert (got is None) == (want is None), what
        if want is not None:
            assert got.dtype == want.dtype and (bits(got) == bits(want)).all(), what
    x = random_activation(rng, 9, a.in_features, a.dtype)
    y = b(x)
    assert_bitwise_equal(y, a(x), "output of the restored layer")
    wq, ws, bias = a.host_arrays()
    want, _, _ = oracle_linear(x, wq, ws, bias, a.dtype, a.q_min, a.q_max)
    assert_bitwise_equal(y, want, "output vs the oracle")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_save_load_round_trip(qlinear_backend, tmp_path, dtype, with_bias):
    rng = np.random.default_rng()
    layer = _layer(qlinear_backend, rng, dtype, with_bias, q=(-100, 90))
    path = tmp_path / "layer.safetensors"
    layer.save(path)
    back = ql.QuantizedLinear.load(path, backend=qlinear_backend)
    assert back.backend is qlinear_backend
    _assert_same_layer(layer, back, rng)
    # Across backends: a file saved on this one runs on cpu with the same bits.
    _assert_same_layer(layer, ql.QuantizedLinear.load(str(path), backend="cpu"), rng)


def test_file_format_is_as_documented(tmp_path):
    """Plain safetensors: int8 weight, bf16 as uint16 bits, metadata as documented."""
    from safetensors import safe_open

    rng = np.random.default_rng()
    layer = _layer("cpu", rng, ql.bf16, True)
    path = tmp_path / "l.safetensors"
    layer.save(path)
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert meta == {"format": "qlinear.QuantizedLinear", "format_version": "1", "dtype": "bf16",
                    "q_min": "-127", "q_max": "127", "out_features": "12", "in_features": "37",
                    "bias": "true"}
    wq, ws, bias = layer.host_arrays()
    assert tensors["weight_q"].dtype == np.int8 and (tensors["weight_q"] == wq).all()
    assert tensors["weight_scale"].dtype == np.uint16
    assert (tensors["weight_scale"] == ws.view(np.uint16)).all()
    assert (tensors["bias"] == bias.view(np.uint16)).all()


def test_k_zero_and_c_out_zero_round_trip(tmp_path):
    for n, k in ((5, 0), (0, 7)):
        layer = ql.QuantizedLinear.from_float(np.ones((n, k), np.float32),
                                              np.arange(n, dtype=np.float32), backend="cpu")
        layer.save(tmp_path / f"{n}_{k}.safetensors")
        back = ql.QuantizedLinear.load(tmp_path / f"{n}_{k}.safetensors")
        x = np.random.default_rng().standard_normal((3, k)).astype(np.float32)
        assert_bitwise_equal(back(x), layer(x), "output")


def _rewrite(path, tensors=None, meta=None):
    """Write a safetensors file at ``path`` from the saved one, with changes."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="np") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        m = f.metadata()
    t.update(tensors or {})
    m.update(meta or {})
    save_file({k: v for k, v in t.items() if v is not None}, str(path),
              metadata={k: v for k, v in m.items() if v is not None})


def _bad_files():
    def truncate(p):
        data = p.read_bytes()
        p.write_bytes(data[: len(data) - 10])

    def header_only(p):
        data = p.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        p.write_bytes(data[: 8 + n])

    def garbage(p):
        p.write_bytes(np.random.default_rng().bytes(300))

    def empty(p):
        p.write_bytes(b"")

    def json_header_broken(p):
        data = bytearray(p.read_bytes())
        data[9] = ord("}")
        p.write_bytes(bytes(data))

    def not_a_layer(p):
        from safetensors.numpy import save_file

        save_file({"embedding": np.ones((4, 4), np.float32)}, str(p))

    return {
        "truncated": (truncate, "cannot be read"),
        "header_only": (header_only, "cannot be read"),
        "garbage": (garbage, "cannot be read"),
        "empty": (empty, "cannot be read"),
        "broken_json": (json_header_broken, "cannot be read"),
        "foreign_safetensors": (not_a_layer, "format None"),
        "newer_version": (lambda p: _rewrite(p, meta={"format_version": "3"}), "version '3'"),
        "v2_without_scheme": (lambda p: _rewrite(p, meta={"format_version": "2"}),
                              "scheme: expected one of"),
        "bad_dtype": (lambda p: _rewrite(p, meta={"dtype": "f8"}), "'f8'"),
        "bad_q_max": (lambda p: _rewrite(p, meta={"q_max": "many"}), "'q_max'"),
        "q_max_out_of_range": (lambda p: _rewrite(p, meta={"q_max": "300"}), "q_max"),
        "missing_bias": (lambda p: _rewrite(p, tensors={"bias": None}), "holding tensors"),
        "extra_tensor": (lambda p: _rewrite(p, tensors={"x": np.ones(2, np.int8)}),
                         "holding tensors"),
        "scale_wrong_dtype": (lambda p: _rewrite(
            p, tensors={"weight_scale": np.ones(12, np.float64)}), "weight_scale"),
        "scale_wrong_shape": (lambda p: _rewrite(
            p, tensors={"weight_scale": np.ones(11, np.float32)}), "weight_scale"),
        "weight_wrong_shape": (lambda p: _rewrite(
            p, tensors={"weight_q": np.ones((12, 36), np.int8)}), "weight_q"),
        "nan_scale": (lambda p: _rewrite(
            p, tensors={"weight_scale": np.full(12, np.nan, np.float32)}), "finite"),
        "in_features_lies": (lambda p: _rewrite(p, meta={"in_features": "38"}), "weight_q"),
    }


BAD_FILES = _bad_files()


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_invalid_problem_naming_the_path(tmp_path, case):
    spoil, match = BAD_FILES[case]
    rng = np.random.default_rng()
    path = tmp_path / "spoilt.safetensors"
    _layer("cpu", rng, ql.f32, True).save(path)
    spoil(path)
    with pytest.raises(ql.InvalidProblem) as info:
        ql.QuantizedLinear.load(path, backend="cpu")
    text = str(info.value)
    assert text.startswith("path: expected a qlinear layer file") and str(path) in text, text
    assert match in text, text


def test_missing_file_and_bad_path(tmp_path):
    with pytest.raises(ql.InvalidProblem, match="nope.safetensors"):
        ql.QuantizedLinear.load(tmp_path / "nope.safetensors")
    with pytest.raises(ql.InvalidProblem, match="^path: expected a str or os.PathLike, got int"):
        ql.QuantizedLinear.load(3)
    layer = _layer("cpu", np.random.default_rng(), ql.f32, False)
    with pytest.raises(ql.InvalidProblem, match="^path: expected"):
        layer.save(tmp_path / "no" / "such" / "folder.safetensors")
    with pytest.raises(ql.InvalidProblem, match="^backend: expected"):
        ql.QuantizedLinear.load(tmp_path / "nope.safetensors", backend="tpu")


def test_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    rng = np.random.default_rng()
    path = tmp_path / "layer.safetensors"
    old = _layer("cpu", rng, ql.f32, True)
    old.save(path)
    before = path.read_bytes()
    import safetensors.numpy

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    with pytest.raises(ql.InvalidProblem, match="disk full"):
        _layer("cpu", rng, ql.f32, True).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["layer.safetensors"]
    json.loads(before[8:8 + struct.unpack("<Q", before[:8])[0]])  # still a valid header


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_pickle_round_trip(qlinear_backend, dtype, with_bias):
    rng = np.random.default_rng()
    layer = _layer(qlinear_backend, rng, dtype, with_bias, q=(-128, 127))
    x = random_activation(rng, 4, layer.in_features, dtype)
    layer(x)  # a used layer (plans, scratch) pickles too
    back = pickle.loads(pickle.dumps(layer))
    assert back.backend is ql.backend(qlinear_backend.name)
    _assert_same_layer(layer, back, rng)


def test_pickle_state_names_the_backend():
    layer = _layer("cpu", np.random.default_rng(), ql.f16, True)
    state = layer.__getstate__()
    assert state["backend"] == "cpu" and state["weight_q"].dtype == np.int8
    stale = dict(state, version=99)
    with pytest.raises(ql.InvalidProblem,
                       match="^state: expected .* version 1 or 2, got version 99"):
        ql.QuantizedLinear.__new__(ql.QuantizedLinear).__setstate__(stale)


def test_format_constants_are_exported():
    assert layer_io.FORMAT == "qlinear.QuantizedLinear" and layer_io.FORMAT_VERSION == 2
