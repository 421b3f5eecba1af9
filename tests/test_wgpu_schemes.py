"""The activation schemes on wgpu where the shared suite (``tests/test_schemes.py``) does
not reach: every GEMM family and inner product the chooser can pick, forced, with each
scheme; both f16 storages; dispatches split by lowered limits (so every zero-point and
column-sum binding starts mid-buffer); the exact-division path; rows at the edges of the
integer arithmetic (subnormal ranges, a range that overflows, quotients past the float
fast path, static scales outside WGSL's division bounds); and static scales that change
between runs of the same tensors.

Every case is checked bit for bit against the int64 oracle of ``qltest`` (fresh random
data, poisoned outputs and scratches, every element) and against the cpu backend.
"""

import numpy as np
import pytest

import qlinear as ql
from qltest import (
    OTHER_SCHEME_IDS,
    OTHER_SCHEMES,
    assert_bitwise_equal,
    check_linear_scheme,
    check_quantize_scheme,
    oracle_linear_scheme,
    poisoned,
    random_activation,
    random_scale,
    random_weight,
    shifted_activation,
)
from wgpu_helpers import dispatch_count

S = ql.ActivationScheme
SCHEMES, IDS = OTHER_SCHEMES, OTHER_SCHEME_IDS


def constants(rng, x, scheme):
    """(input_scale, input_zero_point) of ``scheme`` for data ``x``; some values saturate."""
    if not scheme.static:
        return None, None
    finite = np.abs(x[np.isfinite(x.astype(np.float64))].astype(np.float64))
    scale = max(float(finite.max(initial=1.0)), 1e-3) / rng.uniform(60, 160)
    return scale, (int(rng.integers(-64, 64)) if scheme.static_zero_point else None)


def check_both(be, x, wq, ws, bias, dtype, scheme, s=None, z=None, **kw):
    """Oracle check on ``be`` (its current options), then the cpu backend's output, bit for
    bit. Returns the wgpu plan."""
    rng = np.random.default_rng()
    y, plan = check_linear_scheme(be, x, wq, ws, bias, dtype, scheme, s, z, rng=rng, **kw)
    y_cpu, _ = check_linear_scheme(ql.backend("cpu"), x, wq, ws, bias, dtype, scheme, s, z,
                                   rng=rng, **kw)
    assert_bitwise_equal(y, y_cpu, f"wgpu vs cpu [{plan.sku}]")
    return plan


