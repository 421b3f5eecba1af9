"""What the activation schemes ask of descriptors and arguments, and the errors when the
caller gets it wrong: the same message on every backend (``qlinear_backend``)."""

import numpy as np
import pytest

import qlinear as ql
from qltest import poisoned, random_activation, random_scale, random_weight

S = ql.ActivationScheme


def test_scheme_names_and_defaults():
    d = ql.QuantizedLinearDescriptor(2, 3, 4, ql.f32, scheme="dynamic_asym")
    assert d.scheme is S.DYNAMIC_ASYM and d.q_min == -128 and d.q_max == 127
    assert ql.QuantizedLinearDescriptor(2, 3, 4, ql.f32, scheme=S.STATIC).q_min == -127
    assert ql.QuantizedLinearDescriptor(2, 3, 4, ql.f32).scheme is S.DYNAMIC
    assert d.activation_pass == ql.DynamicRangeQuantizeDescriptor(2, 4, ql.f32, -128, 127,
                                                                  "dynamic_asym")
    assert [s.asymmetric for s in S] == [False, False, True, True]
    assert [s.static for s in S] == [False, True, True, False]
    with pytest.raises(ql.InvalidProblem, match="scheme: expected one of 'dynamic', 'static', "
                                                "'static_asym', 'dynamic_asym', got 'token'"):
        ql.QuantizedLinearDescriptor(2, 3, 4, ql.f32, scheme="token")
    with pytest.raises(ql.InvalidProblem, match="scheme: expected one of"):
        ql.DynamicRangeQuantizeDescriptor(2, 4, ql.f32, scheme=1)


def test_k_bound_with_a_zero_point():
    assert ql.max_exact_k(-128, 127, asymmetric=True) == 65793
    ql.QuantizedLinearDescriptor(1, 1, 65793, ql.f32, scheme="static_asym")
    with pytest.raises(ql.InvalidProblem,
                       match=r"k: expected at most 65793 .*\(q_max - q_min\) = 255.*got 65794"):
        ql.QuantizedLinearDescriptor(1, 1, 65794, ql.f32, scheme="dynamic_asym")
    # the symmetric schemes keep the larger bound
    ql.QuantizedLinearDescriptor(1, 1, 65794, ql.f32, scheme="static", q_min=-128)


def test_weight_colsum():
    rng = np.random.default_rng()
    w = random_weight(rng, 7, 300)
    cs = ql.weight_colsum(w)
    assert cs.dtype == np.int32
    assert cs.tolist() == [sum(int(v) for v in row) for row in w]
    assert ql.weight_colsum(np.full((1, 70000), -128, np.int8))[0] == -128 * 70000
    with pytest.raises(ql.InvalidProblem, match="weight_q: expected a 2-D int8 array"):
        ql.weight_colsum(w.astype(np.int16))


def _args(be, scheme, rng, m=3, k=8, n=4, dtype=ql.f32):
    wq = random_weight(rng, n, k)
    extra = {}
    if scheme.asymmetric:
        extra = {"act_zp_scratch": be.empty((m,), ql.s32),
                 "weight_colsum": be.from_numpy(ql.weight_colsum(wq))}
    if scheme.static:
        extra["input_scale"] = 0.05
    if scheme.static_zero_point:
        extra["input_zero_point"] = -3
    plan = ql.QuantizedLinearPlan.select(
        be, ql.QuantizedLinearDescriptor(m, n, k, dtype, scheme=scheme))
    base = dict(activation=be.from_numpy(random_activation(rng, m, k, dtype)),
                weight_q=be.from_numpy(wq), weight_scale=be.from_numpy(random_scale(rng, n, dtype)),
                output=poisoned(be, (m, n), dtype, rng),
                act_q_scratch=poisoned(be, (m, k), ql.s8, rng),
                act_scale_scratch=poisoned(be, (m,), dtype, rng))
    return plan, base | extra


