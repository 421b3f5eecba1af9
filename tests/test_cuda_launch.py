"""The cuda backend's launch side without a GPU: what a plan loads when selected, the
device made current for every launch, programmatic dependent launch (when it is used, how
a refusal is reported), the cuda-core version check, and when device memory is freed.
The device, the compiler and the driver calls are stand-ins that record what they get."""

from __future__ import annotations

import gc
import importlib.metadata
import subprocess
import sys
import warnings

import pytest

import qlinear as ql
from qlinear.backends import cuda as qc
from qlinear.backends.cuda import backend as cuda_backend
from qlinear.backends.cuda import compile as cuda_compile
from qlinear.errors import QlinearWarning
from qlinear.kernel_cache import CacheEntry
from qlinear.problem import LinearTensors, QuantizeTensors


class FakeProps:
    multiprocessor_count = 132
    max_shared_memory_per_block = 49152


class FakeStream:
    """Stands for cuda.core's Stream: wrapped foreign handles become these."""

    def __init__(self, handle):
        self.handle = handle

    @staticmethod
    def from_handle(handle):
        return FakeStream(handle)


DEFAULT_STREAM = FakeStream("default")


class RecordingDevice:
    """A device that notes when it is made current."""

    device_id = 0
    properties = FakeProps()
    name = "Fake H100"
    default_stream = DEFAULT_STREAM

    def __init__(self, events, cc=(9, 0)):
        self.events = events
        self.compute_capability = cc

    def set_current(self):
        self.events.append("current")

    def allocate(self, *args, **kwargs):
        raise AssertionError("device memory must not come from a stream-ordered pool")


class TorchLikeStream:
    def __init__(self, handle):
        self.cuda_stream = handle


class FakeObjectCode:
    @staticmethod
    def from_cubin(binary, name=""):
        return FakeObjectCode()

    def get_kernel(self, mangled):
        return f"kernel:{mangled}"


@pytest.fixture
def rig(monkeypatch):
    """A backend whose compiles, loads and launches are recorded: ``rig.compiled`` (name
    expressions NVRTC was asked for), ``rig.launched`` ((kernel, config, stream)),
    ``rig.events`` ("current" and "launch" in the order they happened)."""
    import cuda.core

    monkeypatch.setattr(cuda_compile, "_nvrtc_archs", lambda: (75, 80, 86, 89, 90, 100, 120))
    monkeypatch.setattr(cuda_backend, "nvrtc_version", lambda: (12, 8))
    monkeypatch.setattr(cuda.core, "ObjectCode", FakeObjectCode)
    monkeypatch.delenv("QLINEAR_CUDA_PDL", raising=False)

    class Rig:
        compiled: list = []
        launched: list = []
        events: list = []
        frozen = False

        def make(self, cc=(9, 0)):
            be = qc.CudaBackend(RecordingDevice(self.events, cc))
            monkeypatch.setattr(be._streams, "_stream_type", FakeStream)

            def launch(stream, config, kernel, *args):
                self.events.append("launch")
                self.launched.append((kernel, config, stream))

            be._launcher._launch = launch
            return be

    rig = Rig()
    rig.compiled, rig.launched, rig.events = [], [], []

    def compile_module(source, names, options, cache=None):
        if rig.frozen:
            raise ql.DeviceError(f"compiling {list(names)} after selection")
        rig.compiled += list(names)
        return CacheEntry(key="fake", binary=b"\x7fELF",
                          symbols={n: f"mangled<{n}>" for n in names})

    monkeypatch.setattr(cuda_backend, "compile_module", compile_module)
    return rig


def _t(be, shape, dtype, ptr):
    return be._tensor(shape, dtype, ptr, owner=None)


