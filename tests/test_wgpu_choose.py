"""The wgpu kernel choosers and options, with no adapter: each adapter is described by
hand as :class:`AdapterFacts` (Metal, a discrete Vulkan GPU, lavapipe, an adapter with
tiny limits), and the choices, skus and :class:`Unsupported` messages are checked."""

import subprocess
import sys
from dataclasses import FrozenInstanceError

import pytest

import qlinear as ql
from qlinear.backends.wgpu.choose import (
    AdapterFacts,
    GemvChoice,
    TiledChoice,
    choose_linear,
    choose_quant,
    inner_product,
    linear_sku,
    quantize_sku,
)
from qlinear.backends.wgpu.options import WgpuOptions
from qlinear.problem import DECODE_MAX_M


def facts(is_gpu, api, features=(), invocations=1024, size=1024, dot4_exact=True):
    """Hand-described adapter facts: no adapter needed."""
    return AdapterFacts(is_gpu=is_gpu, backend_type=api, features=frozenset(features),
                        max_invocations_per_workgroup=invocations, max_workgroup_size_x=size,
                        max_workgroup_size_y=size, dot4_exact=dot4_exact)


METAL = facts(True, "Metal", {"shader-f16"})
VULKAN_GPU = facts(True, "Vulkan", invocations=256)
LAVAPIPE = facts(False, "Vulkan", {"shader-f16"})
TINY = facts(True, "Vulkan", invocations=64, size=64)


def options(wg_storage=32768, **kw):
    return WgpuOptions(max_storage_binding=128 << 20, max_workgroups_per_dim=65535,
                       max_workgroup_storage=wg_storage, **kw)


def sku(m, dtype, facts, opts, n=4096, k=4096):
    desc = ql.QuantizedLinearDescriptor(m, n, k, dtype)
    return linear_sku(choose_quant(desc.activation_pass, facts, opts),
                      choose_linear(desc, facts, opts))


def test_metal_takes_the_f32_path_and_native_f16():
    opts = options()
    assert inner_product(METAL, opts) == "fma"
    assert sku(512, ql.f16, METAL, opts) == (
        "wgpu.rowquant_wg256+gemm_tiled_64x64x32_r4x4_fma+f16_native")
    c = choose_linear(ql.QuantizedLinearDescriptor(512, 64, 64, ql.f32), METAL, opts)
    assert isinstance(c, TiledChoice)
    assert (c.family, c.entry) == ("gemm_f32", "main")
    g = choose_linear(ql.QuantizedLinearDescriptor(1, 64, 64, ql.bf16), METAL, opts)
    assert isinstance(g, GemvChoice)
    assert g.name == "gemv_m1_kl32_c8_fma" and g.storage.tag == "bf16_packed"
    assert g.constants(True)["STRATEGY"] == 1 and g.constants(True)["HAS_BIAS"] == 1
    opengl = AdapterFacts(True, "OpenGL", frozenset(), 256, 256, 256)
    assert inner_product(opengl, opts) == "fma"


def test_discrete_vulkan_gpu():
    opts = options(49152)
    assert inner_product(VULKAN_GPU, opts) == "dot4"
    assert sku(512, ql.f16, VULKAN_GPU, opts) == (
        "wgpu.rowquant_wg256+gemm_tiled_128x128x32_r8x8_dot4+f16_packed")
    c = choose_linear(ql.QuantizedLinearDescriptor(512, 64, 64, ql.f32), VULKAN_GPU, opts)
    assert c.entry == "tile8x8"
    assert {k: c.constants(False)[k] for k in ("BM", "BN", "BK", "WGX", "WGY", "HAS_BIAS")} == {
        "BM": 128, "BN": 128, "BK": 8, "WGX": 16, "WGY": 16, "HAS_BIAS": 0}
    # Up to 64 rows the 4 x 4 tile: 128-row blocks would be mostly empty.
    assert "gemm_tiled_64x64x32_r4x4_dot4" in sku(64, ql.f32, VULKAN_GPU, opts)
    assert "gemm_tiled_64x64x32_r4x4_dot4" in sku(512, ql.f32, VULKAN_GPU, options(tile="4x4"))
    assert "gemm_tiled_64x64x32_r4x4_fma" in sku(
        512, ql.f32, VULKAN_GPU, options(inner_product="fma"))


