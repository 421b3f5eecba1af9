"""Subgroup reductions on wgpu: the activation pass's row maximum (and min and max keys)
through ``subgroupMax`` / ``subgroupMin``, the small-M GEMM's K sum through
``subgroupAdd``, where the adapter has the feature, and the workgroup-memory path
otherwise.

The chooser tests need no adapter. The numeric tests run both paths (forced on and off
with ``be.configured(subgroups=...)``) on whatever adapter wgpu finds, against the int64
oracle of ``qltest``: fresh random data, poisoned outputs and scratches, every element
bit for bit. lavapipe puts one column's K lanes in one subgroup; adapters described
with fewer invocations per workgroup make the kernels mix columns in a subgroup (the
GEMV) and leave subgroups partly filled (the activation pass with 3, 12 or 20
invocations), the cases WebGPU allows and lavapipe's default shapes never meet.
"""

import dataclasses
import re

import numpy as np
import pytest

import qlinear as ql
from qlinear.backends.wgpu.backend import WgpuBackend
from qlinear.backends.wgpu.choose import (
    AdapterFacts,
    choose_linear,
    choose_quant,
    linear_sku,
    quantize_sku,
)
from qlinear.backends.wgpu.options import WgpuOptions
from qltest import (
    check_linear,
    check_linear_scheme,
    check_quantize_scheme,
    random_activation,
    random_scale,
    random_weight,
    shifted_activation,
)

S = ql.ActivationScheme
PATHS = [False, True]
PATH_IDS = ["workgroup", "subgroups"]


def facts(features=(), is_gpu=False, invocations=1024):
    return AdapterFacts(is_gpu=is_gpu, backend_type="Vulkan", features=frozenset(features),
                        max_invocations_per_workgroup=invocations, max_workgroup_size_x=1024,
                        max_workgroup_size_y=1024)


def options(**kw):
    return WgpuOptions(max_storage_binding=128 << 20, max_workgroups_per_dim=65535,
                       max_workgroup_storage=32768, **kw)


def sku(m, f, opts, k=4096, dtype=ql.f32, scheme="dynamic"):
    desc = ql.QuantizedLinearDescriptor(m, 4096, k, dtype, scheme=scheme)
    return linear_sku(choose_quant(desc.activation_pass, f, opts), choose_linear(desc, f, opts))


# -- choosers (no adapter) --------------------------------------------------------------

def test_facts_know_the_feature_by_either_name():
    assert facts({"subgroup"}).subgroups  # wgpu-py's name
    assert facts({"subgroups", "shader-f16"}).subgroups  # WebGPU's
    assert not facts({"shader-f16", "subgroup-barrier"}).subgroups
    limits = {"max-compute-invocations-per-workgroup": 256, "max-compute-workgroup-size-x": 256,
              "max-compute-workgroup-size-y": 256}
    assert AdapterFacts.from_adapter("CPU", "WebGPU", ["subgroups", "timestamp-query"],
                                     limits).subgroups
    assert not AdapterFacts.from_adapter("CPU", "WebGPU", ["timestamp-query"], limits).subgroups


def test_subgroups_are_used_where_the_adapter_has_them():
    with_sg, without = facts({"subgroup"}), facts()
    assert sku(1, with_sg, options()) == (
        "wgpu.rowquant_wg32_sg+gemv_m1_kl8_c8_dot4_sg+f32_words")
    assert sku(1, without, options()) == "wgpu.rowquant_wg32+gemv_m1_kl8_c8_dot4+f32_words"
    # The tiled GEMMs have no cross-invocation reduction; their activation pass does.
    assert sku(512, with_sg, options()) == (
        "wgpu.rowquant_wg32_sg+gemm_tiled_128x128x128_r8x8_dot4+f32_words")
    gpu = facts({"subgroups"}, is_gpu=True, invocations=256)
    assert sku(16, gpu, options(), dtype=ql.bf16, scheme="dynamic_asym") == (
        "wgpu.rowquant_wg256_dynamic_asym_sg+gemv_m16_kl32_c8_dot4_zp_sg+bf16_packed")
    exact = choose_quant(ql.DynamicRangeQuantizeDescriptor(2, 64, ql.f16, scheme="static"),
                         with_sg, options(quantize_exact_only=True))
    assert quantize_sku(exact) == "wgpu.rowquant_wg32_static_exact_sg+f16_packed"
    # A source variant, not an override: the constants are those of the workgroup path.
    desc = ql.QuantizedLinearDescriptor(3, 64, 64, ql.f32)
    on, off = choose_linear(desc, with_sg, options()), choose_linear(desc, without, options())
    assert (on.subgroups, off.subgroups) == (True, False)
    assert on.constants(True) == off.constants(True)
    q_on = choose_quant(desc.activation_pass, with_sg, options())
    assert q_on.subgroups and q_on.constants(-127, 127) == choose_quant(
        desc.activation_pass, without, options()).constants(-127, 127)


