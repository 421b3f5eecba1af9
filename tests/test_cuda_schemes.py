"""The activation schemes on the cuda backend's host side, without a GPU: the scheme's
kernels and arguments reach both launches (static scale in the compute type, zero-point
scratch, weight column sums), and the GEMMs' zero-point term wraps as the kernels' uint32
arithmetic does. (tests/test_cuda_emulation.py emulates where each kernel applies the term,
tests/test_cuda_act_schemes.py the activation pass; the shared tests/test_schemes.py runs
them on a GPU.)"""

from __future__ import annotations

import numpy as np
import pytest
from test_cuda_backend import _linear, _tensor, make_fake_backend
from test_cuda_emulation import (
    colsum_of,
    emulate_gemm_mma,
    oracle,
    random_s8,
    zero_points,
    zp_adjust,
)

import qlinear as ql
from qlinear.backends import cuda as qc
from qlinear.problem import QuantizeTensors, max_exact_k

SCHEME_CODES = {"dynamic": "0", "static": "1", "static_asym": "1", "dynamic_asym": "2"}


@pytest.fixture
def fake_backend(monkeypatch):
    return make_fake_backend(monkeypatch)


@pytest.mark.parametrize("scheme", ["static", "static_asym", "dynamic_asym"])
@pytest.mark.parametrize("dtype", [ql.f16, ql.f64], ids=["f16", "f64"])
@pytest.mark.parametrize("m,k", [(1, 4096), (16, 33), (4096, 4096), (300, 100)])
def test_scheme_arguments_reach_both_kernels(fake_backend, scheme, dtype, m, k):
    """The activation pass gets the scheme's kernel, the zero-point scratch (asymmetric
    schemes), the static scale in the compute type and the zero point; the GEMM gets the
    zero points and column sums exactly when the scheme is asymmetric, in the kernel with
    the zero-point term (aligned) or the byte-load one that applies it when given."""
    sch = ql.ActivationScheme(scheme)
    scale = 0.0375 if sch.static else None
    z = -17 if sch.static_zero_point else None
    exe, t, launches = _linear(fake_backend, m, 384, k, dtype, scheme=scheme,
                               input_scale=scale, input_zero_point=z)
    (act, _, _, act_args), (gemm, _, _, gemm_args) = launches
    assert act.args[-1] == SCHEME_CODES[scheme]
    zp = t.act_zp_scratch.data_ptr if sch.asymmetric else 0
    assert act_args[3] == zp
    ctype = np.float64 if dtype == ql.f64 else np.float32
    assert type(act_args[8]) is ctype and act_args[8] == ctype(scale or 0)
    assert type(act_args[9]) is np.int32 and act_args[9] == (z or 0)
    colsum = t.weight_colsum.data_ptr if sch.asymmetric else 0
    assert gemm_args[5:8] == (zp, colsum, t.output.data_ptr)
    aligned = k % 16 == 0
    want = ("true", "1" if sch.asymmetric else "0") if aligned else ("false", "2")
    assert gemm.args[-2:] == want
    assert ("_zp" in gemm.label) == (sch.asymmetric and aligned)
    # The sku names the scheme (in the activation pass's label).
    assert f"rowquant_{scheme}_" in exe.sku and exe.sku.startswith("cuda.sm_90a.")
    names = {s.name_expression for s in qc.kernel_variants("sm_90a")}
    assert {act.name_expression, gemm.name_expression} <= names


@pytest.mark.parametrize("scheme", ["static", "static_asym", "dynamic_asym"])
def test_quantize_plan_schemes(fake_backend, scheme):
    sch = ql.ActivationScheme(scheme)
    desc = ql.DynamicRangeQuantizeDescriptor(m=40, k=64, dtype=ql.bf16, scheme=scheme)
    exe = fake_backend.quantize_executable(desc)
    zp = _tensor(fake_backend, (40,), ql.s32, 4 << 20) if sch.asymmetric else None
    t = QuantizeTensors(activation=_tensor(fake_backend, (40, 64), ql.bf16, 1 << 20),
                        act_q=_tensor(fake_backend, (40, 64), ql.s8, 2 << 20),
                        act_scale=_tensor(fake_backend, (40,), ql.bf16, 3 << 20), act_zp=zp,
                        input_scale=0.5 if sch.static else None,
                        input_zero_point=3 if sch.static_zero_point else None)
    fake_backend.launches.clear()
    exe.run(t)
    (spec, grid, _, args), = fake_backend.launches
    assert spec.args[-1] == SCHEME_CODES[scheme] and grid == (5,)
    assert args[3] == (zp.data_ptr if zp is not None else 0)
    assert [int(v) for v in args[4:8]] == [40, 64, desc.q_min, 127]
    assert desc.q_min == (-128 if sch.asymmetric else -127)
    assert args[8] == np.float32(0.5 if sch.static else 0) and type(args[8]) is np.float32
    assert args[9] == (3 if sch.static_zero_point else 0)
    assert exe.sku == f"cuda.sm_90a.rowquant_{scheme}_warp_vec16"


def test_every_scheme_is_offered():
    assert qc.CudaBackend.activation_schemes == frozenset(ql.ActivationScheme)


def test_zero_point_term_wraps_like_the_kernel():
    """zp_adjust is the uint32 arithmetic of the kernels: products beyond int32 wrap, and
    the result is exact wherever the true value is an int32 (the K bound's promise)."""
    rng = np.random.default_rng()
    acc = rng.integers(-2**31, 2**31, 5000)
    zp = rng.integers(-128, 128, 5000)
    cs = rng.integers(-2**31, 2**31, 5000)
    want = (acc - zp * cs + 2**31) % 2**32 - 2**31
    np.testing.assert_array_equal(zp_adjust(acc, zp, cs), want)
    k = max_exact_k(-128, 127, asymmetric=True)
    q = np.full(k, -128)
    w = np.full(k, -128)
    zp_max = 127  # q - zp spans the whole range at the bound: -255 * -128 * K
    true = int((q - zp_max) @ w)
    assert true < 2**31
    assert zp_adjust(int(q @ w), zp_max, int(w.sum())) == true


def test_the_emulated_zero_point_term_is_checked():
    """A zero point taken from the wrong row or a column sum from the wrong column fails
    the comparison: the checks above would notice such a kernel."""
    rng = np.random.default_rng(5)
    a, w = random_s8(rng, (20, 64)), random_s8(rng, (24, 64))
    zp = zero_points(rng, 20)
    good = emulate_gemm_mma(a, w, "64x64", True, zp)
    np.testing.assert_array_equal(good, oracle(a, w, zp))
    assert not np.array_equal(emulate_gemm_mma(a, w, "64x64", True, np.roll(zp, 1)),
                              oracle(a, w, zp))
    wrong_cols = np.roll(colsum_of(w), 1)
    assert not np.array_equal(emulate_gemm_mma(a, w, "64x64", True, zp, wrong_cols),
                              oracle(a, w, zp))