def test_the_decode_kernel_serves_decode_shapes():
    opts = options()
    for facts in (METAL, VULKAN_GPU, LAVAPIPE, TINY):
        last = choose_linear(ql.QuantizedLinearDescriptor(DECODE_MAX_M, 8, 8, ql.f32), facts, opts)
        first = choose_linear(
            ql.QuantizedLinearDescriptor(DECODE_MAX_M + 1, 8, 8, ql.f32), facts, opts)
        assert isinstance(last, GemvChoice) and isinstance(first, TiledChoice)
        assert last.constants(False)["MROWS"] == DECODE_MAX_M
    # M = 0 is a valid no-op: the kernel still holds one row.
    empty = choose_linear(ql.QuantizedLinearDescriptor(0, 8, 8, ql.f32), VULKAN_GPU, opts)
    assert empty.name == "gemv_m0_kl32_c8_dot4" and empty.constants(False)["MROWS"] == 1


def test_lavapipe_prefers_few_long_invocations_and_deep_k_steps():
    opts = options()
    assert sku(512, ql.f16, LAVAPIPE, opts) == (
        "wgpu.rowquant_wg32+gemm_tiled_128x128x128_r8x8_dot4+f16_native")
    assert sku(1, ql.f32, LAVAPIPE, opts) == "wgpu.rowquant_wg32+gemv_m1_kl8_c8_dot4+f32_words"
    assert sku(1, ql.f16, LAVAPIPE, options(f16_storage="packed")).endswith("+f16_packed")


def test_tiny_limits_shrink_the_kernels():
    opts = options(4096)
    assert sku(512, ql.f32, TINY, opts) == (
        "wgpu.rowquant_wg64+gemm_tiled_32x32x32_r4x4_dot4+f32_words")
    assert "gemv_m1_kl8_c8_dot4" in sku(1, ql.f32, TINY, opts)
    with pytest.raises(ql.Unsupported, match=r"workgroup memory: no GEMM tile fits the "
                                             r"adapter's limit of 64 bytes and 64 invocations "
                                             r".*128x128 r8x8: 256 invocations"):
        sku(512, ql.f32, TINY, options(64))
    with pytest.raises(ql.Unsupported, match=r"workgroup memory: the small-M kernel needs 640 "
                                             r"bytes and 8 invocations, the adapter allows 64 "
                                             r"bytes and 64"):
        sku(3, ql.f32, TINY, options(64))


def test_quantize_choice():
    opts = options()
    small = ql.DynamicRangeQuantizeDescriptor(4, 13, ql.bf16)
    assert quantize_sku(choose_quant(small, VULKAN_GPU, opts)) == "wgpu.rowquant_wg32+bf16_packed"
    big = ql.DynamicRangeQuantizeDescriptor(4, 4096, ql.f32)
    assert choose_quant(big, TINY, opts).wg == 64
    exact = choose_quant(big, VULKAN_GPU, options(quantize_exact_only=True))
    assert exact.name == "rowquant_wg256_exact"
    assert exact.constants(-100, 90) == {"TIN_KIND": 0, "WG": 256, "Q_MIN": -100, "Q_MAX": 90,
                                         "SCHEME": 0, "EXACT_ONLY": 1}


@pytest.mark.parametrize("scheme,code", [("dynamic", 0), ("static", 1), ("static_asym", 2),
                                         ("dynamic_asym", 3)])
def test_each_scheme_is_a_pipeline_variant_named_in_the_sku(scheme, code):
    """The scheme is fixed at selection: the activation pass's SCHEME override, the GEMM's
    ASYM override (the zero-point epilogue) in every family, and both named in the sku."""
    opts = options()
    asym = scheme.endswith("_asym")
    tag = "" if scheme == "dynamic" else f"_{scheme}"
    q = choose_quant(ql.DynamicRangeQuantizeDescriptor(4, 64, ql.f16, scheme=scheme),
                     LAVAPIPE, opts)
    assert q.constants(-128, 127)["SCHEME"] == code
    assert quantize_sku(q) == f"wgpu.rowquant_wg32{tag}+f16_native"
    zp = "_zp" if asym else ""
    for m, ip, want in [(3, None, f"gemv_m3_kl8_c8_dot4{zp}"),
                        (3, "fma", f"gemv_m3_kl8_c8_fma{zp}"),
                        (40, None, f"gemm_tiled_64x64x128_r4x4_dot4{zp}"),
                        (400, None, f"gemm_tiled_128x128x128_r8x8_dot4{zp}"),
                        (400, "fma", f"gemm_tiled_64x64x32_r4x4_fma{zp}")]:
        o = options(inner_product=ip)
        desc = ql.QuantizedLinearDescriptor(m, 64, 64, ql.bf16, scheme=scheme)
        c = choose_linear(desc, LAVAPIPE, o)
        assert c.constants(True)["ASYM"] == int(asym)
        assert linear_sku(choose_quant(desc.activation_pass, LAVAPIPE, o), c) == (
            f"wgpu.rowquant_wg32{tag}+{want}+bf16_packed")