def test_the_option_forces_either_way():
    with_sg, without = facts({"subgroup"}), facts()
    off = options(subgroups=False)
    assert "_sg" not in sku(1, with_sg, off) and "_sg" not in sku(512, with_sg, off)
    assert sku(5, with_sg, options(subgroups=True)) == sku(5, with_sg, options())
    assert "_sg" not in sku(5, without, off)
    msg = (r"subgroups: expected None or False on this adapter, got True \(it lacks the "
           r"feature subgroup, in WebGPU subgroups\)")
    with pytest.raises(ql.Unsupported, match=msg):
        sku(5, without, options(subgroups=True))
    with pytest.raises(ql.Unsupported, match=msg):
        choose_quant(ql.DynamicRangeQuantizeDescriptor(2, 64, ql.f32), without,
                     options(subgroups=True))
    with pytest.raises(ql.InvalidProblem, match="subgroups: expected one of"):
        options(subgroups="yes")
    assert options().subgroups is None
    assert options().use_subgroups(True) and not options().use_subgroups(False)


def test_the_subgroup_gemv_needs_no_partials_in_workgroup_memory():
    """Without subgroups the GEMV parks KL x CG vec4 partials beside the row sums; with
    them only the row sums stay, so a small limit keeps more K lanes."""
    desc = ql.QuantizedLinearDescriptor(4, 64, 64, ql.f32)
    small = options().replaced(max_workgroup_storage=1024)
    assert choose_linear(desc, facts({"subgroup"}), small).kl == 8   # 512 B of row sums
    assert choose_linear(desc, facts(), small).kl == 4               # 512 + 4 * 8 * 16 B
    with pytest.raises(ql.Unsupported, match="small-M kernel needs 512 bytes"):
        choose_linear(desc, facts({"subgroup"}), options().replaced(max_workgroup_storage=256))


# -- both paths on the adapter --------------------------------------------------------

@pytest.fixture
def be(wgpu_be):
    return wgpu_be


def _path(be, sg):
    """be.configured(subgroups=sg), skipped with the reason where the adapter lacks them."""
    if sg and not be.facts.subgroups:
        pytest.skip(f"adapter {be.device_name} has no subgroup feature")
    return be.configured(subgroups=sg)


def _assert_path(sku_, sg, gemv=True):
    names = sku_.split("+")[:2 if gemv else 1]
    assert all(n.endswith("_sg") == sg for n in names), sku_


def test_the_default_uses_subgroups_where_the_adapter_has_them(be):
    plan = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(2, 16, 16, ql.f32))
    _assert_path(plan.sku, be.facts.subgroups)
    assert be.info()["subgroups"] == be.facts.subgroups
    assert ("subgroup" in be.features) == be.facts.subgroups


DTYPES = [(ql.f32, None), (ql.f16, "native"), (ql.f16, "packed"), (ql.bf16, None)]
DTYPE_IDS = ["f32", "f16native", "f16packed", "bf16"]


def _storage(be, storage):
    if storage == "native" and "shader-f16" not in be.features:
        pytest.skip("adapter has no shader-f16")
    return storage


@pytest.mark.parametrize("sg", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype,storage", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_gemv_both_paths(be, rng, sg, dtype, storage, m):
    k, n = 4097, 37
    x = random_activation(rng, m, k, dtype)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    bias = rng.standard_normal(n).astype(dtype.numpy) if m % 2 else None
    with _path(be, sg), be.configured(f16_storage=_storage(be, storage)):
        check_linear(be, x, wq, ws, bias, dtype, rng=rng)
        plan = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(m, n, k, dtype))
    assert "gemv" in plan.sku
    _assert_path(plan.sku, sg)


