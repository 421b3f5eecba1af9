"""The dot4I8Packed probe: it passes here; its edge values catch the ways a driver gets
the integer dot product wrong; and a backend whose probe fails takes the exact f32 path,
says so in ``info()`` and in every linear plan's sku, and still computes exactly."""

import numpy as np
import pytest

import qlinear as ql
from qlinear.backends.wgpu import probe
from qlinear.backends.wgpu.backend import WgpuBackend
from qltest import random_activation, random_scale, random_weight
from wgpu_helpers import DTYPES, SHAPES, linear

WHY = "(f32 path: dot4I8Packed failed the probe)"


def _fresh(be):
    """A new backend object on ``be``'s device: its probe has not run yet."""
    return WgpuBackend(be._wgpu, be.adapter, be.device)


def test_the_probe_passes_on_this_adapter(wgpu_be):
    a, b = probe.probe_lanes()
    got = probe.device_dots(wgpu_be.gpu, a, b)
    assert got.dtype == np.int32 and got.shape == (len(a),)
    np.testing.assert_array_equal(got.astype(np.int64), probe.expected_dots(a, b))
    assert probe.probe_dot4(wgpu_be.gpu) == probe.Dot4Probe(True)
    assert wgpu_be.dot4_probe.exact and wgpu_be.facts.dot4_exact
    assert wgpu_be.info()["dot4_probe"].startswith("passed")


def test_the_edge_values_cover_every_lane():
    a, b = probe.probe_lanes()
    want = probe.expected_dots(a, b)
    assert want.max() == 4 * 128 * 128 and want.min() == -4 * 128 * 127
    for lane in range(4):
        alone = (np.delete(a, lane, axis=1) == 0).all(axis=1)
        pairs = {(int(x), int(y)) for x, y in zip(a[alone, lane], b[alone, lane], strict=True)}
        assert {(-128, -128), (-128, 127), (127, -128), (-1, -1), (-1, 1), (127, 127)} <= pairs


def _wrong_in_lane(lane):
    """A driver that zero-extends one lane instead of sign-extending it."""
    def dots(gpu, a, b):
        ua, ub = a.astype(np.int64), b.astype(np.int64)
        ua[:, lane] = a[:, lane].view(np.uint8)
        ub[:, lane] = b[:, lane].view(np.uint8)
        return (ua * ub).sum(axis=1).astype(np.int32)
    return dots


def _saturating(gpu, a, b):
    """A driver whose sum saturates to int16."""
    return np.clip(probe.expected_dots(a, b), -32768, 32767).astype(np.int32)


@pytest.mark.parametrize("bug", [_wrong_in_lane(0), _wrong_in_lane(1), _wrong_in_lane(2),
                                 _wrong_in_lane(3), _saturating],
                         ids=["lane0", "lane1", "lane2", "lane3", "int16_sum"])
def test_the_probe_catches_wrong_drivers(wgpu_be, monkeypatch, bug):
    monkeypatch.setattr(probe, "device_dots", bug)
    found = probe.probe_dot4(wgpu_be.gpu)
    assert not found.exact
    assert "products wrong, first a=[" in found.detail and ": got " in found.detail


def test_a_probe_that_cannot_run_counts_as_failed(wgpu_be, monkeypatch):
    def broken(gpu, a, b):
        raise ql.DeviceError("wgpu: running the dot4I8Packed probe failed (GPUValidationError)")
    monkeypatch.setattr(probe, "device_dots", broken)
    found = probe.probe_dot4(wgpu_be.gpu)
    assert not found.exact and found.detail.startswith("the probe kernel did not run (wgpu: ")


def test_a_failed_probe_sends_plans_to_the_exact_f32_path(wgpu_be, monkeypatch, rng):
    monkeypatch.setattr(probe, "device_dots", _wrong_in_lane(3))
    be = _fresh(wgpu_be)
    assert be.facts.dot4_exact is False and not be.dot4_probe.exact
    info = be.info()
    assert info["inner_product"] == "fma"
    assert info["dot4_probe"].startswith("failed: ") and "exact f32 path" in info["dot4_probe"]
    for m, k, n in SHAPES + [(200, 70, 40)]:  # decode, tiled 4x4, and M > 64 (8x8 on dot4)
        for dtype in DTYPES:
            x = random_activation(rng, m, k, dtype)
            wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
            bias = random_scale(rng, n, dtype) if n % 2 else None
            plan = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(m, n, k, dtype))
            assert plan.sku.endswith(WHY) and "_fma" in plan.sku, plan.sku
            linear(be, x, wq, ws, bias, dtype, rng)  # every element against the int64 oracle
    with pytest.raises(ql.Unsupported, match="failed the probe"):
        with be.configured(inner_product="dot4"):
            ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(4, 4, 4, ql.f32))
    with be.configured(inner_product="fma"):
        forced = ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(4, 4, 4, ql.f32))
    assert "_fma" in forced.sku and not forced.sku.endswith(")")
    # The backend the registry hands out is another object, probed on its own.
    assert ql.backend("wgpu").facts.dot4_exact


def test_the_probe_runs_once_per_backend_object(wgpu_be, monkeypatch):
    calls = []
    real = probe.device_dots

    def counted(gpu, a, b):
        calls.append(gpu)
        return real(gpu, a, b)

    monkeypatch.setattr(probe, "device_dots", counted)
    be = _fresh(wgpu_be)
    assert calls == []  # creating the object does not run it
    ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(2, 4, 8, ql.f32))
    be.info()
    assert calls == [be.gpu]