def test_zero_points_widen_the_accumulator_bound():
    """f32(acc) is exact below 2^24; with a zero point q - zp spans q_max - q_min."""
    def big(k, scheme):
        desc = ql.QuantizedLinearDescriptor(100, 8, k, ql.f32, scheme=scheme)
        return choose_linear(desc, LAVAPIPE, options()).big_acc
    # 1032 * 127 * 128 < 2^24 < 1032 * 255 * 128; 1033 * 127 * 128 > 2^24.
    assert not big(1032, "dynamic") and not big(1032, "static")
    assert big(1033, "dynamic")
    assert big(1032, "dynamic_asym") and big(1032, "static_asym")
    assert not big(514, "dynamic_asym") and big(515, "static_asym")


def test_unsupported_messages():
    opts = options()
    with pytest.raises(ql.Unsupported, match="dtype f64: WGSL has no 64-bit floats"):
        choose_linear(ql.QuantizedLinearDescriptor(2, 2, 2, ql.f64), METAL, opts)
    with pytest.raises(ql.Unsupported, match="dtype f64"):
        choose_quant(ql.DynamicRangeQuantizeDescriptor(2, 2, ql.f64), METAL, opts)
    with pytest.raises(ql.Unsupported, match="'native' needs the adapter feature shader-f16"):
        choose_linear(ql.QuantizedLinearDescriptor(2, 2, 2, ql.f16), VULKAN_GPU,
                      options(f16_storage="native"))


def test_an_adapter_that_failed_the_dot4_probe_takes_the_f32_path():
    bad = facts(True, "Vulkan", invocations=256, dot4_exact=False)
    opts = options()
    assert inner_product(bad, opts) == "fma"
    why = " (f32 path: dot4I8Packed failed the probe)"
    assert sku(512, ql.f16, bad, opts) == (
        "wgpu.rowquant_wg256+gemm_tiled_64x64x32_r4x4_fma+f16_packed" + why)
    assert sku(1, ql.bf16, bad, opts) == "wgpu.rowquant_wg256+gemv_m1_kl32_c8_fma+bf16_packed" + why
    g = choose_linear(ql.QuantizedLinearDescriptor(1, 64, 64, ql.f32), bad, opts)
    assert (g.ip, g.why) == ("fma", why[2:-1])
    # Asking for the f32 path is no fallback: nothing to explain.
    assert not sku(512, ql.f32, bad, options(inner_product="fma")).endswith(")")
    # Forcing dot4 where it computes wrong numbers is refused, not obeyed.
    with pytest.raises(ql.Unsupported, match="inner_product: .*got 'dot4'.*failed the probe"):
        sku(512, ql.f32, bad, options(inner_product="dot4"))
    # Where naga emulates dot4I8Packed the f32 path is the usual one: no note either.
    metal_bad = facts(True, "Metal", {"shader-f16"}, dot4_exact=False)
    assert sku(512, ql.f16, metal_bad, opts) == sku(512, ql.f16, METAL, opts)
    assert AdapterFacts.from_adapter("DiscreteGPU", "Vulkan", [], {
        "max-compute-invocations-per-workgroup": 256, "max-compute-workgroup-size-x": 256,
        "max-compute-workgroup-size-y": 256}, dot4_exact=False) == facts(
        True, "Vulkan", invocations=256, size=256, dot4_exact=False)


def test_facts_from_wgpu_names():
    limits = {"max-compute-invocations-per-workgroup": 256, "max-compute-workgroup-size-x": 128,
              "max-compute-workgroup-size-y": 64}
    f = AdapterFacts.from_adapter("CPU", "Vulkan", ["shader-f16"], limits)
    assert not f.is_gpu and f.features == {"shader-f16"} and f.dot4_exact
    assert (f.max_invocations_1d, f.max_invocations_2d) == (128, 256)
    assert AdapterFacts.from_adapter("DiscreteGPU", "D3D12", [], limits).is_gpu


