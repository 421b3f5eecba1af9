"""wgpu-only behaviour: both inner-product strategies, both f16 paths, bf16, dispatch
splitting, sub-range binding, batches, wrap_buffer, device errors, workgroup memory,
pipeline caching and the shader composition.

Every numeric check is against the independent int64 oracle of ``qltest``, on fresh
random data, with outputs poisoned before the run and every element compared bit
for bit. Runs on whatever adapter wgpu finds (lavapipe on a machine without a GPU);
skipped with the reason when there is none.
"""

import numpy as np
import pytest

import qlinear as ql
from qlinear.bench import float_matmul
from qlinear.bench.wgpu_kernels import micro_kernels
from qltest import (assert_bitwise_equal, check_linear, oracle_linear, oracle_quantize, poisoned,
                    random_activation, random_scale, random_weight)


@pytest.fixture(scope="module")
def be():
    try:
        return ql.backend("wgpu")
    except ql.BackendUnavailable as e:
        pytest.skip(f"wgpu unavailable: {e.reason}")


@pytest.fixture
def rng():
    return np.random.default_rng()


DTYPES = [ql.f32, ql.f16, ql.bf16]
# (m, k, n): small-M kernel, tiled kernel; odd K and odd N (f16 words shared across rows).
SHAPES = [(1, 13, 7), (16, 130, 33), (17, 37, 9), (70, 258, 67)]


def _linear(be, x, wq, ws, bias, dtype, rng, q_min=-127, q_max=127):
    y = check_linear(be, x, wq, ws, bias, dtype, q_min, q_max, rng=rng)
    return y


def _plan(be, m, n, k, dtype, **settings):
    with be.configured(**settings):
        return ql.QuantizedLinearPlan.select(
            be, ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype))


def _dispatch_count(plan):
    (d,) = plan._executable._runs.entries.values()
    return len(d.items)


# -- both inner-product strategies, both f16 storages, bf16 -----------------------------

