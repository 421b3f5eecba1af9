"""The Hopper GEMM (cuda/gemm_wgmma.cu) checked without a GPU: when plans select it, what
ptxas and the machine code make of it, and how it is launched.

- Selection: only on sm_90a with the switch on, prefill shapes, K a positive multiple of
  16; the tile table; a persistent grid; the mma.sync byte-load kernel as the fallback.
- Compilation (every variant, from the session's ``cuda_variants``): no spills, no stack,
  exactly the launch-bounds cap of 168 registers (the register hand-over of setmaxnreg
  gives the consumers 232 only from that pool), dynamic shared memory within the H100's
  227 KiB, and no ptxas warning that a setmaxnreg was ignored or wgmma serialised.
- Machine code: the warpgroup integer MMA (``IGMMA.64xNx32.S8.S8``), the copy engine's
  tile loads (``UTMALDG.2D``), the register hand-over, mbarriers; no ``IMMA`` fallback.
- Launch: the tensor maps (what the driver is asked to encode), the dynamic shared-memory
  limit set when the plan is selected, the parameter block the driver is given, the
  maps cached per address, misaligned operands on the mma.sync fallback, the switch and
  what ``qlinear info`` says. The driver is a stand-in that records its calls.
"""

from __future__ import annotations

import ctypes

import pytest

pytest.importorskip("cuda.core")
from test_cuda_launch import _linear_tensors, rig  # noqa: E402,F401  (the fixture)

import qlinear as ql  # noqa: E402
from qlinear.backends import cuda as qc  # noqa: E402
from qlinear.backends.cuda import sass, specs, tma  # noqa: E402
from qlinear.backends.cuda import wgmma as wgmma_mod  # noqa: E402
from qlinear.errors import BackendUnavailable, InvalidProblem  # noqa: E402

#: Shared memory a block may opt in to on an H100 / H200 (227 KiB).
HOPPER_SMEM_OPTIN = 232448


# ---------------------------------------------------------------------------------
# Selection


@pytest.mark.parametrize("m, n, tile", [(4096, 4096, "128x256"), (512, 14336, "128x256"),
                                        (512, 4096, "128x128"), (65, 5, "128x128"),
                                        (300, 136, "128x128")])