def _linear_tensors(be, m, n, k, dtype, act_off=0, wq_off=0):
    base = 1 << 30
    return LinearTensors(
        activation=_t(be, (m, k), dtype, base + act_off),
        weight_q=_t(be, (n, k), ql.s8, base + (1 << 24) + wq_off),
        weight_scale=_t(be, (n,), dtype, base + (2 << 24)),
        output=_t(be, (m, n), dtype, base + (3 << 24)),
        act_q_scratch=_t(be, (m, k), ql.s8, base + (4 << 24)),
        act_scale_scratch=_t(be, (m,), dtype, base + (5 << 24)),
        bias=_t(be, (n,), dtype, base + (6 << 24)))


# ---------------------------------------------------------------------------------
# Everything a plan may launch is compiled and loaded when it is selected


@pytest.mark.parametrize("m", [1, 300])
def test_misaligned_runs_compile_nothing(rig, m):
    """The fallbacks for misaligned addresses are loaded with the plan: a run that takes
    them compiles nothing (a compile error there would come after the activation pass
    already wrote the caller's scratch)."""
    be = rig.make()
    desc = ql.QuantizedLinearDescriptor(m=m, c_out=256, k=512, dtype=ql.f16)
    exe = be.linear_executable(desc)
    qexe = be.quantize_executable(ql.DynamicRangeQuantizeDescriptor(m=m, k=512, dtype=ql.f16))
    sel = exe.sel
    assert sel.act != sel.act_fallback and sel.gemm != sel.gemm_fallback
    assert set(rig.compiled) == {s.name_expression for s in (
        sel.act, sel.act_fallback, sel.gemm, sel.gemm_fallback)}
    rig.frozen = True
    exe.run(_linear_tensors(be, m, 256, 512, ql.f16, act_off=2, wq_off=4))
    (act, *_), (gemm, *_) = rig.launched
    assert act == f"kernel:mangled<{sel.act_fallback.name_expression}>"
    assert gemm == f"kernel:mangled<{sel.gemm_fallback.name_expression}>"
    rig.launched.clear()
    base = 1 << 30
    qexe.run(QuantizeTensors(activation=_t(be, (m, 512), ql.f16, base + 2),
                             act_q=_t(be, (m, 512), ql.s8, base + (1 << 24)),
                             act_scale=_t(be, (m,), ql.f16, base + (2 << 24))))
    assert rig.launched[0][0] == f"kernel:mangled<{qexe.fallback.name_expression}>"


# ---------------------------------------------------------------------------------
# The device is current for every launch, whatever the stream


@pytest.mark.parametrize("kind", ["none", "foreign", "cached-foreign", "stream"])
def test_every_launch_makes_the_device_current_once(rig, kind):
    be = rig.make()
    spec = qc.act_spec(ql.f32, True, False)
    stream = {"none": None, "foreign": TorchLikeStream(0x1234),
              "cached-foreign": TorchLikeStream(0x5678), "stream": FakeStream(0x9ABC)}[kind]
    if kind == "cached-foreign":
        be.stream(stream)  # wrapped (and kept) before
    be.kernel(spec)
    rig.events.clear()
    be.launch(spec, (1,), stream, 0, 0, 0)
    assert rig.events[-2:] == ["current", "launch"]  # (wrapping a new handle: once more)
    rig.events.clear()
    be.launch(spec, (1,), stream, 0, 0, 0)
    assert rig.events == ["current", "launch"]  # one call per launch, no more
    expected = DEFAULT_STREAM if stream is None else stream
    if kind.endswith("foreign"):
        assert rig.launched[0][2].handle == stream.cuda_stream
    else:
        assert rig.launched[0][2] == expected


# ---------------------------------------------------------------------------------
# Programmatic dependent launch: decided at selection, shown, refusals reported


DECODE_SKU = "cuda.sm_90a.rowquant_block256_vec16+decode_gemv_mma_n8_splitk8{}+dequant_f16"


def _decode(be):
    return be.linear_executable(ql.QuantizedLinearDescriptor(m=1, c_out=4096, k=4096,
                                                              dtype=ql.f16))


def _pdl_flags(rig):
    return [bool(config.programmatic_stream_serialization) for _, config, _ in rig.launched]


