"""``qlinear.torch.QLinear`` with every activation scheme: built from a linear or from an
int8 weight, its constants as buffers that ``state_dict`` round-trips, outputs bit for bit
as the oracle, named errors for missing constants."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch adapter needs torch==2.13.0")

import qlinear as ql  # noqa: E402
import qlinear.torch as qlt  # noqa: E402
from qltest import assert_bitwise_equal, oracle_linear_scheme  # noqa: E402

CONSTS = {"dynamic": {}, "dynamic_asym": {},
          "static": {"input_scale": 0.021},
          "static_asym": {"input_scale": 0.017, "input_zero_point": 11}}


def _want(q, x):
    wq, ws = q.weight_q.numpy(), q.weight_scale.numpy()
    bias = None if q.bias is None else q.bias.numpy()
    s = None if q.input_scale is None else float(q.input_scale.item())
    z = None if q.input_zero_point is None else int(q.input_zero_point.item())
    return oracle_linear_scheme(x.numpy(), wq, ws, bias, ql.f32, q.scheme, s, z, q.q_min,
                                q.q_max)[0]


@pytest.mark.parametrize("scheme", list(CONSTS))
def test_from_linear_runs_the_scheme(scheme):
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24)
    q = qlt.QLinear.from_linear(lin, scheme=scheme, **CONSTS[scheme])
    assert q.scheme == scheme and "activations per" in repr(q)
    x = torch.randn(3, 5, 40) * 2
    with torch.no_grad():
        y = q(x)
    assert_bitwise_equal(y.reshape(15, 24).numpy(), _want(q, x.reshape(15, 40)), scheme)
    # The constants are buffers: a fresh module of the same scheme takes them back.
    fresh = qlt.QLinear(40, 24, scheme=scheme, **CONSTS[scheme])
    sd = q.state_dict()
    assert ("input_scale" in sd) == fresh.scheme.static
    assert ("input_zero_point" in sd) == (scheme == "static_asym")
    if scheme == "static":
        sd["input_scale"] = sd["input_scale"] * 2  # a loaded value replaces the built one
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert_bitwise_equal(fresh(x).reshape(15, 24).numpy(), _want(fresh, x.reshape(15, 40)),
                             f"{scheme} after load_state_dict")


def test_from_quantized_keeps_the_int8_weight_and_broadcasts_a_tensor_scale():
    rng = np.random.default_rng()
    wq = rng.integers(-128, 128, size=(16, 32), dtype=np.int8)
    q = qlt.QLinear.from_quantized(wq, np.array([0.004], np.float32), None,
                                   scheme="static_asym", input_scale=0.03, input_zero_point=-5)
    assert torch.equal(q.weight_q, torch.from_numpy(wq)) and q.bias is None
    assert torch.equal(q.weight_scale, torch.full((16,), 0.004))
    x = torch.randn(6, 32)
    with torch.no_grad():
        assert_bitwise_equal(q(x).numpy(), _want(q, x), "from_quantized")


@pytest.mark.parametrize("kw,name", [
    (dict(scheme="static"), "input_scale"),
    (dict(scheme="static_asym", input_scale=0.1), "input_zero_point"),
    (dict(input_scale=0.1), "input_scale"),
    (dict(scheme="nope"), "scheme"),
])
def test_missing_or_stray_constants_are_named(kw, name):
    with pytest.raises(ql.InvalidProblem, match=f"^{name}: expected"):
        qlt.QLinear(8, 4, **kw)