def test_prefill_shapes_take_the_hopper_gemm_when_switched_on(m, n, tile):
    for scheme in ("dynamic", "dynamic_asym"):
        sel = qc.select_linear(m, n, 4096, "f16", "sm_90a", 132, scheme, wgmma=True)
        bm, bn, stages = specs.WGMMA_TILES[tile]
        assert sel.gemm.source == "gemm_wgmma.cu" and sel.gemm.args[1:3] == (str(bn), str(stages))
        assert sel.gemm.args[3] == ("1" if scheme == "dynamic_asym" else "0")
        assert f"+gemm_wgmma_{tile}x128_s{stages}" in sel.sku
        tiles = -(-m // bm) * -(-n // bn)
        assert sel.gemm_grid == (min(tiles, 132),)
        assert sel.gemm.tma_rows == (bm, bn) and sel.gemm.threads == 384
        plain = qc.select_linear(m, n, 4096, "f16", "sm_90a", 132, scheme)
        assert sel.gemm_fallback == plain.gemm_fallback  # misaligned: mma.sync byte loads
        assert plain.gemm.source == "gemm_mma.cu"  # off by default


@pytest.mark.parametrize("m, k, arch", [(64, 4096, "sm_90a"), (16, 4096, "sm_90a"),
                                        (512, 4104, "sm_90a"), (512, 0, "sm_90a"),
                                        (512, 4096, "sm_89"), (512, 4096, "sm_80")])
def test_other_shapes_and_devices_keep_their_kernels(m, k, arch):
    sel = qc.select_linear(m, 4096, k, "bf16", arch, 132, wgmma=True)
    assert sel == qc.select_linear(m, 4096, k, "bf16", arch, 132)
    assert "wgmma" not in sel.sku


def test_the_hopper_variants_fit_the_device():
    hopper = [s for s in qc.kernel_variants("sm_90a") if s.source == "gemm_wgmma.cu"]
    assert len(hopper) == 4 * len(specs.WGMMA_TILES) * 2  # dtypes x tiles x zero point
    for spec in hopper:
        assert 48 * 1024 < spec.smem <= HOPPER_SMEM_OPTIN, spec
    assert not any(s.source == "gemm_wgmma.cu" for a in qc.SUPPORTED_ARCHS if a != "sm_90a"
                   for s in qc.kernel_variants(a))


# ---------------------------------------------------------------------------------
# What ptxas and nvdisasm say


def _hopper_entries(cuda_variants):
    found = [(spec, entry) for (arch, _), (spec, entry) in cuda_variants.items()
             if spec.source == "gemm_wgmma.cu"]
    assert found
    return found


def test_ptxas_gives_the_register_pool_the_hand_over_needs(cuda_variants):
    for spec, entry in _hopper_entries(cuda_variants):
        report = qc.ptxas_report(entry.log)[entry.symbols[spec.name_expression]]
        assert report["arch"] == "sm_90a"
        assert (report["spill_stores"], report["spill_loads"], report["stack"]) == (0, 0, 0)
        # 128 x 40 + 256 x 232 <= 384 x 168: the consumers' registers come from the pool
        # the producer gives back, so the kernel must start with the whole cap.
        assert report["registers"] == 168, report
        # All of its shared memory is dynamic: the stage ring and its barriers.
        assert report["smem"] == 0 and spec.smem <= HOPPER_SMEM_OPTIN, report
        cap = 65536 // 384 // 8 * 8
        assert 128 * 40 + 256 * 232 <= 384 * cap
        for warning in ("C7508", "C7510", "C7515", "serializ"):
            assert warning not in entry.log, f"ptxas: {warning} in\n{entry.log}"


def test_machine_code_is_the_hopper_path(cuda_variants):
    if sass.find_nvdisasm() is None:
        pytest.skip("nvdisasm not found (pip install nvidia-cuda-nvdisasm)")
    cubins: dict[str, dict[str, list[sass.Instruction]]] = {}
    for spec, entry in _hopper_entries(cuda_variants):
        if entry.key not in cubins:
            cubins[entry.key] = sass.disassemble(entry.binary)
        code = cubins[entry.key][entry.symbols[spec.name_expression]]
        ops = [i.opcode for i in code]
        bn = int(spec.args[1])
        mma = [o for o in ops if o.startswith("IGMMA")]
        assert mma and set(mma) == {f"IGMMA.64x{bn}x32.S8.S8"}, (spec.label, set(mma))
        assert not any(o.startswith(("IMMA", "HMMA", "IDP")) for o in ops), spec.label
        assert ops.count("UTMALDG.2D") == 2, spec.label  # the A and the W tile
        assert "USETMAXREG.DEALLOC.CTAPOOL" in ops and "USETMAXREG.TRY_ALLOC.CTAPOOL" in ops
        regs = {i.opcode: i.operands[-1] for i in code if i.op == "USETMAXREG"}
        assert int(regs["USETMAXREG.DEALLOC.CTAPOOL"], 16) == 40
        assert int(regs["USETMAXREG.TRY_ALLOC.CTAPOOL"], 16) == 232
        assert "WARPGROUP.ARRIVE" in ops
        # One wait per stage that leaves a group in flight (wgmma_wait<1>) and one after
        # the last: ptxas serialising the MMAs would add waits between them.
        waits = sorted(i.operands[-1] for i in code if i.opcode == "WARPGROUP.DEPBAR.LE")
        assert waits == ["0x0", "0x1"], (spec.label, waits)
        assert len(mma) == 4, (spec.label, len(mma))  # the stage's k32 steps, unrolled
        assert any(o.startswith("SYNCS.PHASECHK") for o in ops)  # mbarrier waits
        assert not any(i.op in ("LDL", "STL") for i in code)


def test_the_parser_reads_warpgroup_mma():
    line = sass.Instruction(0x1310, "", "IGMMA.64x256x32.S8.S8", ("R24", "gdesc[UR16]", "R24"))
    assert line.op == "IGMMA" and line.written == set(range(24, 24 + 128))


# ---------------------------------------------------------------------------------
# Launch


class FakeMap:
    """A CUtensorMap stand-in: 128 bytes the kernel parameters point at."""

    def __init__(self, tag):
        self.raw = (ctypes.c_uint64 * 16)(*([tag] * 16))

    def getPtr(self):  # noqa: N802  (cuda.bindings' name)
        return ctypes.addressof(self.raw)


class FakeDriver:
    """The cuda.bindings driver calls tma.py makes, recorded."""

    class CUkernel:
        pass

    class _Enum:
        def __getattr__(self, name):
            return name

    cuuint64_t = cuuint32_t = int  # the real ones are checked in test_real_bindings_*
    CUtensorMapDataType = CUtensorMapInterleave = CUtensorMapSwizzle = _Enum()
    CUtensorMapL2promotion = CUtensorMapFloatOOBfill = CUfunction_attribute = _Enum()

    def __init__(self):
        self.encoded, self.attributes, self.launches = [], [], []

    def cuTensorMapEncodeTiled(self, *args):  # noqa: N802
        self.encoded.append(args)
        return 0, FakeMap(len(self.encoded))

    def cuKernelGetFunction(self, kernel):  # noqa: N802
        return 0, ("function", kernel)

    def cuFuncSetAttribute(self, func, attribute, value):  # noqa: N802
        self.attributes.append((func, attribute, value))
        return (0,)

    def cuLaunchKernel(self, func, gx, gy, gz, bx, by, bz, smem, stream, params, extra):  # noqa: N802
        ptrs = (ctypes.c_void_p * 12).from_address(params)
        maps = [ctypes.c_uint64.from_address(p).value for p in ptrs[:2]]
        pointers = [ctypes.c_uint64.from_address(p).value for p in ptrs[2:8]]
        ints = [ctypes.c_int32.from_address(p).value for p in ptrs[8:]]
        self.launches.append(dict(func=func, grid=(gx, gy, gz), block=(bx, by, bz), smem=smem,
                                  stream=stream, maps=maps, pointers=pointers, ints=ints))
        return (0,)


@pytest.fixture
def hopper(rig, monkeypatch):  # noqa: F811
    """A backend on a stand-in H100 with the switch on, and the stand-in driver."""
    import cuda.core

    fake = FakeDriver()
    monkeypatch.setattr(tma, "_driver", lambda: fake)

    class Kernels:
        @staticmethod
        def from_cubin(binary, name=""):
            return Kernels()

        def get_kernel(self, mangled):
            kernel = type("Kernel", (), {})()
            kernel.handle = FakeDriver.CUkernel()
            kernel.name = mangled
            return kernel

    monkeypatch.setattr(cuda.core, "ObjectCode", Kernels)
    monkeypatch.setenv("QLINEAR_CUDA_WGMMA", "1")
    be = rig.make()
    be._launcher._launch = lambda stream, config, kernel, *args: rig.launched.append(kernel.name)
    return be, fake, rig


def test_a_hopper_run_passes_its_maps_and_parameters(hopper):
    be, fake, rec = hopper
    m, n, k = 300, 4096, 512
    exe = be.linear_executable(ql.QuantizedLinearDescriptor(m=m, c_out=n, k=k, dtype=ql.f16))
    gemm = exe.sel.gemm
    assert gemm.source == "gemm_wgmma.cu" and "gemm_wgmma_128x128" in exe.sku
    # The shared-memory limit is raised when the plan is selected, not in a run.
    assert [(a[1], a[2]) for a in fake.attributes] == [
        ("CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", gemm.smem)]
    rec.frozen = True
    t = _linear_tensors(be, m, n, k, ql.f16)
    exe.run(t)
    exe.run(t)
    assert rec.launched == [f"mangled<{exe.sel.act.name_expression}>"] * 2
    assert len(fake.encoded) == 2, "the maps are made once per address"
    for args, (ptr, rows, box) in zip(fake.encoded, [(t.act_q_scratch.data_ptr, m, 128),
                                                     (t.weight_q.data_ptr, n, 128)]):
        assert args == ("CU_TENSOR_MAP_DATA_TYPE_UINT8", 2, ptr, [k, rows], [k], [128, box],
                        [1, 1], "CU_TENSOR_MAP_INTERLEAVE_NONE", "CU_TENSOR_MAP_SWIZZLE_128B",
                        "CU_TENSOR_MAP_L2_PROMOTION_L2_256B",
                        "CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE")
    first, second = fake.launches
    assert first == second
    assert first["grid"] == (min(-(-m // 128) * (n // 128), 132), 1, 1)
    assert first["block"] == (384, 1, 1) and first["smem"] == gemm.smem
    assert first["maps"] == [1, 2]  # the A map, then the W map
    assert first["pointers"] == [t.act_scale_scratch.data_ptr, t.weight_scale.data_ptr,
                                 t.bias.data_ptr, 0, 0, t.output.data_ptr]
    assert first["ints"] == [m, n, k, 1]


def test_a_refused_tensor_map_launches_nothing(hopper, monkeypatch):
    """The maps are made before the activation pass is launched: when the driver refuses
    one, the caller's scratch has not been written."""
    be, fake, rec = hopper
    exe = be.linear_executable(ql.QuantizedLinearDescriptor(m=300, c_out=256, k=512,
                                                            dtype=ql.f16))
    monkeypatch.setattr(fake, "cuTensorMapEncodeTiled", lambda *args: (1, None))
    with pytest.raises(ql.DeviceError, match="encoding the tensor map of 300 x 512 bytes"):
        exe.run(_linear_tensors(be, 300, 256, 512, ql.f16))
    assert not rec.launched and not fake.launches


def test_misaligned_operands_take_the_mma_sync_fallback(hopper):
    be, fake, rec = hopper
    exe = be.linear_executable(ql.QuantizedLinearDescriptor(m=300, c_out=256, k=512,
                                                            dtype=ql.bf16))
    rec.frozen = True
    exe.run(_linear_tensors(be, 300, 256, 512, ql.bf16, act_off=2, wq_off=4))
    assert rec.launched[-1] == f"mangled<{exe.sel.gemm_fallback.name_expression}>"
    assert not fake.encoded and not fake.launches


def test_tensor_maps_refuse_what_the_copy_engine_cannot_do():
    for ptr, rows, row_bytes, box in [(8, 10, 64, 128), (16, 10, 40, 128),
                                      (16, 0, 64, 128), (16, 10, 64, 300)]:
        with pytest.raises(InvalidProblem, match="tensor map: expected"):
            tma.encode_rows_map(ptr, rows, row_bytes, box)


def _reaches_the_driver(call):
    """Run ``call`` against the real cuda.bindings: its arguments must get through the
    bindings' own conversions; here, without a driver, the call then fails to find
    libcuda (on a machine with one it may succeed or return an error code)."""
    try:
        call()
    except TypeError as e:  # the bindings refused an argument's type
        raise AssertionError(f"cuda.bindings refused the arguments: {e}") from None
    except Exception:
        pass


def test_real_bindings_take_the_tensor_map_arguments():
    _reaches_the_driver(lambda: tma.encode_rows_map(1 << 20, 300, 512, 128))


def test_real_bindings_take_the_launch_arguments():
    from cuda.bindings import driver

    class Map:
        raw = (ctypes.c_uint64 * 16)()

        def getPtr(self):  # noqa: N802
            return ctypes.addressof(self.raw)

    class Stream:
        handle = driver.CUstream()

    _reaches_the_driver(lambda: tma.launch_with_maps(
        driver.CUfunction(), "k", (132,), 384, 197696, Stream(), (Map(), Map()),
        (1 << 20,) * 6, (300, 4096, 512, 1)))
    kernel = type("Kernel", (), {"handle": driver.CUkernel()})()
    _reaches_the_driver(lambda: tma.kernel_function(kernel, 197696))


def test_the_map_cache_keeps_the_latest(monkeypatch):
    made = []
    monkeypatch.setattr(tma, "encode_rows_map", lambda *a: made.append(a) or a)
    cache = tma.TensorMapCache(capacity=2)
    for ptr in (16, 32, 16, 48, 32):
        cache.get(ptr, 4, 16, 128)
    assert [a[0] for a in made] == [16, 32, 48, 32] and len(cache) == 2


@pytest.mark.parametrize("value, on", [("1", True), ("0", False), ("", False)])
def test_the_switch_and_what_info_says(hopper, monkeypatch, value, on):
    _, _, rec = hopper
    monkeypatch.setenv("QLINEAR_CUDA_WGMMA", value)
    be = rec.make()
    be._launcher._launch = lambda *args: None
    assert be.wgmma is on
    line = be.info()["wgmma"]
    assert line.startswith("on (unverified on a GPU)" if on else "off (unverified on a GPU)")
    assert "QLINEAR_CUDA_WGMMA=1" in line or on
    be.wgmma = not on
    desc = ql.QuantizedLinearDescriptor(m=512, c_out=4096, k=4096, dtype=ql.f16)
    assert ("wgmma" in be.linear_executable(desc).sku) is (not on)
    older = rec.make(cc=(8, 9))
    assert older.info()["wgmma"] == "n/a: the Hopper GEMM needs sm_90a, this device is sm_89"


def test_a_bad_switch_names_itself(monkeypatch):
    monkeypatch.setenv("QLINEAR_CUDA_WGMMA", "yes")
    with pytest.raises(BackendUnavailable, match="QLINEAR_CUDA_WGMMA: expected 0 or 1, got 'yes'"):
        wgmma_mod.wgmma_setting()