def test_pdl_is_shown_in_sku_and_info(rig):
    be = rig.make()
    exe = _decode(be)
    assert exe.sku == DECODE_SKU.format("+pdl")
    big = be.linear_executable(ql.QuantizedLinearDescriptor(m=4096, c_out=4096, k=4096,
                                                            dtype=ql.f16))
    assert "pdl" not in big.sku
    assert be.info()["pdl"] == "on"
    exe.run(_linear_tensors(be, 1, 4096, 4096, ql.f16))
    assert _pdl_flags(rig) == [False, True]  # the decode GEMM only


class OldLaunchConfig:
    """A LaunchConfig from before programmatic_stream_serialization."""

    def __init__(self, grid=None, block=None):
        self.grid, self.block = grid, block
        self.programmatic_stream_serialization = False


@pytest.mark.parametrize("why", ["env", "arch", "cuda.core"])
def test_pdl_off_says_why(rig, monkeypatch, why):
    if why == "env":
        monkeypatch.setenv("QLINEAR_CUDA_PDL", "0")
    be = rig.make(cc=(8, 0) if why == "arch" else (9, 0))
    if why == "cuda.core":
        be._launcher._LaunchConfig = OldLaunchConfig
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exe = _decode(be)
        status = be.info()["pdl"]
        exe.run(_linear_tensors(be, 1, 4096, 4096, ql.f16))
    warned = [w for w in caught if issubclass(w.category, QlinearWarning)]
    assert "pdl" not in exe.sku and _pdl_flags(rig) == [False, False]
    if why == "env":
        assert status == "off: QLINEAR_CUDA_PDL=0" and not warned
    elif why == "arch":
        assert status == "off: sm_80 has none (it needs sm_90+)" and not warned
    else:
        assert exe.sku == DECODE_SKU.format("")
        assert status.startswith("off: cuda.core's LaunchConfig refused it (TypeError: ")
        assert "programmatic_stream_serialization" in status
        assert len(warned) == 1 and "programmatic_stream_serialization" in str(warned[0].message)


def test_a_refused_pdl_launch_warns_once_and_runs_without(rig):
    be = rig.make()
    plain_launch = be._launcher._launch
    attempts = []

    def driver_without_pdl(stream, config, kernel, *args):
        attempts.append(bool(config.programmatic_stream_serialization))
        if config.programmatic_stream_serialization:
            raise RuntimeError("CUDA_ERROR_NOT_SUPPORTED: operation not supported")
        plain_launch(stream, config, kernel, *args)

    be._launcher._launch = driver_without_pdl
    exe = _decode(be)
    assert exe.sku == DECODE_SKU.format("+pdl")
    tensors = _linear_tensors(be, 1, 4096, 4096, ql.f16)
    with pytest.warns(QlinearWarning, match="CUDA_ERROR_NOT_SUPPORTED") as caught:
        exe.run(tensors)
    assert len([w for w in caught if issubclass(w.category, QlinearWarning)]) == 1
    assert attempts == [False, True, False] and _pdl_flags(rig) == [False, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exe.run(tensors)
    assert attempts[3:] == [False, False]  # not tried again
    assert exe.sku == DECODE_SKU.format("")
    status = be.info()["pdl"]
    assert status.startswith("off: the driver refused launching qlinear_gemv_mma<")
    assert "CUDA_ERROR_NOT_SUPPORTED" in status


def test_a_launch_failing_without_pdl_too_leaves_pdl_on(rig):
    be = rig.make()

    def broken(stream, config, kernel, *args):
        raise RuntimeError("CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES")

    exe = _decode(be)
    be._launcher._launch = broken
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ql.DeviceError, match="qlinear_act_quant") as info:
            exe.run(_linear_tensors(be, 1, 4096, 4096, ql.f16))
    assert "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES" in info.value.native
    with pytest.raises(ql.DeviceError, match="qlinear_gemv_mma"):
        be.launch(exe.sel.gemm, (1,), None, 0)
    assert be.info()["pdl"] == "on" and "+pdl+" in exe.sku


# ---------------------------------------------------------------------------------
# An older cuda-core is unavailable, naming the version found and the one needed