@pytest.mark.parametrize("ip", ["dot4", "fma"])
@pytest.mark.parametrize("dtype,storage", [(ql.f32, None), (ql.f16, "native"), (ql.f16, "packed"),
                                           (ql.bf16, None)],
                         ids=["f32", "f16native", "f16packed", "bf16"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_strategies_and_storages(be, rng, ip, dtype, storage, m, k, n):
    if storage == "native" and "shader-f16" not in be.features:
        pytest.skip("adapter has no shader-f16")
    settings = {"inner_product": ip, "f16_storage": storage}
    plan = _plan(be, m, n, k, dtype, **settings)
    assert f"_{ip}" in plan.sku
    if dtype == ql.f16:
        assert f"f16_{storage}" in plan.sku
    assert ("gemv" in plan.sku) == (m <= 16)
    x = random_activation(rng, m, k, dtype)
    bias = rng.standard_normal(n).astype(dtype.numpy) if m % 2 else None
    with be.configured(**settings):
        _linear(be, x, random_weight(rng, n, k), random_scale(rng, n, dtype), bias, dtype, rng)


@pytest.mark.parametrize("dtype,storage", [(ql.f32, None), (ql.f16, "packed"), (ql.bf16, None)],
                         ids=["f32", "f16packed", "bf16"])
@pytest.mark.parametrize("m,k,n", [(17, 37, 9), (130, 70, 135), (129, 1100, 40)])
def test_8x8_register_tiles(be, rng, dtype, storage, m, k, n):
    """The GPU tile (128 x 128 blocks, 8 x 8 per invocation), forced on any adapter."""
    settings = {"tile": "8x8", "f16_storage": storage, "inner_product": "dot4"}
    plan = _plan(be, m, n, k, dtype, **settings)
    assert "128x128" in plan.sku and "r8x8" in plan.sku
    x = random_activation(rng, m, k, dtype)
    with be.configured(**settings):
        _linear(be, x, random_weight(rng, n, k), random_scale(rng, n, dtype),
                rng.standard_normal(n).astype(dtype.numpy), dtype, rng)


@pytest.mark.parametrize("ip", ["dot4", "fma"])
@pytest.mark.parametrize("m", [3, 40])
def test_fma_chunks_are_exact_at_the_extremes(be, rng, ip, m):
    """K over several 1024-element chunks with every product at +-2^14: the f32 partial
    sums reach 2^24 exactly, and the int32 sum is exact."""
    k, n, dtype = 3 * 1024 + 8, 6, ql.f32
    x = np.where(rng.random((m, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    x[:, 0] = -1.0  # amax 1, so q = x * 127 ... clamp gives +-127; q_min -128 below
    wq = np.full((n, k), -128, np.int8)
    wq[1::2] = 127
    with be.configured(inner_product=ip):
        _linear(be, x, wq, random_scale(rng, n, dtype), None, dtype, rng, q_min=-128, q_max=127)


def test_default_inner_product_per_adapter(be):
    plan = _plan(be, 64, 64, 64, ql.f32)
    want = "fma" if be.backend_type in ("Metal", "OpenGL") else "dot4"
    assert plan.sku.endswith(f"_{want}+f32_words")
    assert be.info()["inner_product"] == want


def test_f16_native_needs_the_feature(be):
    if "shader-f16" in be.features:
        assert "f16_native" in _plan(be, 2, 2, 2, ql.f16).sku
    else:
        with pytest.raises(ql.Unsupported, match="shader-f16"):
            _plan(be, 2, 2, 2, ql.f16, f16_storage="native")


@pytest.mark.parametrize("storage", ["native", "packed"])
def test_f16_subnormal_scales_and_inputs(be, rng, storage):
    """Rows whose scale is an f16 subnormal, rows that underflow to 0, subnormal inputs."""
    if storage == "native" and "shader-f16" not in be.features:
        pytest.skip("adapter has no shader-f16")
    m, k, n, dtype = 6, 11, 5, ql.f16
    x = random_activation(rng, m, k, dtype)
    x[0] *= np.float16(1e-3) / np.abs(x[0]).max()      # scale ~ 8e-6: f16 subnormal
    x[1] = (x[1] / np.abs(x[1]).max() * np.float16(3e-6)).astype(np.float16)  # underflow: scale 1
    x[2] = np.float16(6e-8) * np.sign(x[2])            # the smallest subnormal
    x[3, ::2] = 0
    with be.configured(f16_storage=storage):
        _linear(be, x, random_weight(rng, n, k), random_scale(rng, n, dtype),
                rng.standard_normal(n).astype(np.float16), dtype, rng)


@pytest.mark.parametrize("exact_only", [False, True], ids=["mixed", "exact"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[d.name for d in DTYPES])
def test_rounding_ties_and_specials(be, rng, dtype, exact_only):
    """x / scale exactly on .5 (round half to even), NaN / Inf rows, zero rows, subnormals."""
    m, k, n = 8, 24, 10
    x = random_activation(rng, m, k, dtype)
    # Row 0: amax 127 * s with s a power of two, so x / s is exact; put values on ties.
    s = 2.0 ** -3
    x[0] = np.array([(j % 21 - 10) + 0.5 for j in range(k)]) * s
    x[0, 0] = 127 * s
    x[1, 3] = np.nan
    x[2, 5] = np.inf
    x[3, 7] = -np.inf
    x[4] = 0
    if dtype != ql.f16:
        x[5] = (rng.standard_normal(k) * 1e-39).astype(dtype.numpy)  # f32 / bf16 subnormals
    x = x.astype(dtype.numpy)
    with be.configured(quantize_exact_only=exact_only):
        _linear(be, x, random_weight(rng, n, k), random_scale(rng, n, dtype),
                rng.standard_normal(n).astype(dtype.numpy), dtype, rng)


@pytest.mark.parametrize("exact_only", [False, True], ids=["mixed", "exact"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[d.name for d in DTYPES])
def test_quantization_near_rounding_edges(be, rng, dtype, exact_only):
    """Many quotients x / scale within a few ulps of k + 0.5, where a float division or
    a reciprocal may round the other way: the exact path must agree with the oracle
    (forced for every element too, since an adapter's division may happen to be exact)."""
    m, k = 64, 512
    q_max = 127
    rows = []
    for _ in range(m):
        amax = np.float32(rng.uniform(0.5, 4.0))
        s = (np.array([amax], np.float32) / np.float32(q_max)).astype(dtype.numpy)
        s32 = np.float32(s[0])
        t = rng.integers(-127, 127, k) + 0.5
        eps = rng.choice([-3, -2, -1, 0, 1, 2, 3], k) * 2.0 ** -20 * np.abs(t)
        row = ((t + eps) * np.float64(s32)).astype(np.float32)
        row[0] = amax
        rows.append(row)
    x = np.array(rows).astype(dtype.numpy)
    desc = ql.DynamicRangeQuantizeDescriptor(m=m, k=k, dtype=dtype)
    with be.configured(quantize_exact_only=exact_only):
        plan = ql.DynamicRangeQuantizePlan.select(be, desc)
    assert ("_exact" in plan.sku) == exact_only
    args = ql.DynamicRangeQuantizeArgs(activation=be.from_numpy(x),
                                       act_q=poisoned(be, (m, k), ql.s8, rng),
                                       act_scale=poisoned(be, (m,), dtype, rng))
    plan.run(args)
    q, s = oracle_quantize(x, dtype)
    assert_bitwise_equal(be.to_numpy(args.act_scale), s, dtype.name)
    assert_bitwise_equal(be.to_numpy(args.act_q).astype(np.int64), q, dtype.name)


def test_bf16_output_rounding_is_nearest_even(be, rng):
    """Outputs that fall exactly halfway between two bf16 values, and outputs with
    mantissa bits just above and below halfway."""
    m, k, n, dtype = 5, 8, 64, ql.bf16
    x = random_activation(rng, m, k, dtype)
    wq = random_weight(rng, n, k)
    # bias values with a half-ulp pattern: y = acc*s*ws + bias lands near bf16 ties often.
    ws = (np.ones(n) * 2.0 ** -7).astype(dtype.numpy)
    bias = (rng.integers(-2**10, 2**10, n) * 2.0 ** -9 + 2.0 ** -17).astype(dtype.numpy)
    _linear(be, x, wq, ws, bias, dtype, rng)
    _linear(be, x, wq, ws, None, dtype, rng)


# -- limits: dispatch splitting, sub-range binding, workgroup memory ---------------------

def test_rows_past_65535_split_the_dispatch(be, rng):
    """More rows than one dispatch dimension holds, few columns: real limit, bf16."""
    m, k, n, dtype = 65_535 + 4_000, 6, 3, ql.bf16
    x = random_activation(rng, m, k, dtype)
    y = _linear(be, x, random_weight(rng, n, k), random_scale(rng, n, dtype), None, dtype, rng)
    assert y.shape == (m, n)


@pytest.mark.parametrize("m", [5, 300])
def test_lowered_workgroup_limit_splits_every_kernel(be, rng, m):
    k, n, dtype = 9, 150, ql.f16
    plan = _plan(be, m, n, k, dtype, max_workgroups_per_dim=2)
    x = random_activation(rng, m, k, dtype)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    with be.configured(max_workgroups_per_dim=2):
        _linear(be, x, wq, ws, rng.standard_normal(n).astype(np.float16), dtype, rng)
    # Run the selected plan itself: its dispatch list shows the split.
    args = _args(be, rng, x, wq, ws, None, dtype)
    plan.run(args)
    want_y, _, _ = oracle_linear(x, wq, ws, None, dtype)
    assert_bitwise_equal(be.to_numpy(args.output), want_y, plan.sku)
    assert _dispatch_count(plan) > 4


@pytest.mark.parametrize("dtype", [ql.f16, ql.f32], ids=["f16", "f32"])
@pytest.mark.parametrize("m", [3, 90])
def test_tensors_past_a_lowered_binding_limit(be, rng, dtype, m):
    """Every tensor larger than the (lowered) storage binding limit: bound in sub-ranges,
    at offsets that are not binding-aligned, with 16-bit words split across blocks."""
    k, n = 45, 77
    limit = 1024
    plan = _plan(be, m, n, k, dtype, max_storage_binding=limit)
    x = random_activation(rng, m, k, dtype)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    bias = rng.standard_normal(n).astype(dtype.numpy)
    args = _args(be, rng, x, wq, ws, bias, dtype)
    plan.run(args)
    want_y, want_q, want_s = oracle_linear(x, wq, ws, bias, dtype)
    assert_bitwise_equal(be.to_numpy(args.output), want_y, plan.sku)
    assert_bitwise_equal(be.to_numpy(args.act_q_scratch).astype(np.int64), want_q, plan.sku)
    assert_bitwise_equal(be.to_numpy(args.act_scale_scratch), want_s, plan.sku)
    assert _dispatch_count(plan) > 4


def test_weight_past_the_real_binding_limit(be, rng):
    """A weight larger than the adapter's storage binding limit (128 MiB on lavapipe), M = 2."""
    limit = be.limits["max-storage-buffer-binding-size"]
    if limit > 256 << 20:
        pytest.skip(f"binding limit {limit} bytes: too large a weight to test here")
    k = 4096
    n = limit // k + 40
    m, dtype = 2, ql.f16
    x = random_activation(rng, m, k, dtype)
    wq = rng.integers(-128, 128, size=(n, k), dtype=np.int8)
    ws = random_scale(rng, n, dtype)
    _linear(be, x, wq, ws, None, dtype, rng)


def test_workgroup_memory_is_checked(be, rng):
    eight = _plan(be, 200, 40, 40, ql.f32, tile="8x8", max_workgroup_storage=4096)
    assert "128x128x16_r8x8" in eight.sku  # BK halved to fit 4 KiB
    # The f32-FMA tiles stage vec4<f32> words: 64x64x32 needs 16 KiB.
    plan = _plan(be, 40, 40, 40, ql.f32, inner_product="fma")
    assert "64x64x32" in plan.sku
    small = _plan(be, 40, 40, 40, ql.f32, inner_product="fma", max_workgroup_storage=4096)
    assert "x16_" in small.sku or "x8_" in small.sku, small.sku
    x = random_activation(rng, 40, 40, ql.f32)
    wq, ws = random_weight(rng, 40, 40), random_scale(rng, 40, ql.f32)
    args = _args(be, rng, x, wq, ws, None, ql.f32)
    small.run(args)
    assert_bitwise_equal(be.to_numpy(args.output), oracle_linear(x, wq, ws, None, ql.f32)[0],
                         small.sku)
    with pytest.raises(ql.Unsupported, match="workgroup memory"):
        _plan(be, 40, 40, 40, ql.f32, max_workgroup_storage=64)
    with pytest.raises(ql.Unsupported, match="workgroup memory"):
        _plan(be, 4, 40, 40, ql.f32, max_workgroup_storage=64)


# -- tensors ---------------------------------------------------------------------------

def _args(be, rng, x, wq, ws, bias, dtype):
    m, k = x.shape
    n = wq.shape[0]
    return ql.QuantizedLinearArgs(
        activation=be.from_numpy(x), weight_q=be.from_numpy(wq), weight_scale=be.from_numpy(ws),
        output=poisoned(be, (m, n), dtype, rng), act_q_scratch=poisoned(be, (m, k), ql.s8, rng),
        act_scale_scratch=poisoned(be, (m,), dtype, rng),
        bias=None if bias is None else be.from_numpy(bias))


def test_s8_rows_are_padded(be, rng):
    assert be.expected_strides((5, 6), ql.s8) == (8, 1)
    assert be.expected_strides((5, 8), ql.s8) == (8, 1)
    assert be.expected_strides((5, 6), ql.f16) == (6, 1)
    w = random_weight(rng, 3, 5)
    t = be.from_numpy(w)
    assert t.strides == (8, 1)
    raw = np.frombuffer(be.device.queue.read_buffer(t.handle, 0, 24), np.int8).reshape(3, 8)
    assert (raw[:, 5:] == 0).all() and (raw[:, :5] == w).all()
    np.testing.assert_array_equal(be.to_numpy(t), w)
    assert be.empty((3, 5), ql.s8).strides == (8, 1)


def test_from_numpy_round_trips_every_dtype(be, rng):
    for dt in (ql.f32, ql.f16, ql.bf16, ql.s8):
        a = rng.standard_normal((3, 7)).astype(dt.numpy) if dt != ql.s8 else random_weight(rng, 3, 7)
        t = be.from_numpy(a, readonly=True)
        assert t.readonly and t.backend == "wgpu" and t.memory is t.handle
        assert_bitwise_equal(be.to_numpy(t), a, dt.name)
        assert_bitwise_equal(be.to_numpy(be.narrow(t, 2)), a[:2], dt.name)


def test_wrap_refuses_what_is_not_a_tensor(be):
    with pytest.raises(ql.InvalidProblem, match=r"activation: .*wrap_buffer"):
        be.wrap(np.zeros((2, 2), np.float32), name="activation")
    with pytest.raises(ql.InvalidProblem, match=r"weight_q: .*wrap_buffer"):
        be.wrap(object(), name="weight_q")


def test_wrap_buffer(be, rng):
    wgpu = be._wgpu
    u = wgpu.BufferUsage
    buf = be.device.create_buffer(size=4096, usage=u.STORAGE | u.COPY_SRC | u.COPY_DST)
    a = rng.standard_normal((4, 5)).astype(np.float16)
    be.device.queue.write_buffer(buf, 64, a.tobytes())
    t = be.wrap_buffer(buf, (4, 5), ql.f16, offset=64)
    assert t.handle is buf and t.memory is buf and t.buffer_offset == 64
    assert_bitwise_equal(be.to_numpy(t), a, "wrapped")
    with pytest.raises(ql.InvalidProblem, match="STORAGE"):
        be.wrap_buffer(be.device.create_buffer(size=64, usage=u.COPY_DST | u.MAP_READ), (2,), ql.f32)
    with pytest.raises(ql.InvalidProblem, match="offset: expected a multiple of 4"):
        be.wrap_buffer(buf, (2,), ql.f32, offset=2)
    with pytest.raises(ql.InvalidProblem, match="offset"):
        be.wrap_buffer(buf, (2,), ql.f32, offset=-4)
    with pytest.raises(ql.InvalidProblem, match="at least 4100 bytes"):
        be.wrap_buffer(buf, (1025,), ql.f32)
    with pytest.raises(ql.InvalidProblem, match="expected a wgpu.GPUBuffer"):
        be.wrap_buffer(np.zeros(4), (4,), ql.f32)
    storage_only = be.wrap_buffer(be.device.create_buffer(size=64, usage=u.STORAGE), (4,), ql.f32)
    with pytest.raises(ql.InvalidProblem, match="COPY_SRC"):
        be.to_numpy(storage_only)
    s8 = be.wrap_buffer(buf, (3, 5), ql.s8, offset=8)  # rows padded to 8 bytes
    assert s8.strides == (8, 1)
    be.wrap_buffer(buf, (511, 5), ql.s8, offset=8)  # exactly fills the buffer
    with pytest.raises(ql.InvalidProblem, match="at least 4104 bytes"):
        be.wrap_buffer(buf, (512, 5), ql.s8, offset=8)


@pytest.mark.parametrize("dtype", [ql.f16, ql.bf16], ids=["f16", "bf16"])
def test_every_tensor_in_one_user_buffer(be, rng, dtype):
    """All seven tensors carved out of one GPUBuffer at 4-byte (not binding-) aligned
    offsets: no usage conflict, no overlap, 16-bit words shared at tensor boundaries."""
    m, k, n = 5, 7, 9
    x = random_activation(rng, m, k, dtype)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    bias = rng.standard_normal(n).astype(dtype.numpy)
    u = be._wgpu.BufferUsage
    buf = be.device.create_buffer(size=8192, usage=u.STORAGE | u.COPY_SRC | u.COPY_DST)
    off = 4
    views = {}
    for name, shape, dt, host in (("x", (m, k), dtype, x), ("wq", (n, k), ql.s8, wq),
                                  ("ws", (n,), dtype, ws), ("bias", (n,), dtype, bias),
                                  ("y", (m, n), dtype, None), ("aq", (m, k), ql.s8, None),
                                  ("as", (m,), dtype, None)):
        t = be.wrap_buffer(buf, shape, dt, offset=off)
        if host is not None:
            src = be.from_numpy(host)
            start, end = src.byte_span()
            enc = be.device.create_command_encoder()
            size = (end + 3) // 4 * 4
            enc.copy_buffer_to_buffer(src.handle, 0, buf, off, size)
            be.device.queue.submit([enc.finish()])
        else:
            be.device.queue.write_buffer(buf, off, np.full(t.byte_span()[1] - off + 3 & ~3, 0xA5,
                                                           np.uint8))
        views[name] = t
        off = (t.byte_span()[1] + 7) // 4 * 4
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype)
    plan = ql.QuantizedLinearPlan.select(be, desc)
    args = ql.QuantizedLinearArgs(activation=views["x"], weight_q=views["wq"],
                                  weight_scale=views["ws"], output=views["y"],
                                  act_q_scratch=views["aq"], act_scale_scratch=views["as"],
                                  bias=views["bias"])
    plan.run(args)
    want_y, want_q, want_s = oracle_linear(x, wq, ws, bias, dtype)
    assert_bitwise_equal(be.to_numpy(views["y"]), want_y, "y")
    assert_bitwise_equal(be.to_numpy(views["aq"]).astype(np.int64), want_q, "act_q")
    assert_bitwise_equal(be.to_numpy(views["as"]), want_s, "act_scale")
    assert_bitwise_equal(be.to_numpy(views["x"]), x, "x untouched")


# -- streams ---------------------------------------------------------------------------

def test_batch_runs_many_plans_in_one_submit(be, rng):
    m, k, n, dtype = 3, 20, 12, ql.f32
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype)
    plan = ql.QuantizedLinearPlan.select(be, desc)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    w_t, ws_t = be.from_numpy(wq, readonly=True), be.from_numpy(ws, readonly=True)
    xs = [random_activation(rng, m, k, dtype) for _ in range(5)]
    outs = []
    with be.batch() as b:
        for x in xs:
            args = ql.QuantizedLinearArgs(
                activation=be.from_numpy(x), weight_q=w_t, weight_scale=ws_t,
                output=poisoned(be, (m, n), dtype, rng), act_q_scratch=be.empty((m, k), ql.s8),
                act_scale_scratch=be.empty((m,), dtype))
            plan.run(args, stream=b)
            outs.append(args.output)
        assert b.pending == 5 and b.submitted == 0
    assert b.submitted == 5
    for x, y in zip(xs, outs):
        assert_bitwise_equal(be.to_numpy(y), oracle_linear(x, wq, ws, None, dtype)[0], "batched")


def test_batch_flush_and_abort(be, rng):
    m, k, n, dtype = 2, 8, 4, ql.f32
    plan = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(m, n, k, dtype))
    x = random_activation(rng, m, k, dtype)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    args = _args(be, rng, x, wq, ws, None, dtype)
    with be.batch() as b:
        plan.run(args, stream=b)
        # to_numpy inside the block submits what is encoded, then waits.
        assert_bitwise_equal(be.to_numpy(args.output), oracle_linear(x, wq, ws, None, dtype)[0],
                             "flushed")
        assert b.submitted == 1
    args2 = _args(be, rng, x, wq, ws, None, dtype)
    with pytest.raises(ZeroDivisionError):
        with be.batch() as b2:
            plan.run(args2, stream=b2)
            1 / 0
    assert b2.submitted == 0
    assert (be.to_numpy(args2.output) == np.float32(31337.0)).all()  # never submitted
    with pytest.raises(ql.InvalidProblem, match="stream"):
        plan.run(args2, stream=b2)  # ended
    with pytest.raises(ql.InvalidProblem, match="stream"):
        plan.run(args2, stream="default")
    enc = be.device.create_command_encoder()
    plan.run(args2, stream=enc)  # the caller submits
    be.device.queue.submit([enc.finish()])
    be.synchronize()
    assert_bitwise_equal(be.to_numpy(args2.output), oracle_linear(x, wq, ws, None, dtype)[0],
                         "encoder")


def test_batch_timestamps(be, rng):
    m, k, n, dtype = 4, 16, 8, ql.f32
    plan = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(m, n, k, dtype))
    args = _args(be, rng, random_activation(rng, m, k, dtype), random_weight(rng, n, k),
                 random_scale(rng, n, dtype), None, dtype)
    if not be.has_timestamps:
        with pytest.raises(ql.Unsupported, match="timestamp"):
            be.batch(timestamps=True)
        return
    with be.batch(timestamps=True) as b:
        plan.run(args, stream=b)
        b.submit()
        plan.run(args, stream=b)
    assert b.submitted == 2
    assert 0 < b.gpu_seconds() < 60
    with be.batch() as plain:
        pass
    with pytest.raises(ql.InvalidProblem, match="timestamps=True"):
        plain.gpu_seconds()


def test_quantize_plan(be, rng):
    for dtype in DTYPES:
        m, k = 4, 29
        x = random_activation(rng, m, k, dtype)
        desc = ql.DynamicRangeQuantizeDescriptor(m=m, k=k, dtype=dtype, q_min=-100, q_max=90)
        plan = ql.DynamicRangeQuantizePlan.select(be, desc)
        assert plan.sku.startswith("wgpu.rowquant")
        args = ql.DynamicRangeQuantizeArgs(activation=be.from_numpy(x),
                                           act_q=poisoned(be, (m, k), ql.s8, rng),
                                           act_scale=poisoned(be, (m,), dtype, rng))
        plan.run(args)
        q, s = oracle_quantize(x, dtype, -100, 90)
        assert_bitwise_equal(be.to_numpy(args.act_scale), s, dtype.name)
        assert_bitwise_equal(be.to_numpy(args.act_q).astype(np.int64), q, dtype.name)


# -- errors, caches, facts ---------------------------------------------------------------

def test_f64_is_unsupported_naming_the_dtype(be):
    with pytest.raises(ql.Unsupported, match="f64"):
        ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(2, 2, 2, ql.f64))
    with pytest.raises(ql.Unsupported, match="f64"):
        ql.DynamicRangeQuantizePlan.select(be, ql.DynamicRangeQuantizeDescriptor(2, 2, ql.f64))


def test_no_adapter_is_backend_unavailable(be, monkeypatch):
    from qlinear.backends import wgpu as wgpu_backend
    monkeypatch.setattr(be._wgpu.gpu, "request_adapter_sync", lambda **kw: None)
    with pytest.raises(ql.BackendUnavailable, match="no adapter") as e:
        wgpu_backend.create()
    assert "mesa-vulkan-drivers" in e.value.install


def test_device_errors_carry_wgpus_message(be, rng):
    with pytest.raises(ql.DeviceError, match="compiling") as e:
        be.compile_wgsl("fn main( { }", label="broken")
    assert e.value.native and "error" in e.value.native.lower()
    # A dispatch past the real limit only fails when the encoder is finished.
    m, k, n, dtype = 70_000, 4, 2, ql.f32
    plan = _plan(be, m, n, k, dtype, max_workgroups_per_dim=10**6)
    x = random_activation(rng, m, k, dtype)
    args = _args(be, rng, x, random_weight(rng, n, k), random_scale(rng, n, dtype), None, dtype)
    with pytest.raises(ql.DeviceError, match="submitting") as e:
        plan.run(args)
    assert "65535" in e.value.native or "dispatch" in e.value.native.lower()
    with pytest.raises(ql.DeviceError, match="allocating"):
        be.empty((be.limits["max-buffer-size"] + 1,), ql.s8)


def test_pipelines_are_cached_per_device(be):
    p1 = _plan(be, 33, 20, 40, ql.bf16)
    before = be.cache_info()
    p2 = _plan(be, 33, 20, 40, ql.bf16)
    p3 = _plan(be, 35, 21, 40, ql.bf16)  # same kernels, other shape: same pipelines
    assert be.cache_info() == before
    assert p1._executable.gemm_pipelines[True] is p2._executable.gemm_pipelines[True]
    assert p1._executable.quant_pipeline is p3._executable.quant_pipeline
    # A new q range is a new override value: one more pipeline, no new module.
    ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(35, 21, 40, ql.bf16, -61, 59))
    after = be.cache_info()
    assert after["pipelines"] == before["pipelines"] + 1
    assert after["modules"] == before["modules"]


def test_run_cache_forgets_collected_buffers(be, rng):
    import gc
    m, k, n, dtype = 2, 8, 4, ql.f32
    plan = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(m, n, k, dtype))
    x = random_activation(rng, m, k, dtype)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    keep = _args(be, rng, x, wq, ws, None, dtype)
    sets = []
    for _ in range(3):
        args = _args(be, rng, x, wq, ws, None, dtype)
        args.weight_q = keep.weight_q
        plan.run(args)
        plan.run(args)  # the second run reuses the entry
        sets.append(args)
    runs = plan._executable._runs
    assert len(runs) == 3
    del sets[-1], args
    gc.collect()
    assert len(runs) == 2  # the last set's buffers are gone, and so is its entry
    assert len(runs._watched[id(keep.weight_q.memory)]) == 2