def test_choosing_imports_no_wgpu():
    code = ("import sys, qlinear.backends.wgpu.choose, qlinear.backends.wgpu.options; "
            "assert 'wgpu' not in sys.modules, 'wgpu imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- options --------------------------------------------------------------------------

def test_options_are_checked_in_one_place():
    opts = options()
    assert opts.replaced(tile="8x8").tile == "8x8" and opts.tile is None
    with pytest.raises(ql.InvalidProblem, match=r"settings: expected keys among .*\['bogus'\]"):
        opts.replaced(bogus=1)
    with pytest.raises(ql.InvalidProblem, match="tile: expected one of"):
        opts.replaced(tile="2x2")
    with pytest.raises(ql.InvalidProblem, match="inner_product: expected one of"):
        opts.replaced(inner_product="dp4a")
    with pytest.raises(ql.InvalidProblem, match="max_workgroup_storage: expected a positive"):
        opts.replaced(max_workgroup_storage=0)
    with pytest.raises(ql.InvalidProblem, match="max_storage_binding: expected a positive"):
        WgpuOptions(max_storage_binding=-1, max_workgroups_per_dim=1, max_workgroup_storage=1)
    with pytest.raises(FrozenInstanceError):
        opts.tile = "8x8"
    assert list(opts.as_dict()) == [
        "inner_product", "f16_storage", "quantize_exact_only", "tile", "subgroups",
        "max_storage_binding", "max_workgroups_per_dim", "max_workgroup_storage"]


def test_options_from_limits():
    opts = WgpuOptions.from_limits({"max-storage-buffer-binding-size": 1 << 27,
                                    "max-compute-workgroups-per-dimension": 65535,
                                    "max-compute-workgroup-storage-size": 16384})
    assert opts.as_dict() == {"inner_product": None, "f16_storage": None,
                              "quantize_exact_only": False, "tile": None, "subgroups": None,
                              "max_storage_binding": 1 << 27, "max_workgroups_per_dim": 65535,
                              "max_workgroup_storage": 16384}


def test_cpu_adapters_keep_the_k_loop_within_llvmpipe_s_budget():
    """llvmpipe ends an invocation's loops after 65535 iterations of all of them together:
    on a CPU adapter a tile whose K loop would run longer is passed over (the 8 x 8 tile
    at the largest K; the f32 path deepens its step), on a GPU nothing changes."""
    from qlinear.backends.wgpu.choose import CPU_LOOP_BUDGET, k_loop_iterations

    k = ql.max_exact_k(-127, 127) // 16 * 16
    desc = ql.QuantizedLinearDescriptor(80, 64, k, ql.f32)
    assert k_loop_iterations(k, 128, 8, 32) > CPU_LOOP_BUDGET
    big = choose_linear(desc, LAVAPIPE, options())
    assert (big.block, big.tile, big.bk) == (64, 4, 32)
    assert k_loop_iterations(k, 64, 4, 32) <= CPU_LOOP_BUDGET
    assert choose_linear(ql.QuantizedLinearDescriptor(80, 64, 100000, ql.f32), LAVAPIPE,
                         options()).block == 128  # within the budget: unchanged
    assert choose_linear(desc, VULKAN_GPU, options(49152)).block == 128
    fma = choose_linear(desc, LAVAPIPE, options(inner_product="fma"))
    assert (fma.block, fma.bk) == (64, 16)
    assert choose_linear(ql.QuantizedLinearDescriptor(80, 64, 4096, ql.f32), LAVAPIPE,
                         options(inner_product="fma")).bk == 8
    # Observed on lavapipe: the 8 x 8 tile summed the first 30833 words of every longer
    # row, inside the 964th step of 32 words: the step in which the count reaches 65535.
    assert k_loop_iterations(4 * 963 * 32, 128, 8, 32) <= 65535
    assert k_loop_iterations(4 * 964 * 32, 128, 8, 32) > 65535
    with pytest.raises(ql.Unsupported, match="loop iterations"):
        choose_linear(desc, LAVAPIPE, options(wg_storage=4096, inner_product="fma"))