@pytest.mark.parametrize("name", ["LaunchConfig", "launch", "ObjectCode", "Program",
                                  "LEGACY_DEFAULT_STREAM", "utils.StridedMemoryView"])
def test_an_old_cuda_core_is_unavailable(monkeypatch, name):
    import cuda.core

    monkeypatch.delenv("QLINEAR_CUDA_DEVICE", raising=False)
    owner, _, attr = name.rpartition(".")
    monkeypatch.delattr(cuda.core.utils if owner == "utils" else cuda.core, attr)
    with pytest.raises(ql.BackendUnavailable) as info:
        qc.create()
    found = importlib.metadata.version("cuda-core")
    want = "cuda.core." + name
    assert info.value.reason == f"cuda-core {found} lacks {want}; qlinear needs cuda-core>=1.0"
    assert info.value.install == "pip install -U 'cuda-core>=1.0'"


def test_qlinear_info_survives_an_old_cuda_core():
    code = ("import sys, cuda.core; del cuda.core.LaunchConfig; "
            "from qlinear.cli import main; sys.exit(main(['info']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[cuda]" in out.stdout and "lacks cuda.core.LaunchConfig" in out.stdout


# ---------------------------------------------------------------------------------
# Device memory is freed only after the device's work, on every stream


@pytest.fixture
def fake_driver(monkeypatch):
    """cuda.bindings' memory calls recorded in ``calls``; addresses handed out from 4096."""
    driver = pytest.importorskip("cuda.bindings.driver")
    calls = []
    next_ptr = [4096]

    def alloc(nbytes):
        ptr = next_ptr[0]
        next_ptr[0] += 1 << 20
        calls.append(("alloc", nbytes, ptr))
        return (0, ptr)

    monkeypatch.setattr(driver, "cuCtxGetCurrent", lambda: (0, "ctx0"))
    monkeypatch.setattr(driver, "cuMemAlloc", alloc)
    monkeypatch.setattr(driver, "cuCtxPushCurrent",
                        lambda ctx: calls.append(("push", ctx)) or (0,))
    monkeypatch.setattr(driver, "cuCtxSynchronize", lambda: calls.append(("sync",)) or (0,))
    monkeypatch.setattr(driver, "cuMemFree", lambda ptr: calls.append(("free", ptr)) or (0,))
    monkeypatch.setattr(driver, "cuCtxPopCurrent", lambda: calls.append(("pop",)) or (0, "c"))
    yield calls
    gc.collect()


def test_device_memory_is_freed_after_all_device_work(rig, fake_driver):
    be = rig.make()
    rig.events.clear()
    t = be.empty((3, 5), ql.f32)
    assert rig.events == ["current"]  # cuMemAlloc allocates in the current context
    (_, nbytes, ptr), = fake_driver
    assert nbytes == 60 and t.data_ptr == ptr
    view = be.narrow(t, 2)  # a view keeps the memory alive
    del t
    gc.collect()
    assert len(fake_driver) == 1
    del view
    gc.collect()
    assert fake_driver[1:] == [("push", "ctx0"), ("sync",), ("free", ptr), ("pop",)]
    empty = be.empty((0, 7), ql.f16)
    assert fake_driver[-1][:2] == ("alloc", 1)  # cuMemAlloc refuses 0 bytes
    empty.owner.close()
    empty.owner.close()  # once only
    assert [c[0] for c in fake_driver[-4:]] == ["push", "sync", "free", "pop"]


def test_allocation_failure_is_a_device_error(rig, monkeypatch):
    driver = pytest.importorskip("cuda.bindings.driver")
    be = rig.make()
    monkeypatch.setattr(driver, "cuCtxGetCurrent", lambda: (0, "ctx0"))
    monkeypatch.setattr(driver, "cuMemAlloc", lambda n: (driver.CUresult(2), None))
    with pytest.raises(ql.DeviceError, match="allocating 80 bytes on cuda:0 failed") as info:
        be.empty((20,), ql.f32)
    assert "OUT_OF_MEMORY" in info.value.native