# (id, m, k, n, dtype, f16 storage, settings, sku fragment): every family the chooser picks.
FAMILIES = [
    ("gemv_dot4", 5, 37, 19, ql.f32, None, {"inner_product": "dot4"}, "gemv_m5_"),
    ("gemv_fma", 16, 1100, 9, ql.f16, "packed", {"inner_product": "fma"}, "gemv_m16_"),
    ("tiled4_dot4", 40, 70, 33, ql.f16, "native", {"inner_product": "dot4", "tile": "4x4"},
     "r4x4_dot4"),
    ("tiled8_dot4", 130, 45, 67, ql.bf16, None, {"inner_product": "dot4", "tile": "8x8"},
     "r8x8_dot4"),
    ("tiled_fma", 33, 1100, 21, ql.bf16, None, {"inner_product": "fma"}, "r4x4_fma"),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
@pytest.mark.parametrize("fid,m,k,n,dtype,storage,settings,frag", FAMILIES,
                         ids=[f[0] for f in FAMILIES])
def test_every_gemm_family_with_each_scheme(wgpu_be, rng, scheme, fid, m, k, n, dtype, storage,
                                            settings, frag):
    if storage == "native" and "shader-f16" not in wgpu_be.features:
        pytest.skip("adapter has no shader-f16")
    x = shifted_activation(rng, m, k, dtype, 2.0)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    wq[1, : k // 2] = -128
    bias = rng.standard_normal(n).astype(dtype.numpy) if m % 2 else None
    s, z = constants(rng, x, scheme)
    with wgpu_be.configured(f16_storage=storage, **settings):
        plan = check_both(wgpu_be, x, wq, ws, bias, dtype, scheme, s, z)
    assert frag in plan.sku and f"rowquant_wg32_{scheme.value}" in plan.sku
    assert plan.sku.count("_zp") == int(scheme.asymmetric), plan.sku


@pytest.mark.parametrize("scheme", [S.STATIC_ASYM, S.DYNAMIC_ASYM], ids=["static_asym",
                                                                         "dynamic_asym"])
@pytest.mark.parametrize("m", [7, 90])
def test_split_dispatches_bind_zero_points_mid_buffer(wgpu_be, rng, scheme, m):
    """Lowered binding and workgroup limits: the activation pass and the GEMM run block by
    block, each binding act_zp and weight_colsum from an offset inside the buffer."""
    k, n, dtype = 45, 77, ql.f16
    x = shifted_activation(rng, m, k, dtype, 2.0)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    s, z = constants(rng, x, scheme)
    with wgpu_be.configured(max_storage_binding=1024, max_workgroups_per_dim=3,
                            f16_storage="packed"):
        plan = check_both(wgpu_be, x, wq, ws, rng.standard_normal(n).astype(np.float16), dtype,
                          scheme, s, z)
    assert dispatch_count(plan) > 6
    with wgpu_be.configured(max_storage_binding=256, max_workgroups_per_dim=2):
        check_quantize_scheme(wgpu_be, x, dtype, scheme, s, z, rng=rng)


@pytest.mark.parametrize("exact_only", [False, True], ids=["mixed", "exact"])
@pytest.mark.parametrize("dtype", [ql.f32, ql.bf16, ql.f16], ids=["f32", "bf16", "f16"])
def test_dynamic_asym_edge_rows(wgpu_be, rng, dtype, exact_only):
    """Rows where the asymmetric pass leans on its integer arithmetic: subnormal values and
    ranges, a range that overflows f32, a tiny spread far from 0 (large mn / scale, the
    zero point clamped), -0 beside +0, constant rows, NaN / Inf rows, and f32 ranges whose
    rounding turns on bits far below the larger bound (the sticky bit of mx - mn)."""
    m, k, n = 16, 21, 6
    x = shifted_activation(rng, m, k, dtype, 2.0).astype(np.float64)
    tiny = {"f32": 2.0**-140, "bf16": 2.0**-130, "f16": 2.0**-22}[dtype.name]
    x[0] = rng.standard_normal(k) * tiny                    # subnormal (f16: tiny) values
    x[1] = 2.0**-126 + rng.integers(0, 9, k) * 2.0**-140    # normal values, subnormal range
    x[2] = -x[1]
    x[3] = 1000.0 + rng.integers(0, 3, k) * (2.0**-13 if dtype == ql.f32 else 1.0)
    x[4] = -x[3]
    x[5] = 0.0
    x[5, ::2] = -0.0
    x[6] = -2.5                                              # constant rows
    x[7] = 0.0
    x[8, 4] = np.nan
    x[9, 0] = -np.inf
    x[10] = rng.integers(-128, 128, k) * 0.25                # quotients on exact .5 ties
    x[10, :2] = (-32.0, 31.75)
    if dtype != ql.f16:
        x[11] = rng.uniform(-1, 1, k) * 3e38                 # mx - mn overflows f32
        x[11, :2] = (3e38, -3e38)
        x[12] = rng.uniform(-1, 1, k) * 1e-38                # subnormal scale, normal values
    if dtype == ql.f32:
        # 1 + 2^-24 + 2^-40 rounds up, 1 - 2^-25 - 2^-40 down: a tie without the low bits.
        x[13] = rng.uniform(0, 1, k)
        x[13, :2] = (1.0, -(2.0**-24 + 2.0**-40))
        x[14] = rng.uniform(2.0**-24, 1, k)
        x[14, :2] = (1.0, 2.0**-25 + 2.0**-40)
    x = x.astype(dtype.numpy)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    with wgpu_be.configured(quantize_exact_only=exact_only):
        check_both(wgpu_be, x, wq, ws, rng.standard_normal(n).astype(dtype.numpy), dtype,
                   S.DYNAMIC_ASYM)
        check_quantize_scheme(wgpu_be, x, dtype, S.DYNAMIC_ASYM, rng=rng)


@pytest.mark.parametrize("dtype", [ql.f32, ql.bf16, ql.f16], ids=["f32", "bf16", "f16"])
def test_static_scales_outside_the_fast_path(wgpu_be, rng, dtype):
    """Static scales whose float division WGSL does not bound (subnormal in bf16 / f32, above
    2^126), values whose quotient overflows f32 (saturate), quotients of 256 and more, ties,
    zero points at both ends of the range."""
    m, k, n = 4, 33, 5
    cases = [(30.0, -128), (3.1e-3, 127), (1.3e-4, 0)]
    if dtype != ql.f16:
        cases += [(2.0**-130 * 1.5, -7), (2.0**127 * 1.25, 3)]
    for s, z in cases:
        s = float(np.array(s, dtype.numpy))
        x = rng.standard_normal((m, k)) * s * rng.choice([50, 300, 600], (m, 1))
        x[0, :6] = np.array([0.5, 1.5, -2.5, 255.5, -256.5, 511.5]) * s  # ties, edges
        x[1, :2] = (3e38, -3e38) if dtype != ql.f16 else (65000.0, -65000.0)
        x = np.clip(x, -3e38, 3e38).astype(dtype.numpy)
        for scheme, zz in ((S.STATIC, None), (S.STATIC_ASYM, z)):
            check_quantize_scheme(wgpu_be, x, dtype, scheme, s, zz, rng=rng)
    x = random_activation(rng, m, k, dtype)
    check_both(wgpu_be, x, random_weight(rng, n, k), random_scale(rng, n, dtype), None, dtype,
               S.STATIC_ASYM, float(np.abs(x).max()) / 90, 127)


def test_static_scalars_change_between_runs(wgpu_be, rng):
    """The scale and zero point travel in each run's parameter blocks: runs of the very same
    tensors with other values (a stale block would leave the previous output), and runs in
    one batch, each use their own."""
    m, k, n, dtype = 6, 24, 10, ql.f32
    desc = ql.QuantizedLinearDescriptor(m, n, k, dtype, scheme="static_asym")
    plan = ql.QuantizedLinearPlan.select(wgpu_be, desc)
    x = shifted_activation(rng, m, k, dtype, 2.0)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    base = float(np.abs(x).max()) / 100
    values = [(base, 5), (base * 3, 5), (base, -40), (base, 5)]
    fixed = dict(activation=wgpu_be.from_numpy(x), weight_q=wgpu_be.from_numpy(wq),
                 weight_scale=wgpu_be.from_numpy(ws),
                 weight_colsum=wgpu_be.from_numpy(ql.weight_colsum(wq)))

    def args(s, z, out):
        return ql.QuantizedLinearArgs(**fixed, **out, input_scale=s, input_zero_point=z)

    def scratches():
        return dict(output=poisoned(wgpu_be, (m, n), dtype, rng),
                    act_q_scratch=poisoned(wgpu_be, (m, k), ql.s8, rng),
                    act_scale_scratch=poisoned(wgpu_be, (m,), dtype, rng),
                    act_zp_scratch=wgpu_be.from_numpy(rng.integers(-99, 99, m, dtype=np.int32)))

    same = scratches()
    for s, z in values:
        a = args(s, z, same)
        plan.run(a)
        want = oracle_linear_scheme(x, wq, ws, None, dtype, S.STATIC_ASYM, s, z)
        assert_bitwise_equal(wgpu_be.to_numpy(a.output), want[0], f"output {s, z}")
        assert_bitwise_equal(wgpu_be.to_numpy(a.act_scale_scratch), want[2], f"scale {s, z}")
        assert_bitwise_equal(wgpu_be.to_numpy(a.act_zp_scratch).astype(np.int64), want[3],
                             f"zp {s, z}")
    assert len(plan._executable._runs) == 3  # one entry per set of scalars
    runs = []
    with wgpu_be.batch() as b:
        for s, z in values:
            runs.append((s, z, args(s, z, scratches())))
            plan.run(runs[-1][2], stream=b)
    for s, z, a in runs:
        want = oracle_linear_scheme(x, wq, ws, None, dtype, S.STATIC_ASYM, s, z)
        assert_bitwise_equal(wgpu_be.to_numpy(a.output), want[0], f"batched output {s, z}")
        assert_bitwise_equal(wgpu_be.to_numpy(a.act_zp_scratch).astype(np.int64), want[3],
                             f"batched zp {s, z}")
