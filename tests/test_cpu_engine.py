"""The cpu backend's engines: the chooser, the setting, the probe, what plans and info say,
and the two engines bit for bit against each other and the int64 oracle, on the paths
each takes (numpy passes on small problems, torch ops above the grain; both weight
layouts; K = 1; every dtype and scheme; NaN, Inf, zero and subnormal rows)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import qlinear as ql
from qlinear.backends import cpu, cpu_engine, cpu_torch
from qlinear.backends.cpu_engine import EngineChoice, HostFacts, ProbeResult, choose_engine
from qlinear.backends.cpu_torch import EPILOGUE_GRAIN, QUANT_GRAIN
from qltest import (
    assert_bitwise_equal,
    oracle_linear_scheme,
    oracle_quantize_scheme,
    random_activation,
    random_scale,
    random_weight,
    shifted_activation,
)

X86 = HostFacts(torch=True, machine="x86_64", isa=frozenset({"avx512_vnni"}))


def _no_probe():
    raise AssertionError("the probe ran")


def _probe(exact, detail="d"):
    return lambda: ProbeResult(exact, detail)


# -- the chooser (pure) ------------------------------------------------------------------


def test_numpy_setting_never_probes():
    c = choose_engine("numpy", X86, _no_probe)
    assert c.engine == "numpy" and "forces" in c.why and not c.refused


@pytest.mark.parametrize("facts, words", [
    (HostFacts(torch=False, machine="x86_64", isa=frozenset({"avx512_vnni"})), "not installed"),
    (HostFacts(torch=True, machine="arm64", isa=None), "arm64"),
    (HostFacts(torch=True, machine="x86_64", isa=frozenset()), "neither AVX512-VNNI"),
])
@pytest.mark.parametrize("setting", ["auto", "onednn"])
def test_hosts_without_the_engine_get_numpy_and_the_reason(facts, words, setting):
    c = choose_engine(setting, facts, _no_probe)
    assert c.engine == "numpy" and words in c.why
    assert bool(c.refused) == (setting == "onednn") and (not c.refused or words in c.refused)


def test_the_probe_decides_and_its_finding_is_the_reason():
    assert choose_engine("auto", X86, _probe(True, "all exact")) == \
        EngineChoice("onednn", "oneDNN's exact s8 GEMM via torch._int_mm (all exact)")
    c = choose_engine("auto", X86, _probe(False, "M=1: 3 sums wrong"))
    assert c.engine == "numpy" and "probe GEMM differs" in c.why and "3 sums wrong" in c.why
    # Where the OS does not list the CPU's flags, the probe (and torch's check) decide.
    unknown = HostFacts(torch=True, machine="amd64", isa=None)
    assert choose_engine("auto", unknown, _probe(True)).engine == "onednn"


@pytest.mark.parametrize("text, want", [("", "auto"), ("NUMPY", "numpy"), (" onednn ", "onednn")])
def test_the_setting_is_read_from_the_environment(monkeypatch, text, want):
    monkeypatch.setenv(cpu_engine.ENGINE_SETTING, text)
    assert cpu_engine.engine_setting() == want
    assert cpu.create().setting == want


def test_a_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(cpu_engine.ENGINE_SETTING, "mkl")
    with pytest.raises(ql.BackendUnavailable,
                       match="QLINEAR_CPU_ENGINE.*auto, numpy, onednn.*'mkl'"):
        cpu.create()


# -- the probe ---------------------------------------------------------------------------


class _FakeTensor:
    def __init__(self, a):
        self.a = a
        self.dtype = a.dtype

    def t(self):
        return _FakeTensor(self.a.T)

    def contiguous(self):
        return _FakeTensor(np.ascontiguousarray(self.a))

    def numpy(self):
        return self.a


class _FakeTorch:
    """What the probe touches of torch; ``_int_mm`` adds products in pairs saturated to
    int16 (oneDNN's u8 x s8 path without VNNI, pytorch#136746) unless ``exact``."""

    __version__ = "0.fake"
    int32 = np.dtype(np.int32)

    def __init__(self, exact=False, vnni=True):
        self.exact = exact
        self.cpu = type("cpu", (), {"_is_vnni_supported": staticmethod(lambda: vnni),
                                    "_is_amx_tile_supported": staticmethod(lambda: False)})

    def from_numpy(self, a):
        return _FakeTensor(a)

    def _int_mm(self, a, b):
        p = a.a.astype(np.int64)[:, :, None] * b.a.astype(np.int64)[None, :, :]
        if not self.exact:
            k = p.shape[1] - p.shape[1] % 2
            pairs = np.clip(p[:, 0:k:2] + p[:, 1:k:2], -2**15, 2**15 - 1)
            p = np.concatenate([pairs, p[:, k:]], axis=1)
        return _FakeTensor(p.sum(axis=1).astype(np.int32))


def test_the_probe_catches_int16_saturation():
    found = cpu_engine.probe_int_mm(_FakeTorch(exact=False))
    assert not found.exact and "sums wrong" in found.detail
    assert cpu_engine.probe_int_mm(_FakeTorch(exact=True)).exact
    assert cpu_engine.torch_isa(_FakeTorch(vnni=False)) is False
    assert cpu_engine.torch_isa(_FakeTorch(vnni=True)) is True
    assert cpu_engine.torch_isa(type("torch", (), {"cpu": None})) is None


def test_torch_is_asked_about_the_cpu_only_where_the_os_does_not_say(monkeypatch):
    """Where /proc/cpuinfo lists the flags they decide (an AVX-VNNI CPU whose torch knows
    only AVX512-VNNI still runs the probe); elsewhere torch's detection can refuse."""
    fake = _FakeTorch(exact=True, vnni=False)
    monkeypatch.setitem(sys.modules, "torch", fake)
    for isa, engine in ((frozenset({"avx_vnni"}), "onednn"), (None, "numpy")):
        monkeypatch.setattr(cpu, "host_facts",
                            lambda isa=isa: HostFacts(torch=True, machine="x86_64", isa=isa))
        be = cpu.CpuBackend("auto")
        assert be.engine.engine == engine, be.engine
    assert "torch finds neither VNNI nor AMX" in be.engine.why
    old = type("torch", (), {"__version__": "1.old"})  # before torch._int_mm
    assert "torch 1.old has no torch._int_mm" in cpu_engine.probe_int_mm(old).detail


def test_the_real_probe_agrees_where_the_engine_runs():
    torch = pytest.importorskip("torch")
    found = cpu_engine.probe_int_mm(torch)
    be = ql.backend("cpu")
    if be.setting == "auto":
        assert (be.engine.engine == "onednn") == found.exact, (be.engine, found)


# -- plans, info, settings ----------------------------------------------------------------


def _onednn_or_skip():
    be = ql.backend("cpu")
    if be.engine.engine != "onednn":
        pytest.skip(f"the oneDNN engine does not run here: {be.engine.why}")
    return be


def test_sku_and_info_name_the_engine():
    be = _onednn_or_skip()
    sel = ql.QuantizedLinearPlan.select
    for m, k, n, layout in ((1, 8, 16, "wnk"), (2, 4096, 1024, "wkn"), (8, 4096, 1024, "wt"),
                            (32, 4096, 1024, "wt"), (16, 384, 1536, "wkn"),
                            (33, 4096, 1024, "wkn"), (1, 1, 16, "wkn"), (16, 1, 16, "wkn")):
        sku = sel(be, ql.QuantizedLinearDescriptor(m, n, k, ql.f32)).sku
        assert f"+onednn_s8_{layout}+" in sku, (m, k, n, sku)
    assert cpu_torch.gemm_layout(16, 384, 1536, readonly=False) == "wt"  # never a copy
    assert cpu_torch.gemm_layout(40, 384, 1536, readonly=False) == "wnk"
    info = be.info()
    assert info["engine"] == "onednn" and "torch._int_mm" in info["engine_why"]
    with be.configured(engine="numpy"):
        assert be.info()["engine"] == "numpy"
        numpy_sku = sel(be, ql.QuantizedLinearDescriptor(2, 8, 16, ql.f32)).sku
        assert "+blas_f32_kchunk1032+" in numpy_sku
    assert be.setting == "auto"
    big = ql.DynamicRangeQuantizeDescriptor(m=QUANT_GRAIN // 64 + 1, k=64, dtype=ql.f32)
    assert ql.DynamicRangeQuantizePlan.select(be, big).sku == "cpu.rowquant_torch"
    small = ql.DynamicRangeQuantizeDescriptor(m=2, k=64, dtype=ql.f32)
    assert ql.DynamicRangeQuantizePlan.select(be, small).sku == "cpu.rowquant"


def test_configured_checks_its_value():
    be = ql.backend("cpu")
    with pytest.raises(ql.InvalidProblem, match="engine: expected one of.*got 'mkl'"):
        with be.configured(engine="mkl"):
            pass


def test_onednn_required_where_it_cannot_run_is_unsupported(monkeypatch):
    monkeypatch.setattr(cpu, "host_facts",
                        lambda: HostFacts(torch=False, machine="x86_64", isa=None))
    be = cpu.CpuBackend("onednn")
    assert be.engine.refused and be.info()["engine"] == "numpy"
    with pytest.raises(ql.Unsupported, match="engine: .*torch is not installed"):
        ql.QuantizedLinearPlan.select(be, ql.QuantizedLinearDescriptor(2, 8, 16, ql.f32))
    auto = cpu.CpuBackend("auto")
    assert "blas" in ql.QuantizedLinearPlan.select(
        auto, ql.QuantizedLinearDescriptor(2, 8, 16, ql.f32)).sku


def _fresh_python(code, *flags):
    """Run ``code`` in a new interpreter with the engine setting unset."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop(cpu_engine.ENGINE_SETTING, None)
    return subprocess.run([sys.executable, *flags, "-c", code], env=env, timeout=120,
                          capture_output=True, text=True)


def test_torch_is_imported_only_when_the_engine_is_chosen():
    code = ("import sys, qlinear as ql\n"
            "be = ql.backend('cpu')\n"
            "be.info  # nothing chosen yet\n"
            "assert 'torch' not in sys.modules, 'creating the backend imported torch'\n"
            "desc = ql.QuantizedLinearDescriptor(2, 8, 16, ql.f32)\n"
            "plan = ql.QuantizedLinearPlan.select(be, desc)\n"
            "print(be.engine.engine, 'torch' in sys.modules)\n")
    run = _fresh_python(code)
    assert run.returncode == 0, run.stderr
    engine, imported = run.stdout.split()
    if engine == "onednn":
        assert imported == "True"
    if importlib.util.find_spec("torch") is None:
        assert (engine, imported) == ("numpy", "False")


# -- the two engines, bit for bit ------------------------------------------------------------


def _special_rows(x, rng, dtype):
    """NaN, Inf, all-zero and tiny rows among ordinary ones (where there are rows enough)."""
    m = x.shape[0]
    if m >= 5:
        x[1, rng.integers(x.shape[1])] = np.nan
        x[2, rng.integers(x.shape[1])] = -np.inf
        x[3] = 0
        tiny = {ql.f16: 1e-7, ql.bf16: 1e-38, ql.f32: 1e-40, ql.f64: 1e-310}[dtype]
        x[4] = (rng.standard_normal(x.shape[1]) * tiny).astype(dtype.numpy)
    return x


def _run(be, engine, desc, x, wq, ws, bias, extra, readonly, rng):
    with be.configured(engine=engine):
        plan = ql.QuantizedLinearPlan.select(be, desc)
    m, k, n = desc.m, desc.k, desc.c_out
    args = ql.QuantizedLinearArgs(
        activation=x, weight_q=be.from_numpy(wq, readonly=readonly),
        weight_scale=be.from_numpy(ws, readonly=readonly),
        output=np.full((m, n), 31337, desc.dtype.numpy),
        act_q_scratch=rng.integers(-128, 128, (m, k), dtype=np.int8),
        act_scale_scratch=np.full(m, 31337, desc.dtype.numpy),
        bias=None if bias is None else be.from_numpy(bias, readonly=readonly),
        act_zp_scratch=(rng.integers(-2**31, 2**31, m, dtype=np.int32)
                        if desc.scheme.asymmetric else None), **extra)
    for _ in range(2):  # the second run finds what the first one kept
        plan.run(args)
    return plan.sku, args


# Every operand layout of cpu_torch.gemm_layout, with a read-only and a writable weight:
# M = 1 "wnk"; M = 5, 9 and 16 "wkn" (writable: "wt"; these weights are small); M = 40
# "wkn" (writable: "wnk"); K = 1 "wkn". The "wt" of big weights at M = 8..32 is
# test_the_wt_layout_of_big_weights.
SHAPES = {"decode": (1, 300, 70), "small": (5, 64, 40), "k1": (6, 1, 9),
          "torch-ops": (9, 70, 33), "batch": (16, 130, 50), "rows-only": (40, 90, 20)}


@pytest.fixture
def grains(request, monkeypatch):
    """For the "torch-ops" shapes, grains low enough that both passes run in torch ops
    (the same code as above the real grains, on problems the oracle checks quickly)."""
    from qlinear.backends import cpu_torch

    if request.node.callspec.params.get("shape") == "torch-ops":
        for mod in (cpu, cpu_torch):
            monkeypatch.setattr(mod, "QUANT_GRAIN", 64, raising=False)
        monkeypatch.setattr(cpu_torch, "EPILOGUE_GRAIN", 64)


@pytest.mark.parametrize("readonly", [True, False], ids=["readonly", "writable"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("scheme", list(ql.ActivationScheme),
                         ids=[s.value for s in ql.ActivationScheme])
@pytest.mark.parametrize("dtype", [ql.f32, ql.f16, ql.bf16, ql.f64], ids=lambda d: d.name)
def test_the_engines_agree_with_each_other_and_the_oracle(dtype, scheme, shape, readonly, rng,
                                                          grains):
    be = _onednn_or_skip()
    m, k, n = SHAPES[shape]
    x = (shifted_activation if scheme.asymmetric else random_activation)(rng, m, k, dtype)
    x = _special_rows(x, rng, dtype)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    bias = random_scale(rng, n, dtype) * 100 if m % 2 else None
    s_in = 0.05 if scheme.static else None
    z_in = -3 if scheme.static_zero_point else None
    extra = {}
    if scheme.asymmetric:
        extra["weight_colsum"] = be.from_numpy(ql.weight_colsum(wq), readonly=readonly)
    if scheme.static:
        extra["input_scale"] = s_in
    if scheme.static_zero_point:
        extra["input_zero_point"] = z_in
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype, scheme=scheme)
    sku_np, a = _run(be, "numpy", desc, x, wq, ws, bias, extra, readonly, rng)
    sku_dnn, b = _run(be, "onednn", desc, x, wq, ws, bias, extra, readonly, rng)
    assert "blas" in sku_np and "onednn" in sku_dnn
    want_y, want_q, want_s, want_zp = oracle_linear_scheme(x, wq, ws, bias, dtype, scheme,
                                                           s_in, z_in, None, 127)
    names = ["output", "act_q_scratch", "act_scale_scratch"] + \
        ["act_zp_scratch"] * scheme.asymmetric
    for name, want in zip(names, (want_y, want_q, want_s, want_zp)):
        got_np, got_dnn = getattr(a, name), getattr(b, name)
        assert_bitwise_equal(got_dnn, got_np, f"{name}: oneDNN engine vs numpy engine")
        assert_bitwise_equal(got_dnn.astype(want.dtype), want, f"{name} [{sku_dnn}]")


@pytest.mark.parametrize("dtype", [ql.f32, ql.f16, ql.bf16, ql.f64], ids=lambda d: d.name)
def test_the_activation_pass_in_torch_ops_matches_the_oracle(dtype, rng):
    be = _onednn_or_skip()
    m, k = 7, QUANT_GRAIN // 7 + 11
    x = _special_rows(random_activation(rng, m, k, dtype), rng, dtype)
    desc = ql.DynamicRangeQuantizeDescriptor(m=m, k=k, dtype=dtype, q_min=-100, q_max=90)
    plan = ql.DynamicRangeQuantizePlan.select(be, desc)
    assert plan.sku == "cpu.rowquant_torch"
    q = rng.integers(-128, 128, (m, k), dtype=np.int8)
    s = np.full(m, 31337, dtype.numpy)
    plan.run(ql.DynamicRangeQuantizeArgs(x, q, s))
    want_q, want_s, _ = oracle_quantize_scheme(x, dtype, "dynamic", q_min=-100, q_max=90)
    assert_bitwise_equal(s, want_s, "act_scale")
    assert_bitwise_equal(q.astype(np.int64), want_q, "act_q")


@pytest.mark.parametrize("m", [1, 3, 16, 40])
def test_a_writable_weight_is_read_afresh_each_run(rng, m):
    """Nothing derived from a writable weight is kept: a change shows in the next run."""
    be = _onednn_or_skip()
    k, n = 40, 6
    x = random_activation(rng, m, k, ql.f32)
    wq = random_weight(rng, n, k)
    ws = random_scale(rng, n, ql.f32)
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=ql.f32)
    plan = ql.QuantizedLinearPlan.select(be, desc)
    args = ql.QuantizedLinearArgs(x, wq, ws, np.empty((m, n), np.float32),
                                  np.empty((m, k), np.int8), np.empty(m, np.float32))
    plan.run(args)
    wq[:] = -wq
    wq[wq == -128] = 127
    ws *= 3
    plan.run(args)
    want_y = oracle_linear_scheme(x, wq, ws, None, ql.f32, "dynamic", q_max=127)[0]
    assert_bitwise_equal(args.output, want_y, "output after the weight changed")


@pytest.mark.parametrize("dtype", [ql.f32, ql.bf16], ids=lambda d: d.name)
def test_a_problem_above_the_real_grains(dtype, rng):
    """Both passes in torch ops at their real thresholds, across torch's threads."""
    be = _onednn_or_skip()
    m, k, n = 64, QUANT_GRAIN // 64 + 3, EPILOGUE_GRAIN // 64 + 5
    x = _special_rows(random_activation(rng, m, k, dtype), rng, dtype)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, dtype)
    bias = random_scale(rng, n, dtype)
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype)
    sku, a = _run(be, "onednn", desc, x, wq, ws, bias, {}, True, rng)
    want_y, want_q, want_s, _ = oracle_linear_scheme(x, wq, ws, bias, dtype, "dynamic",
                                                     q_max=127)
    assert_bitwise_equal(a.act_scale_scratch, want_s, f"act_scale_scratch [{sku}]")
    assert_bitwise_equal(a.act_q_scratch.astype(np.int64), want_q, f"act_q_scratch [{sku}]")
    assert_bitwise_equal(a.output, want_y, f"output [{sku}]")