def test_shader_composition(be):
    """The one templating step: a prelude per TIn storage, composed with common code."""
    for family in ("rowquant", "gemm_dot4", "gemm_f32", "gemv"):
        words = be.shader_source(family, "words")
        native = be.shader_source(family, "f16")
        assert "enable f16;" not in words
        assert native.startswith("enable f16;")
        assert ("fn store_pair" in words) == (family != "rowquant")
        be.compile_wgsl(words, family)
        if "shader-f16" in be.features:
            be.compile_wgsl(native, family)
    with pytest.raises(ql.InvalidProblem):
        be.shader_source("rowquant", "f64")


def test_info_and_facts(be):
    info = be.info()
    for key in ("adapter", "adapter_type", "backend_type", "limits", "features", "kernels"):
        assert key in info
    assert be.is_gpu == (info["adapter_type"] not in ("CPU", "Unknown", ""))
    if info["adapter_type"] == "CPU":
        assert not be.is_gpu
    assert any("gemv" in v for v in info["kernels"].values())
    assert any("gemm_tiled" in v for v in info["kernels"].values())
    with pytest.raises(ql.InvalidProblem, match="settings"):
        with be.configured(bogus=1):
            pass


def test_float_matmul_and_micro_kernels(be):
    run = float_matmul(be, 64, 32, 48, ql.f16)
    run()
    micro = micro_kernels(be, words=1 << 12, iters=4)
    for name in ("dot4", "copy"):
        f, amount = micro[name]
        f()
        assert amount > 0


def test_float_matmul_is_a_matmul(be, rng):
    """The benchmark baseline computes what it claims (f32, edges of the 128 blocks)."""
    m, k, n = 130, 37, 129
    run = float_matmul(be, m, k, n, ql.f32)
    run()
    a_t, b_t, c_t, _ = run.keep
    a, b = be.to_numpy(a_t), be.to_numpy(b_t)
    np.testing.assert_allclose(be.to_numpy(c_t), a @ b, rtol=1e-4, atol=1e-4)
