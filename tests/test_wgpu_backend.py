"""The wgpu backend's errors, caches and facts: f64 refused, no adapter, wgpu's errors
as DeviceError, pipelines cached per device, the run cache letting go of collected
buffers, ``info()`` and ``configured()``, tensors of another backend object refused."""

import numpy as np
import pytest

import qlinear as ql
from qltest import POISON, random_activation, random_scale, random_weight
from wgpu_helpers import linear_args, select_plan, small_linear


def test_f64_is_unsupported_naming_the_dtype(wgpu_be):
    with pytest.raises(ql.Unsupported, match="f64"):
        ql.QuantizedLinearPlan.select(wgpu_be, ql.QuantizedLinearDescriptor(2, 2, 2, ql.f64))
    with pytest.raises(ql.Unsupported, match="f64"):
        ql.DynamicRangeQuantizePlan.select(wgpu_be, ql.DynamicRangeQuantizeDescriptor(2, 2, ql.f64))


def test_no_adapter_is_backend_unavailable(wgpu_be, monkeypatch):
    from qlinear.backends import wgpu as wgpu_backend
    monkeypatch.setattr(wgpu_be._wgpu.gpu, "request_adapter_sync", lambda **kw: None)
    with pytest.raises(ql.BackendUnavailable, match="no adapter") as e:
        wgpu_backend.create()
    assert "mesa-vulkan-drivers" in e.value.install


def test_device_errors_carry_wgpus_message(wgpu_be, rng):
    with pytest.raises(ql.DeviceError, match="compiling") as e:
        wgpu_be.compile_wgsl("fn main( { }", label="broken")
    assert e.value.native and "error" in e.value.native.lower()
    # A dispatch past the real limit only fails when the encoder is finished.
    m, k, n, dtype = 70_000, 4, 2, ql.f32
    plan = select_plan(wgpu_be, m, n, k, dtype, max_workgroups_per_dim=10**6)
    x = random_activation(rng, m, k, dtype)
    args = linear_args(wgpu_be, rng, x, random_weight(rng, n, k), random_scale(rng, n, dtype),
                       None, dtype)
    with pytest.raises(ql.DeviceError, match="submitting") as e:
        plan.run(args)
    assert "65535" in e.value.native or "dispatch" in e.value.native.lower()
    with pytest.raises(ql.DeviceError, match="allocating"):
        wgpu_be.empty((wgpu_be.limits["max-buffer-size"] + 1,), ql.s8)


def test_pipelines_are_cached_per_device(wgpu_be):
    p1 = select_plan(wgpu_be, 33, 20, 40, ql.bf16)
    before = wgpu_be.cache_info()
    p2 = select_plan(wgpu_be, 33, 20, 40, ql.bf16)
    p3 = select_plan(wgpu_be, 35, 21, 40, ql.bf16)  # same kernels, other shape: same pipelines
    assert wgpu_be.cache_info() == before
    assert p1._executable.gemm_pipelines[True] is p2._executable.gemm_pipelines[True]
    assert p1._executable.quant_pipeline is p3._executable.quant_pipeline
    # A new q range is a new override value: one more pipeline, no new module.
    ql.QuantizedLinearPlan.select(wgpu_be,
                                  ql.QuantizedLinearDescriptor(35, 21, 40, ql.bf16, -61, 59))
    after = wgpu_be.cache_info()
    assert after["pipelines"] == before["pipelines"] + 1
    assert after["modules"] == before["modules"]


def test_run_cache_forgets_collected_buffers(wgpu_be, rng):
    import gc
    dtype = ql.f32
    plan, keep, x, wq, ws = small_linear(wgpu_be, rng, dtype=dtype)
    sets = []
    for _ in range(3):
        args = linear_args(wgpu_be, rng, x, wq, ws, None, dtype)
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


def test_info_and_facts(wgpu_be):
    info = wgpu_be.info()
    for key in ("adapter", "adapter_type", "backend_type", "limits", "features"):
        assert key in info
    plans = ql.plans.typical_plans(wgpu_be)
    assert wgpu_be.is_gpu == (info["adapter_type"] not in ("CPU", "Unknown", ""))
    if info["adapter_type"] == "CPU":
        assert not wgpu_be.is_gpu
    assert any("gemv" in v for v in plans.values())
    assert any("gemm_tiled" in v for v in plans.values())
    assert plans["M=1 K=N=4096 f64"].startswith("unsupported: ")
    with pytest.raises(ql.InvalidProblem, match="settings"):
        with wgpu_be.configured(bogus=1):
            pass


def test_plans_keep_the_options_they_were_selected_with(wgpu_be):
    before = wgpu_be.settings()
    assert set(before) == {"inner_product", "f16_storage", "quantize_exact_only", "tile",
                           "subgroups", "max_storage_binding", "max_workgroups_per_dim",
                           "max_workgroup_storage"}
    plan = select_plan(wgpu_be, 200, 40, 40, ql.f32, tile="8x8", inner_product="dot4")
    assert wgpu_be.settings() == before
    assert plan._executable.options.tile == "8x8" and "r8x8" in plan.sku
    with pytest.raises(ql.InvalidProblem, match="tile: expected one of"):
        with wgpu_be.configured(tile="2x2"):
            pass
    assert wgpu_be.settings() == before
    assert wgpu_be.facts.backend_type == wgpu_be.backend_type
    assert wgpu_be.facts.is_gpu == wgpu_be.is_gpu


def test_a_tensor_of_another_backend_object_is_refused_naming_the_argument(wgpu_be, rng):
    from qlinear.backends import wgpu as wgpu_backend

    other = wgpu_backend.create()  # its own device, also called "wgpu:0"
    assert other is not wgpu_be and other.device_id == wgpu_be.device_id
    plan, args, x, wq, ws = small_linear(wgpu_be, rng)
    args.activation = other.from_numpy(x)
    with pytest.raises(ql.InvalidProblem,
                       match=r"^activation: expected a tensor of this wgpu backend's device "
                             r"\(.*\), got one of another backend instance"):
        plan.run(args)
    with pytest.raises(ql.InvalidProblem, match="activation: .*another backend instance"):
        plan.can_implement(args)
    assert (wgpu_be.to_numpy(args.output) == np.float32(POISON)).all()  # nothing written
    with pytest.raises(ql.InvalidProblem, match="^tensor: .*another backend instance"):
        wgpu_be.to_numpy(args.activation)
    # The same tensor is at home on its own backend.
    assert other.to_numpy(args.activation).tobytes() == x.tobytes()
