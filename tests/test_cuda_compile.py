"""Every CUDA kernel variant compiles with NVRTC for every supported architecture.

No GPU or driver needed: NVRTC turns C++ into a cubin on the host. For each
architecture in :data:`qlinear.backends.cuda.SUPPORTED_ARCHS` and each kernel a plan can
choose (every dtype, path, tile configuration and alignment variant), this checks that
the cubin holds the kernel's symbol (read from its ELF symbol table) and that ptxas
reports no register spills. One NVRTC program per (source, arch, dtype) instantiates
many kernels at once; the programs run in a process pool
(:func:`qlinear.backends.cuda.compile_all_variants`).
"""

from __future__ import annotations

import struct

import pytest

pytest.importorskip("cuda.core")
from qlinear.backends import cuda as qc  # noqa: E402
from qlinear.backends.cuda import compile as cuda_compile  # noqa: E402
from qlinear.errors import DeviceError  # noqa: E402
from qlinear.kernel_cache import KernelCache  # noqa: E402

try:
    qc.nvrtc_version()
    _NVRTC = ""
except Exception as e:  # pragma: no cover - depends on the machine
    _NVRTC = str(e)
pytestmark = pytest.mark.skipif(bool(_NVRTC), reason=f"NVRTC unavailable: {_NVRTC}")

EM_CUDA = 190