BAD = [
    # (scheme, change, message)
    ("dynamic_asym", {"act_zp_scratch": None},
     r"act_zp_scratch: expected a s32 tensor of shape \(3,\), got None"),
    ("static_asym", {"weight_colsum": None},
     r"weight_colsum: expected a s32 tensor of shape \(4,\), got None"),
    ("dynamic_asym", {"act_zp_scratch": "f32"}, "act_zp_scratch: expected dtype s32, got f32"),
    ("dynamic_asym", {"weight_colsum": "short"},
     r"weight_colsum: expected shape \(4,\), got \(3,\)"),
    ("dynamic", {"input_scale": 0.1},
     "input_scale: expected None with scheme 'dynamic', got float"),
    ("static", {"input_zero_point": 0},
     "input_zero_point: expected None with scheme 'static', got int"),
    ("static", {"act_zp_scratch": "s32"},
     "act_zp_scratch: expected None with scheme 'static', got"),
    ("static", {"input_scale": None}, "input_scale: expected a real number with scheme 'static', "
                                      "got None"),
    ("static_asym", {"input_zero_point": None},
     "input_zero_point: expected an integer with scheme 'static_asym', got None"),
    ("static", {"input_scale": 0.0}, "input_scale: expected a finite real number > 0, got 0.0"),
    ("static", {"input_scale": -1}, "input_scale: expected a finite real number > 0, got -1"),
    ("static", {"input_scale": float("nan")}, "input_scale: expected a finite real number > 0"),
    ("static", {"input_scale": float("inf")}, "input_scale: expected a finite real number > 0"),
    ("static", {"input_scale": True}, "input_scale: expected a finite real number > 0, got True"),
    ("static", {"input_scale": "0.1"}, "input_scale: expected a finite real number > 0, got '0.1'"),
    ("static", {"input_scale": np.array([0.1, 0.2])},
     "input_scale: expected a finite real number > 0, got array"),
    ("static", {"input_scale": 1e300}, "input_scale: expected a value that stays finite and > 0 "
                                       "in f32, got 1e[+]300 \\(it rounds to inf\\)"),
    ("static_asym", {"input_zero_point": 128},
     r"input_zero_point: expected an integer in -128..127 \(q_min..q_max of scheme "
     r"'static_asym'\), got 128"),
    ("static_asym", {"input_zero_point": 1.0},
     "input_zero_point: expected an integer in -128..127"),
]


@pytest.mark.parametrize("scheme,change,message", BAD, ids=[f"{b[0]}-{list(b[1])[0]}-{i}"
                                                            for i, b in enumerate(BAD)])
def test_bad_scheme_arguments(qlinear_backend, scheme, change, message):
    be = qlinear_backend
    rng = np.random.default_rng()
    scheme = S(scheme)
    try:
        plan, args = _args(be, scheme, rng)
    except ql.Unsupported as e:
        pytest.skip(f"{be.name}: {e}")
    assert plan.can_implement(ql.QuantizedLinearArgs(**args))
    for name, value in change.items():
        if isinstance(value, str) and value in ("f32", "s32"):
            value = be.empty((3,), value)
        elif isinstance(value, str) and value == "short":
            value = be.empty((3,), ql.s32)
        args[name] = value
    with pytest.raises(ql.InvalidProblem, match=message):
        plan.can_implement(ql.QuantizedLinearArgs(**args))
    with pytest.raises(ql.InvalidProblem, match=message):
        plan.run(ql.QuantizedLinearArgs(**args))


def test_input_scale_forms_and_rounding():
    """A one-element array (as checkpoints store it) and numpy scalars are accepted; the
    scale is used rounded to TIn."""
    be = ql.backend("cpu")
    rng = np.random.default_rng()
    m, k = 2, 5
    x = random_activation(rng, m, k, ql.f16)
    desc = ql.DynamicRangeQuantizeDescriptor(m, k, ql.f16, scheme="static")
    plan = ql.DynamicRangeQuantizePlan.select(be, desc)
    for s in (np.array([0.0123]), np.float32(0.0123), 0.0123, np.array(0.0123, ql.bf16.numpy)):
        xs = np.empty(m, np.float16)
        plan.run(ql.DynamicRangeQuantizeArgs(x, np.empty((m, k), np.int8), xs, input_scale=s))
        assert (xs == np.float16(float(np.asarray(s).reshape(())))).all()


def test_backends_refuse_schemes_they_do_not_run():
    """A backend that does not list a scheme refuses it at selection with Unsupported."""

    class Narrow(type(ql.backend("cpu"))):
        name = "narrow"
        activation_schemes = frozenset({"dynamic"})

    with pytest.raises(ql.Unsupported, match="scheme: the narrow backend runs the activation "
                                             "schemes dynamic, got 'static'"):
        ql.QuantizedLinearPlan.select(Narrow(), ql.QuantizedLinearDescriptor(1, 1, 1, ql.f32,
                                                                             scheme="static"))
