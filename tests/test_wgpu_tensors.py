"""wgpu tensors: padded s8 rows, round trips of every dtype, wrapping user buffers
(``wrap_buffer``) and what is refused, and a whole plan on tensors carved out of one
user buffer."""

import numpy as np
import pytest

import qlinear as ql
from qltest import (
    assert_bitwise_equal,
    oracle_linear_scheme,
    random_activation,
    random_scale,
    random_weight,
)


def test_s8_rows_are_padded(wgpu_be, rng):
    assert wgpu_be.expected_strides((5, 6), ql.s8) == (8, 1)
    assert wgpu_be.expected_strides((5, 8), ql.s8) == (8, 1)
    assert wgpu_be.expected_strides((5, 6), ql.f16) == (6, 1)
    w = random_weight(rng, 3, 5)
    t = wgpu_be.from_numpy(w)
    assert t.strides == (8, 1)
    raw = np.frombuffer(wgpu_be.device.queue.read_buffer(t.handle, 0, 24), np.int8).reshape(3, 8)
    assert (raw[:, 5:] == 0).all() and (raw[:, :5] == w).all()
    np.testing.assert_array_equal(wgpu_be.to_numpy(t), w)
    assert wgpu_be.empty((3, 5), ql.s8).strides == (8, 1)


def test_from_numpy_round_trips_every_dtype(wgpu_be, rng):
    for dt in (ql.f32, ql.f16, ql.bf16, ql.s8, ql.s32):
        a = (random_weight(rng, 3, 7) if dt == ql.s8
             else rng.integers(-2**31, 2**31, (3, 7), dtype=np.int32) if dt == ql.s32
             else rng.standard_normal((3, 7)).astype(dt.numpy))
        t = wgpu_be.from_numpy(a, readonly=True)
        assert t.readonly and t.backend == "wgpu" and t.memory is t.handle
        assert_bitwise_equal(wgpu_be.to_numpy(t), a, dt.name)
        assert_bitwise_equal(wgpu_be.to_numpy(wgpu_be.narrow(t, 2)), a[:2], dt.name)


def test_s32_tensors_are_plain_row_major(wgpu_be, rng):
    """Zero points and column sums: 4-byte elements, no padding, zero-filled when empty,
    wrapped from inside a user buffer."""
    assert wgpu_be.expected_strides((5, 3), ql.s32) == (3, 1)
    e = wgpu_be.empty((2, 3), ql.s32)
    assert e.strides == (3, 1) and e.dtype == ql.s32
    np.testing.assert_array_equal(wgpu_be.to_numpy(e), np.zeros((2, 3), np.int32))
    u = wgpu_be._wgpu.BufferUsage
    buf = wgpu_be.device.create_buffer(size=256, usage=u.STORAGE | u.COPY_SRC | u.COPY_DST)
    a = rng.integers(-2**31, 2**31, 7, dtype=np.int32)
    wgpu_be.device.queue.write_buffer(buf, 36, a.tobytes())
    t = wgpu_be.wrap_buffer(buf, (7,), ql.s32, offset=36)
    assert_bitwise_equal(wgpu_be.to_numpy(t), a, "wrapped s32")
    with pytest.raises(ql.InvalidProblem, match="buffer: expected at least 264 bytes"):
        wgpu_be.wrap_buffer(buf, (57,), ql.s32, offset=36)


def test_wrap_refuses_what_is_not_a_tensor(wgpu_be):
    with pytest.raises(ql.InvalidProblem, match=r"activation: .*wrap_buffer"):
        wgpu_be.wrap(np.zeros((2, 2), np.float32), name="activation")
    with pytest.raises(ql.InvalidProblem, match=r"weight_q: .*wrap_buffer"):
        wgpu_be.wrap(object(), name="weight_q")