def elf_function_symbols(binary: bytes) -> set[str]:
    """Names of the function symbols in an ELF64 little-endian file (a cubin)."""
    assert binary[:4] == b"\x7fELF", "not an ELF file"
    assert binary[4] == 2 and binary[5] == 1, "expected ELF64 little-endian"
    (e_machine,) = struct.unpack_from("<H", binary, 18)
    assert e_machine == EM_CUDA, f"expected a CUDA ELF (machine {EM_CUDA}), got {e_machine}"
    e_shoff, = struct.unpack_from("<Q", binary, 40)
    e_shentsize, e_shnum = struct.unpack_from("<HH", binary, 58)
    sections = []
    for i in range(e_shnum):
        off = e_shoff + i * e_shentsize
        _, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, sh_entsize = struct.unpack_from(
            "<IIQQQQIIQQ", binary, off)
        sections.append((sh_type, sh_offset, sh_size, sh_link, sh_entsize))
    names = set()
    for sh_type, offset, size, link, entsize in sections:
        if sh_type != 2:  # SHT_SYMTAB
            continue
        str_off = sections[link][1]
        for j in range(size // (entsize or 24)):
            st_name, st_info = struct.unpack_from("<IB", binary, offset + j * (entsize or 24))
            if st_info & 0xF != 2:  # STT_FUNC
                continue
            end = binary.index(b"\0", str_off + st_name)
            names.add(binary[str_off + st_name:end].decode())
    return names


@pytest.fixture(scope="module")
def compiled(cuda_variants):
    """(arch, name expression) -> (mangled symbol, cubin function symbols, ptxas report)."""
    results = {}
    reports = {}
    for (arch, name), (_spec, entry) in cuda_variants.items():
        if entry.key not in reports:
            reports[entry.key] = (qc.ptxas_report(entry.log), elf_function_symbols(entry.binary))
        report, funcs = reports[entry.key]
        mangled = entry.symbols.get(name)
        results[(arch, name)] = (mangled, funcs, report.get(mangled))
    return results


@pytest.mark.parametrize("arch", qc.SUPPORTED_ARCHS)
def test_every_kernel_compiles_without_spills(compiled, arch):
    specs = qc.kernel_variants(arch)
    assert specs
    problems = []
    for spec in specs:
        mangled, funcs, report = compiled[(arch, spec.name_expression)]
        if not mangled:
            problems.append(f"{spec.name_expression}: no symbol mapping from NVRTC")
            continue
        if mangled not in funcs:
            problems.append(f"{spec.name_expression}: {mangled} not in the cubin's symbol table")
        if report is None:
            problems.append(f"{spec.name_expression}: no ptxas report")
            continue
        if report.get("arch") != arch:
            problems.append(f"{spec.name_expression}: compiled for {report.get('arch')}")
        if report.get("spill_stores", 1) or report.get("spill_loads", 1):
            problems.append(f"{spec.name_expression}: spills {report}")
        if report.get("stack", 1):
            problems.append(f"{spec.name_expression}: uses a stack frame {report}")
        # Static shared memory within the 48 KiB a block gets without opting in; dynamic
        # (spec.smem) comes on top, up to the device's opt-in limit (tests/test_cuda_wgmma.py).
        if report.get("smem", 0) > 48 * 1024:
            problems.append(f"{spec.name_expression}: {report['smem']} bytes of static smem")
        max_regs = 65536 // spec.threads
        if report.get("registers", 0) > min(255, max_regs):
            problems.append(f"{spec.name_expression}: {report['registers']} registers")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("arch", qc.SUPPORTED_ARCHS)
def test_the_right_kernel_families_per_arch(arch):
    sources = {s.source for s in qc.kernel_variants(arch)}
    if arch == "sm_90a":  # the Hopper GEMM needs the architecture-specific target
        assert sources == {"act_quant.cu", "gemm_mma.cu", "gemv_mma.cu", "gemm_wgmma.cu"}
    elif qc.arch_number(arch) >= 80:
        assert sources == {"act_quant.cu", "gemm_mma.cu", "gemv_mma.cu"}
    else:  # sm_75: neither cp.async nor m16n8k32 integer MMA
        assert sources == {"act_quant.cu", "gemm_dp4a.cu"}
    dtypes = {s.args[0] for s in qc.kernel_variants(arch)}
    assert dtypes == {"float", "__half", "__nv_bfloat16", "double"}


@pytest.mark.parametrize("arch", qc.SUPPORTED_ARCHS)
def test_plans_only_choose_compiled_kernels(arch):
    names = {s.name_expression for s in qc.kernel_variants(arch)}
    assert len(names) == len(qc.kernel_variants(arch)), "a kernel listed twice"
    for dtype in ("f32", "f16", "bf16", "f64"):
        for m in (0, 1, 2, 15, 16, 17, 100, 512, 4096, 70000):
            for n in (1, 7, 384, 1536, 4096, 14336):
                for k in (0, 1, 3, 16, 100, 384, 4096, 14336):
                    for scheme in ("static", "static_asym", "dynamic_asym"):
                        other = qc.select_linear(m, n, k, dtype, arch, 132, scheme)
                        for spec in (other.act, other.act_fallback, other.gemm,
                                     other.gemm_fallback):
                            assert spec.name_expression in names, (scheme, spec)
                        assert scheme in other.sku
                    sel = qc.select_linear(m, n, k, dtype, arch, 132)
                    for spec in (sel.act, sel.act_fallback, sel.gemm, sel.gemm_fallback):
                        assert spec.name_expression in names
                    hopper = qc.select_linear(m, n, k, dtype, arch, 132, wgmma=True)
                    assert hopper.gemm.name_expression in names
                    assert hopper.gemm_fallback == sel.gemm_fallback
                    # The shape alone chooses the GEMM (family, tile, width, alignment).
                    assert (other.gemm.args[:-1], other.gemm_grid) == (sel.gemm.args[:-1],
                                                                       sel.gemm_grid)
                    if m <= 16:
                        assert "decode" in sel.sku
                    if k % 16:
                        assert sel.gemm == sel.gemm_fallback
                    assert sel.sku.startswith(f"cuda.{arch}.")
                    assert all(0 < g < 2**31 for g in sel.gemm_grid)
                    assert len(sel.gemm_grid) == 1 or sel.gemm_grid[1] <= 65535


def test_compile_error_is_a_device_error_with_the_log(monkeypatch):
    monkeypatch.setattr(cuda_compile, "expand_source",
                        lambda name: "__global__ void broken() { this_is_not_cuda; }\n")
    with pytest.raises(DeviceError) as info:
        qc.compile_module("broken.cu", ["broken"], qc.CompileOptions("sm_80"), KernelCache(None))
    text = str(info.value)
    assert "sm_80" in text and "this_is_not_cuda" in text and "error" in text


def test_sources_avoid_host_headers():
    for name in ("qlinear_common.cuh", "act_rows.cuh", "act_quant.cu", "gemm_mma.cu", "gemv_mma.cu",
                 "gemm_dp4a.cu", "hopper.cuh", "gemm_wgmma.cu"):
        text = qc.expand_source(name)
        includes = [line.split(None, 1)[1] for line in text.splitlines()
                    if line.lstrip().startswith("#include")]
        assert includes and all(i in ("<cuda_fp16.h>", "<cuda_bf16.h>") for i in includes), includes


def test_arch_for():
    supported = (75, 80, 86, 87, 89, 90, 100, 120)
    assert qc.arch_for((9, 0), supported) == "sm_90a"
    assert qc.arch_for((8, 0), supported) == "sm_80"
    assert qc.arch_for((8, 9), supported) == "sm_89"
    assert qc.arch_for((7, 5), supported) == "sm_75"
    assert qc.arch_for((12, 1), supported) == "sm_120"  # a cubin runs on later minors
    from qlinear.errors import Unsupported

    with pytest.raises(Unsupported, match="7.5 or newer"):
        qc.arch_for((7, 0), supported)
    with pytest.raises(Unsupported, match="nvrtc"):
        qc.arch_for((13, 0), supported)


def test_ptxas_report_parses_the_log():
    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 0 barriers\n"
           "ptxas info    : Compiling entry function '_Z3barPf' for 'sm_80'\n"
           "ptxas info    : Used 128 registers, used 1 barriers, 49152 bytes smem\n")
    assert qc.ptxas_report(log) == {
        "_Z3fooPf": {"arch": "sm_90a", "stack": 8, "spill_stores": 4, "spill_loads": 4,
                     "registers": 40, "smem": 0},
        "_Z3barPf": {"arch": "sm_80", "registers": 128, "smem": 49152}}


