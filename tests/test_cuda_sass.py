"""Properties of the CUDA kernels' machine code (SASS), checked without a GPU.

Every variant of every supported architecture is compiled by NVRTC (the session's
``cuda_variants``) and disassembled with ``nvdisasm`` from the ``nvidia-cuda-nvdisasm``
wheel (:mod:`qlinear.backends.cuda.sass`). What reading the source cannot promise, the
instructions show:

- no local memory anywhere (no spills, no stack arrays);
- the integer tensor-core MMA (``IMMA``) in every sm_80+ GEMM and ``IDP.4A`` in the sm_75
  one: the integer paths really are integer;
- in the decode kernel on sm_90a, the first weight loads or L2 prefetches are issued before
  the programmatic-dependent-launch wait (``ACQBULK``), so they overlap the activation
  pass, and no activation read (``ld.global.cg``) is issued before that wait;
- in the vectorised activation pass, several 16-byte loads are in flight before the first
  one is used.
"""

from __future__ import annotations

import pytest

pytest.importorskip("cuda.core")
from qlinear.backends.cuda import sass  # noqa: E402
from qlinear.backends.cuda.specs import SUPPORTED_ARCHS, arch_number  # noqa: E402

pytestmark = pytest.mark.skipif(
    sass.find_nvdisasm() is None,
    reason="nvdisasm not found (pip install nvidia-cuda-nvdisasm)")

#: 16-byte loads the activation pass must have issued before it uses the first one.
ACT_LOADS_IN_FLIGHT = 4


@pytest.fixture(scope="module")
def machine_code(cuda_variants):
    """``{(arch, name expression): (KernelSpec, [Instruction])}``; each cubin is
    disassembled once."""
    by_key: dict[str, dict[str, list[sass.Instruction]]] = {}
    code = {}
    for (arch, name), (spec, entry) in cuda_variants.items():
        if entry.key not in by_key:
            by_key[entry.key] = sass.disassemble(entry.binary)
        mangled = entry.symbols[name]
        assert mangled in by_key[entry.key], f"{name}: no SASS for {mangled}"
        code[(arch, name)] = (spec, by_key[entry.key][mangled])
    return code


def _kernels(machine_code, arch, source=None):
    found = [(spec, code) for (a, _), (spec, code) in machine_code.items()
             if a == arch and (source is None or spec.source == source)]
    assert found, f"no kernels of {source or 'any source'} for {arch}"
    return found


def test_the_parser_reads_registers_and_opcodes():
    load = sass.Instruction(0x320, "@!P4", "LDG.E.128.CONSTANT", ("R12", "desc[UR8][R2.64]"))
    assert load.op == "LDG" and load.written == {12, 13, 14, 15} and load.read == {2, 3}
    mma = sass.Instruction(0x700, "", "IMMA.16832.S8.S8", ("R32", "R24.ROW", "R14.COL", "R36"))
    assert mma.written == {32, 33, 34, 35}
    assert mma.read == {24, 25, 26, 27, 14, 15, 36, 37, 38, 39}
    store = sass.Instruction(0xb0, "", "STG.E.128", ("desc[UR4][R4.64]", "R8"))
    assert store.written == set() and store.read == {4, 5, 8}
    code = [load, sass.Instruction(0x330, "", "IADD3", ("R20", "R1", "0x4", "RZ")),
            sass.Instruction(0x340, "", "IMAD", ("R21", "R13", "R20", "RZ"))]
    assert sass.first_use_index(code, 0) == 2
    assert sass.first_use_index(code, 1) == 2
    assert sass.first_use_index(code[:2], 0) is None


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_no_local_memory(machine_code, arch):
    for spec, code in _kernels(machine_code, arch):
        local = [i for i in code if i.op in ("LDL", "STL") or "LOCAL" in i.opcode]
        assert not local, (f"{arch} {spec.name_expression}: local memory (spills) at "
                           + ", ".join(f"{i.offset:#x} {i.opcode}" for i in local[:5]))


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_integer_gemms_use_integer_instructions(machine_code, arch):
    gemms = [(s, c) for s, c in _kernels(machine_code, arch) if s.source != "act_quant.cu"]
    for spec, code in gemms:
        ops = {i.opcode for i in code}
        if spec.source == "gemm_wgmma.cu":  # tests/test_cuda_wgmma.py checks these
            assert arch == "sm_90a"
        elif arch_number(arch) >= 80:
            assert spec.source in ("gemm_mma.cu", "gemv_mma.cu"), spec.source
            assert "IMMA.16832.S8.S8" in ops, f"{arch} {spec.name_expression}: no IMMA"
        else:
            assert spec.source == "gemm_dp4a.cu", spec.source
            assert "IDP.4A.S8.S8" in ops, f"{arch} {spec.name_expression}: no IDP.4A"
            assert not any(o.startswith("IMMA") for o in ops)


def test_decode_weight_loads_start_before_the_dependent_launch_wait(machine_code):
    decode = _kernels(machine_code, "sm_90a", "gemv_mma.cu")
    for spec, code in decode:
        waits = [n for n, i in enumerate(code) if i.op == "ACQBULK"]
        assert len(waits) == 1, f"{spec.name_expression}: {len(waits)} dependent-launch waits"
        before = code[:waits[0]]
        # Weights: prefetches to L2 (CCTL.E.PF2) or read-only loads (LDG...CONSTANT).
        early = [i for i in before if (i.op == "CCTL" and ".PF" in i.opcode)
                 or (i.op == "LDG" and "CONSTANT" in i.opcode)]
        ngroups = int(spec.args[2])
        assert len(early) >= ngroups, (
            f"{spec.name_expression}: {len(early)} weight loads/prefetches before the "
            f"dependent-launch wait, expected at least one per column group ({ngroups})")
        # The activations are the producer's output: reading them before the wait would
        # race with it.
        racy = [i for i in before if i.op == "LDG" and "CONSTANT" not in i.opcode]
        assert not racy, f"{spec.name_expression}: activation loads before the wait: {racy}"


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_activation_pass_keeps_loads_in_flight(machine_code, arch):
    vector = [(s, c) for s, c in _kernels(machine_code, arch, "act_quant.cu")
              if s.args[3] == "true"]
    assert vector
    for spec, code in vector:
        loads = [n for n, i in enumerate(code) if i.op == "LDG" and ".128" in i.opcode]
        assert loads, f"{arch} {spec.name_expression}: no 16-byte loads"
        first = loads[0]
        use = sass.first_use_index(code, first)
        assert use is not None, f"{arch} {spec.name_expression}: first load never used"
        in_flight = sum(1 for n in loads if n < use)
        assert in_flight >= ACT_LOADS_IN_FLIGHT, (
            f"{arch} {spec.name_expression}: {in_flight} 16-byte loads issued before the "
            f"first is used (at {code[use].offset:#x} {code[use].opcode}), expected at "
            f"least {ACT_LOADS_IN_FLIGHT}")