def test_wrap_buffer(wgpu_be, rng):
    wgpu = wgpu_be._wgpu
    u = wgpu.BufferUsage
    buf = wgpu_be.device.create_buffer(size=4096, usage=u.STORAGE | u.COPY_SRC | u.COPY_DST)
    a = rng.standard_normal((4, 5)).astype(np.float16)
    wgpu_be.device.queue.write_buffer(buf, 64, a.tobytes())
    t = wgpu_be.wrap_buffer(buf, (4, 5), ql.f16, offset=64)
    assert t.handle is buf and t.memory is buf and t.buffer_offset == 64
    assert_bitwise_equal(wgpu_be.to_numpy(t), a, "wrapped")
    with pytest.raises(ql.InvalidProblem, match="STORAGE"):
        wgpu_be.wrap_buffer(wgpu_be.device.create_buffer(size=64, usage=u.COPY_DST | u.MAP_READ),
                            (2,), ql.f32)
    with pytest.raises(ql.InvalidProblem, match="offset: expected a multiple of 4"):
        wgpu_be.wrap_buffer(buf, (2,), ql.f32, offset=2)
    with pytest.raises(ql.InvalidProblem, match="offset"):
        wgpu_be.wrap_buffer(buf, (2,), ql.f32, offset=-4)
    with pytest.raises(ql.InvalidProblem, match="at least 4100 bytes"):
        wgpu_be.wrap_buffer(buf, (1025,), ql.f32)
    with pytest.raises(ql.InvalidProblem, match="expected a wgpu.GPUBuffer"):
        wgpu_be.wrap_buffer(np.zeros(4), (4,), ql.f32)
    storage_only = wgpu_be.wrap_buffer(wgpu_be.device.create_buffer(size=64, usage=u.STORAGE),
                                       (4,), ql.f32)
    with pytest.raises(ql.InvalidProblem, match="COPY_SRC"):
        wgpu_be.to_numpy(storage_only)
    s8 = wgpu_be.wrap_buffer(buf, (3, 5), ql.s8, offset=8)  # rows padded to 8 bytes
    assert s8.strides == (8, 1)
    wgpu_be.wrap_buffer(buf, (511, 5), ql.s8, offset=8)  # exactly fills the buffer
    with pytest.raises(ql.InvalidProblem, match="at least 4104 bytes"):
        wgpu_be.wrap_buffer(buf, (512, 5), ql.s8, offset=8)


@pytest.mark.parametrize("scheme", ["dynamic", "dynamic_asym"])
@pytest.mark.parametrize("dtype", [ql.f16, ql.bf16], ids=["f16", "bf16"])
def test_every_tensor_in_one_user_buffer(wgpu_be, rng, dtype, scheme):
    """All seven tensors (nine with a zero point) carved out of one GPUBuffer at 4-byte (not
    binding-) aligned offsets: no usage conflict, no overlap, 16-bit words shared at tensor
    boundaries."""
    m, k, n = 5, 7, 9
    asym = scheme == "dynamic_asym"
    x = random_activation(rng, m, k, dtype)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    bias = rng.standard_normal(n).astype(dtype.numpy)
    u = wgpu_be._wgpu.BufferUsage
    buf = wgpu_be.device.create_buffer(size=8192, usage=u.STORAGE | u.COPY_SRC | u.COPY_DST)
    off = 4
    views = {}
    tensors = [("x", (m, k), dtype, x), ("wq", (n, k), ql.s8, wq), ("ws", (n,), dtype, ws),
               ("bias", (n,), dtype, bias), ("y", (m, n), dtype, None),
               ("aq", (m, k), ql.s8, None), ("as", (m,), dtype, None)]
    if asym:
        tensors += [("zp", (m,), ql.s32, None), ("cs", (n,), ql.s32, ql.weight_colsum(wq))]
    for name, shape, dt, host in tensors:
        t = wgpu_be.wrap_buffer(buf, shape, dt, offset=off)
        if host is not None:
            src = wgpu_be.from_numpy(host)
            start, end = src.byte_span()
            enc = wgpu_be.device.create_command_encoder()
            size = (end + 3) // 4 * 4
            enc.copy_buffer_to_buffer(src.handle, 0, buf, off, size)
            wgpu_be.device.queue.submit([enc.finish()])
        else:
            fill = np.full(t.byte_span()[1] - off + 3 & ~3, 0xA5, np.uint8)
            wgpu_be.device.queue.write_buffer(buf, off, fill)
        views[name] = t
        off = (t.byte_span()[1] + 7) // 4 * 4
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype, scheme=scheme)
    plan = ql.QuantizedLinearPlan.select(wgpu_be, desc)
    args = ql.QuantizedLinearArgs(activation=views["x"], weight_q=views["wq"],
                                  weight_scale=views["ws"], output=views["y"],
                                  act_q_scratch=views["aq"], act_scale_scratch=views["as"],
                                  bias=views["bias"], act_zp_scratch=views.get("zp"),
                                  weight_colsum=views.get("cs"))
    plan.run(args)
    want_y, want_q, want_s, want_zp = oracle_linear_scheme(x, wq, ws, bias, dtype, scheme)
    if asym:
        assert_bitwise_equal(wgpu_be.to_numpy(views["zp"]).astype(np.int64), want_zp, "act_zp")
    assert_bitwise_equal(wgpu_be.to_numpy(views["y"]), want_y, "y")
    assert_bitwise_equal(wgpu_be.to_numpy(views["aq"]).astype(np.int64), want_q, "act_q")
    assert_bitwise_equal(wgpu_be.to_numpy(views["as"]), want_s, "act_scale")
    assert_bitwise_equal(wgpu_be.to_numpy(views["x"]), x, "x untouched")