def _ptx(source: str, name: str, arch: str) -> str:
    """PTX of one kernel through NVRTC directly (cuda.core's compile('ptx') wants a driver)."""
    from cuda.bindings import nvrtc
    from cuda.core import ProgramOptions

    kwargs, _ = cuda_compile._header_options()
    opts = ProgramOptions(arch=arch.replace("sm_", "compute_"), std="c++17", ftz=False,
                          prec_div=True, prec_sqrt=True, **kwargs).as_bytes("nvrtc")
    text = qc.expand_source(source).encode()
    err, prog = nvrtc.nvrtcCreateProgram(text, source.encode(), 0, [], [])
    assert int(err) == 0
    try:
        nvrtc.nvrtcAddNameExpression(prog, name.encode())
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), list(opts))
        assert int(err) == 0, f"{name} does not compile for {arch}"
        _, size = nvrtc.nvrtcGetPTXSize(prog)
        buf = b" " * size
        nvrtc.nvrtcGetPTX(prog, buf)
        return buf.rstrip(b"\0 ").decode()
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_90a"])
@pytest.mark.parametrize("dtype", ["f16", "f64"])
def test_ptx_follows_the_contract(arch, dtype):
    """Correctly rounded quotients and round-to-nearest-even in the activation pass, no
    FMA contraction anywhere, the integer MMA / cp.async / dp4a instructions the design names, and
    programmatic dependent launch only on sm_90+."""
    from qlinear.dtypes import as_dtype

    dt = as_dtype(dtype)
    sel = qc.select_linear(1, 4096, 4096, dt, arch, 132)
    big = qc.select_linear(4096, 4096, 4096, dt, arch, 132)
    suffix = "f32" if dtype == "f16" else "f64"
    # The row's scale (and the asymmetric zero point) by IEEE division; each element by
    # the reciprocal and one exact correction (two written-out fmas per product: no
    # contraction anywhere else), rounded half to even straight to an integer.
    for scheme in ("dynamic", "static", "dynamic_asym"):
        spec = qc.select_quantize(1, 4096, dt, scheme)[0]
        act = _ptx(spec.source, spec.name_expression, arch)
        assert all(s in act for s in (f"div.rn.{suffix}", f"rcp.rn.{suffix}",
                                      f"cvt.rni.s32.{suffix}")), scheme
        assert act.count(f"fma.rn.{suffix}") == 2 * act.count(f"mul.rn.{suffix}") > 0, scheme
    for spec in (sel.gemm, big.gemm):
        ptx = _ptx(spec.source, spec.name_expression, arch)
        assert f"fma.rn.{suffix}" not in ptx and f"mul.rn.{suffix}" in ptx
        if qc.arch_number(arch) >= 80:
            assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in ptx
            assert ("griddepcontrol.wait" in ptx) == (spec.pdl and qc.arch_number(arch) >= 90)
        else:
            assert "dp4a.s32.s32" in ptx and "mma.sync" not in ptx and "cp.async" not in ptx
    if qc.arch_number(arch) >= 80:
        assert "cp.async.cg.shared.global" in _ptx(big.gemm.source, big.gemm.name_expression, arch)
