"""The cuda backend's host side, without a GPU: availability, argument marshalling,
tensor wrapping and kernel choice. (On a GPU the shared suite runs it for real.)"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import qlinear as ql
from qlinear.backends import cuda as qc
from qlinear.backends.cuda import compile as cuda_compile
from qlinear.backends.cuda import driver, interop
from qlinear.problem import LinearTensors, QuantizeTensors
from qlinear.tensors import Tensor


def _driver_present() -> bool:
    return driver.find_driver() is not None


@pytest.mark.skipif(_driver_present(), reason="an NVIDIA driver is installed here")
def test_unavailable_without_a_driver_says_why():
    with pytest.raises(ql.BackendUnavailable) as info:
        qc.create()
    e = info.value
    assert e.backend == "cuda" and "no NVIDIA driver (libcuda) found" in e.reason
    assert e.install
    status = {s.name: s for s in ql.backend_status()}["cuda"]
    assert not status.available and "libcuda" in status.reason
    # The best backend is then another one, and asking for cuda by name says why.
    assert ql.backend().name != "cuda"
    with pytest.raises(ql.BackendUnavailable, match="libcuda"):
        ql.backend("cuda")


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "cuda:0"])
def test_a_bad_device_number_is_named(monkeypatch, value):
    """Read before the driver, on any machine: a typo is reported as itself."""
    monkeypatch.setenv("QLINEAR_CUDA_DEVICE", value)
    with pytest.raises(ql.BackendUnavailable) as info:
        qc.create()
    assert info.value.reason == (
        f"QLINEAR_CUDA_DEVICE: expected a device number (0, 1, ...), got {value!r}")


@pytest.mark.skipif(_driver_present(), reason="an NVIDIA driver is installed here")
def test_qlinear_info_shows_the_reason():
    out = subprocess.run([sys.executable, "-m", "qlinear", "info"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[cuda]" in out.stdout and "libcuda" in out.stdout


def test_importing_the_backend_does_not_touch_the_driver():
    code = ("import sys, qlinear.backends.cuda as c; "
            "assert 'cuda.core' not in sys.modules, 'cuda.core imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------
# __cuda_array_interface__ parsing


class FakeCAI:
    def __init__(self, **cai):
        self.__cuda_array_interface__ = {"version": 3, "strides": None, "data": (0, False), **cai}


def test_cai_view_contiguous_and_strided():
    ptr, shape, strides, dtype, ro = interop.cai_view(
        FakeCAI(shape=(3, 4), typestr="<f2", data=(4096, False)), "x")
    assert (ptr, shape, strides, dtype, ro) == (4096, (3, 4), (4, 1), ql.f16, False)
    ptr, shape, strides, dtype, ro = interop.cai_view(
        FakeCAI(shape=(3, 4), typestr="<f4", strides=(32, 4), data=(256, True)), "x")
    assert (shape, strides, dtype, ro) == ((3, 4), (8, 1), ql.f32, True)
    assert interop.cai_view(FakeCAI(shape=(5,), typestr="|i1"), "x")[3] == ql.s8
    assert interop.cai_view(FakeCAI(shape=(5,), typestr="<f8"), "x")[3] == ql.f64
    assert interop.cai_view(FakeCAI(shape=(5,), typestr="<i4"), "x")[3] == ql.s32


@pytest.mark.parametrize("cai,match", [
    (dict(shape=(2,), typestr="<i8"), "typestr"),
    (dict(shape=(2,), typestr="<u4"), "typestr"),
    (dict(shape=(2,), typestr=">i4"), "typestr"),
    (dict(shape=(2,), typestr=">f4"), "typestr"),
    (dict(shape=(2,), typestr="<V2"), "typestr"),
    (dict(shape=(2,), typestr="<f4", mask=object()), "mask"),
    (dict(shape=(2, 2), typestr="<f4", strides=(6, 2)), "multiples"),
])
def test_cai_view_rejects(cai, match):
    with pytest.raises(ql.InvalidProblem, match=match) as info:
        interop.cai_view(FakeCAI(**cai), "activation")
    assert "activation" in str(info.value)


def test_cai_view_without_interface():
    class Refuses:
        @property
        def __cuda_array_interface__(self):
            raise TypeError("bfloat16 is not supported")  # what torch does for bf16

    assert interop.cai_view(Refuses(), "x") is None
    assert interop.cai_view(object(), "x") is None


# ---------------------------------------------------------------------------------
# A backend around a fake device: everything but the driver.


class FakeProps:
    multiprocessor_count = 132
    max_shared_memory_per_block = 49152


class FakeDevice:
    device_id = 0
    compute_capability = (9, 0)
    properties = FakeProps()
    name = "Fake H100"
    default_stream = "default-stream"

    def set_current(self):
        return None


@pytest.fixture
def fake_backend(monkeypatch):
    return make_fake_backend(monkeypatch)


def make_fake_backend(monkeypatch):
    """A CudaBackend on FakeDevice whose launches are recorded in ``be.launches``."""
    monkeypatch.setattr(cuda_compile, "_nvrtc_archs", lambda: (75, 80, 86, 89, 90, 100, 120))
    be = qc.CudaBackend(FakeDevice())
    launches = []
    monkeypatch.setattr(be, "kernel", lambda spec: spec)
    monkeypatch.setattr(be, "launch", lambda spec, grid, stream, *args:
                        launches.append((spec, grid, stream, args)))
    be.launches = launches
    return be


def _tensor(be, shape, dtype, ptr):
    return be._tensor(shape, dtype, ptr, owner=None)


def test_fake_backend_facts(fake_backend):
    be = fake_backend
    assert be.name == "cuda" and be.is_gpu and be.device_id == "cuda:0"
    assert be.arch == "sm_90a" and be.sm_count == 132
    assert "Fake H100" in be.device_name and "9.0" in be.device_name


def test_stream_argument_errors_before_the_driver(fake_backend):
    assert fake_backend.stream(None) == "default-stream"
    with pytest.raises(ql.InvalidProblem, match="stream"):
        fake_backend.stream("not a stream")
    with pytest.raises(ql.InvalidProblem, match="stream"):
        fake_backend.stream(1.5)


def test_wrap(fake_backend, monkeypatch):
    be = fake_backend
    monkeypatch.setattr(be, "_pointer_device", lambda ptr: "cuda:0")
    t = be.wrap(FakeCAI(shape=(2, 8), typestr="<f2", data=(1 << 20, False)), name="activation")
    assert isinstance(t, Tensor)
    assert (t.backend, t.device, t.shape, t.dtype, t.strides) == (
        "cuda", "cuda:0", (2, 8), ql.f16, (8, 1))
    assert t.memory == "cuda:0" and t.data_ptr == 1 << 20 and not t.readonly
    assert be.wrap(t) is t
    with pytest.raises(ql.InvalidProblem, match="numpy array"):
        be.wrap(np.zeros(3, np.float32), name="activation")
    with pytest.raises(ql.InvalidProblem, match="weight_q"):
        be.wrap(object(), name="weight_q")
    n = be.narrow(_tensor(be, (5, 3), ql.f32, 4096), 2)
    assert n.shape == (2, 3) and n.data_ptr == 4096 and n.memory == "cuda:0"


def test_aliasing_is_seen_through_device_pointers(fake_backend):
    """Views of one allocation (or of two overlapping ones) overlap by address."""
    be = fake_backend
    a = _tensor(be, (4, 4), ql.f32, 1 << 20)
    b = _tensor(be, (2, 4), ql.f32, (1 << 20) + 32)
    c = _tensor(be, (2, 4), ql.f32, (1 << 20) + 64)
    assert a.overlaps(b) and b.overlaps(a) and not a.overlaps(c) and not b.overlaps(c)


def _linear(be, m, n, k, dtype, bias=True, misalign=0, scheme="dynamic", input_scale=None,
            input_zero_point=None):
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=dtype, scheme=scheme)
    exe = be.linear_executable(desc)
    base = 1 << 30
    asym = desc.scheme.asymmetric
    t = {
        "activation": _tensor(be, (m, k), dtype, base + misalign),
        "weight_q": _tensor(be, (n, k), ql.s8, base + (1 << 24)),
        "weight_scale": _tensor(be, (n,), dtype, base + (2 << 24)),
        "output": _tensor(be, (m, n), dtype, base + (3 << 24)),
        "act_q_scratch": _tensor(be, (m, k), ql.s8, base + (4 << 24)),
        "act_scale_scratch": _tensor(be, (m,), dtype, base + (5 << 24)),
        "bias": _tensor(be, (n,), dtype, base + (6 << 24)) if bias else None,
        "act_zp_scratch": _tensor(be, (m,), ql.s32, base + (7 << 24)) if asym else None,
        "weight_colsum": _tensor(be, (n,), ql.s32, base + (8 << 24)) if asym else None,
        "input_scale": input_scale,
        "input_zero_point": input_zero_point,
    }
    t = LinearTensors(**t)
    be.launches.clear()
    exe.run(t, stream=None)
    return exe, t, list(be.launches)


def test_linear_run_launches_act_then_gemm_without_syncing(fake_backend):
    be = fake_backend
    exe, t, launches = _linear(be, 4096, 14336, 4096, ql.bf16)
    assert [spec.source for spec, *_ in launches] == ["act_quant.cu", "gemm_mma.cu"]
    (act, act_grid, s1, act_args), (gemm, gemm_grid, s2, gemm_args) = launches
    assert s1 == s2 == "default-stream"
    assert act_grid == (4096,) and act.args[2:4] == ("false", "true")  # block per row, vec16
    # x, q, scale, zero points (none: null), M, K, q_min, q_max, static scale and zero
    # point (unused by the dynamic kernel: 0).
    assert act_args[:4] == (t.activation.data_ptr, t.act_q_scratch.data_ptr,
                            t.act_scale_scratch.data_ptr, 0)
    assert [int(v) for v in act_args[4:8]] == [4096, 4096, -127, 127]
    assert all(isinstance(v, np.int32) for v in act_args[4:8])
    assert type(act_args[8]) is np.float32 and act_args[8] == 0
    assert type(act_args[9]) is np.int32 and act_args[9] == 0
    assert act.args[-1] == "0"  # SCHEME_DYNAMIC
    assert gemm.args[0] == "__nv_bfloat16" and gemm.args[-2:] == ("true", "0")
    assert gemm_grid == (32 * 112,)
    assert gemm_args[:8] == tuple(getattr(t, k).data_ptr for k in (
        "act_q_scratch", "act_scale_scratch", "weight_q", "weight_scale", "bias")) + (
        0, 0, t.output.data_ptr)
    assert [int(v) for v in gemm_args[8:]] == [4096, 14336, 4096, 1]
    assert "gemm_mma_128x128" in exe.sku and exe.sku.startswith("cuda.sm_90a.")


def test_decode_shape_takes_the_split_k_kernel(fake_backend):
    exe, t, launches = _linear(fake_backend, 1, 4096, 4096, ql.f16, bias=False)
    gemm, grid = launches[1][0], launches[1][1]
    assert gemm.source == "gemv_mma.cu" and grid == (512, 1)
    assert launches[1][3][4] == 0  # no bias: a null pointer
    assert "decode" in exe.sku
    exe, t, launches = _linear(fake_backend, 16, 14336, 4096, ql.f16)
    assert launches[1][0].args[2] == "4" and launches[1][1] == (448, 1)


def test_misaligned_tensors_take_the_exact_fallbacks(fake_backend):
    exe, t, launches = _linear(fake_backend, 8, 64, 256, ql.f16, misalign=2)
    act = launches[0][0]
    assert act.args[3] == "false", "an activation off 16-byte alignment must not use vec16 loads"
    exe, t, launches = _linear(fake_backend, 40, 64, 33, ql.f32)  # K % 16 != 0
    assert launches[0][0].args[3] == "false" and launches[1][0].args[-2:] == ("false", "2")
    assert "_bytes" in exe.sku


def test_odd_output_columns_store_singly(fake_backend):
    exe, t, launches = _linear(fake_backend, 40, 63, 64, ql.f16)
    assert int(launches[1][3][-1]) == 0


def test_quantize_plan(fake_backend):
    desc = ql.DynamicRangeQuantizeDescriptor(m=3, k=101, dtype=ql.f64)
    exe = fake_backend.quantize_executable(desc)
    t = QuantizeTensors(activation=_tensor(fake_backend, (3, 101), ql.f64, 1 << 20),
                        act_q=_tensor(fake_backend, (3, 101), ql.s8, 2 << 20),
                        act_scale=_tensor(fake_backend, (3,), ql.f64, 3 << 20))
    fake_backend.launches.clear()
    exe.run(t)
    (spec, grid, _, args), = fake_backend.launches
    assert spec.source == "act_quant.cu" and grid == (1,)
    assert spec.args[:4] == ("double", "256", "true", "false")
    assert exe.sku == "cuda.sm_90a.rowquant_warp_scalar"
    assert args[3] == 0 and [int(v) for v in args[4:8]] == [3, 101, -127, 127]
    assert type(args[8]) is np.float64 and type(args[9]) is np.int32



def test_sm75_uses_dp4a(monkeypatch):
    monkeypatch.setattr(cuda_compile, "_nvrtc_archs", lambda: (75, 80, 86, 89, 90))

    class Turing(FakeDevice):
        compute_capability = (7, 5)

    be = qc.CudaBackend(Turing())
    be.launches = []
    monkeypatch.setattr(be, "kernel", lambda spec: spec)
    monkeypatch.setattr(be, "launch",
                        lambda spec, grid, stream, *args: be.launches.append((spec, grid)))
    exe, _, launches = _linear(be, 1, 100, 64, ql.f32)
    assert launches[1][0].source == "gemm_dp4a.cu" and "decode_gemm_dp4a_16x128" in exe.sku
    exe, _, launches = _linear(be, 300, 100, 64, ql.f32)
    assert "gemm_dp4a_128x128" in exe.sku


def test_kernel_loads_the_compiled_cubin_by_mangled_name(monkeypatch):
    """kernel(): compile through the cache, then load by the mangled symbol NVRTC reported."""
    try:
        qc.nvrtc_version()
    except ql.BackendUnavailable as e:
        pytest.skip(f"NVRTC unavailable: {e.reason}")
    import cuda.core

    from qlinear.kernel_cache import KernelCache

    loaded = []

    class FakeObjectCode:
        def __init__(self, binary):
            self.binary = binary

        @staticmethod
        def from_cubin(binary, name="", symbol_mapping=None):
            return FakeObjectCode(binary)

        def get_kernel(self, name):
            loaded.append((self.binary[:4], name))
            return f"kernel:{name}"

    monkeypatch.setattr(cuda.core, "ObjectCode", FakeObjectCode)
    monkeypatch.setattr(cuda_compile, "_nvrtc_archs", lambda: (75, 80, 86, 89, 90))
    be = qc.CudaBackend(FakeDevice(), cache=KernelCache(None))
    spec = qc.act_spec(ql.f16, True, True)
    k = be.kernel(spec)
    assert loaded == [(b"\x7fELF", k.split(":", 1)[1])]
    assert k.startswith("kernel:_Z17qlinear_act_quantI6__half")
    assert be.kernel(spec) is k and len(loaded) == 1  # loaded once


def test_stream_protocols_become_handles(fake_backend, monkeypatch):
    made = []

    class FakeStream:
        @staticmethod
        def from_handle(h):
            made.append(h)
            return f"stream:{h}"

    monkeypatch.setattr(fake_backend._streams, "_stream_type", FakeStream)

    class Method:
        def __cuda_stream__(self):
            return (0, 0x1234)

    class Property:
        __cuda_stream__ = (0, 0x5678)

    class TorchLike:
        cuda_stream = 0x9ABC

    assert fake_backend.stream(Method()) == "stream:4660"
    assert fake_backend.stream(Property()) == "stream:22136"
    assert fake_backend.stream(TorchLike()) == "stream:39612"
    assert fake_backend.stream(0x1234) == "stream:4660" and made == [0x1234, 0x5678, 0x9ABC]
    from cuda.core import LEGACY_DEFAULT_STREAM

    assert fake_backend.stream(0) is LEGACY_DEFAULT_STREAM


# ---------------------------------------------------------------------------------
# Purity of the selection, and the read-back of strided views


def test_selection_is_pure_without_cuda_python():
    """Kernel choice needs neither cuda-python nor a device: with every ``cuda`` import
    refused, the selection module imports and chooses, for every architecture, only
    kernels that kernel_variants() lists (and so CI compiles)."""
    code = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "cuda" or name.startswith("cuda."):
            raise ImportError(f"{name} refused")
sys.meta_path.insert(0, Refuse())
from qlinear.backends.cuda.select import select_linear, select_quantize
from qlinear.backends.cuda.specs import SUPPORTED_ARCHS, kernel_variants
from qlinear.dtypes import FLOAT_DTYPES
from qlinear.problem import DECODE_MAX_M
for arch in SUPPORTED_ARCHS:
    names = {s.name_expression for s in kernel_variants(arch)}
    for dt in FLOAT_DTYPES:
        for m in (1, DECODE_MAX_M, DECODE_MAX_M + 1, 4096):
            for n, k in ((8, 3), (4096, 4096), (14336, 4096)):
                for scheme in ("dynamic", "static", "static_asym", "dynamic_asym"):
                    sel = select_linear(m, n, k, dt, arch, 132, scheme)
                    used = {sel.act, sel.act_fallback, sel.gemm, sel.gemm_fallback}
                    assert {s.name_expression for s in used} <= names, (arch, m, n, k)
                    assert ("decode" in sel.gemm.label) == (m <= DECODE_MAX_M), sel.sku
                    fast, fallback, grid = select_quantize(m, k, dt, scheme)
                    assert {fast.name_expression, fallback.name_expression} <= names
assert not [n for n in sys.modules if n == "cuda" or n.startswith("cuda.")]
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_to_numpy_reads_contiguous_and_strided_views(fake_backend, monkeypatch):
    """to_numpy copies the bytes a view spans and rebuilds its elements on the host (the
    'device' here is host memory, copied by a stand-in for cuMemcpyDtoH)."""
    import ctypes

    driver_mod = pytest.importorskip("cuda.bindings.driver")

    def memcpy_dtoh(dst, src, nbytes):
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    monkeypatch.setattr(driver_mod, "cuMemcpyDtoH", memcpy_dtoh)
    monkeypatch.setattr(fake_backend, "synchronize", lambda stream=None: None)
    memory = np.arange(6 * 10, dtype=np.float32).reshape(6, 10)
    base = memory.ctypes.data
    whole = _tensor(fake_backend, (6, 10), ql.f32, base)
    np.testing.assert_array_equal(fake_backend.to_numpy(whole), memory)
    # Rows 1..4, columns 2..7: a view whose rows are 10 elements apart.
    part = Tensor("cuda", "cuda:0", (4, 6), ql.f32, (10, 1), None, "cuda:0",
                  data_ptr=base + (1 * 10 + 2) * 4)
    got = fake_backend.to_numpy(part)
    np.testing.assert_array_equal(got, memory[1:5, 2:8])
    assert got.flags.c_contiguous and got.flags.owndata
    empty = _tensor(fake_backend, (0, 10), ql.f32, base)
    assert fake_backend.to_numpy(empty).shape == (0, 10)