@pytest.mark.parametrize("m", [8, 32])
def test_the_wt_layout_of_big_weights(m, rng):
    """M = 8..32 on a weight of 4 MiB reads it first (W @ q.T); the epilogue then reads a
    transposed accumulator, in torch ops at any size."""
    be = _onednn_or_skip()
    k, n = 4096, 1024
    x = _special_rows(random_activation(rng, m, k, ql.f16), rng, ql.f16)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, ql.f16)
    bias = random_scale(rng, n, ql.f16)
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=ql.f16)
    sku, a = _run(be, "onednn", desc, x, wq, ws, bias, {}, True, rng)
    assert "+onednn_s8_wt+" in sku
    want_y, want_q, want_s, _ = oracle_linear_scheme(x, wq, ws, bias, ql.f16, "dynamic",
                                                     q_max=127)
    assert_bitwise_equal(a.act_scale_scratch, want_s, f"act_scale_scratch [{sku}]")
    assert_bitwise_equal(a.act_q_scratch.astype(np.int64), want_q, f"act_q_scratch [{sku}]")
    assert_bitwise_equal(a.output, want_y, f"output [{sku}]")


def test_read_only_arrays_raise_no_warning():
    """torch warns when it views a read-only array; the engine never writes through such a
    view, so the warning is not the caller's (a fresh process: torch warns once)."""
    _onednn_or_skip()
    code = ("import numpy as np, qlinear as ql\n"
            "x = np.random.rand(300, 600).astype(np.float32)\n"
            "x.flags.writeable = False\n"
            "w = np.random.rand(64, 600).astype(np.float32)\n"
            "w.flags.writeable = False\n"
            "layer = ql.QuantizedLinear.from_float(w, backend='cpu')\n"
            "for _ in range(2):\n"
            "    layer.forward(x, out=np.empty((300, 64), np.float32))\n"
            "print(layer.plan(300).sku)\n")
    out = _fresh_python(code, "-W", "error::UserWarning")
    assert out.returncode == 0 and "onednn" in out.stdout, out.stderr