@pytest.mark.parametrize("sg", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("m", [1, 16])
def test_gemv_f32_path_both_paths(be, rng, sg, m):
    """The f32 multiply-add inner product, K past several 256-word chunks per lane."""
    k, n, dtype = 8195, 21, ql.f32
    x = random_activation(rng, m, k, dtype)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    with _path(be, sg), be.configured(inner_product="fma"):
        check_linear(be, x, wq, ws, None, dtype, q_min=-128, rng=rng)


def _scalars(rng, x, scheme):
    if not scheme.static:
        return None, None
    scale = float(np.abs(x.astype(np.float64)).max()) / rng.uniform(60, 160)
    return scale, int(rng.integers(-64, 64)) if scheme.static_zero_point else None


@pytest.mark.parametrize("sg", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("scheme", list(S), ids=[s.value for s in S])
@pytest.mark.parametrize("m", [5, 16])
def test_gemv_schemes_both_paths(be, rng, sg, scheme, m):
    k, n, dtype = 1001, 19, ql.bf16
    x = shifted_activation(rng, m, k, dtype, 2.0)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    s, z = _scalars(rng, x, scheme)
    with _path(be, sg):
        _, plan = check_linear_scheme(be, x, wq, ws, rng.standard_normal(n).astype(dtype.numpy),
                                      dtype, scheme, s, z, rng=rng)
    _assert_path(plan.sku, sg)


def _special_rows(rng, m, k, dtype):
    """Rows whose reduction has to be exact: the extreme in the first or last lane, a NaN
    or Inf in one element, all zeros (with -0), a constant row, subnormal values."""
    x = shifted_activation(rng, m, k, dtype, 2.0).astype(np.float64)
    x[0, -1] = 8 * np.abs(x[0]).max()
    x[1, 0] = -8 * np.abs(x[1]).max()
    x[2, k // 2] = np.nan
    x[3, -1] = np.inf
    x[4] = 0.0
    x[4, ::3] = -0.0
    x[5] = -1.75
    x[6] = rng.standard_normal(k) * (2.0**-20 if dtype == ql.f16 else 2.0**-130)
    return x.astype(dtype.numpy)


@pytest.mark.parametrize("sg", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype,storage", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scheme", list(S), ids=[s.value for s in S])
def test_activation_pass_both_paths(be, rng, sg, dtype, storage, scheme):
    m, k = 23, 1027
    x = _special_rows(rng, m, k, dtype)
    s, z = _scalars(rng, x[7:], scheme)
    with _path(be, sg), be.configured(f16_storage=_storage(be, storage)):
        check_quantize_scheme(be, x, dtype, scheme, s, z, rng=rng)
        plan = ql.DynamicRangeQuantizePlan.select(
            be, ql.DynamicRangeQuantizeDescriptor(m, k, dtype, scheme=scheme))
    _assert_path(plan.sku, sg, gemv=False)


class _Narrow(WgpuBackend):
    """The same device, described as allowing only ``invocations`` per workgroup: the
    activation pass takes that many (or 32) invocations per row, the GEMV fewer K lanes
    per column (8 // 2**j), so that a subgroup of lavapipe's 8 spans 8 // KL columns;
    or described without the subgroup feature (``subgroups=False``)."""

    def __init__(self, be, invocations=None, subgroups=True):
        super().__init__(be._wgpu, be.adapter, be.device)
        f = be.facts
        self._narrow = dataclasses.replace(
            f, max_invocations_per_workgroup=invocations or f.max_invocations_per_workgroup,
            features=f.features if subgroups else f.features - {"subgroup", "subgroups"})

    @property
    def facts(self):
        return self._narrow


@pytest.mark.parametrize("sg", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("invocations,wg,kl", [(12, 12, 1), (20, 20, 2), (36, 32, 4)])
def test_subgroups_mixing_columns_and_partly_filled(be, rng, sg, invocations, wg, kl):
    narrow = _Narrow(be, invocations)
    for m, k, n, dtype, scheme in [(1, 1001, 37, ql.f32, S.DYNAMIC),
                                   (7, 333, 19, ql.f16, S.DYNAMIC_ASYM),
                                   (16, 2049, 9, ql.bf16, S.STATIC_ASYM)]:
        x = shifted_activation(rng, m, k, dtype, 2.0)
        wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
        s, z = _scalars(rng, x, scheme)
        with _path(narrow, sg):
            _, plan = check_linear_scheme(narrow, x, wq, ws, None, dtype, scheme, s, z, rng=rng)
        _assert_path(plan.sku, sg)
        assert re.search(rf"rowquant_wg{wg}[_+]", plan.sku) and f"_kl{kl}_c8_" in plan.sku, \
            plan.sku


@pytest.mark.parametrize("sg", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("scheme", list(S), ids=[s.value for s in S])
def test_activation_pass_in_three_invocations(be, rng, sg, scheme):
    """A workgroup smaller than a subgroup: one partly filled subgroup per row."""
    narrow = _Narrow(be, 3)
    x = _special_rows(rng, 9, 101, ql.f32)
    s, z = _scalars(rng, x[7:], scheme)
    with _path(narrow, sg):
        check_quantize_scheme(narrow, x, ql.f32, scheme, s, z, rng=rng)
        plan = ql.DynamicRangeQuantizePlan.select(
            narrow, ql.DynamicRangeQuantizeDescriptor(9, 101, ql.f32, scheme=scheme))
    assert re.match(r"wgpu\.rowquant_wg3[_+]", plan.sku), plan.sku
    _assert_path(plan.sku, sg, gemv=False)


def test_forcing_subgroups_without_the_feature_is_refused_at_selection(be):
    lacking = _Narrow(be, subgroups=False)
    desc = ql.QuantizedLinearDescriptor(2, 8, 8, ql.f32)
    plan = ql.QuantizedLinearPlan.select(lacking, desc)
    _assert_path(plan.sku, False)
    with lacking.configured(subgroups=True), pytest.raises(ql.Unsupported, match="subgroups"):
        ql.QuantizedLinearPlan.select(lacking, desc)
