"""A plan recognises last run's arguments instead of checking them again
(qlinear.check_cache), without letting a changed argument through and without keeping
any of them alive."""

import gc
import weakref

import numpy as np
import pytest

import qlinear as ql
from qlinear import validate
from qltest import assert_bitwise_equal, oracle_linear, random_activation, random_weight

M, K, N = 3, 8, 5


@pytest.fixture
def checks(monkeypatch):
    """Counts the full checks plans run."""
    calls = []
    real = validate.check_args

    def counted(*a, **kw):
        calls.append(a[2])
        return real(*a, **kw)
    monkeypatch.setattr(validate, "check_args", counted)
    return calls


def _problem(be, rng, scheme="dynamic", **extra):
    desc = ql.QuantizedLinearDescriptor(m=M, c_out=N, k=K, dtype=ql.f32, scheme=scheme)
    plan = ql.QuantizedLinearPlan.select(be, desc)
    wq = random_weight(rng, N, K)
    x = random_activation(rng, M, K, ql.f32)
    ws = np.full(N, 0.01, np.float32)
    args = ql.QuantizedLinearArgs(x, be.from_numpy(wq, readonly=True),
                                  be.from_numpy(ws, readonly=True),
                                  np.empty((M, N), np.float32), np.empty((M, K), np.int8),
                                  np.empty(M, np.float32), **extra)
    return plan, args, x, wq, ws


def test_the_same_arguments_are_checked_once(checks, rng):
    be = ql.backend("cpu")
    plan, args, x, wq, ws = _problem(be, rng)
    for _ in range(3):
        args.output[:] = np.nan
        plan.run(args)
        assert_bitwise_equal(args.output, oracle_linear(x, wq, ws, None, ql.f32)[0], "output")
    assert len(checks) == 1
    # Another plan of the same problem keeps its own memory.
    other = ql.QuantizedLinearPlan.select(be, plan.descriptor)
    other.run(args)
    assert len(checks) == 2


def test_new_contents_of_the_same_arrays_are_used(checks, rng):
    be = ql.backend("cpu")
    plan, args, x, wq, ws = _problem(be, rng)
    plan.run(args)
    x[:] = random_activation(rng, M, K, ql.f32)
    plan.run(args)
    assert len(checks) == 1
    assert_bitwise_equal(args.output, oracle_linear(x, wq, ws, None, ql.f32)[0], "output")


@pytest.mark.parametrize("change, match", [
    ("reshape in place", "activation: expected shape"),
    ("read-only output", "output: expected a writable tensor"),
    ("other dtype", "activation: expected dtype f32"),
    ("aliasing output", "overlaps"),
    ("bias of another length", "bias: expected shape"),
])
def test_a_changed_argument_is_checked_again(checks, rng, change, match):
    be = ql.backend("cpu")
    plan, args, *_ = _problem(be, rng)
    plan.run(args)
    before = args.act_q_scratch.copy()
    if change == "reshape in place":
        args.activation.shape = (K, M)
    elif change == "read-only output":
        args.output.flags.writeable = False
    elif change == "other dtype":
        args.activation = args.activation.astype(np.float64)
    elif change == "aliasing output":
        buf = np.empty(M * N * 4, np.uint8)
        args.output = buf.view(np.float32).reshape(M, N)
        args.act_q_scratch = buf[:M * K].view(np.int8).reshape(M, K)
    elif change == "bias of another length":
        args.bias = np.ones(N + 1, np.float32)
    with pytest.raises(ql.InvalidProblem, match=match):
        plan.run(args)
    assert len(checks) == 2
    if change != "aliasing output":
        assert np.array_equal(args.act_q_scratch, before)  # nothing written


def test_a_read_only_array_is_checked_every_time(checks, rng):
    be = ql.backend("cpu")
    plan, args, *_ = _problem(be, rng)
    args.activation.flags.writeable = False
    plan.run(args)
    plan.run(args)
    assert len(checks) == 2


def test_changed_host_numbers_are_checked_and_used(checks, rng):
    be = ql.backend("cpu")
    plan, args, x, *_ = _problem(be, rng, scheme="static", input_scale=0.05)
    plan.run(args)
    first = args.act_q_scratch.copy()
    plan.run(args)
    assert len(checks) == 1
    args.input_scale = 0.5
    plan.run(args)
    assert len(checks) == 2 and not np.array_equal(args.act_q_scratch, first)
    args.input_scale = -1.0
    with pytest.raises(ql.InvalidProblem, match="input_scale"):
        plan.run(args)


def test_nothing_is_kept_alive(rng):
    be = ql.backend("cpu")
    plan, args = _problem(be, rng)[:2]
    plan.run(args)
    refs = [weakref.ref(getattr(args, name)) for name in
            ("activation", "weight_q", "output", "act_q_scratch")]
    del args
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_collected_tensor_is_not_taken_for_a_new_one(checks, rng):
    be = ql.backend("cpu")
    plan, args, *_ = _problem(be, rng)
    plan.run(args)
    args.weight_q = be.from_numpy(random_weight(rng, N, K + 1))  # the old one is collected
    gc.collect()
    with pytest.raises(ql.InvalidProblem, match="weight_q: expected shape"):
        plan.run(args)


def test_wgpu_tensors_are_recognised(checks, wgpu_be, rng):
    plan, args, x, wq, ws = _problem(wgpu_be, rng)
    args = ql.QuantizedLinearArgs(
        wgpu_be.from_numpy(x), args.weight_q, args.weight_scale, wgpu_be.empty((M, N), ql.f32),
        wgpu_be.empty((M, K), ql.s8), wgpu_be.empty((M,), ql.f32))
    plan.run(args)
    plan.run(args)
    assert len(checks) == 1
    assert_bitwise_equal(wgpu_be.to_numpy(args.output),
                         oracle_linear(x, wq, ws, None, ql.f32)[0], "output")