@pytest.mark.parametrize("scheme", [ql.ActivationScheme.DYNAMIC, ql.ActivationScheme.DYNAMIC_ASYM],
                         ids=["dynamic", "dynamic_asym"])
@pytest.mark.parametrize("m", [10, 40])
def test_row_blocks(monkeypatch, rng, scheme, m):
    """Problems too big for one block of temporaries run a few rows at a time, on either
    engine, with the torch-op passes (lowered grains) and without."""
    be = _onednn_or_skip()
    from qlinear.backends import cpu_torch

    k, n = 50, 30
    monkeypatch.setattr(cpu, "_BLOCK_BYTES", 8 * (k + n) * 3)  # 3 rows per block
    x = _special_rows((shifted_activation if scheme.asymmetric else random_activation)(
        rng, m, k, ql.f32), rng, ql.f32)
    wq, ws = random_weight(rng, n, k), random_scale(rng, n, ql.f32)
    extra = {"weight_colsum": be.from_numpy(ql.weight_colsum(wq))} if scheme.asymmetric else {}
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=ql.f32, scheme=scheme)
    want_y, want_q, want_s, want_zp = oracle_linear_scheme(x, wq, ws, None, ql.f32, scheme,
                                                           q_max=127)
    for grain in (None, 16):
        if grain:
            for mod in (cpu, cpu_torch):
                monkeypatch.setattr(mod, "QUANT_GRAIN", grain, raising=False)
            monkeypatch.setattr(cpu_torch, "EPILOGUE_GRAIN", grain)
        for engine in ("numpy", "onednn"):
            sku, a = _run(be, engine, desc, x, wq, ws, None, extra, True, rng)
            assert_bitwise_equal(a.output, want_y, f"output [{sku}, grain {grain}]")
            assert_bitwise_equal(a.act_q_scratch.astype(np.int64), want_q, f"act_q [{sku}]")
            assert_bitwise_equal(a.act_scale_scratch, want_s, f"act_scale [{sku}]")
            if scheme.asymmetric:
                assert_bitwise_equal(a.act_zp_scratch.astype(np.int64), want_zp, f"zp [{sku}]")
