"""wgpu streams: batches (many runs, one submit; flush, abort, ended batches), runs
encoded into a caller's command encoder, and GPU timestamps."""

import numpy as np
import pytest

import qlinear as ql
from qltest import (
    assert_bitwise_equal,
    oracle_linear,
    poisoned,
    random_activation,
    random_scale,
    random_weight,
)
from wgpu_helpers import linear_args, small_linear


def test_batch_runs_many_plans_in_one_submit(wgpu_be, rng):
    m, k, n, dtype = 3, 20, 12, ql.f32
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype)
    plan = ql.QuantizedLinearPlan.select(wgpu_be, desc)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    w_t, ws_t = wgpu_be.from_numpy(wq, readonly=True), wgpu_be.from_numpy(ws, readonly=True)
    xs = [random_activation(rng, m, k, dtype) for _ in range(5)]
    outs = []
    with wgpu_be.batch() as b:
        for x in xs:
            args = ql.QuantizedLinearArgs(
                activation=wgpu_be.from_numpy(x), weight_q=w_t, weight_scale=ws_t,
                output=poisoned(wgpu_be, (m, n), dtype, rng),
                act_q_scratch=wgpu_be.empty((m, k), ql.s8),
                act_scale_scratch=wgpu_be.empty((m,), dtype))
            plan.run(args, stream=b)
            outs.append(args.output)
        assert b.pending == 5 and b.submitted == 0
    assert b.submitted == 5
    for x, y in zip(xs, outs, strict=True):
        assert_bitwise_equal(wgpu_be.to_numpy(y), oracle_linear(x, wq, ws, None, dtype)[0],
                             "batched")


def test_batch_flush_and_abort(wgpu_be, rng):
    dtype = ql.f32
    plan, args, x, wq, ws = small_linear(wgpu_be, rng, dtype=dtype)
    with wgpu_be.batch() as b:
        plan.run(args, stream=b)
        # to_numpy inside the block submits what is encoded, then waits.
        assert_bitwise_equal(wgpu_be.to_numpy(args.output),
                             oracle_linear(x, wq, ws, None, dtype)[0],
                             "flushed")
        assert b.submitted == 1
    args2 = linear_args(wgpu_be, rng, x, wq, ws, None, dtype)
    with pytest.raises(ZeroDivisionError):
        with wgpu_be.batch() as b2:
            plan.run(args2, stream=b2)
            1 / 0  # noqa: B018
    assert b2.submitted == 0
    assert (wgpu_be.to_numpy(args2.output) == np.float32(31337.0)).all()  # never submitted
    with pytest.raises(ql.InvalidProblem, match="stream"):
        plan.run(args2, stream=b2)  # ended
    with pytest.raises(ql.InvalidProblem, match="stream"):
        plan.run(args2, stream="default")
    enc = wgpu_be.device.create_command_encoder()
    plan.run(args2, stream=enc)  # the caller submits
    wgpu_be.device.queue.submit([enc.finish()])
    wgpu_be.synchronize()
    assert_bitwise_equal(wgpu_be.to_numpy(args2.output), oracle_linear(x, wq, ws, None, dtype)[0],
                         "encoder")


def test_batch_timestamps(wgpu_be, rng):
    m, k, n, dtype = 4, 16, 8, ql.f32
    plan = ql.QuantizedLinearPlan.select(wgpu_be, ql.QuantizedLinearDescriptor(m, n, k, dtype))
    args = linear_args(wgpu_be, rng, random_activation(rng, m, k, dtype), random_weight(rng, n, k),
                 random_scale(rng, n, dtype), None, dtype)
    if not wgpu_be.has_timestamps:
        with pytest.raises(ql.Unsupported, match="timestamp"):
            wgpu_be.batch(timestamps=True)
        return
    with wgpu_be.batch(timestamps=True) as b:
        plan.run(args, stream=b)
        b.submit()
        plan.run(args, stream=b)
    assert b.submitted == 2
    assert 0 < b.gpu_seconds() < 60
    with wgpu_be.batch() as plain:
        pass
    with pytest.raises(ql.InvalidProblem, match="timestamps=True"):
        plain.gpu_seconds()
